"""Peak memory of OGPSA next to plain QLoRA: each mode in a fresh process, on the same model and data.

The child loads the model, resets the kernel's peak counter, then runs what training runs: (OGPSA only) a
refresh — per-example reference gradients, held as S float32 samples per LoRA tensor until the subspace is
computed — and a few optimizer steps with the projection. Reported: peak RSS above the loaded model, and the
bytes held by the bases (expected k × LoRA parameters × 4) and, in update mode, by the snapshot of θ.

    python -m benchmarks.memory            # SmolLM2-135M, 4-bit, r = 16, k = 8, S = 64
    python -m benchmarks.memory --quick    # tiny model, smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks.common import parser, reset_peak_rss, rss_mb, table, write_json
from benchmarks.workload import QUICK, Workload, resolve_model

MODES = ("none", "update", "grad")


def child(mode: str, model_path: str, quick: bool) -> None:
    """In the subprocess: load, reset the peak, refresh + 3 steps, print JSON."""
    import torch

    from benchmarks.overhead import _Args, _step
    from benchmarks.workload import build_model, reference_batches, training_batch
    from lora_ogpsa.callback import OGPSACallback
    from lora_ogpsa.config import OGPSAConfig

    workload = QUICK if quick else Workload()
    model, parameters = build_model(model_path, quantize=True, rank=workload.rank)
    batch = training_batch(model.config.vocab_size, workload)
    optimizer = torch.optim.AdamW(parameters.values(), lr=1e-6)
    loaded = rss_mb()
    reset_peak_rss()
    callback = None
    if mode != "none":
        config = OGPSAConfig(project=mode, max_directions=workload.k, energy=1.0,
                             reference_examples=workload.reference_examples)
        callback = OGPSACallback(config, reference_batches(model.config.vocab_size, workload), progress=False)
        state = type("State", (), {"global_step": 0})()
        callback.on_train_begin(_Args(), state, None, model=model, optimizer=optimizer)
    for _ in range(3):
        _step(model, optimizer, batch, 1, callback)
    lora = sum(p.numel() for p in parameters.values())
    print(json.dumps({"mode": mode, "loaded_mb": loaded, "peak_mb": rss_mb("VmHWM"),
                      "basis_mb": callback.subspace.nbytes / 2**20 if callback else 0.0,
                      "expected_basis_mb": workload.k * lora * 4 / 2**20 if callback else 0.0,
                      "snapshot_mb": lora * 4 / 2**20 if mode == "update" else 0.0,
                      "samples_mb": workload.reference_examples * lora * 4 / 2**20 if callback else 0.0}))


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = arguments.parse_args()
    model_path = str(resolve_model(args.model, args.quick))
    if args.child:
        child(args.child, model_path, args.quick)
        return
    results = []
    for mode in MODES:
        command = [sys.executable, "-m", "benchmarks.memory", "--child", mode, "--model", model_path]
        completed = subprocess.run(command + (["--quick"] if args.quick else []), capture_output=True, text=True,
                                   check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if completed.returncode != 0:
            raise RuntimeError(f"{mode} child failed:\n{completed.stderr[-3000:]}")
        results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    plain = results[0]["peak_mb"] - results[0]["loaded_mb"]
    rows = [[r["mode"], r["loaded_mb"], r["peak_mb"] - r["loaded_mb"], r["peak_mb"] - r["loaded_mb"] - plain,
             r["basis_mb"], r["expected_basis_mb"], r["snapshot_mb"], r["samples_mb"]] for r in results]
    print(table(["mode", "model loaded MiB", "peak above loaded MiB", "extra vs none MiB", "bases MiB",
                 "expected k·n·4 MiB", "update snapshot MiB", "reference samples (transient) MiB"], rows))
    path = write_json("memory_quick" if args.quick else "memory", {"results": results}, args.output_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
