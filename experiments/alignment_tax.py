"""Does OGPSA reduce the alignment tax at matched safety? Trajectories of plain QLoRA, replay and OGPSA variants.

Every variant trains the same SFT run (same seed, data, steps, learning rate) on SmolLM2-135M-Instruct in
4-bit, saving a checkpoint every `--save-steps`; every checkpoint is evaluated (HarmBench refusal, benign
over-refusal, utility, benign-answer NLL), and the report compares the variants where their trajectories
reach the same HarmBench refusal. Results are cached: rerunning with more variants only trains the new ones.

    python -m experiments.alignment_tax --output runs/tax                       # the default variant set
    python -m experiments.alignment_tax --output runs/tax --variants plain ogpsa-k32-open

Variants (name: what differs from plain QLoRA):
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from lora_ogpsa.config import OGPSAConfig
from lora_ogpsa.demo import DemoPlan, Method, run_demo
from lora_ogpsa.demo.report import final_table, interpolate_at, matched_table

OPENING = {"opening_tokens": 4, "later_token_weight": 0.25}
VARIANTS = {
    "plain": Method("plain", project="none", stages="sft"),
    "replay": Method("replay", project="none", replay=True, stages="sft"),
    "grad-k8": Method("grad-k8", project="grad", stages="sft", ogpsa={"max_directions": 8}),
    "ogpsa-k8": Method("ogpsa-k8", stages="sft", ogpsa={"max_directions": 8}),
    "ogpsa-k32": Method("ogpsa-k32", stages="sft", ogpsa={"max_directions": 32}),
    "ogpsa-e95": Method("ogpsa-e95", stages="sft", ogpsa={"max_directions": 64, "energy": 0.95}),
    "ogpsa-k8-open": Method("ogpsa-k8-open", stages="sft", ogpsa={"max_directions": 8, **OPENING}),
    "ogpsa-k32-open": Method("ogpsa-k32-open", stages="sft", ogpsa={"max_directions": 32, **OPENING}),
    "ogpsa-k8-1s": Method("ogpsa-k8-1s", stages="sft", ogpsa={"max_directions": 8, "one_sided": True}),
    "ogpsa-k32-open-1s": Method("ogpsa-k32-open-1s", stages="sft",
                                ogpsa={"max_directions": 32, "one_sided": True, **OPENING}),
    "ogpsa-k8-1s-replay": Method("ogpsa-k8-1s-replay", stages="sft", replay=True,
                                 ogpsa={"max_directions": 8, "one_sided": True}),
    "ogpsa-k32-open-r5": Method("ogpsa-k32-open-r5", stages="sft",
                                ogpsa={"max_directions": 32, "refresh_every": 5, **OPENING}),
}
__doc__ += "".join(f"- {name}: project={m.project}, replay={m.replay}, {m.ogpsa}\n" for name, m in VARIANTS.items())
DEFAULT = ("plain", "replay", "ogpsa-k8", "grad-k8", "ogpsa-k32-open", "ogpsa-k32", "ogpsa-e95", "ogpsa-k8-open")


def plan(args: argparse.Namespace) -> DemoPlan:
    """The SFT plan shared by every variant."""
    return dataclasses.replace(
        DemoPlan(), sft_steps=args.steps, save_steps=args.save_steps, learning_rate=args.learning_rate,
        seed=args.seed, eval_harmful=64, eval_benign=64, eval_utility=46, eval_max_new_tokens=24,
        ogpsa=OGPSAConfig(max_directions=8, refresh_every=10, reference_examples=64))


def by_variant_table(report: dict, levels=(0.3, 0.4, 0.45, 0.5)) -> str:
    """One row per variant: utility / over-refusal / benign NLL where its trajectory first reaches each
    harmful-refusal level (— where it never does)."""
    lines = ["| variant | " + " | ".join(f"at {level:.0%} harmful refused" for level in levels) + " |",
             "|---|" + "---|" * len(levels)]
    for name, points in report["trajectories"].items():
        cells = []
        for level in levels:
            values = [interpolate_at(points, level, metric)
                      for metric in ("utility_accuracy", "over_refusal_rate", "benign_nll")]
            cells.append("—" if None in values else f"{values[0]:.0%} / {values[1]:.0%} / {values[2]:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/tax"))
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(DEFAULT))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--save-steps", type=int, default=5)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="a local model directory instead of the embedded SmolLM2-135M-Instruct")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    methods = tuple(VARIANTS[name] for name in args.variants)
    report = run_demo(output=args.output, model=args.model, plan=plan(args), methods=methods)
    print("\nFinal checkpoints\n\n" + final_table(report))
    print("\nAt matched safety (utility / over-refusal)\n\n" + matched_table(report))
    table = by_variant_table(report)
    (args.output / "by_variant.md").write_text(table + "\n")
    print("\nEach variant where it reaches a harmful-refusal level (utility / over-refusal / benign NLL)\n\n" + table)


if __name__ == "__main__":
    main()
