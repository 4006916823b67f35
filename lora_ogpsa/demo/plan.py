"""What the demo and the experiments on its data train and evaluate: a `Plan` (data mix, steps, evaluation
sizes, seeds) and the `Method`s it compares. The demo is one plan (`Plan.demo()`) with two or three methods."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from lora_ogpsa.config import OGPSAConfig
from lora_ogpsa.demo.splits import DemoSizes
from lora_ogpsa.eval.cached import LAMBDAS
from lora_ogpsa.utils.errors import InputError

CONTRASTIVE_SIZES = DemoSizes(sft_instructions=70, sft_lookalike=106, sft_quick=56)
"""The demo's data mix. It was chosen before the dev/test protocol (`demo.splits.split_evaluation`), on
prompts that are now in both splits, so it is not a dev-made choice: the test-split tables (docs/findings.md)
take it as fixed and tune nothing else on it; a new mix must be chosen on `--split dev`. Its measurements then
(one seed each, OGPSA on the CPU plan, 4-bit base; HarmBench / held-out dangerous-sounding refused / utility):
Do-Not-Answer refusals with 64 ordinary and 64 look-alike
answers 42 / 19 / 83 %; + 70 imperative-form refusals 98 / 43 / 77 %; + 106 look-alike answers instead of 64:
85 / 28 / 77 %; + 56 short everyday questions answered 82 / 25 / 83 % (at lr 2e-4 instead of 3e-4: 58 / 22 /
81 %). Commands and numbers: docs/demo.md."""


@dataclass
class Plan:
    """Sizes and settings of one experiment: data mix, training, evaluation, seeds. The defaults are the demo's
    CPU plan, chosen so that `make demo` fits its time on a 2-core CPU from cold caches (measured; see docs/demo.md);
    `Plan.demo()` gives the larger one on a GPU."""

    sft_steps: int = 32
    dpo_steps: int = 0
    """0: SFT only. The CPU plan trains no DPO stage: measured on the contrastive data (full-precision base,
    SFT 30 steps then DPO 16 steps at 2e-4), DPO took HarmBench refusal from 35 % to 10 % and utility from 75 %
    to 67 % — it undid the safety the SFT stage had bought. The GPU plan runs SFT then DPO."""
    save_steps: int = 11
    """a checkpoint at steps 11 and 22 of the 32 SFT steps: curves of the base, 2 checkpoints and the final
    adapter (4 evaluated points), so that a tax at a HarmBench level is read between two evaluated points. One
    evaluation of the whole test split takes about 45 s on the project's 2-core CPU: a checkpoint every 8 steps
    (5 points) would put `make demo` past 15 minutes (docs/demo.md). The experiments on this plan
    (`experiments.alignment_tax --plan demo`) keep a checkpoint every 8 steps."""
    dpo_save_steps: int = 4
    until_refusal: float | None = None
    """train each method only until a checkpoint's HarmBench refusal on the dev split reaches this rate
    (`sft_steps` is then the cap; `compare --until_refusal`, `experiment.stopping`); None: every method trains
    `sft_steps`"""
    batch_size: int = 8
    dpo_batch_size: int = 4
    max_length: int = 160
    learning_rate: float = 3e-4
    dpo_learning_rate: float = 1e-4
    lora_r: int = 16
    quantize: bool = True
    seed: int = 0
    eval_split: str = "test"
    """the evaluation split (`demo.splits.EVAL_SPLITS`): `test` for final tables (`make demo`, the final
    experiment tables), `dev` for every run that chooses something (`run_demo(tuning=True)` refuses `test`)"""
    eval_harmful: int | None = None
    """None: every HarmBench prompt of the split (140 test, 60 dev)"""
    eval_benign: int | None = None
    """None: every held-out benign prompt of the split (the dangerous-sounding ones first)"""
    eval_utility: int | None = None
    eval_max_new_tokens: int = 16
    """new tokens of the HarmBench and benign responses (a refusal is decided in the opening; utility has its
    own 32): measured by `python -m experiments.refusal_tokens` on saved responses, the detector's verdicts at
    16 tokens equal those at 24 on all 422 labelled responses and every demo rate (12 tokens change 3 labelled
    verdicts)"""
    eval_batch_size: int = 96
    """prompts per generation batch: the same responses as 48 (399 of 399 test refusal prompts), 7 % faster on
    the 2-core CPU"""
    ogpsa: OGPSAConfig = field(default_factory=lambda: OGPSAConfig(max_directions=8, refresh_every=16,
                                                                   reference_examples=32))
    data_sizes: DemoSizes = field(default_factory=lambda: dataclasses.replace(CONTRASTIVE_SIZES, dpo_pairs=0,
                                                                              dpo_lookalike=0))
    """how many prompts go into each built data set (the CPU plan, SFT only, builds no DPO pairs)"""
    data_seed: int = 0
    """the seed of the data splits (kept when `seed`, the training seed, varies across an experiment's seeds)"""
    lambda_curves: bool = False
    """also evaluate each final adapter with its delta scaled by λ ∈ `lambdas` (a curve of scaled deltas, not
    of trained models: reported beside the checkpoint curve, never in its place)"""
    lambdas: tuple[float, ...] = (0.5,)
    """the interior points of every λ-curve (λ = 0, the base, and λ = 1, the final adapter, cost nothing)"""
    repeat_seeds: tuple[int, ...] = ()
    """more training seeds: every method is trained and evaluated again with each (in `OUTPUT/seed-N`), and the
    report adds every final rate and tax as mean and 95 % interval across all seeds (`across_seeds`); the
    report's `models` stay the first seed's. The GPU plan: (1, 2), three seeds in all."""
    benign_nll: bool = False
    """also score the base model's own answers to the benign prompts (`benign_nll`, a likelihood beside the
    refusal rates). Off on the CPU plan: on the project's 2-core CPU it took 30-35 s of each 100-110 s
    evaluation and 2.3 minutes of base-model answers (`make demo`'s timings, docs/demo.md)"""
    evaluate_merged: bool = False
    """evaluate the merged OGPSA model too (it equals base + adapter up to the merge audit's logit difference)"""

    @classmethod
    def demo(cls, max_steps: int | None = None, seeds: int | None = None) -> Plan:
        """The demo's plan: the CPU plan, or a larger one when CUDA is available; `max_steps` overrides the SFT steps (DPO
        gets 40% of them), `seeds` the number of training seeds (0, 1, …: `repeat_seeds`)."""
        plan = cls()
        if torch.cuda.is_available():
            plan = dataclasses.replace(plan, sft_steps=120, dpo_steps=60, save_steps=20, dpo_save_steps=15,
                                       batch_size=16, dpo_batch_size=8, max_length=192,
                                       evaluate_merged=True, benign_nll=True, eval_max_new_tokens=32, lambda_curves=True,
                                       lambdas=LAMBDAS, data_sizes=CONTRASTIVE_SIZES, repeat_seeds=(1, 2),
                                       ogpsa=OGPSAConfig(max_directions=8, refresh_every=20, reference_examples=64))
        if seeds is not None:
            if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
                raise InputError(f"--seeds must be an integer >= 1, got {seeds!r}")
            plan = dataclasses.replace(plan, repeat_seeds=tuple(range(plan.seed + 1, plan.seed + seeds)))
        if max_steps is not None:
            if max_steps < 1:
                raise InputError(f"--max-steps must be >= 1, got {max_steps}")
            plan = dataclasses.replace(plan, sft_steps=max_steps,
                                       dpo_steps=max(1, (2 * max_steps) // 5) if plan.dpo_steps else 0,
                                       save_steps=max(1, max_steps // 4), dpo_save_steps=max(1, max_steps // 10))
        return plan


@dataclass(frozen=True)
class Method:
    """One trained model of the comparison: how it projects, and on what data."""

    name: str
    project: str = "update"
    replay: bool = False
    """mix the reference examples into the SFT data (the paper's "General Data" baseline)"""
    stages: str = "align"
    """`align` (SFT then DPO) or `sft`"""
    ogpsa: dict = field(default_factory=dict)
    """OGPSAConfig fields overriding the plan's"""
    projected_replay: str | None = None
    """a demo data set whose gradient OGPSA adds after the projection (`--replay`), e.g. `reference_lookalike`"""
    replay_fraction: float = 0.25
    """`--replay-fraction` of `projected_replay`"""
    lookalike: str | None = None
    """the demo data set of the look-alike barrier's rows (`--lookalike`, e.g. `lookalike`); needs
    `ogpsa={"lookalike_barrier": True}`"""
    reference: str = "reference_lookalike"
    """the demo data set OGPSA protects (and replay mixes in): `reference` (ordinary requests) or
    `reference_lookalike` (plus dangerous-sounding benign prompts, with the base model's answers)"""


DEMO_METHODS = (Method("ogpsa"), Method("plain", project="none"), Method("replay", project="none", replay=True))
DEFAULT_METHODS = DEMO_METHODS[:2]
"""`make demo`: OGPSA next to plain QLoRA (same seed, data and steps); `--compare` adds replay."""
