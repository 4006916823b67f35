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

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import TrainerCallback

from lora_ogpsa import distributed
from lora_ogpsa.config import OGPSAConfig
from lora_ogpsa.projector import ProjectionStats, StackedBasis
from lora_ogpsa.reference import ReferenceBatch, collect_reference_samples
from lora_ogpsa.subspace import Subspace, compute_subspace

logger = logging.getLogger(__name__)

SUBSPACE_FILE = "ogpsa_subspace.safetensors"
METRIC_PREFIX = "ogpsa/"


class OGPSACallback(TrainerCallback):
    """Wire OGPSA's refresh and projection into a transformers `Trainer` (or any TRL trainer).

    Args:
        config: the OGPSA settings (mode, k, energy, refresh interval).
        reference_batches: padded reference micro-batches (`reference.make_batches`).
        parameters_fn: maps the trainer's model to its trainable LoRA weights keyed as in the adapter file
            (default: `lora_ogpsa.model.lora_parameters`).
        metadata: strings saved with every subspace file (e.g. the reference-set hash).
        progress: show a progress bar during reference collection.
    """

    def __init__(self, config: OGPSAConfig, reference_batches: Sequence[ReferenceBatch], *,
                 parameters_fn=None, metadata: dict[str, str] | None = None, progress: bool = True) -> None:
        from lora_ogpsa.model import lora_parameters

        self.config = config
        self.reference_batches = list(reference_batches)
        self.parameters_fn = parameters_fn or lora_parameters
        self.metadata = dict(metadata or {})
        self.progress = progress
        self.subspace: Subspace | None = None
        self._stacked: StackedBasis | None = None
        self._parameters: dict[str, torch.nn.Parameter] = {}
        self._before: list[torch.Tensor] | None = None
        self._pending: dict[str, float] = {}
        self._k_summary: dict[str, float] = {}

    # ---- trainer events ----

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.config.project == "none":
            return
        _refuse_sharded_training(args)
        self._parameters = self.parameters_fn(model)
        if not self._parameters:
            raise ValueError("OGPSACallback found no trainable lora_A/lora_B weights in the model")
        step = state.global_step
        loaded = step > 0 and self._load_from_checkpoint(args, state)
        # A refresh due at the last step of a run is skipped (nothing follows it); continuing such a run with
        # more steps performs it now, on the same weights, so the result equals an uninterrupted run.
        if not loaded or (self._is_refresh_step(step) and self.subspace.metadata.get("step") != str(step)):
            self._refresh(model, optimizer, step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.config.project == "grad":
            grads = {name: p.grad for name, p in self._parameters.items() if p.grad is not None}
            self._record(self._stacked.project_(grads))
        elif self.config.project == "update":
            self._before = self._stacked.snapshot(self._parameters)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.config.project == "update":
            self._record(self._stacked.project_change_(self._parameters, self._before,
                                                       one_sided=self.config.one_sided))
            self._before = None

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

    def on_save(self, args, state, control, **kwargs):
        if self.subspace is not None and args.should_save:
            self.save(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    # ---- the work ----

    def save(self, directory: str | Path) -> None:
        """Write the subspace in force to `directory/ogpsa_subspace.safetensors`."""
        self.subspace.save(Path(directory) / SUBSPACE_FILE)

    @torch.no_grad()
    def _refresh(self, model, optimizer, step: int) -> None:
        start = time.perf_counter()
        subspace = None
        samples, losses = self._collect(model)
        if samples is not None:  # rank 0 (or the only process) computes the subspace
            subspace = compute_subspace(samples, max_directions=self.config.max_directions,
                                        energy=self.config.energy)
            del samples
            subspace.metadata = {**self.metadata, "step": str(step), "config": _config_json(self.config),
                                 "reference_loss": f"{float(losses.mean()):.6f}"}
        if distributed.active():
            shapes = {name: parameter.shape for name, parameter in self._parameters.items()}
            device = next(iter(self._parameters.values())).device
            subspace = distributed.broadcast_subspace(subspace, shapes, device)
        self._install(subspace)
        if self.config.project == "update" and optimizer is not None:
            self._project_first_moment(optimizer)
        seconds = time.perf_counter() - start
        reference_loss = float(subspace.metadata["reference_loss"])
        key = f"{METRIC_PREFIX}refresh_seconds"
        self._pending[key] = self._pending.get(key, 0.0) + seconds  # step 0 and step 1 refreshes share a log line
        self._pending[f"{METRIC_PREFIX}reference_loss"] = reference_loss
        summary = subspace.summary()
        logger.info("OGPSA refresh at step %d: k min/median/max %d/%g/%d over %d tensors (%d with k=0), "
                    "reference loss %.4f, %.1f s", step, summary["k_min"], summary["k_median"], summary["k_max"],
                    summary["tensors"], summary["k_zero"], reference_loss, seconds)

    def _collect(self, model) -> tuple[dict[str, torch.Tensor] | None, torch.Tensor | None]:
        """All reference samples and losses on rank 0 (None elsewhere); each rank collects its share."""
        with torch.enable_grad():
            samples, losses = collect_reference_samples(model, distributed.my_share(self.reference_batches),
                                                        self._parameters,
                                                        progress=self.progress and distributed.is_main())
        if not distributed.active():
            return samples, losses
        counts = [batch.input_ids.shape[0] for batch in self.reference_batches]
        gathered = distributed.gather_samples(samples, counts, losses)
        return gathered if gathered is not None else (None, None)

    def _install(self, subspace: Subspace) -> None:
        self._stacked = StackedBasis(subspace.basis_by_name, subspace.mean_coefficients_by_name or None)
        subspace.basis_by_name = self._stacked.views()  # share the stacked storage instead of holding two copies
        self.subspace = subspace
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
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / SUBSPACE_FILE
        if not path.is_file():
            logger.warning("resuming at step %d without %s: recomputing the subspace", state.global_step, path)
            return False
        numel = {name: parameter.numel() for name, parameter in self._parameters.items()}
        device = next(iter(self._parameters.values())).device
        self._install(Subspace.load(path, numel_by_name=numel).to(device))
        logger.info("OGPSA: resumed the subspace of step %d from %s", state.global_step, path)
        return True


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
    return summary


def _config_json(config: OGPSAConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


class StageFilesCallback(TrainerCallback):
    """Writes `metrics.jsonl` (one JSON object per log) and, in every checkpoint, the run config, the metrics
    so far and the model card: a checkpoint directory is a complete adapter directory."""

    def __init__(self, directory: str | Path, run_config: dict, *, stage: str, subspace_fn=lambda: None) -> None:
        self.path = Path(directory) / "metrics.jsonl"
        self.run_config = run_config
        self.stage = stage
        self.subspace_fn = subspace_fn

    def on_train_begin(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        kept = [line for line in _read_lines(self.path) if json.loads(line).get("step", 0) <= state.global_step]
        self.path.write_text("".join(kept))  # a resumed run drops what the interrupted one logged after its checkpoint

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and args.should_save:
            with self.path.open("a") as handle:
                handle.write(json.dumps({"stage": self.stage, "step": state.global_step, **logs}) + "\n")

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        from lora_ogpsa.export import RUN_CONFIG, read_metrics, write_json
        from lora_ogpsa.model_card import write_model_card

        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        (checkpoint / self.path.name).write_text("".join(_read_lines(self.path)))
        write_json(checkpoint / RUN_CONFIG, {**self.run_config, "step": state.global_step})
        write_model_card(checkpoint / "README.md", run_config=self.run_config, subspace=self.subspace_fn(),
                         metrics=read_metrics(self.path))


def _read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True) if path.is_file() else []
