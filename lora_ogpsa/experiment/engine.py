"""Running an experiment's arms: every (method, seed) trained by content fingerprint (`cache.run_fingerprint`),
every checkpoint evaluated (`eval.cached`), seed by seed. `compare` and the demo both run through it."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lora_ogpsa.eval.cached import Evaluator
from lora_ogpsa.experiment.cache import run_fingerprint
from lora_ogpsa.experiment.stopping import STOP_FILE, RefusalTarget, StopAtRefusal
from lora_ogpsa.train.settings import TrainSettings
from lora_ogpsa.utils.files import write_json

logger = logging.getLogger(__name__)

RUN_MARKER = "demo_settings.json"
"""The file beside a trained run that holds its fingerprint (the name predates `compare`; finished runs are
found by it)."""


def train_and_evaluate(runs: Mapping[tuple[str, int], tuple[str, TrainSettings]], evaluator: Evaluator,
                       base_metrics: dict[str, Any], lambdas: Sequence[float] | None,
                       timings: dict[str, float], until: RefusalTarget | None = None) -> dict[int, dict[str, Any]]:
    """Train (`train_cached`) and evaluate (`evaluate_run`) every run, seed by seed in the order given.

    Args:
        runs: `(method, seed) → (command, settings)`, every seed's methods together.
        lambdas: the λ-curve's interior points, or None for no λ-curve.
        timings: filled with `train_<method>` / `evaluate_<method>` seconds (`seed_<N>_…` after the first seed).
        until: train every run only until its dev harmful refusal reaches this target (`stopping`).

    Returns:
        per seed `{"trajectories", "lambda_curves", "models"}` (`models`: the base and every final adapter),
        with `until` also `stops`: per method the run's `stopping.STOP_FILE` record.
    """
    from tqdm.auto import tqdm

    per_seed: dict[int, dict[str, Any]] = {}
    first = next(iter(runs))[1]
    with tqdm(total=len(runs), desc="experiment", unit="run") as bar:
        for (name, seed), (stages, settings) in runs.items():
            found = per_seed.setdefault(seed, {"trajectories": {}, "lambda_curves": {}, "models": {"base": base_metrics}})
            prefix = "" if seed == first else f"seed_{seed}_"
            start = time.perf_counter()
            directory = train_cached(name, settings, stages, until)
            if until is not None:
                found.setdefault("stops", {})[name] = json.loads((directory / STOP_FILE).read_text())
            timings[f"{prefix}train_{name}"] = time.perf_counter() - start
            start = time.perf_counter()
            found["trajectories"][name], curve = evaluate_run(evaluator, directory, stages, base_metrics,
                                                              tuple(lambdas) if lambdas else None)
            found["models"][name] = dict(found["trajectories"][name][-1])
            found["lambda_curves"].update({name: curve} if curve is not None else {})
            timings[f"{prefix}evaluate_{name}"] = time.perf_counter() - start
            bar.update()
    return per_seed


def evaluate_run(evaluator: Evaluator, directory: Path, stages: str, base_metrics: dict[str, Any],
                 lambdas: tuple[float, ...] | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """One trained run's trajectory (the base, every checkpoint, the final adapter) and, with `lambdas`, the
    final adapter's λ-curve."""
    trajectory = [{**base_metrics, "label": "base"}, *evaluator.trajectory(directory, stages)]
    if lambdas is None:
        return trajectory, None
    return trajectory, evaluator.lambda_curve(directory, base_metrics, dict(trajectory[-1]), tuple(lambdas))


def train_cached(name: str, settings: TrainSettings, stages: str, until: RefusalTarget | None = None) -> Path:
    """Run `sft`, `dpo` or `align` (`stages`) into `settings.output`, unless a finished run with the same
    fingerprint (`cache.run_fingerprint`: settings and file contents, and the target `until` trained it to) is
    already there; returns the directory."""
    from lora_ogpsa.train.run import run_align, run_dpo, run_sft

    fingerprint = run_fingerprint(settings, stages)
    if until is not None:  # a run trained to a target is another run than the capped one
        fingerprint = hashlib.sha256(f"{fingerprint} {until.key}".encode()).hexdigest()[:16]
    marker = settings.output / RUN_MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
        logger.info("reusing the trained %s run in %s", name, settings.output)
        return settings.output
    logger.info("training %s (%s, %d steps%s) into %s", name, stages, settings.max_steps,
                f" then DPO {settings.dpo_max_steps}" if stages == "align" else "", settings.output)
    callbacks = [StopAtRefusal(until, name)] if until is not None else []
    {"sft": run_sft, "dpo": run_dpo, "align": run_align}[stages](settings, callbacks)
    if callbacks:
        write_json(settings.output / STOP_FILE, callbacks[0].record(settings.max_steps))
    marker.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
    return settings.output
