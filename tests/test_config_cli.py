"""Config building and the CLI's error contract: every user-fixable problem is one line
`minirlhf: error: ...` on stderr and exit status 2."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from minirlhf.algorithms.sft import LMConfig
from minirlhf.cli import main
from minirlhf.config import ConfigError, build_config, describe, load_stage_config, parse_overrides
from minirlhf.model.lora import LoRAConfig
from minirlhf.stages import STAGES
from minirlhf.train.loop import TrainConfig


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("minirlhf: error: ")
    assert captured.out == ""
    return lines[0]


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as info:
        build_config(TrainConfig, {"steps": 3, "learning_rate": 1e-3}, where="sft")
    message = str(info.value)
    assert "sft: unknown key(s) ['learning_rate']" in message
    for key in ("lr", "steps", "batch_size", "out_dir"):
        assert f"'{key}'" in message


@pytest.mark.parametrize("values,match", [
    ({"steps": "ten"}, r"sft\.steps: expected int, got 'ten'"),
    ({"steps": True}, r"sft\.steps: expected int, got True"),  # a bool is not an int here
    ({"resume": "yes"}, r"sft\.resume: expected bool"),
    ({"lr": [1]}, r"sft\.lr: expected float"),
    ({"mode": "rlhf"}, r"sft\.mode: 'rlhf' is not one of \['pretrain', 'sft'\]"),
])
def test_wrong_types_are_rejected(values, match):
    with pytest.raises(ConfigError, match=match):
        build_config(LMConfig, values, where="sft")


@pytest.mark.parametrize("values,match", [
    ({"steps": 0}, r"sft\.steps: 0 is below the minimum 1"),
    ({"max_len": 4}, r"sft\.max_len: 4 is below the minimum 8"),
    ({"lr": 0.0}, r"sft\.lr: 0\.0 must be greater than 0"),
    ({"weight_decay": -0.1}, r"sft\.weight_decay: -0\.1 is below the minimum 0"),
])
def test_out_of_range_values_are_rejected(values, match):
    with pytest.raises(ConfigError, match=match):
        build_config(LMConfig, values, where="sft")


def test_valid_values_are_converted_and_defaults_kept():
    cfg = build_config(LMConfig, {"lr": 1, "steps": 7, "precision": "bf16", "mode": "pretrain"})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # an int is accepted where a float is expected
    assert (cfg.steps, cfg.precision, cfg.mode, cfg.batch_size) == (7, "bf16", "pretrain", 16)


def test_overrides_are_parsed_as_yaml():
    parsed = parse_overrides(["lr=0.0001", "progress=true", "steps=20", "out_dir=runs/x", "data=", "resume=false"])
    assert parsed == {"lr": 0.0001, "progress": True, "steps": 20, "out_dir": "runs/x", "data": "", "resume": False}
    assert isinstance(parsed["lr"], float) and isinstance(parsed["steps"], int)
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides(["lr"])


def test_scientific_notation_override_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sft:\n  lr: 5e-4\n")  # the same in a config file
    assert load_stage_config(TrainConfig, path, "sft", {}).lr == 5e-4
    cfg = load_stage_config(TrainConfig, None, "sft", parse_overrides(["lr=1e-4", "precision=fp32"]))
    assert cfg.lr == 1e-4 and cfg.precision == "fp32"


def test_load_stage_config_reads_a_section_and_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sft:\n  steps: 5\n  lr: 2.0e-3\n  batch_size: 4\nother:\n  steps: 99\n")
    cfg = load_stage_config(TrainConfig, path, "sft", {"steps": 8})
    assert (cfg.steps, cfg.lr, cfg.batch_size) == (8, 2e-3, 4)
    assert load_stage_config(TrainConfig, path, "missing_section", {}).steps == 100  # defaults
    with pytest.raises(ConfigError, match="config file not found"):
        load_stage_config(TrainConfig, tmp_path / "nope.yaml", "sft", {})
    path.write_text("sft: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_stage_config(TrainConfig, path, "sft", {})
    path.write_text("sft: 3\n")
    with pytest.raises(ConfigError, match="section 'sft' must be a mapping"):
        load_stage_config(TrainConfig, path, "sft", {})


def test_kl_coef_is_the_kl_weight_everywhere_and_accepts_trls_beta():
    """One name per idea: the KL weight of PPO / GRPO / SPO / RLAIF is `kl_coef` (TRL's GRPO spells it `beta`,
    accepted as an alias); `beta` stays DPO's and online DPO's temperature, a field of its own there."""
    from minirlhf.algorithms.grpo import GRPOConfig
    from minirlhf.algorithms.online_dpo import OnlineDPOConfig
    from minirlhf.algorithms.ppo import PPOConfig
    from minirlhf.algorithms.spo import SPOConfig

    for cls in (GRPOConfig, PPOConfig, SPOConfig):
        assert build_config(cls, {"kl_coef": 0.2}).kl_coef == 0.2
        assert build_config(cls, {"beta": 0.3}).kl_coef == 0.3
        assert not hasattr(build_config(cls, {}), "beta")
        with pytest.raises(ConfigError, match="set kl_coef or its alias beta, not both"):
            build_config(cls, {"beta": 0.3, "kl_coef": 0.2}, where="grpo")
        with pytest.raises(ConfigError, match="kl_coef: -1.0 is below the minimum 0"):
            build_config(cls, {"beta": -1.0}, where="grpo")
    online_dpo = build_config(OnlineDPOConfig, {"beta": 0.5})
    assert online_dpo.beta == 0.5 and not hasattr(online_dpo, "kl_coef")
    assert "kl_coef = 0.04" in describe(GRPOConfig) and "(alias: beta)" in describe(GRPOConfig)


def test_describe_lists_every_field_with_its_help():
    text = describe(TrainConfig)
    assert "  lr = 0.001  # peak learning rate" in text
    assert "  lora.r = 0  # LoRA rank (0 = off: train all weights)" in text  # nested sections, one line per option
    assert len(text.splitlines()) == len(TrainConfig.__dataclass_fields__) - 1 + len(LoRAConfig.__dataclass_fields__)


@pytest.fixture
def sft_yaml(tmp_path, monkeypatch):
    """An sft section that would train for real if nothing were wrong; cwd has no configs/rlhf.yaml."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(f"sft:\n  mode: sft\n  out_dir: {tmp_path / 'out'}\n  steps: 1\n  device: cpu\n"
                    "  progress: false\n")
    return path


def test_cli_unknown_key_override(sft_yaml, capsys):
    assert main(["sft", "--config", str(sft_yaml), "bogus=1"]) == 2
    line = one_error_line(capsys)
    assert "unknown key(s) ['bogus']" in line and "valid keys" in line and "'lr'" in line


def test_cli_bad_value_override(sft_yaml, capsys):
    assert main(["sft", "--config", str(sft_yaml), "steps=0"]) == 2
    assert "sft.steps: 0 is below the minimum 1" in one_error_line(capsys)


def test_cli_missing_config_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nope.yaml"
    assert main(["sft", "--config", str(missing)]) == 2
    assert f"{missing}: config file not found" in one_error_line(capsys)


def test_cli_missing_data_file(sft_yaml, tokenizer, tmp_path, capsys):
    tokenizer.save(tmp_path / "tok")
    data = tmp_path / "missing.jsonl"
    assert main(["sft", "--config", str(sft_yaml), f"tokenizer={tmp_path / 'tok'}", f"data={data}"]) == 2
    assert f"{data}: file not found" in one_error_line(capsys)
    assert not (tmp_path / "out" / "final").exists()


def test_cli_missing_tokenizer_and_empty_data(sft_yaml, tmp_path, capsys):
    assert main(["sft", "--config", str(sft_yaml), f"tokenizer={tmp_path / 'none'}", "data=x.jsonl"]) == 2
    assert "no tokenizer.json" in one_error_line(capsys)
    assert main(["sft", "--config", str(sft_yaml)]) == 2  # data not set
    assert "set `data`" in one_error_line(capsys)


def test_cli_help_config_prints_options(capsys):
    assert main(["sft", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sft options")
    for line in ("  lr = 0.001  # peak learning rate", "  steps = 100  # optimizer steps", "  mode = 'sft'"):
        assert line in out
    assert out.count("\n  ") == len(LMConfig.__dataclass_fields__) - 1 + len(LoRAConfig.__dataclass_fields__)


def test_cli_stage_runs_with_overrides(sft_yaml, task_data, start_model_dir, tmp_path, capsys):
    assert main(["sft", "--config", str(sft_yaml), f"model={start_model_dir}", f"data={task_data['sft']}",
                 "batch_size=2", "max_len=64", "lr=0.001"]) == 0
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()
    assert capsys.readouterr().out.strip() == ""  # no eval data: empty result line


def _capture_stage(monkeypatch) -> list:
    """Replace the sft stage's run function with one that records the config it receives."""
    seen: list = []
    monkeypatch.setitem(STAGES, "sft", (LMConfig, lambda cfg: seen.append(cfg) or {"ok": 1}))
    return seen


def test_cli_overrides_reach_the_stage_config(sft_yaml, monkeypatch, capsys):
    seen = _capture_stage(monkeypatch)
    assert main(["sft", "--config", str(sft_yaml), "lr=0.002", "precision=bf16", "batch_size=3"]) == 0
    assert (seen[0].lr, seen[0].precision, seen[0].batch_size, seen[0].steps) == (0.002, "bf16", 3, 1)
    assert seen[0].resume is False
    assert capsys.readouterr().out.strip() == "ok=1"


def test_cli_resume_after_overrides(sft_yaml, monkeypatch):
    seen = _capture_stage(monkeypatch)
    assert main(["sft", "--config", str(sft_yaml), "steps=2", "--resume"]) == 0
    assert seen[0].resume is True and seen[0].steps == 2


@pytest.mark.parametrize("argv", [["--resume"], ["--resume", "steps=2"]], ids=["alone", "before-overrides"])
def test_cli_resume_flag_alone_or_first(sft_yaml, monkeypatch, argv):
    seen = _capture_stage(monkeypatch)
    assert main(["sft", "--config", str(sft_yaml), *argv]) == 0
    assert seen[0].resume is True


def test_cli_tokenizer_model_vocab_mismatch(sft_yaml, start_model_dir, task_data, tmp_path, capsys):
    from minirlhf.tokenizer import train_tokenizer

    bigger = train_tokenizer(["Tom has 7 apples. He buys 5 more. The answer is 12."] * 20 + ["xyz " * 50], 600)
    bigger.backend.add_tokens([f"<extra_{i}>" for i in range(400)])
    bigger.save(tmp_path / "big_tok")
    assert main(["sft", "--config", str(sft_yaml), f"model={start_model_dir}", f"tokenizer={tmp_path / 'big_tok'}",
                 f"data={task_data['sft']}"]) == 2
    line = one_error_line(capsys)
    assert "tokens but the model's embedding has" in line and str(start_model_dir) in line
    assert not (tmp_path / "out" / "final").exists()


def test_nested_sections_from_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sft:\n  lora:\n    r: 4\n    alpha: 8\n")
    cfg = load_stage_config(TrainConfig, path, "sft", parse_overrides(["lora.alpha=32", "lora.dropout=0.1"]))
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (4, 32.0, 0.1)
    assert cfg.lora.target_modules == LoRAConfig().target_modules
    with pytest.raises(ConfigError, match=r"sft.lora: unknown key\(s\) \['rank'\]"):
        load_stage_config(TrainConfig, None, "sft", parse_overrides(["lora.rank=4"]))
    with pytest.raises(ConfigError, match="sft.lora.r: -1 is below the minimum 0"):
        load_stage_config(TrainConfig, None, "sft", parse_overrides(["lora.r=-1"]))
    with pytest.raises(ConfigError, match="expected a mapping of LoRAConfig options"):
        load_stage_config(TrainConfig, None, "sft", {"lora": 3})


def test_upper_bounds_are_checked():
    from minirlhf.algorithms.dpo import DPOConfig

    with pytest.raises(ConfigError, match="dpo.label_smoothing: 0.5 must be less than 0.5"):
        build_config(DPOConfig, {"label_smoothing": 0.5}, where="dpo")
    assert build_config(DPOConfig, {"label_smoothing": 0.1}, where="dpo").label_smoothing == 0.1


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), ".nan", ".inf"])
def test_every_float_option_of_every_stage_refuses_nan_and_inf(stage, bad):
    """NaN passes every range check (`nan < min` is false): each float option must refuse it by name."""
    cls = STAGES[stage][0]
    hints = typing.get_type_hints(cls)
    floats = [f.name for f in dataclasses.fields(cls) if hints[f.name] is float]
    for name in floats:
        with pytest.raises(ConfigError, match=rf"{stage}\.{name}: .* is not a finite number"):
            build_config(cls, {name: yaml.safe_load(bad) if isinstance(bad, str) else bad}, where=stage)
