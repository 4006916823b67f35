"""Removing the reference subspace from vectors: pure tensor math.

With a basis U (k×n, orthonormal rows) the orthogonal projector onto its complement is

    P⊥ v = v − Uᵀ (U v)

and ‖U v‖² / ‖v‖² is the share of v's squared norm that lies in the reference span (the diagnostic we log).
All arithmetic is float32 whatever the tensors' dtype; tensors stay on their own device.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

import torch


def project_out(vectors: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Remove the span of `basis` from every vector.

    Args:
        vectors: `(..., n)`, any float dtype.
        basis: `(k, n)` with orthonormal rows; k = 0 returns `vectors` unchanged.

    Returns:
        `(..., n)` in the dtype of `vectors`: `v − Uᵀ(U v)` computed in float32.
    """
    _check_projection(vectors, basis)
    if basis.shape[0] == 0:
        return vectors
    values = vectors.float()
    basis = basis.to(device=values.device, dtype=torch.float32)
    coefficients = values @ basis.T  # (..., k)
    return (values - coefficients @ basis).to(vectors.dtype)


def _check_projection(vectors: torch.Tensor, basis: torch.Tensor) -> None:
    """`project_out`'s contract: tensors, floating point, `vectors (..., n)` and `basis (k, n)`."""
    for name, value in (("vectors", vectors), ("basis", basis)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"project_out: `{name}` must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise ValueError(f"project_out: `{name}` must be a floating-point tensor, got {value.dtype}; cast it "
                             "with .float() (an integer result would be truncated, not orthogonal)")
    if basis.dim() != 2:
        raise ValueError(f"project_out: `basis` must be (k, n), one orthonormal row per direction, got shape "
                         f"{tuple(basis.shape)}")
    if vectors.dim() < 1 or vectors.shape[-1] != basis.shape[1]:
        raise ValueError(f"project_out: `vectors` must be (..., n) with n = {basis.shape[1]} entries (the basis's "
                         f"row length), got shape {tuple(vectors.shape)}")


@torch.no_grad()
def project_rows_(matrix: torch.Tensor, basis: torch.Tensor) -> float:
    """`M ← M (I − UᵀU)` in place: every row of `matrix (r, d)` made orthogonal to `basis (m, d)`.

    This keeps a lora_A's rows out of the span of a layer's reference inputs (activation-space protection):
    then `A x = A (I − UᵀU) x`, small for reference-like inputs x. The math is float32 whatever the dtype.

    Returns:
        ‖M Uᵀ‖² before the projection (the energy removed).
    """
    if basis.shape[0] == 0:
        return 0.0
    rows = matrix.float()
    coefficients = rows @ basis.T  # (r, m)
    matrix.copy_((rows - coefficients @ basis).to(matrix.dtype))
    return float(coefficients.square().sum())


def span_fraction(vectors: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Share of each vector's squared norm inside the span of `basis`: ‖U v‖² / ‖v‖² (0 for a zero vector).

    Args:
        vectors: `(..., n)`.
        basis: `(k, n)`, orthonormal rows.

    Returns:
        `(...)` float32 in [0, 1].
    """
    values = vectors.float()
    if basis.shape[0] == 0:
        return values.new_zeros(values.shape[:-1])
    inside = (values @ basis.to(values.device, torch.float32).T).square().sum(-1)
    total = values.square().sum(-1)
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(torch.float32).tiny), 0.0)


@dataclass
class ProjectionStats:
    """What one projection removed, summed over tensors (squared norms, float)."""

    squared_norm: float = 0.0
    """Σ ‖v‖² before projection."""
    squared_in_span: float = 0.0
    """Σ ‖U v‖²: what was removed."""

    @property
    def span_fraction(self) -> float:
        """Share of the total squared norm that lay in the reference span (0 for nothing to project)."""
        return self.squared_in_span / self.squared_norm if self.squared_norm > 0 else 0.0

    @property
    def removed_norm(self) -> float:
        """Norm of everything removed, over all tensors: sqrt(Σ ‖U v‖²)."""
        return self.squared_in_span ** 0.5


class StackedBasis:
    """Bases of equal-size tensors stacked into `(P, k_max, n)` (zero rows pad the smaller k), so that a
    projection of hundreds of LoRA tensors costs a few batched products instead of a Python loop of small ones.

    A zero row adds nothing to `Uᵀ(U v)`, so padding changes no result. Names with k = 0 are kept (in groups
    with k_max = 0) so that every tensor is counted in the statistics and covered by `snapshot`.
    """

    def __init__(self, basis_by_name: Mapping[str, torch.Tensor],
                 rising_by_name: Mapping[str, torch.Tensor] | None = None, *,
                 reduce_: Callable[[list[torch.Tensor]], None] | None = None,
                 key_by_name: Mapping[str, Hashable] | None = None) -> None:
        """Args:
            basis_by_name: `(k, n)` orthonormal rows per name (k may be 0).
            rising_by_name: `(k,)` per name, the direction in which each basis row raises the reference loss
                (the mean reference gradient in basis coordinates); needed for one-sided projection only.
            reduce_: for vectors split over processes (each holds some of the n columns of every basis and
                vector): sums tensors in place over the processes (one collective for the list). The coefficients
                `U v` and the squared norms are then totals, and the projection is that of the whole vectors.
            key_by_name: what groups tensors besides their width (with `reduce_`: the global shape, so that every
                process stacks its coefficients in the same order).
        """
        self.reduce_ = reduce_
        by_key: dict[tuple, list[str]] = defaultdict(list)
        for name, basis in basis_by_name.items():
            extra = key_by_name[name] if key_by_name is not None else None
            by_key[(basis.shape[1], str(basis.device), extra)].append(name)
        self.groups: list[tuple[list[str], torch.Tensor]] = []
        self.rising: list[torch.Tensor] = []  # (P, 1, k) per group: sign of the loss slope along each row
        for names in by_key.values():
            k_max = max(basis_by_name[name].shape[0] for name in names)
            first = basis_by_name[names[0]]
            stacked = first.new_zeros(len(names), k_max, first.shape[1], dtype=torch.float32)  # (P, k, n)
            rising = first.new_zeros(len(names), 1, k_max, dtype=torch.float32)
            for index, name in enumerate(names):
                basis = basis_by_name[name]
                stacked[index, : basis.shape[0]] = basis
                if rising_by_name is not None and basis.shape[0]:
                    rising[index, 0, : basis.shape[0]] = rising_by_name[name].to(rising.device).sign()
            self.groups.append((names, stacked))
            self.rising.append(rising)
        self.directions_by_name = {name: basis.shape[0] for name, basis in basis_by_name.items()}

    def views(self) -> dict[str, torch.Tensor]:
        """`(k, n)` views into the stacked storage, per name, in the original order."""
        found = {name: stacked[index, : self.directions_by_name[name]]
                 for names, stacked in self.groups for index, name in enumerate(names)}
        return {name: found[name] for name in self.directions_by_name}

    @torch.no_grad()
    def project_(self, tensors_by_name: Mapping[str, torch.Tensor]) -> ProjectionStats:
        """`v ← P⊥ v` in place for every named tensor (all names must have a basis, possibly empty).

        Returns:
            ProjectionStats: Σ‖v‖² over the given tensors and Σ‖Uv‖² removed.
        """
        return self.project_change_(tensors_by_name, None)

    @torch.no_grad()
    def snapshot(self, tensors_by_name: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Float32 copies of the tensors, stacked per group: the `before` of `project_change_`."""
        return [_stack(tensors_by_name, names) for names, _ in self.groups]

    @torch.no_grad()
    def project_change_(
        self, tensors_by_name: Mapping[str, torch.Tensor], before: list[torch.Tensor] | None, *,
        one_sided: bool = False,
    ) -> ProjectionStats:
        """`θ ← θ_before + P⊥ (θ − θ_before)` in place: keep only the part of the change outside the span.

        Args:
            tensors_by_name: the current tensors θ (e.g. parameters right after `optimizer.step()`); a subset of
                the names is allowed when `before` is None (e.g. only the parameters that have a gradient).
            before: `snapshot(...)` of all names taken before the change, or None to project θ itself.
            one_sided: remove a row's component only when it raises the reference loss (its coefficient has
                the sign of the loss slope along that row); components that lower it are kept. Needs
                `rising_by_name`. To first order the reference loss then does not rise, instead of not moving.

        Returns:
            ProjectionStats over the change: Σ‖Δ‖² and Σ‖UΔ‖² removed.
        """
        norms, pending = [], []  # per group: Σ‖Δ‖²; (names, basis, rising, coefficients) to remove
        for group_index, (names, stacked) in enumerate(self.groups):
            rising = self.rising[group_index]  # (P, 1, k)
            if before is None:
                present = [index for index, name in enumerate(names) if name in tensors_by_name]
                if len(present) < len(names):
                    names, stacked, rising = [names[i] for i in present], stacked[present], rising[present]
            if not names:
                continue
            change = _stack(tensors_by_name, names)  # (P, n)
            if before is not None:
                change -= before[group_index]
            norms.append(_squared_norm(change)[None])
            if stacked.shape[1] == 0:
                continue
            # (P, 1, n) @ (P, n, k): this orientation measured 5x faster than (P, k, n) @ (P, n, 1) on CPU.
            pending.append((names, stacked, rising, torch.bmm(change.unsqueeze(1), stacked.mT)))  # (P, 1, k)
        if self.reduce_ is not None:  # split vectors: every process's partial products summed, in one collective
            self.reduce_([*norms, *(coefficients for *_, coefficients in pending)])
        squared_in_span = torch.zeros((), dtype=torch.float64)
        for names, stacked, rising, coefficients in pending:
            if one_sided:
                coefficients = torch.where(coefficients * rising > 0, coefficients, 0.0)
            removal = torch.bmm(coefficients, stacked).squeeze(1)  # (P, n)
            squared_in_span += _squared_norm(coefficients).double().cpu()
            _subtract_([tensors_by_name[name] for name in names], removal)
        squared_norm = sum((norm.double().cpu() for norm in norms), torch.zeros((), dtype=torch.float64))
        return ProjectionStats(float(squared_norm.sum()), float(squared_in_span))


def _subtract_(targets: list[torch.Tensor], removal: torch.Tensor) -> None:
    """`target -= removal[i]`; a low-precision target is updated in float32 and rounded once."""
    if all(target.dtype == torch.float32 for target in targets):
        torch._foreach_sub_([target.view(-1) for target in targets], list(removal.unbind()))
        return
    for target, row in zip(targets, removal, strict=True):
        target.copy_((target.float().view(-1) - row).view_as(target))


def _squared_norm(values: torch.Tensor) -> torch.Tensor:
    flat = values.reshape(-1)
    return torch.dot(flat, flat)  # no temporary: `square().sum()` allocated and measured 3x slower here


def _stack(tensors_by_name: Mapping[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.stack([tensors_by_name[name].detach().reshape(-1) for name in names]).float()  # (P, n)


def project_out_(
    tensors_by_name: Mapping[str, torch.Tensor], basis_by_name: Mapping[str, torch.Tensor]
) -> ProjectionStats:
    """Project every named tensor in place (flattened): `v ← v − Uᵀ(U v)`, math in float32, on the tensor's
    own device and dtype. Names with k = 0 are left alone but counted in the total; names without a basis are
    skipped.

    For repeated projections with the same bases, build a `StackedBasis` once and call its `project_`.

    Returns:
        ProjectionStats: Σ‖v‖² before projection and Σ‖Uv‖² removed.
    """
    return StackedBasis({name: basis_by_name[name] for name in tensors_by_name if name in basis_by_name}).project_(
        tensors_by_name)
