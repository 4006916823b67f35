"""FSDP2 (per-parameter `fully_shard`): LoRA weights held as DTensor shards, and the bases sliced to match.

FSDP2 shards every parameter on its first dimension (`Shard(0)` on a 1-D mesh, `torch.chunk` sizes): rank r holds
rows [r0, r1) of each LoRA weight. Flattened row-major, that is one contiguous slice [r0·c, r1·c) of the vector a
basis acts on, so rank r keeps the same columns of the basis, `(k, n) → (k, n_r)`. A coefficient of a sharded vector
is the sum over ranks of the local products, `U v = Σ_r U_r v_r`: the projection is a local product plus one
all-reduce of the k coefficients per tensor (batched over tensors), and exact. The reference gradients themselves are
whole (activations are not sharded), so the bases are estimated as under DDP and sliced once installed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
import torch.distributed as dist

from lora_ogpsa.core.subspace import Subspace
from lora_ogpsa.signals.distributed import gather_rows


def is_sharded(parameters: Mapping[str, torch.Tensor]) -> bool:
    """Whether the weights are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(parameter, DTensor) for parameter in parameters.values())


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writing to it writes the parameter), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def check_layout(parameters: Mapping[str, torch.Tensor]) -> None:
    """Refuse a layout the slicing does not describe: every weight a DTensor `Shard(0)` on a 1-D mesh.

    Raises:
        ValueError: a weight left whole (FSDP's `ignored_params`: its gradient would not be averaged over ranks)
            or sharded another way (`shard_placement_fn`, a 2-D mesh).
    """
    from torch.distributed.tensor import DTensor, Shard

    for name, parameter in parameters.items():
        if not isinstance(parameter, DTensor):
            raise ValueError(f"OGPSACallback under FSDP2: LoRA weight {name} is not sharded (FSDP does not average "
                             "the gradients of ignored parameters); let fully_shard shard the LoRA weights")
        if parameter.device_mesh.ndim != 1 or tuple(parameter.placements) != (Shard(0),):
            raise ValueError(f"OGPSACallback under FSDP2: LoRA weight {name} is sharded as {parameter.placements} "
                             f"on a {parameter.device_mesh.ndim}-D mesh; only Shard(0) on a 1-D mesh (the default) "
                             "is supported")


def flat_range(shape: torch.Size | tuple[int, ...], rank: int, world: int) -> tuple[int, int]:
    """The slice [start, stop) of the flattened weight that `rank` holds (torch.chunk of the rows, as FSDP2)."""
    rows, width = shape[0], math.prod(shape[1:])
    chunk = -(-rows // world)  # ceil: torch.chunk's size; the last ranks may hold fewer rows, or none
    first, last = min(rank * chunk, rows), min((rank + 1) * chunk, rows)
    return first * width, last * width


def _my_range(parameter: torch.Tensor) -> tuple[int, int]:
    start, stop = flat_range(parameter.shape, dist.get_rank(), dist.get_world_size())
    assert stop - start == local(parameter).numel(), "FSDP2 shard sizes differ from torch.chunk's"
    return start, stop


def slice_subspace(subspace: Subspace, parameters: Mapping[str, torch.Tensor]) -> Subspace:
    """The columns of every basis that match this rank's shard, `(k, n) → (k, n_r)` (contiguous copies, so the
    whole bases can be freed). Input bases act on whole rows of lora_A (`(m, d_in)`) and are kept as they are."""
    sliced = {}
    for name, basis in subspace.basis_by_name.items():
        start, stop = _my_range(parameters[name])
        sliced[name] = basis[:, start:stop].clone()  # (k, n_r)
    return dataclasses.replace(subspace, basis_by_name=sliced, metadata=dict(subspace.metadata))


def gather_subspace(subspace: Subspace, parameters: Mapping[str, torch.Tensor]) -> Subspace | None:
    """Every rank's slices joined into whole bases `(k, n)` on rank 0 (None on the other ranks): one gather.

    Args:
        subspace: this rank's `slice_subspace` (bases `(k, n_r)`).
        parameters: the sharded weights (their global shapes say where each rank's columns go).
    """
    names = list(subspace.basis_by_name)
    mine = [subspace.basis_by_name[name].reshape(-1) for name in names]
    device = next(iter(parameters.values())).device
    flat = torch.cat(mine).to(device)[None] if mine else torch.zeros(1, 0, device=device)  # (1, Σ k n_r)
    per_rank = gather_rows(flat)
    if per_rank is None:
        return None
    world = len(per_rank)
    pieces_by_name: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for rank, row in enumerate(per_rank):
        widths = [stop - start for start, stop in (flat_range(parameters[name].shape, rank, world) for name in names)]
        ks = [subspace.basis_by_name[name].shape[0] for name in names]
        parts = torch.split(row[0], [k * width for k, width in zip(ks, widths, strict=True)])
        for name, part, k, width in zip(names, parts, ks, widths, strict=True):
            pieces_by_name[name].append(part.view(k, width))
    whole = {name: torch.cat(pieces, dim=1) for name, pieces in pieces_by_name.items()}  # (k, n)
    return dataclasses.replace(subspace, basis_by_name=whole, metadata=dict(subspace.metadata))


def grouping_keys(parameters: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Group the bases by global shape: the local widths differ between ranks, and every rank must stack (and
    all-reduce) its coefficients in the same order."""
    return {name: tuple(parameter.shape) for name, parameter in parameters.items()}


@torch.no_grad()
def unshard_trainable_(model: torch.nn.Module) -> int:
    """Replace every trainable DTensor parameter by a plain parameter holding the whole tensor (an all-gather that
    every rank must join, in module order), so that the usual adapter export reads whole LoRA weights after
    training. Only for a model that trains no more. Returns how many parameters were replaced (0 without FSDP2)."""
    from torch.distributed.tensor import DTensor

    replaced = 0
    for module in model.modules():
        for key, parameter in list(module._parameters.items()):
            if isinstance(parameter, DTensor) and parameter.requires_grad:
                module._parameters[key] = torch.nn.Parameter(parameter.full_tensor(), requires_grad=True)
                replaced += 1
    return replaced
