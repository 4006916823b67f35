"""The look-alike barrier on the applied update (`OGPSAConfig.lookalike_barrier`).

At a barrier refresh the per-example gradients g_j = ∇m_j of every look-alike row's refusal margin are
collected (`signals.reference` on `signals.margin` rows: one forward/backward per micro-batch) with the margins
m_j. Between refreshes the margins are tracked to first order, m̂_j ← m̂_j + g_jᵀ d*, so the floor bounds the
accumulated change, not only one step's. Every optimizer step, after the reference projection, the update the
optimizer applied, d₀ = θ − θ_old, is replaced by the closest d* with g_jᵀ d* ≥ −κ·max(m̂_j − τ, 0) − ε
(`core.barrier`); the correction is taken orthogonal to the reference basis in force, so both guarantees hold.

Exact resume: the LoRA weights at the last barrier refresh and the tracked margins are saved with every
checkpoint (`ogpsa_barrier.safetensors`); a resume recomputes the gradients at those weights, which gives the
same constraint rows as the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_ogpsa.config import OGPSAConfig
from lora_ogpsa.core.barrier import BarrierStats, apply_barrier_, gram_matrix, margin_bounds
from lora_ogpsa.signals.margin import MarginBatch
from lora_ogpsa.signals.reference import collect_reference_samples

logger = logging.getLogger("lora_ogpsa.callback")

BARRIER_FILE = "ogpsa_barrier.safetensors"
_MARGINS = "__margins__"
_STEP = "__refresh_step__"


class LookalikeBarrier:
    """The constraint rows of the look-alike margins and the math that applies them to each update."""

    def __init__(self, config: OGPSAConfig, batches: Sequence[MarginBatch],
                 parameters: Mapping[str, torch.nn.Parameter]) -> None:
        if not batches:
            raise ValueError("the look-alike barrier needs look-alike rows: pass lookalike=build_lookalike_set(...)")
        self.config = config
        self.batches = list(batches)
        self.parameters = dict(parameters)
        self.rows_by_name: dict[str, torch.Tensor] = {}  # (n_L, numel): g_j, the margins' gradients
        self.margins = torch.zeros(0, dtype=torch.float64)  # (n_L,): m̂_j, tracked to first order
        self.refresh_step = -1
        self._refresh_weights: dict[str, torch.Tensor] = {}
        self._basis_by_name: dict[str, torch.Tensor] = {}
        self._gram: torch.Tensor | None = None
        self._before: dict[str, torch.Tensor] | None = None
        self.progress_kept = float("nan")
        """−⟨∇L, d*⟩ / −⟨∇L, d₀⟩ of the last step: the share of the safety loss's first-order progress kept."""

    def is_due(self, step: int) -> bool:
        """Refresh before the first step and every `barrier_refresh_every` steps."""
        every = self.config.barrier_refresh_every
        return self.refresh_step < 0 or (every > 0 and step % every == 0 and step != self.refresh_step)

    @torch.no_grad()
    def refresh(self, model: torch.nn.Module, step: int, *, progress: bool = False) -> None:
        """Collect g_j and m_j at the current weights."""
        self.rows_by_name = {}
        self._gram = None
        with torch.enable_grad():
            samples, losses = collect_reference_samples(model, self.batches, self.parameters, progress=progress)
        # the samples are gradients of −m (a margin batch's loss): g_j = −sample
        self.rows_by_name = {name: sample.flatten(1).neg_() for name, sample in samples.items()}
        self.margins = -losses.double()
        self.refresh_step = step
        self._refresh_weights = {name: p.detach().float().cpu().clone() for name, p in self.parameters.items()}
        logger.info("look-alike barrier refresh at step %d: %d rows, margin min/mean %.2f/%.2f (floor %g)", step,
                    self.margins.numel(), float(self.margins.min()), float(self.margins.mean()),
                    self.config.barrier_floor)

    def install_basis(self, basis_by_name: Mapping[str, torch.Tensor]) -> None:
        """The reference bases the correction must stay orthogonal to (`{}`: none)."""
        self._basis_by_name = dict(basis_by_name)
        self._gram = None

    @torch.no_grad()
    def snapshot(self) -> None:
        """Before the optimizer step: remember θ."""
        self._before = {name: p.detach().float().clone() for name, p in self.parameters.items()}

    @torch.no_grad()
    def prepare(self) -> None:
        """The Gram matrix G Gᵀ of the constraint rows (projected off the reference basis), once per refresh or
        basis change; `apply_` calls it when needed."""
        if self._gram is None:
            self._gram = gram_matrix(self.rows_by_name, self._basis_by_name)

    @torch.no_grad()
    def apply_(self) -> BarrierStats:
        """After the optimizer step (and the reference projection): θ ← θ_old + d*; the margins tracked."""
        self.prepare()
        updates = {name: (p.detach().float() - self._before[name]).flatten() for name, p in self.parameters.items()}
        progress_before = self._descent(updates)
        bounds = margin_bounds(self.margins, floor=self.config.barrier_floor,
                               step_share=self.config.barrier_step_share, slack=self.config.barrier_slack)
        stats = apply_barrier_(updates, self.rows_by_name, bounds, basis_by_name=self._basis_by_name,
                               gram=self._gram)
        if stats.active:
            for name, p in self.parameters.items():
                p.copy_((self._before[name] + updates[name].view_as(p)).to(p.dtype))
        self.margins = self.margins + stats.change.cpu()
        self._before = None
        self.progress_kept = self._descent(updates) / progress_before if progress_before > 0 else float("nan")
        return stats

    def _descent(self, updates: Mapping[str, torch.Tensor]) -> float:
        """−⟨∇L, d⟩: the first-order fall of the training (safety) loss along d, from the gradients the
        optimizer stepped on (still in `.grad` at `on_optimizer_step`)."""
        return -sum(float(p.grad.float().flatten() @ updates[name]) for name, p in self.parameters.items()
                    if p.grad is not None)

    def save(self, directory: str | Path) -> None:
        """Write the refresh point and the tracked margins to `directory/ogpsa_barrier.safetensors`."""
        tensors = {**{name: weight.contiguous() for name, weight in self._refresh_weights.items()},
                   _MARGINS: self.margins.contiguous(), _STEP: torch.tensor([self.refresh_step])}
        save_file(tensors, str(Path(directory) / BARRIER_FILE))

    @torch.no_grad()
    def load_(self, directory: str | Path, model: torch.nn.Module) -> bool:
        """Restore the state saved in `directory` (False when there is none): the gradients are recomputed at
        the saved refresh weights, the tracked margins read back."""
        path = Path(directory) / BARRIER_FILE
        if not path.is_file():
            return False
        saved = load_file(str(path))
        missing = sorted(set(self.parameters) - set(saved))
        if missing or _MARGINS not in saved or _STEP not in saved:
            raise ValueError(f"{path}: not a look-alike barrier state of this model (missing "
                             f"{(missing or [_MARGINS])[0]}); resume from another checkpoint or start a new run")
        with _weights_swapped(self.parameters, saved):
            self.refresh(model, int(saved[_STEP]))
        self.margins = saved[_MARGINS].double()
        if self.margins.shape != (len(self.margins),) or self.margins.numel() != sum(
                batch.input_ids.shape[0] for batch in self.batches):
            raise ValueError(f"{path}: {self.margins.numel()} margins for a look-alike set of another size; the "
                             "--lookalike rows changed since this checkpoint")
        return True


@contextlib.contextmanager
def _weights_swapped(parameters: Mapping[str, torch.nn.Parameter],
                     weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """The parameters hold `weights` inside the block and their own values again after it."""
    kept = {name: p.detach().clone() for name, p in parameters.items()}
    try:
        for name, p in parameters.items():
            p.data.copy_(weights[name].to(p.device, p.dtype).view_as(p))
        yield
    finally:
        for name, p in parameters.items():
            p.data.copy_(kept[name])
