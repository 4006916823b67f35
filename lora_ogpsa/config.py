"""Configuration of the OGPSA projection.

The defaults come from measurements, not taste; each field's docstring says which. The run configs for the
command line (model, data, LoRA and trainer settings) live in `train.py` beside the code that uses them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

ProjectMode = Literal["update", "grad", "none"]
PROJECT_MODES: tuple[str, ...] = get_args(ProjectMode)


@dataclass
class OGPSAConfig:
    """How the reference subspace is estimated, refreshed and removed from the safety updates."""

    max_directions: int = 8
    """Cap on k, the directions kept per LoRA tensor. The basis costs k × (LoRA parameters) × 4 bytes and the
    projection about 4·k flops per LoRA parameter per step."""

    energy: float = 0.95
    """Keep the fewest directions whose squared singular values reach this share of the total (then cap by
    `max_directions`). 1.0 keeps every non-zero direction up to the cap."""

    refresh_every: int = 20
    """Recompute the basis every this many optimizer steps (0: only before and after the first step). A
    refresh costs one forward+backward over the reference examples."""

    reference_examples: int = 64
    """Reference rows used to estimate the subspace: one gradient sample per row (S)."""

    project: ProjectMode = "update"
    """`update`: project the change the optimizer actually applied (exact first-order guarantee under AdamW);
    `grad`: project the accumulated gradient before the optimizer (paper-faithful); `none`: plain LoRA."""

    reference_batch_size: int = 8
    """Reference rows per forward/backward while collecting per-example gradients."""

    opening_tokens: int = 0
    """Weight the reference loss toward the first response tokens: the first `opening_tokens` tokens of each
    response get weight 1, the rest `later_token_weight`. 0 weights every response token equally."""

    later_token_weight: float = 1.0
    """Weight of response tokens after the opening ones (only used when `opening_tokens` > 0)."""

    def __post_init__(self) -> None:
        _check_int(self, "max_directions", low=1)
        if not (isinstance(self.energy, int | float) and 0.0 < self.energy <= 1.0):
            raise ValueError(f"`energy` must be in (0, 1], got {self.energy!r}")
        _check_int(self, "refresh_every", low=0)
        _check_int(self, "reference_examples", low=1)
        if self.project not in PROJECT_MODES:
            raise ValueError(f"`project` must be one of {', '.join(PROJECT_MODES)}, got {self.project!r}")
        _check_int(self, "reference_batch_size", low=1)
        _check_int(self, "opening_tokens", low=0)
        weight = self.later_token_weight
        if not (isinstance(weight, int | float) and math.isfinite(weight) and 0.0 <= weight <= 1.0):
            raise ValueError(f"`later_token_weight` must be in [0, 1], got {weight!r}")

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
