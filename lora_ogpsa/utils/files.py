"""File names of the output layout, single-file atomic writes, JSON/JSONL, hashing and safetensors reading —
the one copy.

Single files (JSON, JSONL) go through a `.NAME.partial` sibling and `os.replace`, so a reader sees the old file or
the new one, never half of one. Directories are built in their `partial_path` sibling, `NAME.partial`, and renamed
into place when complete (`lora_ogpsa.utils.outputs`, with the per-output lock and the checks made before any
work).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lora_ogpsa.utils.errors import InputError, first_line

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
SUBSPACE_FILE = "ogpsa_subspace.safetensors"
RUN_CONFIG = "ogpsa_config.json"
METRICS_FILE = "metrics.jsonl"
CARD_FILE = "README.md"
COMPLETE_MARKER = "lora_ogpsa_complete.json"
"""Written last into a checkpoint: its presence means every file of the checkpoint is there."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "chat_template.jinja",
                   "chat_template.json")
""" The files `save_pretrained` of a tokenizer may write (copied next to every adapter and merged model)."""


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """`output_dir/checkpoint-N`, the name the transformers Trainer gives a checkpoint."""
    return Path(output_dir) / f"checkpoint-{step}"


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest `checkpoint-N` holding `COMPLETE_MARKER` (a save cut short by a crash or a full disk has
    none, and is passed over), or None."""
    found = [path for path in Path(output_dir).glob("checkpoint-*")
             if path.name.split("-")[-1].isdigit() and (path / COMPLETE_MARKER).is_file()]
    return max(found, key=lambda path: int(path.name.split("-")[-1]), default=None)


def partial_path(output: Path) -> Path:
    """The sibling an output directory is built in before it is renamed into place."""
    return output.with_name(f"{output.name}.partial")


def _write_text_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_texts_together(text_by_path: dict[Path, str]) -> None:
    """Write several files as one: every text goes to its `.NAME.partial` sibling first, and only when all are
    written are they renamed into place (a full disk or a crash on the way leaves every old file as it was and
    no temporary behind)."""
    partials = {Path(path): Path(path).with_name(f".{Path(path).name}.partial") for path in text_by_path}
    try:
        for path, text in text_by_path.items():
            partials[Path(path)].write_text(text, encoding="utf-8")
        for path, partial in partials.items():
            os.replace(partial, path)
    finally:
        for partial in partials.values():
            partial.unlink(missing_ok=True)


def json_text(payload: Any) -> str:
    """The text `write_json` writes: pretty, sorted JSON with a final newline."""
    return json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"


def jsonl_text(rows: Iterable[Any]) -> str:
    """The text `write_jsonl` writes: one JSON object per line, UTF-8, not ASCII-escaped."""
    return "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)


def write_json(path: Path, payload: Any) -> None:
    """Pretty, sorted JSON, written to a temporary sibling and renamed."""
    _write_text_atomic(Path(path), json_text(payload))


def write_jsonl(path: Path, rows: Iterable[Any]) -> None:
    """One JSON object per line (UTF-8, not ASCII-escaped), written to a temporary sibling and renamed."""
    _write_text_atomic(Path(path), jsonl_text(rows))


def read_json(path: Path, *, flag: str | None = None) -> Any:
    """A JSON file, or InputError naming the file (and `flag`), line and column of the problem."""
    where = f"{flag} {path}" if flag else str(path)
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise InputError(f"{where}: file not found") from error
    except UnicodeDecodeError as error:
        raise InputError(f"{where}: not UTF-8 text (byte {error.start}); save it as UTF-8") from error
    except json.JSONDecodeError as error:
        raise InputError(f"{where}: invalid JSON ({error.msg} at line {error.lineno}, column {error.colno})") \
            from error
    except RecursionError as error:
        raise InputError(f"{where}: JSON nested too deeply") from error


_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"),
               (b"PK\x03\x04", "zip"))


def iter_jsonl(path: Path, *, flag: str | None = None,
               max_line_bytes: int | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, value) for every non-blank line of a JSONL file.

    Raises:
        InputError: a line that is not valid JSON or not UTF-8, or longer than `max_line_bytes`, naming the file
            and line.
    """
    where = f"{flag} {path}" if flag else str(path)
    with Path(path).open("rb") as handle:
        head = handle.read(8)
        handle.seek(0)
        kind = next((name for magic, name in _COMPRESSED if head.startswith(magic)), None)
        if kind is not None:
            raise InputError(f"{where}: a {kind} archive, not JSON Lines text; decompress it first")
        for number, raw in enumerate(iter(lambda: handle.readline(_read_limit(max_line_bytes)), b""), start=1):
            if max_line_bytes is not None and len(raw) > max_line_bytes:  # read no further than the limit
                raise InputError(f"{where}:{number}: the row is {len(raw) / 2**20:.1f} MiB, over the "
                                 f"{max_line_bytes / 2**20:g} MiB limit per row; shorten or split it")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise InputError(f"{where}:{number}: not UTF-8 text (byte {error.start}); save it as UTF-8") \
                    from error
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{where}:{number}: invalid JSON ({error.msg} at column {error.colno}); "
                                 "each line must be one JSON object") from error
            except RecursionError as error:
                raise InputError(f"{where}:{number}: JSON nested too deeply") from error
            if "\\ud" in line.lower():  # a \uXXXX escape in the surrogate range: is it half a pair?
                try:
                    json.dumps(value, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError as error:
                    raise InputError(f"{where}:{number}: a lone UTF-16 surrogate "
                                     f"({error.object[error.start:error.end].encode('unicode_escape').decode()}) "
                                     "that no tokenizer can encode; remove the escape or write the full pair"
                                     ) from error
            yield number, value


def _read_limit(max_line_bytes: int | None) -> int:
    """What one `readline` may read: one byte over the row limit (enough to see a row is too long), or all."""
    return -1 if max_line_bytes is None else max_line_bytes + 2


def read_text_lines(path: Path, *, flag: str, max_line_bytes: int) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line of a UTF-8 text file, each read no further than `max_line_bytes`.

    Raises:
        InputError: a binary file (a NUL byte), a line that is not UTF-8 or over the limit, naming file and line.
    """
    with Path(path).open("rb") as handle:
        for number, raw in enumerate(iter(lambda: handle.readline(max_line_bytes + 2), b""), start=1):
            if len(raw) > max_line_bytes:
                raise InputError(f"{flag} {path}:{number}: the line is over the {max_line_bytes / 2**20:g} MiB limit "
                                 "per row; shorten or split it")
            if b"\0" in raw:
                raise InputError(f"{flag} {path}:{number}: a NUL byte — a binary file, not text; give a UTF-8 text "
                                 "file with one prompt per line")
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise InputError(f"{flag} {path}:{number}: not UTF-8 text (byte {error.start}); save it as UTF-8") \
                    from error


def read_jsonl(path: Path, *, flag: str | None = None) -> list[Any]:
    """Every value of a JSONL file (empty when the file is missing)."""
    return [value for _, value in iter_jsonl(path, flag=flag)] if Path(path).is_file() else []


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_safetensors(path: Path, *, flag: str) -> dict[str, Any]:
    """All tensors of a safetensors file, or InputError for a missing or corrupt one."""
    from safetensors import SafetensorError, safe_open

    safetensors_header(path, flag=flag)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as error:
        raise InputError(f"{flag} {path}: not a readable safetensors file ({first_line(error)}); it is truncated "
                         "or corrupt — copy it again") from error


def safetensors_header(path: Path, *, flag: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """(shape, dtype) of every tensor in a safetensors file, from its header only (safetensors checks that the
    header covers the file, so truncation is caught); InputError for a missing, truncated or corrupt file."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise InputError(f"{flag} {path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            slices = {name: handle.get_slice(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
            return {name: (tuple(part.get_shape()), part.get_dtype()) for name, part in slices.items()}
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"{flag} {path}: not a readable safetensors file ({first_line(error)}); it is truncated "
                         "or corrupt — copy it again") from error
