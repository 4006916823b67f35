"""`lora-ogpsa calibrate`: the λ (and checkpoint) at which a finished adapter reaches a harmful-refusal target
with the least tax, chosen on dev, read once on test, and written as an adapter with λ folded into its weights.

W + λ·ΔW (λ ≤ 1) moves a trained adapter back along a line to the base at no training cost. On the dev part of
the suites every checkpoint is evaluated on a grid of λ; between the two grid points where harmful refusal
first reaches the target, λ is bisected (refusal is a rate over prompts, so it is monotone in λ only on
average: the curve is checked and `monotone` says whether the evaluated points were). Among every evaluated
point that reaches the target, the one with the least tax (utility lost + benign refusal gained against the
base, points) is chosen; the test part is read once, on the written adapter and the base. Every checkpoint is
read at the largest λ first: a target none of them reaches there stops the run before the rest of the grid.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lora_ogpsa.eval.cached import Evaluator
from lora_ogpsa.experiment.suites import Suites
from lora_ogpsa.utils.errors import InputError
from lora_ogpsa.utils.files import CARD_FILE, write_json
from lora_ogpsa.utils.outputs import atomic_directory, check_apart, check_output_dir, output_path

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
RATES = ("harmful_refusal_rate", "over_refusal_rate", "dangerous_sounding_refusal_rate", "utility_accuracy")


def calibrate(model: str | Path, adapters: Sequence[str | Path], suites: Suites, target_refusal: float,
              output_dir: str | Path, *, grid: Sequence[float] = (0.25, 0.5, 0.75, 1.0), bisection_steps: int = 4,
              max_new_tokens: int = 16, batch_size: int = 32, overwrite: bool = False,
              evaluation_cache: str | Path | None = None) -> dict[str, Any]:
    """Choose (checkpoint, λ) on dev, write the folded adapter, its card and `calibration.json`; returns the
    calibration document.

    Args:
        adapters: one adapter, or several checkpoints of one run (the checkpoint is chosen too).
        suites: the dev and test parts (`experiment.suites.load_suites`).
        target_refusal: the harmful-refusal rate to reach on dev, in (0, 1].
        grid: λ values in (0, 1] evaluated before bisecting (λ = 0 is the base, always evaluated).
        evaluation_cache: where evaluations are cached by weights and suites (default: `.NAME.evaluations`
            beside the output), kept when the target is not reached, so that a rerun re-evaluates nothing.

    Raises:
        InputError: a bad argument, or a target no evaluated point reaches (naming the best refusal reached).
    """
    from lora_ogpsa.models.loading import check_adapter_dir, check_model_dir

    _check_numbers(target_refusal, grid, bisection_steps)
    model_path = check_model_dir(model)
    paths = [check_adapter_dir(adapter) for adapter in adapters]
    if not paths:
        raise InputError("--adapter: give at least one adapter directory")
    output = output_path(output_dir, flag="--output_dir")
    check_apart(output, {"--model": model_path, **{f"--adapter {p}": p for p in paths}}, flag="--output_dir")
    check_output_dir(output, overwrite=overwrite, flag="--output_dir")
    cache = Path(evaluation_cache) if evaluation_cache else output.with_name(f".{output.name}.evaluations")
    with atomic_directory(output, overwrite=overwrite) as work:
        dev = Evaluator(model_path, suites.by_split["dev"], max_new_tokens, batch_size, cache)
        base = dev.evaluate(None, "base")
        _check_reachable(dev, paths, target_refusal, max(grid))
        curves = {str(path): dev_curve(dev, path, base, target_refusal, grid, bisection_steps) for path in paths}
        choice = choose(curves, base, target_refusal)
        _write_adapter(Path(choice["adapter"]), work, choice["lambda"])
        test = Evaluator(model_path, suites.by_split["test"], max_new_tokens, batch_size, cache)
        document = _document(model_path, curves, base, choice, target_refusal, suites,
                             test.evaluate(None, "base"), test.evaluate(work, "calibrated"))
        write_json(work / CALIBRATION_FILE, document)
        (work / CARD_FILE).write_text(card(document))
    return document


def _check_numbers(target: float, grid: Sequence[float], steps: int) -> None:
    if target is None or not 0.0 < target <= 1.0:
        raise InputError(f"--target_refusal: must be in (0, 1], got {target}; e.g. 0.7 for 70 % of harmful "
                         "prompts refused")
    if not grid or any(not 0.0 < value <= 1.0 for value in grid):
        raise InputError(f"--grid: every λ must be in (0, 1], got {list(grid)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InputError(f"--bisection_steps: must be an integer >= 0, got {steps!r}")


def _check_reachable(evaluator: Evaluator, paths: Sequence[Path], target: float, scale: float) -> None:
    """Every checkpoint at the largest λ first (the grid reuses these evaluations): where none reaches the
    target, stop before the rest of the grid with the best refusal reached.

    Raises:
        InputError: the target is above every checkpoint's refusal at the largest λ.
    """
    refusal = {path: evaluator.evaluate(path, f"λ={scale:g}", scale=scale)["harmful_refusal_rate"] for path in paths}
    best = max(refusal, key=refusal.get)
    if refusal[best] < target:
        raise _unreached(target, refusal[best], best, scale)


def _unreached(target: float, refusal: float, adapter: str | Path, scale: float) -> InputError:
    return InputError(f"--target_refusal {target:g}: not reached on dev; the best harmful refusal is {refusal:.1%} "
                      f"({adapter} at λ={scale:g}); lower the target or train further")


def dev_curve(evaluator: Evaluator, adapter: Path, base: Mapping[str, Any], target: float, grid: Sequence[float],
              steps: int) -> dict[str, Any]:
    """One checkpoint's dev points (λ order, the base as λ = 0) on the grid and the bisection, and whether
    harmful refusal was monotone in λ over them."""
    points = {0.0: {**base, "lambda": 0.0}}
    evaluate = lambda scale: points.setdefault(scale, {  # noqa: E731
        **evaluator.evaluate(adapter, f"λ={scale:g}", scale=scale), "lambda": scale})
    for scale in sorted(set(grid)):
        evaluate(float(scale))
    low, high = _bracket(points, target)
    for _ in range(steps if high is not None else 0):
        middle = (low + high) / 2
        low, high = (low, middle) if evaluate(middle)["harmful_refusal_rate"] >= target else (middle, high)
    ordered = [points[scale] for scale in sorted(points)]
    refusal = [point["harmful_refusal_rate"] for point in ordered]
    return {"points": ordered, "monotone": all(a <= b for a, b in itertools.pairwise(refusal)),
            "bracket": None if high is None else [low, high]}


def _bracket(points: Mapping[float, Mapping[str, Any]], target: float) -> tuple[float, float | None]:
    """The first pair of neighbouring λ where harmful refusal goes from below the target to at least it."""
    scales = sorted(points)
    for low, high in itertools.pairwise(scales):
        if points[low]["harmful_refusal_rate"] < target <= points[high]["harmful_refusal_rate"]:
            return low, high
    return 0.0, None


def tax(point: Mapping[str, Any], base: Mapping[str, Any]) -> float:
    """Utility lost (where there is a utility suite) plus benign refusal gained against the base, in points."""
    lost = 0.0
    if point.get("utility_accuracy") is not None and base.get("utility_accuracy") is not None:
        lost = base["utility_accuracy"] - point["utility_accuracy"]
    return 100 * (lost + point["over_refusal_rate"] - base["over_refusal_rate"])


def choose(curves: Mapping[str, Mapping[str, Any]], base: Mapping[str, Any], target: float) -> dict[str, Any]:
    """The evaluated (checkpoint, λ > 0) reaching the target with the least tax (then the smallest λ).

    Raises:
        InputError: no point reaches the target (naming the best refusal reached, and where).
    """
    candidates = [(tax(point, base), point["lambda"], adapter, point) for adapter, curve in curves.items()
                  for point in curve["points"] if point["lambda"] > 0]
    reaching = [found for found in candidates if found[3]["harmful_refusal_rate"] >= target]
    if not reaching:
        best = max(candidates, key=lambda found: found[3]["harmful_refusal_rate"])
        raise _unreached(target, best[3]["harmful_refusal_rate"], best[2], best[1])
    found_tax, scale, adapter, point = min(reaching, key=lambda found: (found[0], found[1]))
    return {"adapter": adapter, "lambda": scale, "tax": found_tax, "dev": _rates(point)}


def _rates(point: Mapping[str, Any]) -> dict[str, Any]:
    keys = [*RATES, *(f"{key}_ci" for key in RATES), "n_harmful", "n_benign", "n_utility", "n_dangerous_sounding"]
    return {key: point.get(key) for key in keys}


def _write_adapter(source: Path, work: Path, scale: float) -> None:
    import shutil

    from lora_ogpsa.export.scale import write_scaled_adapter

    write_scaled_adapter(source, work, scale)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copyfile(source / name, work / name)


def _document(model: Path, curves: Mapping[str, Any], base: Mapping[str, Any], choice: Mapping[str, Any],
              target: float, suites: Suites, test_base: Mapping[str, Any],
              test_chosen: Mapping[str, Any]) -> dict[str, Any]:
    monotone = all(curve["monotone"] for curve in curves.values())
    return {
        "split": "test", "splits": {"choice": "dev", "reported": "test"},
        "model": str(model), "target_refusal": target, "lambda": choice["lambda"], "adapter": choice["adapter"],
        "monotone": monotone,
        "monotone_note": "harmful refusal rose with λ at every evaluated point" if monotone else
        "harmful refusal fell somewhere as λ rose: the bisection bracket is the first crossing, and the choice "
        "is the least-tax point among all evaluated ones that reach the target",
        "dev": {"split": "dev", "base": _rates(base), "chosen": {**choice["dev"], "tax": choice["tax"]},
                "curves": {adapter: {"monotone": curve["monotone"], "bracket": curve["bracket"],
                                     "points": [{"lambda": p["lambda"], **_rates(p), "tax": tax(p, base)}
                                                for p in curve["points"]]}
                           for adapter, curve in curves.items()}},
        "test": {"split": "test", "base": _rates(test_base),
                 "calibrated": {**_rates(test_chosen), "tax": tax(test_chosen, test_base)}},
        "suites": suites.describe(),
    }


def card(document: Mapping[str, Any]) -> str:
    """The folded adapter's model card: what it is, λ, how λ was chosen, and the test rates."""
    test, dev = document["test"]["calibrated"], document["dev"]["chosen"]
    pct = lambda rates, key: "–" if rates.get(key) is None else f"{rates[key]:.1%}" + (  # noqa: E731
        f" [{rates[key + '_ci'][0]:.1%}, {rates[key + '_ci'][1]:.1%}]" if rates.get(key + "_ci") else "")
    rows = [f"| {label} | {pct(dev, key)} | {pct(test, key)} |" for key, label in (
        ("harmful_refusal_rate", "harmful refused"), ("over_refusal_rate", "benign refused"),
        ("dangerous_sounding_refusal_rate", "look-alike benign refused"), ("utility_accuracy", "utility"))]
    return "\n".join([
        "---", "library_name: peft", f"base_model: {document['model']}", "tags: [lora, lora-ogpsa, calibrated]",
        "---", "", f"# Calibrated adapter: λ = {document['lambda']:g}", "",
        f"`{document['adapter']}` with its delta scaled by λ = {document['lambda']:g} and folded into lora_B "
        "(merged, W + λ·ΔW). It loads with `PeftModel.from_pretrained` like any LoRA adapter.", "",
        f"Made by `lora-ogpsa calibrate` for a harmful-refusal target of {document['target_refusal']:.0%}: λ (and "
        "the checkpoint) was chosen on the dev split as the point reaching the target with the least tax "
        "(utility lost + benign refusal gained against the base); the test split was read once, at that "
        f"choice. Refusal monotone in λ over the evaluated points: {document['monotone']}.", "",
        "| rate (95 % interval over prompts) | dev | test |", "|---|---|---|", *rows, "",
        f"Tax against the base: {dev['tax']:+.1f} points on dev, {test['tax']:+.1f} on test. The full curve is "
        f"in `{CALIBRATION_FILE}`.", ""])
