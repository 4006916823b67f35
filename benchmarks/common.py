"""Timing, tables and JSON output shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RESULTS_DIR = Path("runs/bench")


def median_seconds(function: Callable[[], object], *, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `function()` over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table (it reads fine in a terminal too)."""
    cells = [[_format(value) for value in row] for row in rows]
    widths = [max(len(str(header)), *(len(row[i]) for row in cells)) for i, header in enumerate(headers)]
    lines = ["| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    return "\n".join(lines)


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def write_json(name: str, payload: dict, output_dir: Path = RESULTS_DIR) -> Path:
    """Write `payload` (plus the machine description) to `<output_dir>/<name>.json`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes."""
    result = argparse.ArgumentParser(description=description)
    result.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    result.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke test)")
    result.add_argument("--model", help="a local model directory instead of the embedded SmolLM2-135M-Instruct")
    return result


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory in MiB: `VmRSS` now, `VmHWM` the peak (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0), so that a peak excludes what came before (the imports)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Memory in use and its peak since `reset_peak()`, in MiB: the CUDA allocator's for a CUDA device (where
    the model, activations and samples live), the process's resident set size otherwise."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"

    def current(self) -> float:
        return torch.cuda.memory_allocated() / 2**20 if self.cuda else rss_mb()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()

    def peak(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return rss_mb("VmHWM")


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
