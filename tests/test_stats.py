"""Intervals: the bootstrap over prompts and the t-interval across seeds."""

import pytest

from lora_ogpsa.eval.stats import bootstrap_ci, mean_ci


def test_bootstrap_interval_brackets_the_rate_and_shrinks_with_more_prompts():
    few = bootstrap_ci([True] * 10 + [False] * 10)
    many = bootstrap_ci([True] * 200 + [False] * 200)
    assert few[0] < 0.5 < few[1] and many[0] < 0.5 < many[1]
    assert (many[1] - many[0]) < (few[1] - few[0]) / 3  # ~1/sqrt(n): 20x the prompts, ~4.5x narrower
    assert few[0] + 0.2 > 0.40 and few[1] - 0.2 < 0.60  # about ±0.22 for n = 20


def test_bootstrap_is_seeded_and_degenerate_cases_are_plain():
    values = [1, 0, 0, 1, 1, 0, 1]
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci([0.0] * 5) == [0.0, 0.0] and bootstrap_ci([]) is None


def test_mean_interval_across_seeds():
    result = mean_ci([0.1, 0.2, 0.3])
    assert result["mean"] == pytest.approx(0.2)
    assert result["ci"] == pytest.approx([0.2 - 4.303 * 0.1 / 3 ** 0.5, 0.2 + 4.303 * 0.1 / 3 ** 0.5])
    assert mean_ci([0.5]) == {"mean": 0.5, "ci": None}
    assert mean_ci([]) == {"mean": None, "ci": None}
