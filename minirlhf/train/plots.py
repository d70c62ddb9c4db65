"""Readable PNG figures of a run: training curves from metrics.jsonl, and a comparison of stages.

`plot_metrics` draws one panel per quantity that a run logged and that changed (loss, reward, KL, ...,
held-out accuracy with its standard-error band, response styles); `plot_summary` draws held-out accuracy
per stage as grouped bars. matplotlib is optional: without it both return None and raise nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

Row = dict[str, Any]

# Training-side quantities, in panel order, with their panel titles.
TRAIN_PANELS = {
    "loss": "loss",
    "reward": "reward (batch mean)",
    "kl": "KL to reference",
    "entropy": "entropy (nats/token)",
    "completion_len": "completion length (tokens)",
    "clip_ratio": "clip ratio",
}
BATCH_ACCURACY_KEYS = ("rewards/accuracy", "accuracy")  # DPO / reward-model batch accuracy
HELD_OUT_ACCURACY = {"eval/accuracy": ("eval/accuracy_se", "greedy"),
                     "eval/sampled_accuracy": ("eval/sampled_se", "sampled (T=1)")}
HELD_OUT_PANELS = {"eval/pref_accuracy": "held-out preference accuracy", "eval/agreement": "held-out judge agreement"}
STYLE_PREFIX = "eval/style/"
PANEL_TITLES = {**TRAIN_PANELS, "rewards/accuracy": "batch preference accuracy", "accuracy": "batch accuracy",
                "eval/accuracy": "held-out accuracy", "eval/style": "held-out response styles", **HELD_OUT_PANELS}
CONSTANT_TOL = 1e-12
FONT = 8


def _number(value: Any) -> float | None:
    """`value` as a finite float, or None for anything else (bools, strings, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _series(rows: list[Row], key: str, se_key: str | None = None) -> tuple[list[float], list[float], list[float]]:
    """(steps, values, standard errors; 0 where absent) of the rows that logged a finite `key`."""
    steps, values, ses = [], [], []
    for row in rows:
        step, value = _number(row.get("step")), _number(row.get(key))
        if step is not None and value is not None:
            steps.append(step)
            values.append(value)
            ses.append(_number(row.get(se_key)) or 0.0)
    return steps, values, ses


def _varies(rows: list[Row], key: str) -> bool:
    """Whether `key` was logged and is not constant (a single point counts as constant)."""
    values = _series(rows, key)[1]
    return bool(values) and max(values) - min(values) >= CONSTANT_TOL


def _style_keys(rows: list[Row]) -> list[str]:
    """The `eval/style/*` keys, in first-seen order."""
    return list(dict.fromkeys(k for row in rows for k in row if k.startswith(STYLE_PREFIX)))


def _batch_accuracy_key(rows: list[Row]) -> str | None:
    """The first training-side batch-accuracy key that varies, if any."""
    return next((k for k in BATCH_ACCURACY_KEYS if _varies(rows, k)), None)


def panels(rows: list[Row]) -> list[str]:
    """Names of the panels `plot_metrics` draws for these metrics rows, in order.

    Possible names: the TRAIN_PANELS keys, "rewards/accuracy" or "accuracy", "eval/accuracy" (greedy and
    sampled), "eval/style", "eval/pref_accuracy", "eval/agreement". Constant or absent series get no panel.
    """
    names = [k for k in TRAIN_PANELS if _varies(rows, k)]
    batch_accuracy = _batch_accuracy_key(rows)
    if batch_accuracy:
        names.append(batch_accuracy)
    if any(_varies(rows, k) for k in HELD_OUT_ACCURACY):
        names.append("eval/accuracy")
    if any(_varies(rows, k) for k in _style_keys(rows)):
        names.append("eval/style")
    names += [k for k in HELD_OUT_PANELS if _varies(rows, k)]
    return names


def read_metrics(metrics_path: str | Path) -> list[Row]:
    """The JSON rows of a metrics.jsonl; a line cut short by an interrupted write is skipped."""
    rows = []
    for line in Path(metrics_path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _ema(values: list[float], span: int) -> list[float]:
    """Exponential moving average with smoothing 2 / (span + 1)."""
    alpha, out = 2.0 / (span + 1), []
    for v in values:
        out.append(v if not out else alpha * v + (1 - alpha) * out[-1])
    return out


def _plot_line(ax: Any, rows: list[Row], key: str, se_key: str | None = None, label: str | None = None) -> None:
    """`key` against step (markers when there are few points), shaded ±1 standard error where `se_key` was logged."""
    steps, values, ses = _series(rows, key, se_key)
    (line,) = ax.plot(steps, values, marker="o" if len(steps) <= 40 else None, markersize=3, linewidth=1.2,
                      label=label)
    if any(ses):
        ax.fill_between(steps, [v - s for v, s in zip(values, ses)], [v + s for v, s in zip(values, ses)],
                        color=line.get_color(), alpha=0.2, linewidth=0)


def _plot_reward(ax: Any, rows: list[Row]) -> None:
    """Per-step batch-mean reward, faint, under its exponential moving average."""
    steps, values, _ = _series(rows, "reward")
    span = max(2, min(50, len(values) // 10))
    ax.plot(steps, values, color="C0", alpha=0.3, linewidth=0.8, label="per step")
    ax.plot(steps, _ema(values, span), color="C0", linewidth=1.8, label=f"EMA (span {span})")
    ax.legend(fontsize=FONT - 1)


def _plot_styles(ax: Any, rows: list[Row]) -> None:
    """Shares of the `eval/style/*` response styles at each evaluation, stacked."""
    keys = _style_keys(rows)
    style_rows = [r for r in rows if _number(r.get("step")) is not None and any(k in r for k in keys)]
    shares = [[_number(r.get(k)) or 0.0 for r in style_rows] for k in keys]
    ax.stackplot([float(r["step"]) for r in style_rows], shares, labels=[k.removeprefix(STYLE_PREFIX) for k in keys],
                 alpha=0.85)
    ax.set_ylabel("share of responses", fontsize=FONT)
    ax.legend(fontsize=FONT - 1, loc="lower left", framealpha=0.8)


def _draw_panel(ax: Any, name: str, rows: list[Row]) -> None:
    """Draw the panel called `name` (see `panels`) on `ax`."""
    if name == "reward":
        _plot_reward(ax, rows)
    elif name in TRAIN_PANELS:
        _plot_line(ax, rows, name)
    elif name == "eval/accuracy":
        for key, (se_key, label) in HELD_OUT_ACCURACY.items():
            if _series(rows, key)[0]:
                _plot_line(ax, rows, key, se_key, label)
        ax.legend(fontsize=FONT - 1, title="band: ±1 s.e.", title_fontsize=FONT - 1)
        ax.set_ylim(0, 1)
    elif name == "eval/style":
        _plot_styles(ax, rows)
        ax.set_ylim(0, 1)
    else:  # batch accuracy, held-out preference accuracy or judge agreement: zoomed in, as they often sit near 1
        _plot_line(ax, rows, name, f"{name}_se")
    ax.set_title(PANEL_TITLES[name], fontsize=FONT + 1)
    ax.set_xlabel("optimizer step", fontsize=FONT)
    ax.tick_params(labelsize=FONT - 1)
    ax.grid(True, color="0.9", linewidth=0.6)
    ax.set_axisbelow(True)


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_metrics(metrics_path: str | Path, out_path: str | Path, title: str = "") -> Path | None:
    """A grid of training and held-out curves from a metrics.jsonl, saved as a PNG at `out_path`.

    One panel per name in `panels(rows)`, at most 3 per row. Returns the PNG path, or None when
    matplotlib is missing or nothing in the file varies.
    """
    plt = _pyplot()
    rows = read_metrics(metrics_path)
    names = panels(rows)
    if plt is None or not names:
        return None
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows + 0.3), squeeze=False,
                             layout="constrained")
    for ax, name in zip(axes.flat, names):
        _draw_panel(ax, name, rows)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=FONT + 3)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return Path(out_path)


def plot_summary(rows: list[Row], out_path: str | Path, title: str = "") -> Path | None:
    """Held-out accuracy per stage as grouped bars (greedy, sampled at T=1), saved as a PNG at `out_path`.

    `rows` have "stage" and optionally "accuracy", "accuracy_se", "sampled_accuracy", "sampled_se",
    "control_accuracy", "control_se" (continued SFT for the same wall-clock). Error bars are 95% intervals
    (1.96 s.e.); a dashed line marks the "sft" stage's greedy accuracy. Returns the PNG path, or None
    when matplotlib is missing or no row has an accuracy.
    """
    plt = _pyplot()
    stages = [r for r in rows if _number(r.get("accuracy")) is not None]
    if plt is None or not stages:
        return None
    control = [(i, r) for i, r in enumerate(stages) if _number(r.get("control_accuracy")) is not None]
    slots = 3 if control else 2  # per stage: greedy bar, sampled bar, control marker
    width = 0.8 / slots
    offset = [(j - (slots - 1) / 2) * width for j in range(slots)]
    fig, ax = plt.subplots(figsize=(max(5.5, 1.1 * len(stages) + 3.5), 3.8), layout="constrained")
    for key, se_key, dx, color, label in [("accuracy", "accuracy_se", offset[0], "C0", "greedy"),
                                          ("sampled_accuracy", "sampled_se", offset[1], "C1", "sampled (T=1)")]:
        xs, values, errors = [], [], []
        for i, row in enumerate(stages):
            if _number(row.get(key)) is not None:
                xs.append(i + dx)
                values.append(row[key])
                errors.append(1.96 * (_number(row.get(se_key)) or 0.0))
        if xs:
            ax.bar(xs, values, width, yerr=errors, color=color, label=label, capsize=3,
                   error_kw={"linewidth": 0.9, "ecolor": "0.25"})
        if key == "accuracy":
            for x, value, error in zip(xs, values, errors):
                ax.text(x, min(value + error + 0.015, 0.96), f"{value:.2f}", ha="center", va="bottom",
                        fontsize=FONT - 1)
    sft = next((r for r in stages if r["stage"] == "sft"), None)
    if sft is not None:
        ax.axhline(sft["accuracy"], color="0.4", linestyle="--", linewidth=1, label="SFT start")
    if control:
        ax.errorbar([i + offset[2] for i, _ in control], [r["control_accuracy"] for _, r in control],
                    yerr=[1.96 * (_number(r.get("control_se")) or 0.0) for _, r in control], fmt="D",
                    color="black", markersize=5, capsize=3, linewidth=0.9, label="continued SFT, same minutes")
    names = [str(r["stage"]) for r in stages]
    crowded = len(names) > 5 or max(map(len, names)) > 8
    ax.set_xticks(range(len(names)), names, rotation=25 if crowded else 0, ha="right" if crowded else "center",
                  fontsize=FONT)
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out accuracy (bars: 95% CI)", fontsize=FONT)
    ax.tick_params(axis="y", labelsize=FONT - 1)
    ax.grid(True, axis="y", color="0.9", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.legend(fontsize=FONT - 1, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    ax.set_title(title, fontsize=FONT + 3)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return Path(out_path)
