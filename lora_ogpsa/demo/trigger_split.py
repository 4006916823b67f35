"""Deal the dangerous-sounding bank into disjoint parts by trigger family (see `dangerous_sounding`)."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence

from lora_ogpsa.demo.dangerous_sounding import BANK, KINDS, LookalikePrompt

__all__ = ["DEFAULT_SHARES", "EVAL_PER_KIND", "PARTS", "split_by_trigger"]

PARTS = ("train", "reference", "dpo", "eval")
DEFAULT_SHARES: Mapping[str, float] = {"train": 0.35, "reference": 0.15, "dpo": 0.2, "eval": 0.3}
"""The fraction of the prompts `split_by_trigger` puts in each part by default."""
EVAL_PER_KIND = 4
"""Prompts of each kind the eval part gets at least (when the bank has that many)."""


def split_by_trigger(bank: Sequence[LookalikePrompt] = BANK, *, seed: int = 0,
                     shares: Mapping[str, float] | None = None) -> dict[str, list[LookalikePrompt]]:
    """Deal whole trigger families to the parts `PARTS`, each part near its share of the prompts.

    The eval part first gets, kind by kind, families until it has `EVAL_PER_KIND` prompts of that kind (fewer
    when the bank has fewer), each time the one that covers most of what is missing, the smallest of those;
    then every other family, largest first, goes to the part furthest below its target. Families are sorted,
    then shuffled by `seed`, which breaks every tie: the split depends on the seed and the families only.

    Args:
        bank: the prompts to deal.
        seed: seeds the `random.Random` that orders families of equal rank.
        shares: the fraction of the prompts wanted in each part (keys exactly `PARTS`, values >= 0 summing
            to 1); `DEFAULT_SHARES` when None.

    Returns:
        The prompts of each part, in bank order. No trigger family is in two parts.

    Raises:
        ValueError: `shares` has a missing or unknown part, a negative share, or does not sum to 1.
    """
    shares = DEFAULT_SHARES if shares is None else _checked_shares(shares)
    by_trigger = _group_by_trigger(bank)
    order = sorted(by_trigger)
    random.Random(seed).shuffle(order)
    seeded = _seed_eval(by_trigger, order) if shares["eval"] > 0 else {}
    targets = {part: share * len(bank) for part, share in shares.items()}
    part_by_trigger = _deal_greedily(by_trigger, order, targets, seeded)
    return {part: [p for p in bank if part_by_trigger[p.trigger] == part] for part in PARTS}


def _checked_shares(shares: Mapping[str, float]) -> dict[str, float]:
    missing = [part for part in PARTS if part not in shares]
    unknown = sorted(set(shares) - set(PARTS))
    if missing or unknown:
        raise ValueError(f"`shares` must have exactly the parts {', '.join(PARTS)}; missing {missing}, "
                         f"unknown {unknown}")
    for part, share in shares.items():
        if not (isinstance(share, int | float) and math.isfinite(share) and share >= 0):
            raise ValueError(f"`shares[{part!r}]` must be a number >= 0, got {share!r}")
    total = math.fsum(shares.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"`shares` must sum to 1 (within 1e-6), got {total!r}: {dict(shares)}")
    return dict(shares)


def _group_by_trigger(bank: Sequence[LookalikePrompt]) -> dict[str, list[LookalikePrompt]]:
    by_trigger: dict[str, list[LookalikePrompt]] = {}
    for item in bank:
        by_trigger.setdefault(item.trigger, []).append(item)
    return by_trigger


def _seed_eval(by_trigger: Mapping[str, list[LookalikePrompt]], order: Sequence[str]) -> dict[str, str]:
    """The families that give the eval part `EVAL_PER_KIND` prompts of each kind, mapped to "eval"."""
    kinds_by_trigger = {trigger: Counter(p.kind for p in by_trigger[trigger]) for trigger in order}
    chosen: list[str] = []
    for kind in KINDS:
        need = min(EVAL_PER_KIND, sum(kinds[kind] for kinds in kinds_by_trigger.values()))
        while (have := sum(kinds_by_trigger[trigger][kind] for trigger in chosen)) < need:
            # Some family outside `chosen` has this kind: need <= the bank's count of it.
            candidates = [t for t in order if t not in chosen and kinds_by_trigger[t][kind]]
            chosen.append(_best_cover(candidates, by_trigger, kinds_by_trigger, kind, need - have))
    return dict.fromkeys(chosen, "eval")


def _best_cover(candidates: Sequence[str], by_trigger: Mapping[str, list[LookalikePrompt]],
                kinds_by_trigger: Mapping[str, Counter], kind: str, missing: int) -> str:
    """The candidate covering most `missing` prompts of `kind`; ties go to the smallest, then the first."""
    return max(candidates, key=lambda t: (min(kinds_by_trigger[t][kind], missing), -len(by_trigger[t])))


def _deal_greedily(by_trigger: Mapping[str, list[LookalikePrompt]], order: Sequence[str],
                   targets: Mapping[str, float], seeded: Mapping[str, str]) -> dict[str, str]:
    """`seeded`, plus each other family, largest first, given to the part furthest below its target."""
    part_by_trigger = dict(seeded)
    counts = dict.fromkeys(PARTS, 0)
    for trigger, part in part_by_trigger.items():
        counts[part] += len(by_trigger[trigger])
    for trigger in sorted(order, key=lambda t: -len(by_trigger[t])):  # stable: `order` breaks ties
        if trigger not in part_by_trigger:
            part = max(PARTS, key=lambda p: targets[p] - counts[p])
            part_by_trigger[trigger] = part
            counts[part] += len(by_trigger[trigger])
    return part_by_trigger
