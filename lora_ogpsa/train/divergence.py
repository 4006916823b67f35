"""Stop a run whose loss or trainable weights stop being finite, at the step where it happens."""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback


class TrainingDivergedError(RuntimeError):
    """The loss or a trainable weight is NaN or infinite (the command exits 1; OUTPUT.partial is kept)."""


class DivergenceCallback(TrainerCallback):
    """Raise `TrainingDivergedError` as soon as a logged loss or a trainable weight is not finite.

    Runs before the stage's own callbacks, so no checkpoint of the broken weights is written. The weights are
    checked only at the steps that log or save (one device sync over the adapter's tensors), not every step.
    """

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not (control.should_save or control.should_log):  # set by transformers' flow callback, which runs first
            return
        weights = [p for p in model.parameters() if p.requires_grad] if model is not None else []
        if weights and not torch.stack([p.detach().isfinite().all() for p in weights]).all():
            raise TrainingDivergedError(f"training diverged at step {state.global_step}: a trainable weight is not "
                                   "finite; lower --learning-rate (or set --max_grad_norm) and start again")

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if isinstance(loss, int | float) and not math.isfinite(loss):
            raise TrainingDivergedError(f"training diverged at step {state.global_step}: the loss is {loss}; lower "
                                   "--learning-rate (or set --max_grad_norm) and start again")
