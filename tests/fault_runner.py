"""Run `lora-ogpsa ARGS...` in this process and inject a fault at a chosen file: for tests/test_faults.py.

FAULT_AT is a glob matched against the full path of every file the run writes (torch.save, safetensors'
save_file, open() for writing) and of every directory rename (source or target). FAULT is what happens there:

- `kill`: SIGKILL this process right after the file is written (so the file has appeared) or right before the
  rename — a kill -9 at exactly that point, without timing races;
- `pause`: write FAULT_FLAG and wait until it is removed, then go on (to hold a run at a point, e.g. for a
  concurrent second run);
- `enospc`: raise OSError(ENOSPC) instead of writing, as a full disk does.
"""

import builtins
import errno
import fnmatch
import io
import os
import signal
import sys
import time
from pathlib import Path

PATTERN = os.environ["FAULT_AT"]
FAULT = os.environ.get("FAULT", "kill")


def _matches(path) -> bool:
    return fnmatch.fnmatch(os.path.abspath(os.fspath(path)), PATTERN)


def _fault(before: bool) -> None:
    if FAULT == "enospc" and before:
        raise OSError(errno.ENOSPC, "No space left on device")
    if FAULT == "kill" and not before:
        os.kill(os.getpid(), signal.SIGKILL)
    if FAULT == "pause" and not before:
        flag = Path(os.environ["FAULT_FLAG"])
        flag.write_text(str(os.getpid()))
        while flag.exists():
            time.sleep(0.05)


def _writer(function, path_index: int = 1):
    def wrapped(*args, **kwargs):
        path = args[path_index] if len(args) > path_index else None
        hit = isinstance(path, str | os.PathLike) and _matches(path)
        if hit:
            _fault(before=True)
        result = function(*args, **kwargs)
        if hit:
            _fault(before=False)
        return result
    return wrapped


def _renamer(function):
    def wrapped(source, target, *args, **kwargs):
        if _matches(source) or _matches(target):
            _fault(before=True)
            if FAULT == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
        return function(source, target, *args, **kwargs)
    return wrapped


def _opener(function):
    def wrapped(file, mode="r", *args, **kwargs):
        writing = any(flag in mode for flag in "wax+")
        hit = writing and isinstance(file, str | os.PathLike) and _matches(file)
        if hit:
            _fault(before=True)
        handle = function(file, mode, *args, **kwargs)
        if hit and FAULT != "enospc":
            close = handle.close

            def close_then_fault():
                close()
                _fault(before=False)
            handle.close = close_then_fault
        return handle
    return wrapped


def main() -> int:
    import safetensors.torch
    import torch

    torch.save = _writer(torch.save)
    safetensors.torch.save_file = _writer(safetensors.torch.save_file)
    builtins.open = io.open = _opener(builtins.open)
    os.rename = _renamer(os.rename)
    os.replace = _renamer(os.replace)

    from lora_ogpsa.entry import main as command  # the console script's entry: its signal handling too

    return command(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
