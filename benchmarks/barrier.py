"""Cost of the look-alike barrier per optimizer step, as a ratio to a plain QLoRA step (`--lookalike_barrier`).

Measured in one process, interleaved: a plain training step (forward/backward of one batch and AdamW), the
barrier's per-step work (G d₀, the dual solve, the correction; with every constraint active, the worst case), and a
barrier refresh (per-example margin gradients of n_L look-alike rows + the Gram matrix, which a refresh's first step
builds once). The ratio at refresh period
R is (step + apply + refresh / R) / step; R = 1 is "every step", fresh gradients.

    python -m benchmarks.barrier                 # SmolLM2-135M, 4-bit, r = 16, n_L = 48
    python -m benchmarks.barrier --quick         # tiny model, smoke test
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import parser, table, write_json
from benchmarks.refusal_margin import margin_batches, refusal_openings
from benchmarks.workload import (
    QUICK,
    Workload,
    build_model,
    reference_batches,
    resolve_model,
    synchronize,
    training_batch,
)
from lora_ogpsa.callback.barrier import LookalikeBarrier
from lora_ogpsa.config import OGPSAConfig
from lora_ogpsa.models.loading import load_tokenizer

PERIODS = (1, 2, 4, 8)


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    synchronize(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return time.perf_counter() - start


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--lookalike-rows", type=int, help="n_L (default 48; --quick 6)")
    arguments.add_argument("--repeats", type=int, help="timed repetitions (default 3; --quick 1)")
    args = arguments.parse_args()
    workload = QUICK if args.quick else Workload()
    rows = args.lookalike_rows or (6 if args.quick else 48)
    repeats = args.repeats or (1 if args.quick else 3)
    path = resolve_model(args.model, args.quick)
    model, parameters = build_model(path, quantize=True, rank=workload.rank)
    config = OGPSAConfig(lookalike_barrier=True, barrier_floor=1e6, lookalike_examples=rows)  # every row active
    lookalike_workload = Workload(reference_examples=rows, reference_length=workload.reference_length) \
        if not args.quick else workload
    nll = reference_batches(model.config.vocab_size, lookalike_workload, batch_size=8)[: (rows + 7) // 8]
    batches = margin_batches(nll, refusal_openings(load_tokenizer(path), config.margin_tokens),
                             tokens=config.margin_tokens, batch_size=8)
    barrier = LookalikeBarrier(config, batches, parameters)
    batch = training_batch(model.config.vocab_size, workload, device=next(model.parameters()).device)
    optimizer = torch.optim.AdamW(parameters.values(), lr=1e-4)

    def step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def apply() -> None:
        model(**batch).loss.backward()  # the step the barrier corrects (its time is subtracted below)
        barrier.snapshot()
        optimizer.step()
        barrier.apply_()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    barrier.refresh(model, 0)
    barrier.prepare()
    timings = {"step": [], "step_with_barrier": [], "refresh": []}
    for _ in range(repeats):
        timings["step"].append(_timed(step))
        timings["step_with_barrier"].append(_timed(apply))
        timings["refresh"].append(_timed(lambda: (barrier.refresh(model, 0), barrier.prepare())))
    median = {name: statistics.median(values) for name, values in timings.items()}
    apply_seconds = max(median["step_with_barrier"] - median["step"], 0.0)
    ratio = {str(period): (median["step"] + apply_seconds + median["refresh"] / period) / median["step"]
             for period in PERIODS}
    print(f"{rows} look-alike rows; training batch {workload.batch_size} × {workload.length} tokens; "
          f"{sum(p.numel() for p in parameters.values())} LoRA parameters; {torch.get_num_threads()} threads")
    print(table(["part", "seconds"], [["plain step", median["step"]], ["barrier apply (per step)", apply_seconds],
                                      ["barrier refresh", median["refresh"]]]))
    print(table(["refresh every", "step cost / plain"], [[period, value] for period, value in ratio.items()]))
    written = write_json("barrier", {"workload": vars(workload), "lookalike_rows": rows, "seconds": median,
                                     "apply_seconds": apply_seconds, "ratio_by_refresh_period": ratio}, args.output_dir)
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
