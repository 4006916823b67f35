"""Prompt sets for `lora-ogpsa eval`: a .txt or .jsonl file, or a built-in suite, validated row by row."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_ogpsa.demo_splits import builtin_suite
from lora_ogpsa.errors import InputError

Prompt = str | list[dict[str, str]]

BUILTIN_SUITES = ("benign", "donotanswer-heldout", "harmbench", "utility")
_ROLES = ("system", "user", "assistant")


@dataclass
class PromptSet:
    """Prompts to evaluate, where they came from, and (for utility questions) their accepted answers."""

    source: str
    prompts: list[Prompt]
    answers: list[tuple[str, ...] | None] = field(default_factory=list)


def load_prompts(spec: str | Path) -> PromptSet:
    """Read `--prompts`: an existing .txt / .jsonl file, else a built-in suite name.

    A .txt file holds one prompt per line (blank lines skipped). A .jsonl file holds one object per line with
    a `prompt` field (a string, or a list of `{"role", "content"}` messages) and optionally `answers` (a list
    of accepted short answers, which makes the row a utility question).

    Raises:
        InputError: no such file or suite, a directory, another suffix, an empty file, an invalid JSON line,
            a missing or wrongly typed field.
    """
    path = Path(spec)
    if path.exists():
        return _read_prompt_file(path)
    if str(spec) in BUILTIN_SUITES:
        prompts, answers = builtin_suite(str(spec))
        return PromptSet(str(spec), list(prompts), answers)
    raise InputError(f"--prompts {spec}: no such file, and not a built-in suite ({', '.join(BUILTIN_SUITES)}); "
                     "give a .txt file (one prompt per line), a .jsonl file with a 'prompt' field, or a suite name")


def _read_prompt_file(path: Path) -> PromptSet:
    if path.is_dir():
        raise InputError(f"--prompts {path}: is a directory; give a .txt or .jsonl file")
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise InputError(f"--prompts {path}: unknown file type '{path.suffix}'; give a .txt file (one prompt per "
                         "line) or a .jsonl file with a 'prompt' field")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix.lower() == ".txt":
        prompts = [line.strip() for line in lines if line.strip()]
        answers: list[tuple[str, ...] | None] = [None] * len(prompts)
    else:
        rows = [_parse_prompt_row(line, f"--prompts {path}:{number}")
                for number, line in enumerate(lines, start=1) if line.strip()]
        prompts, answers = [row[0] for row in rows], [row[1] for row in rows]
    if not prompts:
        raise InputError(f"--prompts {path}: no prompts in it; write one prompt per line (.txt) or one JSON object "
                         "with a 'prompt' field per line (.jsonl)")
    return PromptSet(str(path), prompts, answers)


def _parse_prompt_row(line: str, where: str) -> tuple[Prompt, tuple[str, ...] | None]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise InputError(f"{where}: invalid JSON ({error.msg} at column {error.colno}); each line must be one "
                         "JSON object") from error
    if not isinstance(record, dict):
        raise InputError(f"{where}: each line must be a JSON object, got {type(record).__name__}")
    if "prompt" not in record:
        raise InputError(f"{where}: missing field 'prompt'; found {sorted(record)}")
    answers = record.get("answers")
    if answers is not None and (not isinstance(answers, list) or not answers
                                or not all(isinstance(answer, str) and answer.strip() for answer in answers)):
        raise InputError(f"{where}: field 'answers' must be a non-empty list of non-empty strings")
    return _check_prompt(record["prompt"], where), tuple(answers) if answers else None


def _check_prompt(prompt: Any, where: str) -> Prompt:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError(f"{where}: field 'prompt' is empty")
        return prompt
    if not isinstance(prompt, list) or not prompt:
        raise InputError(f"{where}: field 'prompt' must be a string or a non-empty list of messages, got "
                         f"{type(prompt).__name__ if not isinstance(prompt, list) else 'an empty list'}")
    for index, message in enumerate(prompt):
        if not isinstance(message, dict) or message.get("role") not in _ROLES \
                or not isinstance(message.get("content"), str):
            raise InputError(f"{where}: field 'prompt'[{index}] must be an object with 'role' (one of "
                             f"{', '.join(_ROLES)}) and 'content' (a string)")
    return [{"role": message["role"], "content": message["content"]} for message in prompt]
