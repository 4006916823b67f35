"""Configuration of the OGPSA projection.

The defaults come from measurements, not taste; each field's docstring says which. The run settings of a training command are
in `train/arguments.py`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

ProjectMode = Literal["update", "grad", "none"]
PROJECT_MODES: tuple[str, ...] = get_args(ProjectMode)
ProtectKind = Literal["gradients", "activations", "both"]
PROTECT_KINDS: tuple[str, ...] = get_args(ProtectKind)
ActivationPositions = Literal["all", "opening"]
ReferenceObjective = Literal["nll", "refusal_margin", "both"]
REFERENCE_OBJECTIVES: tuple[str, ...] = get_args(ReferenceObjective)


@dataclass
class OGPSAConfig:
    """How the reference subspace is estimated, refreshed and removed from the safety updates."""

    max_directions: int = 8
    """Cap on k, the directions kept per LoRA tensor. The basis costs k × (LoRA parameters) × 4 bytes and the
    projection about 4·k flops per LoRA parameter per step."""

    energy: float = 0.95
    """Keep the fewest directions whose squared singular values reach this share of the total (then cap by
    `max_directions`). 1.0 keeps every non-zero direction up to the cap."""

    refresh_every: int = 100
    """Recompute the basis every this many optimizer steps (0: only before and after the first step). A
    refresh costs one forward+backward over the reference examples, so its share of training time is about
    (reference_examples / batch size) / refresh_every. Measured (`python -m benchmarks.refresh`, SmolLM2-135M
    4-bit, batch 8, 2-core CPU): 32 examples every 100 steps = 6% of training time, every 50 = 12%, every
    20 = 25%; 64 examples every 20 = 40%."""

    reference_examples: int = 32
    """Reference rows used to estimate the subspace: one gradient sample per row (S ≥ k). 32 keeps a refresh
    at ~21 s on the CPU above (64: ~41 s) while still giving 4× more samples than the default k = 8."""

    project: ProjectMode = "update"
    """`update`: project the change the optimizer actually applied (exact first-order guarantee under AdamW);
    `grad`: project the accumulated gradient before the optimizer (paper-faithful); `none`: plain LoRA."""

    reference_batch_size: int = 8
    """Reference rows per forward/backward while collecting per-example gradients."""

    sketch_rows: int | None = None
    """ℓ, rows of the streaming sketch (Frequent Directions) that reduces each LoRA tensor's reference-gradient
    samples as micro-batches produce them; None (the default): 2 × `max_directions` (at least 2 ×
    `reference_batch_size`), i.e. 16 at the default k = 8 — see `sketch_size`. A refresh holds min(ℓ, S) ×
    (LoRA parameters) × 4 bytes of samples whatever `reference_examples` (S) is (SmolLM2-135M, r = 16: 19.5 MB
    per row; a 7B model with r = 16 on all linear layers: 160 MB per row). With S ≤ ℓ the basis is exactly the
    one from all samples. Beyond, measured at S = 256 (`tests/test_sketch.py`): the top-8 directions capture
    less energy than the exact top 8 by 0.8 %, 1.3 %, 23 % and 15 % at ℓ = 16 (spectra σ_i ∝ 1/i, 0.9^i,
    i^-1/2, 8 strong directions over a flat tail), < 0.01 %, 3.2 % and 6.9 % at ℓ = 32, 0.16 % and 2.5 % at
    ℓ = 64. On real reference gradients (`python -m benchmarks.sketch_accuracy`, SmolLM2-135M 4-bit, S = 32,
    k 8) the ℓ = 16 basis captures a median 3.6 points (max 16) less of the samples' energy than the exact top
    8 (54.3 % against 58.0 %: the spectrum is flat); ℓ = 32 is exact there. Memory (`benchmarks.memory`,
    SmolLM2-135M 4-bit, S = 64 and 256): refresh peak 1.09 × plain QLoRA's at ℓ = 16, 1.25–1.37 × at ℓ = 32,
    2.2 × holding every sample — hence the default: ℓ = 2k is Frequent Directions' usual size for a rank-k
    answer, and the one that keeps a refresh within 1.25 × plain's memory. Raise it (e.g. to S) for an exact
    basis when memory allows. At least 2 × `reference_batch_size` (a micro-batch goes into the free rows)."""

    opening_tokens: int = 0
    """Weight the reference loss toward the first response tokens: the first `opening_tokens` tokens of each
    response get weight 1, the rest `later_token_weight`. 0 weights every response token equally."""

    later_token_weight: float = 1.0
    """Weight of response tokens after the opening ones (only used when `opening_tokens` > 0)."""

    one_sided: bool = False
    """`update` mode only: remove a protected direction's component only when it would raise the reference
    loss (its sign is that of the mean reference gradient along the direction), keep it when it lowers it.
    The reference loss then does not rise to first order, instead of not moving. With
    `reference_objective='refusal_margin'` the protected quantity is the margin, which must not *decrease*:
    its samples are gradients of −m, so the same rule keeps the mean margin from falling to first order."""

    reference_objective: ReferenceObjective = "nll"
    """What the reference-gradient subspace protects (`protect='gradients'`/`both`). `nll`: the reference
    answers' likelihood (the paper's). `refusal_margin`: the margin m = log p(a₁..ₜ | b) − log mean_j
    p(r_j,₁..ₜ | b) between each reference answer's opening and the refusal openings r_j
    (`margin_refusals`) over t = `margin_tokens` tokens — an update that raises a refusal logit by δ moves m
    by about −δ, while the answer's own log-likelihood moves by only −p(r | b)·δ, near zero while refusing is
    unlikely; use look-alike benign prompts as the reference. One sample per reference row (∇ of −m),
    computed as the NLL's are (`lora_ogpsa.signals.margin`). `both`: the NLL samples and the margin samples of every
    row stacked into the same subspace computation as they are (2 S samples, no rescaling; one-sided then
    keeps mean NLL − mean margin from rising). Cost (`python -m benchmarks.refusal_margin --rows 32`,
    SmolLM2-135M 4-bit, 96-token rows, 24 refusals, t = 4, 1 thread of a shared 2-core CPU): a margin row is
    the 48-token prompt + 27 prefix-tree tokens, and its collection took 0.77 × the NLL's; `both` 1.79 ×."""

    margin_tokens: int = 4
    """t: opening tokens of the answer and of each refusal whose log-probability the margin compares."""

    margin_refusals: list[str] | None = None
    """The refusal texts r_j of the margin, each rendered as the assistant turn after every reference prompt
    (chat template) and averaged in probability; None: `lora_ogpsa.refusal.GENERIC_REFUSALS` (the refusals
    the default safety data teaches). Refusals with the same t opening tokens share their computation."""

    protect: ProtectKind = "gradients"
    """What the updates must not move. `gradients`: the reference-gradient subspace of every LoRA tensor (the
    paper's method, first order in the reference loss). `activations`: keep every lora_A's rows orthogonal to
    the top eigenvectors of its layer's reference inputs Σ x xᵀ (GPM / NSPO / LoRA-Null), so that ΔW x ≈ 0 on
    reference-like inputs at every layer; forward passes only. `both`: the two together (the activation
    constraint is applied last, so it holds exactly)."""

    activation_energy: float = 0.9
    """`activations`/`both`: the share of the reference inputs' energy the protected span must capture (τ);
    then Σ‖ΔW x‖ ≤ s‖B‖‖A‖·sqrt(1 − τ)·Σ‖x‖ over the reference inputs. Higher protects more and leaves lora_A
    fewer directions to learn in."""

    activation_positions: ActivationPositions = "all"
    """`activations`/`both`: which reference tokens' inputs are protected: `all`, or `opening` (the assistant
    header and the first `activation_opening_tokens` response tokens, where a refusal is decided)."""

    activation_opening_tokens: int = 8
    """Response tokens counted by `activation_positions='opening'`."""

    lookalike_barrier: bool = False
    """Keep the refusal margin of every look-alike row (`--lookalike`: benign prompts that sound harmful, with the
    answer to keep) above a floor, per example, on the update actually applied: the optimizer's update d₀ is
    replaced by the closest d* with m_j + g_jᵀd* ≥ min(m_j, τ) − ε for every row j (m_j the refusal margin of
    `margin_tokens` tokens against `margin_refusals`, g_j = ∇m_j; `lora_ogpsa.core.barrier`). Only constraints
    that would be crossed act; refusal may grow wherever no look-alike pays for it. Composes with the
    reference projection (the correction is orthogonal to the basis in force, so both guarantees hold)."""

    barrier_floor: float = 2.0
    """τ, nats: the look-alike margin (answer opening over refusal opening) the barrier keeps to first order;
    a margin already below τ may not fall further."""

    barrier_step_share: float = 1.0
    """κ ∈ (0, 1]: the share of a margin's room above τ one step may use."""

    barrier_slack: float = 0.0
    """ε ≥ 0, nats: how far below min(m_j, τ) a margin may fall to first order."""

    barrier_refresh_every: int = 4
    """Recompute the look-alike gradients g_j and margins every this many optimizer steps (0: only before the
    first step); between refreshes the margins are tracked to first order with the cached gradients."""

    lookalike_examples: int = 48
    """n_L, look-alike rows constrained (a seeded sample when `--lookalike` has more)."""

    def __post_init__(self) -> None:
        _check_int(self, "max_directions", low=1)
        if not (isinstance(self.energy, int | float) and 0.0 < self.energy <= 1.0):
            raise ValueError(f"`energy` must be in (0, 1], got {self.energy!r}")
        _check_int(self, "refresh_every", low=0)
        _check_int(self, "reference_examples", low=1)
        if self.project not in PROJECT_MODES:
            raise ValueError(f"`project` must be one of {', '.join(PROJECT_MODES)}, got {self.project!r}")
        _check_int(self, "reference_batch_size", low=1)
        if self.sketch_rows is not None:
            _check_int(self, "sketch_rows", low=2)
        if self.sketch_rows is not None and self.sketch_rows < 2 * self.reference_batch_size:
            raise ValueError(f"`sketch_rows` must be at least 2 × `reference_batch_size` = "
                             f"{2 * self.reference_batch_size} (each micro-batch's samples go into its free rows), "
                             f"got {self.sketch_rows}; raise `sketch_rows` or lower `reference_batch_size`")
        _check_int(self, "opening_tokens", low=0)
        if not isinstance(self.one_sided, bool):
            raise ValueError(f"`one_sided` must be true or false, got {self.one_sided!r}")
        if self.one_sided and self.project != "update":
            raise ValueError(f"`one_sided` needs project='update', got project={self.project!r}")
        if self.protect not in PROTECT_KINDS:
            raise ValueError(f"`protect` must be one of {', '.join(PROTECT_KINDS)}, got {self.protect!r}")
        if not (isinstance(self.activation_energy, int | float) and 0.0 < self.activation_energy <= 1.0):
            raise ValueError(f"`activation_energy` must be in (0, 1], got {self.activation_energy!r}")
        if self.activation_positions not in get_args(ActivationPositions):
            raise ValueError(f"`activation_positions` must be all or opening, got {self.activation_positions!r}")
        _check_int(self, "activation_opening_tokens", low=1)
        if self.reference_objective not in REFERENCE_OBJECTIVES:
            raise ValueError(f"`reference_objective` must be one of {', '.join(REFERENCE_OBJECTIVES)}, got "
                             f"{self.reference_objective!r}")
        _check_int(self, "margin_tokens", low=1)
        refusals = self.margin_refusals
        if refusals is not None and (not isinstance(refusals, list | tuple) or not refusals or not all(
                isinstance(text, str) and text.strip() for text in refusals)):
            raise ValueError(f"`margin_refusals` must be a non-empty list of non-empty texts (or None for the "
                             f"built-in refusals), got {refusals!r}")
        self._check_barrier()
        weight = self.later_token_weight
        if not (isinstance(weight, int | float) and math.isfinite(weight) and 0.0 <= weight <= 1.0):
            raise ValueError(f"`later_token_weight` must be in [0, 1], got {weight!r}")

    def _check_barrier(self) -> None:
        if not isinstance(self.lookalike_barrier, bool):
            raise ValueError(f"`lookalike_barrier` must be true or false, got {self.lookalike_barrier!r}")
        for name, low in (("barrier_floor", -math.inf), ("barrier_slack", 0.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or value < low:
                raise ValueError(f"`{name}` must be a finite number{' >= 0' if low == 0 else ''}, got {value!r}")
        share = self.barrier_step_share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0.0 < share <= 1.0:
            raise ValueError(f"`barrier_step_share` must be in (0, 1], got {share!r}")
        _check_int(self, "barrier_refresh_every", low=0)
        _check_int(self, "lookalike_examples", low=1)
        if self.lookalike_barrier and self.protect != "gradients":
            raise ValueError(f"`lookalike_barrier` needs protect='gradients' (the activation constraint, applied "
                             f"last, would move the update off the barrier), got protect={self.protect!r}")

    @property
    def sketch_size(self) -> int:
        """ℓ in force: `sketch_rows`, or 2 × `max_directions` but at least 2 × `reference_batch_size`."""
        if self.sketch_rows is not None:
            return self.sketch_rows
        return max(2 * self.max_directions, 2 * self.reference_batch_size)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> OGPSAConfig:
        """Build from a dict, refusing unknown keys (a typo must not silently fall back to a default)."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown OGPSA setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def _check_int(config: OGPSAConfig, name: str, *, low: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}")
