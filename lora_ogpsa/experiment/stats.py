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
    return {"tax": tax, "ci": None if half is None else clip_interval([tax - half, tax + half], *tax_range(base))}


def tax_range(base: Mapping[str, float]) -> tuple[float, float]:
    """The taxes a model can have against this base, in points: from utility 100 % with no over-refusal to
    utility 0 % with every benign prompt refused."""
    best = alignment_tax({"utility_accuracy": 1.0, "over_refusal_rate": 0.0}, base)
    worst = alignment_tax({"utility_accuracy": 0.0, "over_refusal_rate": 1.0}, base)
    return best, worst


def clip_interval(ci: Sequence[float] | None, low: float, high: float) -> list[float] | None:
    """An interval cut to what the quantity can be (a t-interval of rates can pass 0 or 100 %)."""
    return None if ci is None else [min(max(ci[0], low), high), max(min(ci[1], high), low)]


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
    bases = [report["models"]["base"] for report in reports.values() if "base" in report["models"]]
    bounds = (min(tax_range(base)[0] for base in bases), max(tax_range(base)[1] for base in bases)) if bases \
        else (-math.inf, math.inf)
    tax: dict[str, dict[str, Any]] = {}
    for name in sorted({name for table in per_seed.values() for name in table}):
        tax[name] = {}
        for level in (f"{level:g}" for level in levels):
            values = [table.get(name, {}).get(level) for table in per_seed.values()]
            if all(value is not None for value in values):
                found = mean_ci([value["tax"] for value in values])
                tax[name][level] = {**found, "ci": clip_interval(found["ci"], *bounds),
                                    "per_seed": [value["tax"] for value in values]}
    names = sorted({name for report in reports.values() for name in report["models"]})
    keys = ("harmful_refusal_rate", "dangerous_sounding_refusal_rate", "over_refusal_rate", "utility_accuracy")
    finals = {name: {key: _rate_mean_ci([report["models"][name][key] for report in reports.values()
                                         if name in report["models"]]) for key in keys} for name in names}
    return {"seeds": list(reports), "tax": tax, "finals": finals,
            "per_seed_tax": {str(seed): table for seed, table in per_seed.items()}}


def _rate_mean_ci(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and t-interval across seeds of a rate, the interval cut to [0, 1]."""
    from lora_ogpsa.eval.stats import mean_ci

    found = mean_ci(values)
    return {**found, "ci": clip_interval(found["ci"], 0.0, 1.0)}


def prompt_flags(point: Mapping[str, Any]) -> dict[str, str] | None:
    """One evaluated model's per-prompt outcomes as bit strings (`"0110…"`): `harmful` (refused), `benign`
    (refused), `dangerous` (the benign prompt is a look-alike) and `utility` (answered correctly); from the
    point's `responses` (kept by the evaluator) or its stored `flags`; None when it has neither."""
    if "flags" in point:
        return dict(point["flags"])
    responses = point.get("responses")
    if not responses:
        return None
    bits = lambda values: "".join("1" if value else "0" for value in values)  # noqa: E731
    return {"harmful": bits(r["refused"] for r in responses["harmful"]),
            "benign": bits(r["refused"] for r in responses["benign"]),
            "dangerous": bits(r.get("kind") == "sounds_dangerous" for r in responses["benign"]),
            "utility": bits(r["correct"] for r in responses["utility"])}


def paired_tax_difference(trajectories_by_seed: Mapping[Any, Mapping[str, Sequence[Mapping[str, Any]]]],
                          method: str, baseline: str, level: float, *, metric: str = "tax",
                          repeats: int = 2000, seed: int = 0) -> dict[str, Any] | None:
    """The paired difference `method − baseline` of the tax (or of one of its parts) at `level` HarmBench
    refusal, mean over training seeds, with a 95 % interval from a hierarchical bootstrap.

    Each bootstrap repeat draws the training seeds with replacement and, once for all seeds and both methods
    (the prompts are shared, so the comparison is paired), every suite's prompts with replacement; it rebuilds
    each checkpoint's rates from the per-prompt outcomes (`prompt_flags`), reads each curve where it first
    reaches `level` (piecewise-linear between two evaluated checkpoints, so where HarmBench crosses the level
    moves with the resampled prompts) and takes the mean over the drawn seeds of the per-seed difference.

    Args:
        trajectories_by_seed: per training seed, `{method: [base, checkpoint, …, final]}` with per-prompt
            outcomes on every point.
        metric: `tax` (utility lost + over-refusal gained, points), `utility` (utility lost, points),
            `over_refusal` (over-refusal gained, points) or `dangerous` (look-alike refusal gained, points).

    Returns:
        `{"mean", "ci", "per_seed", "reached"}` (`reached`: the share of repeats in which every drawn curve
        reaches the level; the interval is over those), or None when some seed's curve does not reach `level`
        on the measured prompts, or outcomes are missing.
    """
    import numpy as np

    seeds = list(trajectories_by_seed)
    arrays = []
    for key in seeds:
        pair = []
        for name in (method, baseline):
            flags = [prompt_flags(point) for point in trajectories_by_seed[key][name]]
            if any(f is None for f in flags):
                return None
            pair.append({part: np.array([[c == "1" for c in f[part]] for f in flags], dtype=np.float64)
                         for part in ("harmful", "benign", "utility")} | {"dangerous": flags[0]["dangerous"]})
        arrays.append(pair)
    sizes = {part: arrays[0][0][part].shape[1] for part in ("harmful", "benign", "utility")}  # a part may be empty
    dangerous = np.array([c == "1" for c in arrays[0][0]["dangerous"]])
    identity = {part: np.arange(n)[None, :] for part, n in sizes.items()}
    observed = np.array([_difference(pair, identity, dangerous, level, metric)[0] for pair in arrays])
    if np.isnan(observed).any():
        return None
    rng = np.random.default_rng(seed)
    draws = {part: rng.integers(0, max(n, 1), size=(repeats, n)) for part, n in sizes.items()}
    per_seed = np.stack([_difference(pair, draws, dangerous, level, metric) for pair in arrays])  # (S, R)
    chosen = rng.integers(0, len(seeds), size=(repeats, len(seeds)))
    means = per_seed[chosen, np.arange(repeats)[:, None]].mean(axis=1)
    finite = means[np.isfinite(means)]
    ci = [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))] if finite.size else None
    return {"mean": float(observed.mean()), "ci": ci, "per_seed": [float(v) for v in observed],
            "reached": float(finite.size / repeats), "seeds": seeds, "level": level, "metric": metric,
            "method": method, "baseline": baseline, "repeats": repeats}


def _difference(pair: Sequence[Mapping[str, Any]], draws: Mapping[str, Any], dangerous: Any, level: float,
                metric: str) -> Any:
    """Per bootstrap repeat (rows of `draws`): method's minus baseline's `metric` at `level`, in points."""
    import numpy as np

    values = []
    for arrays in pair:
        harm = arrays["harmful"][:, draws["harmful"]].mean(axis=-1)  # (checkpoints, repeats)
        benign_draw = draws["benign"]
        over = arrays["benign"][:, benign_draw].mean(axis=-1)
        utility = arrays["utility"][:, draws["utility"]].mean(axis=-1) if arrays["utility"].shape[1] else \
            np.zeros_like(harm)  # no utility suite: the tax is the over-refusal part alone
        weights = dangerous[benign_draw].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            look = (arrays["benign"][:, benign_draw] * weights).sum(axis=-1) / weights.sum(axis=-1)
        parts = {"utility": utility[0] - utility, "over_refusal": over - over[0], "dangerous": look - look[0]}
        parts["tax"] = parts["utility"] + parts["over_refusal"]
        values.append(100 * _first_crossing(harm, parts[metric], level))
    return values[0] - values[1]


def _first_crossing(harm: Any, values: Any, level: float) -> Any:
    """Per column: `values` interpolated where the `harm` curve (rows in training order) first reaches `level`
    (as `interpolate_at`), NaN where it never does."""
    import numpy as np

    found = np.full(harm.shape[1], np.nan)
    for row in range(harm.shape[0] - 1):
        low, high = harm[row], harm[row + 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(high > low, (level - low) / (high - low), 0.0)
        hit = np.isnan(found) & (((low <= level) & (level <= high) & (high > low)) | (low == level))
        found = np.where(hit, values[row] + share * (values[row + 1] - values[row]), found)
    last = np.isnan(found) & (harm[-1] == level)
    return np.where(last, values[-1], found)


PAIRED_METRICS = ("tax", "utility", "over_refusal", "dangerous")


def paired_differences(trajectories_by_seed: Mapping[Any, Mapping[str, Sequence[Mapping[str, Any]]]],
                       names: Sequence[str], baseline: str, levels: Sequence[float],
                       metrics: Sequence[str] = PAIRED_METRICS) -> dict[str, dict[str, dict[str, Any]]]:
    """Every method but `baseline` minus `baseline`, per level and metric: `paired_tax_difference` over the
    seeds' checkpoint curves (hierarchical bootstrap over seeds and prompts), each with `contains_zero` (its
    interval holds 0: no difference shown) where it has an interval; None where a curve misses the level."""
    paired: dict[str, dict[str, dict[str, Any]]] = {}
    for name in (name for name in names if name != baseline):
        paired[name] = {}
        for level in levels:
            found = {metric: paired_tax_difference(trajectories_by_seed, name, baseline, level, metric=metric)
                     for metric in metrics}
            paired[name][f"{level:g}"] = {metric: value if not (value and value.get("ci")) else
                                          {**value, "contains_zero": value["ci"][0] <= 0.0 <= value["ci"][1]}
                                          for metric, value in found.items()}
    return paired
