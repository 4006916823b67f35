"""Does OGPSA reduce the alignment tax at matched safety? Plain QLoRA, replay and OGPSA variants, across seeds.

Every variant trains the same SFT run (same data, steps, learning rate; the training seed varies across
`--seeds`, the data split does not) on SmolLM2-135M-Instruct in 4-bit, saving a checkpoint every
`--save-steps`. Every checkpoint and the final adapter scaled by λ ∈ {0.25, 0.5, 0.75} (the λ-curve) is
evaluated: HarmBench refusal, over-refusal of the held-out benign set and of its dangerous-sounding part,
utility, benign-answer NLL, each with a 95 % bootstrap interval over prompts. The summary is the alignment tax
at matched safety — utility lost + over-refusal gained against the base, in points, where a curve first
reaches a HarmBench refusal level — as mean and 95 % t-interval across seeds; a level a curve does not reach
in every seed is absent. Results are cached: rerunning with more variants or seeds only trains what is new.

    python -m experiments.alignment_tax --seeds 0 1 2                        # the default variant set
    python -m experiments.alignment_tax --seeds 0 --variants plain ogpsa-k8 --output runs/tax-quick
    python -m experiments.alignment_tax --plan demo --seeds 0 1 2 --lambdas 0.5 1.5 \
        --variants plain ogpsa-k8-lookalike replay-lookalike ogpsa-k8-lookalike-replay  # make demo's plan, 4-bit

Writes `--output/seed-N/` (each a demo directory with report.json) and `--summary` (default
experiments/results/alignment_tax.json, plus the Markdown table next to it).

Variants (name: what differs from plain QLoRA):
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
from pathlib import Path

# Everything a run needs is imported now: the code a long experiment runs is the code it started with, even
# if the files change meanwhile (a lazy import half-way would mix two versions).
import lora_ogpsa.demo.evaluator
import lora_ogpsa.export.merge
import lora_ogpsa.train.run  # noqa: F401
from lora_ogpsa.config import OGPSAConfig
from lora_ogpsa.demo.evaluator import LAMBDAS
from lora_ogpsa.demo.plan import CONTRASTIVE_SIZES, Method, Plan
from lora_ogpsa.demo.run import run_demo
from lora_ogpsa.demo.splits import DemoSizes
from lora_ogpsa.experiment import stats
from lora_ogpsa.experiment.report import stops_markdown
from lora_ogpsa.experiment.stats import PAIRED_METRICS, SAFETY_LEVELS, across_seeds
from lora_ogpsa.utils.files import write_json

OPENING = {"opening_tokens": 4, "later_token_weight": 0.25}
ORDINARY = "reference"  # the reference set without the dangerous-sounding prompts
def _barrier(name: str, floor: float, *, project: str = "none", stages: str = "sft", **settings) -> Method:
    """A variant with the look-alike barrier at floor τ = `floor` on the demo's `lookalike` rows (`settings`: other
    OGPSAConfig fields of the barrier)."""
    return Method(name, project=project, stages=stages, lookalike="lookalike",
                  ogpsa={"lookalike_barrier": True, "barrier_floor": floor, **settings})


VARIANTS = {
    "plain": Method("plain", project="none", stages="sft"),
    "replay": Method("replay", project="none", replay=True, stages="sft", reference=ORDINARY),
    "replay-lookalike": Method("replay-lookalike", project="none", replay=True, stages="sft"),
    "ogpsa-k8": Method("ogpsa-k8", stages="sft", ogpsa={"max_directions": 8}, reference=ORDINARY),
    "ogpsa-k8-replay": Method("ogpsa-k8-replay", project="grad", stages="sft", ogpsa={"max_directions": 8}, reference=ORDINARY,
                              projected_replay="reference_lookalike"),
    "ogpsa-k8-lookalike": Method("ogpsa-k8-lookalike", stages="sft", ogpsa={"max_directions": 8}),
    "grad-k8": Method("grad-k8", project="grad", stages="sft", ogpsa={"max_directions": 8}, reference=ORDINARY),
    "ogpsa-k32-lookalike": Method("ogpsa-k32-lookalike", stages="sft", ogpsa={"max_directions": 32}),
    "ogpsa-k8-open-lookalike": Method("ogpsa-k8-open-lookalike", stages="sft",
                                      ogpsa={"max_directions": 8, **OPENING}),
    "act90-lookalike": Method("act90-lookalike", stages="sft",
                              ogpsa={"protect": "activations", "activation_energy": 0.9}),
    "act90-opening-lookalike": Method("act90-opening-lookalike", stages="sft",
                                      ogpsa={"protect": "activations", "activation_energy": 0.9,
                                             "activation_positions": "opening"}),
    "act50-lookalike": Method("act50-lookalike", stages="sft",
                              ogpsa={"protect": "activations", "activation_energy": 0.5}),
    "act70-lookalike": Method("act70-lookalike", stages="sft",
                              ogpsa={"protect": "activations", "activation_energy": 0.7}),
    "act99-lookalike": Method("act99-lookalike", stages="sft",
                              ogpsa={"protect": "activations", "activation_energy": 0.99}),
    "both-k8-act90-lookalike": Method("both-k8-act90-lookalike", stages="sft",
                                      ogpsa={"protect": "both", "max_directions": 8, "activation_energy": 0.9}),
    "ogpsa-k8-lookalike-replay": Method("ogpsa-k8-lookalike-replay", project="grad", stages="sft", ogpsa={"max_directions": 8},
                                        projected_replay="reference_lookalike"),
    "ogpsa-k8-lookalike-replay50": Method("ogpsa-k8-lookalike-replay50", project="grad", stages="sft", ogpsa={"max_directions": 8},
                                          projected_replay="reference_lookalike", replay_fraction=0.5),
    "plain-align": Method("plain-align", project="none", stages="align"),
    "ogpsa-k8-lookalike-align": Method("ogpsa-k8-lookalike-align", stages="align", ogpsa={"max_directions": 8}),
    # the demo's methods (`demo.plan.DEMO_METHODS`, SFT only) and the refusal-margin objective (issue 25)
    "demo-plain": Method("plain", project="none", stages="sft"),
    "demo-replay": Method("replay", project="none", replay=True, stages="sft"),
    "demo-ogpsa": Method("ogpsa", stages="sft"),
    "margin": Method("margin", stages="sft", ogpsa={"reference_objective": "refusal_margin"}),
    "margin-both": Method("margin-both", stages="sft", ogpsa={"reference_objective": "both"}),
    "margin-onesided": Method("margin-onesided", stages="sft",
                              ogpsa={"reference_objective": "refusal_margin", "one_sided": True}),
    "margin-t2": Method("margin-t2", stages="sft", ogpsa={"reference_objective": "refusal_margin", "margin_tokens": 2}),
    "margin-t8": Method("margin-t8", stages="sft", ogpsa={"reference_objective": "refusal_margin", "margin_tokens": 8}),
    # SFT then DPO (`--dpo-steps N`): the demo's OGPSA and the margin objective through both stages
    "demo-ogpsa-align": Method("ogpsa-align", stages="align"),
    "margin-align": Method("margin-align", stages="align", ogpsa={"reference_objective": "refusal_margin"}),
    "margin-t2-align": Method("margin-t2-align", stages="align",
                              ogpsa={"reference_objective": "refusal_margin", "margin_tokens": 2}),
    "margin-t8-align": Method("margin-t8-align", stages="align",
                              ogpsa={"reference_objective": "refusal_margin", "margin_tokens": 8}),
    "margin-both-align": Method("margin-both-align", stages="align", ogpsa={"reference_objective": "both"}),
    "margin-onesided-align": Method("margin-onesided-align", stages="align",
                                    ogpsa={"reference_objective": "refusal_margin", "one_sided": True}),
    # the look-alike barrier (`--lookalike_barrier`): τ the margin floor, on plain QLoRA and on the demo's OGPSA
    **{f"barrier-t{floor:g}": _barrier(f"barrier-t{floor:g}", floor) for floor in (-3.0, -2.0, -1.0, 0.0, 2.0, 4.0)},
    **{f"ogpsa-barrier-t{floor:g}": _barrier(f"ogpsa-barrier-t{floor:g}", floor, project="update")
       for floor in (-3.0, -2.0, -1.0, 0.0, 2.0, 4.0)},
    # τ = 1e6: every margin is below the floor, so none may fall to first order (one-sided, no room)
    "barrier-nofall": _barrier("barrier-nofall", 1e6),
    "barrier-t-3-k05": _barrier("barrier-t-3-k05", -3.0, barrier_step_share=0.5),
    # the refresh period of the look-alike gradients (default 4) and n_L, the rows constrained (default 48; the
    # demo's bank holds 96), at τ = −3
    **{f"barrier-t-3-r{every}": _barrier(f"barrier-t-3-r{every}", -3.0, barrier_refresh_every=every)
       for every in (1, 16)},
    **{f"barrier-t-3-n{rows}": _barrier(f"barrier-t-3-n{rows}", -3.0, lookalike_examples=rows) for rows in (24, 96)},
    # SFT then DPO with the barrier in both stages (against `plain-align`)
    "barrier-t-3-align": _barrier("barrier-t-3-align", -3.0, stages="align"),
    "barrier-t2-k05": _barrier("barrier-t2-k05", 2.0, barrier_step_share=0.5),
    "act70-opening-lookalike": Method("act70-opening-lookalike", stages="sft",
                                      ogpsa={"protect": "activations", "activation_energy": 0.7,
                                             "activation_positions": "opening"}),
    "both-k8-act70-lookalike": Method("both-k8-act70-lookalike", stages="sft",
                                      ogpsa={"protect": "both", "max_directions": 8, "activation_energy": 0.7}),
}
__doc__ += "".join(f"- {name}: project={m.project}, replay={m.replay}, reference={m.reference}, {m.ogpsa}"
                   + (f", replay after the projection: {m.projected_replay} at F = {m.replay_fraction}"
                      if m.projected_replay else "") + (f", look-alike rows: {m.lookalike}" if m.lookalike else "") + "\n" for name, m in VARIANTS.items())
DEFAULT = ("plain", "replay", "ogpsa-k8", "ogpsa-k8-lookalike", "act90-lookalike")


DATA_MIXES = {"contrastive": DemoSizes(), "demo": CONTRASTIVE_SIZES}
"""`--data`: `contrastive`, the first contrastive mix (192 Do-Not-Answer refusals, 64 ordinary and 64
look-alike answers); `demo`, the demo's mix (also 70 imperative-form refusals, 106 look-alike answers, 56
short questions answered; `demo.plan.CONTRASTIVE_SIZES`). Both with DPO pairs (unused by SFT variants)."""


def plan(args: argparse.Namespace, seed: int) -> Plan:
    """The SFT plan shared by every variant (training seed `seed`, data seed 0)."""
    if args.plan == "demo":  # `make demo`'s CPU plan, one seed per call, with a checkpoint every 8 steps (the
        # demo evaluates fewer points to fit its time; every published table of this plan has one every 8)
        demo = dataclasses.replace(Plan.demo(), seed=seed, repeat_seeds=(), eval_split=args.split, save_steps=8)
        if args.max_steps:  # train to matched safety: every method to the same step cap, a checkpoint every 8
            demo = dataclasses.replace(demo, sft_steps=args.max_steps, save_steps=8)
        if args.until_refusal:  # train to matched safety: each method stops where its dev refusal reaches it
            demo = dataclasses.replace(demo, until_refusal=args.until_refusal)
        if args.dpo_steps:  # SFT then DPO (the `-align` variants), on the demo's mix with its DPO pairs built
            demo = dataclasses.replace(demo, dpo_steps=args.dpo_steps, dpo_save_steps=args.dpo_steps,
                                       data_sizes=CONTRASTIVE_SIZES)
        return dataclasses.replace(demo, lambdas=tuple(args.lambdas)) if args.lambdas else demo
    return dataclasses.replace(
        Plan(), sft_steps=args.steps, save_steps=args.save_steps, learning_rate=args.learning_rate,
        batch_size=args.batch_size, max_length=args.max_length,
        seed=seed, data_seed=0, eval_split=args.split, eval_harmful=args.eval_harmful, eval_utility=args.eval_utility,
        eval_max_new_tokens=args.eval_tokens, quantize=not args.full_precision,
        lambdas=tuple(args.lambdas or LAMBDAS),
        dpo_steps=8, dpo_save_steps=4,  # unused by these SFT variants, but in every run's fingerprint: pinned
        data_sizes=DATA_MIXES[args.data],
        # sketch_rows 32 (exact at S = 32): the default before it became 2k, pinned so the cached runs stay valid
        ogpsa=OGPSAConfig(max_directions=8, refresh_every=10, reference_examples=32, sketch_rows=32))


def merged_report(paths: list[Path], variants: list[str]) -> dict:
    """One seed's report of `variants` (and the base) from the reports of processes that trained different
    variants on the same plan."""
    report: dict = {}
    found = [path for path in paths if path.is_file()]  # a process may have trained only some seeds
    if not found:
        raise SystemExit(f"no report among {', '.join(map(str, paths))}")
    for path in found:
        part = json.loads(path.read_text())
        for key in ("models", "trajectories", "lambda_curves"):
            report.setdefault(key, {}).update({name: value for name, value in part[key].items()
                                               if name in variants or name == "base"})
        for seed, stops in part.get("stops", {}).items():  # trained to a dev target: where each run stopped
            report.setdefault("stops", {}).setdefault(seed, {}).update(
                {name: value for name, value in stops.items() if name in variants})
    missing = sorted(set(variants) - set(report["models"]))
    if missing:
        raise SystemExit(f"no report of {', '.join(missing)} among {', '.join(map(str, found))}")
    return report


def markdown(summary: dict) -> str:
    """The tax table (mean [95 % CI] across seeds) and the final models' rates."""
    levels = [f"{level:g}" for level in summary["levels"]]
    lines = [f"Evaluation split: **{summary.get('split', 'unsplit')}**", "",
             f"Alignment tax at matched safety (points; mean [95 % CI] over seeds {summary['seeds']}; — : not "
             "reached in every seed)", "", "| curve | " + " | ".join(f"{float(lv):.0%} HarmBench refused"
                                                                    for lv in levels) + " |",
             "|---|" + "---|" * len(levels)]
    for name, row in summary["tax"].items():
        cells = []
        for level in levels:
            found = row.get(level)
            ci = found and found["ci"]
            cells.append("—" if not found else f"{found['mean']:.0f}" + (f" [{ci[0]:.0f}, {ci[1]:.0f}]" if ci else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Final models (mean over seeds)", "",
              "| model | HarmBench refused | dangerous-sounding refused | over-refusal | utility |", "|---|---|---|---|---|"]
    for name, rates in summary["finals"].items():
        cells = [f"{rates[key]['mean']:.0%}" if rates[key]["mean"] is not None else "–"
                 for key in ("harmful_refusal_rate", "dangerous_sounding_refusal_rate", "over_refusal_rate",
                             "utility_accuracy")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines + paired_markdown(summary.get("paired", {}), levels)
                     + crossings_markdown(summary.get("crossings", {}), levels)
                     + lookalike_markdown(summary.get("lookalike_at_levels", {}), levels)
                     + stops_markdown({"stops": summary.get("stops")})) + "\n"


def crossings(reports: dict[int, dict], levels: list[float]) -> dict:
    """Per method and seed: the checkpoint where the curve first reaches each HarmBench level (None: never, the
    method stopped at the step cap below it) and the highest refusal on the curve."""
    found: dict = {}
    for seed, report in reports.items():
        for name, curve in report["trajectories"].items():
            rates = [(point["label"], point["harmful_refusal_rate"]) for point in curve]
            found.setdefault(name, {})[str(seed)] = {
                "highest": max(rate for _, rate in rates),
                "first_reaching": {f"{level:g}": next((label for label, rate in rates if rate >= level), None)
                                   for level in levels}}
    return found


def crossings_markdown(found: dict, levels: list[str]) -> list[str]:
    """Where each method's curve first reaches each level, per seed; `cap` when it never does."""
    if not found:
        return []
    lines = ["", "Where each curve first reaches a level (checkpoint; `cap`: not reached by the step cap)", "",
             "| method | seed | highest HarmBench refused | " + " | ".join(f"{float(lv):.0%}" for lv in levels) + " |",
             "|---|---|---|" + "---|" * len(levels)]
    for name, by_seed in found.items():
        for seed, row in by_seed.items():
            cells = [row["first_reaching"].get(level) or "cap" for level in levels]
            lines.append(f"| {name} | {seed} | {row['highest']:.0%} | " + " | ".join(cells) + " |")
    return lines


def lookalike_at_levels(reports: dict[int, dict], names: list[str], levels: list[float]) -> dict:
    """Per method and level: the look-alike (dangerous-sounding benign) refusal rate where each seed's curve first
    reaches the HarmBench level (`stats.interpolate_at`), and its mean when every seed reaches it."""
    found: dict = {}
    for name in names:
        for level in levels:
            rates = [stats.interpolate_at(report["trajectories"][name], level, "dangerous_sounding_refusal_rate")
                     for report in reports.values()]
            mean = None if None in rates else sum(rates) / len(rates)
            found.setdefault(name, {})[f"{level:g}"] = {"mean": mean, "per_seed": rates}
    return found


def lookalike_markdown(found: dict, levels: list[str]) -> list[str]:
    """The look-alike refusal at matched HarmBench refusal, as Markdown lines (none without it)."""
    if not found:
        return []
    lines = ["", "Look-alike refusal where each curve first reaches the level (mean over seeds; — : some seed's curve "
             "does not reach it)", "", "| method | " + " | ".join(f"{float(lv):.0%}" for lv in levels) + " |",
             "|---|" + "---|" * len(levels)]
    for name, by_level in found.items():
        cells = ["—" if by_level.get(level, {}).get("mean") is None else f"{by_level[level]['mean']:.1%}"
                 for level in levels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def paired_markdown(paired: dict, levels: list[str]) -> list[str]:
    """The paired differences against plain QLoRA, as Markdown lines (none without them)."""
    if not paired:
        return []
    lines = ["", "Paired difference, method − plain QLoRA, at matched HarmBench refusal (points; mean over seeds "
             "[95 % hierarchical bootstrap over seeds and prompts, the HarmBench crossing included]; negative: "
             "less tax than plain; — : some seed's curve does not reach the level)", "",
             "| method | level | tax | utility lost | over-refusal gained | look-alike refusal gained |",
             "|---|---|---|---|---|---|"]
    for name, by_level in paired.items():
        for level in levels:
            cells = []
            for metric in PAIRED_METRICS:
                found = by_level.get(level, {}).get(metric)
                cells.append("—" if not found else f"{found['mean']:+.1f} [{found['ci'][0]:+.1f}, {found['ci'][1]:+.1f}]")
            lines.append(f"| {name} | {float(level):.0%} | " + " | ".join(cells) + " |")
    return lines


PLAIN_BASELINES = ("plain", "plain-align")
"""What the other methods are paired against: plain QLoRA, SFT only or SFT then DPO (the first one present)."""


def paired_differences(reports: dict[int, dict], names: list[str], levels: list[float]) -> dict:
    """Every method minus plain QLoRA (`plain`, else `plain-align`), per level and metric:
    `stats.paired_differences` over the seeds' checkpoint curves (hierarchical bootstrap over seeds and
    prompts)."""
    baseline = next((name for name in PLAIN_BASELINES if name in names), None)
    if baseline is None:
        return {}
    curves = {seed: report["trajectories"] for seed, report in reports.items()}
    return stats.paired_differences(curves, names, baseline, levels, PAIRED_METRICS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/tax"))
    parser.add_argument("--summary", type=Path, default=Path("experiments/results/alignment_tax.json"))
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(DEFAULT))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--split", choices=("dev", "test"), default="dev",
                        help="the evaluation split: `dev` for every screen that chooses something (the default), "
                             "`test` only for a final table of choices already made on dev")
    parser.add_argument("--plan", choices=("experiment", "demo"), default="experiment",
                        help="`experiment`: the plan the options below set; `demo`: `make demo`'s CPU plan exactly "
                             "(4-bit, its data mix, steps, λ = 0.5, evaluation sizes; the options below ignored), "
                             "so that the demo's trained runs are reused")
    parser.add_argument("--dpo-steps", type=int, default=0,
                        help="with --plan demo: a DPO stage of this many steps after SFT for the `-align` variants "
                             "(the demo's mix with its DPO pairs; one checkpoint, at the end)")
    parser.add_argument("--max-steps", type=int, default=0,
                        help="with --plan demo: the SFT step cap of every method instead of the demo's 32 (a "
                             "checkpoint every 8), so that a method that learns to refuse slowly still has a curve "
                             "through the levels it reaches by the cap")
    parser.add_argument("--until-refusal", type=float, default=None,
                        help="with --plan demo: train each method only until a checkpoint's HarmBench refusal on the "
                             "dev split reaches this rate (--max-steps, or the demo's 32, is then the cap; "
                             "`compare --until_refusal`); the report says where each run stopped")
    parser.add_argument("--data", choices=sorted(DATA_MIXES), default="contrastive",
                        help="the data mix (see DATA_MIXES)")
    parser.add_argument("--eval-tokens", type=int, default=24,
                        help="new tokens of the refusal responses (16 gives the same verdicts: experiments.refusal_tokens)")
    parser.add_argument("--eval-harmful", type=int, help="HarmBench prompts evaluated (default: the split's 60 dev "
                                                             "or 140 test)")
    parser.add_argument("--eval-utility", type=int, help="utility questions evaluated (default: the split's 40 dev or "
                                                         "96 test)")
    parser.add_argument("--lambdas", nargs="+", type=float,
                        help="the λ-curves' points besides 0 and 1 (the plan's by default: 0.25 0.5 0.75, the demo "
                             "plan's 0.5); above 1 the final delta is amplified, continuing the curve past it")
    parser.add_argument("--levels", nargs="+", type=float, default=list(SAFETY_LEVELS),
                        help="HarmBench refusal levels at which the tax is read")
    parser.add_argument("--summarise-only", action="store_true",
                        help="train nothing: summarise the seeds' finished reports (`--output`/seed-N/report.json)")
    parser.add_argument("--also", nargs="+", type=Path, default=[],
                        help="with --summarise-only: more output directories whose seeds' reports (other variants, "
                             "trained by another process) join --output's")
    parser.add_argument("--full-precision", action="store_true",
                        help="full-precision base (faster research sweeps on a CPU; confirm on 4-bit)")
    parser.add_argument("--model", help="a local model directory instead of the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--cache-dir", help="where the embedded model and the built data live (as `lora-ogpsa demo "
                                            "--cache-dir`; every run's fingerprint holds their paths)")
    return parser


def chosen_methods(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Method, ...]:
    """The `--variants`' methods; two variants whose runs would share a directory are refused (`replay` and
    `demo-replay` are both run as `replay`, with different reference sets)."""
    methods = tuple(VARIANTS[name] for name in args.variants)
    runs: dict[str, str] = {}
    for name, method in zip(args.variants, methods, strict=True):
        if runs.setdefault(method.name, name) != name:
            parser.error(f"--variants {runs[method.name]} and {name} both run as {method.name!r} in one --output; "
                         "run them into separate --output directories")
    return methods


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    methods = chosen_methods(parser, args)
    reports: dict[int, dict] = {}
    if args.summarise_only:  # e.g. seeds or variants trained by several processes side by side
        reports = {seed: merged_report([output / f"seed-{seed}" / "report.json"
                                        for output in (args.output, *args.also)],
                                       [VARIANTS[name].name for name in args.variants])
                   for seed in args.seeds}
        print(write_summary(args, reports))
        return
    for seed in args.seeds:  # the summary is rewritten after every seed: an interrupted run keeps what it did
        reports[seed] = run_demo(output=args.output / f"seed-{seed}", model=args.model, plan=plan(args, seed),
                                 methods=methods, cache_dir=args.cache_dir, evaluation_cache=args.output / "evaluations",
                                 tuning=args.split == "dev")
        table = write_summary(args, reports)
    print(table)


def write_summary(args: argparse.Namespace, reports: dict[int, dict]) -> str:
    """Write the summary JSON and Markdown of the seeds done so far; returns the Markdown table."""
    summary = {"command": "python -m experiments.alignment_tax " + shlex.join(sys.argv[1:]),
               "split": args.split, "seeds": list(reports), "seeds_asked": args.seeds, "variants": args.variants,
               "levels": list(args.levels),
               "plan": json.loads(json.dumps(dataclasses.asdict(plan(args, args.seeds[0])), default=str)),
               **{key: value for key, value in across_seeds(reports, args.levels).items() if key != "seeds"},
               "paired": paired_differences(reports, [VARIANTS[name].name for name in args.variants], args.levels),
               "crossings": crossings(reports, args.levels),
               "lookalike_at_levels": lookalike_at_levels(reports, [VARIANTS[name].name for name in args.variants],
                                                          args.levels),
               "stops": {seed: stops for report in reports.values() for seed, stops in report.get("stops", {}).items()},
               "per_seed": {str(seed): {key: report[key] for key in ("trajectories", "lambda_curves", "models")}
                            for seed, report in reports.items()}}
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.summary, summary)
    table = markdown(summary)
    args.summary.with_suffix(".md").write_text(f"`{summary['command']}`\n\n{table}")
    return table


if __name__ == "__main__":
    main()
