"""The demo's report: methods compared at matched safety, as JSON, Markdown, a PNG plot and a terminal table.

A method's trajectory is its sequence of evaluated checkpoints, starting from the base model. Comparing final
models alone would compare different amounts of safety; instead, each trajectory is interpolated (piecewise
linearly, along training order) at common harmful-refusal levels, and utility and over-refusal are compared
there: "at 60% HarmBench refusal, OGPSA keeps 80% utility where plain QLoRA keeps 50%".
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS = ("harmful_refusal_rate", "over_refusal_rate", "utility_accuracy", "benign_nll")
LABELS = {"harmful_refusal_rate": "harmful refused", "over_refusal_rate": "benign refused (over-refusal)",
          "utility_accuracy": "utility", "benign_nll": "benign NLL"}
METHOD_NAMES = {"base": "base model", "ogpsa": "OGPSA (update mode)", "plain": "plain QLoRA",
                "replay": "replay (reference data mixed in)"}
SAFETY_LEVELS = (0.3, 0.5, 0.7, 0.9)


def interpolate_at(points: Sequence[Mapping[str, float]], level: float, metric: str) -> float | None:
    """`metric` where the trajectory first reaches `level` harmful refusal (None if it never does).

    Args:
        points: the trajectory in training order, each with `harmful_refusal_rate` and `metric`.
        level: the harmful-refusal rate to match.
        metric: what to read off there (e.g. `utility_accuracy`).
    """
    for before, after in itertools.pairwise(points):
        low, high = before["harmful_refusal_rate"], after["harmful_refusal_rate"]
        if before.get(metric) is None or after.get(metric) is None:
            continue
        if low <= level <= high and high > low:
            share = (level - low) / (high - low)
            return before[metric] + share * (after[metric] - before[metric])
        if low == level:
            return before[metric]
    last = points[-1] if points else None
    if last is not None and last["harmful_refusal_rate"] == level and last.get(metric) is not None:
        return last[metric]
    return None


def matched_safety(trajectories: Mapping[str, Sequence[Mapping[str, float]]],
                   levels: Sequence[float] = SAFETY_LEVELS) -> list[dict[str, Any]]:
    """For each level every method reaches: utility and over-refusal of each method there."""
    rows = []
    for level in levels:
        row: dict[str, Any] = {"harmful_refusal_rate": level}
        for method, points in trajectories.items():
            utility = interpolate_at(points, level, "utility_accuracy")
            over = interpolate_at(points, level, "over_refusal_rate")
            if utility is None or over is None:
                break
            row[method] = {"utility_accuracy": utility, "over_refusal_rate": over,
                           "benign_nll": interpolate_at(points, level, "benign_nll")}
        else:
            rows.append(row)
    return rows


def build_report(*, model_path: str, settings: Mapping[str, Any], models: Mapping[str, Mapping[str, Any]],
                 trajectories: Mapping[str, Sequence[Mapping[str, Any]]], timings: Mapping[str, float]) -> dict:
    """The report.json document (schema in issue 5 / README)."""
    return {"model_path": model_path, "settings": dict(settings), "models": {k: dict(v) for k, v in models.items()},
            "trajectories": {k: [dict(p) for p in v] for k, v in trajectories.items()},
            "matched_safety": matched_safety(trajectories), "timings_seconds": dict(timings)}


def final_table(report: Mapping[str, Any]) -> str:
    """The final models side by side, as a Markdown table."""
    header = "| model | " + " | ".join(LABELS[m] for m in METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 1)]
    for name, metrics in report["models"].items():
        cells = [_format(metrics.get(metric), metric) for metric in METRICS]
        lines.append(f"| {METHOD_NAMES.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def matched_table(report: Mapping[str, Any]) -> str:
    """Utility / over-refusal of each method at common harmful-refusal levels, as a Markdown table."""
    rows = report["matched_safety"]
    methods = [name for name in report["trajectories"]]
    if not rows:
        return "(the methods reach no common harmful-refusal level among " + \
            ", ".join(f"{level:.0%}" for level in SAFETY_LEVELS) + ")"
    header = "| harmful refused | " + " | ".join(f"{METHOD_NAMES.get(m, m)}: utility / over-refusal"
                                                for m in methods) + " |"
    lines = [header, "|" + "---|" * (len(methods) + 1)]
    for row in rows:
        cells = [f"{row[m]['utility_accuracy']:.0%} / {row[m]['over_refusal_rate']:.0%}" for m in methods]
        lines.append(f"| {row['harmful_refusal_rate']:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], directory: Path) -> dict[str, Path]:
    """Write report.json, report.md and report.png into `directory`; returns their paths."""
    from lora_ogpsa.files import write_json

    paths = {"json": directory / "report.json", "markdown": directory / "report.md", "plot": directory / "report.png"}
    write_json(paths["json"], report)
    paths["markdown"].write_text(markdown(report))
    try:
        plot(report, paths["plot"])
    except ImportError:  # matplotlib is an optional dependency (the `demo` extra)
        logger.warning("matplotlib is not installed: no %s (pip install 'lora-ogpsa[demo]')", paths["plot"])
        paths.pop("plot")
    return paths


def markdown(report: Mapping[str, Any]) -> str:
    """The human-readable report."""
    settings = report["settings"]
    parts = ["# lora-ogpsa demo report", "",
             f"Base model: `{report['model_path']}`. Every method trains with the same seed, data and steps; "
             "evaluation is greedy generation on the full-precision base + adapter (the final OGPSA model through "
             "the merged checkpoint).", "", "## Final models", "", final_table(report), "",
             "## At matched safety", "",
             "Each method's checkpoints, interpolated along training at common HarmBench refusal levels:", "",
             matched_table(report), "", "![safety vs utility](report.png)", "", "## Trajectories", ""]
    for method, points in report["trajectories"].items():
        parts.append(f"### {METHOD_NAMES.get(method, method)}\n")
        parts.append("| point | " + " | ".join(LABELS[m] for m in METRICS) + " |")
        parts.append("|" + "---|" * (len(METRICS) + 1))
        for point in points:
            cells = [_format(point.get(metric), metric) for metric in METRICS]
            parts.append(f"| {point.get('label', '?')} | " + " | ".join(cells) + " |")
        parts.append("")
    parts += ["## Settings", "", "```json", json.dumps(settings, indent=2, sort_keys=True, default=str), "```", ""]
    return "\n".join(parts)


def plot(report: Mapping[str, Any], path: Path) -> None:
    """Safety vs utility and safety vs over-refusal, one trajectory per method, checkpoints as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for method, points in report["trajectories"].items():
        safety = [p["harmful_refusal_rate"] for p in points]
        for axis, metric in zip(axes, ("utility_accuracy", "over_refusal_rate"), strict=True):
            values = [p.get(metric) for p in points]
            axis.plot(safety, [math.nan if v is None else v for v in values], marker="o",
                      label=METHOD_NAMES.get(method, method))
    for axis, metric in zip(axes, ("utility_accuracy", "over_refusal_rate"), strict=True):
        axis.set_xlabel("HarmBench prompts refused")
        axis.set_ylabel(LABELS[metric])
        axis.set_xlim(-0.02, 1.02)
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    axes[0].set_title("safety vs utility (up and right is better)")
    axes[1].set_title("safety vs over-refusal (down and right is better)")
    axes[0].legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _format(value: Any, metric: str) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if metric == "benign_nll" else f"{value:.0%}"
