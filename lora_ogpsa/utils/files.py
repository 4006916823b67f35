"""The output layout and file handling: file names, atomic writes, JSON/JSONL, hashing — the one copy.

Every directory a command produces (a training run, an export, a merge, the demo's data and model caches) is
built in its `partial_path` sibling, `NAME.partial`, and renamed into place when complete, so that a directory
with the final name is always complete. Single files (JSON, JSONL) go through a `.NAME.partial` sibling and
`os.replace`. Staging directories are made with `mkdir` (not `tempfile.mkdtemp`, whose 0700 mode would survive
the rename).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lora_ogpsa.utils.errors import InputError, first_line

logger = logging.getLogger(__name__)

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


def check_apart(output: str | Path, inputs: dict[str, str | Path | None], *, flag: str = "--output") -> None:
    """Refuse an output that is, contains, or lies inside one of the inputs (flag → path; symlinks and `..`
    resolved), before anything is written: `--overwrite` would otherwise delete the input, or the run would
    write into it. A Hub ID (not an existing path) is not a local input and is skipped."""
    out = Path(output).resolve()
    for name, source in inputs.items():
        if source is None or not Path(source).exists():
            continue
        given = Path(source).resolve()
        if out == given or given.is_relative_to(out) or out.is_relative_to(given):
            relation = "is" if out == given else "contains" if given.is_relative_to(out) else "lies inside"
            raise InputError(f"{flag} {output} {relation} the input {name} {source}; write the output somewhere "
                             "else (an output never replaces or enters an input)")


def check_output_dir(output: Path, *, overwrite: bool, resume: bool | None = None, flag: str = "--output") -> None:
    """Refuse an existing non-empty output directory unless told to overwrite it (or to resume into it), and
    an output whose parent cannot be written. `resume` None: the command has no --resume (none is suggested)."""
    if output.exists() and not output.is_dir():
        raise InputError(f"{flag} {output}: exists and is not a directory; choose another path")
    if output.is_dir() and any(output.iterdir()) and not (overwrite or resume):
        raise InputError(f"{flag} {output}: exists and is not empty; pass --overwrite to replace it"
                         f"{' or --resume to continue it' if resume is not None else ''}, or choose another path")
    probe_writable(output, flag=flag)


def probe_writable(output: Path, *, flag: str = "--output") -> None:
    """Create and remove a probe file where `output` will be made (its nearest existing parent), so that an
    unwritable location is an error before any work starts, not after it.

    Raises:
        InputError: the location cannot be written (read-only, no permission, no such parent as a file, ...).
    """
    parent = next((path for path in Path(output).absolute().parents if path.exists()), Path("/"))
    try:
        if not parent.is_dir():
            raise NotADirectoryError(f"{parent} is not a directory")
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".lora_ogpsa-probe-"):
            pass
    except OSError as error:
        raise InputError(f"{flag} {output}: cannot write in {parent} ({error.strerror or error}); choose a "
                         "writable location") from error


SIBLING_SUFFIX = "..old.deleting"  # the longest sibling of NAME written beside it: `.NAME.old.deleting`


def output_path(path: str | Path, *, flag: str = "--output") -> Path:
    """`path` with a symlink followed: an output given as a link is written (and replaced with --overwrite) where
    the link points, and the link itself stays. A path with `..` is resolved as the kernel would (symlinks first),
    so `a/new/../b` writes `a/b` and makes no `a/new` on the way.

    Raises:
        InputError: the path is a symlink loop, or its name too long for the siblings written beside it
            (`.NAME.old.deleting` is the longest).
    """
    path = Path(path)
    if path.is_symlink() or ".." in path.parts:
        try:
            os.stat(path)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise InputError(f"{flag} {path}: a symlink loop; remove the link or choose another path") from error
        path = Path(os.path.realpath(path))
    parent = next((folder for folder in path.absolute().parents if folder.is_dir()), Path("/"))
    limit = os.pathconf(parent, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    if len(os.fsencode(path.name)) + len(SIBLING_SUFFIX) > limit:
        raise InputError(f"{flag} {path}: the name is {len(os.fsencode(path.name))} bytes; with the "
                         f"'{SIBLING_SUFFIX}'-style siblings written beside it that is over this file system's "
                         f"{limit}; use a name of at most {limit - len(SIBLING_SUFFIX)} bytes")
    return path


@contextlib.contextmanager
def output_lock(output: Path, *, flag: str = "--output") -> Iterator[None]:
    """Hold an exclusive lock on `output` (a `.NAME.lock` sibling, `flock`ed) for the whole block.

    A second run into the same output is refused at once instead of racing the first. The lock is released
    by the kernel when the process dies, so a stale lock file never blocks anything; the holder removes the
    file when done (a process that locked a file already removed sees it and counts as refused).

    Raises:
        InputError: another process holds the lock (its pid is named).
    """
    probe_writable(output, flag=flag)
    made_parents = [parent for parent in output.parents if not parent.exists()]  # deepest first
    output.parent.mkdir(parents=True, exist_ok=True)
    path = output.with_name(f".{output.name}.lock")
    handle = _locked_file(path, output, flag)
    try:
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        _restore_interrupted_replacement(output)
        yield
    finally:
        path.unlink(missing_ok=True)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
        if not output.exists():  # nothing was made: leave no empty parents behind either
            for parent in made_parents:
                with contextlib.suppress(OSError):  # not empty (e.g. a partial run kept for --resume)
                    parent.rmdir()


def is_lock_file(path: Path) -> bool:
    """A `.NAME.lock` file of `output_lock` (one a killed run left behind is stale and harmless)."""
    return path.name.startswith(".") and path.name.endswith(".lock")


def _locked_file(path: Path, output: Path, flag: str):
    """The lock file, opened and exclusively `flock`ed; retried when a finishing holder removed the file
    between our open and our lock (we then hold a lock on a name nobody else can reach)."""
    for _ in range(5):
        handle = path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise InputError(f"{flag} {output}: in use by another run (pid {holder}); wait for it to finish or "
                             "choose another output") from error
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                return handle
        handle.close()
    raise InputError(f"{flag} {output}: its lock file keeps changing (other runs starting and ending); try again")


def _restore_interrupted_replacement(output: Path) -> None:
    """A process killed between `finalize_directory`'s two renames leaves the previous output as `NAME.old` and
    no `NAME`: put it back, so that nothing finished is ever lost (the new run stays in `NAME.partial`)."""
    old = _old_path(output)
    if old.is_dir() and not output.exists() and not output.is_symlink():
        old.rename(output)
        logger.warning("restored %s from %s: an earlier run was killed while replacing it", output, old.name)


def _old_path(output: Path) -> Path:
    return output.with_name(f"{output.name}.old")


def finalize_directory(work: Path, output: Path) -> None:
    """Move a completed `work` directory to `output`, replacing an old output only once the new one is ready.

    Linux has no atomic swap of two directories here, so there are two renames; a kill between them leaves
    `NAME.old`, which the next run holding the output's lock renames back (`output_lock`)."""
    old = _old_path(output)
    if output.exists():
        if old.exists():
            _discard(old)
        output.rename(old)
    work.rename(output)
    if old.exists():
        _discard(old)


def _discard(directory: Path) -> None:
    """Delete a directory by renaming it out of the way first: a kill during the delete leaves a hidden
    `.NAME.deleting` (removed next time), never a half-deleted `NAME.old` that could be restored."""
    trash = directory.with_name(f".{directory.name}.deleting")
    if trash.exists():
        shutil.rmtree(trash)
    directory.rename(trash)
    shutil.rmtree(trash)


@contextlib.contextmanager
def atomic_directory(output: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory in `partial_path(output)`; rename it to `output` on success, delete it on failure.

    A `NAME.partial` left by an earlier, interrupted attempt is removed first; parent directories made for
    `output` are removed again when the block fails.

    Raises:
        InputError: `output` appeared while the block ran and `overwrite` is False (it is never replaced then).
    """
    with output_lock(output):  # so that the leftover removed below is never another live run's
        work = partial_path(output)
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
        try:
            yield work
            if output.exists() and not overwrite and (not output.is_dir() or any(output.iterdir())):
                raise InputError(f"{output}: appeared while writing; nothing was overwritten, choose another path")
            finalize_directory(work, output)
        finally:
            shutil.rmtree(work, ignore_errors=True)


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
