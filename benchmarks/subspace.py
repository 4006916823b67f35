"""Cost of the subspace math at SmolLM2-135M scale: batched `compute_subspace` vs a per-tensor SVD loop,
and one projection of every LoRA tensor.

Shapes: r = 16 on all linear layers of SmolLM2-135M (30 layers × q,k,v,o,gate,up,down × lora_A, lora_B =
420 tensors, 4.88 M parameters), S = 64 samples, k = 8.

    python -m benchmarks.subspace            # full size
    python -m benchmarks.subspace --quick    # tiny smoke run
"""

from __future__ import annotations

import torch

from benchmarks.common import median_seconds, parser, table, write_json
from lora_ogpsa import compute_subspace
from lora_ogpsa.core.projector import StackedBasis

HIDDEN, INTERMEDIATE, KV, LAYERS = 576, 1536, 192, 30
MODULES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV), "o_proj": (HIDDEN, HIDDEN),
           "gate_proj": (HIDDEN, INTERMEDIATE), "up_proj": (HIDDEN, INTERMEDIATE), "down_proj": (INTERMEDIATE, HIDDEN)}


def lora_shapes(rank: int, layers: int) -> dict[str, tuple[int, int]]:
    """Parameter shapes of every lora_A / lora_B weight, keyed like PEFT's adapter file."""
    shapes = {}
    for layer in range(layers):
        for module, (fan_in, fan_out) in MODULES.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (rank, fan_in)
            shapes[f"{prefix}.lora_B.weight"] = (fan_out, rank)
    return shapes


def per_tensor_svd(samples_by_name: dict[str, torch.Tensor], k: int) -> None:
    for samples in samples_by_name.values():
        torch.linalg.svd(samples.reshape(samples.shape[0], -1), full_matrices=False).Vh[:k]


def batched_svd(samples_by_name: dict[str, torch.Tensor], k: int) -> None:
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for samples in samples_by_name.values():
        by_shape.setdefault(tuple(samples.shape), []).append(samples.reshape(samples.shape[0], -1))
    for group in by_shape.values():
        torch.linalg.svd(torch.stack(group), full_matrices=False).Vh[:, :k]


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    rank, layers, samples, k, repeats = (16, LAYERS, 64, 8, 5) if not args.quick else (4, 2, 8, 2, 1)
    generator = torch.Generator().manual_seed(0)
    samples_by_name = {name: torch.randn(samples, *shape, generator=generator)
                       for name, shape in lora_shapes(rank, layers).items()}
    parameters = sum(value[0].numel() for value in samples_by_name.values())

    def batched():
        return compute_subspace(samples_by_name, max_directions=k, energy=1.0)

    subspace = batched()
    stacked = StackedBasis(subspace.basis_by_name)
    updates = {name: torch.randn(value.shape[1:], generator=generator) for name, value in samples_by_name.items()}
    before = stacked.snapshot(updates)
    timings = {
        "compute_subspace (batched Gram + eigh)": median_seconds(batched, repeats=repeats),
        "per-tensor torch.linalg.svd loop": median_seconds(lambda: per_tensor_svd(samples_by_name, k),
                                                           repeats=1, warmup=0),
        "batched torch.linalg.svd on stacked (P, S, n)": median_seconds(lambda: batched_svd(samples_by_name, k),
                                                                        repeats=1, warmup=0),
        "project all tensors once (grad mode)": median_seconds(lambda: stacked.project_(updates),
                                                               repeats=repeats * 4),
        "project the change of all tensors (update mode)": median_seconds(
            lambda: stacked.project_change_(updates, before), repeats=repeats * 4),
    }
    targets = {"compute_subspace (batched Gram + eigh)": 1.0, "project all tensors once (grad mode)": 0.020}
    rows = [[what, seconds * 1000, (f"< {targets[what] * 1000:.0f}" if what in targets else "")]
            for what, seconds in timings.items()]
    print(f"{len(samples_by_name)} LoRA tensors, {parameters / 1e6:.2f} M parameters, S = {samples}, k = {k}, "
          f"torch threads = {torch.get_num_threads()}")
    print(table(["operation", "ms (median)", "target ms"], rows))
    speedup = timings["per-tensor torch.linalg.svd loop"] / timings["compute_subspace (batched Gram + eigh)"]
    print(f"batched vs per-tensor SVD: {speedup:.1f}x faster; bases hold {subspace.nbytes / 2**20:.0f} MiB")
    path = write_json("subspace", {"tensors": len(samples_by_name), "parameters": parameters, "samples": samples,
                                   "k": k, "seconds": timings, "speedup_vs_svd_loop": speedup,
                                   "basis_megabytes": subspace.nbytes / 2**20}, args.output_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
