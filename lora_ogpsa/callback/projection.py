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
from lora_ogpsa.signals import distributed, sharding


class Projection:
    """The installed bases of one subspace over the trainable LoRA weights, and the math that applies them.

    Under FSDP2 the weights are DTensor shards and the subspace holds the matching columns of every basis
    (`sharding.slice_subspace`): the math runs on each rank's shard, the coefficients summed over ranks in one
    all-reduce per projection, so the result is the projection of the whole tensors.
    """

    def __init__(self, subspace: Subspace, parameters: dict[str, torch.nn.Parameter]) -> None:
        self.parameters = parameters
        self.sharded = sharding.is_sharded(parameters)
        split = {"reduce_": distributed.sum_across_ranks_, "key_by_name": sharding.grouping_keys(parameters)}
        self.stacked = StackedBasis(subspace.basis_by_name, subspace.mean_coefficients_by_name or None,
                                    **(split if self.sharded else {}))
        subspace.basis_by_name = self.stacked.views()  # share the stacked storage instead of holding two copies
        self.input_bases = [(parameters[name], basis) for name, basis in subspace.input_basis_by_name.items()]
        self._before: list[torch.Tensor] | None = None

    def _local(self, tensors) -> dict[str, torch.Tensor]:
        """This rank's shards (the tensors themselves when not sharded), for names whose tensor is not None."""
        return {name: sharding.local(tensor.data) for name, tensor in tensors.items() if tensor is not None}

    @torch.no_grad()
    def project_gradients_(self) -> ProjectionStats:
        """`grad` mode: the accumulated gradients, in place."""
        return self.stacked.project_(self._local({name: p.grad for name, p in self.parameters.items()}))

    @torch.no_grad()
    def snapshot(self) -> None:
        """`update` mode, before the optimizer step: remember θ."""
        self._before = self.stacked.snapshot(self._local(self.parameters))

    @torch.no_grad()
    def project_change_(self, *, one_sided: bool) -> ProjectionStats:
        """`update` mode, after the optimizer step: θ ← θ_old + P⊥(θ − θ_old)."""
        stats = self.stacked.project_change_(self._local(self.parameters), self._before, one_sided=one_sided)
        self._before = None
        return stats

    @torch.no_grad()
    def constrain_rows_(self, optimizer=None) -> float:
        """Rows of every lora_A (and of its first moment, given the optimizer) orthogonal to its input basis;
        returns the squared norm removed from the weights (summed over ranks: FSDP2 shards whole rows, so the
        projection itself is local)."""
        removed = sum(project_rows_(sharding.local(tensor.data), basis) for tensor, basis in self.input_bases)
        for moment, basis in _first_moments(optimizer, self.input_bases) if optimizer is not None else ():
            project_rows_(sharding.local(moment), basis)
        if self.sharded:
            total = torch.tensor([float(removed)], device=next(iter(self.parameters.values())).device)
            distributed.sum_across_ranks_([total])
            removed = float(total)
        return removed

    @torch.no_grad()
    def project_first_moment_(self, optimizer) -> None:
        """Adam's first moment onto the complement of the new basis (`update` mode, at a refresh)."""
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        moments = {name: inner.state[p]["exp_avg"] for name, p in self.parameters.items()
                   if "exp_avg" in inner.state.get(p, {})}
        if moments:
            self.stacked.project_(self._local(moments))


def _first_moments(optimizer, bases) -> list:
    inner = getattr(optimizer, "optimizer", optimizer)
    return [(inner.state[p]["exp_avg"], basis) for p, basis in bases if "exp_avg" in inner.state.get(p, {})]
