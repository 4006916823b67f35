"""Prompt sets for `lora-ogpsa eval`: a .txt or .jsonl file, or a named suite, validated row by row.

The library knows no suite by name: the caller passes them (the CLI passes the demo's built-in suites).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_ogpsa.data.rows import MAX_ROW_BYTES, check_messages
from lora_ogpsa.utils.errors import InputError
from lora_ogpsa.utils.files import iter_jsonl, read_text_lines

Prompt = str | list[dict[str, str]]


@dataclass(frozen=True)
class UtilityItem:
    """A short-answer question and its accepted answers (see `evaluate.check_answer`)."""

    question: str
    answers: tuple[str, ...]


@dataclass
class PromptSet:
    """Prompts to evaluate, where they came from, and (for utility questions) their accepted answers."""

    source: str
    prompts: list[Prompt]
    answers: list[tuple[str, ...] | None] = field(default_factory=list)


def load_prompts(spec: str | Path, suites: Mapping[str, Callable[[], PromptSet]] | None = None) -> PromptSet:
    """Read `--prompts`: an existing .txt / .jsonl file, else the name of one of `suites`.

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
    suites = suites or {}
    if str(spec) in suites:
        return suites[str(spec)]()
    named = f", and not a built-in suite ({', '.join(sorted(suites))})" if suites else ""
    raise InputError(f"--prompts {spec}: no such file{named}; give a .txt file (one prompt per line), a .jsonl "
                     f"file with a 'prompt' field{', or a suite name' if suites else ''}")


def _read_prompt_file(path: Path) -> PromptSet:
    if path.is_dir():
        raise InputError(f"--prompts {path}: is a directory; give a .txt or .jsonl file")
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise InputError(f"--prompts {path}: unknown file type '{path.suffix}'; give a .txt file (one prompt per "
                         "line) or a .jsonl file with a 'prompt' field")
    if path.suffix.lower() == ".txt":
        lines = read_text_lines(path, flag="--prompts", max_line_bytes=MAX_ROW_BYTES)
        prompts = [part.strip() for _, line in lines for part in line.splitlines() if part.strip()]
        answers: list[tuple[str, ...] | None] = [None] * len(prompts)
    else:
        rows = [_parse_prompt_row(record, f"--prompts {path}:{number}") for number, record in iter_jsonl(path, flag="--prompts", max_line_bytes=MAX_ROW_BYTES)]
        prompts, answers = [row[0] for row in rows], [row[1] for row in rows]
    if not prompts:
        raise InputError(f"--prompts {path}: no prompts in it; write one prompt per line (.txt) or one JSON object "
                         "with a 'prompt' field per line (.jsonl)")
    return PromptSet(str(path), prompts, answers)


def _parse_prompt_row(record: Any, where: str) -> tuple[Prompt, tuple[str, ...] | None]:
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
    if not isinstance(prompt, list):
        raise InputError(f"{where}: field 'prompt' must be a string or a non-empty list of messages, got "
                         f"{type(prompt).__name__}")
    return check_messages(prompt, where, "prompt")
