"""Plots: which panels a metrics file gets, and that the PNGs are real, readable-sized images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minirlhf.train.plots import panels, plot_metrics, plot_summary, read_metrics


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels from the PNG header (IHDR: big-endian uint32s at bytes 16 and 20)."""
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def assert_readable_png(path: Path) -> None:
    width, height = png_size(path)
    assert width <= 2000 and height >= 300, (width, height)


def grpo_rows() -> list[dict]:
    """Training rows every step (clip_ratio constant), held-out rows every 5 steps, one skipped-step row."""
    rows: list[dict] = []
    for step in range(1, 21):
        rows.append({"step": step, "loss": 1.0 / step, "reward": 0.3 + 0.01 * step + 0.05 * (-1) ** step,
                     "kl": 0.001 * step, "entropy": 1.5 - 0.01 * step, "completion_len": 30.0 - step / 2,
                     "clip_ratio": 0.0, "lr": 1e-4, "grad_norm": 0.8, "elapsed_s": 1.5 * step})
        if step % 5 == 0:
            share = 0.3 + 0.02 * step
            rows.append({"step": step, "eval/accuracy": 0.3 + 0.01 * step, "eval/accuracy_se": 0.02,
                         "eval/sampled_accuracy": 0.25 + 0.01 * step, "eval/sampled_se": 0.02,
                         "eval/style/working": share, "eval/style/guess": 0.9 - share, "eval/style/slip": 0.05,
                         "eval/style/ramble": 0.05, "eval/agreement": 0.9, "eval/agreement_se": 0.01})
    rows.append({"step": 7, "skipped_nonfinite": 1.0, "bad_steps": 1.0})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_panels_skip_constant_and_absent_series():
    assert panels(grpo_rows()) == ["loss", "reward", "kl", "entropy", "completion_len", "eval/accuracy",
                                   "eval/style"]  # constant clip_ratio and eval/agreement skipped
    dpo = [{"step": s, "loss": 0.7 - 0.01 * s, "rewards/accuracy": 0.5 + 0.02 * s, "lr": 1e-4} for s in range(10)]
    dpo.append({"step": 10, "eval/pref_accuracy": 0.8})  # a single held-out point counts as constant
    assert panels(dpo) == ["loss", "rewards/accuracy"]
    dpo.append({"step": 20, "eval/pref_accuracy": 0.9})
    assert panels(dpo) == ["loss", "rewards/accuracy", "eval/pref_accuracy"]
    assert panels([{"step": 1, "lr": 1e-4}, {"step": 2, "lr": 5e-5}]) == []


def test_plot_metrics_writes_a_grid_png(tmp_path):
    pytest.importorskip("matplotlib")
    metrics = write_jsonl(tmp_path / "metrics.jsonl", grpo_rows())
    with metrics.open("a") as f:
        f.write('{"step": 21, "loss"')  # a line cut short by an interrupted write is ignored
    assert len(read_metrics(metrics)) == len(grpo_rows())
    out = plot_metrics(metrics, tmp_path / "curves.png", title="grpo")
    assert out == tmp_path / "curves.png"
    assert_readable_png(out)
    assert png_size(out)[1] > png_size(out)[0] / 2  # 7 panels wrap onto 3 rows, not one strip


def test_plot_metrics_single_panel_and_nothing_to_plot(tmp_path):
    pytest.importorskip("matplotlib")
    one = write_jsonl(tmp_path / "one.jsonl", [{"step": s, "loss": 1.0 / (s + 1)} for s in range(5)])
    assert_readable_png(plot_metrics(one, tmp_path / "one.png"))
    flat = write_jsonl(tmp_path / "flat.jsonl", [{"step": s, "loss": 1.0} for s in range(5)])
    assert plot_metrics(flat, tmp_path / "flat.png") is None
    assert not (tmp_path / "flat.png").exists()


def test_plot_summary(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"stage": "sft", "accuracy": 0.41, "accuracy_se": 0.022, "sampled_accuracy": 0.3, "sampled_se": 0.02},
            {"stage": "rm", "minutes": 1.0},
            {"stage": "grpo", "accuracy": 0.55, "accuracy_se": 0.022, "sampled_accuracy": 0.47, "sampled_se": 0.02,
             "control_accuracy": 0.43, "control_se": 0.022},
            {"stage": "online_dpo", "accuracy": 0.49}]
    out = plot_summary(rows, tmp_path / "summary.png", title="held-out accuracy")
    assert out == tmp_path / "summary.png"
    assert_readable_png(out)
    assert plot_summary([{"stage": "rm"}], tmp_path / "none.png") is None
