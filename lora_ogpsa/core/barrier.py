"""The look-alike barrier: the closest update that keeps every look-alike refusal margin above its floor.

For look-alike rows j with margin m_j (log p(answer opening) − log p(refusal opening)) and its gradient
g_j = ∇m_j, and the update d₀ the optimizer is about to apply, the barrier applies instead

    d* = argmin ½‖d − d₀‖²   s.t.   g_jᵀ d ≥ b_j  for every j,      b_j = −κ · max(m_j − τ, 0) − ε

i.e. to first order m_j may fall to the floor τ (only a share κ of the room in one step) and a margin already
below τ may not fall further (up to the slack ε). Its dual is a non-negative quadratic program in n_L variables,

    d* = d₀ + Gᵀλ,   λ = argmin_{λ ≥ 0} ½ λᵀ(G Gᵀ)λ − λᵀ(b − G d₀),

solved exactly here by an active-set method (Lawson–Hanson, on the Gram matrix) in float64. With no violated
constraint λ = 0 and d* = d₀ exactly. With rows g_j taken orthogonal to a reference basis, Gᵀλ is orthogonal to
it too, so d* keeps the reference projection's guarantee.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


def margin_bounds(margins: torch.Tensor, *, floor: float, step_share: float, slack: float) -> torch.Tensor:
    """b_j = −κ·max(m_j − τ, 0) − ε: the least first-order change each margin may take in one step, `(n_L,)`."""
    return -step_share * (margins.double() - floor).clamp_min(0.0) - slack


def solve_nonnegative_qp(gram: torch.Tensor, target: torch.Tensor, *, max_iterations: int | None = None,
                         tolerance: float = 1e-12, ridge: float = 1e-10) -> torch.Tensor:
    """λ = argmin_{λ ≥ 0} ½ λᵀQλ − λᵀc for a symmetric positive semi-definite Q (Lawson–Hanson active set).

    Args:
        gram: Q, `(n, n)`, symmetric PSD (e.g. G Gᵀ).
        target: c, `(n,)`.
        max_iterations: outer iterations (default 3n + 10); the solver stops earlier when the KKT conditions hold.
        tolerance: relative tolerance on the dual residual c − Qλ.
        ridge: Q + ridge · max(diag Q) · I is solved (see below).

    Returns:
        λ, `(n,)` float64, non-negative, on the device of `gram` (solved on the CPU: n is small).
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or target.shape != (gram.shape[0],):
        raise ValueError(f"gram must be (n, n) and target (n,), got {tuple(gram.shape)} and {tuple(target.shape)}")
    q, c = gram.double().cpu(), target.double().cpu()  # n_L × n_L: tiny, solved on the CPU
    n = c.shape[0]
    # A ridge of 1e-10 × the largest diagonal makes Q definite (two look-alikes with parallel gradients, or more
    # rows than parameters, leave it singular), which Lawson–Hanson needs to terminate; an active constraint then
    # holds up to ridge · λ_j, far below float32 round-off of the update.
    q = q + ridge * float(q.diagonal().abs().max() if n else 0.0) * torch.eye(n, dtype=torch.float64)
    solution = torch.zeros(n, dtype=torch.float64, device=q.device)
    passive = torch.zeros(n, dtype=torch.bool, device=q.device)
    scale = tolerance * max(1.0, float(c.abs().max()) if n else 1.0, float(q.diagonal().abs().max()) if n else 1.0)
    for _ in range(max_iterations or 3 * n + 10):
        residual = c - q @ solution  # (n,): the negative gradient of the dual objective
        candidates = torch.where(~passive & (residual > scale), residual, torch.full_like(residual, -torch.inf))
        if not bool(torch.isfinite(candidates).any()):
            break
        passive[int(candidates.argmax())] = True
        solution, passive = _inner_loop(q, c, solution, passive, scale)
    return solution.to(gram.device)


def _inner_loop(q: torch.Tensor, c: torch.Tensor, solution: torch.Tensor, passive: torch.Tensor,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve on the passive set; step back toward the last feasible point while a passive variable is ≤ 0."""
    while True:
        trial = torch.zeros_like(solution)
        index = passive.nonzero().flatten()
        sub = q[index][:, index]
        trial[index] = torch.linalg.solve(sub, c[index])
        blocked = passive & (trial <= scale)
        if not bool(blocked.any()):
            return trial, passive
        ratio = solution[blocked] / (solution[blocked] - trial[blocked]).clamp_min(1e-300)
        step = float(ratio.min().clamp(0.0, 1.0))
        solution = solution + step * (trial - solution)
        passive = passive & (solution > scale)
        solution = torch.where(passive, solution, torch.zeros_like(solution))
        if not bool(passive.any()):
            return solution, passive


@dataclass
class BarrierStats:
    """What one barrier step did."""

    active: int
    """Constraints with λ_j > 0 (those that changed the update)."""
    violated: int
    """Constraints d₀ itself violated."""
    update_squared_norm: float
    """‖d₀‖²."""
    removed_squared_norm: float
    """‖d* − d₀‖²."""
    worst_violation: float
    """max_j (b_j − g_jᵀd*), ≤ 0 up to round-off when every constraint holds."""
    change: torch.Tensor
    """g_jᵀ d* for every row, `(n_L,)` float64: the first-order change of every margin."""

    @property
    def removed_share(self) -> float:
        """‖d* − d₀‖ / ‖d₀‖ (0 for a zero update)."""
        return (self.removed_squared_norm / self.update_squared_norm) ** 0.5 if self.update_squared_norm else 0.0


def gram_matrix(rows_by_name: Mapping[str, torch.Tensor],
                basis_by_name: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Q = Σ_t G_t P⊥_t G_tᵀ, float64 `(n_L, n_L)`, over every tensor's constraint rows `(n_L, n_t)`; with a basis
    U_t `(k, n_t)` for a tensor, P⊥_t = I − U_tᵀU_t (Q = G Gᵀ − C Cᵀ with C = G Uᵀ), else P⊥_t = I."""
    total = None
    for name, rows in rows_by_name.items():
        rows = rows.double()  # float64: a near-singular Q (similar look-alikes) amplifies round-off in λ
        part = rows @ rows.T
        basis = (basis_by_name or {}).get(name)
        if basis is not None and basis.shape[0]:
            inside = rows @ basis.to(rows.device, torch.float64).T  # (n_L, k)
            part = part - inside @ inside.T
        total = part if total is None else total + part.to(total.device)
    if total is None:
        raise ValueError("the barrier needs constraint rows for at least one tensor")
    return total


def apply_barrier_(updates_by_name: Mapping[str, torch.Tensor], rows_by_name: Mapping[str, torch.Tensor],
                   bounds: torch.Tensor, *, basis_by_name: Mapping[str, torch.Tensor] | None = None,
                   gram: torch.Tensor | None = None) -> BarrierStats:
    """Replace every update d₀ (flattened per tensor, `(n_t,)`) by the closest d* with G d* ≥ b, in place.

    With `basis_by_name`, the correction is taken orthogonal to each tensor's basis (d* = d₀ + P⊥Gᵀλ), so an
    update orthogonal to the basis stays so; the constraints still read the true margin change G d*.

    Args:
        updates_by_name: the update of every tensor, `(n_t,)` float32, modified in place.
        rows_by_name: the constraint rows g_j of every tensor, `(n_L, n_t)`; every name must have an update.
        bounds: b, `(n_L,)`.
        basis_by_name: reference bases U_t `(k, n_t)` the correction must stay orthogonal to.
        gram: `gram_matrix(rows_by_name, basis_by_name)` if already computed.

    Returns:
        BarrierStats.
    """
    missing = sorted(set(rows_by_name) - set(updates_by_name))
    if missing:
        raise ValueError(f"constraint rows for tensors without an update, e.g. {missing[0]}")
    gram = gram_matrix(rows_by_name, basis_by_name) if gram is None else gram
    before = _row_products(updates_by_name, rows_by_name, gram.device)  # G d₀, (n_L,)
    update_squared_norm = _squared(updates_by_name.values())
    bounds = bounds.double().to(gram.device)
    multipliers = solve_nonnegative_qp(gram, bounds - before)
    corrections = []
    if bool((multipliers > 0).any()):
        for name, rows in rows_by_name.items():
            correction = multipliers.to(rows.device, torch.float32) @ rows.float()  # Gᵀλ, (n_t,)
            basis = (basis_by_name or {}).get(name)
            if basis is not None and basis.shape[0]:
                basis = basis.to(rows.device, torch.float32)
                correction = correction - (basis @ correction) @ basis
            updates_by_name[name].add_(correction.to(updates_by_name[name].dtype))
            corrections.append(correction)
    change = before + gram @ multipliers  # G d* = G d₀ + G P⊥ Gᵀ λ
    return BarrierStats(active=int((multipliers > 0).sum()), violated=int((before < bounds).sum()),
                        update_squared_norm=update_squared_norm, removed_squared_norm=_squared(corrections),
                        worst_violation=float((bounds - change).max()) if change.numel() else 0.0, change=change)


def _row_products(updates_by_name: Mapping[str, torch.Tensor], rows_by_name: Mapping[str, torch.Tensor],
                  device: torch.device) -> torch.Tensor:
    total = torch.zeros(next(iter(rows_by_name.values())).shape[0], dtype=torch.float64, device=device)
    for name in rows_by_name:
        total += (rows_by_name[name].float() @ updates_by_name[name].float()).double().to(device)
    return total


def _squared(tensors) -> float:
    return sum(float(tensor.double().square().sum()) for tensor in tensors)
