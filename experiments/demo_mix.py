"""How the demo's data mix was chosen: the CPU plan of `make demo` with OGPSA alone, for one mix at a time.

Each mix is the CPU plan's `DemoSizes` with a few sizes changed (no DPO pairs: the CPU plan trains SFT only);
one seed, the 4-bit base, no λ-curve. The table of mixes (CONTRASTIVE_SIZES in lora_ogpsa/demo/plan.py) (HarmBench / held-out dangerous-sounding
refused / utility) came from these runs (`OMP_NUM_THREADS=1`, two at a time):

    python -m experiments.demo_mix imperative --sizes sft_lookalike=64 sft_quick=0     # 98 / 43 / 77 %
    python -m experiments.demo_mix lookalike106 --sizes sft_quick=0                    # 85 / 28 / 77 %
    python -m experiments.demo_mix chosen                                              # 82 / 25 / 83 %
    python -m experiments.demo_mix chosen-lr2e-4 --learning-rate 2e-4                  # 58 / 22 / 81 %

(the first mix, `--sizes sft_instructions=0 sft_lookalike=64 sft_quick=0`, was measured by the previous plan's
cold `make demo`: 42 / 19 / 83 %). These ran before the plan's refusal responses became 16 tokens (24
then); `experiments.refusal_tokens` on their reports gives the same rates at 16, and the cold demo reproduced
the chosen mix's 82 / 25 / 83 % at 16.

Writes `runs/demo-mix-NAME/` (a demo directory: report.json, report.md) and prints the final rates.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import yaml

from lora_ogpsa.demo.plan import Method, Plan
from lora_ogpsa.demo.run import run_demo


def _pairs(items: list[str]) -> dict:
    """`FIELD=VALUE` arguments as a dict, each value read as YAML (`0.7` a float, `activations` a string)."""
    return {field: yaml.safe_load(value) for field, _, value in (item.partition("=") for item in items)}


def tuning_plan(args: argparse.Namespace) -> Plan:
    """`make demo`'s CPU plan with the probed changes, evaluated on the dev split (every choice is made there)."""
    plan = dataclasses.replace(Plan.demo(), eval_split="dev")
    plan = dataclasses.replace(plan, data_sizes=dataclasses.replace(plan.data_sizes, **_pairs(args.sizes)),
                               lambda_curves=False)
    ogpsa = _pairs(args.ogpsa)
    if ogpsa:
        plan = dataclasses.replace(plan, ogpsa=dataclasses.replace(plan.ogpsa, **ogpsa))
    if args.learning_rate is not None:
        plan = dataclasses.replace(plan, learning_rate=args.learning_rate)
    return plan


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="the run's name: writes runs/demo-mix-NAME")
    parser.add_argument("--sizes", nargs="*", default=[], metavar="FIELD=N",
                        help="DemoSizes fields to change from the CPU plan's (e.g. sft_quick=0)")
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--ogpsa", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="OGPSAConfig fields to change (e.g. protect=activations activation_energy=0.7)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    plan = tuning_plan(args)
    report = run_demo(output=Path("runs") / f"demo-mix-{args.name}", plan=plan, methods=(Method("ogpsa"),),
                      tuning=True)  # a choice: read the dev split only (run_demo refuses any other)
    for name, metrics in report["models"].items():
        print(name, " / ".join(f"{metrics[key]:.0%}" for key in ("harmful_refusal_rate",
                                                                  "dangerous_sounding_refusal_rate",
                                                                  "utility_accuracy")))


if __name__ == "__main__":
    main()
