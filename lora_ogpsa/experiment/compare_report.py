"""`lora-ogpsa compare`'s report: the experiment report (`report.build_report`: the first seed's models and
curves, every rate with its interval, the tax at matched safety across seeds) plus the split, the seeds, every
seed's curves with per-prompt outcomes, and the paired difference of every method against the baseline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lora_ogpsa.experiment.report import METHOD_NAMES, build_report, compact_point
from lora_ogpsa.experiment.stats import across_seeds, paired_differences


def build_compare_report(plan: Any, per_seed: Mapping[int, Mapping[str, Any]],
                         timings: Mapping[str, float]) -> dict[str, Any]:
    """report.json's document of a finished comparison (`plan`: a `compare.ComparePlan`; `per_seed`: per
    training seed its `trajectories`, `lambda_curves` and final `models`)."""
    args = plan.arguments
    first = per_seed[args.seeds[0]]
    report = build_report(model_path=str(plan.model), settings=plan.describe(), models=first["models"],
                          trajectories=first["trajectories"], lambda_curves=first["lambda_curves"],
                          timings=timings, seeds=across_seeds(per_seed, args.levels))
    add_comparison(report, per_seed, list(plan.methods), plan.baseline, args.levels, args.split)
    report["title"] = "lora-ogpsa compare report"
    report["verdict"] = compare_verdict(report)
    return report


def add_comparison(report: dict[str, Any], per_seed: Mapping[int, Mapping[str, Any]], names: list[str],
                   baseline: str, levels: Any, split: str) -> None:
    """Add what every method comparison reports (the demo's included): the split, the seeds, every seed's
    curves with per-prompt outcomes, and the paired difference of every method against `baseline`."""
    curves = {seed: seeded["trajectories"] for seed, seeded in per_seed.items()}
    report.update(split=split, seeds=list(per_seed), baseline=baseline, levels=list(levels),
                  paired=paired_differences(curves, names, baseline, levels),
                  per_seed={str(seed): {key: {name: [compact_point(p) for p in points]
                                              for name, points in seeded[key].items()}
                                        for key in ("trajectories", "lambda_curves")}
                            for seed, seeded in per_seed.items()})
    stops = {str(seed): seeded["stops"] for seed, seeded in per_seed.items() if seeded.get("stops")}
    if stops:  # trained to a dev target (`stopping`): where each run stopped, or that it hit the cap
        report["stops"] = stops


def compare_verdict(report: Mapping[str, Any]) -> str:
    """One sentence per method: its paired tax difference against the baseline at the highest level every seed
    reaches, and whether the interval contains 0."""
    baseline = report["baseline"]
    named = lambda name: METHOD_NAMES.get(name, name)  # noqa: E731
    sentences = [f"Split `{report['split']}`, seeds {report['seeds']}, every method paired against "
                 f"{named(baseline)}."]
    for name, by_level in report["paired"].items():
        reached = [(level, found["tax"]) for level, found in by_level.items() if found["tax"] and found["tax"]["ci"]]
        if not reached:
            sentences.append(f"{named(name)} and {named(baseline)} reach no common harmful-refusal level in every "
                             "seed: no paired comparison.")
            continue
        level, tax = max(reached, key=lambda item: float(item[0]))
        low, high = tax["ci"]
        reading = ("the interval contains 0: no difference shown" if tax["contains_zero"] else
                   f"less tax than {named(baseline)}" if high < 0 else f"more tax than {named(baseline)}")
        sentences.append(f"At {float(level):.0%} harmful refusal, {named(name)} − {named(baseline)} tax is "
                         f"{tax['mean']:+.1f} points [{low:+.1f}, {high:+.1f}]: {reading}.")
    return " ".join(sentences)
