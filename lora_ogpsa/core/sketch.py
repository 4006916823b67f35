"""Bounded-memory reference gradients: a Frequent Directions sketch per LoRA tensor, fed a micro-batch at a time.

Pure torch, like `subspace` whose solver it shares: with no more samples than sketch rows nothing is shrunk
and the bases are exactly `compute_subspace`'s.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from lora_ogpsa.core.subspace import Subspace, _check_arguments, _finish, _solve_group, _store, _Streamed


class GradientSketch:
    """Frequent Directions sketches (Liberty 2013) of every tensor's gradient samples, fed a block at a time.

    For one tensor with samples A (S×n), the sketch keeps ℓ rows B (ℓ×n) such that for every unit x

        0 ≤ ‖A x‖² − ‖B x‖² ≤ Δ = Σ δ ≤ ‖A − A_j‖²_F / (ℓ − b + 1 − j)     (any j < ℓ − b + 1)

    for blocks of b samples (A_j: A's best rank-j approximation). A block goes into free rows; when there are
    none, every sketch shrinks to ℓ − b rows first: from the ℓ×ℓ Gram matrix B Bᵀ = V Λ Vᵀ (one batched
    `eigh` per tensor size), B = Λ^{1/2} U becomes (Λ − δ)₊^{1/2} U with δ = λ_{ℓ−b+1}. With S ≤ ℓ nothing is
    shrunk, B = A, and `subspace()` equals `compute_subspace` on the samples. Besides the rows, kept exactly: the
    sum of the samples (the mean gradient), their total squared norm (energy shares are of it: the share a
    sketch's direction reports is a lower bound of what it captures of A), and the samples dropped for NaN/Inf
    (their rows zeroed).

    Memory: ℓ × n × 4 bytes per tensor, whatever S, in one `(P, ℓ, n)` float32 buffer per tensor size: large
    enough that the allocator maps it apart from the small blocks of the activations and returns it on free.

    Args:
        like_by_name: the tensors whose gradients are sketched (their shapes and devices), e.g. the LoRA weights.
        rows: ℓ, rows per sketch (≥ 2; once it is full, blocks may hold at most ℓ/2 samples).
    """

    def __init__(self, like_by_name: Mapping[str, torch.Tensor], *, rows: int) -> None:
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 2:
            raise ValueError(f"`sketch_rows` must be an integer >= 2, got {rows!r}")
        self.rows, self.filled, self.shrinks, self._open = rows, 0, 0, 0
        self.shape_by_name = {name: tuple(tensor.shape) for name, tensor in like_by_name.items()}
        names_by_key: dict[tuple, list[str]] = defaultdict(list)
        for name, tensor in like_by_name.items():
            names_by_key[(tensor.numel(), tensor.device)].append(name)
        self._groups = [_SketchGroup.empty(names, rows, *key) for key, names in names_by_key.items()]

    def resized(self, rows: int) -> GradientSketch:
        """An empty sketch of the same tensors with `rows` rows."""
        device_by_name = {name: group.rows.device for group in self._groups for name in group.names}
        return GradientSketch({name: torch.empty((), device=device_by_name[name]).expand(shape)  # no storage
                               for name, shape in self.shape_by_name.items()}, rows=rows)

    @property
    def nbytes(self) -> int:
        """Bytes held by the sketch rows (ℓ × Σ n × 4)."""
        return sum(group.rows.numel() * group.rows.element_size() for group in self._groups)

    def block_(self, size: int) -> dict[str, torch.Tensor]:
        """Zeroed rows for the next `size` samples, `(size, *shape)` views per name: fill them, then `commit_()`."""
        shrink = isinstance(size, int) and self.filled + size > self.rows
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= self.rows // (2 if shrink else 1):
            raise ValueError(f"a block of {size!r} samples does not fit a sketch of {self.rows} rows (at most "
                             "half of them once it is full): raise `sketch_rows` or lower `reference_batch_size`")
        if shrink:
            self._shrink_(self.rows - size)
        self._open = size
        views = {}
        for group in self._groups:
            block = group.rows[:, self.filled:self.filled + size]  # (P, b, n)
            block.zero_()
            views.update({name: block[index].view(size, *self.shape_by_name[name])
                          for index, name in enumerate(group.names)})
        return views

    @torch.no_grad()
    def commit_(self) -> None:
        """Take in the block filled since `block_`: samples holding NaN/Inf are zeroed and counted."""
        start, size = self.filled, self._open
        for group in self._groups:
            block = group.rows[:, start:start + size]  # (P, b, n)
            squared = torch.linalg.vector_norm(block, dim=-1).square()  # (P, b): as a float32 Gram's diagonal
            finite = torch.isfinite(squared)
            block.masked_fill_(~finite[..., None], 0.0)
            group.dropped += (~finite).sum(-1)
            group.counts += finite.sum(-1)
            group.energy += torch.where(finite, squared, 0.0).double().sum(-1)
            group.sums += block.sum(1)
        self.filled, self._open = start + size, 0

    def add_(self, samples_by_name: Mapping[str, torch.Tensor]) -> None:
        """Feed `(b, *shape)` samples for every name (the same b), in blocks of at most ℓ/2."""
        total = len(next(iter(samples_by_name.values())))
        for start in range(0, total, self.rows // 2):
            for name, view in self.block_(min(self.rows // 2, total - start)).items():
                view.copy_(samples_by_name[name][start:start + len(view)].reshape(view.shape))
            self.commit_()

    def rows_by_name(self) -> dict[str, torch.Tensor]:
        """The sketch rows in use, `(m, *shape)` views per name (m ≤ ℓ; the samples themselves until a shrink)."""
        return {name: group.rows[index, :self.filled].view(self.filled, *self.shape_by_name[name])
                for group in self._groups for index, name in enumerate(group.names)}

    def moments(self) -> list[torch.Tensor]:
        """The tensors kept besides the rows (sums, counts, ...): summing them over sketches merges them."""
        return [tensor for group in self._groups for tensor in group.moments()]

    def refill_(self, blocks: Iterable[Mapping[str, torch.Tensor]]) -> None:
        """Replace the rows by a sketch of `blocks` (other sketches' rows, or samples already counted in the
        moments): a sketch of stacked sketches is a sketch of all their samples. The moments only grow by
        what the new shrinks remove."""
        self.filled = 0
        for group in self._groups:
            group.rows.zero_()
        for block in blocks:
            for name, view in self.block_(len(next(iter(block.values())))).items():
                view.copy_(block[name].reshape(view.shape))
            self.filled, self._open = self.filled + self._open, 0

    @torch.no_grad()
    def subspace(self, *, max_directions: int, energy: float) -> Subspace:
        """The bases `compute_subspace` would give from the samples (identical while nothing was shrunk).

        Metadata: `sketch_rows`, `sketch_shrinks`, and `sketch_error`: the largest Δ / ‖A‖²_F over tensors,
        the share of the total energy by which any direction's energy may be underestimated.
        """
        _check_arguments(max_directions, energy)
        subspace = Subspace({})
        for group in self._groups:
            streamed = _Streamed([int(count) for count in group.dropped.tolist()],
                                 group.energy if self.shrinks else None, group.sums, group.counts)
            _store(subspace, group.names, _solve_group(list(group.rows[:, :self.filled].unbind(0)),
                                                       max_directions, energy, streamed))
        subspace.metadata = {"sketch_rows": str(self.rows), "sketch_shrinks": str(self.shrinks),
                             "sketch_error": f"{self.relative_error():.3g}"}
        return _finish(subspace, list(self.shape_by_name))

    def relative_error(self) -> float:
        """Largest Δ / ‖A‖²_F over the tensors (0 while nothing was shrunk)."""
        errors = [group.error / group.energy.clamp_min(1e-300) for group in self._groups]
        return float(torch.cat(errors).max()) if errors else 0.0

    @torch.no_grad()
    def _shrink_(self, keep: int) -> None:
        for group in self._groups:
            rows = group.rows[:, :self.filled]  # (P, m, n)
            gram = torch.bmm(rows, rows.mT).double()  # (P, m, m)
            values, vectors = torch.linalg.eigh(gram)
            values, vectors = values.flip(-1).clamp_min(0), vectors.flip(-1)  # descending
            delta = values[:, keep]  # (P,): λ_{keep+1}
            shrunk = (values[:, :keep] - delta[:, None]).clamp_min(0)  # (P, keep)
            scale = torch.where(values[:, :keep] > 0, (shrunk / values[:, :keep].clamp_min(1e-300)).sqrt(), 0.0)
            weights = (vectors[:, :, :keep] * scale[:, None, :]).mT.float()  # (P, keep, m): ((Λ−δ)/Λ)^{1/2} Vᵀ
            for index in range(len(group.names)):  # per tensor: a temporary of one tensor's rows, not the group's
                group.rows[index, :keep] = weights[index] @ rows[index]
            group.rows[:, keep:self.filled] = 0
            group.error += delta
        self.filled, self.shrinks = keep, self.shrinks + 1


@dataclass
class _SketchGroup:
    """The sketches of P tensors of n entries each, and what is kept of their samples besides."""

    names: list[str]
    rows: torch.Tensor  # (P, ℓ, n) float32
    sums: torch.Tensor  # (P, n) float32: sum of the kept samples
    counts: torch.Tensor  # (P,) float64: kept samples
    dropped: torch.Tensor  # (P,) float64: samples dropped for NaN/Inf
    energy: torch.Tensor  # (P,) float64: squared norm of the kept samples, ‖A‖²_F
    error: torch.Tensor  # (P,) float64: Δ = Σ δ, bound on ‖A x‖² − ‖B x‖²

    @classmethod
    def empty(cls, names: list[str], rows: int, numel: int, device: torch.device) -> _SketchGroup:
        count = len(names)
        zeros = [torch.zeros(count, dtype=torch.float64, device=device) for _ in range(4)]
        return cls(names, torch.zeros(count, rows, numel, device=device), torch.zeros(count, numel, device=device),
                   *zeros)

    def moments(self) -> list[torch.Tensor]:
        return [self.sums, self.counts, self.dropped, self.energy, self.error]
