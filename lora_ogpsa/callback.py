"""OGPSACallback: refresh the reference subspace and project every safety update, in any HF/TRL trainer.

Schedule (DESIGN.md §1.4), with N = optimizer steps done:
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
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import TrainerCallback

from lora_ogpsa import distributed
from lora_ogpsa.activations import collect_input_moments, compute_input_basis
from lora_ogpsa.config import OGPSAConfig
from lora_ogpsa.errors import InputError, first_line
from lora_ogpsa.files import SUBSPACE_FILE, checkpoint_dir
from lora_ogpsa.projector import ProjectionStats, StackedBasis, project_rows_
from lora_ogpsa.reference import ReferenceBatch, ReferenceSet, collect_reference_sketch
from lora_ogpsa.sketch import GradientSketch
from lora_ogpsa.subspace import Subspace

logger = logging.getLogger(__name__)

METRIC_PREFIX = "ogpsa/"


class OGPSACallback(TrainerCallback):
    """Wire OGPSA's refresh and projection into a transformers `Trainer` (or any TRL trainer).

    In `on_train_begin` it makes the trainer safe for the guarantee: LoRA weights a trainer cast to a low
    precision (TRL casts them to bf16 on a quantized base) are cast back to float32, bitsandbytes' CPU repack
    is switched off (it silently corrupts later LoRA gradients), and what it cannot guarantee is refused:
    DeepSpeed/FSDP, and trainable weights other than lora_A/lora_B (they would move unprojected). At the end
    of training the subspace in force is written next to the adapter in `output_dir` (where
    `trainer.save_model()` puts it); `save(directory)` writes it anywhere else.

    Args:
        config: the OGPSA settings (mode, k, energy, refresh interval).
        reference_batches: a `ReferenceSet` (`build_reference_set`: its hash and source are recorded with
            the subspace) or padded reference micro-batches (`reference.make_batches`).
        parameters_fn: maps the trainer's model to its trainable LoRA weights keyed as in the adapter file
            (default: `lora_ogpsa.model.lora_parameters`).
        metadata: strings saved with every subspace file (e.g. the reference-set hash).
        progress: show a progress bar during reference collection.
        replay: contrastive replay rows (e.g. dangerous-sounding benign prompts with the base model's answers),
            as a `ReferenceSet` whose micro-batches are the per-step replay batches. Their gradient is added
            *after* the projection, so the constraint cannot cancel the signal that says "answer this": the
            safety gradient is projected (as in `grad` mode) and `replay_weight · ∇ replay loss` is added to it
            before the optimizer step. One extra forward/backward per optimizer step; one process only.
        replay_weight: the replay loss's weight relative to the safety loss (F / (1 − F) for a replay share F).
    """

    def __init__(self, config: OGPSAConfig, reference_batches: ReferenceSet | Sequence[ReferenceBatch], *,
                 parameters_fn=None, metadata: dict[str, str] | None = None, progress: bool = True,
                 replay: ReferenceSet | None = None, replay_weight: float = 1.0) -> None:
        from lora_ogpsa.model import lora_parameters

        self.config = config
        if isinstance(reference_batches, ReferenceSet):
            metadata = {**reference_batches.metadata, **(metadata or {})}
            reference_batches = reference_batches.batches
        self.reference_batches = list(reference_batches)
        self.parameters_fn = parameters_fn or lora_parameters
        self.metadata = dict(metadata or {})
        self.progress = progress
        self.replay_batches = list(replay.batches) if replay is not None else []
        self.replay_weight = replay_weight
        self.subspace: Subspace | None = None
        self._stacked: StackedBasis | None = None
        self._parameters: dict[str, torch.nn.Parameter] = {}
        self._before: list[torch.Tensor] | None = None
        self._pending: dict[str, float] = {}
        self._k_summary: dict[str, float] = {}
        self._input_bases: list[tuple[torch.Tensor, torch.Tensor]] = []

    # ---- trainer events ----

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.config.project == "none":
            return
        _run_first(self, inspect.currentframe())
        _refuse_sharded_training(args)
        if self.replay_batches and distributed.active():
            raise ValueError("OGPSACallback: replay runs in one process only (its extra backward would need its own "
                             "gradient synchronisation); drop the replay set or run without torchrun")
        self._parameters = self.parameters_fn(model)
        if not self._parameters:
            raise ValueError("OGPSACallback found no trainable lora_A/lora_B weights in the model")
        _make_safe_(model, self._parameters)
        step = state.global_step
        loaded = step > 0 and self._load_from_checkpoint(args, state)
        # A refresh due at the last step of a run is skipped (nothing follows it); continuing such a run with
        # more steps performs it now, on the same weights, so the result equals an uninterrupted run.
        if not loaded or (self._is_refresh_step(step) and self.subspace.metadata.get("step") != str(step)):
            self._refresh(model, optimizer, step)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.config.project == "grad" or self.replay_batches:
            grads = {name: p.grad for name, p in self._parameters.items() if p.grad is not None}
            self._record(self._stacked.project_(grads))
            if self.replay_batches:
                self._add_replay_gradient(model, state.global_step)
        elif self.config.project == "update":
            self._before = self._stacked.snapshot(self._parameters)

    def _add_replay_gradient(self, model, step: int) -> None:
        """`grad += replay_weight · ∇ (mean replay loss)` over this step's replay micro-batch (unprojected)."""
        from lora_ogpsa.reference import example_losses

        batch = self.replay_batches[step % len(self.replay_batches)]
        with torch.enable_grad():
            loss = example_losses(model, batch).mean() * self.replay_weight
            loss.backward()
        self._pending[f"{METRIC_PREFIX}replay_loss"] = float(loss.detach()) / max(self.replay_weight, 1e-12)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.config.project == "update" and not self.replay_batches:
            self._record(self._stacked.project_change_(self._parameters, self._before,
                                                       one_sided=self.config.one_sided))
            self._before = None
        if self._input_bases:  # last, so the activation constraint holds exactly (lora_A was in range(P))
            removed = self._constrain_rows_(self._input_bases)
            self._pending[f"{METRIC_PREFIX}activation_removed_norm"] = removed ** 0.5

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.config.project == "none":
            return
        if self._is_refresh_step(state.global_step) and state.global_step < state.max_steps:
            self._refresh(model, optimizer, state.global_step)

    def _is_refresh_step(self, step: int) -> bool:
        every = self.config.refresh_every
        return step <= 1 or (every > 0 and step % every == 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending or logs is None or "loss" not in logs:
            return
        # Trainer.log appended a copy of `logs` to log_history before calling us: update both.
        logs.update(self._pending)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        self._pending = {}

    def on_train_end(self, args, state, control, **kwargs):
        if self.subspace is not None and args.should_save:
            self.save(args.output_dir)

    def on_save(self, args, state, control, **kwargs):
        if self.subspace is not None and args.should_save:
            self.save(checkpoint_dir(args.output_dir, state.global_step))

    # ---- the work ----

    def save(self, directory: str | Path) -> None:
        """Write the subspace in force to `directory/ogpsa_subspace.safetensors`."""
        self.subspace.save(Path(directory) / SUBSPACE_FILE)

    @torch.no_grad()
    def _refresh(self, model, optimizer, step: int) -> None:
        start = time.perf_counter()
        # The bases in force are not used while new ones are computed: let their memory go first (k × LoRA
        # parameters × 4 bytes, 149 MB at k 8 on SmolLM2-135M), so the refresh peak holds one set, not two.
        self.subspace = self._stacked = None
        self._input_bases = []
        subspace = self._gradient_subspace(model) if self.config.protect != "activations" else Subspace(
            {name: p.new_zeros(0, p.numel(), dtype=torch.float32) for name, p in self._parameters.items()},
            metadata={"reference_loss": "nan"})
        subspace.metadata = {**self.metadata, **subspace.metadata, "step": str(step),
                             "config": _config_json(self.config)}
        if self.config.protect != "gradients":
            self._add_input_bases(model, subspace)
        self._install(subspace)
        if self.config.project == "update" and optimizer is not None:
            self._project_first_moment(optimizer)
        if self._input_bases:  # lora_A into range(P) (B is 0 at the first refresh: the model is unchanged)
            self._constrain_rows_(self._input_bases)
            if optimizer is not None:
                self._constrain_rows_(self._first_moments(optimizer, self._input_bases))
        seconds = time.perf_counter() - start
        reference_loss = float(subspace.metadata.get("reference_loss", "nan"))
        key = f"{METRIC_PREFIX}refresh_seconds"
        self._pending[key] = self._pending.get(key, 0.0) + seconds  # step 0 and step 1 refreshes share a log line
        self._pending[f"{METRIC_PREFIX}reference_loss"] = reference_loss
        summary = subspace.summary()
        if self.config.protect != "activations":
            logger.info("OGPSA refresh at step %d: k min/median/max %d/%g/%d over %d tensors (%d with k=0), "
                        "reference loss %.4f, %.1f s", step, summary["k_min"], summary["k_median"], summary["k_max"],
                        summary["tensors"], summary["k_zero"], reference_loss, seconds)
        if self._input_bases:  # (m, d) rows per lora_A: m protected input directions of d
            sizes = sorted(basis.shape[0] for _, basis in self._input_bases)
            logger.info("OGPSA refresh at step %d: activation bases of %d lora_A tensors, protected input "
                        "directions min/median/max %d/%d/%d (τ = %g), %.1f s", step, len(sizes), sizes[0],
                        sizes[len(sizes) // 2], sizes[-1], self.config.activation_energy, seconds)

    def _gradient_subspace(self, model) -> Subspace:
        """The reference-gradient subspace, computed on rank 0 and broadcast to every rank."""
        subspace = None
        sketch, losses = self._collect(model)
        if sketch is not None:  # rank 0 (or the only process) computes the subspace
            subspace = sketch.subspace(max_directions=self.config.max_directions, energy=self.config.energy)
            del sketch
            subspace.metadata["reference_loss"] = f"{float(losses.mean()):.6f}"
        if distributed.active():
            shapes = {name: parameter.shape for name, parameter in self._parameters.items()}
            device = next(iter(self._parameters.values())).device
            subspace = distributed.broadcast_subspace(subspace, shapes, device)
        return subspace

    def _add_input_bases(self, model, subspace: Subspace) -> None:
        """Activation-space bases of every lora_A from the reference inputs (summed over ranks)."""
        moments = collect_input_moments(model, distributed.my_share(self.reference_batches), self._parameters,
                                        positions=self.config.activation_positions,
                                        opening_tokens=self.config.activation_opening_tokens)
        if distributed.active():
            distributed.sum_across_ranks_(list({id(m): m for m in moments.values()}.values()))
        subspace.input_basis_by_name, subspace.input_energy_by_name = compute_input_basis(
            moments, energy=self.config.activation_energy)

    def _constrain_rows_(self, basis_by_tensor) -> float:
        """Every row of each tensor made orthogonal to its input basis; returns the energy removed."""
        return sum(project_rows_(tensor, basis) for tensor, basis in basis_by_tensor)

    def _first_moments(self, optimizer, bases) -> list:
        inner = getattr(optimizer, "optimizer", optimizer)
        return [(inner.state[p]["exp_avg"], basis) for p, basis in bases if "exp_avg" in inner.state.get(p, {})]

    def _collect(self, model) -> tuple[GradientSketch | None, torch.Tensor | None]:
        """The reference samples, sketched as they are produced (`sketch_rows` rows per tensor), and the losses:
        on rank 0, every rank's share folded into one sketch (None elsewhere)."""
        with torch.enable_grad():
            sketch, losses = collect_reference_sketch(model, distributed.my_share(self.reference_batches),
                                                      self._parameters, rows=self.config.sketch_size,
                                                      progress=self.progress and distributed.is_main())
        if not distributed.active():
            return sketch, losses
        counts = [batch.input_ids.shape[0] for batch in self.reference_batches]
        gathered = distributed.gather_sketches(sketch, counts, losses, rows=self.config.sketch_size)
        return gathered if gathered is not None else (None, None)

    def _install(self, subspace: Subspace) -> None:
        self._stacked = StackedBasis(subspace.basis_by_name, subspace.mean_coefficients_by_name or None)
        subspace.basis_by_name = self._stacked.views()  # share the stacked storage instead of holding two copies
        self.subspace = subspace
        self._input_bases = [(self._parameters[name].data, basis) for name, basis in
                             subspace.input_basis_by_name.items()]
        self._k_summary = _k_summary(subspace)

    def _project_first_moment(self, optimizer) -> None:
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        moments = {name: inner.state[p]["exp_avg"] for name, p in self._parameters.items()
                   if "exp_avg" in inner.state.get(p, {})}
        if moments:
            self._stacked.project_(moments)

    def _record(self, stats: ProjectionStats) -> None:
        """Diagnostics of one projection, with the k summary of the basis that constrained it."""
        self._pending.update(self._k_summary)
        self._pending.update({
            f"{METRIC_PREFIX}span_fraction": stats.span_fraction,
            f"{METRIC_PREFIX}removed_norm": stats.removed_norm,
            f"{METRIC_PREFIX}update_norm": stats.squared_norm ** 0.5,
        })

    def _load_from_checkpoint(self, args, state) -> bool:
        path = checkpoint_dir(args.output_dir, state.global_step) / SUBSPACE_FILE
        if not path.is_file():
            logger.warning("resuming at step %d without %s: recomputing the subspace", state.global_step, path)
            return False
        numel = {name: parameter.numel() for name, parameter in self._parameters.items()}
        device = next(iter(self._parameters.values())).device
        try:
            subspace = Subspace.load(path, numel_by_name=numel)
        except ValueError as error:  # a truncated, foreign or mismatched file: bad input to --resume
            raise InputError(f"--resume: {first_line(error)}; resume from an earlier checkpoint (delete this one) "
                             "or start a new --output") from error
        self._install(subspace.to(device))
        logger.info("OGPSA: resumed the subspace of step %d from %s", state.global_step, path)
        return True


def _make_safe_(model: torch.nn.Module, parameters: dict[str, torch.nn.Parameter]) -> None:
    """float32 LoRA weights, no bitsandbytes CPU repack, no trainable weight outside the projection."""
    from lora_ogpsa.model import disable_cpu_repack_, keep_lora_float32_

    cast = [name for name, parameter in parameters.items() if parameter.dtype != torch.float32]
    if cast:
        keep_lora_float32_(model)
        logger.info("OGPSACallback: cast %d LoRA weights back to float32 (the trainer had made them %s); the "
                    "projection needs float32 to stay exact", len(cast), parameters[cast[0]].dtype)
    disable_cpu_repack_(model)
    projected = {id(parameter) for parameter in parameters.values()}
    loose = [name for name, parameter in model.named_parameters()
             if parameter.requires_grad and id(parameter) not in projected]
    if loose:
        raise ValueError(f"OGPSACallback: {len(loose)} trainable weights are not LoRA A/B weights (e.g. {loose[0]}): "
                         "they would move unprojected; freeze them (no modules_to_save, no DoRA) or use "
                         "project='none'")


def _run_first(callback: TrainerCallback, frame) -> None:
    """Move `callback` to the front of the trainer's callback list, so that the metrics it adds in `on_log`
    are in `logs` when the integration callbacks (TensorBoard, W&B, trackio, ...) write them: the Trainer
    puts those before any user callback, and `on_log` runs in list order.

    The trainer is not passed to callbacks; its `CallbackHandler` is the caller of this event (found on the
    stack). Moving an element from later in the list to its front while the handler iterates over the list
    keeps every later element at its index, so the current event still reaches each callback once.
    """
    from transformers.trainer_callback import CallbackHandler

    while frame is not None and not isinstance(frame.f_locals.get("self"), CallbackHandler):
        frame = frame.f_back
    if frame is None:
        logger.warning("OGPSACallback: trainer callbacks not found; trackers may miss the ogpsa/* metrics")
        return
    callbacks = frame.f_locals["self"].callbacks
    if callback in callbacks and callbacks[0] is not callback:
        callbacks.remove(callback)
        callbacks.insert(0, callback)


def _refuse_sharded_training(args) -> None:
    """DeepSpeed and FSDP step the optimizer inside their engines on sharded tensors: the trainer events this
    callback hooks would not see the update it must project. Refuse instead of projecting the wrong thing."""
    state = getattr(args, "distributed_state", None)
    kind = str(getattr(state, "distributed_type", ""))
    if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None) or "DEEPSPEED" in kind or "FSDP" in kind:
        raise ValueError("OGPSA projection does not support DeepSpeed or FSDP (the optimizer steps on sharded "
                         "tensors inside their engines); use DDP (torchrun) or --project none")


def _k_summary(subspace: Subspace) -> dict[str, float]:
    """k of the basis in force: min per LoRA factor (lora_A is 0 before lora_B moves), median, max, total."""
    ks = subspace.directions_by_name
    summary = {f"{METRIC_PREFIX}k_min_{kind}": float(min((k for name, k in ks.items() if f".{kind}." in name),
                                                           default=0)) for kind in ("lora_A", "lora_B")}
    overall = subspace.summary()
    summary.update({f"{METRIC_PREFIX}k_median": float(overall["k_median"]),
                    f"{METRIC_PREFIX}k_max": float(overall["k_max"]),
                    f"{METRIC_PREFIX}directions": float(overall["directions"])})
    if subspace.input_basis_by_name:
        sizes = sorted(basis.shape[0] for basis in subspace.input_basis_by_name.values())
        summary[f"{METRIC_PREFIX}input_directions_median"] = float(sizes[len(sizes) // 2])
        summary[f"{METRIC_PREFIX}input_energy_min"] = float(min(subspace.input_energy_by_name.values()))
    return summary


def _config_json(config: OGPSAConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)
