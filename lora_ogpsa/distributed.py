"""Data-parallel support: who writes files, and how reference samples and bases travel between ranks.

Launch with `torchrun --nproc_per_node N -m lora_ogpsa ...` or `accelerate launch -m lora_ogpsa ...`. Each rank
collects reference gradients on its share of the reference micro-batches; rank 0 gathers them in the original
example order, computes the subspace once, and broadcasts the bases, so every rank projects with bit-identical
bases. The projection runs after DDP has averaged the gradients, on identical parameters, so the ranks stay in
lockstep. Only rank 0 writes files. Every collective runs under the process group's timeout.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from lora_ogpsa.subspace import Subspace


def world_size() -> int:
    """Processes in the run (from the launcher's environment, so it is known before the group exists)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process writes the files (rank 0)."""
    return rank() == 0


def active() -> bool:
    """Whether a process group with more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def start(timeout_seconds: int) -> None:
    """Bring the process group up (backend gloo on CPU, nccl on CUDA) when launched with several processes.

    Uses accelerate's shared state, the one the HF Trainer uses, so the Trainer finds it up with this timeout.
    """
    if world_size() <= 1 or active():
        return
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available(), timeout=datetime.timedelta(seconds=timeout_seconds))


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if active():
        dist.barrier()


def my_share(items: Sequence) -> list:
    """Round-robin share of this rank: items r, r + W, r + 2W, ..."""
    if not active():
        return list(items)
    return list(items)[dist.get_rank()::dist.get_world_size()]


def gather_samples(samples_by_name: Mapping[str, torch.Tensor], counts: Sequence[int],
                   losses: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
    """Gather every rank's per-example samples on rank 0, in the order of the reference set.

    Args:
        samples_by_name: this rank's samples, `(S_r, *shape)` per name (same names on every rank).
        counts: examples per reference micro-batch, for the whole set (to restore the original order).
        losses: this rank's per-example losses `(S_r,)`.

    Returns:
        On rank 0: (samples `(S, *shape)` per name in reference order, losses `(S,)`); on other ranks None.
    """
    names = list(samples_by_name)
    local = torch.cat([losses.float()[:, None]] + [samples_by_name[name].reshape(len(losses), -1) for name in names],
                      dim=1)  # (S_r, 1 + Σ numel): one collective instead of one per tensor
    size = torch.tensor([local.shape[0]], device=local.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(sizes))
    padded = torch.cat([local, local.new_zeros(longest - local.shape[0], local.shape[1])])
    gathered = [torch.empty_like(padded) for _ in sizes] if dist.get_rank() == 0 else None
    dist.gather(padded, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    rows = _reference_order([g[: int(s)] for g, s in zip(gathered, sizes, strict=True)], counts)  # (S, 1 + Σn)
    split = torch.split(rows[:, 1:], [samples_by_name[name][0].numel() for name in names], dim=1)
    return ({name: part.reshape(-1, *samples_by_name[name].shape[1:]) for name, part in zip(names, split,
                                                                                             strict=True)},
            rows[:, 0])


def _reference_order(per_rank: list[torch.Tensor], counts: Sequence[int]) -> torch.Tensor:
    """Interleave the ranks' rows back: micro-batch b was collected by rank b mod W."""
    world = len(per_rank)
    offsets = [0] * world
    pieces = []
    for batch, count in enumerate(counts):
        owner = batch % world
        pieces.append(per_rank[owner][offsets[owner]:offsets[owner] + count])
        offsets[owner] += count
    return torch.cat(pieces)


def broadcast_subspace(subspace: Subspace | None, shape_by_name: Mapping[str, torch.Size],
                       device: torch.device) -> Subspace:
    """Rank 0's subspace on every rank: bases bit-identical, other fields alike."""
    header = [None]
    if dist.get_rank() == 0:
        values = {name: value.tolist() for name, value in subspace.singular_values_by_name.items()}
        means = {name: value.tolist() for name, value in subspace.mean_coefficients_by_name.items()}
        header = [{"ks": subspace.directions_by_name, "values": values, "means": means,
                   "energy": subspace.energy_by_name, "dropped": subspace.dropped_by_name,
                   "metadata": subspace.metadata}]
    dist.broadcast_object_list(header, src=0)
    header = header[0]
    numel = {name: int(torch.Size(shape).numel()) for name, shape in shape_by_name.items()}
    total = sum(header["ks"][name] * numel[name] for name in numel)
    if dist.get_rank() == 0:
        flat = torch.cat([subspace.basis_by_name[name].reshape(-1) for name in numel]).to(device)
    else:
        flat = torch.empty(total, dtype=torch.float32, device=device)
    dist.broadcast(flat, src=0)
    parts = torch.split(flat, [header["ks"][name] * numel[name] for name in numel])
    bases = {name: part.view(header["ks"][name], numel[name]) for name, part in zip(numel, parts, strict=True)}
    values = {name: torch.tensor(value, dtype=torch.float32) for name, value in header["values"].items()}
    means = {name: torch.tensor(value, dtype=torch.float32) for name, value in header["means"].items()}
    return Subspace(bases, values, header["energy"], header["dropped"], header["metadata"], means)


def sum_across_ranks_(tensors: Sequence[torch.Tensor]) -> None:
    """All-reduce (sum) each tensor in place, in one flat collective (each rank holds the same shapes)."""
    if not tensors:
        return
    flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
    dist.all_reduce(flat)
    for tensor, part in zip(tensors, torch.split(flat, [tensor.numel() for tensor in tensors]), strict=True):
        tensor.copy_(part.view_as(tensor))
