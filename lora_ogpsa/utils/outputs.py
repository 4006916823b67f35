"""Where a command's output goes and how it becomes final: the checks made before any work (an output apart
from its inputs, writable, not silently replaced), the per-output lock, and directories built in their
`NAME.partial` sibling and renamed into place (`atomic_directory`, `finalize_directory`), so that a directory with
the final name is always complete and nothing finished is lost to a kill or a full disk. Staging directories are
made with `mkdir` (not `tempfile.mkdtemp`, whose 0700 mode would survive the rename).

File names, JSON/JSONL and single-file atomic writes live in `lora_ogpsa.utils.files`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lora_ogpsa.utils.errors import InputError
from lora_ogpsa.utils.files import partial_path

logger = logging.getLogger(__name__)


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
