"""Data-parallel support: who writes files, and how reference samples and bases travel between ranks.

Launch with `torchrun --nproc_per_node N -m lora_ogpsa ...` or `accelerate launch -m lora_ogpsa ...`. Each rank
sketches the reference gradients of its share of the reference micro-batches; rank 0 folds the sketches into one
(in the original example order while they hold the samples themselves), computes the subspace once, and
broadcasts the bases, so every rank projects with bit-identical bases. The projection runs after DDP has
averaged the gradients, on identical parameters, so the ranks stay in lockstep. Only rank 0 writes files. Every collective runs under the process group's timeout.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from lora_ogpsa.core.sketch import GradientSketch
from lora_ogpsa.core.subspace import Subspace


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


def gather_sketches(sketch: GradientSketch, counts: Sequence[int], losses: torch.Tensor, *,
                    rows: int) -> tuple[GradientSketch, torch.Tensor] | None:
    """Every rank's reference-gradient sketch folded into one on rank 0, with the losses in reference order.

    A sketch of stacked Frequent Directions sketches is one of all their samples, so rank 0 feeds every rank's
    rows into one sketch of min(`rows`, S) rows (the moments — sums, counts, squared norms, error — are summed
    over ranks). While no rank has shrunk its sketch, its rows are its samples: they are fed back in reference
    order and in the original micro-batches, so the result is bit for bit the sketch one process builds. While
    folding, rank 0 holds every rank's rows about twice (≤ 2 W ℓ rows per tensor, transient).

    Args:
        sketch: this rank's sketch of its share (`my_share`) of the micro-batches.
        counts: examples per reference micro-batch, for the whole set.
        losses: this rank's per-example losses `(S_r,)`.
        rows: ℓ, the folded sketch's rows (`OGPSAConfig.sketch_rows`).

    Returns:
        On rank 0: (the folded sketch, losses `(S,)` in reference order); on other ranks None.
    """
    shrunk = torch.tensor([float(sketch.shrinks)], device=sketch.moments()[0].device)
    dist.all_reduce(shrunk, op=dist.ReduceOp.MAX)
    sum_across_ranks_(sketch.moments())  # every rank now holds the totals; rank 0 keeps them
    names = list(sketch.shape_by_name)
    rows_by_name = sketch.rows_by_name()
    widths = [math.prod(sketch.shape_by_name[name]) for name in names]  # explicit: a rank may hold no rows
    local = torch.cat([rows_by_name[name].reshape(sketch.filled, width) for name, width in zip(names, widths,
                                                                                               strict=True)], dim=1)  # (m_r, Σn)
    per_rank = gather_rows(local)
    per_rank_losses = gather_rows(losses.float()[:, None].to(local.device))
    del local, rows_by_name
    if per_rank is None:
        return None
    folded = sketch.resized(max(min(rows, sum(counts)), 2))
    for total, mine in zip(sketch.moments(), folded.moments(), strict=True):
        mine.copy_(total)
    folded.shrinks = int(shrunk)
    if folded.shrinks == 0:  # the rows are the samples: reference order, original micro-batches
        stacked, sizes = _reference_order(per_rank, counts), list(counts)
    else:
        stacked, step = torch.cat(per_rank), max(folded.rows // 2, 1)
        sizes = [min(step, len(stacked) - start) for start in range(0, len(stacked), step)]
    del per_rank
    folded.refill_(dict(zip(names, torch.split(block, widths, dim=1), strict=True))
                   for block in torch.split(stacked, sizes))
    return folded, _reference_order(per_rank_losses, counts)[:, 0].cpu()


def gather_rows(local: torch.Tensor) -> list[torch.Tensor] | None:
    """Every rank's `(m_r, c)` rows on rank 0 (m_r may differ between ranks); None on the other ranks."""
    size = torch.tensor([local.shape[0]], device=local.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(sizes))
    padded = torch.cat([local, local.new_zeros(longest - local.shape[0], local.shape[1])])
    gathered = [torch.empty_like(padded) for _ in sizes] if dist.get_rank() == 0 else None
    dist.gather(padded, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    return [rows[: int(count)] for rows, count in zip(gathered, sizes, strict=True)]


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
    per_rank = gather_rows(local)
    if per_rank is None:
        return None
    rows = _reference_order(per_rank, counts)  # (S, 1 + Σn)
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
