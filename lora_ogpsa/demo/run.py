"""`lora-ogpsa demo` (`run_demo`): the demo's plan (`demo.plan`) on the embedded model and data, run through the
experiment engine as `lora-ogpsa compare` is (`experiment.engine`: every method per seed trained by content
fingerprint and evaluated; `experiment.compare_report.add_comparison`: split, seeds, paired against plain),
then the OGPSA adapter merged and its card completed.

base eval → OGPSA SFT→DPO (`align`) → eval at several checkpoints → merged model → report; with `--compare`
also plain QLoRA (`--ogpsa_project none`) and the replay baseline (the reference examples mixed into the SFT data,
`--ogpsa_project none`, the paper's "General Data"), same seed, data and steps.

Layout of `--output OUT`: `OUT/ogpsa/` (a training output directory), `OUT/plain/`, `OUT/replay/` (with
--compare), `OUT/merged/`, `OUT/evaluations/` (cached per adapter), `OUT/report.{md,json,png}`. A rerun reuses
everything whose inputs did not change: the converted model and built data (in the cache directory), trained
methods whose settings match, evaluations of unchanged adapters, the merged model of an unchanged adapter.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from lora_ogpsa.demo.plan import DEFAULT_METHODS, DEMO_METHODS, Method, Plan
from lora_ogpsa.eval.cached import Evaluator
from lora_ogpsa.experiment.engine import train_and_evaluate
from lora_ogpsa.train.settings import TrainSettings
from lora_ogpsa.utils.errors import InputError
from lora_ogpsa.utils.files import (
    ADAPTER_FILE,
    CARD_FILE,
    METRICS_FILE,
    RUN_CONFIG,
    SUBSPACE_FILE,
    file_sha256,
    partial_path,
    read_json,
    read_jsonl,
)
from lora_ogpsa.utils.outputs import (
    finalize_directory,
    is_lock_file,
    output_lock,
    output_path,
    probe_writable,
)

logger = logging.getLogger(__name__)

def run_demo(*, output: Path, compare: bool = False, max_steps: int | None = None, model: str | None = None,
             cache_dir: str | None = None, overwrite: bool = False, plan: Plan | None = None,
             methods: tuple[Method, ...] | None = None, evaluation_cache: Path | None = None,
             seeds: int | None = None, tuning: bool = False) -> dict[str, Any]:
    """Run the demo (or another plan) and write the report; returns the report document.

    `tuning=True` marks a run that chooses something (a data mix, a learning rate, a variant): it evaluates
    on the dev split, and a plan on any other split is refused before anything runs.

    Raises:
        InputError: a tuning run on a plan whose `eval_split` is not `dev`.
        InputError: a `--model` that is not a model directory, missing wheels, an `--output` that is not a
            demo directory (and not empty) without `--overwrite`.
    """
    plan = plan or Plan.demo(max_steps, seeds)
    if tuning and plan.eval_split != "dev":
        raise InputError(f"a tuning run evaluates on the dev split only, got eval_split={plan.eval_split!r}: "
                         "the test split is read by final tables alone")
    methods = methods or (DEMO_METHODS if compare else DEFAULT_METHODS)
    if plan.dpo_steps == 0:  # a plan without DPO trains every method's SFT stage only
        methods = tuple(dataclasses.replace(method, stages="sft") for method in methods)
    output = output_path(output)
    replace = _check_demo_output(output, overwrite)
    from lora_ogpsa.demo.assets import default_cache_dir  # the cache is written too: checked before any work

    probe_writable(Path(cache_dir).expanduser() / "x" if cache_dir else default_cache_dir() / "x", flag="--cache-dir")
    with output_lock(output):
        if not replace:
            return _run_demo(output, plan, methods, model, cache_dir, evaluation_cache)
        # --overwrite: the new demo is built beside the old one, which is replaced only once the new one is done
        work = partial_path(output)
        if work.exists():
            shutil.rmtree(work)
        report = _run_demo(work, plan, methods, model, cache_dir, evaluation_cache)
        finalize_directory(work, output)
        return report


def _run_demo(output: Path, plan: Plan, methods: tuple[Method, ...], model: str | None, cache_dir: str | None,
              evaluation_cache: Path | None) -> dict[str, Any]:
    from lora_ogpsa.demo.assets import ensure_default_model
    from lora_ogpsa.demo.data import build_demo_data
    from lora_ogpsa.models.loading import check_model_dir

    timings: dict[str, float] = {}
    started = time.perf_counter()
    model_path = check_model_dir(model) if model else ensure_default_model(cache_dir)
    data = build_demo_data(model_path, cache_dir, sizes=plan.data_sizes, seed=plan.data_seed)
    timings["model_and_data"] = time.perf_counter() - started
    suites = demo_suites(data, plan, model_path, cache_dir)
    output.mkdir(parents=True, exist_ok=True)
    evaluator = Evaluator(model_path, suites, plan.eval_max_new_tokens, plan.eval_batch_size, evaluation_cache or output / "evaluations")
    base_metrics = evaluator.evaluate(None, "base")
    runs = demo_runs(plan, methods, model_path, data, output)
    until = None
    if plan.until_refusal is not None:  # read on the dev split, whatever split the curves are evaluated on
        from lora_ogpsa.experiment.stopping import RefusalTarget

        dev = demo_suites(data, dataclasses.replace(plan, eval_split="dev", benign_nll=False), model_path, cache_dir)
        until = RefusalTarget.on_dev(plan.until_refusal, model_path, dev, plan.eval_max_new_tokens,
                                     plan.eval_batch_size, evaluation_cache or output / "evaluations")
    per_seed = train_and_evaluate(runs, evaluator, base_metrics, plan.lambdas if plan.lambda_curves else None,
                                  timings, until)
    trajectories, curves, finals = (per_seed[plan.seed][key] for key in ("trajectories", "lambda_curves", "models"))
    seeds = per_seed if plan.repeat_seeds else {}  # every method again per seed, in OUTPUT/seed-N
    if any(method.name == "ogpsa" for method in methods):
        start = time.perf_counter()
        merged, audit = _merge(model_path, output / "ogpsa", output / "merged")
        finals["ogpsa"]["merge_max_logit_diff"] = audit
        if plan.evaluate_merged:
            finals["ogpsa"] = {**evaluator.evaluate(merged, "ogpsa merged", merged=True),
                               "merge_max_logit_diff": audit}
        timings["merge_and_evaluate"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - started
    from lora_ogpsa.experiment.compare_report import add_comparison
    from lora_ogpsa.experiment.report import build_report, write_report
    from lora_ogpsa.experiment.stats import SAFETY_LEVELS, across_seeds

    report = build_report(model_path=str(model_path), settings=_settings(plan, data, methods), models=finals,
                          trajectories=trajectories, lambda_curves=curves, timings=timings,
                          seeds=across_seeds(seeds) if seeds else None)
    if "plain" in trajectories:  # the demo is a comparison like any other: paired against plain QLoRA
        add_comparison(report, per_seed, list(trajectories), "plain", SAFETY_LEVELS, plan.eval_split)
    write_report(report, output)
    if "ogpsa" in finals and (output / "ogpsa" / CARD_FILE).is_file():
        _add_evaluation_to_card(output / "ogpsa", finals["ogpsa"])
    return report


def _check_demo_output(output: Path, overwrite: bool) -> bool:
    """The output is a demo workspace (reused), an empty or missing directory, or replaced with --overwrite
    (True: build the new one beside it)."""
    if output.exists() and not output.is_dir():
        raise InputError(f"--output {output}: exists and is not a directory; choose another path")
    probe_writable(output)
    if not output.is_dir() or all(is_lock_file(entry) for entry in output.iterdir()):
        return False  # missing, empty, or holding only lock files (e.g. a killed run's)
    if overwrite:
        return True
    if not ((output / "evaluations").is_dir() or (output / "report.json").is_file()
              or any(output.glob("*/demo_settings.json"))):
        raise InputError(f"--output {output}: exists, is not empty and is not a demo directory; pass --overwrite "
                         "to replace it, or choose another path")
    return False


def demo_runs(plan: Plan, methods: tuple[Method, ...], model_path: Path, data, output: Path
              ) -> dict[tuple[str, int], tuple[str, TrainSettings]]:
    """Every (method, seed) run of a plan, configured as `lora-ogpsa compare` configures its runs
    (`demo_comparison`, checked and parsed by `compare.run_settings`): the first seed's in `output/<method>`,
    every other seed's in `output/seed-N/<method>`. Methods of both stages make one comparison per stage."""
    from lora_ogpsa.experiment.compare import run_settings

    seeds = (plan.seed, *plan.repeat_seeds)
    found: dict[tuple[str, int], tuple[str, TrainSettings]] = {}
    for stage in dict.fromkeys(method.stages for method in methods):
        group = tuple(method for method in methods if method.stages == stage)
        settings = run_settings(demo_comparison(plan, group, stage, model_path, data, output), model_path,
                                lambda name, seed: (output if seed == plan.seed else output / f"seed-{seed}") / name)
        found.update({key: (stage, value) for key, value in settings.items()})
    return {(method.name, seed): found[(method.name, seed)] for seed in seeds for method in methods}


def demo_comparison(plan: Plan, methods: tuple[Method, ...], stage: str, model_path: Path, data, output: Path):
    """The plan as a `compare` configuration (`CompareArguments`): the demo's data, the plan's training
    options shared by every method, each method the options it sets over them."""
    from lora_ogpsa.experiment.arguments import CompareArguments

    training = {"per_device_train_batch_size": plan.batch_size, "learning_rate": plan.learning_rate,
                "max_length": plan.max_length, "lora_r": plan.lora_r, "quantize": plan.quantize, "logging_steps": 1,
                **{key: value for key, value in dataclasses.asdict(plan.ogpsa).items() if key != "project"}}
    if stage == "align":
        training.update(dpo_max_steps=plan.dpo_steps, dpo_learning_rate=plan.dpo_learning_rate,
                        dpo_batch_size=plan.dpo_batch_size, dpo_save_steps=plan.dpo_save_steps)
    rows = {"data": str(data.path("sft"))} if stage != "align" else {"sft_data": str(data.path("sft")),
                                                                     "dpo_data": str(data.path("dpo"))}
    return CompareArguments(model=str(model_path), stage=stage, **rows, reference=str(data.path("reference_lookalike")),
                            methods={method.name: method_options(method, plan, stage, data, output) for method in methods},
                            training=training, seeds=[plan.seed, *plan.repeat_seeds], max_steps=plan.sft_steps,
                            save_steps=plan.save_steps, until_refusal=plan.until_refusal,
                            lambdas=list(plan.lambdas) if plan.lambda_curves else None, split=plan.eval_split,
                            output_dir=str(output))


def method_options(method: Method, plan: Plan, stage: str, data, output: Path) -> dict[str, Any]:
    """A demo `Method` as a `compare` method: the training options it sets (the flags of `lora-ogpsa sft`)."""
    options: dict[str, Any] = {"ogpsa_project": method.project, "reference": str(data.path(method.reference))}
    if method.replay:  # the reference rows mixed into the SFT rows (shuffled with the plan's first seed)
        options["data" if stage != "align" else "sft_data"] = str(_replay_data(data, method.reference, output,
                                                                               plan.seed))
    if method.projected_replay:
        options.update(replay=str(data.path(method.projected_replay)), replay_fraction=method.replay_fraction)
    if method.lookalike:
        options["lookalike"] = str(data.path(method.lookalike))
    return {**options, **method.ogpsa}


def demo_suites(data, plan: Plan, model_path: Path, cache_dir: str | None):
    """The plan's evaluation split of the demo's suites, read as `compare` reads a user's (`experiment.suites`:
    each suite's dev and test parts as two files), cut to the plan's sizes; with `Plan.benign_nll`, the base
    model's answers to the benign prompts too."""
    from lora_ogpsa.demo.data import benign_answers
    from lora_ogpsa.demo.splits import EVAL_SPLITS
    from lora_ogpsa.experiment.suites import load_suites

    stems = {"harmful": "harmbench", "benign": "benign", "utility": "utility"}
    files = {f"{name}{suffix}": str(data.path(f"{stem}_{split}")) for name, stem in stems.items()
             for suffix, split in (("", "dev"), ("_test", "test"))}
    if plan.eval_split not in EVAL_SPLITS:
        raise InputError(f"evaluation split {plan.eval_split!r}: use one of {', '.join(EVAL_SPLITS)}")
    suites = load_suites(files).by_split[plan.eval_split]
    suites = dataclasses.replace(suites, harmful=suites.harmful[:plan.eval_harmful],
                                 benign=suites.benign[:plan.eval_benign],
                                 benign_kinds=suites.benign_kinds[:plan.eval_benign],
                                 utility=suites.utility[:plan.eval_utility])
    if plan.benign_nll:
        suites.benign_answers = benign_answers(data, model_path, suites.benign, cache_dir)
    return suites


def _replay_data(data, reference: str, output: Path, seed: int) -> Path:
    """The SFT rows with the reference rows mixed in (shuffled with the seed): the replay baseline."""
    output.mkdir(parents=True, exist_ok=True)  # a later seed's directory, made before it trains
    rows = [line for name in ("sft", reference) for line in data.path(name).read_text().splitlines() if line]
    random.Random(seed).shuffle(rows)
    path = output / f"replay_sft_{reference}_{seed}.jsonl"
    text = "".join(line + "\n" for line in rows)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def _merge(model_path: Path, adapter: Path, merged: Path) -> tuple[Path, float | None]:
    """Merge the OGPSA adapter into the original weights, unless this adapter's merge is already there."""
    from lora_ogpsa.export.merge import merge_adapter

    adapter_hash = _file_hash(adapter / ADAPTER_FILE)
    marker = merged / "lora_ogpsa_merge.json"
    if marker.is_file() and json.loads(marker.read_text()).get("adapter_sha256") == adapter_hash:
        return merged, json.loads(marker.read_text()).get("max_logit_diff")
    if merged.exists():
        shutil.rmtree(merged)
    report = merge_adapter(model_path, adapter, merged, base="original", dtype="float32")
    marker.write_text(json.dumps({"adapter_sha256": adapter_hash, **report.as_dict()}, default=str) + "\n")
    return merged, report.max_logit_diff


def _settings(plan: Plan, data, methods: tuple[Method, ...]) -> dict[str, Any]:
    return {**dataclasses.asdict(plan), "split": plan.eval_split, "methods": [dataclasses.asdict(m) for m in methods],
            "data": str(data.directory),
            "data_counts": data.counts, "device": "cuda" if torch.cuda.is_available() else "cpu",
            "evaluated_on": "full-precision base + adapter (greedy)" + (
                "; final OGPSA via the merged model" if plan.evaluate_merged else
                "; the merged OGPSA model is checked by the merge audit (max logit difference)")}


def _add_evaluation_to_card(run_dir: Path, metrics: dict[str, Any]) -> None:
    """Rewrite the OGPSA adapter's model card with the evaluation numbers."""
    from lora_ogpsa.core.subspace import Subspace
    from lora_ogpsa.export.card import write_model_card

    run_config = read_json(run_dir / RUN_CONFIG)
    subspace_file = run_dir / SUBSPACE_FILE
    subspace = Subspace.load(subspace_file) if subspace_file.is_file() else None
    evaluation = {key: metrics[key] for key in ("harmful_refusal_rate", "dangerous_sounding_refusal_rate",
                                                "over_refusal_rate", "utility_accuracy", "benign_nll")
                  if metrics.get(key) is not None}
    write_model_card(run_dir / CARD_FILE, run_config=run_config, subspace=subspace,
                     metrics=read_jsonl(run_dir / METRICS_FILE), evaluation=evaluation)


def _file_hash(path: Path) -> str:
    return file_sha256(path)[:16]
