"""Trained runs reused by content: a run's fingerprint hashes its settings and the content of every file it
reads (model weights, data), never a path, so a run is found again under another cache or output directory."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lora_ogpsa.models.loading import model_fingerprint
from lora_ogpsa.train.settings import TrainSettings
from lora_ogpsa.utils.files import file_sha256

# OGPSA settings added after runs were cached, at the value that behaves as before their addition: left out of
# the fingerprint there, so that finished runs stay reusable.
_NEUTRAL_OGPSA = {"one_sided": False}
_BARRIER_FIELDS = ("lookalike_barrier", "barrier_floor", "barrier_step_share", "barrier_slack",
                   "barrier_refresh_every", "lookalike_examples")


def run_fingerprint(settings: TrainSettings, stages: Any) -> str:
    """A content hash of what makes a trained run: its settings, its command (`stages`: `sft`, `dpo`, `align`,
    or a demo `Method` holding it), the model's files and every data file it reads — no path (the same run under
    another output or cache directory has the same fingerprint)."""
    values = settings.to_run_config(getattr(stages, "stages", stages), _NoRows(), None, None)
    values["ogpsa"] = {key: value for key, value in values["ogpsa"].items()
                       if key not in _NEUTRAL_OGPSA or value != _NEUTRAL_OGPSA[key]}
    if not values["ogpsa"].get("lookalike_barrier"):  # the barrier's settings shape nothing without it
        values["ogpsa"] = {key: value for key, value in values["ogpsa"].items() if key not in _BARRIER_FIELDS}
    lookalike = values.pop("lookalike", None)
    if lookalike:
        values["lookalike_sha256"] = _file_hash(Path(lookalike))
    for key in ("output", "overwrite", "resume", "training_rows", "training_source", "skipped_rows",
                *_UNREAD[values["stage"]]):
        values.pop(key, None)
    values["model"] = model_fingerprint(settings.model)
    for key in ("data", "sft_data", "dpo_data", "reference", "replay"):
        path = values.pop(key, None)
        values[key + "_sha256"] = _file_hash(Path(path)) if path else None
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


_ALIGN_ONLY = ("sft_data", "dpo_data", "dpo_learning_rate", "dpo_max_steps", "dpo_batch_size", "dpo_save_steps")
_UNREAD = {"sft": _ALIGN_ONLY, "dpo": _ALIGN_ONLY, "align": ("data",)}
"""Settings a stage never reads (the align stage's own files and DPO options in an `sft` run, `data` in an
`align` run): left out, so that a run is found again however those were filled (`compare` leaves them unset,
a plan may set them for every method)."""


class _NoRows(list):
    source = ""
    skipped = 0


def _file_hash(path: Path) -> str:
    return file_sha256(path)[:16]
