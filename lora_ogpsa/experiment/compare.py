"""`lora-ogpsa compare`: methods × seeds on the user's base model, training data and evaluation suites.

Every method is a name and the training options it overrides (any option of `lora-ogpsa sft|dpo|align`);
each is trained once per seed with the same data and steps (`engine.train_cached`: a finished run with the same
content fingerprint is reused), every checkpoint is evaluated on one split of the suites (`eval.cached`: by the
hash of the weights), and the report gives every rate with its interval, the tax at matched safety across
seeds and the paired difference against a baseline method (`stats.paired_differences`). The whole
configuration is checked before anything trains.

Layout of `output_dir`: `compare.json` (the checked configuration), `seed-N/<method>/` (training output
directories), `evaluations/` (cached per adapter), `report.{md,json,png}`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_ogpsa.experiment.arguments import CompareArguments, SuiteArguments, parse_mapping
from lora_ogpsa.experiment.suites import SPLITS, Suites, load_suites
from lora_ogpsa.utils.errors import InputError
from lora_ogpsa.utils.files import file_sha256, write_json
from lora_ogpsa.utils.outputs import is_lock_file, output_lock, output_path, probe_writable

logger = logging.getLogger(__name__)

CONFIG_FILE = "compare.json"
STAGES = ("sft", "dpo", "align")
DATA_KEYS = {"sft": ("data",), "dpo": ("data",), "align": ("sft_data", "dpo_data")}
RESERVED = {"model_name_or_path": "model", "model": "model", "output_dir": "output_dir", "output": "output_dir",
            "resume": None, "overwrite": None, "resume_from_checkpoint": None}
"""Training options a method may not override: set once for the whole comparison (or managed by it)."""
SUITE_KEYS = ("harmful", "benign", "utility", "harmful_test", "benign_test", "utility_test")


@dataclass
class ComparePlan:
    """A checked comparison: every run's settings, the suites, and what the report reads."""

    arguments: CompareArguments
    model: Path
    output: Path
    methods: dict[str, dict[str, Any]]
    baseline: str
    settings: dict[tuple[str, int], Any]
    """(method, seed) → its `TrainSettings`"""
    suites: Suites
    max_new_tokens: int
    batch_size: int

    def describe(self) -> dict[str, Any]:
        """The configuration as the report and `compare.json` record it (file contents by hash)."""
        args = self.arguments
        files = {key: getattr(args, key) for key in ("data", "sft_data", "dpo_data", "reference")
                 if getattr(args, key)}
        return {"model": str(self.model), "stage": args.stage, "methods": self.methods, "baseline": self.baseline,
                "training": parse_mapping(args.training) if args.training else {}, "seeds": list(args.seeds),
                "max_steps": args.max_steps, "save_steps": args.save_steps, "until_refusal": args.until_refusal,
                "lambdas": args.lambdas, "levels": list(args.levels), "split": args.split, "max_new_tokens": self.max_new_tokens,
                "data": {key: {"path": path, "sha256": file_sha256(Path(path))[:16]} for key, path in files.items()},
                "suites": self.suites.describe(),
                "evaluated_on": "full-precision base + adapter (greedy); choices read dev, final tables test"}


def compare_from_arguments(values: Mapping[str, Any]) -> dict[str, Any]:
    """`run_compare` from parsed flags (the fields of `CompareArguments` and `SuiteArguments`)."""
    pick = lambda cls: cls(**{item.name: values[item.name] for item in dataclasses.fields(cls)  # noqa: E731
                              if item.name in values})
    return run_compare(pick(CompareArguments), pick(SuiteArguments))


def run_compare(arguments: CompareArguments, suites: SuiteArguments | None = None) -> dict[str, Any]:
    """Check the configuration, train every method × seed, evaluate, write the report; returns report.json's
    document. A rerun reuses every finished run and evaluation.

    Raises:
        InputError: a bad configuration (one line naming the key and the fix), before anything trains.
    """
    plan = plan_compare(arguments, suites or SuiteArguments())
    with output_lock(plan.output, flag="--output_dir"):
        plan.output.mkdir(parents=True, exist_ok=True)
        write_json(plan.output / CONFIG_FILE, plan.describe())
        return _run(plan)


def plan_compare(args: CompareArguments, suite_args: SuiteArguments) -> ComparePlan:
    """Every check of a comparison, and the settings of each of its runs (nothing is trained).

    Raises:
        InputError: naming the key (`methods.NAME.OPTION` for a method's override) and how to fix it.
    """
    from lora_ogpsa.models.loading import check_model_dir

    output = _output(args.output_dir)
    if args.model is None:
        raise InputError("model: required; give the base model's directory")
    model = check_model_dir(args.model)
    methods, baseline = _check(args)
    loaded = load_suites({key: getattr(suite_args, key) for key in SUITE_KEYS}, seed=suite_args.split_seed,
                         dev_share=suite_args.dev_share, limit=suite_args.limit)
    if args.until_refusal is not None and not loaded.by_split["dev"].harmful:
        raise InputError("until_refusal: read on the harmful suite's dev part, and it is empty; give a harmful "
                         "suite with a dev part")
    settings = _settings(args, model, methods, lambda name, seed: output / f"seed-{seed}" / name)
    return ComparePlan(args, model, output, methods, baseline, settings, loaded, suite_args.max_new_tokens,
                       suite_args.eval_batch_size)


def run_settings(args: CompareArguments, model: Path,
                 run_dir: Callable[[str, int], Path]) -> dict[tuple[str, int], Any]:
    """Every run's `TrainSettings` of a comparison, each trained into `run_dir(method, seed)`, after the same
    checks as `plan_compare` (the demo lays its runs out so, and evaluates its own suites).

    Raises:
        InputError: as `plan_compare`.
    """
    methods, _ = _check(args)
    return _settings(args, model, methods, run_dir)


def _check(args: CompareArguments) -> tuple[dict[str, dict[str, Any]], str]:
    """The checks of everything but the model, the output and the suites; the methods and the baseline."""
    _choice("stage", args.stage, STAGES)
    _choice("split", args.split, SPLITS)
    methods = _methods(args.methods)
    baseline = args.baseline or next(iter(methods))
    if baseline not in methods:
        raise InputError(f"baseline: {baseline!r} is not a method; name one of {', '.join(methods)}")
    _seeds(args.seeds)
    _steps(args.max_steps, args.save_steps)
    _fractions("lambdas", args.lambdas or [], below_one=True)
    _fractions("levels", args.levels)
    if args.until_refusal is not None:
        _fractions("until_refusal", [args.until_refusal])
        if args.stage == "align":
            raise InputError("until_refusal: stage align trains SFT then DPO, and a stop inside SFT would change "
                             "what DPO starts from; use stage sft or dpo, or leave until_refusal unset")
        if args.save_steps < 1:
            raise InputError("until_refusal: read at every checkpoint, and save_steps is 0; give save_steps >= 1")
    for key in DATA_KEYS[args.stage]:
        if getattr(args, key) is None:
            raise InputError(f"{key}: stage {args.stage} trains on it; give the training rows file")
    return methods, baseline


def _settings(args: CompareArguments, model: Path, methods: dict[str, dict[str, Any]],
              run_dir: Callable[[str, int], Path]) -> dict[tuple[str, int], Any]:
    shared = _overrides("training", args.training)
    seeds = list(args.seeds)
    _run_settings(args, model, run_dir("shared", seeds[0]), None, shared, {}, seeds[0])  # the shared options first
    return {(name, seed): _run_settings(args, model, run_dir(name, seed), name, shared, overrides, seed)
            for seed in seeds for name, overrides in methods.items()}


def _output(path: str | None) -> Path:
    if path is None:
        raise InputError("output_dir: required; give the directory for the runs and the report")
    output = output_path(path, flag="output_dir")
    if output.exists() and not output.is_dir():
        raise InputError(f"output_dir: {output} exists and is not a directory; choose another path")
    if output.is_dir() and not (output / CONFIG_FILE).is_file() and \
            any(not is_lock_file(entry) for entry in output.iterdir()):
        raise InputError(f"output_dir: {output} is not empty and not a compare directory; choose another path")
    probe_writable(output, flag="output_dir")
    return output


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InputError(f"{key}: must be one of {', '.join(allowed)}, got {value!r}")


def _methods(value: Any) -> dict[str, dict[str, Any]]:
    methods = parse_mapping(value) if value is not None else {}
    if not methods:
        raise InputError("methods: give at least one method, e.g. {plain: {ogpsa_project: none}, ogpsa: {}}")
    checked = {}
    for name, overrides in methods.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise InputError(f"methods: name {name!r} must be letters, digits, '.', '_' or '-' (it names a "
                             "directory); rename it")
        checked[name] = _overrides(f"methods.{name}", overrides)
    return checked


def _overrides(key: str, value: Any) -> dict[str, Any]:
    """A mapping of training options (None: none), with the options a comparison sets itself refused."""
    if value is None:
        return {}
    if not isinstance(value, dict | str):
        raise InputError(f"{key}: must be a mapping of training options, got {type(value).__name__} {value!r}")
    overrides = parse_mapping(value)
    for option in overrides:
        if option in RESERVED:
            where = f"; set the top-level key '{RESERVED[option]}'" if RESERVED[option] else ""
            raise InputError(f"{key}.{option}: set by compare for every run, not per method{where}; remove it")
    return overrides


def _seeds(seeds: Any) -> list[int]:
    if not seeds or not isinstance(seeds, list | tuple) or \
            any(isinstance(seed, bool) or not isinstance(seed, int) for seed in seeds):
        raise InputError(f"seeds: must be a non-empty list of integers, got {seeds!r}; e.g. [0, 1, 2]")
    if len(set(seeds)) != len(seeds):
        raise InputError(f"seeds: {list(seeds)} repeats a seed; list each once")
    return list(seeds)


def _steps(max_steps: Any, save_steps: Any) -> None:
    for key, value, low in (("max_steps", max_steps, 1), ("save_steps", save_steps, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{key}: must be an integer >= {low}, got {value!r}")


def _fractions(key: str, values: Any, *, below_one: bool = False) -> None:
    top = "1)" if below_one else "1]"
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1 or \
                (below_one and value == 1):
            raise InputError(f"{key}: every value must be in (0, {top}, got {value!r}")


def _run_settings(args: CompareArguments, model: Path, directory: Path, name: str | None, shared: dict[str, Any],
                  overrides: dict[str, Any], seed: int):
    """One run's `TrainSettings`, trained into `directory`: the comparison's data and steps, the shared
    options, then the method's (name None: the shared options alone, checked first so that an error in them is
    named `training`)."""
    from lora_ogpsa.train.parser import training_settings

    values = {key: getattr(args, key) for key in (*DATA_KEYS[args.stage], "reference")}
    values.update(model_name_or_path=str(model), max_steps=args.max_steps, save_steps=args.save_steps, seed=seed)
    values.update({**shared, **overrides, "output_dir": str(directory), "overwrite": True})
    settings = training_settings(args.stage, values, where="training" if name is None else f"methods.{name}")
    if name is None:
        return settings  # the shared options alone: what a method adds is checked with the method
    for key in (*DATA_KEYS[args.stage], "reference", "replay", "lookalike"):
        path = getattr(settings, key, None)
        if path is not None and not Path(path).exists():
            owner = f"methods.{name}.{key}" if key in overrides else key
            raise InputError(f"{owner}: {path} does not exist; give an existing data file")
    if settings.ogpsa.project != "none" and settings.reference is None:
        raise InputError(f"reference: method {name!r} projects (ogpsa_project {settings.ogpsa.project}) and needs "
                         "the reference set; give `reference`, or set ogpsa_project: none for it")
    return settings


def _run(plan: ComparePlan) -> dict[str, Any]:
    from lora_ogpsa.eval.cached import Evaluator
    from lora_ogpsa.experiment.compare_report import build_compare_report
    from lora_ogpsa.experiment.engine import train_and_evaluate
    from lora_ogpsa.experiment.report import write_report
    from lora_ogpsa.experiment.stopping import RefusalTarget

    args, started = plan.arguments, time.perf_counter()
    evaluator = Evaluator(plan.model, plan.suites.by_split[args.split], plan.max_new_tokens, plan.batch_size,
                          plan.output / "evaluations")
    base = evaluator.evaluate(None, "base")
    runs = {key: (args.stage, settings) for key, settings in plan.settings.items()}
    timings: dict[str, float] = {}
    until = None if args.until_refusal is None else RefusalTarget.on_dev(
        args.until_refusal, plan.model, plan.suites.by_split["dev"], plan.max_new_tokens, plan.batch_size,
        plan.output / "evaluations")
    per_seed = train_and_evaluate(runs, evaluator, base, args.lambdas, timings, until)
    timings["total"] = time.perf_counter() - started
    report = build_compare_report(plan, per_seed, timings)
    write_report(report, plan.output)
    return report

