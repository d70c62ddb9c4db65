"""PNG curves from metrics.jsonl (matplotlib optional: without it, no plot and no error)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics_path: str | Path, out_path: str | Path, keys: list[str] | None = None) -> Path | None:
    """One panel per metric (loss, reward, kl, eval/...) against step; returns the PNG path or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and (keys is None or k in keys):
                series.setdefault(k, []).append((row["step"], v))
    wanted = [k for k in series if keys is not None or k in ("loss",) or k.startswith(("eval/", "reward", "kl"))]
    if not wanted:
        return None
    fig, axes = plt.subplots(1, len(wanted), figsize=(3.2 * len(wanted), 2.6), squeeze=False)
    for ax, key in zip(axes[0], wanted):
        steps, values = zip(*series[key])
        ax.plot(steps, values, marker="." if len(steps) < 20 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return Path(out_path)
