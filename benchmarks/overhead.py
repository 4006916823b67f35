"""Cost of OGPSA per optimizer step next to plain QLoRA, and next to the authors' projector.

1. Step overhead: median optimizer-step time of `update` and `grad` mode over `none` (refresh excluded), one
   process, modes interleaved step by step so that drift in machine speed hits them alike.
2. The authors' approach, emulated faithfully: a tensor hook on every trainable tensor, firing every
   micro-batch, with the reference direction (rank 2) kept on the CPU in bf16 and copied to the device and
   to float32 at every call; versus ours, once per optimizer step, with k = 8.
3. Memory: bytes held by the bases (expected k × LoRA parameters × 4) and by the update-mode snapshot.
4. The floor: the projection's arithmetic (≈ 4·k·n flops for n LoRA parameters) and memory traffic
   (reading the bases twice) next to the measured time and the step's own arithmetic (≈ 6 · parameters ·
   tokens).

    python -m benchmarks.overhead                 # SmolLM2-135M, 4-bit, r = 16, k = 8
    python -m benchmarks.overhead --quick         # tiny model, smoke test
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch

from benchmarks.common import parser, table, write_json
from benchmarks.workload import QUICK, Workload, build_model, resolve_model, synchronize, training_batch
from lora_ogpsa.callback.router import OGPSACallback
from lora_ogpsa.config import OGPSAConfig
from lora_ogpsa.core.subspace import compute_subspace

MODES = ("none", "update", "grad", "authors")


class AuthorsProjector:
    """The method authors' projector: per-tensor hooks, every micro-batch, basis on the CPU in bf16."""

    def __init__(self, parameters: dict[str, torch.nn.Parameter], directions: int = 2, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.cpu_bf16 = {name: torch.linalg.qr(torch.randn(p.numel(), directions, generator=generator))[0].T
                         .contiguous().to(torch.bfloat16) for name, p in parameters.items()}
        self.seconds = 0.0
        self.handles = [p.register_hook(self._hook(name)) for name, p in parameters.items()]

    def _hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            direction = self.cpu_bf16[name].to(grad.device, torch.float32)  # copied at every call, as they do
            flat = grad.reshape(-1).float()
            projected = (flat - (direction @ flat) @ direction).view_as(grad).to(grad.dtype)
            self.seconds += time.perf_counter() - start
            return projected
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _Args:
    should_save = False


def _installed_callback(mode: str, parameters, k: int, samples: int) -> OGPSACallback:
    """A callback with a k-direction basis installed (from random samples: timing does not depend on them)."""
    callback = OGPSACallback(OGPSAConfig(project=mode, max_directions=k, energy=1.0), [])
    callback._parameters = parameters
    generator = torch.Generator().manual_seed(2)
    fake = {name: torch.randn(samples, *p.shape, generator=generator).to(p.device) for name, p in parameters.items()}
    callback._install(compute_subspace(fake, max_directions=k, energy=1.0))
    return callback


def _step(model, optimizer, batch, micro_batches: int, callback: OGPSACallback | None) -> tuple[float, float]:
    """One optimizer step of `micro_batches` forward/backward passes; returns (step seconds, projection seconds)."""
    start = time.perf_counter()
    for _ in range(micro_batches):
        (model(**batch).loss / micro_batches).backward()
    synchronize(next(model.parameters()).device)
    projection = time.perf_counter()
    if callback is not None:
        callback.on_pre_optimizer_step(_Args(), None, None)
    optimizer.step()
    if callback is not None:
        callback.on_optimizer_step(_Args(), None, None)
    synchronize(next(model.parameters()).device)
    projection_end = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    synchronize(next(model.parameters()).device)
    total = time.perf_counter() - start
    optimizer_only = projection_end - projection
    return total, optimizer_only


def measure(path, workload: Workload, *, quantize: bool, repeats: int, micro_batches: int) -> dict:
    model, parameters = build_model(path, quantize=quantize, rank=workload.rank)
    batch = training_batch(model.config.vocab_size, workload, device=next(model.parameters()).device)
    optimizer = torch.optim.AdamW(parameters.values(), lr=1e-5)
    callbacks = {mode: _installed_callback(mode, parameters, workload.k, 64 if workload.k > 4 else 8)
                 for mode in ("update", "grad")}
    steps, optimizer_parts = defaultdict(list), defaultdict(list)
    authors_hook_seconds = []
    _step(model, optimizer, batch, micro_batches, None)  # warm-up
    for _ in range(repeats):
        for mode in MODES:
            projector = AuthorsProjector(parameters) if mode == "authors" else None
            total, optimizer_part = _step(model, optimizer, batch, micro_batches, callbacks.get(mode))
            if projector is not None:
                projector.remove()
                authors_hook_seconds.append(projector.seconds)
            steps[mode].append(total)
            optimizer_parts[mode].append(optimizer_part)
    lora_parameters = sum(p.numel() for p in parameters.values())
    tokens = workload.batch_size * workload.length * micro_batches
    base_parameters = sum(p.numel() for p in model.parameters())
    return {
        "median_step_seconds": {mode: statistics.median(values) for mode, values in steps.items()},
        "median_optimizer_seconds": {mode: statistics.median(values) for mode, values in optimizer_parts.items()},
        "authors_hook_seconds_per_step": statistics.median(authors_hook_seconds),
        "lora_parameters": lora_parameters,
        "basis_bytes": callbacks["update"].subspace.nbytes,
        "expected_basis_bytes": workload.k * lora_parameters * 4,
        "snapshot_bytes": lora_parameters * 4,
        "projection_flops": 4 * workload.k * lora_parameters,
        "step_flops": 6 * base_parameters * tokens,
        "micro_batches": micro_batches,
        "quantize": quantize,
    }


def _bandwidth() -> float:
    """Bytes per second of a plain read of 256 MiB (the projection's floor is reading the bases twice)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = torch.ones(2**26, device=device)
    data.sum()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(3):
        data.sum()
    synchronize(device)
    return 3 * data.numel() * 4 / (time.perf_counter() - start)


def report(name: str, result: dict, bandwidth: float) -> list[list]:
    steps, optimizer = result["median_step_seconds"], result["median_optimizer_seconds"]
    plain = steps["none"]
    rows = []
    for mode in MODES:
        projection = optimizer[mode] - optimizer["none"] if mode in ("update", "grad") else (
            result["authors_hook_seconds_per_step"] if mode == "authors" else 0.0)
        rows.append([name, mode, steps[mode] * 1000, 100 * (steps[mode] - plain) / plain, projection * 1000])
    return rows


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    workload = QUICK if args.quick else Workload()
    repeats = 1 if args.quick else 5
    bandwidth = _bandwidth()
    results, rows = {}, []
    runs = [("tiny", resolve_model(None, True), False)] if args.quick else [
        ("SmolLM2-135M 4-bit", resolve_model(args.model, False), True), ("tiny", resolve_model(None, True), True)]
    for name, path, quantize in runs:
        for micro_batches in (1, 4):
            key = f"{name}, {micro_batches} micro-batch{'es' if micro_batches > 1 else ''}"
            results[key] = measure(path, workload if name != "tiny" else QUICK, quantize=quantize,
                                   repeats=repeats, micro_batches=micro_batches)
            rows += report(key, results[key], bandwidth)
    print(table(["model", "mode", "step ms (median)", "overhead vs none %", "projection ms"], rows))
    main_result = next(iter(results.values()))
    floor_ms = 2 * main_result["basis_bytes"] / bandwidth * 1000
    print(f"\nbases: {main_result['basis_bytes'] / 2**20:.1f} MiB (expected k × LoRA params × 4 = "
          f"{main_result['expected_basis_bytes'] / 2**20:.1f} MiB); update-mode snapshot "
          f"{main_result['snapshot_bytes'] / 2**20:.1f} MiB")
    print(f"projection arithmetic {main_result['projection_flops'] / 1e6:.0f} MFLOP vs step "
          f"{main_result['step_flops'] / 1e9:.0f} GFLOP ({100 * main_result['projection_flops'] / main_result['step_flops']:.3f}%); "
          f"memory floor (bases read twice at {bandwidth / 1e9:.0f} GB/s) {floor_ms:.1f} ms")
    path = write_json("overhead", {"workload": vars(workload), "bandwidth_bytes_per_second": bandwidth,
                                   "results": results}, args.output_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
