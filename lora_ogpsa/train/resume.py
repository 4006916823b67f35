"""`--resume`: which checkpoint a run continues, and the checks that it continues exactly the run it names —
the same settings, the same data, reference and base weights (content hashes), and a checkpoint whose records
agree with it. Every check runs before anything is written."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from transformers.trainer_utils import get_last_checkpoint

from lora_ogpsa.data.rows import Rows
from lora_ogpsa.models import loading
from lora_ogpsa.train.settings import RESUMABLE, TrainSettings
from lora_ogpsa.utils import files
from lora_ogpsa.utils.errors import InputError, first_line

logger = logging.getLogger(__name__)


def resume_checkpoint(settings: TrainSettings) -> Path | None:
    """`--resume_from_checkpoint PATH` as a path relative to the run's output (e.g. `sft/checkpoint-2`), the
    same inside `OUTPUT` and `OUTPUT.partial`; None without one, or with `true` (the newest complete one).

    Raises:
        InputError: the path is not a complete `checkpoint-N` directory of this run.
    """
    given = settings.resume_from_checkpoint
    if given is None or str(given).lower() == "true":
        return None
    path, flag = Path(given).resolve(), f"--resume_from_checkpoint {given}"
    roots = [settings.output.resolve(), files.partial_path(settings.output).resolve()]
    root = next((root for root in roots if path.is_relative_to(root)), None)
    if root is None:
        raise InputError(f"{flag}: not inside --output {settings.output} or its {roots[1].name}; give a "
                         "checkpoint-N directory of this run")
    if not (path.name.startswith("checkpoint-") and path.name.split("-", 1)[1].isdigit()) or not path.is_dir():
        raise InputError(f"{flag}: not a checkpoint-N directory; give one of the run's checkpoints")
    if not (path / files.COMPLETE_MARKER).is_file():
        raise InputError(f"{flag}: incomplete checkpoint (a save cut short); give an earlier one, or 'true' for the "
                         "newest complete one")
    return path.relative_to(root)


def stage_complete(directory: Path) -> bool:
    """A stage directory whose adapter and run config (written last) are both there."""
    return (directory / files.RUN_CONFIG).is_file() and (directory / files.ADAPTER_FILE).is_file()


def run_config(stage: str, settings: TrainSettings, rows: Rows, reference: Any, adapter: Path | None) -> dict:
    """The run config, with the content hashes of the training rows and the base weights (the reference's is
    in it already), so that a resume notices a file changed in place."""
    digest = hashlib.sha256()
    for row in rows.rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n")
    return {**settings.to_run_config(stage, rows, reference, adapter), "training_sha256": digest.hexdigest()[:16],
            "model_sha256": loading.model_fingerprint(settings.model)}


def chosen_checkpoint(settings: TrainSettings, root: Path, directory: Path, *, warn: bool = False) -> Path | None:
    """The checkpoint `--resume` continues `directory` (under `root`, the run's output or its partial) from:
    the user's `--resume_from_checkpoint`, else the newest complete one; None without --resume or without one."""
    if not settings.resume:
        return None
    chosen = resume_checkpoint(settings)
    chosen = root / chosen if chosen else None
    checkpoint = files.last_complete_checkpoint(directory)
    newest = get_last_checkpoint(str(directory)) if directory.is_dir() else None
    if chosen is not None and chosen.parent.resolve() == directory.resolve():
        checkpoint = newest = chosen  # the user's choice, checked complete before anything was written
    if warn and newest and (checkpoint is None or Path(newest) != checkpoint):
        logger.warning("--resume: %s is incomplete (a save cut short); passing over it", newest)
    return checkpoint


def check_stage_resume(stage: str, settings: TrainSettings, rows: Rows, reference: Any,
                        adapter: Path | None, subdir: str) -> None:
    """Before anything is written: `--resume` continues a checkpoint trained exactly as this run would train
    (settings, data, reference and base weights), or an unfinished run; a finished run with no checkpoint has
    nothing to resume (training it again from step 0 would replace it with another run)."""
    if not settings.resume:
        return
    partial = files.partial_path(settings.output)
    root = partial if partial.exists() else settings.output
    checkpoint = chosen_checkpoint(settings, root, root / subdir)
    if checkpoint is not None:
        check_resume(run_config(stage, settings, rows, reference, adapter), checkpoint, settings.max_steps)
    elif root == settings.output:
        raise InputError(f"--resume: nothing to resume in {settings.output / subdir} (a finished run with no "
                         "checkpoint); --overwrite to start again, or a new --output")


def check_align_resume(settings: TrainSettings, sft_rows: Rows, dpo_rows: Rows, reference) -> None:
    """`check_stage_resume` for the stage `align --resume` continues (the first one not complete)."""
    if not settings.resume:
        return
    partial = files.partial_path(settings.output)
    root = partial if partial.exists() else settings.output
    if not stage_complete(root / "sft"):
        check_stage_resume("sft", settings, sft_rows, reference, None, "sft")
    elif not stage_complete(root / "dpo"):
        check_stage_resume("dpo", settings.for_dpo_stage(), dpo_rows, reference, partial / "sft", "dpo")
    elif root == settings.output:
        raise InputError(f"--resume: nothing to resume in {settings.output} (both stages are finished); "
                         "--overwrite to start again, or a new --output")


# What `--resume` may change: it affects how a run is logged, saved or how long it goes, not its result.
_RESUMABLE_TRAINER = {"report_to", "logging_dir", "run_name", "disable_tqdm", "save_total_limit", "project"}


_CONTENT = {"training_sha256": "the training data changed", "model_sha256": "the base weights changed",
            "reference_hash": "the reference data changed"}


def check_resume(run_config: dict, checkpoint: Path, max_steps: int) -> None:
    """Refuse to resume with settings or content that change the result (they would be silently ignored or
    mixed in), or from a checkpoint whose records do not agree with it.

    Raises:
        InputError: the checkpoint has no run config, its `trainer_state.json` names another step than its name
            or one past --max-steps; or listing every setting that differs from its recorded run config.
    """
    recorded_path = checkpoint / files.RUN_CONFIG
    if not recorded_path.is_file():
        raise InputError(f"--resume: {recorded_path} is missing, so the settings {checkpoint.name} was trained "
                         "with cannot be compared; resume from a checkpoint that has it, or start again with "
                         "--overwrite")
    _check_trainer_state(checkpoint, max_steps)
    _check_checkpoint_files(checkpoint, run_config)
    recorded = files.read_json(recorded_path, flag="--resume")
    if not isinstance(recorded, dict):
        raise InputError(f"--resume {recorded_path}: not a JSON object; the checkpoint is corrupt")
    current = {**run_config, "training_arguments": {key: value for key, value in
                                                    run_config.get("training_arguments", {}).items()
                                                    if key not in _RESUMABLE_TRAINER}}
    before = {**recorded, "training_arguments": {key: value for key, value in
                                                  recorded.get("training_arguments", {}).items()
                                                  if key not in _RESUMABLE_TRAINER}}
    changed = sorted(key for key in set(current) | set(before) if key not in RESUMABLE
                     and json.dumps(current.get(key), sort_keys=True, default=str)
                     != json.dumps(before.get(key), sort_keys=True, default=str))
    if changed:
        details = "; ".join(f"{key}{_why(key, before)}: {before.get(key)!r} -> {current.get(key)!r}"
                            for key in changed[:4])
        raise InputError(f"--resume: {checkpoint.name} was trained with other settings ({details}"
                         f"{'; ...' if len(changed) > 4 else ''}); resume with the same settings (only logging, "
                         "checkpointing and the number of steps may change), or start a new --output")


def _why(key: str, recorded: dict) -> str:
    if key not in _CONTENT:
        return ""
    return f" ({_CONTENT[key] if key in recorded else 'not recorded by the checkpoint: an older lora-ogpsa'})"


def _check_checkpoint_files(checkpoint: Path, run_config: dict) -> None:
    """The checkpoint's subspace reads and has at most --max-directions directions per tensor, and every
    torch file (optimizer, scheduler, RNG state) loads as plain tensors (`weights_only`, no pickle runs): each
    refused naming its file, before anything is written."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    from lora_ogpsa.core.subspace import Subspace

    if (checkpoint / files.SUBSPACE_FILE).is_file():
        try:
            subspace = Subspace.load(checkpoint / files.SUBSPACE_FILE)
        except ValueError as error:
            raise InputError(f"--resume: {first_line(error)}; resume from an earlier checkpoint (delete this one) or "
                             "start a new --output") from error
        cap = run_config.get("ogpsa", {}).get("max_directions")
        over = next(((name, basis.shape[0]) for name, basis in subspace.basis_by_name.items()
                     if cap and basis.shape[0] > cap), None)
        if over:
            raise InputError(f"--resume {checkpoint / files.SUBSPACE_FILE}: basis {over[0]} has k = {over[1]} "
                             f"directions, over --max-directions {cap}; the file is not this run's — resume from an "
                             "earlier checkpoint or start a new --output")
    for path in sorted([*checkpoint.glob("*.pt"), *checkpoint.glob("*.pth")]):
        try:
            with safe_globals():
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for what it refuses
            raise InputError(f"--resume {path}: not a plain tensor file ({type(error).__name__}): it holds Python "
                             "objects only a full unpickle would load, which lora-ogpsa never does, or it is "
                             "truncated — resume from an earlier checkpoint or start again with --overwrite") from error


def _check_trainer_state(checkpoint: Path, max_steps: int) -> None:
    """The checkpoint's `trainer_state.json` says the step its name says, and that step is within --max-steps."""
    state_path = checkpoint / "trainer_state.json"
    state = files.read_json(state_path, flag="--resume")
    step, named = state.get("global_step") if isinstance(state, dict) else None, int(checkpoint.name.split("-")[-1])
    if step != named:
        raise InputError(f"--resume {state_path}: global_step is {step!r}, the checkpoint's name says {named}; the "
                         "checkpoint was altered — resume from another one, or start again with --overwrite")
    if max_steps != -1 and named > max_steps:
        raise InputError(f"--resume: {checkpoint.name} is past --max-steps {max_steps}; give --max-steps {named} "
                         "or more to continue it")
