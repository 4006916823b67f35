"""The dangerous-sounding benign prompt bank (size, kinds, form, one trigger family per prompt) and its split
by trigger family (deterministic, disjoint families, eval covers every kind, parts near their shares)."""

import re
from collections import Counter

import pytest

from lora_ogpsa.demo.dangerous_sounding import BANK, KINDS, LookalikePrompt
from lora_ogpsa.demo.trigger_split import DEFAULT_SHARES, PARTS, split_by_trigger

FAMILIES = sorted({item.trigger for item in BANK})


def mentions(text: str, trigger: str) -> bool:
    """Whether `trigger` starts a word of `text` (case-insensitive): "kill" in "Killing"."""
    return re.search(rf"\b{re.escape(trigger)}", text, re.IGNORECASE) is not None


def test_bank_size_and_kinds():
    count_by_kind = Counter(item.kind for item in BANK)
    assert len(BANK) >= 240
    assert set(count_by_kind) == set(KINDS)
    assert min(count_by_kind.values()) >= 20, count_by_kind
    assert len(KINDS) == 10


def test_prompts_unique_short_and_sentences():
    normalised = Counter(" ".join(item.prompt.lower().split()) for item in BANK)
    assert [text for text, n in normalised.items() if n > 1] == []
    assert [item.prompt for item in BANK if len(item.prompt.split()) > 25] == []
    assert [item.prompt for item in BANK if not item.prompt.endswith(("?", "."))] == []


def test_each_prompt_has_exactly_its_own_trigger_family():
    hits_by_prompt = {item.prompt: [t for t in FAMILIES if mentions(item.prompt, t)] for item in BANK}
    assert [(item.prompt, hits_by_prompt[item.prompt]) for item in BANK
            if hits_by_prompt[item.prompt] != [item.trigger]] == []


def test_many_trigger_families_of_several_prompts():
    count_by_trigger = Counter(item.trigger for item in BANK)
    assert len(count_by_trigger) >= 30
    assert min(count_by_trigger.values()) >= 2, count_by_trigger
    assert all(re.fullmatch(r"[a-z]+", trigger) for trigger in count_by_trigger)
    assert sum(len({i.kind for i in BANK if i.trigger == t}) > 1 for t in count_by_trigger) >= 20


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match=r"`kind` must be one of .*got 'jokes'"):
        LookalikePrompt("How do I kill it on stage?", "jokes", "kill")


def assert_valid_split(parts: dict[str, list[LookalikePrompt]], shares=DEFAULT_SHARES) -> None:
    """What `split_by_trigger` promises: exact cover, disjoint families, eval coverage, sizes near shares."""
    assert tuple(parts) == PARTS
    assert Counter(item for part in parts.values() for item in part) == Counter(BANK)
    triggers_by_part = {name: {item.trigger for item in part} for name, part in parts.items()}
    for i, first in enumerate(PARTS):
        for second in PARTS[i + 1:]:
            assert not triggers_by_part[first] & triggers_by_part[second], (first, second)
    trained = [item.prompt for name in PARTS if name != "eval" for item in parts[name]]
    assert [(t, p) for t in triggers_by_part["eval"] for p in trained if mentions(p, t)] == []
    eval_kinds = Counter(item.kind for item in parts["eval"])
    assert len(parts["eval"]) >= 60
    assert min(eval_kinds.get(kind, 0) for kind in KINDS) >= 4, eval_kinds
    for name in PARTS:
        assert abs(len(parts[name]) / len(BANK) - shares[name]) <= 0.10, (name, len(parts[name]))


def test_split_is_deterministic_and_valid():
    parts = split_by_trigger()
    assert split_by_trigger(seed=0) == parts
    assert split_by_trigger(BANK[::-1], seed=0) == {name: part[::-1] for name, part in parts.items()}
    assert_valid_split(parts)


@pytest.mark.parametrize("seed", [1, 2, 7])
def test_other_seeds_give_other_valid_splits(seed):
    parts = split_by_trigger(seed=seed)
    assert parts != split_by_trigger(seed=0)
    assert_valid_split(parts)


def test_eval_gets_a_rare_kind_the_greedy_deal_would_miss():
    # Ten large one-kind families and one small family of the only safety prompts: dealt largest first, the
    # small one would go wherever is furthest below target last; eval must get it anyway.
    bank = [LookalikePrompt(f"How do I {word} thing {i}?", "homonyms", word)
            for word in ("aa", "bb", "cc", "dd", "ee", "ff", "gg", "hh", "ii", "jj") for i in range(10)]
    bank += [LookalikePrompt(f"How do I zz safely {i}?", "safety", "zz") for i in range(4)]
    for seed in range(5):
        parts = split_by_trigger(bank, seed=seed)
        assert [item.trigger for item in parts["eval"]].count("zz") == 4
        assert sum(map(len, parts.values())) == len(bank)


def test_custom_shares_are_followed():
    shares = {"train": 0.4, "reference": 0.1, "dpo": 0.1, "eval": 0.4}
    assert_valid_split(split_by_trigger(seed=3, shares=shares), shares)


@pytest.mark.parametrize(("shares", "message"), [
    ({"train": 0.5, "reference": 0.2, "dpo": 0.3}, r"missing \['eval'\]"),
    ({**DEFAULT_SHARES, "test": 0.0}, r"unknown \['test'\]"),
    ({"train": 0.6, "reference": -0.1, "dpo": 0.2, "eval": 0.3}, r"`shares\['reference'\]` must be .*-0.1"),
    ({"train": 0.5, "reference": 0.2, "dpo": 0.2, "eval": 0.3}, r"must sum to 1 .*got 1.2"),
])
def test_bad_shares_are_rejected(shares, message):
    with pytest.raises(ValueError, match=message):
        split_by_trigger(shares=shares)
