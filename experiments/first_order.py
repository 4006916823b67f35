"""Does first order explain the reference-loss change of an OGPSA run between two of its checkpoints?

Loads checkpoint A of a run (4-bit base + adapter), collects the per-example reference gradients the run
used, rebuilds the subspace A was protected with, and compares, for the change Δθ = θ_B − θ_A:
- the share of the mean reference gradient ḡ's energy inside the span (how well k directions cover ḡ),
- the share of Δθ's energy inside the span (≈ 0 when `update` mode projected every step against that basis),
- the first-order prediction ḡ·Δθ of the reference-loss change, against the measured change.

    python -m experiments.first_order --run runs/tax/ogpsa-k8 --start checkpoint-10 --end checkpoint-15

With refresh every 10 steps, checkpoints 10 → 15 lie inside one refresh interval, so the basis rebuilt at
A is the one in force for every step up to B.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

import torch
from safetensors.torch import load_file

from lora_ogpsa.config import OGPSAConfig
from lora_ogpsa.core.subspace import compute_subspace
from lora_ogpsa.data.rows import read_rows, tokenize_rows
from lora_ogpsa.models.loading import load_adapter, load_base_model, load_tokenizer, lora_parameters
from lora_ogpsa.signals.reference import collect_reference_samples, make_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="an OGPSA training output (SFT stage)")
    parser.add_argument("--start", default="checkpoint-10")
    parser.add_argument("--end", default="checkpoint-15")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = json.loads((args.run / "ogpsa_config.json").read_text())
    ogpsa = OGPSAConfig.from_dict(config["ogpsa"])
    tokenizer = load_tokenizer(config["model"])
    model = load_adapter(load_base_model(config["model"], quantize=config["quantize"]), args.run / args.start,
                         trainable=True)
    parameters = lora_parameters(model)
    rows = read_rows(config["reference"], "sft").rows  # chosen as train.py chooses them
    if len(rows) > ogpsa.reference_examples:
        rows = random.Random(config["seed"]).sample(rows, ogpsa.reference_examples)
    batches = make_batches(tokenize_rows(tokenizer, rows, max_length=config["max_length"], source="reference"),
                           batch_size=ogpsa.reference_batch_size, pad_token_id=tokenizer.pad_token_id,
                           opening_tokens=ogpsa.opening_tokens, later_token_weight=ogpsa.later_token_weight)
    samples, losses_start = collect_reference_samples(model, batches, parameters)
    subspace = compute_subspace(samples, max_directions=ogpsa.max_directions, energy=ogpsa.energy)
    end = load_file(str(args.run / args.end / "adapter_model.safetensors"))
    totals = dict.fromkeys(("mean_in_span", "mean", "change_in_span", "change", "predicted"), 0.0)
    for name, tensor_samples in samples.items():
        mean = tensor_samples.reshape(tensor_samples.shape[0], -1).mean(0)  # ḡ: gradient of the mean loss
        change = end[name].float().reshape(-1) - parameters[name].detach().reshape(-1)
        basis = subspace.basis_by_name[name]
        totals["mean_in_span"] += float((basis @ mean).square().sum())
        totals["mean"] += float(mean.square().sum())
        totals["change_in_span"] += float((basis @ change).square().sum())
        totals["change"] += float(change.square().sum())
        totals["predicted"] += float(mean @ change)
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(end[name])
    _, losses_end = collect_reference_samples(model, batches, parameters)
    result = {
        "run": str(args.run), "start": args.start, "end": args.end, "max_directions": ogpsa.max_directions,
        "reference_loss_start": float(losses_start.mean()), "reference_loss_end": float(losses_end.mean()),
        "mean_gradient_energy_in_span": totals["mean_in_span"] / totals["mean"],
        "change_energy_in_span": totals["change_in_span"] / totals["change"],
        "first_order_predicted_change": totals["predicted"],
        "measured_change": float(losses_end.mean() - losses_start.mean()),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
