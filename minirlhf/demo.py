"""`minirlhf demo`: every stage on the embedded task, then a results table and PNG plots.

The stages and their settings are the sections of configs/rlhf.yaml, run in pipeline order; each stage
reads the previous stage's `final/` model. The table has one row per training stage: held-out greedy and
sampled accuracy with their standard errors, the rubric styles of the greedy responses, the stage's own
held-out metric (preference accuracy, judge agreement), mean reward and KL where the method has them,
wall-clock minutes, and the control: the `sft-control` stage continues SFT from the same start, and each
method's row shows the control's held-out accuracy after the same number of training minutes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, load_stage_config
from .data.task import STYLES
from .stages import STAGES
from .train.plots import plot_metrics, plot_summary

CONTROL = "sft-control"
KEYS = ("accuracy", "accuracy_se", "sampled_accuracy", "sampled_se", "pref_accuracy", "agreement", "agreement_se",
        "reward", "kl", *(f"style/{s}" for s in STYLES))


def _pm(row: dict[str, Any], key: str, se: str) -> str:
    if not isinstance(row.get(key), float):
        return "-"
    return f"{row[key]:.3f} ± {row[se]:.3f}" if isinstance(row.get(se), float) else f"{row[key]:.3f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["stage", "greedy acc. ± s.e.", "sampled acc. ± s.e.", "styles W/S/G/R %", "pref. acc.",
              "judge agreement", "reward", "KL", "minutes", "continued SFT, same minutes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        styles = "/".join(f"{100 * row[f'style/{s}']:.0f}" for s in STYLES) if "style/working" in row else "-"
        cells = [row["stage"], _pm(row, "accuracy", "accuracy_se"), _pm(row, "sampled_accuracy", "sampled_se"),
                 styles, _pm(row, "pref_accuracy", ""), _pm(row, "agreement", "agreement_se"),
                 _pm(row, "reward", ""), _pm(row, "kl", ""), f"{row['minutes']:.2f}",
                 _pm(row, "control_accuracy", "control_se")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _metrics_rows(out_dir: Path) -> list[dict[str, Any]]:
    path = out_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def training_seconds(out_dir: Path) -> float:
    """Seconds the stage's training loop ran (the last `elapsed_s` it logged)."""
    return max((r["elapsed_s"] for r in _metrics_rows(out_dir) if "elapsed_s" in r), default=0.0)


def control_at(control_dir: Path, seconds: float) -> dict[str, float]:
    """The control's last held-out evaluation made within `seconds` of training (its first if none was)."""
    rows = _metrics_rows(control_dir)
    elapsed: dict[int, float] = {r["step"]: r["elapsed_s"] for r in rows if "elapsed_s" in r}
    evals = [(elapsed.get(r["step"], 0.0), r) for r in rows if "eval/accuracy" in r]
    if not evals:
        return {}
    within = [e for e in evals if e[0] <= seconds] or evals[:1]
    row = within[-1][1]
    return {"control_accuracy": row["eval/accuracy"], "control_se": row.get("eval/accuracy_se", 0.0),
            "control_seconds": within[-1][0]}


def run_demo(config_path: str, overrides: dict[str, Any], only: list[str] | None = None) -> list[dict[str, Any]]:
    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    sections = yaml.safe_load(path.read_text()) or {}
    stages = [s for s in sections if s in STAGES and (not only or s in only)]
    unknown = [s for s in (only or []) if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages: {list(STAGES)}")
    unused = [k for k in overrides if not any(hasattr(STAGES[s][0], k.split(".")[0]) for s in stages)]
    if unused:
        raise ConfigError(f"override(s) {unused} match no option of the stages {stages}; "
                          "see `minirlhf <stage> --help-config`")
    rows, t_start, out_dirs = [], time.time(), {}
    for stage in stages:
        cls, run = STAGES[stage]
        cfg = load_stage_config(cls, path, stage, {k: v for k, v in overrides.items()
                                                   if hasattr(cls, k.split(".")[0])})
        print(f"\n=== {stage} ===", flush=True)
        t0 = time.time()
        result = run(cfg)
        minutes = (time.time() - t0) / 60
        print(f"{stage}: {json.dumps(result)} ({minutes:.2f} min)", flush=True)
        out_dir = out_dirs[stage] = Path(getattr(cfg, "out_dir", ""))
        if (out_dir / "metrics.jsonl").is_file():
            plot_metrics(out_dir / "metrics.jsonl", out_dir / "curves.png", title=stage)
            rows.append({"stage": stage, "minutes": minutes, **{k: result[k] for k in KEYS if k in result}})
    if CONTROL in out_dirs:
        for row in rows:
            if row["stage"] not in ("pretrain", "sft", "rm", "judge", CONTROL) and "accuracy" in row:
                row.update(control_at(out_dirs[CONTROL], training_seconds(out_dirs[row["stage"]])))
    table = format_table(rows)
    print(f"\nresults (total {(time.time() - t_start) / 60:.1f} min)\n{table}")
    results_dir = Path(sections.get("data", {}).get("out_dir", "runs/demo")).parent
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "results.md").write_text(table + "\n")
    (results_dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot_summary(rows, results_dir / "summary.png", title="held-out accuracy by stage (error bars: 95%)")
    return rows
