"""Can refusal be raised on harmful prompts without raising it on their look-alikes? A first-order diagnostic.

On dev data (HarmBench dev prompts; the dev benign prompts that merely sound dangerous), at a fresh adapter and at
trained checkpoints, with per-example gradients of the refusal margin m = log p(answer opening) − log p(refusal
opening) (t = `--margin-tokens`, `lora_ogpsa.signals.margin`; the answer is the base model's own greedy answer):

- h = mean −∇m over harmful rows (the direction that raises harmful refusal), l = the same over look-alikes;
  their cosine;
- the constrained direction d_c = the closest to h with every look-alike margin unchanged to first order
  (G_L d = 0): ‖d_c‖/‖h‖ and the share of harmful rows it still pushes toward refusal;
- held out: constraints from half of the look-alikes, h from half of the harmful rows; on the *other* halves,
  the rise of look-alike refusal per unit of harmful refusal along h and along d_c, and the harmful progress per
  unit of step d_c keeps relative to h;
- for each `--update A B` pair of checkpoints (the optimizer's actual update Δθ = θ_B − θ_A), the first-order
  rise of look-alike and of harmful refusal along Δθ, and their ratio.

    python -m experiments.separability --checkpoints runs/barrier-dev/seed-0/plain/checkpoint-8 \
        --update runs/barrier-dev/seed-0/plain/checkpoint-8 runs/barrier-dev/seed-0/plain/checkpoint-16 \
        --output experiments/results/separability_dev.json

Writes the JSON (`"split": "dev"`) and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

import torch

from lora_ogpsa.data.rows import as_prompt_completion
from lora_ogpsa.demo.assets import default_cache_dir, ensure_default_model
from lora_ogpsa.demo.data import benign_answers, build_demo_data, cached_generate
from lora_ogpsa.demo.plan import Plan
from lora_ogpsa.models.loading import (
    attach_lora,
    load_adapter,
    load_base_model,
    load_tokenizer,
    lora_config,
    lora_parameters,
)
from lora_ogpsa.refusal import GENERIC_REFUSALS
from lora_ogpsa.signals.margin import make_margin_batches, tokenize_margin_row
from lora_ogpsa.signals.reference import collect_reference_samples
from lora_ogpsa.utils.files import read_jsonl, write_json

logger = logging.getLogger("experiments.separability")


def main() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    model_path = ensure_default_model(args.cache_dir)
    plan = Plan.demo()
    data = build_demo_data(model_path, args.cache_dir, sizes=plan.data_sizes, seed=plan.data_seed)
    harmful, lookalike = _dev_rows(model_path, data, args)
    tokenizer = load_tokenizer(model_path)
    batches = {name: _batches(tokenizer, rows, args.margin_tokens) for name, rows in
               (("harmful", harmful), ("lookalike", lookalike))}
    results = {"command": "python -m experiments.separability " + shlex.join(sys.argv[1:]), "split": "dev",
               "seeds": [args.seed], "rows": {"harmful": len(harmful), "lookalike": len(lookalike)},
               "margin_tokens": args.margin_tokens, "points": {}, "updates": []}
    for point in [*([] if args.no_fresh else ["fresh"]), *args.checkpoints]:
        model, parameters = _model(model_path, None if point == "fresh" else Path(point), args.seed)
        gradients = {name: _rise_gradients(model, parameters, rows) for name, rows in batches.items()}
        results["points"][point] = separability(gradients["harmful"], gradients["lookalike"], seed=args.seed)
        logger.info("%s: %s", point, json.dumps(results["points"][point]))
        del model, parameters
    for start, end in args.update:
        model, parameters = _model(model_path, Path(start), args.seed)
        gradients = {name: _rise_gradients(model, parameters, rows) for name, rows in batches.items()}
        results["updates"].append({"from": start, "to": end, **update_rise(gradients, _flat_weights(Path(end),
                                                                                                     parameters),
                                                                           _flat(parameters))})
        logger.info("update %s -> %s: %s", start, end, json.dumps(results["updates"][-1]))
    write_json(args.output, results)
    args.output.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="*", default=[], help="adapter directories (besides a fresh adapter)")
    parser.add_argument("--update", nargs=2, action="append", default=[], metavar=("FROM", "TO"),
                        help="two checkpoints of one run: the actual update between them")
    parser.add_argument("--harmful", type=int, default=48, help="HarmBench dev prompts")
    parser.add_argument("--lookalike", type=int, default=48, help="dev look-alike prompts")
    parser.add_argument("--margin-tokens", type=int, default=4)
    parser.add_argument("--no-fresh", action="store_true", help="skip the fresh adapter (e.g. updates only)")
    parser.add_argument("--seed", type=int, default=0, help="the fresh adapter's seed and the halves' split")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--output", type=Path, default=Path("experiments/results/separability_dev.json"))
    return parser


def _dev_rows(model_path: Path, data, args) -> tuple[list[dict], list[dict]]:
    """Harmful dev prompts with the base model's answer; dev look-alikes with theirs (`demo.data.benign_answers`:
    the answers the benign sets were built with, from the same per-prompt cache)."""
    prompts = [row["prompt"] for row in read_jsonl(data.path("harmbench_dev"))][:args.harmful]
    answers = cached_generate(model_path, prompts, args.cache_dir or default_cache_dir(), max_new_tokens=16,
                              batch_size=16)
    harmful = [_row(prompt, answers[prompt]) for prompt in prompts if answers[prompt].strip()]
    sounding = [row["prompt"] for row in read_jsonl(data.path("benign_dev")) if row["kind"] == "sounds_dangerous"]
    lookalike = [_row(prompt, answer) for prompt, answer in
                 zip(sounding, benign_answers(data, model_path, sounding, args.cache_dir), strict=True) if answer.strip()]
    lookalike = lookalike[:args.lookalike]
    return harmful, lookalike


def _row(prompt: str, answer: str) -> dict:
    return as_prompt_completion({"messages": [{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}]})


def _batches(tokenizer, rows: list[dict], tokens: int):
    examples = [tokenize_margin_row(tokenizer, row, list(GENERIC_REFUSALS), tokens=tokens, max_length=256)
                for row in rows]
    return make_margin_batches([example for example in examples if example is not None], batch_size=8,
                               pad_token_id=tokenizer.pad_token_id)


def _model(model_path: Path, adapter: Path | None, seed: int):
    base = load_base_model(model_path, quantize=True)
    if adapter is None:
        model = attach_lora(base, lora_config(r=Plan().lora_r), seed=seed, gradient_checkpointing=False)
    else:
        model = load_adapter(base, adapter, trainable=True)
    model.train()
    return model, lora_parameters(model)


def _rise_gradients(model, parameters, batches) -> torch.Tensor:
    """−∇m of every row, `(S, N)` float32 over all LoRA parameters: the direction that raises its refusal."""
    samples, _ = collect_reference_samples(model, batches, parameters, progress=False)  # ∇(−m)
    return torch.cat([samples[name].flatten(1) for name in parameters], dim=1)


def _flat(parameters) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in parameters.values()])


def _flat_weights(adapter: Path, parameters) -> torch.Tensor:
    from safetensors.torch import load_file

    weights = load_file(str(adapter / "adapter_model.safetensors"))
    return torch.cat([weights[name].float().flatten() for name in parameters])


def constrained(direction: torch.Tensor, constraints: torch.Tensor) -> torch.Tensor:
    """The closest vector to `direction (N,)` with `constraints (n, N) @ d = 0` (least squares, float64 Gram)."""
    gram = (constraints.double() @ constraints.double().T)
    coefficients = torch.linalg.lstsq(gram, (constraints.double() @ direction.double()).unsqueeze(1),
                                      driver="gelsd").solution.flatten()
    return direction - (coefficients.float() @ constraints)


def separability(harmful: torch.Tensor, lookalike: torch.Tensor, *, seed: int) -> dict:
    """The first-order quantities of the module docstring from the rows' refusal-raising gradients."""
    h, l = harmful.mean(0), lookalike.mean(0)  # noqa: E741
    d_c = constrained(h, lookalike)
    generator = torch.Generator().manual_seed(seed)
    hp, lp = torch.randperm(len(harmful), generator=generator), torch.randperm(len(lookalike), generator=generator)
    h_a, h_b = harmful[hp[: len(hp) // 2]].mean(0), harmful[hp[len(hp) // 2:]].mean(0)
    l_b = lookalike[lp[len(lp) // 2:]].mean(0)
    held = constrained(h_a, lookalike[lp[: len(lp) // 2]])
    return {
        "cosine_harmful_lookalike": _cos(h, l),
        "constrained_norm_kept": float(d_c.norm() / h.norm()),
        "constrained_harmful_rows_pushed": float(((harmful @ d_c) > 0).float().mean()),
        "heldout_lookalike_per_harmful_unconstrained": float((l_b @ h_a) / (h_b @ h_a)),
        "heldout_lookalike_per_harmful_constrained": float((l_b @ held) / (h_b @ held)),
        "heldout_harmful_progress_kept": float(((h_b @ held) / held.norm()) / ((h_b @ h_a) / h_a.norm())),
    }


def update_rise(gradients: dict[str, torch.Tensor], end: torch.Tensor, start: torch.Tensor) -> dict:
    """First-order rise of mean harmful and look-alike refusal (nats of margin) along Δθ = end − start."""
    change = end - start
    harmful, lookalike = float(gradients["harmful"].mean(0) @ change), float(gradients["lookalike"].mean(0) @ change)
    return {"harmful_rise": harmful, "lookalike_rise": lookalike, "lookalike_per_harmful": lookalike / harmful}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))


def markdown(results: dict) -> str:
    lines = [f"`{results['command']}`", "", f"Split: **{results['split']}**; rows {results['rows']}; margin over "
             f"{results['margin_tokens']} tokens", "", "| point | cos(h, l) | ‖d_c‖/‖h‖ | harmful rows pushed | "
             "held-out look-alike per harmful: h | : d_c | held-out harmful progress kept |", "|---|---|---|---|---|---|---|"]
    for point, values in results["points"].items():
        lines.append(f"| {point} | {values['cosine_harmful_lookalike']:.2f} | {values['constrained_norm_kept']:.2f} | "
                     f"{values['constrained_harmful_rows_pushed']:.0%} | "
                     f"{values['heldout_lookalike_per_harmful_unconstrained']:.2f} | "
                     f"{values['heldout_lookalike_per_harmful_constrained']:.2f} | "
                     f"{values['heldout_harmful_progress_kept']:.0%} |")
    if results["updates"]:
        lines += ["", "| update | harmful refusal rise | look-alike refusal rise | ratio |", "|---|---|---|---|"]
        lines += [f"| {u['from']} → {u['to']} | {u['harmful_rise']:.2f} | {u['lookalike_rise']:.2f} | "
                  f"{u['lookalike_per_harmful']:.2f} |" for u in results["updates"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
