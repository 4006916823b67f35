"""The user's evaluation suites: harmful prompts (refusal wanted), benign prompts (refusal not wanted; a row's
`sounds_harmful: true`, or `kind: sounds_dangerous` as in the demo's built files, marks a look-alike) and
utility questions with accepted answers, each dealt once into `dev` and `test` by a seed, or given as two files.
Every choice reads dev; final tables read test."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_ogpsa.eval.generation import EvalSuites
from lora_ogpsa.eval.prompts import UtilityItem, load_prompts
from lora_ogpsa.utils.errors import InputError
from lora_ogpsa.utils.files import file_sha256, iter_jsonl

SPLITS = ("dev", "test")
SUITES = ("harmful", "benign", "utility")


@dataclass
class Suites:
    """Every suite's dev and test part (`by_split`) and what each part was read from (`sources`)."""

    by_split: dict[str, EvalSuites]
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """For result files: per suite its files, their hashes, how it was split, and each part's size."""
        return {name: dict(source) for name, source in self.sources.items()}


def load_suites(files: dict[str, str | None], *, seed: int = 0, dev_share: float = 0.5,
                limit: int | None = None) -> Suites:
    """Read the suites named in `files` (`harmful`, `benign`, `utility`, each optionally with `<name>_test`).

    A suite without a `_test` file is dealt by a seeded shuffle: `dev_share` of its rows to dev, the rest to
    test. `limit` keeps the first n rows of each part.

    Raises:
        InputError: a missing harmful or benign suite, a file that is not a suite (naming the key, row and
            field), `dev_share` outside (0, 1), or a part left empty.
    """
    if not 0.0 < dev_share < 1.0:
        raise InputError(f"dev_share: must be in (0, 1), got {dev_share}; e.g. 0.5 puts half of each suite in dev")
    if limit is not None and limit < 1:
        raise InputError(f"limit: must be an integer >= 1, got {limit}; or leave it out for every prompt")
    parts: dict[str, dict[str, list]] = {}
    sources: dict[str, dict[str, Any]] = {}
    for name in SUITES:
        if files.get(name) is None:
            if name != "utility":
                raise InputError(f"{name}: the {name} suite is required; give a .txt or .jsonl file of prompts")
            if files.get(f"{name}_test"):
                raise InputError(f"{name}_test: given without {name}; give the dev part as {name} too")
            parts[name], sources[name] = {split: [] for split in SPLITS}, {"files": None}
            continue
        parts[name], sources[name] = _suite(name, files[name], files.get(f"{name}_test"), seed, dev_share, limit)
    return Suites({split: _eval_suites(parts, split) for split in SPLITS}, sources)


def _suite(name: str, path: str, test_path: str | None, seed: int, dev_share: float,
           limit: int | None) -> tuple[dict[str, list], dict[str, Any]]:
    rows = _read(name, path)
    if test_path:
        split = {"dev": rows, "test": _read(f"{name}_test", test_path)}
        how = "given as two files"
    else:
        shuffled = random.Random(f"{name}-{seed}").sample(rows, len(rows))
        cut = round(dev_share * len(shuffled))
        split = {"dev": shuffled[:cut], "test": shuffled[cut:]}
        how = f"dealt by seed {seed}, {dev_share:g} to dev"
    split = {part: items[:limit] for part, items in split.items()}
    for part, items in split.items():
        if not items:
            raise InputError(f"{name}: its {part} part is empty ({len(rows)} rows, {how}); give more prompts "
                             f"or a {name}_test file")
    files = [path, *([test_path] if test_path else [])]
    return split, {"files": files, "sha256": [file_sha256(Path(f))[:16] for f in files], "split": how,
                   "counts": {part: len(items) for part, items in split.items()}}


def _read(key: str, path: str) -> list[dict[str, Any]]:
    """Rows `{"prompt", "answers", "sounds_harmful"}` of one suite file (validated by `eval.prompts`)."""
    if not Path(path).is_file():
        raise InputError(f"{key}: {path} is not a file; give a .txt or .jsonl file of prompts")
    try:
        prompts = load_prompts(path)
    except InputError as error:
        raise InputError(str(error).replace("--prompts", key, 1)) from None
    flags = [False] * len(prompts.prompts)
    if path.endswith(".jsonl"):
        records = [record for _, record in iter_jsonl(Path(path), flag=key)]
        flags = [_flag(record, f"{key} {path}:{number}") for number, record in enumerate(records, start=1)]
    rows = [{"prompt": prompt, "answers": answers, "sounds_harmful": flag}
            for prompt, answers, flag in zip(prompts.prompts, prompts.answers, flags, strict=True)]
    base = key.removesuffix("_test")
    if base == "utility" and any(row["answers"] is None for row in rows):
        number = next(i for i, row in enumerate(rows, start=1) if row["answers"] is None)
        raise InputError(f"{key} {path}:{number}: a utility question needs 'answers' (a list of accepted short "
                         "answers)")
    return rows


def _flag(record: dict, where: str) -> bool:
    """`sounds_harmful` (or, as in the demo's built benign files, `kind: sounds_dangerous`)."""
    value = record.get("sounds_harmful", record.get("kind") == "sounds_dangerous")
    if not isinstance(value, bool):
        raise InputError(f"{where}: field 'sounds_harmful' must be true or false, got {value!r}")
    return value


def _eval_suites(parts: dict[str, dict[str, list]], split: str) -> EvalSuites:
    benign = parts["benign"][split]
    return EvalSuites(harmful=[row["prompt"] for row in parts["harmful"][split]],
                      benign=[row["prompt"] for row in benign], benign_answers=[],
                      utility=[UtilityItem(row["prompt"], tuple(row["answers"])) for row in parts["utility"][split]],
                      benign_kinds=["sounds_dangerous" if row["sounds_harmful"] else "ordinary" for row in benign])


def suites_digest(suites: Suites) -> str:
    """A short content hash of both splits (for cache keys and result files)."""
    text = repr([suites.by_split[split] for split in SPLITS])
    return hashlib.sha256(text.encode()).hexdigest()[:12]
