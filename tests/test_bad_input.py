"""The bad-input matrix: every fault a user can make with data, config or model files, run through the real
CLI in a subprocess. Each must end with exit status 2, exactly one stderr line `minirlhf: error: ...` (no
traceback) naming the file, line and field where that applies, and no partial output (no final/ model, no
checkpoints). docs/reliability.md lists each case with the message it produces."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minirlhf.cli import main
from minirlhf.model import MiniMindLM, preset

CLI = [sys.executable, "-m", "minirlhf.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list, cwd: Path) -> subprocess.CompletedProcess:
    """Run the CLI's `main` (what `python -m minirlhf.cli` runs) in this process, in `cwd`, capturing its exit
    status, stdout and stderr. In-process saves a Python + torch start-up per case; `test_the_real_entry_point`
    and the crash-safety tests run it as a real process."""
    out, err, previous = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main([str(a) for a in args])
            except SystemExit as e:  # argparse's own errors
                status = e.code
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(args, status, out.getvalue(), err.getvalue())


def test_the_real_entry_point(tmp_path):
    """`python -m minirlhf.cli` in a fresh process: the same one-line error and exit status as in-process."""
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(REPO), ENV.get("PYTHONPATH", "")])}
    proc = subprocess.run([*CLI, "sft", "data=missing.jsonl", f"out_dir={tmp_path / 'out'}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert assert_clean_failure(proc, tmp_path / "out") == run_cli_line(tmp_path)


def run_cli_line(tmp_path: Path) -> str:
    return assert_clean_failure(run_cli(["sft", "data=missing.jsonl", f"out_dir={tmp_path / 'out'}"], tmp_path),
                                tmp_path / "out")


def assert_clean_failure(proc: subprocess.CompletedProcess, out_dir: Path) -> str:
    """Exit 2, one stderr line and nothing else, no model or checkpoint written; returns the line."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("minirlhf: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip() == ""
    assert not (out_dir / "final").exists()
    assert not (out_dir / "checkpoints").exists() or not any((out_dir / "checkpoints").iterdir())
    return lines[0]


def write_lines(path: Path, lines: list[str | dict]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


GOOD_SFT = {"conversations": [{"role": "user", "content": "What is 2 + 3?"},
                              {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."}]}
GOOD_PAIR = {"prompt": "What is 2 + 3?", "chosen": "The answer is 5.", "rejected": "The answer is 6."}
GOOD_PROMPT = {"prompt": "What is 2 + 3?", "answer": "5"}


def conv(*turns: tuple[str, str]) -> dict:
    return {"conversations": [{"role": r, "content": c} for r, c in turns]}


# (case id, stage, the data file's lines (a valid record first, so the fault is on line 2), expected fragments)
DATA_FAULTS = [
    ("not-json", "sft", [GOOD_SFT, '{"conversations": [{"role": "user"'], ["bad.jsonl:2:", "invalid JSON"]),
    ("not-an-object", "sft", [GOOD_SFT, "[1, 2, 3]"], ["bad.jsonl:2:", "expected a JSON object, got a list"]),
    ("missing-field", "sft", [GOOD_SFT, {"text": "hi"}], ["bad.jsonl:2:", "field 'conversations': missing"]),
    ("wrong-type", "sft", [GOOD_SFT, {"conversations": "hello"}],
     ["bad.jsonl:2:", "field 'conversations': expected a list of messages, got a string"]),
    ("empty-string", "sft", [GOOD_SFT, conv(("user", "  "), ("assistant", "5"))],
     ["bad.jsonl:2:", "field 'conversations[0].content': empty string"]),
    ("unknown-role", "sft", [GOOD_SFT, conv(("user", "hi"), ("bot", "5"))],
     ["bad.jsonl:2:", "field 'conversations[1].role': unknown role 'bot'"]),
    ("no-assistant-turn", "sft", [GOOD_SFT, conv(("system", "be nice"), ("user", "hi"))],
     ["bad.jsonl:2:", "field 'conversations': no assistant turn"]),
    ("pretrain-wrong-type", "pretrain", [{"text": "ok"}, {"text": 7}],
     ["bad.jsonl:2:", "field 'text': expected a string, got a number"]),
    ("pref-missing-field", "dpo", [GOOD_PAIR, {"prompt": "q", "chosen": "a"}],
     ["bad.jsonl:2:", "field 'rejected': missing"]),
    ("pref-wrong-type", "dpo", [GOOD_PAIR, {**GOOD_PAIR, "chosen": 5}],
     ["bad.jsonl:2:", "field 'chosen': expected a string or a list of messages, got a number"]),
    ("pref-empty-prompt", "dpo", [GOOD_PAIR, {**GOOD_PAIR, "prompt": ""}],
     ["bad.jsonl:2:", "field 'prompt': empty string"]),
    ("pref-no-assistant-turn", "dpo",
     [GOOD_PAIR, {"chosen": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}],
                  "rejected": [{"role": "user", "content": "q"}, {"role": "user", "content": "b"}]}],
     ["bad.jsonl:2:", "field 'chosen[1].role': the last message must be the assistant response"]),
    # Degenerate pairs are reported and skipped (see test_some_degenerate_pairs_are_skipped_with_a_notice);
    # a file where every pair is degenerate has nothing to train on and is an error.
    ("pref-all-chosen-equals-rejected", "dpo",
     [{**GOOD_PAIR, "rejected": GOOD_PAIR["chosen"]}, {**GOOD_PAIR, "chosen": "x", "rejected": "x"}],
     ["bad.jsonl: all 2 pairs were skipped", "bad.jsonl:1: skipped: chosen equals rejected"]),
    ("prompts-unknown-role", "grpo", [GOOD_PROMPT, {"prompt": [{"role": "human", "content": "q"}]}],
     ["bad.jsonl:2:", "field 'prompt[0].role': unknown role 'human'"]),
    ("prompts-no-user-turn-last", "grpo",
     [GOOD_PROMPT, {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
     ["bad.jsonl:2:", "field 'prompt': the prompt must end with a user turn"]),
    ("prompts-wrong-answer-type", "grpo", [GOOD_PROMPT, {"prompt": "q", "answer": [5]}],
     ["bad.jsonl:2:", "field 'answer': expected a string or a number, got a list"]),
    ("nested-100k-deep", "sft", [GOOD_SFT, "[" * 100_000 + "]" * 100_000], ["bad.jsonl:2:", "nested too deeply"]),
    ("lone-surrogate", "sft", [GOOD_SFT, '{"conversations": [{"role": "user", "content": "\\ud800"}, '
                                         '{"role": "assistant", "content": "5"}]}'],
     ["bad.jsonl:2:", "field 'conversations': holds a lone surrogate"]),
    ("rl-answer-5000-digits", "grpo", [GOOD_PROMPT, {"prompt": "q", "answer": "1" * 5000}],
     ["bad.jsonl:2:", "field 'answer':", "not a number the answer reward can check"]),
    ("rl-answer-not-a-number", "grpo", [GOOD_PROMPT, {"prompt": "q", "answer": "five"}],
     ["bad.jsonl:2:", "field 'answer': 'five' is not a number"]),
]


def stage_yaml(tmp_path: Path, stage: str, model_dir: Path, data: Path | str, **extra) -> Path:
    """A config that would train for a step if nothing were wrong."""
    values = {"out_dir": str(tmp_path / "out"), "steps": 1, "device": "cpu", "progress": False,
              "model": str(model_dir), "data": str(data), "batch_size": 2}
    if stage in ("sft", "pretrain"):
        values.update(mode=stage, max_len=64)
    if stage == "dpo":
        values.update(max_len=64)
    if stage == "grpo":
        values.update(prompts_per_rollout=1, group_size=2, max_new_tokens=4)
    values.update(extra)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({stage: values}))  # JSON is YAML
    return path


@pytest.mark.parametrize("case,stage,lines,expected", DATA_FAULTS, ids=[c[0] for c in DATA_FAULTS])
def test_bad_data_file(case, stage, lines, expected, tmp_path, start_model_dir):
    data = write_lines(tmp_path / "bad.jsonl", lines)
    config = stage_yaml(tmp_path, stage, start_model_dir, data)
    line = assert_clean_failure(run_cli([stage, "--config", config], tmp_path), tmp_path / "out")
    assert str(data) in line or str(data.name) in line
    for fragment in expected:
        assert fragment in line, (fragment, line)


def _non_utf8(path: Path) -> Path:
    path.write_bytes(json.dumps(GOOD_SFT).encode() + b"\n" + b'{"conversations": "caf\xe9"}\n')
    return path


def _empty_file(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _blank_lines(path: Path) -> Path:
    path.write_text("\n   \n\n")
    return path


def _dir_without_jsonl(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("not data")
    return path


def _missing(path: Path) -> Path:
    return path


def _gzip_garbage(path: Path) -> Path:
    path = path.with_name("bad.jsonl.gz")
    path.write_bytes(b"\x1f\x8b\x08\x00not really gzip")
    return path


FILE_FAULTS = [
    ("non-utf8", _non_utf8, ["bad.jsonl:2:", "not valid UTF-8 (byte 22)"]),
    ("empty-file", _empty_file, ["bad.jsonl: no records (the file is empty)"]),
    ("only-blank-lines", _blank_lines, ["bad.jsonl: no records"]),
    ("dir-without-jsonl", _dir_without_jsonl, ["bad.jsonl: directory contains no .jsonl or .jsonl.gz files"]),
    ("missing-file", _missing, ["bad.jsonl: file not found"]),
    ("corrupt-gzip", _gzip_garbage, ["bad.jsonl.gz: cannot read"]),
]


@pytest.mark.parametrize("case,make,expected", FILE_FAULTS, ids=[c[0] for c in FILE_FAULTS])
def test_unreadable_data_file(case, make, expected, tmp_path, start_model_dir):
    data = make(tmp_path / "bad.jsonl")
    config = stage_yaml(tmp_path, "sft", start_model_dir, data)
    line = assert_clean_failure(run_cli(["sft", "--config", config], tmp_path), tmp_path / "out")
    for fragment in expected:
        assert fragment in line, (fragment, line)


CONFIG_FAULTS = [
    ("unknown-key", "sft", {"learning_rate": 0.1}, ["sft: unknown key(s) ['learning_rate']", "valid keys"]),
    ("wrong-type", "sft", {"steps": "ten"}, ["sft.steps: expected int, got 'ten'"]),
    ("wrong-type-bool", "sft", {"resume": "maybe"}, ["sft.resume: expected bool, got 'maybe'"]),
    ("bad-choice", "dpo", {"loss_type": "kto"}, ["dpo.loss_type: 'kto' is not one of"]),
    ("dpo-negative-beta", "dpo", {"beta": -0.1}, ["dpo.beta: -0.1 is below the minimum 0"]),
    ("grpo-group-size-1", "grpo", {"group_size": 1}, ["grpo.group_size: 1 is below the minimum 2"]),
    ("grpo-clip-eps-0", "grpo", {"clip_eps_low": 0.0}, ["grpo.clip_eps_low: 0.0 must be greater than 0"]),
    ("ppo-clip-eps-negative", "ppo", {"clip_eps_high": -0.2},
     ["ppo.clip_eps_high: -0.2 must be greater than 0"]),
    ("ppo-value-clip-0", "ppo", {"value_clip": 0}, ["ppo.value_clip: 0.0 must be greater than 0"]),
    ("lr-0", "sft", {"lr": 0}, ["sft.lr: 0.0 must be greater than 0"]),
    ("reward-clip-0", "grpo", {"reward_clip": 0}, ["grpo.reward_clip: 0.0 must be greater than 0"]),
    ("lr-inf", "sft", {"lr": float("inf")}, ["sft.lr: inf is not a finite number"]),
    ("beta-nan", "dpo", {"beta": float("nan")}, ["dpo.beta: nan is not a finite number"]),
    ("seed-beyond-64-bits", "sft", {"seed": 2**70}, ["sft.seed: ", "does not fit in a signed 64-bit integer"]),
    ("device-banana", "sft", {"device": "banana"}, ["device: 'banana' is not a device"]),
]


@pytest.mark.parametrize("case,stage,override,expected", CONFIG_FAULTS, ids=[c[0] for c in CONFIG_FAULTS])
def test_bad_config_value(case, stage, override, expected, tmp_path, start_model_dir, task_data):
    data = task_data["sft" if stage == "sft" else "pref" if stage == "dpo" else "rl"]
    config = stage_yaml(tmp_path, stage, start_model_dir, data)
    args = [stage, "--config", config, *(f"{k}={json.dumps(v)}" for k, v in override.items())]
    line = assert_clean_failure(run_cli(args, tmp_path), tmp_path / "out")
    for fragment in expected:
        assert fragment in line, (fragment, line)


def test_bad_config_value_in_the_yaml_file(tmp_path, start_model_dir, task_data):
    """The same checks apply to values read from the file, not only to key=value overrides."""
    config = stage_yaml(tmp_path, "dpo", start_model_dir, task_data["pref"], beta=-1)
    line = assert_clean_failure(run_cli(["dpo", "--config", config], tmp_path), tmp_path / "out")
    assert "dpo.beta: -1.0 is below the minimum 0" in line


def test_config_file_that_is_not_yaml(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("sft: [1, 2\n")
    line = assert_clean_failure(run_cli(["sft", "--config", config], tmp_path), tmp_path / "out")
    assert f"{config}: invalid YAML (line 2, column 1: expected ',' or ']'" in line


def test_override_that_is_not_yaml(tmp_path):
    line = assert_clean_failure(run_cli(["sft", "steps=[1"], tmp_path), tmp_path / "out")
    assert "override 'steps=[1': invalid YAML value" in line


# ------------------------------------------------------------------------------------------------------
# Model directories


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _truncated_weights(model: Path) -> str:
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return "cannot load weights"


def _random_weights(model: Path) -> str:
    (model / "model.safetensors").write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator()
                                                            .manual_seed(0), dtype=torch.uint8).numpy().tobytes())
    return "cannot load weights"


def _empty_weights(model: Path) -> str:
    (model / "model.safetensors").write_bytes(b"")
    return "cannot load weights"


def _no_weights(model: Path) -> str:
    (model / "model.safetensors").unlink()
    return "not a minirlhf model dir"


def _bad_config_json(model: Path) -> str:
    (model / "config.json").write_text("{not json")
    return "config.json: not valid JSON"


def _edit_config(**changes):
    def damage(model: Path) -> str:
        cfg = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**cfg, **changes}))
        key, value = next(iter(changes.items()))
        return f"config.json: {key}: " + (f"expected int, got {value!r}" if isinstance(value, str) else
                                          f"must be positive, got {value}")
    return damage


def _corrupt_tokenizer(model: Path) -> str:
    (model / "tokenizer.json").write_text('{"model": {"vocab": ')
    return "tokenizer.json: not a readable tokenizer"


def _corrupt_tokenizer_config(model: Path) -> str:
    (model / "tokenizer_config.json").write_text('{"eos_token": ')
    return "tokenizer_config.json: not valid JSON"


def _wrong_shape_weights(model: Path) -> str:
    """Weights of a different architecture (a smaller model) under the right config."""
    torch.manual_seed(0)
    cfg = json.loads((model / "config.json").read_text())
    other = MiniMindLM(preset("tiny", vocab_size=cfg["vocab_size"], num_layers=1, hidden_size=32, num_heads=2,
                              num_kv_heads=1, intermediate_size=64))
    from safetensors.torch import save_model

    save_model(other, str(model / "model.safetensors"))
    return "cannot load weights"


MODEL_FAULTS = [
    ("truncated-safetensors", _truncated_weights),
    ("random-bytes-safetensors", _random_weights),
    ("empty-safetensors", _empty_weights),
    ("no-safetensors", _no_weights),
    ("corrupt-config-json", _bad_config_json),
    ("wrong-architecture-weights", _wrong_shape_weights),
    ("config-num-heads-0", _edit_config(num_heads=0)),
    ("config-negative-vocab", _edit_config(vocab_size=-5)),
    ("config-max-seq-len-string", _edit_config(max_seq_len="256")),
    ("corrupt-tokenizer-json", _corrupt_tokenizer),
    ("corrupt-tokenizer-config-json", _corrupt_tokenizer_config),
]


@pytest.mark.parametrize("case,damage", MODEL_FAULTS, ids=[c[0] for c in MODEL_FAULTS])
def test_damaged_model_dir(case, damage, tmp_path, start_model_dir, task_data):
    model = _copy_model(start_model_dir, tmp_path / "model")
    expected = damage(model)
    config = stage_yaml(tmp_path, "sft", model, task_data["sft"])
    line = assert_clean_failure(run_cli(["sft", "--config", config], tmp_path), tmp_path / "out")
    assert str(model) in line and expected in line, line
    if case == "wrong-architecture-weights":  # torch's multi-line list of mismatches, joined on one line
        assert "size mismatch for embed_tokens.weight" in line and len(line) <= 520


def test_missing_model_dir(tmp_path, task_data):
    missing = tmp_path / "no_such_model"
    config = stage_yaml(tmp_path, "sft", missing, task_data["sft"])
    line = assert_clean_failure(run_cli(["sft", "--config", config], tmp_path), tmp_path / "out")
    assert f"{missing}: no tokenizer.json" in line, line  # the tokenizer is read from the model dir first


def test_model_dir_missing_but_tokenizer_given(tmp_path, task_data, start_model_dir):
    missing = tmp_path / "no_such_model"
    config = stage_yaml(tmp_path, "sft", missing, task_data["sft"])
    proc = run_cli(["sft", "--config", config, f"tokenizer={start_model_dir}"], tmp_path)
    line = assert_clean_failure(proc, tmp_path / "out")
    assert f"{missing}: model directory not found" in line


def test_tokenizer_model_vocab_mismatch(tmp_path, task_data, start_model_dir):
    """A model whose embedding is smaller than the tokenizer's vocabulary would index out of range."""
    model = _copy_model(start_model_dir, tmp_path / "model")
    cfg = json.loads((model / "config.json").read_text())
    torch.manual_seed(0)
    small = MiniMindLM(preset("tiny", **{**cfg, "vocab_size": cfg["vocab_size"] - 40}))
    small.save_pretrained(model)
    for stage, data in (("sft", task_data["sft"]), ("dpo", task_data["pref"]), ("grpo", task_data["rl"])):
        config = stage_yaml(tmp_path, stage, model, data)
        line = assert_clean_failure(run_cli([stage, "--config", config], tmp_path), tmp_path / "out")
        assert str(model) in line and "tokens but the model's embedding has" in line, (stage, line)


# ------------------------------------------------------------------------------------------------------
# Sequences longer than the context window: truncated with a notice, or an error when nothing is left


def test_overlong_conversation_is_truncated_with_a_notice(tmp_path, start_model_dir):
    long = conv(("user", "What is 2 + 3? " * 60), ("assistant", "The answer is 5."))
    data = write_lines(tmp_path / "data.jsonl", [GOOD_SFT, GOOD_SFT, long])
    config = stage_yaml(tmp_path, "sft", start_model_dir, data, max_len=32)
    proc = run_cli(["sft", "--config", config], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"sft: truncated \d+ conversations to max_len=32; dropped 1 left with no assistant tokens",
                     proc.stderr), proc.stderr
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


def test_only_overlong_conversations_is_an_error(tmp_path, start_model_dir):
    """Every conversation's prompt fills max_len, so truncation leaves nothing to learn: one line, exit 2."""
    long = conv(("user", "What is 2 + 3? " * 60), ("assistant", "The answer is 5."))
    data = write_lines(tmp_path / "data.jsonl", [long, long])
    config = stage_yaml(tmp_path, "sft", start_model_dir, data, max_len=32)
    proc = run_cli(["sft", "--config", config], tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0] == (f"minirlhf: error: {data}: all 2 conversations were dropped: none has an assistant token "
                        "within max_len=32; raise max_len")
    assert not (tmp_path / "out" / "final").exists() and not (tmp_path / "out" / "checkpoints").exists()


def test_max_len_beyond_the_model_context_window(tmp_path, start_model_dir, task_data):
    """max_len larger than the model's max_seq_len would crash mid-run; it is refused up front."""
    window = json.loads((start_model_dir / "config.json").read_text())["max_seq_len"]
    config = stage_yaml(tmp_path, "sft", start_model_dir, task_data["sft"], max_len=window + 1)
    line = assert_clean_failure(run_cli(["sft", "--config", config], tmp_path), tmp_path / "out")
    assert f"sft.max_len: {window + 1} tokens exceed the context window of {start_model_dir}" in line, line
    assert f"(max_seq_len={window})" in line
    config = stage_yaml(tmp_path, "grpo", start_model_dir, task_data["rl"], max_prompt_len=window, max_new_tokens=8)
    line = assert_clean_failure(run_cli(["grpo", "--config", config], tmp_path), tmp_path / "out")
    assert f"grpo.max_prompt_len + max_new_tokens: {window + 8} tokens exceed the context window" in line, line


def test_some_degenerate_pairs_are_skipped_with_a_notice(tmp_path, start_model_dir):
    """Choice: pairs with chosen == rejected carry no signal; they are reported and skipped, not fatal."""
    data = write_lines(tmp_path / "pairs.jsonl", [GOOD_PAIR, {**GOOD_PAIR, "rejected": GOOD_PAIR["chosen"]},
                                                  GOOD_PAIR])
    config = stage_yaml(tmp_path, "dpo", start_model_dir, data)
    proc = run_cli(["dpo", "--config", config], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"{data}: skipped 1 pairs, e.g. {data}:2: skipped: chosen equals rejected" in proc.stderr


def test_device_cuda_without_cuda_is_an_environment_error(tmp_path, start_model_dir, task_data):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    config = stage_yaml(tmp_path, "sft", start_model_dir, task_data["sft"], device="cuda", max_len=256)
    proc = run_cli(["sft", "--config", config], tmp_path)
    assert proc.returncode == 3 and proc.stderr.count("\n") == 1, proc.stderr
    assert "device=cuda: this PyTorch build has no CUDA" in proc.stderr or "no CUDA GPU is visible" in proc.stderr


@pytest.mark.parametrize("flags, expected", [
    (["--max-new-tokens", "-3"], "max_new_tokens must be at least 1, got -3"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
])
def test_generate_refuses_impossible_sampling_flags(flags, expected, tmp_path, start_model_dir):
    line = assert_clean_failure(run_cli(["generate", "--model", start_model_dir, "--prompt", "hi", *flags], tmp_path),
                                tmp_path / "out")
    assert expected in line, line


def test_out_dir_that_is_a_file(tmp_path, start_model_dir, task_data):
    (tmp_path / "taken").write_text("not a directory")
    config = stage_yaml(tmp_path, "sft", start_model_dir, task_data["sft"], out_dir=str(tmp_path / "taken"))
    line = assert_clean_failure(run_cli(["sft", "--config", config], tmp_path), tmp_path / "out")
    assert f"out_dir {tmp_path / 'taken'} is a file, not a directory" in line, line


def test_export_hf_onto_an_existing_file(tmp_path, start_model_dir):
    (tmp_path / "taken").write_text("not a directory")
    line = assert_clean_failure(run_cli(["export-hf", "--model", start_model_dir, "--out", tmp_path / "taken"],
                                        tmp_path), tmp_path / "out")
    assert "--out" in line and "is a file, not a directory" in line, line


def test_trainer_state_missing_keys(tmp_path, start_model_dir, task_data):
    config = stage_yaml(tmp_path, "sft", start_model_dir, task_data["sft"], steps=2, save_every=1, max_len=256)
    assert run_cli(["sft", "--config", config], tmp_path).returncode == 0
    latest = tmp_path / "out" / "checkpoints" / "step_000002"
    state = torch.load(latest / "trainer_state.pt", weights_only=True)
    del state["optimizer"]
    torch.save(state, latest / "trainer_state.pt")
    shutil.rmtree(tmp_path / "out" / "final")
    proc = run_cli(["sft", "--config", config, "resume=true"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "trainer_state.pt: damaged trainer state, missing ['optimizer']" in proc.stderr


def test_yaml_alias_bomb_as_a_value_fails_fast(tmp_path):
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\nsft:\n  lr: *i\n")
    proc = run_cli(["sft", "--config", tmp_path / "bomb.yaml"], tmp_path)
    line = assert_clean_failure(proc, tmp_path / "out")
    assert "sft.lr: expected float, got [[[...]" in line and len(line) < 400, line
