"""Read and validate training data in TRL's standard formats, and tokenize reference examples.

Formats (each row a JSON object; a JSONL file, a JSON array file, a Parquet/CSV file, a directory written by
`datasets.save_to_disk`, or a `datasets.Dataset` in the Python API):

- SFT and reference rows: `{"messages": [{"role", "content"}, ...]}` (with at least one assistant message)
  or `{"prompt": ..., "completion": ...}` with both strings or both message lists.
- Preference rows: `{"prompt", "chosen", "rejected"}`, strings or message lists.

Every row is checked on its own, so one file may mix the formats; the first bad row is an `InputError` naming
the file, the line and the field. A field that is null counts as absent (a `save_to_disk` dataset of mixed rows
has every column in every row).

SFT rows are tokenized here with TRL's loss masking (`tokenize_sft_row`): a prompt/completion row trains its
completion (`completion_only_loss`, TRL's default for that format), a `messages` row every token
(TRL's default for conversational language modeling), or every assistant turn with `assistant_only_loss`;
TRL's SFTTrainer then receives `input_ids` and `labels` and uses them as they are. Reference rows protect the
answer's likelihood: a `messages` row's last assistant turn after the messages before it (`as_prompt_completion`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lora_ogpsa.utils.errors import InputError, first_line
from lora_ogpsa.utils.files import iter_jsonl
from lora_ogpsa.utils.limits import TimeLimitError, template_time_limit

logger = logging.getLogger(__name__)

DataKind = Literal["sft", "preference"]
ROLES = ("system", "user", "assistant", "tool")
MAX_ROW_BYTES = 1 << 20
"""The longest JSONL row accepted (1 MiB, ~250k tokens: far beyond any --max-length one GPU trains). A longer
row is almost always a mistake (a whole document in one field) and costs minutes and gigabytes to tokenize."""


@dataclass
class Rows:
    """Validated rows plus where they came from (for messages and hashes)."""

    rows: list[dict[str, Any]]
    source: str
    skipped: int = 0
    lines: list[int] | None = None
    """each row's line in its file (its 1-based index for other sources), for messages"""

    def __len__(self) -> int:
        return len(self.rows)


def read_rows(source: str | Path | Any, kind: DataKind, *, flag: str = "--data") -> Rows:
    """Read and validate every row of an SFT/reference or preference data source.

    Args:
        source: a path (JSONL, JSON, Parquet, CSV, `save_to_disk` directory) or a `datasets.Dataset`.
        kind: `"sft"` (also reference data) or `"preference"`.
        flag: the command-line flag the source came from, for messages.

    Returns:
        Rows: normalised rows (`messages` or `prompt`/`completion` for SFT, each row in its own format;
        `prompt`/`chosen`/`rejected` for preference).
        Preference rows whose chosen equals rejected are skipped with a warning and counted.

    Raises:
        InputError: missing, unreadable or empty source; a row with a missing or wrongly typed field.
    """
    name, records = _open_records(source, flag)
    normalise = _normalise_sft if kind == "sft" else _normalise_preference
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    skipped = 0
    for line, record in records:
        where = f"{flag} {name}:{line}"
        if not isinstance(record, dict):
            raise InputError(f"{where}: each row must be a JSON object, got {type(record).__name__}")
        row = normalise({key: value for key, value in record.items() if value is not None}, where)
        if row is None:
            skipped += 1
            continue
        rows.append(row)
        lines.append(line)
    if skipped:
        logger.warning("%s %s: skipped %d preference rows whose chosen equals rejected", flag, name, skipped)
    if not rows:
        raise InputError(f"{flag} {name}: no usable rows; it must hold at least one {kind} row")
    return Rows(rows, name, skipped, lines)


def _open_records(source: str | Path | Any, flag: str) -> tuple[str, Iterable[tuple[int, Any]]]:
    """(display name, iterator of (line number, record)); line numbers are 1-based file lines for JSONL."""
    if not isinstance(source, str | Path):  # a datasets.Dataset (or any sequence of dicts)
        return type(source).__name__, enumerate(source, start=1)
    path = Path(source)
    if not path.exists():
        raise InputError(f"{flag} {path}: no such file or directory")
    if path.is_dir():
        return str(path), enumerate(_load_dataset_dir(path, flag), start=1)
    if path.stat().st_size == 0:
        raise InputError(f"{flag} {path}: the file is empty")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".csv"):
        return str(path), enumerate(_load_tabular(path, suffix, flag), start=1)
    if suffix == ".json" and path.read_text(encoding="utf-8").lstrip().startswith("["):
        return str(path), enumerate(_load_json_array(path, flag), start=1)
    return str(path), iter_jsonl(path, flag=flag, max_line_bytes=MAX_ROW_BYTES)



def _load_json_array(path: Path, flag: str) -> list[Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{flag} {path}: invalid JSON ({error.msg} at line {error.lineno})") from error


def _load_tabular(path: Path, suffix: str, flag: str) -> list[Any]:
    import datasets

    try:
        dataset = datasets.Dataset.from_parquet(str(path)) if suffix == ".parquet" else datasets.Dataset.from_csv(
            str(path))
    except Exception as error:  # datasets raises many types for a malformed file
        raise InputError(f"{flag} {path}: cannot read it as {suffix[1:]} ({error})") from error
    return list(dataset)


def _load_dataset_dir(path: Path, flag: str) -> list[Any]:
    import datasets

    if not any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        return _load_data_folder(path, flag)
    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise InputError(f"{flag} {path}: not a directory written by datasets.save_to_disk ({error})") from error
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise InputError(f"{flag} {path}: a DatasetDict without a 'train' split (has {list(dataset)})")
        dataset = dataset["train"]
    return list(dataset)


def _load_data_folder(path: Path, flag: str) -> list[Any]:
    """A folder of data files, read as `trl sft --dataset_name FOLDER` reads it (`datasets.load_dataset` on a
    local directory: one format, files named by split or all in `train`); its train split."""
    import datasets

    try:
        dataset = datasets.load_dataset(str(path), split="train")
    except Exception as error:  # datasets raises many types for an unreadable folder
        raise InputError(f"{flag} {path}: neither a datasets.save_to_disk directory nor a folder of data files "
                         f"datasets can read ({first_line(error)}); give one JSONL/JSON/Parquet/CSV file or such "
                         "a folder") from error
    return list(dataset)


def _normalise_sft(record: Mapping[str, Any], where: str) -> dict[str, Any]:
    if "messages" in record:
        messages = check_messages(record["messages"], where, "messages")
        if not any(message["role"] == "assistant" for message in messages[1:]):
            raise InputError(f"{where}: field 'messages' needs an assistant message after at least one other "
                             "message (the prompt)")
        return {"messages": messages}
    if "prompt" in record and "completion" in record:
        prompt = _check_text_or_messages(record["prompt"], where, "prompt")
        completion = _check_text_or_messages(record["completion"], where, "completion")
        if isinstance(prompt, str) != isinstance(completion, str):
            raise InputError(f"{where}: fields 'prompt' and 'completion' must both be strings or both be lists of "
                             f"messages ({_formats({'prompt': prompt, 'completion': completion})}); write both in "
                             "one format")
        return {"prompt": prompt, "completion": completion}
    raise InputError(f"{where}: missing field 'messages' (or 'prompt' and 'completion'); found {sorted(record)}")


def _normalise_preference(record: Mapping[str, Any], where: str) -> dict[str, Any] | None:
    missing = [field for field in ("prompt", "chosen", "rejected") if field not in record]
    if missing:
        raise InputError(f"{where}: missing field '{missing[0]}'; preference rows need 'prompt', 'chosen' and "
                         f"'rejected' (found {sorted(record)})")
    row = {field: _check_text_or_messages(record[field], where, field) for field in ("prompt", "chosen", "rejected")}
    kinds = {field: isinstance(value, str) for field, value in row.items()}
    if len(set(kinds.values())) > 1:
        raise InputError(f"{where}: fields 'prompt', 'chosen' and 'rejected' must all be strings or all be lists of "
                         f"messages ({_formats(row)}); write all three in one format")
    return None if row["chosen"] == row["rejected"] else row


def _formats(fields: Mapping[str, Any]) -> str:
    """`'prompt' is a list of messages, 'completion' a string`: which field is in which format."""
    kinds = [f"'{field}' {'is ' if index == 0 else ''}{'a string' if isinstance(value, str) else 'a list of messages'}"
             for index, (field, value) in enumerate(fields.items())]
    return ", ".join(kinds)


def _check_text_or_messages(value: Any, where: str, field: str) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise InputError(f"{where}: field '{field}' is empty")
        return value
    if isinstance(value, list):
        return check_messages(value, where, field)
    raise InputError(f"{where}: field '{field}' must be a string or a list of messages, got {type(value).__name__}")


def check_messages(value: Any, where: str, field: str) -> list[dict[str, str]]:
    """A non-empty list of `{"role", "content"}` messages (roles: `ROLES`), or InputError at `where`."""
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: field '{field}' must be a non-empty list of messages, got "
                         f"{type(value).__name__ if not isinstance(value, list) else 'an empty list'}")
    messages = []
    for index, message in enumerate(value):
        at = f"{where}: field '{field}'[{index}]"
        if not isinstance(message, dict):
            raise InputError(f"{at} must be an object with 'role' and 'content', got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InputError(f"{at}.role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise InputError(f"{at}.content must be a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise InputError(f"{at}.content is empty: an assistant turn needs text to learn from (write the "
                             "response, or drop the row)")
        messages.append({"role": role, "content": content})
    return messages


def as_prompt_completion(row: Mapping[str, Any]) -> dict[str, Any]:
    """A normalised SFT row as prompt/completion: a `messages` row's last assistant turn after the messages
    before it (what a reference row protects); a prompt/completion row as it is."""
    if "messages" not in row:
        return dict(row)
    messages = row["messages"]
    last = max(index for index, message in enumerate(messages) if message["role"] == "assistant")
    return {"prompt": messages[:last], "completion": [messages[last]]}


# ---- tokenization, the way TRL's SFTTrainer does it ----

@dataclass
class TokenizedExample:
    """Token ids of prompt + completion and the mask of completion tokens (the ones the loss is on)."""

    input_ids: list[int]
    completion_mask: list[int]


def tokenize_prompt_completion(tokenizer: Any, row: Mapping[str, Any], *, max_length: int | None) -> TokenizedExample:
    """Tokenize one prompt/completion row exactly as TRL's SFTTrainer does (tested against it).

    Conversational rows go through the chat template (the prompt with the generation prompt); plain strings are
    concatenated and get an EOS token. The completion starts where the tokenized prompt and prompt+completion
    diverge. Truncation keeps the start, like TRL's default.
    """
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list):
        prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
        full_ids = _chat_ids(tokenizer, prompt + completion, add_generation_prompt=False)
    else:
        if not completion.endswith(tokenizer.eos_token):
            completion = completion + tokenizer.eos_token
        prompt_ids = tokenizer(text=prompt)["input_ids"]
        full_ids = tokenizer(text=prompt + completion)["input_ids"]
    prompt_length = _common_prefix_length(prompt_ids, full_ids)
    mask = [0] * prompt_length + [1] * (len(full_ids) - prompt_length)
    if max_length is not None:
        full_ids, mask = full_ids[:max_length], mask[:max_length]
    return TokenizedExample(list(full_ids), mask)


def tokenize_sft_row(tokenizer: Any, row: Mapping[str, Any], *, max_length: int | None,
                     completion_only_loss: bool | None = None, assistant_only_loss: bool = False) -> TokenizedExample:
    """Token ids of one normalised SFT row and the mask of the tokens the loss is on, with TRL's meanings.

    A prompt/completion row: its completion (`completion_only_loss` None or True, TRL's default for the
    format) or every token (False). A `messages` row: every token (TRL's default for conversational language
    modeling), or with `assistant_only_loss` every assistant turn — found by rendering the conversation up to
    each turn, so any chat template works, where TRL needs `{% generation %}` markers in it.
    """
    if "messages" not in row:
        example = tokenize_prompt_completion(tokenizer, row, max_length=max_length)
        if completion_only_loss is False:
            example.completion_mask = [1] * len(example.input_ids)
        return example
    messages = row["messages"]
    ids = _chat_ids(tokenizer, messages, add_generation_prompt=False)
    mask = [0 if assistant_only_loss else 1] * len(ids)
    if assistant_only_loss:
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                start = _common_prefix_length(_chat_ids(tokenizer, messages[:index], add_generation_prompt=True), ids)
                end = _common_prefix_length(_chat_ids(tokenizer, messages[:index + 1], add_generation_prompt=False),
                                            ids)
                mask[start:end] = [1] * (end - start)
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return TokenizedExample(list(ids), mask)


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            add_generation_prompt=add_generation_prompt)
    return list(encoded["input_ids"])


def _common_prefix_length(ids: Sequence[int], other: Sequence[int]) -> int:
    length = 0
    for token, other_token in zip(ids, other, strict=False):
        if token != other_token:
            break
        length += 1
    return length


def tokenize_rows(tokenizer: Any, rows: Sequence[Mapping[str, Any]], *, max_length: int | None,
                  source: str = "reference") -> list[TokenizedExample]:
    """Tokenize rows, dropping those left with no completion token after truncation (as TRL does).

    Raises:
        InputError: no row keeps a completion token (every prompt fills `max_length`).
    """
    examples = [tokenize_prompt_completion(tokenizer, as_prompt_completion(row), max_length=max_length) for row in rows]
    kept = [example for example in examples if any(example.completion_mask)]
    if len(kept) < len(examples):
        logger.warning("%s: dropped %d rows whose prompt fills max_length=%s", source, len(examples) - len(kept),
                       max_length)
    if not kept:
        raise InputError(f"{source}: every row's prompt fills --max-length {max_length}; raise --max-length")
    return kept


def _fits(row: dict, tokenizer: Any, kind: DataKind, max_length: int | None, completion_only_loss: bool | None,
          assistant_only_loss: bool) -> bool:
    """Whether the rendered row keeps at least one response token within `max_length` (every response of a
    preference row)."""
    if kind == "sft":
        return any(tokenize_sft_row(tokenizer, row, max_length=max_length, completion_only_loss=completion_only_loss,
                                    assistant_only_loss=assistant_only_loss).completion_mask)
    return all(any(tokenize_prompt_completion(tokenizer, {"prompt": row["prompt"], "completion": row[field]},
                                              max_length=max_length).completion_mask)
               for field in ("chosen", "rejected"))


def check_rows_fit(rows: Rows, tokenizer: Any, *, max_length: int | None, kind: DataKind,
                   flag: str = "--data", completion_only_loss: bool | None = None,
                   assistant_only_loss: bool = False) -> Rows:
    """Render every row through the model's chat template once, before anything is written, and keep the rows
    that leave at least one response token within `max_length` (TRL truncates the end: a row whose prompt fills
    `max_length` teaches nothing, so it is dropped with a warning naming the first such line).

    Raises:
        InputError: the chat template rejects a row (e.g. roles out of the order it requires), naming the file
            and line; or no row keeps a response token.
    """
    kept, kept_lines, too_long = [], [], []
    lines = rows.lines or list(range(1, len(rows) + 1))
    from jinja2 import TemplateError

    for row, line in zip(rows.rows, lines, strict=True):
        try:
            with template_time_limit(f"{flag} {rows.source}:{line}"):  # a template is a program: bounded
                fits = _fits(row, tokenizer, kind, max_length, completion_only_loss, assistant_only_loss)
        except (TemplateError, ValueError) as error:  # a template's raise_exception, or no template at all
            if isinstance(error, TimeLimitError):
                raise
            if not isinstance(row.get("prompt", row.get("messages")), list):
                raise
            raise InputError(f"{flag} {rows.source}:{line}: the model's chat template rejects this row "
                             f"({first_line(error)}); order the roles as the template requires (usually an optional "
                             "system message, then user and assistant alternating)") from error
        if fits:
            kept.append(row)
            kept_lines.append(line)
        else:
            too_long.append(line)
    if not kept:
        raise InputError(f"{flag} {rows.source}: every row's prompt fills --max-length {max_length}, leaving no "
                         "response token to train on; raise --max-length or shorten the prompts")
    if too_long:
        logger.warning("%s %s: dropped %d rows whose prompt fills --max-length %s (first at line %d)", flag,
                       rows.source, len(too_long), max_length, too_long[0])
    return Rows(kept, rows.source, rows.skipped, kept_lines)


def fingerprint(examples: Iterable[TokenizedExample]) -> str:
    """A short sha256 of token ids and masks: names the reference set in saved files and model cards."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.input_ids, example.completion_mask]).encode())
    return digest.hexdigest()[:16]
