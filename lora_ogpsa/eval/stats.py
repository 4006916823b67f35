"""Intervals for the rates we publish: a percentile bootstrap over prompts, seeded, and one across seeds."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

RESAMPLES = 2000
LEVEL = 0.95


def bootstrap_ci(values: Sequence[float | bool], *, resamples: int = RESAMPLES, level: float = LEVEL,
                 seed: int = 0) -> list[float] | None:
    """The percentile bootstrap interval of the mean of `values` (flags or numbers), resampling prompts.

    Deterministic for a seed. With every value equal the interval is that value twice (a bootstrap cannot
    see variation it never sampled: read a 0 % rate over n prompts as "below about 3/n", the rule of three).

    Returns:
        `[low, high]`, or None for no values.
    """
    if not values:
        return None
    data = torch.tensor([float(value) for value in values], dtype=torch.float64)  # (n,)
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(len(data), (resamples, len(data)), generator=generator)  # (R, n)
    means = data[index].mean(dim=1)  # (R,)
    tail = (1.0 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return [low, high]


def mean_ci(values: Sequence[float], *, level: float = LEVEL) -> dict[str, float | list[float] | None]:
    """Mean and t-interval of per-seed results (`{"mean", "ci"}`; `ci` None for fewer than two values)."""
    values = [float(value) for value in values if value is not None and not math.isnan(value)]
    if not values:
        return {"mean": None, "ci": None}
    mean = sum(values) / len(values)
    if len(values) < 2:
        return {"mean": mean, "ci": None}
    sd = math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))
    half = _t_quantile(len(values) - 1, level) * sd / math.sqrt(len(values))
    return {"mean": mean, "ci": [mean - half, mean + half]}


# Two-sided 95 % Student-t quantiles for small degrees of freedom (seeds), then the normal value.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def _t_quantile(dof: int, level: float) -> float:
    if level != LEVEL:
        raise ValueError(f"only the {LEVEL:.0%} level is tabulated, got {level}")
    return _T95.get(dof, 1.96)
