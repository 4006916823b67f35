"""How far is the sketched basis from the exact one on real reference gradients? (the choice of `sketch_rows`)

SmolLM2-135M 4-bit with LoRA r = 16 on every linear layer (lora_B set to small random values, as after a few
steps, so that every tensor has a gradient), the demo's look-alike reference set (real text): the S exact
per-example gradient samples of every LoRA tensor, their exact top-k basis (`compute_subspace`), and the basis
of a Frequent Directions sketch of ℓ rows fed in micro-batches as a refresh does. Reported over tensors: the
share of the samples' energy each basis captures (exact ≥ sketch), the shortfall, and the projector distance
‖U Uᵀ − V Vᵀ‖_F / sqrt(2k) (0: the same span, 1: orthogonal).

    python -m benchmarks.sketch_accuracy      # S = 32, k = 8, ℓ = 16 and 32 (the real model: not in `make bench`)
"""

from __future__ import annotations

import statistics

import torch

from benchmarks.common import parser, table, write_json
from benchmarks.workload import build_model, resolve_model


def _captured(samples: torch.Tensor, basis: torch.Tensor) -> float:
    flat = samples.reshape(len(samples), -1).double()
    total = float(flat.square().sum())
    return float((flat @ basis.double().T).square().sum()) / total if total > 0 else 1.0


def _distance(first: torch.Tensor, second: torch.Tensor) -> float:
    k = max(len(first), len(second), 1)
    inner = float((first.double() @ second.double().T).square().sum())
    return max(0.0, (len(first) + len(second) - 2 * inner) / (2 * k)) ** 0.5


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--examples", type=int, default=32, help="reference examples S")
    arguments.add_argument("--sketch-rows", type=int, nargs="+", default=[16, 32], help="ℓ values")
    arguments.add_argument("--k", type=int, default=8)
    args = arguments.parse_args()
    from lora_ogpsa.config import OGPSAConfig
    from lora_ogpsa.core.sketch import GradientSketch
    from lora_ogpsa.core.subspace import compute_subspace
    from lora_ogpsa.demo.assets import ensure_default_model
    from lora_ogpsa.demo.data import build_demo_data
    from lora_ogpsa.models.loading import load_tokenizer
    from lora_ogpsa.signals.reference import build_reference_set, collect_reference_samples
    from lora_ogpsa.testing.tiny import randomise_lora_b_

    path = resolve_model(args.model, args.quick)
    model, parameters = build_model(path, quantize=True, rank=16)
    randomise_lora_b_(parameters, std=0.01)
    data = build_demo_data(ensure_default_model(None), None)
    config = OGPSAConfig(reference_examples=args.examples, reference_batch_size=8)
    reference = build_reference_set(data.path("reference_lookalike"), load_tokenizer(path), config, max_length=192)
    samples, _ = collect_reference_samples(model, reference.batches, parameters, progress=False)
    exact = compute_subspace(samples, max_directions=args.k, energy=1.0).basis_by_name
    rows = []
    for ell in args.sketch_rows:
        sketch = GradientSketch(parameters, rows=ell)
        for start in range(0, args.examples, 8):
            sketch.add_({name: value[start:start + 8] for name, value in samples.items()})
        sketched = sketch.subspace(max_directions=args.k, energy=1.0).basis_by_name
        exact_share = [_captured(samples[name], exact[name]) for name in samples]
        sketch_share = [_captured(samples[name], sketched[name]) for name in samples]
        shortfall = [e - s for e, s in zip(exact_share, sketch_share, strict=True)]
        distance = [_distance(exact[name], sketched[name]) for name in samples]
        rows.append({"sketch_rows": ell, "examples": args.examples, "k": args.k, "tensors": len(samples),
                     "exact_energy_median": statistics.median(exact_share),
                     "sketch_energy_median": statistics.median(sketch_share),
                     "shortfall_median": statistics.median(shortfall), "shortfall_max": max(shortfall),
                     "distance_median": statistics.median(distance), "distance_max": max(distance)})
    print(table(list(rows[0]), [list(row.values()) for row in rows]))
    print(f"wrote {write_json('sketch_accuracy', {'results': rows})}")


if __name__ == "__main__":
    main()
