"""Estimating the protected bases at a refresh: the reference-gradient subspace (rank 0 computes, every rank
receives it) and, for `protect` = activations/both, the input bases of every lora_A."""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch

from lora_ogpsa.config import OGPSAConfig
from lora_ogpsa.core.sketch import GradientSketch
from lora_ogpsa.core.subspace import Subspace
from lora_ogpsa.signals import distributed, sharding
from lora_ogpsa.signals.activations import collect_input_moments, compute_input_basis
from lora_ogpsa.signals.margin import MarginBatch, example_margins
from lora_ogpsa.signals.reference import ReferenceBatch, collect_reference_sketch, example_losses


def estimate_subspace(model: torch.nn.Module, parameters: dict[str, torch.nn.Parameter],
                      batches: Sequence[ReferenceBatch], config: OGPSAConfig, *, progress: bool,
                      margin_batches: Sequence[MarginBatch] = ()) -> Subspace:
    """The bases to protect, from the current weights: gradient bases (`protect` ≠ activations; empty ones
    otherwise) of the `reference_objective` (NLL samples from `batches`, refusal-margin samples from
    `margin_batches`, or both) plus input bases of `batches` (`protect` ≠ gradients). Metadata:
    `reference_loss`, `reference_objective`, `reference_margin` (margin objectives) and `config`."""
    if config.protect == "activations":
        subspace = Subspace({name: torch.zeros(0, p.numel(), device=p.device) for name, p in parameters.items()},
                            metadata={"reference_loss": "nan"})
    else:
        gradient_batches = [*(batches if config.reference_objective != "refusal_margin" else []),
                            *(margin_batches if config.reference_objective != "nll" else [])]
        subspace = _gradient_subspace(model, parameters, gradient_batches, config, progress=progress,
                                      nll_batches=batches)
    subspace.metadata["config"] = json.dumps(config.to_dict(), sort_keys=True)
    if config.protect != "gradients":
        _add_input_bases(model, parameters, batches, config, subspace)
    if sharding.is_sharded(parameters):  # FSDP2: each rank keeps the columns of its shard
        subspace = sharding.slice_subspace(subspace, parameters)
    return subspace


def _gradient_subspace(model, parameters, batches, config: OGPSAConfig, *, progress: bool,
                       nll_batches: Sequence[ReferenceBatch]) -> Subspace:
    subspace = None
    sketch, losses = _collect(model, parameters, batches, config, progress=progress)
    if sketch is not None:  # rank 0 (or the only process) computes the subspace
        subspace = sketch.subspace(max_directions=config.max_directions, energy=config.energy)
        del sketch
        subspace.metadata.update(_objective_summary(losses, nll_batches, config))
    if distributed.active():
        shapes = {name: parameter.shape for name, parameter in parameters.items()}
        device = next(iter(parameters.values())).device
        subspace = distributed.broadcast_subspace(subspace, shapes, device)
    return subspace


def _collect(model, parameters, batches, config: OGPSAConfig, *,
             progress: bool) -> tuple[GradientSketch | None, torch.Tensor | None]:
    """The reference samples, sketched as they are produced (`sketch_size` rows per tensor), and the losses:
    on rank 0, every rank's share folded into one sketch (None elsewhere)."""
    share = distributed.my_share(batches)
    with torch.enable_grad():
        sketch, losses = collect_reference_sketch(model, share, parameters,
                                                  rows=config.sketch_size, progress=progress and distributed.is_main())
        _idle_passes(model, parameters, batches, len(share), backward=True)
    if not distributed.active():
        return sketch, losses
    counts = [batch.input_ids.shape[0] for batch in batches]
    gathered = distributed.gather_sketches(sketch, counts, losses, rows=config.sketch_size)
    return gathered if gathered is not None else (None, None)


def _add_input_bases(model, parameters, batches, config: OGPSAConfig, subspace: Subspace) -> None:
    """Activation-space bases of every lora_A from the reference inputs (summed over ranks)."""
    share = distributed.my_share(batches)
    moments = collect_input_moments(model, share, parameters, positions=config.activation_positions,
                                    opening_tokens=config.activation_opening_tokens)
    _idle_passes(model, parameters, batches, len(share), backward=False)
    if distributed.active():
        distributed.sum_across_ranks_(list({id(m): m for m in moments.values()}.values()))
    subspace.input_basis_by_name, subspace.input_energy_by_name = compute_input_basis(
        moments, energy=config.activation_energy)


def _idle_passes(model, parameters, batches: Sequence, done: int, *, backward: bool) -> None:
    """FSDP2's forward and backward are collectives (all-gather, reduce-scatter) that every rank must join: a rank
    whose round-robin share is one micro-batch short runs a stand-in pass on the first one, its result discarded
    (the trainer's gradients are set aside meanwhile)."""
    if not batches or not sharding.is_sharded(parameters):
        return
    missing = -(-len(batches) // torch.distributed.get_world_size()) - done
    for _ in range(missing):
        stashed = {name: parameter.grad for name, parameter in parameters.items()}
        for parameter in parameters.values():
            parameter.grad = None
        try:
            with torch.enable_grad() if backward else torch.no_grad():
                batch = batches[0]
                loss = (-example_margins(model, batch) if isinstance(batch, MarginBatch)
                        else example_losses(model, batch)).sum()
                if backward:
                    loss.backward()
        finally:
            for name, parameter in parameters.items():
                parameter.grad = stashed[name]


def _objective_summary(losses: torch.Tensor, batches: Sequence[ReferenceBatch], config: OGPSAConfig) -> dict[str, str]:
    """Mean reference NLL ("nan" when not an objective) and mean refusal margin, from the losses `(S,)` in
    gradient-batch order (NLL rows first; a margin row's loss is −m)."""
    objective = config.reference_objective
    count = sum(batch.input_ids.shape[0] for batch in batches) if objective != "refusal_margin" else 0
    summary = {"reference_loss": f"{float(losses[:count].mean()):.6f}" if count else "nan",
               "reference_objective": objective}
    if objective != "nll":
        summary["reference_margin"] = f"{float(-losses[count:].mean()):.6f}"
    return summary
