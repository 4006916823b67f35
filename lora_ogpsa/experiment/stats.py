"""Statistics of an experiment: the alignment tax at matched safety, per curve and across seeds.

A method's trajectory is its sequence of evaluated checkpoints, starting from the base model. Comparing final
models alone would compare different amounts of safety; instead, each trajectory is interpolated (piecewise
linearly, along training order) at common harmful-refusal levels, and utility and over-refusal are compared
there: "at 60% HarmBench refusal, OGPSA keeps 80% utility where plain QLoRA keeps 50%".
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

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


def alignment_tax(point: Mapping[str, float], base: Mapping[str, float]) -> float:
    """Utility lost plus over-refusal gained against the base, in points."""
    return 100 * ((base["utility_accuracy"] - point["utility_accuracy"])
                  + (point["over_refusal_rate"] - base["over_refusal_rate"]))


def tax_at(points: Sequence[Mapping[str, Any]], level: float) -> dict[str, Any] | None:
    """The alignment tax where a frontier (trajectory or λ-curve) first reaches `level` HarmBench refusal, with
    an approximate 95 % interval from the interpolated intervals of utility and over-refusal (half-widths
    combined in quadrature, prompts resampled independently); None where it never reaches `level`."""
    base = points[0]
    utility, over = interpolate_at(points, level, "utility_accuracy"), interpolate_at(points, level, "over_refusal_rate")
    if utility is None or over is None:
        return None
    tax = alignment_tax({"utility_accuracy": utility, "over_refusal_rate": over}, base)
    widths = []
    for metric in ("utility_accuracy", "over_refusal_rate"):
        spread = [{**p, metric: (p[f"{metric}_ci"][1] - p[f"{metric}_ci"][0]) / 2} for p in points
                  if p.get(f"{metric}_ci")]
        widths.append(interpolate_at(spread, level, metric) if len(spread) == len(points) else None)
    half = None if None in widths else 100 * math.hypot(*widths)
    return {"tax": tax, "ci": None if half is None else [tax - half, tax + half]}


def frontiers(trajectories: Mapping[str, Sequence[Mapping[str, Any]]],
              lambda_curves: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Sequence[Mapping[str, Any]]]:
    """Every curve a method offers: its checkpoints (`name`) and its λ-scaled final adapter (`name λ`)."""
    return {**trajectories, **{f"{name} λ": points for name, points in lambda_curves.items()}}


def tax_table(curves: Mapping[str, Sequence[Mapping[str, Any]]],
              levels: Sequence[float] = SAFETY_LEVELS) -> dict[str, dict[str, dict[str, Any]]]:
    """`{curve: {level: {"tax", "ci"}}}` for the levels each curve reaches."""
    return {name: {f"{level:g}": found for level in levels if (found := tax_at(points, level)) is not None}
            for name, points in curves.items()}


def across_seeds(reports: Mapping[int, Mapping[str, Any]], levels: Sequence[float] = SAFETY_LEVELS) -> dict[str, Any]:
    """Several training seeds' results, each `{"models", "trajectories", "lambda_curves"}` of one seed: every
    final rate and every curve's tax at each level as mean and 95 % t-interval across seeds (a level enters a
    curve's row only where every seed reaches it), with the per-seed values."""
    from lora_ogpsa.eval.stats import mean_ci

    per_seed = {seed: tax_table(frontiers(report["trajectories"], report["lambda_curves"]), levels)
                for seed, report in reports.items()}
    tax: dict[str, dict[str, Any]] = {}
    for name in sorted({name for table in per_seed.values() for name in table}):
        tax[name] = {}
        for level in (f"{level:g}" for level in levels):
            values = [table.get(name, {}).get(level) for table in per_seed.values()]
            if all(value is not None for value in values):
                tax[name][level] = {**mean_ci([value["tax"] for value in values]),
                                    "per_seed": [value["tax"] for value in values]}
    names = sorted({name for report in reports.values() for name in report["models"]})
    keys = ("harmful_refusal_rate", "dangerous_sounding_refusal_rate", "over_refusal_rate", "utility_accuracy")
    finals = {name: {key: mean_ci([report["models"][name][key] for report in reports.values()
                                   if name in report["models"]]) for key in keys} for name in names}
    return {"seeds": list(reports), "tax": tax, "finals": finals,
            "per_seed_tax": {str(seed): table for seed, table in per_seed.items()}}
