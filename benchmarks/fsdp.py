"""Per-rank memory of the base under FSDP2 vs DDP on 2 processes, and the extra peak of an OGPSA refresh in each.

Each engine runs in its own `torchrun --nproc_per_node 2` job (gloo on CPU, nccl on CUDA). A rank loads the base
with LoRA, wraps it as the trainer would (DDP: `DistributedDataParallel`; FSDP2: `fully_shard` on every decoder
layer, then on the root, as accelerate's FSDP2 preparation does) and reports:

- base held: bytes of the frozen base weights this rank's tensors hold (its shards under FSDP2) — exact;
- memory in use after wrapping (CUDA: the allocator's; CPU: resident set size, which also holds what the loader
  allocated before sharding, so on CPU it overstates what FSDP2 keeps);
- the refresh's extra peak: the peak during one OGPSA refresh (per-example reference gradients of this rank's share,
  the sketch gathered, bases solved on rank 0, broadcast, sliced to the shard) above the memory in use before it;
- the bases this rank keeps (k × the LoRA parameters it holds × 4 bytes).

    python -m benchmarks.fsdp                 # SmolLM2-135M-Instruct, full precision, LoRA r = 16, k = 8, S = 64
    python -m benchmarks.fsdp --quantize      # the 4-bit base (NF4 stored as float, so FSDP2 shards it)
    python -m benchmarks.fsdp --quick         # tiny model, smoke test (tests/test_fsdp.py runs it)

On CPU, accelerate runs FSDP only on accelerators; this benchmark calls `fully_shard` itself, so it measures
FSDP2 on CPU too. It is not in `python -m benchmarks` (two 2-process jobs would double that smoke run's time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import PeakMemory, parser, table, write_json
from benchmarks.workload import QUICK, Workload, resolve_model

ENGINES = ("ddp", "fsdp2")
TARGET_RATIO = 0.6  # per-rank base memory under FSDP2 / under DDP, on 2 processes


def _wrap(model, engine: str, device):
    """The model as the trainer would hold it: DDP around it, or FSDP2 on every decoder layer and the root."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if engine == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for layer in model.get_base_model().model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _base_held_mb(model) -> float:
    from torch.distributed.tensor import DTensor

    held = 0
    for parameter in model.parameters():
        if not parameter.requires_grad:
            tensor = parameter.to_local() if isinstance(parameter, DTensor) else parameter
            held += tensor.numel() * tensor.element_size()
    return held / 2**20


def child(engine: str, model_path: str, workload: Workload, quantize: bool) -> dict:
    """In each rank: load, wrap, measure; one refresh, measure its peak."""
    import gc

    import torch
    import torch.distributed as dist

    from benchmarks.overhead import _Args
    from benchmarks.workload import build_model, reference_batches
    from lora_ogpsa.callback.router import OGPSACallback
    from lora_ogpsa.config import OGPSAConfig
    from lora_ogpsa.models.loading import lora_parameters
    from lora_ogpsa.signals import sharding

    cuda = torch.cuda.device_count() >= 2  # one GPU per rank (nccl); else both ranks on CPU (gloo)
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    if engine == "fsdp2":
        os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")  # the loader stores NF4 bytes as float
    model, _ = build_model(Path(model_path), quantize=quantize, rank=workload.rank)
    wrapped = _wrap(model, engine, device)
    gc.collect()
    memory = PeakMemory(device)
    in_use = memory.current()
    parameters = lora_parameters(model)  # after wrapping: FSDP2 replaced them by DTensor shards
    config = OGPSAConfig(max_directions=workload.k, energy=1.0, reference_examples=workload.reference_examples,
                         sketch_rows=workload.sketch_rows)
    callback = OGPSACallback(config, reference_batches(model.config.vocab_size, workload), progress=False)
    optimizer = torch.optim.AdamW(parameters.values(), lr=1e-6)
    memory.reset_peak()
    callback.on_train_begin(_Args(), type("State", (), {"global_step": 0})(), None, model=model, optimizer=optimizer)
    refresh_peak = memory.peak() - in_use
    held_lora = sum(sharding.local(p).numel() for p in parameters.values())
    del wrapped
    dist.barrier()  # rank 0 hosts the rendezvous store: no rank leaves while another still needs it
    dist.destroy_process_group()
    return {"engine": engine, "rank": int(os.environ["RANK"]), "device": str(device), "quantized": quantize,
            "base_held_mb": _base_held_mb(model), "in_use_mb": in_use, "refresh_extra_peak_mb": refresh_peak,
            "lora_parameters_held": held_lora, "bases_kept_mb": callback.subspace.nbytes / 2**20,
            "k_total": sum(callback.subspace.directions_by_name.values())}


def _run_engine(engine: str, model_path: str, quick: bool, quantize: bool, port: int) -> list[dict]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    with tempfile.TemporaryDirectory() as directory:
        command = [torchrun, "--nproc_per_node", "2", "--master_port", str(port), "-m", "benchmarks.fsdp",
                   "--child", engine, "--model", model_path, "--child-dir", directory]
        command += (["--quick"] if quick else []) + (["--quantize"] if quantize else [])
        completed = subprocess.run(command, capture_output=True, text=True, check=False,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        if completed.returncode != 0:
            raise RuntimeError(f"{engine} job failed:\n{completed.stderr[-3000:]}")
        return [json.loads(Path(directory, f"rank{rank}.json").read_text()) for rank in (0, 1)]


def report(results: list[dict]) -> dict:
    """Print the table; return the ratios FSDP2 / DDP (worst rank)."""
    rows = [[r["engine"], r["rank"], r["base_held_mb"], r["in_use_mb"], r["refresh_extra_peak_mb"],
             r["lora_parameters_held"], r["bases_kept_mb"]] for r in results]
    print(table(["engine", "rank", "base held MiB", "in use MiB", "refresh extra peak MiB", "LoRA parameters held",
                 "bases kept MiB"], rows))
    worst = {engine: {key: max(r[key] for r in results if r["engine"] == engine)
                      for key in ("base_held_mb", "in_use_mb", "refresh_extra_peak_mb")} for engine in ENGINES}
    ratios = {key: worst["fsdp2"][key] / worst["ddp"][key] for key in worst["ddp"] if worst["ddp"][key] > 0}
    verdict = ratios["base_held_mb"] <= TARGET_RATIO
    print(f"base held per rank, FSDP2 / DDP: {ratios['base_held_mb']:.3f} (target ≤ {TARGET_RATIO}: "
          f"{'met' if verdict else 'NOT met'}); in use: {ratios.get('in_use_mb', float('nan')):.3f}; "
          f"refresh extra peak: {ratios.get('refresh_extra_peak_mb', float('nan')):.3f}")
    return {"ratios": ratios, "target_met": verdict}


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--quantize", action="store_true", help="the 4-bit NF4 base (default: full precision)")
    arguments.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    arguments.add_argument("--child-dir", help=argparse.SUPPRESS)
    args = arguments.parse_args()
    workload = QUICK if args.quick else Workload()
    model_path = str(resolve_model(args.model, args.quick))
    if args.child:
        result = child(args.child, model_path, workload, args.quantize)
        Path(args.child_dir, f"rank{result['rank']}.json").write_text(json.dumps(result))
        return
    port = 29500 + os.getpid() % 1000
    results = [row for index, engine in enumerate(ENGINES)
               for row in _run_engine(engine, model_path, args.quick, args.quantize, port + index)]
    summary = report(results)
    name = "fsdp_quick" if args.quick else "fsdp" + ("_4bit" if args.quantize else "")
    path = write_json(name, {"split": "none", "workload": vars(workload), "quantized": args.quantize, "target_ratio": TARGET_RATIO,
                             **summary, "results": results}, args.output_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
