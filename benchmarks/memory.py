"""Peak memory of OGPSA next to plain QLoRA: each case in a fresh process, on the same model and data.

The child loads the model, resets the kernel's peak counter, then runs what training runs: (OGPSA only) a
refresh — per-example reference gradients of S examples reduced into a sketch of ℓ rows per LoRA tensor
(`--exact`: all S samples held until `compute_subspace`, the path before the sketch) — and 3 optimizer steps
with the projection. Reported: peak memory above the loaded model (resident set size; on CUDA the allocator's
peak), split into the refresh's peak and the steps' peak, the ratio to plain QLoRA's, and the bytes held by the
bases (k × LoRA parameters × 4), the update-mode snapshot of θ, the sketch (min(ℓ, S) × LoRA parameters × 4)
and what holding every sample would take (S × LoRA parameters × 4).

    python -m benchmarks.memory                          # SmolLM2-135M, 4-bit, r = 16, k = 8: S = 64 and 256
    python -m benchmarks.memory --examples 64 --exact    # also the exact path at S = 64, for comparison
    python -m benchmarks.memory --quick                  # tiny model, smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

from benchmarks.common import PeakMemory, parser, table, write_json
from benchmarks.workload import QUICK, Workload, resolve_model

MODES = ("none", "update", "grad")
TARGET_RATIO = 1.25  # issue 16: update-mode peak ≤ 1.25 × plain's


def _exact_collect(model, batches, parameters, *, rows, progress):
    """The refresh before the sketch: every sample held (S × n × 4 bytes), then `compute_subspace`."""
    from lora_ogpsa.core.subspace import compute_subspace
    from lora_ogpsa.signals.reference import collect_reference_samples

    samples, losses = collect_reference_samples(model, batches, parameters, progress=progress)

    class _AllSamples:
        def subspace(self, *, max_directions, energy):
            return compute_subspace(samples, max_directions=max_directions, energy=energy)

    return _AllSamples(), losses


def child(mode: str, model_path: str, workload: Workload, exact: bool) -> dict:
    """In the subprocess: load, reset the peak, refresh, reset the peak, 3 steps; returns what it measured."""
    import torch

    import lora_ogpsa.callback.basis
    from benchmarks.overhead import _Args, _step
    from benchmarks.workload import build_model, reference_batches, training_batch
    from lora_ogpsa.callback.router import OGPSACallback
    from lora_ogpsa.config import OGPSAConfig

    if exact:
        lora_ogpsa.callback.basis.collect_reference_sketch = _exact_collect
    model, parameters = build_model(model_path, quantize=True, rank=workload.rank)
    device = next(model.parameters()).device
    memory = PeakMemory(device)
    batch = training_batch(model.config.vocab_size, workload, device=device)
    optimizer = torch.optim.AdamW(parameters.values(), lr=1e-6)
    loaded = memory.current()
    memory.reset_peak()
    callback = None
    if mode != "none":
        config = OGPSAConfig(project=mode, max_directions=workload.k, energy=1.0,
                             reference_examples=workload.reference_examples, sketch_rows=workload.sketch_rows)
        callback = OGPSACallback(config, reference_batches(model.config.vocab_size, workload), progress=False)
        state = type("State", (), {"global_step": 0})()
        callback.on_train_begin(_Args(), state, None, model=model, optimizer=optimizer)
    refresh_peak, after_refresh = memory.peak() - loaded, memory.current() - loaded
    memory.reset_peak()
    for _ in range(3):
        _step(model, optimizer, batch, 1, callback)
    lora = sum(p.numel() for p in parameters.values())
    samples = workload.reference_examples if callback else 0
    return {"mode": mode, "path": ("exact" if exact else "sketch") if callback else "", "examples": samples,
            "sketch_rows": workload.sketch_rows if callback and not exact else 0, "loaded_mb": loaded,
            "refresh_peak_mb": refresh_peak, "after_refresh_mb": after_refresh,
            "steps_peak_mb": memory.peak() - loaded, "lora_parameters": lora, "device": str(device),
            "basis_mb": callback.subspace.nbytes / 2**20 if callback else 0.0,
            "expected_basis_mb": workload.k * lora * 4 / 2**20 if callback else 0.0,
            "snapshot_mb": lora * 4 / 2**20 if mode == "update" else 0.0,
            "sketch_mb": min(workload.sketch_rows, samples) * lora * 4 / 2**20 if callback and not exact else 0.0,
            "all_samples_mb": samples * lora * 4 / 2**20}


def cases(examples: list[int], exact: bool) -> list[tuple[str, int, bool]]:
    """(mode, S, exact path) per child: plain, then update at every S, grad at the first S."""
    result = [("none", 0, False)] + [("update", count, False) for count in examples] + [("grad", examples[0], False)]
    return result + ([("update", examples[0], True)] if exact else [])


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--examples", type=int, nargs="+", help="reference examples S (default 64 256; quick 8 32)")
    arguments.add_argument("--sketch-rows", type=int, help="ℓ (default OGPSAConfig's: 16 at k = 8)")
    arguments.add_argument("--exact", action="store_true", help="also the path before the sketch, at the first S")
    arguments.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    arguments.add_argument("--child-exact", action="store_true", help=argparse.SUPPRESS)
    args = arguments.parse_args()
    base = QUICK if args.quick else Workload()
    rows = args.sketch_rows or base.sketch_rows
    model_path = str(resolve_model(args.model, args.quick))
    if args.child:
        workload = dataclasses.replace(base, reference_examples=args.examples[0], sketch_rows=rows)
        print(json.dumps(child(args.child, model_path, workload, args.child_exact)))
        return
    examples = args.examples or ([8, 32] if args.quick else [64, 256])
    results = [_run_child(mode, count, exact, rows, model_path, args.quick)
               for mode, count, exact in cases(examples, args.exact)]
    report(results)
    path = write_json("memory_quick" if args.quick else "memory",
                      {"workload": vars(base), "sketch_rows": rows, "target_ratio": TARGET_RATIO, "results": results},
                      args.output_dir)
    print(f"wrote {path}")


def _run_child(mode: str, examples: int, exact: bool, rows: int, model_path: str, quick: bool) -> dict:
    command = [sys.executable, "-m", "benchmarks.memory", "--child", mode, "--model", model_path,
               "--examples", str(max(examples, 1)), "--sketch-rows", str(rows)]
    command += (["--quick"] if quick else []) + (["--child-exact"] if exact else [])
    completed = subprocess.run(command, capture_output=True, text=True, check=False,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if completed.returncode != 0:
        raise RuntimeError(f"{mode} child (S = {examples}) failed:\n{completed.stderr[-3000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["peak_mb"] = max(result["refresh_peak_mb"], result["steps_peak_mb"])
    return result


def report(results: list[dict]) -> None:
    plain = results[0]["peak_mb"]
    rows = [[r["mode"], r["path"], r["examples"] or "", r["sketch_rows"] or "", r["loaded_mb"], r["peak_mb"],
             r["peak_mb"] / plain, r["refresh_peak_mb"], r["steps_peak_mb"], r["basis_mb"], r["snapshot_mb"],
             r["sketch_mb"], r["all_samples_mb"]] for r in results]
    print(table(["mode", "refresh", "S", "ℓ", "model loaded MiB", "peak above loaded MiB", "× plain",
                 "refresh peak MiB", "steps peak MiB", "bases MiB", "update snapshot MiB", "sketch MiB",
                 "all S samples MiB"], rows))
    update = [r for r in results if r["mode"] == "update" and r["path"] == "sketch"]
    verdict = all(r["peak_mb"] <= TARGET_RATIO * plain for r in update)
    print(f"target: update-mode peak ≤ {TARGET_RATIO} × plain at every S: {'met' if verdict else 'NOT met'}")


if __name__ == "__main__":
    main()
