"""Evaluation generation: the prompts' shared prefix computed once against whole left-padded prompts.

SmolLM2-135M-Instruct in float32, greedy, at the demo plan's batch size (`--batch-size`), as the demo
evaluates: the last `--prompts` HarmBench prompts and as many held-out look-alike benign prompts at 16 new tokens (the refusal suites), and `--prompts`
utility questions at 32. The two modes run alternately (`--repeats` rounds), timed by wall clock and by this
process's CPU time (less sensitive to other jobs on the machine); then the responses, the refusal verdicts and
the utility verdicts of the two modes are compared prompt by prompt.

    python -m benchmarks.generation                 # the real model: not in `make bench`
    python -m benchmarks.generation --tokens-only   # the token budget of one demo evaluation, no model run

`--tokens-only` counts, over the demo's whole test split (`make demo`'s plan), the prompt tokens one evaluated
model runs through the model with and without the shared prefix, and the most tokens it decodes.
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


def token_budget(tokenizer) -> list[dict[str, int]]:
    """Per suite of one demo evaluation (test split): prompts, prompt tokens, the tokens after the shared prefix,
    and the most new tokens decoded."""
    from lora_ogpsa.demo.plan import Plan
    from lora_ogpsa.demo.splits import default_split_evaluation
    from lora_ogpsa.eval.generation import _PrefixCache, _prompt_ids

    plan = Plan()
    test = default_split_evaluation(plan.data_sizes, plan.data_seed)[plan.eval_split]
    suites = {"harmful + benign": ([*test["harmbench"], *(item.prompt for item in test["benign"])],
                                   plan.eval_max_new_tokens),
              "utility": ([item.question for item in test["utility"]], 32)}
    rows = []
    for name, (prompts, new_tokens) in suites.items():
        ids = [_prompt_ids(tokenizer, prompt) for prompt in prompts]
        shared = _PrefixCache.shared_length(ids)
        total = sum(map(len, ids))
        rows.append({"suite": name, "prompts": len(ids), "prompt_tokens": total,
                     "after_shared_prefix": total - shared * len(ids) + shared, "shared_prefix": shared,
                     "decoded_at_most": len(ids) * new_tokens})
    return rows


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--prompts", type=int, default=48, help="prompts per suite")
    arguments.add_argument("--repeats", type=int, default=2, help="rounds of both modes")
    arguments.add_argument("--batch-size", type=int, default=None,
                           help="prompts per generation batch (default: the demo plan's, `Plan.eval_batch_size`)")
    arguments.add_argument("--tokens-only", action="store_true", help="only the token budget of a demo evaluation")
    args = arguments.parse_args()
    if args.tokens_only:
        from benchmarks.workload import resolve_model
        from lora_ogpsa.models.loading import load_tokenizer

        budget = token_budget(load_tokenizer(resolve_model(args.model, args.quick)))
        print(table(list(budget[0]), [list(row.values()) for row in budget]))
        print(f"wrote {write_json('generation_tokens', {'suites': budget}, args.output_dir)}")
        return
    from benchmarks.workload import resolve_model
    from lora_ogpsa.demo.assets import load_harmbench
    from lora_ogpsa.demo.plan import Plan
    from lora_ogpsa.demo.splits import DemoSizes, benign_eval_prompts
    from lora_ogpsa.demo.utility_questions import UTILITY_SET
    from lora_ogpsa.eval.generation import _PrefixCache, _prompt_ids, check_answer, generate
    from lora_ogpsa.models.loading import load_base_model, load_tokenizer
    from lora_ogpsa.refusal import is_refusal

    batch_size = args.batch_size or Plan().eval_batch_size
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
                model, tokenizer, refusal_prompts, max_new_tokens=16, batch_size=batch_size, share_prefix=share))
            answers, wall_u, cpu_u = _timed(lambda share=share: generate(
                model, tokenizer, [item.question for item in utility], max_new_tokens=32, batch_size=batch_size,
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
    summary = {"batch_size": batch_size, "prompts": {"refusal": len(refusal_prompts), "utility": len(utility)},
               "prompt_tokens_mean": sum(map(len, rows)) / len(rows),
               "shared_prefix_tokens": len(prefix.ids) if prefix else 0,
               "refused": {"whole_prompts": sum(map(is_refusal, plain_refusals)),
                           "shared_prefix": sum(map(is_refusal, shared_refusals))}}
    print(summary, comparison)
    print(f"wrote {write_json('generation_prefix', {'split': 'none', 'timings': timings, 'comparison': comparison, **summary}, args.output_dir)}")


if __name__ == "__main__":
    main()
