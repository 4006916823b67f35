"""The projection of every safety update onto the complement of the basis in force.

`update`: snapshot θ before the optimizer step and replace the change it made by its projection,
θ ← θ_old + P⊥(θ − θ_old); Adam's first moment is projected at each refresh. `grad`: project the accumulated
(and clipped) gradient before the step. The activation constraint (rows of lora_A orthogonal to their input
basis) is applied last, so it holds exactly.
"""

from __future__ import annotations

import torch

from lora_ogpsa.core.projector import ProjectionStats, StackedBasis, project_rows_
from lora_ogpsa.core.subspace import Subspace


class Projection:
    """The installed bases of one subspace over the trainable LoRA weights, and the math that applies them."""

    def __init__(self, subspace: Subspace, parameters: dict[str, torch.nn.Parameter]) -> None:
        self.parameters = parameters
        self.stacked = StackedBasis(subspace.basis_by_name, subspace.mean_coefficients_by_name or None)
        subspace.basis_by_name = self.stacked.views()  # share the stacked storage instead of holding two copies
        self.input_bases = [(parameters[name].data, basis) for name, basis in subspace.input_basis_by_name.items()]
        self._before: list[torch.Tensor] | None = None

    @torch.no_grad()
    def project_gradients_(self) -> ProjectionStats:
        """`grad` mode: the accumulated gradients, in place."""
        return self.stacked.project_({name: p.grad for name, p in self.parameters.items() if p.grad is not None})

    @torch.no_grad()
    def snapshot(self) -> None:
        """`update` mode, before the optimizer step: remember θ."""
        self._before = self.stacked.snapshot(self.parameters)

    @torch.no_grad()
    def project_change_(self, *, one_sided: bool) -> ProjectionStats:
        """`update` mode, after the optimizer step: θ ← θ_old + P⊥(θ − θ_old)."""
        stats = self.stacked.project_change_(self.parameters, self._before, one_sided=one_sided)
        self._before = None
        return stats

    @torch.no_grad()
    def constrain_rows_(self, optimizer=None) -> float:
        """Rows of every lora_A (and of its first moment, given the optimizer) orthogonal to its input basis;
        returns the squared norm removed from the weights."""
        removed = sum(project_rows_(tensor, basis) for tensor, basis in self.input_bases)
        for moment, basis in _first_moments(optimizer, self.input_bases) if optimizer is not None else ():
            project_rows_(moment, basis)
        return removed

    @torch.no_grad()
    def project_first_moment_(self, optimizer) -> None:
        """Adam's first moment onto the complement of the new basis (`update` mode, at a refresh)."""
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        moments = {name: inner.state[p]["exp_avg"] for name, p in self.parameters.items()
                   if "exp_avg" in inner.state.get(p, {})}
        if moments:
            self.stacked.project_(moments)


def _first_moments(optimizer, bases) -> list:
    inner = getattr(optimizer, "optimizer", optimizer)
    return [(inner.state[p]["exp_avg"], basis) for p, basis in bases if "exp_avg" in inner.state.get(p, {})]
