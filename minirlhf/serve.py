"""An OpenAI-compatible server for a native model: `GET /v1/models` and `POST /v1/chat/completions`, so the
`openai` client, `HTTPJudgeBackend` and other OpenAI tooling can talk to a trained policy or judge.

Design choices:
- One worker thread runs every generation. It takes the first queued request, waits up to `batch_wait_ms`
  for more (at most `max_batch`), groups those with the same (max_tokens, temperature, top_p) and runs the
  batched KV-cache sampler once per group. Greedy requests batch whatever their top_p or seed; a request
  with a seed runs alone, so its output depends on the seed only, not on its batch mates; requests without
  a seed share the server's random generator.
- `stream: true` generates the whole completion first, then sends it as SSE chunks of one token each
  (`data: {chat.completion.chunk}` ... `data: [DONE]`): clients see the streaming protocol, not lower
  latency. Errors are therefore always a plain JSON response, never a broken stream.
- Requests are checked before they are queued; a bad one gets 400 with an OpenAI-style body
  `{"error": {"message", "type": "invalid_request_error", "param", "code"}}`. A prompt whose tokens plus
  max_tokens exceed the model's context is rejected (400, code `context_length_exceeded`), not truncated.
  max_tokens defaults to what is left of the context, capped at `max_new_tokens_limit`; asking for more
  than the cap is a 400.
- With `api_key` set, every endpoint needs `Authorization: Bearer <key>` (401 otherwise). Any unexpected
  error is a 500 whose body holds no internals; the traceback goes to the server log.
- One request cannot break the server or starve the others: a body over `max_body_bytes` is refused (413)
  while it is read; a prompt is checked against the context cheaply (by its UTF-8 size, a bound on its token
  count) before it is tokenized, and tokenized off the event loop; an error inside the worker fails only the
  requests of that batch (400 for bad input, 500 otherwise) and the worker lives on. `GET /health` answers
  200 while the worker runs and 503 if it ever stopped.
- Supported fields: messages (system / user / assistant, string content), max_tokens (or
  max_completion_tokens), temperature, top_p, seed, stream, stream_options.include_usage, n = 1. Others
  (stop, logprobs, tools, ...) are ignored; `model` is echoed as the served model's name.
- completion_tokens counts the end-of-turn token when the model emits one (it was generated).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import queue
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data.formats import ROLES
from .generation import SamplingConfig, generate
from .model import load_policy
from .tokenizer import Tokenizer

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the server needs FastAPI and uvicorn: pip install 'minirlhf[serve]'") from e


class APIError(Exception):
    """An error answered with an OpenAI-style JSON body."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, error_type

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


@dataclass
class _Job:
    prompt_ids: list[int]
    sampling: SamplingConfig
    seed: int | None
    future: Future[list[int]] = field(default_factory=Future)  # resolves to the completion ids

    def group_key(self) -> tuple:
        s = self.sampling
        if s.temperature == 0:
            return (s.max_new_tokens, 0.0)
        return (s.max_new_tokens, s.temperature, s.top_p, None if self.seed is None else id(self))


class BatchWorker:
    """The thread that runs every generation, batching the requests queued while it waits or works."""

    def __init__(self, model: nn.Module, eos_id: int, pad_id: int, max_batch: int = 16, batch_wait_ms: float = 10):
        self.model, self.eos_id, self.pad_id = model, eos_id, pad_id
        self.max_batch, self.batch_wait = max_batch, batch_wait_ms / 1000
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device)
        self.generator.seed()
        self.batches_run = 0  # `generate` calls so far
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="minirlhf-batch-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the queued jobs, then end the thread."""
        self._queue.put(None)
        self._thread.join()

    def submit(self, prompt_ids: list[int], sampling: SamplingConfig, seed: int | None = None) -> Future[list[int]]:
        """Queue one prompt; the future resolves to its completion ids (ending with EOS if the model stopped)."""
        job = _Job(prompt_ids, sampling, seed)
        self._queue.put(job)
        return job.future

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            jobs, deadline = [first], time.monotonic() + self.batch_wait
            while len(jobs) < self.max_batch:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                jobs.append(job)
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                if job.future.set_running_or_notify_cancel():  # False: the client went away
                    groups.setdefault(job.group_key(), []).append(job)
            for group in groups.values():
                try:
                    self._run(group)
                except BaseException as e:  # noqa: BLE001 - whatever happens, only this batch fails
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(e if isinstance(e, Exception) else RuntimeError(repr(e)))

    def _run(self, jobs: list[_Job]) -> None:
        seed = jobs[0].seed
        generator = self.generator if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        rollout = generate(self.model, [j.prompt_ids for j in jobs], jobs[0].sampling, self.eos_id, self.pad_id,
                           generator)
        self.batches_run += 1
        for job, ids in zip(jobs, rollout.completions(), strict=True):
            job.future.set_result(ids)


@dataclass
class _ChatRequest:
    messages: list[dict[str, str]]
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stream: bool
    include_usage: bool


def _get(body: dict, key: str, types: type | tuple[type, ...], default: Any = None) -> Any:
    """body[key] if it has one of `types` (a bool is not a number here), `default` if missing or null."""
    types = types if isinstance(types, tuple) else (types,)
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join(t.__name__ for t in types)
        raise APIError(400, f"'{key}' must be {names}, got {type(value).__name__}", "invalid_type", key)
    return value


def _parse_chat_request(body: Any) -> _ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", "invalid_request")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "invalid_messages",
                       "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'", "invalid_messages",
                           f"messages[{i}]")
        if m.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}",
                           "invalid_messages", f"messages[{i}].role")
        if not isinstance(m.get("content"), str):
            raise APIError(400, f"messages[{i}].content must be a string (content parts are not supported)",
                           "invalid_messages", f"messages[{i}].content")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate such as "\ud800": JSON allows it, UTF-8 does not
            raise APIError(400, f"messages[{i}].content is not valid Unicode text (a lone surrogate)",
                           "invalid_messages", f"messages[{i}].content") from None
    n = _get(body, "n", int, 1)
    if n != 1:
        raise APIError(400, "only n=1 is supported", "invalid_value", "n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get(body, key, int)
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"'{key}' must be at least 1", "invalid_value", key)
    temperature = float(_get(body, "temperature", (int, float), 1.0))
    if not 0 <= temperature <= 2:
        raise APIError(400, "'temperature' must be between 0 and 2", "invalid_value", "temperature")
    top_p = float(_get(body, "top_p", (int, float), 1.0))
    if not 0 < top_p <= 1:
        raise APIError(400, "'top_p' must be in (0, 1]", "invalid_value", "top_p")
    stream_options = _get(body, "stream_options", dict, {})
    seed = _get(body, "seed", int)
    if seed is not None and not 0 <= seed < 2**63:
        raise APIError(400, "'seed' must be an integer in [0, 2^63)", "invalid_value", "seed")
    return _ChatRequest([{"role": m["role"], "content": m["content"]} for m in messages], max_tokens, temperature,
                        top_p, seed, _get(body, "stream", bool, False), bool(stream_options.get("include_usage")))


def _token_deltas(tokenizer: Tokenizer, ids: list[int]) -> Iterator[str]:
    """The decoded text of `ids` in one piece per token, holding back pieces that end inside a UTF-8 character;
    the pieces join to the full decoded text."""
    sent = ""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k])
        if text.startswith(sent) and not text.endswith("\ufffd") and len(text) > len(sent):
            yield text[len(sent):]
            sent = text
    text = tokenizer.decode(ids)
    if text.startswith(sent) and text != sent:  # a piece held back to the end
        yield text[len(sent):]


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (whatever Content-Length says)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; this server accepts at most {limit}",
                       "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body passes {limit} bytes, the most this server accepts",
                           "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(model: nn.Module, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
               max_batch: int = 16, batch_wait_ms: float = 10, max_new_tokens_limit: int = 512,
               max_body_bytes: int = 1_000_000) -> FastAPI:
    """The ASGI app serving `model`; its worker thread starts and stops with the app's lifespan and is
    reachable as `app.state.worker` (e.g. `app.state.worker.batches_run`)."""
    model.eval()
    context = model.config.max_seq_len
    # No token of a byte-level BPE spans more than this many bytes, so a prompt of more than
    # context * max_token_bytes UTF-8 bytes cannot fit, and is refused without tokenizing it.
    max_token_bytes = tokenizer.max_token_bytes
    worker = BatchWorker(model, tokenizer.eos_id, tokenizer.pad_id, max_batch, batch_wait_ms)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="minirlhf", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return APIError(500, "the server failed to process the request", error_type="server_error").response()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", "invalid_api_key")

    @app.get("/health")
    async def health() -> JSONResponse:
        if worker.alive:
            return JSONResponse({"status": "ok", "batches_run": worker.batches_run})
        return JSONResponse({"status": "worker stopped"}, status_code=503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "minirlhf"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        raw = await _read_body(request, max_body_bytes)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", "invalid_json") from None
        except RecursionError:
            raise APIError(400, "the request body is not valid JSON: nested too deeply", "invalid_json") from None
        chat = _parse_chat_request(body)
        size = sum(len(m["content"].encode("utf-8")) for m in chat.messages)
        if size > context * max_token_bytes:
            raise APIError(400, f"this model's maximum context length is {context} tokens; the messages take "
                           f"{size} bytes, more than {context} tokens can hold", "context_length_exceeded",
                           "messages")
        prompt_ids = await asyncio.to_thread(tokenizer.encode_prompt, chat.messages)
        max_tokens = chat.max_tokens or max(1, min(max_new_tokens_limit, context - len(prompt_ids)))
        if max_tokens > max_new_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {max_new_tokens_limit}",
                           "invalid_value", "max_tokens")
        if len(prompt_ids) + max_tokens > context:
            raise APIError(400, f"this model's maximum context length is {context} tokens; the messages take "
                           f"{len(prompt_ids)} and max_tokens asks for {max_tokens} more", "context_length_exceeded",
                           "messages")
        sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=chat.temperature, top_p=chat.top_p)
        if not worker.alive:
            raise APIError(503, "the generation worker has stopped; restart the server", error_type="server_error")
        try:
            ids = await asyncio.wrap_future(worker.submit(prompt_ids, sampling, chat.seed))
        except (ValueError, OverflowError) as e:  # a request the sampler could not take: the client's input
            raise APIError(400, f"the request could not be processed: {str(e).splitlines()[0][:200]}",
                           "invalid_request") from None
        finish_reason = "stop" if ids and ids[-1] == tokenizer.eos_id else "length"
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(ids),
                 "total_tokens": len(prompt_ids) + len(ids)}
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if not chat.stream:
            message = {"role": "assistant", "content": tokenizer.decode(ids)}
            return {**head, "object": "chat.completion", "usage": usage,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}]}

        def event(**fields: Any) -> str:
            return f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', **fields})}\n\n"

        def delta(content: dict, reason: str | None = None) -> str:
            return event(choices=[{"index": 0, "delta": content, "finish_reason": reason, "logprobs": None}])

        def events() -> Iterator[str]:
            yield delta({"role": "assistant", "content": ""})
            for piece in _token_deltas(tokenizer, ids):
                yield delta({"content": piece})
            yield delta({}, finish_reason)
            if chat.include_usage:
                yield event(choices=[], usage=usage)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 16, batch_wait_ms: float = 10, max_new_tokens_limit: int = 512,
          model_name: str | None = None, device: str = "cpu") -> None:
    """Load the model in `model_dir` and serve it until interrupted (Ctrl-C). `model_name` defaults to the
    directory's name; set `api_key` whenever `host` is reachable from other machines."""
    try:
        import uvicorn
    except ImportError as e:
        raise ImportError("the server needs FastAPI and uvicorn: pip install 'minirlhf[serve]'") from e
    model, tokenizer = load_policy(model_dir, device=device), Tokenizer.load(model_dir)
    name = model_name or Path(model_dir).resolve().name
    app = create_app(model, tokenizer, name, api_key, max_batch, batch_wait_ms, max_new_tokens_limit)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"minirlhf: warning: serving on {host} without an API key; anyone who can reach it can use it",
              file=sys.stderr)
    print(f"serving {name} at http://{host}:{port}/v1 (OpenAI-compatible)", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="info")
