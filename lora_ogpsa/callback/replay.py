"""Contrastive replay added after the projection: the signal that says "answer this" is never projected away."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lora_ogpsa.signals.reference import ReferenceBatch, example_losses


class ReplayGradient:
    """`grad += weight · ∇ (mean replay loss)` over one replay micro-batch per optimizer step (unprojected).

    Args:
        batches: the per-step replay micro-batches, used in turn.
        weight: the replay loss's weight relative to the safety loss (F / (1 − F) for a replay share F).
    """

    def __init__(self, batches: Sequence[ReferenceBatch], weight: float) -> None:
        self.batches = list(batches)
        self.weight = weight

    def __bool__(self) -> bool:
        return bool(self.batches)

    def add_(self, model: torch.nn.Module, step: int) -> float:
        """Accumulate this step's replay gradient into the model's `.grad`; returns the unweighted replay loss."""
        batch = self.batches[step % len(self.batches)]
        with torch.enable_grad():
            loss = example_losses(model, batch).mean()
            (loss * self.weight).backward()
        return float(loss.detach())
