"""The OpenAI-compatible server, run in-process on a free loopback port and driven by the official `openai`
client: listing, completions (plain and streamed), request batching, the HTTP judge backend, auth and errors."""

from __future__ import annotations

import concurrent.futures
import functools
import threading
import time
from contextlib import contextmanager

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402

from minirlhf import serve  # noqa: E402
from minirlhf.generation import SamplingConfig, generate_responses  # noqa: E402
from minirlhf.model import load_policy  # noqa: E402
from minirlhf.rewards.judge import HTTPJudgeBackend, PointwiseJudge  # noqa: E402
from minirlhf.tokenizer import Tokenizer  # noqa: E402

KEY = "test-key"
MAX_TOKENS_LIMIT = 64
QUESTION = [{"role": "user", "content": "Tom has 7 apples. He buys 5 more. How many apples does Tom have now?"}]


@contextmanager
def running(app):
    """Serve `app` with uvicorn on a free 127.0.0.1 port in a background thread; yields the base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive(), "server did not shut down"


@pytest.fixture(scope="module")
def server(start_model_dir):
    """(base URL, app, tokenizer) of a server holding the conftest start model, with an API key."""
    tokenizer = Tokenizer.load(start_model_dir)
    app = serve.create_app(load_policy(start_model_dir), tokenizer, "tiny", api_key=KEY, max_batch=16,
                           batch_wait_ms=50, max_new_tokens_limit=MAX_TOKENS_LIMIT)
    with running(app) as url:
        yield url, app, tokenizer
    assert not app.state.worker._thread.is_alive()


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=30) as c:
        yield c


def greedy_reference(model_dir, messages, max_tokens: int) -> str:
    model, tokenizer = load_policy(model_dir).eval(), Tokenizer.load(model_dir)
    return generate_responses(model, tokenizer, [messages], SamplingConfig(max_tokens, temperature=0.0))[0]


def test_models_list(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].object == "model"


def test_chat_completion_matches_the_sampler(client, server, start_model_dir):
    tokenizer = server[2]
    reply = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == "tiny" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    assert choice.message.content == greedy_reference(start_model_dir, QUESTION, 8)
    usage = reply.usage
    assert usage.prompt_tokens == len(tokenizer.encode_prompt(QUESTION))
    assert 1 <= usage.completion_tokens <= 8 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert (usage.completion_tokens == 8) == (choice.finish_reason == "length")


def test_stream_sends_the_same_completion_in_chunks(client):
    plain = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    deltas = [c.choices[0] for c in chunks if c.choices]
    assert deltas[0].delta.role == "assistant"
    assert "".join(d.delta.content or "" for d in deltas) == plain.choices[0].message.content
    assert len(deltas) > 3  # one chunk per token
    assert deltas[-1].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_seed_makes_sampling_repeatable(client):
    ask = lambda seed: client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=10,
                                                      temperature=1.0, top_p=0.9, seed=seed).choices[0].message.content
    assert ask(3) == ask(3)


def test_concurrent_requests_are_batched(server):
    worker, n = server[1].state.worker, 8
    clients = [openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=30) for _ in range(n)]
    start, replies = threading.Barrier(n), [None] * n

    def ask(i):
        start.wait()
        messages = [{"role": "user", "content": f"Sara has {i + 2} pens. How many pens does Sara have?"}]
        replies[i] = clients[i].chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)

    before = worker.batches_run
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for c in clients:
        c.close()
    assert all(r is not None and isinstance(r.choices[0].message.content, str) for r in replies)
    assert worker.batches_run - before < n


def test_http_judge_backend_talks_to_the_server(server, monkeypatch):
    monkeypatch.setenv("MINIRLHF_TEST_KEY", KEY)
    backend = HTTPJudgeBackend(f"{server[0]}/v1", "tiny", api_key_env="MINIRLHF_TEST_KEY", max_tokens=4)
    replies = backend.complete(["Rate this. Score?", "Another one", "Rate this. Score?"])
    assert all(isinstance(r, str) for r in replies) and replies[0] == replies[2]  # greedy
    judge = PointwiseJudge(backend)
    judge.score([QUESTION] * 2, ["12", "13"], [{}] * 2)
    assert judge.stats["judge/backend_errors"] == 0 and judge.stats["judge/requests"] == 2
    monkeypatch.setenv("MINIRLHF_TEST_KEY", "wrong")
    assert backend.complete(["Rate this."]) == [None]


def test_wrong_or_missing_key_is_401(server):
    with openai.OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    response = httpx.post(f"{server[0]}/v1/chat/completions", json={"messages": QUESTION})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b'{"messages": "hi"}', "messages"),
    (b'{"messages": []}', "messages"),
    (b'{"messages": [{"role": "bot", "content": "hi"}]}', "messages[0].role"),
    (b'{"messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', "n"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": true}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 0}', "top_p"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}', "seed"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": -1}', "seed"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content"),
    (b"[" * 100_000 + b"]" * 100_000, None),
])
def test_malformed_requests_are_400_json(server, body, param):
    response = httpx.post(f"{server[0]}/v1/chat/completions", content=body,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert "Traceback" not in response.text


def test_over_long_prompt_or_max_tokens_is_400(client):
    long = [{"role": "user", "content": "7 + 5 = 12. " * 100}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=long, max_tokens=4)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=MAX_TOKENS_LIMIT + 1)
    assert info.value.param == "max_tokens"


def test_internal_errors_are_500_without_internals(start_model_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(serve, "generate", broken)
    app = serve.create_app(load_policy(start_model_dir), Tokenizer.load(start_model_dir), "tiny", batch_wait_ms=0)
    with TestClient(app, raise_server_exceptions=False) as http:
        response = http.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2})
        assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
        assert "secret" not in response.text and "Traceback" not in response.text
        missing = http.get("/v1/nowhere")
        assert missing.status_code == 404 and "error" in missing.json()


HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


def test_a_request_that_breaks_the_worker_fails_alone(start_model_dir, monkeypatch):
    """An exception inside the worker thread (here: the sampler, once) fails only its batch; later requests
    are answered and /health stays 200."""
    calls = []
    real = serve.generate

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt("a BaseException, the kind that used to kill the thread")
        return real(*args, **kwargs)

    monkeypatch.setattr(serve, "generate", flaky)
    app = serve.create_app(load_policy(start_model_dir), Tokenizer.load(start_model_dir), "tiny", batch_wait_ms=0)
    with TestClient(app, raise_server_exceptions=False) as http:
        assert http.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2}).status_code == 500
        assert http.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2}).status_code == 200
        assert http.get("/health").json()["status"] == "ok"


def test_bodies_over_the_limit_are_413_and_huge_prompts_are_refused_before_tokenizing(start_model_dir, monkeypatch):
    tokenizer = Tokenizer.load(start_model_dir)
    app = serve.create_app(load_policy(start_model_dir), tokenizer, "tiny", batch_wait_ms=0, max_body_bytes=100_000)
    encoded = []
    original = tokenizer.encode_prompt
    monkeypatch.setattr(tokenizer, "encode_prompt", lambda messages: encoded.append(1) or original(messages))
    with TestClient(app, raise_server_exceptions=False) as http:
        big = {"messages": [{"role": "user", "content": "x" * 200_000}]}
        response = http.post("/v1/chat/completions", json=big)
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
        long = {"messages": [{"role": "user", "content": "7 + 5 = 12. " * 8000}], "max_tokens": 2}  # 96 kB
        response = http.post("/v1/chat/completions", json=long)
        assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
        assert not encoded  # refused by its size alone
        assert http.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2}).status_code == 200


def test_load_of_good_and_bad_requests_leaves_the_server_healthy(server):
    """24 concurrent clients on loopback: every good request is answered, every bad one is a 4xx, and the server
    (its worker included) is alive at the end."""
    url = server[0]
    bad_bodies = [b"{not json", b'{"messages": []}', b"[" * 50_000, b'{"messages": [{"role": "user", "content": '
                  b'"\\ud800"}]}', b'{"messages": [{"role": "user", "content": "hi"}], "seed": 99999999999999'
                  b'999999999}', b"x" * 2_000_000]

    def request(i: int) -> tuple[bool, int]:
        post = functools.partial(httpx.post, f"{url}/v1/chat/completions", headers=HEADERS, timeout=60)
        if i % 2:
            return False, post(content=bad_bodies[i // 2 % len(bad_bodies)]).status_code
        return True, post(json={"messages": QUESTION, "max_tokens": 4, "temperature": 0.7, "seed": i}).status_code

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(request, range(48)))
    assert all(status == 200 for good, status in results if good), results
    assert all(400 <= status < 500 for good, status in results if not good), results
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
