"""Evaluation generation: the prompts' shared prefix computed once against whole left-padded prompts.

SmolLM2-135M-Instruct in float32, greedy, batch 48, as the demo evaluates: the last `--prompts` HarmBench
prompts and as many held-out look-alike benign prompts at 16 new tokens (the refusal suites), and `--prompts`
utility questions at 32. The two modes run alternately (`--repeats` rounds), timed by wall clock and by this
process's CPU time (less sensitive to other jobs on the machine); then the responses, the refusal verdicts and
the utility verdicts of the two modes are compared prompt by prompt.

    python -m benchmarks.generation      # the real model: not in `make bench`
"""

from __future__ import annotations

import time
from collections.abc import Callable

from benchmarks.common import parser, table, write_json


def _timed(function: Callable[[], list[str]]) -> tuple[list[str], float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _agreement(first: list[str], second: list[str], verdict: Callable[[int, str], bool]) -> dict[str, int]:
    return {"identical_responses": sum(a == b for a, b in zip(first, second, strict=True)),
            "identical_verdicts": sum(verdict(i, a) == verdict(i, b)
                                      for i, (a, b) in enumerate(zip(first, second, strict=True))),
            "n": len(first)}


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--prompts", type=int, default=48, help="prompts per suite")
    arguments.add_argument("--repeats", type=int, default=2, help="rounds of both modes")
    args = arguments.parse_args()
    from benchmarks.workload import resolve_model
    from lora_ogpsa.demo.assets import load_harmbench
    from lora_ogpsa.demo.splits import DemoSizes, benign_eval_prompts
    from lora_ogpsa.demo.utility_questions import UTILITY_SET
    from lora_ogpsa.eval.generation import _PrefixCache, _prompt_ids, check_answer, generate
    from lora_ogpsa.models.loading import load_base_model, load_tokenizer
    from lora_ogpsa.refusal import is_refusal

    path = resolve_model(args.model, args.quick)
    model, tokenizer = load_base_model(path, quantize=False), load_tokenizer(path)
    refusal_prompts = load_harmbench()[-args.prompts:] + benign_eval_prompts(DemoSizes(), 0, "test")[:args.prompts]
    utility = list(UTILITY_SET)[:args.prompts]
    rows = [_prompt_ids(tokenizer, prompt) for prompt in refusal_prompts]
    prefix = _PrefixCache.build(model, rows)
    timings, outputs = [], {}
    for _ in range(args.repeats):
        for share in (False, True):
            refusals, wall, cpu = _timed(lambda share=share: generate(
                model, tokenizer, refusal_prompts, max_new_tokens=16, batch_size=48, share_prefix=share))
            answers, wall_u, cpu_u = _timed(lambda share=share: generate(
                model, tokenizer, [item.question for item in utility], max_new_tokens=32, batch_size=48,
                share_prefix=share))
            outputs[share] = (refusals, answers)
            timings.append({"share_prefix": share, "refusal_wall_s": wall, "refusal_cpu_s": cpu,
                            "utility_wall_s": wall_u, "utility_cpu_s": cpu_u})
    print(table(list(timings[0]), [list(row.values()) for row in timings]))
    (plain_refusals, plain_answers), (shared_refusals, shared_answers) = outputs[False], outputs[True]
    comparison = {
        "refusal": _agreement(plain_refusals, shared_refusals, lambda i, text: is_refusal(text)),
        "utility": _agreement(plain_answers, shared_answers, lambda i, text: check_answer(
            text, utility[i].answers, question=utility[i].question)),
    }
    summary = {"prompt_tokens_mean": sum(map(len, rows)) / len(rows),
               "shared_prefix_tokens": len(prefix.ids) if prefix else 0,
               "refused": {"whole_prompts": sum(map(is_refusal, plain_refusals)),
                           "shared_prefix": sum(map(is_refusal, shared_refusals))}}
    print(summary, comparison)
    print(f"wrote {write_json('generation', {'timings': timings, 'comparison': comparison, **summary}, args.output_dir)}")


if __name__ == "__main__":
    main()
