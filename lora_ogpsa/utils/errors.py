"""The exception that means "the user's input is wrong" (the command exits 2 on it), and the one that means
"stopped by SIGTERM" (143), with the line a stopped command prints."""

import signal


class InputError(ValueError):
    """Bad input: a missing or malformed file, row or field, a model path that is not a model, a flag out of
    range. The message is one line that names what is wrong, where (file, row, field) and how to fix it."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (the type name when it has none): for one-line errors."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised wherever the process is, like Ctrl-C's KeyboardInterrupt."""


def interrupted(error: KeyboardInterrupt) -> tuple[int, str]:
    """The shell's status for the signal that stopped the command (130, 143) and the one line that says so."""
    terminated = isinstance(error, Terminated)
    return (128 + (signal.SIGTERM if terminated else signal.SIGINT),
            f"{'terminated' if terminated else 'interrupted'} (a training run keeps its checkpoints in "
            "OUTPUT.partial; rerun with --resume)")


_TORCH_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed writing")
"""What torch.save says when the disk fills under it (its zip writer checks positions, not errno)."""


def disk_full_line(error: BaseException, output: object = None) -> str | None:
    """One line for a write that ran out of space: `no space left on DEVICE while writing FILE`, or None when
    `error` is not that. FILE is the one the error names, else `output` (the command's output, kept as it was:
    every command writes into a temporary sibling, `OUTPUT.partial` for a training run, and renames it into place
    when complete)."""
    import errno
    import os

    chain, seen = [], error
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    full = next((item for item in chain if isinstance(item, OSError) and item.errno == errno.ENOSPC), None)
    if full is None and not any(marker in str(item) for item in chain for marker in _TORCH_SHORT_WRITE):
        return None
    written = getattr(full, "filename", None) or output or "the output"
    if not getattr(full, "filename", None) and output and os.path.isdir(f"{output}.partial"):
        written = f"{output}.partial"  # a training run writes there until it is complete
    return (f"no space left on {_device_of(os.fspath(written))} while writing {written}; free space there and "
            "rerun (the previous output is kept as it was; a training run resumes with --resume)")


def _device_of(path: str) -> str:
    """`DEVICE (mounted at MOUNT)` of the file system holding `path`, from /proc/self/mounts (the path itself
    when that cannot be read)."""
    import os

    target = os.path.realpath(path)
    best = ("", "")
    try:
        with open("/proc/self/mounts", encoding="utf-8") as handle:
            for line in handle:
                device, mount = line.split()[:2]
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best[1]):
                    best = (device, mount)
    except (OSError, ValueError):
        return path
    return f"{best[0]} (mounted at {best[1]})" if best[1] else path
