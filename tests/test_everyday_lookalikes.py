"""The everyday look-alike bank: size, categories, form, one trigger family per prompt, and trigger
families that neither the first bank nor the project's other prompt text contains (a clean test split)."""

import re
from collections import Counter

import pytest

from lora_ogpsa.demo.dangerous_sounding import BANK
from lora_ogpsa.demo.everyday_lookalikes import CATEGORIES, EVERYDAY_BANK, EverydayLookalike
from lora_ogpsa.demo.harmful_instructions import HARMFUL_INSTRUCTIONS
from lora_ogpsa.demo.prompts import ORDINARY_PROMPTS_FLAT, SOUNDS_DANGEROUS
from lora_ogpsa.demo.quick_questions import QUICK_QUESTIONS
from lora_ogpsa.demo.utility_questions import UTILITY_SET

FAMILIES = sorted({item.trigger for item in EVERYDAY_BANK})
FIRST_FAMILIES = sorted({item.trigger for item in BANK})
OTHER_TEXTS = {
    "dangerous_sounding.BANK": [item.prompt for item in BANK],
    "harmful_instructions.HARMFUL_INSTRUCTIONS": [row["prompt"] for row in HARMFUL_INSTRUCTIONS],
    "quick_questions.QUICK_QUESTIONS": list(QUICK_QUESTIONS),
    "utility_questions.UTILITY_SET": [item.question for item in UTILITY_SET],
    "prompts.ORDINARY_PROMPTS_FLAT": list(ORDINARY_PROMPTS_FLAT),
    "prompts.SOUNDS_DANGEROUS": list(SOUNDS_DANGEROUS),
}


def mentions(text: str, trigger: str) -> bool:
    """Whether `trigger` starts a word of `text` (case-insensitive): "bleed" in "Bleeding"."""
    return re.search(rf"\b{re.escape(trigger)}", text, re.IGNORECASE) is not None


def test_bank_size_families_and_categories():
    count_by_trigger = Counter(item.trigger for item in EVERYDAY_BANK)
    count_by_category = Counter(item.category for item in EVERYDAY_BANK)
    assert len(EVERYDAY_BANK) >= 230
    assert len(count_by_trigger) >= 48
    assert min(count_by_trigger.values()) >= 4, count_by_trigger
    assert all(re.fullmatch(r"[a-z]+", trigger) for trigger in count_by_trigger)
    assert len(CATEGORIES) >= 12
    assert set(count_by_category) == set(CATEGORIES)


def test_prompts_unique_short_and_sentences():
    normalised = Counter(" ".join(item.prompt.lower().split()) for item in EVERYDAY_BANK)
    assert [text for text, n in normalised.items() if n > 1] == []
    assert [item.prompt for item in EVERYDAY_BANK if len(item.prompt.split()) > 25] == []
    assert [item.prompt for item in EVERYDAY_BANK if not item.prompt.endswith(("?", "."))] == []


def test_families_are_new_to_the_first_bank():
    assert [(new, old) for new in FAMILIES for old in FIRST_FAMILIES
            if new.startswith(old) or old.startswith(new)] == []


def test_families_are_in_no_other_project_prompt_text():
    assert all(OTHER_TEXTS.values())
    assert [(trigger, source, text) for trigger in FAMILIES for source, texts in OTHER_TEXTS.items()
            for text in texts if mentions(text, trigger)] == []


def test_families_are_not_prefixes_of_each_other():
    assert [(a, b) for a in FAMILIES for b in FAMILIES if a != b and b.startswith(a)] == []


def test_each_prompt_has_exactly_its_own_trigger_family_of_either_bank():
    every_family = FAMILIES + FIRST_FAMILIES
    hits = {item.prompt: [t for t in every_family if mentions(item.prompt, t)] for item in EVERYDAY_BANK}
    assert [(item.prompt, hits[item.prompt]) for item in EVERYDAY_BANK
            if hits[item.prompt] != [item.trigger]] == []


def test_no_prompt_is_in_the_first_bank():
    first = {" ".join(item.prompt.lower().split()) for item in BANK}
    assert [item.prompt for item in EVERYDAY_BANK if " ".join(item.prompt.lower().split()) in first] == []


def test_unknown_category_is_rejected():
    with pytest.raises(ValueError, match=r"`category` must be one of .*got 'knitting'"):
        EverydayLookalike("How do I bleed a knitted jumper's dye?", "knitting", "bleed")
