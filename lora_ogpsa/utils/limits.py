"""Bounds on work a file can make a command do: a time limit for code driven by the user's files (a chat
template is a program: nested loops in it would otherwise hang the command forever)."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator

from lora_ogpsa.utils.errors import InputError

TEMPLATE_SECONDS = 10.0
"""How long rendering one row (or the probe conversation) through a chat template may take; a real template
takes milliseconds."""


class TimeLimitError(InputError):
    """A block driven by the user's files ran over its time limit (bad input: exit 2, one line)."""


class _Expired(BaseException):
    """Raised by the alarm inside the timed block; a BaseException, so no `except Exception` in the block
    (a template's own error handling, ours) swallows it."""


@contextlib.contextmanager
def time_limit(seconds: float, message: str) -> Iterator[None]:
    """Run the block for at most `seconds` of wall time, else raise TimeLimitError (an InputError) with `message`.

    The limit is a SIGALRM timer, so it holds in the main thread only (elsewhere the block runs unbounded); the
    previous handler and an outer timer (its time left) are put back afterwards.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise _Expired

    previous = signal.signal(signal.SIGALRM, expire)
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds)  # an outer timer: put back after
    started = time.monotonic()
    try:
        yield
    except _Expired as error:
        raise TimeLimitError(message) from error
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay > 0:
            left = max(outer_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, outer_interval)


def template_time_limit(where: str) -> contextlib.AbstractContextManager[None]:
    """`time_limit` of TEMPLATE_SECONDS for rendering one row through the chat template, the error naming
    `where` (FLAG FILE:LINE)."""
    return time_limit(TEMPLATE_SECONDS, f"{where}: the chat template did not render this row in {TEMPLATE_SECONDS:g} "
                                        "s (a loop without end?); fix the template or give another with "
                                        "--chat_template_path")
