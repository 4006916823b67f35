"""The first code of the `lora-ogpsa` command: SIGTERM and Ctrl-C end it cleanly from the first instant.

Importing torch, transformers and TRL takes seconds; a signal in that time used to print a long traceback
(SIGINT) or end the process with no word and its lock file left (SIGTERM). This module imports nothing heavy:
it turns SIGTERM into an exception (so every `finally`, the output lock's included, runs), and only then
imports the command.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

from lora_ogpsa.utils.errors import Terminated, interrupted


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `lora-ogpsa` and `python -m lora_ogpsa`; returns the exit status."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        from lora_ogpsa.cli import main as command
    except KeyboardInterrupt as error:
        status, message = interrupted(error)
        print(f"lora-ogpsa: {message}", file=sys.stderr)
        return status
    return command(argv)


def _terminate(signum: int, frame: object) -> None:
    raise Terminated
