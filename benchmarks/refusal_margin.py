"""Cost of a refresh with the refusal-margin reference objective, as a ratio to the NLL objective at the same
number of reference rows (`OGPSAConfig.reference_objective`): the per-example collection into the sketch, as
the callback runs it, for `nll`, `refusal_margin` and `both`.

Reference rows are random tokens (prompt = first half, answer = second half, as in `benchmarks.refresh`); the
refusal continuations are the real ones (`refusal.GENERIC_REFUSALS`, 24 texts, through the model's chat
template), so the prefix tree a margin row carries has its real size.

    python -m benchmarks.refusal_margin            # SmolLM2-135M, 4-bit, r = 16, 64 reference rows
    python -m benchmarks.refusal_margin --quick    # tiny model, smoke test
    python -m benchmarks.refusal_margin --rows 32 --repeats 1   # a shorter SmolLM2 run
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from benchmarks.common import parser, table, write_json
from benchmarks.workload import QUICK, Workload, build_model, reference_batches, resolve_model, synchronize
from lora_ogpsa.config import OGPSAConfig
from lora_ogpsa.data.rows import tokenize_prompt_completion
from lora_ogpsa.models.loading import load_tokenizer
from lora_ogpsa.refusal import GENERIC_REFUSALS
from lora_ogpsa.signals.margin import make_margin_batches, margin_example
from lora_ogpsa.signals.reference import collect_reference_sketch


def refusal_openings(tokenizer, tokens: int) -> list[list[int]]:
    """The first `tokens` tokens of every generic refusal, as the assistant turn of the chat template."""
    openings = []
    for text in GENERIC_REFUSALS:
        example = tokenize_prompt_completion(tokenizer, {"prompt": [{"role": "user", "content": "Hi"}],
                                                         "completion": [{"role": "assistant", "content": text}]},
                                             max_length=None)
        start = example.completion_mask.index(1)
        openings.append(example.input_ids[start:start + tokens])
    return openings


def margin_batches(nll_batches, openings, *, tokens: int, batch_size: int):
    """The NLL rows' prompts and answers with the refusal openings, packed as `build_reference_set` packs them."""
    examples = []
    for batch in nll_batches:
        for ids, weights in zip(batch.input_ids, batch.loss_weights, strict=True):
            start = int((weights > 0).float().argmax()) + 1  # first answer token (weights predict token t + 1)
            ids = ids.tolist()
            examples.append(margin_example(ids[:start], ids[start:], openings, tokens=tokens))
    return make_margin_batches(examples, batch_size=batch_size, pad_token_id=0)


def row_lengths(batches) -> list[int]:
    """Tokens in each packed margin row: every tree position predicts a token, so the last one is a target's."""
    return [int(batch.targets[batch.targets[:, 0] == row, 1].max()) + 1
            for batch in batches for row in range(batch.input_ids.shape[0])]


def refresh_seconds(model, parameters, batches, rows: int, repeats: int) -> float:
    """Median seconds of one reference collection into the sketch (what a refresh spends beyond the solve)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        collect_reference_sketch(model, batches, parameters, rows=rows, progress=False)
        synchronize(next(model.parameters()).device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--rows", type=int, help="reference rows (default: the workload's, 64; --quick 8)")
    arguments.add_argument("--repeats", type=int, help="timed collections per objective (default 3; --quick 1)")
    args = arguments.parse_args()
    workload = QUICK if args.quick else Workload()
    if args.rows:
        workload = dataclasses.replace(workload, reference_examples=args.rows)
    path = resolve_model(args.model, args.quick)
    model, parameters = build_model(path, quantize=True, rank=workload.rank)
    batch_size = 4 if args.quick else 8
    tokens = OGPSAConfig().margin_tokens
    nll = reference_batches(model.config.vocab_size, workload, batch_size=batch_size)
    margin = margin_batches(nll, refusal_openings(load_tokenizer(path), tokens), tokens=tokens, batch_size=batch_size)
    rows = max(workload.sketch_rows, 2 * batch_size)
    by_objective = {"nll": nll, "refusal_margin": margin, "both": [*nll, *margin]}
    refresh_seconds(model, parameters, by_objective["both"][:2], rows, repeats=1)  # warm-up
    repeats = args.repeats or (1 if args.quick else 3)
    seconds = {name: refresh_seconds(model, parameters, batches, rows, repeats) for name, batches in by_objective.items()}
    lengths = {"nll": float(torch.cat([b.attention_mask.sum(-1) for b in nll]).float().mean()),
               "refusal_margin": statistics.mean(row_lengths(margin))}
    lengths["both"] = lengths["nll"] + lengths["refusal_margin"]
    count = workload.reference_examples
    print(f"{count} reference rows of {workload.reference_length} tokens (prompt = answer = half); refusal margin over "
          f"{tokens} tokens against {len(GENERIC_REFUSALS)} refusals; sketch of ℓ = {rows} rows; "
          f"{torch.get_num_threads()} threads")
    print(table(["objective", "collection s", "per row s", "tokens per row", "ratio to nll"], [
        [name, value, value / count, lengths[name], value / seconds["nll"]] for name, value in seconds.items()]))
    written = write_json("refusal_margin", {"workload": vars(workload), "margin_tokens": tokens,
                                            "refusals": len(GENERIC_REFUSALS), "seconds": seconds,
                                            "tokens_per_row": lengths,
                                            "ratio": {name: value / seconds["nll"] for name, value in seconds.items()}},
                         args.output_dir)
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
