"""Reference inputs of every LoRA layer, as second-moment matrices C = Σ x xᵀ: forward passes only.

Activation-space protection (GPM, Saha et al. 2021; NSPO; AlphaEdit; LoRA-Null) keeps the rows of each lora_A
orthogonal to the top eigenvectors U of C. Then for a reference-like input x, `ΔW x = s·B A x = s·B A (I − UᵀU) x`,
whose size is bounded by the energy of x outside span(U): the forward pass on reference sequences is
preserved up to that residual at every layer — not only to first order in the reference loss.

Positions: `all` (every token of the reference sequences) or `opening` (the assistant header and the first
response tokens, where the decision to refuse or answer is taken). Layers fed the same tensor (q/k/v, gate/up)
share one matrix: it is accumulated once.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from lora_ogpsa.signals.reference import ReferenceBatch, find_lora_pairs

Positions = Literal["all", "opening"]
HEADER_TOKENS = 3
"""Prompt tokens before the first response token that count as the assistant header (`opening`)."""


def position_weights(batch: ReferenceBatch, positions: Positions, opening_tokens: int) -> torch.Tensor:
    """`(B, T)` 0/1 weights of the input positions whose activations are protected."""
    mask = batch.attention_mask.float()
    if positions == "all":
        return mask
    # loss_weights[:, t] > 0: position t predicts a response token, so the first such t is the header's end.
    predicts = torch.nn.functional.pad((batch.loss_weights > 0).float(), (0, 1))  # (B, T)
    rank = predicts.cumsum(1)
    first = (rank == 1) & (predicts > 0)
    start = first.float().argmax(1, keepdim=True) - HEADER_TOKENS  # (B, 1)
    index = torch.arange(mask.shape[1]).unsqueeze(0)
    return ((index >= start) & (index < start + HEADER_TOKENS + opening_tokens)).float() * mask


class _InputMoments:
    """Forward pre-hooks on lora_A modules that add each input's weighted Σ x xᵀ."""

    def __init__(self, modules_by_name: Mapping[str, nn.Module]) -> None:
        self.covariance_by_name: dict[str, torch.Tensor] = {}
        self.weights: torch.Tensor | None = None  # (B, T) for the current batch
        self._seen: dict[tuple, tuple[str, torch.Tensor]] = {}
        self._alias: dict[str, str] = {}
        self.handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in modules_by_name.items()]

    def start_batch(self, weights: torch.Tensor) -> None:
        self.weights, self._seen = weights, {}

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0]
            key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype)
            if key in self._seen:  # the same tensor as another layer's input: one matrix for both
                self._alias[name] = self._seen[key][0]
                return
            self._seen[key] = (name, x)  # holding x keeps its memory from being reused within this batch
            flat = x.detach().float().reshape(self.weights.shape[0], -1, x.shape[-1])  # (B, T, d)
            weighted = flat * self.weights.to(flat.device).unsqueeze(-1)
            moment = torch.einsum("btd,bte->de", weighted, flat)  # (d, d)
            if name in self.covariance_by_name:
                self.covariance_by_name[name] += moment
            else:
                self.covariance_by_name[name] = moment
        return hook

    def result(self) -> dict[str, torch.Tensor]:
        """Per lora_A name its matrix; aliased names get the very same tensor object."""
        return {**self.covariance_by_name,
                **{name: self.covariance_by_name[source] for name, source in self._alias.items()}}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    flags = {module: module.training for module in model.modules()}
    model.eval()  # no LoRA dropout on the protected inputs
    try:
        yield
    finally:
        for module, training in flags.items():
            module.training = training


@torch.no_grad()
def collect_input_moments(model: nn.Module, batches: Sequence[ReferenceBatch],
                          parameters: Mapping[str, torch.nn.Parameter], *, positions: Positions = "all",
                          opening_tokens: int = 8, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """`C = Σ x xᵀ` of every lora_A's input over the reference batches (float32, on the model's device).

    Args:
        model: the PEFT model.
        batches: padded reference micro-batches (`reference.make_batches`).
        parameters: the trainable LoRA weights keyed as in the adapter file; the result is keyed by their
            lora_A names.
        positions: `all` tokens, or the `opening` (assistant header + `opening_tokens` response tokens).

    Returns:
        `(d_in, d_in)` per lora_A name (layers sharing an input share the tensor object).
    """
    pairs = find_lora_pairs(model, parameters, adapter_name)
    moments = _InputMoments({pair.name_a: pair.lora_a for pair in pairs})
    device = next(model.parameters()).device
    try:
        with _eval_mode(model):
            for batch in batches:
                moments.start_batch(position_weights(batch, positions, opening_tokens))
                model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                      use_cache=False)
    finally:
        moments.remove()
    return moments.result()


def compute_input_basis(covariance_by_name: Mapping[str, torch.Tensor], *, energy: float
                        ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Activation-space bases: top eigenvectors of each layer's reference-input second moment C = Σ x xᵀ.

    Keeps, per name, the fewest eigenvectors whose eigenvalues reach `energy` of the trace; then
    Σ ‖(I − UᵀU) x‖² ≤ (1 − energy) Σ ‖x‖² over the reference inputs. Names given the very same tensor (layers
    that share an input: q/k/v, gate/up) are solved once; equal shapes are solved in one batched `eigh`.

    Args:
        covariance_by_name: `(d, d)` symmetric positive semi-definite per name.
        energy: share of the inputs' energy the basis must capture, in (0, 1].

    Returns:
        (`(m, d)` float32 orthonormal rows per name, the energy actually captured per name).
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"`activation_energy` must be in (0, 1], got {energy!r}")
    distinct = {id(matrix): matrix for matrix in covariance_by_name.values()}
    solved: dict[int, tuple[torch.Tensor, float]] = {}
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for key, matrix in distinct.items():
        by_shape[(matrix.shape[0], str(matrix.device))].append(key)
    for keys in by_shape.values():
        stacked = torch.stack([distinct[key].double() for key in keys])  # (P, d, d)
        values, vectors = torch.linalg.eigh((stacked + stacked.transpose(1, 2)) / 2)  # ascending
        values, vectors = values.flip(-1).clamp_min(0), vectors.flip(-1)
        for index, key in enumerate(keys):
            total = float(values[index].sum())
            share = (values[index].cumsum(0) / total) if total > 0 else torch.ones_like(values[index])
            m = min(int((share < energy - 1e-12).sum()) + 1, len(share)) if total > 0 else 0
            basis = vectors[index, :, :m].T.float().contiguous()  # (m, d)
            solved[key] = (basis, float(share[m - 1]) if m else 1.0)
    bases = {name: solved[id(matrix)][0] for name, matrix in covariance_by_name.items()}
    return bases, {name: solved[id(matrix)][1] for name, matrix in covariance_by_name.items()}
