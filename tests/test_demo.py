"""The demo driver: its table, the continued-SFT control lookup, and overrides it cannot apply."""

from __future__ import annotations

import json

import pytest

from minirlhf.config import ConfigError
from minirlhf.demo import control_at, format_table, run_demo, training_seconds


def test_an_override_no_stage_accepts_is_an_error_not_silently_dropped(tmp_path):
    config = tmp_path / "demo.yaml"
    config.write_text(json.dumps({"data": {"out_dir": str(tmp_path / "data")}, "sft": {"mode": "sft"}}))
    with pytest.raises(ConfigError, match=r"override\(s\) \['lerning_rate'\] match no option"):
        run_demo(str(config), {"lerning_rate": 0.1})


def test_control_accuracy_is_read_at_the_same_training_time(tmp_path):
    control = tmp_path / "control"
    control.mkdir()
    rows = [{"step": 10, "loss": 1.0, "elapsed_s": 20.0}, {"step": 10, "eval/accuracy": 0.1, "eval/accuracy_se": 0.01},
            {"step": 20, "loss": 0.9, "elapsed_s": 40.0}, {"step": 20, "eval/accuracy": 0.2, "eval/accuracy_se": 0.02}]
    (control / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert control_at(control, 30.0)["control_accuracy"] == 0.1  # the last evaluation made within 30 s
    assert control_at(control, 45.0)["control_accuracy"] == 0.2
    assert control_at(control, 5.0)["control_accuracy"] == 0.1  # none yet: the first one
    assert training_seconds(control) == 40.0


def test_table_shows_errors_styles_and_the_control():
    row = {"stage": "grpo", "minutes": 1.5, "accuracy": 0.3, "accuracy_se": 0.02, "sampled_accuracy": 0.2,
           "sampled_se": 0.02, "style/working": 0.5, "style/slip": 0.3, "style/guess": 0.2, "style/ramble": 0.0,
           "reward": 0.4, "kl": 0.05, "control_accuracy": 0.1, "control_se": 0.01}
    line = format_table([row]).splitlines()[-1]
    assert line == ("| grpo | 0.300 ± 0.020 | 0.200 ± 0.020 | 50/30/20/0 | - | - | 0.400 | 0.050 | 1.50 | "
                    "0.100 ± 0.010 |")
