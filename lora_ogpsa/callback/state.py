"""The basis in force on disk: written with every checkpoint and at the end, read back on resume (exact).

Under FSDP2 the file holds the whole bases (gathered from every rank's columns on rank 0), the same file as a
single process or DDP writes; a resume reads it on every rank and keeps the columns of each rank's shard.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lora_ogpsa.core.subspace import Subspace
from lora_ogpsa.signals import sharding
from lora_ogpsa.utils.errors import InputError, first_line
from lora_ogpsa.utils.files import SUBSPACE_FILE, checkpoint_dir

logger = logging.getLogger(__name__)


def save_subspace(subspace: Subspace, directory: str | Path) -> None:
    """Write `subspace` to `directory/ogpsa_subspace.safetensors`."""
    subspace.save(Path(directory) / SUBSPACE_FILE)


def whole_subspace(subspace: Subspace, parameters: dict[str, torch.nn.Parameter]) -> Subspace | None:
    """The subspace with whole bases, as written to disk: itself, or under FSDP2 (where each rank holds its shard's
    columns) every rank's columns joined on rank 0, None on the others. Every rank must call it."""
    if not sharding.is_sharded(parameters):
        return subspace
    return sharding.gather_subspace(subspace, parameters)


def load_checkpoint_subspace(output_dir: str | Path, step: int,
                             parameters: dict[str, torch.nn.Parameter]) -> Subspace | None:
    """The subspace saved with `checkpoint-<step>` on the parameters' device, or None if it has none.

    Raises:
        InputError: a truncated, foreign or mismatched subspace file (bad input to a resume).
    """
    path = checkpoint_dir(output_dir, step) / SUBSPACE_FILE
    if not path.is_file():
        logger.warning("resuming at step %d without %s: recomputing the subspace", step, path)
        return None
    numel = {name: parameter.numel() for name, parameter in parameters.items()}
    try:
        subspace = Subspace.load(path, numel_by_name=numel)
    except ValueError as error:
        raise InputError(f"--resume: {first_line(error)}; resume from an earlier checkpoint (delete this one) "
                         "or start a new --output") from error
    logger.info("OGPSA: resumed the subspace of step %d from %s", step, path)
    subspace = subspace.to(next(iter(parameters.values())).device)
    return sharding.slice_subspace(subspace, parameters) if sharding.is_sharded(parameters) else subspace
