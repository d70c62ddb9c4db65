"""`minirlhf <stage> --config configs/rlhf.yaml key=value ...`

Training stages read their section of the YAML config; `key=value` overrides win. Utility commands
(`generate`, `chat`, `export-hf`, `demo`) take flags. Errors a user can fix print one line and exit 2.
"""

from __future__ import annotations

import argparse
import errno
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .allocator import keep_freed_memory
from .config import ConfigError, describe, load_stage_config, parse_overrides
from .data.formats import DataError
from .errors import SetupError, blocked_pickle_reason, one_line
from .stages import STAGES, check_context_window
from .train import distributed
from .train.checkpoint import check_writable_dir, checkpoint_dirs
from .train.loop import NonFiniteError

DEFAULT_CONFIG = "configs/rlhf.yaml"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a stage, with what a user needs to know to resume."""

    @staticmethod
    def status_of(e: KeyboardInterrupt) -> int:
        return 143 if e.args and "SIGTERM" in str(e.args[0]) else 130  # 128 + signal number, as a shell reports

    @property
    def status(self) -> int:
        return self.status_of(self)


def _on_sigterm(signum: int, frame: object) -> None:
    # How Slurm, Docker and Kubernetes stop a job: handled like Ctrl-C, so the step in flight is abandoned,
    # the last checkpoint stays intact, and the user is told how to resume.
    raise KeyboardInterrupt("stopped by SIGTERM")


class _StopAgainIfSwallowed:
    """`sys.unraisablehook`: a KeyboardInterrupt from Ctrl-C or SIGTERM that lands while a finalizer runs (an object's
    `__del__`, a generator the garbage collector closes) cannot leave it; Python prints it ("Exception ignored in")
    and the run goes on as if no stop had been asked for. Raise the same signal again, a moment later from another
    thread, so that its handler raises in the main flow (raised from here, it would land in this hook, which cannot
    raise either). Anything else goes to the hook that was in place."""

    def __init__(self, previous: Callable[[Any], object]) -> None:
        self.previous = previous

    def __call__(self, unraisable: Any) -> None:  # a sys.UnraisableHookArgs
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            stop = signal.SIGTERM if Interrupted.status_of(unraisable.exc_value) == 143 else signal.SIGINT
            again = threading.Timer(0.01, signal.raise_signal, [stop])
            again.daemon = True
            again.start()
        else:
            self.previous(unraisable)


def install_stop_handlers() -> None:
    """SIGTERM handled as Ctrl-C, and no stop lost in a finalizer (signal handlers live in the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    if not isinstance(sys.unraisablehook, _StopAgainIfSwallowed):
        sys.unraisablehook = _StopAgainIfSwallowed(sys.unraisablehook)


def _stage_command(stage: str, args: argparse.Namespace) -> int:
    cls, run = STAGES[stage]
    if args.help_config:
        print(f"{stage} options (set in the YAML section `{stage}:` or as key=value):\n{describe(cls)}")
        return 0
    config_path = args.config if args.config or not Path(DEFAULT_CONFIG).is_file() else DEFAULT_CONFIG
    if args.config and not Path(args.config).is_file():
        raise ConfigError(f"{args.config}: config file not found")
    overrides = parse_overrides(args.overrides)
    if args.resume:
        overrides["resume"] = True
    cfg = load_stage_config(cls, config_path, stage, overrides)
    check_context_window(stage, cfg)
    if getattr(cfg, "out_dir", ""):  # before any data or model is loaded
        check_writable_dir(Path(cfg.out_dir), "out_dir")
    try:
        result = run(cfg)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: say what is left to resume from
        out_dir = Path(getattr(cfg, "out_dir", ""))
        latest = checkpoint_dirs(out_dir)[-1:]
        raise Interrupted(f"{e.args[0] if e.args else 'interrupted'}; " + (
            f"the last checkpoint {latest[0]} is intact: continue with `minirlhf {stage} ... resume=true`" if latest
            else f"no checkpoint was written in {out_dir} (save_every={getattr(cfg, 'save_every', 0)}): nothing "
                 "to resume, a new run starts over")) from None
    if result:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    distributed.barrier()  # every rank done (rank 0 saves last) before any leaves the process group at exit
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .generation import SamplingConfig, generate_responses
    from .model import load_policy
    from .tokenizer import Tokenizer

    model, tokenizer = load_policy(args.model).eval(), Tokenizer.load(args.model)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    prompts = args.prompt or [line.strip() for line in sys.stdin if line.strip()]
    responses = generate_responses(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                                   sampling, seed=args.seed)
    for prompt, response in zip(prompts, responses):
        print(f"> {prompt}\n{response}\n")
    return 0


def _chat(args: argparse.Namespace) -> int:
    from .generation import SamplingConfig, generate_responses
    from .model import load_policy
    from .tokenizer import Tokenizer

    model, tokenizer = load_policy(args.model).eval(), Tokenizer.load(args.model)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    history: list[dict[str, str]] = []
    print("chat with the model; empty line or Ctrl-D to quit, /reset to clear the history")
    for turn in range(10**9):
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        if text == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": text})
        reply = generate_responses(model, tokenizer, [history], sampling, seed=args.seed + turn)[0]
        history.append({"role": "assistant", "content": reply})
        print(f"bot> {reply}")
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from .model import MiniMindLM
    from .model.hf_export import export_hf
    from .tokenizer import Tokenizer

    check_writable_dir(Path(args.out), "--out")
    model = MiniMindLM.from_pretrained(args.model)
    tokenizer = Tokenizer.load(args.model)
    out = export_hf(model, args.out, tokenizer_dir=args.model, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    print(f"wrote Hugging Face Llama model to {out}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .serve import serve

    serve(args.model, host=args.host, port=args.port, api_key=os.environ.get(args.api_key_env) or None,
          max_batch=args.max_batch, device=args.device)
    return 0


def _eval_pref(args: argparse.Namespace) -> int:
    import json

    from .algorithms.dpo import implicit_reward_accuracy, pair_sequence_logprobs
    from .data.pairs import load_pairs, tokenize_pairs
    from .eval import reward_model_accuracy
    from .model import load_policy, load_scalar_model
    from .model.heads import has_scalar_head
    from .tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args.model)
    pairs = tokenize_pairs(tokenizer, load_pairs(args.data), args.max_len)
    if has_scalar_head(args.model):
        metrics = reward_model_accuracy(load_scalar_model(args.model).eval(), pairs, tokenizer.pad_id)
    else:
        if not args.ref:
            raise ValueError("eval-pref: a policy needs --ref (the reference policy) for its implicit DPO reward")
        ref = pair_sequence_logprobs(load_policy(args.ref).eval(), pairs, tokenizer.pad_id)[:2]
        metrics = implicit_reward_accuracy(load_policy(args.model).eval(), pairs, ref, args.beta, tokenizer.pad_id)
    print(json.dumps({"pairs": len(pairs), **metrics}))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.config or DEFAULT_CONFIG, parse_overrides(args.overrides), only=args.stages)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minirlhf", description="Align small language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage")
        p.add_argument("--config", help=f"YAML config (default {DEFAULT_CONFIG} when present)")
        p.add_argument("--help-config", action="store_true", help="list this stage's options and exit")
        p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
        p.add_argument("overrides", nargs="*", default=[], help="key=value overrides")
    for name, helptext in (("generate", "sample responses to prompts"), ("chat", "chat in the terminal")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True, help="model dir")
        if name == "generate":
            p.add_argument("--prompt", action="append", help="a user message (repeatable; default: stdin lines)")
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--temperature", type=float, default=0.7)
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--top-p", type=float, default=0.95)
        p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("export-hf", help="export a native model to Hugging Face Llama format")
    p.add_argument("--model", required=True, help="native model dir")
    p.add_argument("--out", required=True, help="output dir")
    p = sub.add_parser("serve", help="serve a model with an OpenAI-compatible API (/v1/chat/completions)")
    p.add_argument("--model", required=True, help="model dir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", default="MINIRLHF_API_KEY", help="env var with the bearer key (unset = open)")
    p.add_argument("--max-batch", type=int, default=16, help="concurrent requests batched per generation")
    p.add_argument("--device", default="cpu")
    p = sub.add_parser("eval-pref", help="held-out preference accuracy of a reward model or a DPO policy")
    p.add_argument("--model", required=True, help="reward model dir, or policy dir (then --ref)")
    p.add_argument("--ref", help="reference policy dir, for a policy's implicit reward")
    p.add_argument("--data", required=True, help="preference JSONL")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--max-len", type=int, default=256)
    p = sub.add_parser("demo", help="run every stage on the embedded task and print the results table")
    p.add_argument("--config", help=f"YAML config (default {DEFAULT_CONFIG})")
    p.add_argument("--stages", nargs="*", help="run only these stages")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides applied to every stage")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(x.startswith("-") for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = list(getattr(args, "overrides", None) or []) + extra
    install_stop_handlers()
    keep_freed_memory()  # the command owns this process: each step reuses what the last one freed (allocator.py)
    try:
        if args.command in STAGES:
            return _stage_command(args.command, args)
        commands = {"generate": _generate, "chat": _chat, "export-hf": _export_hf, "serve": _serve,
                    "eval-pref": _eval_pref, "demo": _demo}
        return commands[args.command](args)
    except SetupError as e:  # the machine or a service (no CUDA, a full disk, a judge that is down), not the input
        print(f"minirlhf: error: {one_line(e)}", file=sys.stderr)
        return 3
    except (DataError, ConfigError, FileNotFoundError, NonFiniteError, ImportError) as e:
        print(f"minirlhf: error: {one_line(e)}", file=sys.stderr)
        return 2
    except ValueError as e:  # invalid model files, tokenizer mismatches and similar user-fixable problems
        print(f"minirlhf: error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only file system, a file where a directory should be ...
        where = f"{e.filename}: " if e.filename else ""
        print(f"minirlhf: error: {where}{e.strerror or one_line(e)}", file=sys.stderr)
        return 3 if e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EIO) else 2
    except pickle.UnpicklingError as e:  # a weights file torch refused to unpickle (weights_only=True)
        print("minirlhf: error: refusing to load a weights file that holds objects other than tensors (it could run "
              f"code); nothing was unpickled ({blocked_pickle_reason(e)})", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"minirlhf: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt as e:
        print(f"minirlhf: {e.args[0] if e.args else 'interrupted'}", file=sys.stderr)
        return Interrupted.status_of(e)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    status = main()
    if distributed.launched_by_torchrun():
        # A torchrun worker leaves without the interpreter's C++ teardown: there, threads of the gloo process group
        # that are still joinable can abort a worker whose work is done and saved ("terminate called without an
        # active exception", exit -6, which torchrun reports as the run failing). Files are closed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
