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
