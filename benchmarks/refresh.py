"""Cost of a subspace refresh, and what it costs next to training.

(a) our per-example collection: one forward/backward per micro-batch of reference examples, per-example LoRA
    gradients read off hooks, then `compute_subspace`; (a') the same reduced into the streaming sketch as the
    callback does (`collect_reference_sketch`, ℓ = 32 rows);
(b) the naive way: one backward pass per reference example;
(c) a refresh as a share of training time, `refresh / (refresh_every · step + refresh)`, over a grid of
    reference-set sizes and refresh intervals (from the measured per-example cost and step time), and for a
    whole run including the two refreshes every run pays at its start (before and after step 1).

    python -m benchmarks.refresh            # SmolLM2-135M, 4-bit, r = 16, 64 reference examples
    python -m benchmarks.refresh --quick    # tiny model, smoke test
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import parser, table, write_json
from benchmarks.workload import (
    QUICK,
    Workload,
    build_model,
    reference_batches,
    resolve_model,
    synchronize,
    training_batch,
)
from lora_ogpsa.core.subspace import compute_subspace
from lora_ogpsa.signals.reference import collect_reference_samples, collect_reference_sketch, example_losses

INTERVALS = (10, 20, 50, 100)
EXAMPLES = (16, 32, 64)


def per_example(model, parameters, batches, k: int) -> tuple[float, float]:
    """(collection seconds, subspace seconds) holding every sample, then `compute_subspace`."""
    start = time.perf_counter()
    samples, _ = collect_reference_samples(model, batches, parameters, progress=False)
    collected = time.perf_counter()
    compute_subspace(samples, max_directions=k, energy=1.0)
    return collected - start, time.perf_counter() - collected


def per_example_sketch(model, parameters, batches, k: int, rows: int) -> tuple[float, float]:
    """(collection seconds, subspace seconds) of a refresh as the callback runs it: samples into the sketch."""
    start = time.perf_counter()
    sketch, _ = collect_reference_sketch(model, batches, parameters, rows=rows, progress=False)
    collected = time.perf_counter()
    sketch.subspace(max_directions=k, energy=1.0)
    return collected - start, time.perf_counter() - collected


def single_example_passes(model, parameters, batches) -> float:
    """Seconds for one backward pass per example, copying each example's gradients out."""
    singles = [batch for whole in batches for batch in _split(whole)]
    start = time.perf_counter()
    for batch in singles:
        model.zero_grad(set_to_none=True)
        example_losses(model, batch).sum().backward()
        [parameter.grad.clone() for parameter in parameters.values()]
    synchronize(next(model.parameters()).device)
    return time.perf_counter() - start


def _split(batch):
    from lora_ogpsa.signals.reference import ReferenceBatch

    return [ReferenceBatch(batch.input_ids[i:i + 1], batch.attention_mask[i:i + 1], batch.loss_weights[i:i + 1])
            for i in range(batch.input_ids.shape[0])]


def step_seconds(model, parameters, workload: Workload, repeats: int) -> float:
    """Median seconds of one training step (forward, backward, AdamW) at the workload's batch size."""
    device = next(model.parameters()).device
    batch = training_batch(model.config.vocab_size, workload, device=device)
    optimizer = torch.optim.AdamW(parameters.values(), lr=1e-6)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def overhead_grid(refresh_per_example: float, subspace_seconds: float, step: float) -> list[list]:
    rows = []
    for examples in EXAMPLES:
        refresh = examples * refresh_per_example + subspace_seconds
        shares = [100 * refresh / (interval * step + refresh) for interval in INTERVALS]
        run_100 = 100 * (2 + 100 // 20) * refresh / (100 * step + (2 + 100 // 20) * refresh)
        rows.append([examples, refresh, *shares, run_100])
    return rows


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    workload = QUICK if args.quick else Workload()
    model, parameters = build_model(resolve_model(args.model, args.quick), quantize=True, rank=workload.rank)
    batches = reference_batches(model.config.vocab_size, workload, batch_size=8 if not args.quick else 4)
    per_example(model, parameters, batches[:1], workload.k)  # warm-up
    collection, subspace = per_example(model, parameters, batches, workload.k)
    sketch_collection, sketch_subspace = per_example_sketch(model, parameters, batches, workload.k,
                                                            workload.sketch_rows)
    naive = single_example_passes(model, parameters, batches)
    step = step_seconds(model, parameters, workload, repeats=1 if args.quick else 3)
    count = workload.reference_examples
    refresh = collection + subspace
    print(f"{count} reference examples of {workload.reference_length} tokens; training step: batch "
          f"{workload.batch_size} × {workload.length} tokens = {step:.2f} s")
    print(table(["refresh", "seconds", "per example", "speed-up"], [
        ["(a) per-example collection + compute_subspace", refresh, refresh / count, naive / collection],
        ["    of which compute_subspace", subspace, "", ""],
        [f"(a') the same into a sketch of ℓ = {workload.sketch_rows} rows (what a refresh runs)",
         sketch_collection + sketch_subspace, (sketch_collection + sketch_subspace) / count, naive / sketch_collection],
        ["    of which sketch.subspace", sketch_subspace, "", ""],
        ["(b) one backward per example", naive, naive / count, 1.0],
    ]))
    share_20 = 100 * refresh / (20 * step + refresh)
    print(f"(c) at refresh_every=20: a refresh is {share_20:.1f}% of training time\n")
    grid = overhead_grid(collection / count, subspace, step)
    print(table(["reference examples", "refresh s", *[f"every {n} steps %" for n in INTERVALS],
                 "100-step run, every 20 (incl. 2 start refreshes) %"], grid))
    path = write_json("refresh", {"workload": vars(workload), "collection_seconds": collection,
                                  "subspace_seconds": subspace, "sketch_collection_seconds": sketch_collection,
                                  "sketch_subspace_seconds": sketch_subspace,
                                  "single_example_seconds": naive, "step_seconds": step,
                                  "speedup": naive / collection, "share_at_refresh_every_20": share_20,
                                  "grid": grid}, args.output_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
