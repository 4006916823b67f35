"""The `ogpsa/*` metrics: gathered between logs and merged into the trainer's next log line (so they reach
metrics.jsonl, TensorBoard, W&B and trackio), plus the refresh's log lines."""

from __future__ import annotations

import logging

from lora_ogpsa.config import OGPSAConfig
from lora_ogpsa.core.projector import ProjectionStats
from lora_ogpsa.core.subspace import Subspace

logger = logging.getLogger("lora_ogpsa.callback")

METRIC_PREFIX = "ogpsa/"


class Telemetry:
    """Metrics waiting for the next log that has a loss."""

    def __init__(self) -> None:
        self.pending: dict[str, float] = {}
        self._k_summary: dict[str, float] = {}

    def set(self, name: str, value: float) -> None:
        self.pending[METRIC_PREFIX + name] = value

    def add(self, name: str, value: float) -> None:
        """Accumulate (the refreshes of step 0 and step 1 share a log line)."""
        key = METRIC_PREFIX + name
        self.pending[key] = self.pending.get(key, 0.0) + value

    def basis_installed(self, subspace: Subspace) -> None:
        self._k_summary = k_summary(subspace)

    def projected(self, stats: ProjectionStats) -> None:
        """Diagnostics of one projection, with the k summary of the basis that constrained it."""
        self.pending.update(self._k_summary)
        self.set("span_fraction", stats.span_fraction)
        self.set("removed_norm", stats.removed_norm)
        self.set("update_norm", stats.squared_norm ** 0.5)

    def barrier_applied(self, stats, barrier) -> None:
        """Diagnostics of one look-alike barrier step (`callback.barrier`)."""
        self.set("barrier_active", float(stats.active))
        self.set("barrier_violated", float(stats.violated))
        self.set("barrier_removed_share", stats.removed_share)
        self.set("barrier_loss_progress_kept", barrier.progress_kept)
        self.set("barrier_margin_min", float(barrier.margins.min()))
        self.set("barrier_margin_mean", float(barrier.margins.mean()))

    def merge_into(self, logs: dict | None, state) -> None:
        """Add the pending metrics to a log with a loss (and to the copy Trainer.log put in log_history)."""
        if not self.pending or logs is None or "loss" not in logs:
            return
        logs.update(self.pending)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self.pending)
        self.pending = {}

    def refreshed(self, subspace: Subspace, config: OGPSAConfig, step: int, seconds: float) -> None:
        """Metrics and log lines of one refresh."""
        reference_loss = float(subspace.metadata.get("reference_loss", "nan"))
        self.add("refresh_seconds", seconds)
        self.set("reference_loss", reference_loss)
        if "reference_margin" in subspace.metadata:
            self.set("reference_margin", float(subspace.metadata["reference_margin"]))
        if config.protect != "activations":
            summary = subspace.summary()
            objective = []  # what the subspace protects: the NLL, the refusal margin, or both
            if config.reference_objective != "refusal_margin":
                objective.append(f"reference loss {reference_loss:.4f}")
            if "reference_margin" in subspace.metadata:
                objective.append(f"refusal margin {float(subspace.metadata['reference_margin']):.4f}")
            logger.info("OGPSA refresh at step %d: k min/median/max %d/%g/%d over %d tensors (%d with k=0), %s, "
                        "%.1f s", step, summary["k_min"], summary["k_median"], summary["k_max"], summary["tensors"],
                        summary["k_zero"], ", ".join(objective), seconds)
        if subspace.input_basis_by_name:  # (m, d) rows per lora_A: m protected input directions of d
            sizes = sorted(basis.shape[0] for basis in subspace.input_basis_by_name.values())
            logger.info("OGPSA refresh at step %d: activation bases of %d lora_A tensors, protected input "
                        "directions min/median/max %d/%d/%d (τ = %g), %.1f s", step, len(sizes), sizes[0],
                        sizes[len(sizes) // 2], sizes[-1], config.activation_energy, seconds)


def k_summary(subspace: Subspace) -> dict[str, float]:
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
