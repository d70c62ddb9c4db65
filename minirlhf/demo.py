"""`minirlhf demo`: every stage on the embedded task, then a results table and PNG curves.

The stages and their settings are the sections of configs/rlhf.yaml, run in pipeline order; each stage
reads the previous stage's `final/` model. The table has one row per training stage: the held-out metric
it reports, mean reward and KL where the method has them, and wall-clock minutes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, load_stage_config
from .stages import STAGES
from .train.plots import plot_metrics

COLUMNS = ("accuracy", "pref_accuracy", "agreement", "reward", "kl")


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["stage", "held-out accuracy", "pref. accuracy", "judge agreement", "reward", "KL", "minutes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [row["stage"]] + [
            f"{row[c]:.3f}" if isinstance(row.get(c), float) else "-" for c in COLUMNS
        ] + [f"{row['minutes']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(config_path: str, overrides: dict[str, Any], only: list[str] | None = None) -> list[dict[str, Any]]:
    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    sections = yaml.safe_load(path.read_text()) or {}
    stages = [s for s in sections if s in STAGES and (not only or s in only)]
    unknown = [s for s in (only or []) if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages: {list(STAGES)}")
    rows, t_start = [], time.time()
    for stage in stages:
        cls, run = STAGES[stage]
        cfg = load_stage_config(cls, path, stage, {k: v for k, v in overrides.items() if hasattr(cls, k)})
        print(f"\n=== {stage} ===", flush=True)
        t0 = time.time()
        result = run(cfg)
        minutes = (time.time() - t0) / 60
        print(f"{stage}: {json.dumps(result)} ({minutes:.2f} min)", flush=True)
        out_dir = Path(getattr(cfg, "out_dir", ""))
        if (out_dir / "metrics.jsonl").is_file():
            plot_metrics(out_dir / "metrics.jsonl", out_dir / "curves.png")
            rows.append({"stage": stage, "minutes": minutes, **{k: result[k] for k in COLUMNS if k in result}})
    table = format_table(rows)
    print(f"\nresults (total {(time.time() - t_start) / 60:.1f} min)\n{table}")
    results_dir = Path(sections.get("data", {}).get("out_dir", "runs/demo")).parent
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "results.md").write_text(table + "\n")
    (results_dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows
