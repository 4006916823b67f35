"""OGPSACallback: refresh the reference subspace and project every safety update, in any HF/TRL trainer.

A thin router of trainer events over parts with one job each: `guards` (trainer checks, mode checks),
`schedule` (when to refresh), `basis` (estimating the bases), `projection` (applying them), `replay`,
`state` (save/resume) and `telemetry` (the ogpsa/* metrics).

Schedule (docs/ARCHITECTURE.md, "One refresh"), with N = optimizer steps done:
- before the first step (N = 0), after the first step (N = 1: every lora_A has a zero reference gradient until
  lora_B moves), then whenever N is a multiple of `refresh_every`. A refresh runs in `on_step_end`, before the
  trainer logs and saves, so `checkpoint-N/ogpsa_subspace.safetensors` is the basis that constrains update N+1
  and resuming from checkpoint N is exact. A refresh due after the run's last step is skipped (no update
  follows it) and performed on resume if the run is continued.

Projection, once per optimizer step:
- `update`: snapshot θ in `on_pre_optimizer_step`, and in `on_optimizer_step` replace the change the optimizer
  made by its projection, θ ← θ_old + P⊥(θ − θ_old); at each refresh also project Adam's first moment.
  Guarantee: the applied Δθ is orthogonal to the basis.
- `grad`: project the accumulated (and clipped) gradient in `on_pre_optimizer_step`.
  Guarantee: the gradient the optimizer receives is orthogonal to the basis.
- `none`: nothing (plain LoRA); the callback is then only a no-op.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import TrainerCallback

from lora_ogpsa.callback.barrier import LookalikeBarrier
from lora_ogpsa.callback.basis import estimate_subspace
from lora_ogpsa.callback.guards import check_modes, make_safe_, refuse_sharded_training, run_first
from lora_ogpsa.callback.projection import Projection
from lora_ogpsa.callback.replay import ReplayGradient
from lora_ogpsa.callback.schedule import RefreshSchedule
from lora_ogpsa.callback.state import load_checkpoint_subspace, save_subspace, whole_subspace
from lora_ogpsa.callback.telemetry import METRIC_PREFIX, Telemetry
from lora_ogpsa.config import OGPSAConfig
from lora_ogpsa.core.subspace import Subspace
from lora_ogpsa.signals import distributed
from lora_ogpsa.signals.margin import MarginBatch
from lora_ogpsa.signals.reference import ReferenceBatch, ReferenceSet
from lora_ogpsa.utils.files import checkpoint_dir

__all__ = ["METRIC_PREFIX", "OGPSACallback"]


class OGPSACallback(TrainerCallback):
    """Wire OGPSA's refresh and projection into a transformers `Trainer` (or any TRL trainer).

    In `on_train_begin` it makes the trainer safe for the guarantee: LoRA weights a trainer cast to a low
    precision (TRL casts them to bf16 on a quantized base) are cast back to float32, bitsandbytes' CPU repack
    is switched off (it silently corrupts later LoRA gradients), and what it cannot guarantee is refused:
    DeepSpeed/FSDP1 (FSDP2 is supported: docs/fsdp.md), and trainable weights other than lora_A/lora_B (they
    would move unprojected). At the end of training the subspace in force is written next to the adapter in
    `output_dir` (where `trainer.save_model()` puts it); `save(directory)` writes it anywhere else.

    Args:
        config: the OGPSA settings (mode, k, energy, refresh interval).
        reference_batches: a `ReferenceSet` (`build_reference_set`: its hash and source are recorded with
            the subspace) or padded reference micro-batches (`reference.make_batches`, and for a
            `reference_objective` other than `nll` also `margin.make_margin_batches`).
        parameters_fn: maps the trainer's model to its trainable LoRA weights keyed as in the adapter file
            (default: `lora_ogpsa.models.loading.lora_parameters`).
        metadata: strings saved with every subspace file (e.g. the reference-set hash).
        progress: show a progress bar during reference collection.
        replay: contrastive replay rows (e.g. dangerous-sounding benign prompts with the base model's answers),
            as a `ReferenceSet` whose micro-batches are the per-step replay batches. Their gradient is added
            *after* the projection, so the constraint cannot cancel the signal that says "answer this": the
            safety gradient is projected (as in `grad` mode) and `replay_weight · ∇ replay loss` is added to it
            before the optimizer step. One extra forward/backward per optimizer step; one process only.
        replay_weight: the replay loss's weight relative to the safety loss (F / (1 − F) for a replay share F).
        lookalike: the look-alike rows of `config.lookalike_barrier` (`build_lookalike_set`), whose refusal
            margins every applied update must keep above the floor (`callback.barrier`); one process only.
    """

    def __init__(self, config: OGPSAConfig, reference_batches: ReferenceSet | Sequence[ReferenceBatch], *,
                 parameters_fn=None, metadata: dict[str, str] | None = None, progress: bool = True,
                 replay: ReferenceSet | None = None, replay_weight: float = 1.0,
                 lookalike: ReferenceSet | Sequence[MarginBatch] | None = None) -> None:
        from lora_ogpsa.models.loading import lora_parameters

        check_modes(config, replay=replay is not None and bool(replay.batches))
        self.config = config
        if isinstance(reference_batches, ReferenceSet):
            metadata = {**reference_batches.metadata, **(metadata or {})}
            reference_batches = [*reference_batches.batches, *reference_batches.margin_batches]
        self.reference_batches = [batch for batch in reference_batches if not isinstance(batch, MarginBatch)]
        self.margin_batches = [batch for batch in reference_batches if isinstance(batch, MarginBatch)]
        if config.reference_objective != "nll" and config.protect != "activations" and not self.margin_batches:
            raise ValueError(f"OGPSACallback: reference_objective={config.reference_objective!r} needs the "
                             "reference rows packed for the refusal margin: pass build_reference_set(..., config) "
                             "built with this config (or signals.margin.make_margin_batches)")
        self.parameters_fn = parameters_fn or lora_parameters
        self.metadata = dict(metadata or {})
        self.progress = progress
        self.replay = ReplayGradient(replay.batches if replay is not None else [], replay_weight)
        self.lookalike_batches = _margin_rows(config, lookalike)
        self.barrier: LookalikeBarrier | None = None
        self.schedule = RefreshSchedule(config.refresh_every)
        self.telemetry = Telemetry()
        self.subspace: Subspace | None = None
        self.projection: Projection | None = None
        self._parameters: dict[str, torch.nn.Parameter] = {}

    @property
    def _active(self) -> bool:
        return self.config.project != "none" or self.config.lookalike_barrier

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self._active:
            return
        # checked here, not in __init__: a benchmark installs its own basis without a reference set
        if self.config.project != "none" and not (self.reference_batches or self.margin_batches):
            raise ValueError("OGPSACallback: no reference batches; the protected subspace would be empty and the "
                             "reference loss NaN — pass build_reference_set(rows, tokenizer, config)")
        run_first(self, inspect.currentframe())
        refuse_sharded_training(args)
        for name, given in (("replay", self.replay), ("the look-alike barrier", self.lookalike_batches)):
            if given and distributed.active():
                raise ValueError(f"OGPSACallback: {name} runs in one process only (its extra backward would need "
                                 "its own gradient synchronisation); drop it or run without torchrun")
        self._parameters = self.parameters_fn(model)
        if not self._parameters:
            raise ValueError("OGPSACallback found no trainable lora_A/lora_B weights in the model")
        make_safe_(model, self._parameters)
        step = state.global_step
        if self.config.project != "none":
            self._begin_projection(args, model, optimizer, step)
        if self.config.lookalike_barrier:
            self._begin_barrier(args, model, step)

    def _begin_projection(self, args, model, optimizer, step: int) -> None:
        loaded = load_checkpoint_subspace(args.output_dir, step, self._parameters) if step > 0 else None
        if loaded is not None:
            self._install(loaded)
        # A refresh due at the last step of a run is skipped (nothing follows it); continuing such a run with
        # more steps performs it now, on the same weights, so the result equals an uninterrupted run.
        if loaded is None or (self.schedule.is_due(step) and loaded.metadata.get("step") != str(step)):
            self._refresh(model, optimizer, step)

    def _begin_barrier(self, args, model, step: int) -> None:
        self.barrier = LookalikeBarrier(self.config, self.lookalike_batches, self._parameters)
        if not (step > 0 and self.barrier.load_(checkpoint_dir(args.output_dir, step), model)):
            self._refresh_barrier(model, step)
        self.barrier.install_basis(self.subspace.basis_by_name if self.subspace is not None else {})

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.barrier is not None:
            self.barrier.snapshot()
        if self.config.project == "grad":
            self.telemetry.projected(self.projection.project_gradients_())
            if self.replay:
                self.telemetry.set("replay_loss", self.replay.add_(model, state.global_step))
        elif self.config.project == "update":
            self.projection.snapshot()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.config.project == "update":
            self.telemetry.projected(self.projection.project_change_(one_sided=self.config.one_sided))
        if self.projection is not None and self.projection.input_bases:
            self.telemetry.set("activation_removed_norm", self.projection.constrain_rows_() ** 0.5)
        if self.barrier is not None:  # last: the update it leaves is the one applied
            self.telemetry.barrier_applied(self.barrier.apply_(), self.barrier)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.config.project != "none" and self.schedule.runs_after(state.global_step, state.max_steps):
            self._refresh(model, optimizer, state.global_step)
        step = state.global_step
        if self.barrier is not None and self.barrier.is_due(step) and step < state.max_steps:
            self._refresh_barrier(model, step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.telemetry.merge_into(logs, state)

    def on_train_end(self, args, state, control, **kwargs):
        if self.subspace is not None:  # FSDP2: the whole bases on rank 0 from now on (nothing is projected after)
            self.subspace = whole_subspace(self.subspace, self._parameters)
        if self.subspace is not None and args.should_save:
            self.save(args.output_dir)

    def on_save(self, args, state, control, **kwargs):
        whole = whole_subspace(self.subspace, self._parameters) if self.subspace is not None else None
        if whole is not None and args.should_save:
            save_subspace(whole, checkpoint_dir(args.output_dir, state.global_step))
        if self.barrier is not None and args.should_save:
            self.barrier.save(checkpoint_dir(args.output_dir, state.global_step))

    def save(self, directory: str | Path) -> None:
        """Write the subspace in force to `directory/ogpsa_subspace.safetensors` (under FSDP2, during training each
        rank holds its shard's columns: the whole bases are on rank 0 once training has ended)."""
        save_subspace(self.subspace, directory)

    @torch.no_grad()
    def _refresh(self, model, optimizer, step: int) -> None:
        start = time.perf_counter()
        # The bases in force are not used while new ones are computed: let their memory go first (k × LoRA
        # parameters × 4 bytes, 149 MB at k 8 on SmolLM2-135M), so the refresh peak holds one set, not two.
        self.subspace = self.projection = None
        subspace = estimate_subspace(model, self._parameters, self.reference_batches, self.config,
                                     progress=self.progress, margin_batches=self.margin_batches)
        subspace.metadata = {**self.metadata, **subspace.metadata, "step": str(step)}
        self._install(subspace)
        if self.config.project == "update" and optimizer is not None:
            self.projection.project_first_moment_(optimizer)
        if self.projection.input_bases:  # lora_A into range(P) (B is 0 at the first refresh: the model is unchanged)
            self.projection.constrain_rows_(optimizer)
        self.telemetry.refreshed(subspace, self.config, step, time.perf_counter() - start)

    def _install(self, subspace: Subspace) -> None:
        self.projection = Projection(subspace, self._parameters)
        self.subspace = subspace
        self.telemetry.basis_installed(subspace)
        if self.barrier is not None:
            self.barrier.install_basis(subspace.basis_by_name)

    def _refresh_barrier(self, model, step: int) -> None:
        start = time.perf_counter()
        self.barrier.refresh(model, step, progress=self.progress)
        self.telemetry.add("barrier_refresh_seconds", time.perf_counter() - start)


def _margin_rows(config: OGPSAConfig, lookalike) -> list[MarginBatch]:
    """The look-alike rows packed for the margin; refused when given without the barrier or missing with it."""
    batches = list(lookalike.margin_batches if isinstance(lookalike, ReferenceSet) else lookalike or [])
    if config.lookalike_barrier and not batches:
        raise ValueError("OGPSACallback: lookalike_barrier needs the look-alike rows: pass "
                         "lookalike=build_lookalike_set(rows, tokenizer, config)")
    if batches and not config.lookalike_barrier:
        raise ValueError("OGPSACallback: look-alike rows given but lookalike_barrier is off; set "
                         "lookalike_barrier=True or drop them")
    if not all(isinstance(batch, MarginBatch) for batch in batches):
        raise ValueError("OGPSACallback: lookalike must be build_lookalike_set(...) or margin.make_margin_batches "
                         "rows")
    return batches
