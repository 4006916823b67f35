"""SFT, DPO and SFT→DPO with TRL's trainers plus OGPSACallback: assembly only, no math.

A command validates every input before it writes anything, trains in `OUTPUT.partial/` (kept on failure, so
`--resume` can continue from its last checkpoint) and renames it to OUTPUT when complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import torch
from transformers import TrainerCallback

from lora_ogpsa.callback.guards import refuse_sharded_training
from lora_ogpsa.callback.router import OGPSACallback
from lora_ogpsa.core.subspace import Subspace
from lora_ogpsa.data.rows import DataKind, Rows, check_rows_fit, read_rows
from lora_ogpsa.export.adapter import save_adapter, save_subspace
from lora_ogpsa.export.card import write_model_card
from lora_ogpsa.models import loading, shapes
from lora_ogpsa.signals import distributed, sharding
from lora_ogpsa.signals.reference import ReferenceSet, build_lookalike_set, build_reference_set
from lora_ogpsa.train import resume
from lora_ogpsa.train.divergence import DivergenceCallback
from lora_ogpsa.train.settings import TrainSettings
from lora_ogpsa.train.stage_files import StageFilesCallback
from lora_ogpsa.train.trainers import loss_masking
from lora_ogpsa.utils import files, outputs
from lora_ogpsa.utils.errors import InputError

logger = logging.getLogger(__name__)

Stage = Literal["sft", "dpo"]
"""A training stage: `align` runs one of each."""



def run_sft(settings: TrainSettings, callbacks: Sequence[TrainerCallback] = ()) -> Path:
    """`lora-ogpsa sft`: train a fresh adapter on SFT data; returns the output directory."""
    settings = dataclasses.replace(settings, output=outputs.output_path(settings.output))
    with _locked(settings):
        return _run_single("sft", settings, settings.data, callbacks)


def run_dpo(settings: TrainSettings, callbacks: Sequence[TrainerCallback] = ()) -> Path:
    """`lora-ogpsa dpo`: train a fresh adapter, or continue `settings.adapter`, on preference data."""
    settings = dataclasses.replace(settings, output=outputs.output_path(settings.output))
    with _locked(settings):
        return _run_single("dpo", settings, settings.data, callbacks)


def run_align(settings: TrainSettings, callbacks: Sequence[TrainerCallback] = ()) -> Path:
    """`lora-ogpsa align`: SFT, then DPO on the same adapter with base + frozen SFT adapter as the DPO
    reference model. Writes `sft/`, `dpo/` and the final adapter at the top of the output directory."""
    settings = dataclasses.replace(settings, output=outputs.output_path(settings.output))
    with _locked(settings):
        return _run_align(settings, callbacks)


def _locked(settings: TrainSettings):
    """The output's lock, held by rank 0 for the whole run (other ranks write nothing)."""
    return outputs.output_lock(settings.output) if distributed.is_main() else contextlib.nullcontext()


def _run_align(settings: TrainSettings, callbacks: Sequence[TrainerCallback]) -> Path:
    settings = resolve_model(settings)
    tokenizer, reference = _validate_common(settings)
    sft_rows = _read_checked(settings.sft_data, "sft", "--sft-data", tokenizer, settings)
    dpo_rows = _read_checked(settings.dpo_data, "preference", "--dpo-data", tokenizer, settings)
    resume.check_align_resume(settings, sft_rows, dpo_rows, reference)
    work = _prepare_work_dir(settings)
    sft_dir, dpo_dir = work / "sft", work / "dpo"
    if not resume.stage_complete(sft_dir):
        _train_stage("sft", settings, sft_dir, sft_rows, reference, tokenizer, None, callbacks)
    if not resume.stage_complete(dpo_dir):
        dpo_settings = settings.for_dpo_stage()
        _train_stage("dpo", dpo_settings, dpo_dir, dpo_rows, reference, tokenizer, sft_dir, callbacks)
    if distributed.is_main():
        _promote_final_stage(work, sft_dir, dpo_dir, tokenizer)
        outputs.finalize_directory(work, settings.output)
        logger.info("aligned adapter written to %s", settings.output)
    distributed.barrier()
    return settings.output


def _run_single(stage: Stage, settings: TrainSettings, data: str | None,
                callbacks: Sequence[TrainerCallback]) -> Path:
    settings = resolve_model(settings)
    tokenizer, reference = _validate_common(settings)
    rows = _read_checked(data, "sft" if stage == "sft" else "preference", "--data", tokenizer, settings)
    adapter = Path(settings.adapter) if stage == "dpo" and settings.adapter is not None else None  # checked above
    resume.check_stage_resume(stage, settings, rows, reference, adapter, "")
    work = _prepare_work_dir(settings)
    _train_stage(stage, settings, work, rows, reference, tokenizer, adapter, callbacks)
    if distributed.is_main():
        outputs.finalize_directory(work, settings.output)
        logger.info("adapter written to %s", settings.output)
    distributed.barrier()
    return settings.output


def _read_checked(source, kind: DataKind, flag: str, tokenizer, settings: TrainSettings) -> Rows:
    """Every row read, validated, and rendered through the chat template within --max-length."""
    rows = read_rows(source, kind, flag=flag)
    keeps_end = settings.training_arguments.get("truncation_mode") == "keep_end"  # then no response is cut off
    return check_rows_fit(rows, tokenizer, max_length=None if keeps_end else settings.max_length, kind=kind,
                          flag=flag, **loss_masking(settings))


def resolve_model(settings: TrainSettings) -> TrainSettings:
    """The settings with `model` a local directory (a Hub ID is looked up in the local cache) and
    `base_model_id` what the adapter will name as its base: the Hub ID, or the directory's absolute path."""
    directory = loading.resolve_model_dir(settings.model, settings.model_revision)
    base_id = settings.base_model_id or (str(settings.model) if loading.is_hub_id(settings.model)
                                         else str(directory.resolve()))
    return dataclasses.replace(settings, model=directory, base_model_id=base_id)


def _validate_common(settings: TrainSettings):
    """Every check that needs no training, before anything is written."""
    outputs.check_apart(settings.output, {"--model": settings.model, "--data": settings.data,
                                        "--sft_data": settings.sft_data, "--dpo_data": settings.dpo_data,
                                        "--reference": settings.reference, "--replay": settings.replay,
                                        "--lookalike": settings.lookalike,
                                        "--adapter": settings.adapter})
    outputs.check_output_dir(settings.output, overwrite=settings.overwrite, resume=settings.resume)
    resume.resume_checkpoint(settings)  # checks a --resume_from_checkpoint path
    if settings.ogpsa.project != "none":  # FSDP1 / DeepSpeed (launcher environment or trainer fields) refused
        refuse_sharded_training(SimpleNamespace(**settings.training_arguments))
    partial = files.partial_path(settings.output)
    if partial.exists() and not (settings.resume or settings.overwrite):  # the lock is ours: no run is live there
        raise InputError(f"--output {settings.output}: {partial.name} holds an earlier run that did not finish; "
                         "pass --resume to continue it or --overwrite to discard it")
    finished = settings.output.is_dir() and any(settings.output.iterdir())
    if settings.resume and not files.partial_path(settings.output).exists() and not finished:
        raise InputError(f"--resume: nothing to resume in {settings.output} (no {files.partial_path(settings.output).name} "
                         "and no finished run); check --output, or drop --resume to start a fresh run")
    if settings.adapter is None:  # a continued adapter brings its own targets and rank (checked with it)
        shapes.check_lora_targets(settings.model, settings.lora_target_modules, settings.lora_r)
    else:
        shapes.check_adapter_fits(settings.model, loading.check_adapter_dir(settings.adapter))
    # the model directory was checked by resolve_model
    tokenizer = loading.load_tokenizer(settings.model, settings.training_arguments.get("chat_template_path"))
    reference = _load_reference(settings, tokenizer) if settings.ogpsa.project != "none" else None
    if settings.replay is not None:  # built per stage (its batch size is the stage's); checked here, before work
        _read_checked(settings.replay, "sft", "--replay", tokenizer, settings)
    if settings.lookalike is not None:
        _read_checked(settings.lookalike, "sft", "--lookalike", tokenizer, settings)
    return tokenizer, reference


def _replay(settings: TrainSettings, tokenizer) -> dict:
    """The replay set and weight for OGPSACallback (every replay row, cycled in micro-batches)."""
    if settings.replay is None:
        return {}
    share = settings.replay_fraction / (1 - settings.replay_fraction)
    config = dataclasses.replace(settings.ogpsa, reference_examples=10**9,
                                 reference_batch_size=max(1, round(share * settings.batch_size)),
                                 opening_tokens=0, later_token_weight=1.0)
    replay = build_reference_set(settings.replay, tokenizer, config, max_length=settings.max_length,
                                 seed=settings.seed, flag="--replay")
    return {"replay": replay, "replay_weight": share}


def _lookalike(settings: TrainSettings, tokenizer) -> dict:
    """The look-alike rows of --lookalike_barrier for OGPSACallback."""
    if settings.lookalike is None:
        return {}
    return {"lookalike": build_lookalike_set(settings.lookalike, tokenizer, settings.ogpsa,
                                             max_length=settings.max_length, seed=settings.seed)}


def _load_reference(settings: TrainSettings, tokenizer) -> ReferenceSet:
    if settings.reference is None:
        raise InputError("--reference is required unless --ogpsa_project none: give general-capability examples "
                         "(JSONL of messages or prompt/completion rows)")
    return build_reference_set(settings.reference, tokenizer, settings.ogpsa, max_length=settings.max_length,
                               seed=settings.seed)


def _prepare_work_dir(settings: TrainSettings) -> Path:
    """The directory training writes into: `OUTPUT.partial`, continued with --resume, replaced with --overwrite.

    Every input has been checked by now; with several processes this is where they first meet, and only
    rank 0 touches the file system.
    """
    distributed.start(settings.ddp_timeout)
    output, work = settings.output, files.partial_path(settings.output)
    if distributed.is_main():
        if settings.resume and not work.exists() and output.is_dir() and any(output.iterdir()):
            # Continue a finished run (e.g. with more steps) in a copy: the finished one stays untouched until
            # the continued one is complete, whatever happens meanwhile.
            shutil.copytree(output, work, symlinks=True)
        elif not settings.resume and work.exists():  # --overwrite (_validate_common refused it otherwise)
            logger.warning("--overwrite: removing %s, left by an earlier run that did not finish", work)
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    return work


def _train_stage(stage: Stage, settings: TrainSettings, directory: Path, rows: Rows, reference: ReferenceSet | None,
                 tokenizer, adapter: Path | None, callbacks: Sequence[TrainerCallback]) -> None:
    """Train one stage into `directory` and write its outputs there (the run config last: the stage marker)."""
    from lora_ogpsa.train.trainers import build_trainer

    if distributed.is_main():
        directory.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    model = _load_model(settings, adapter)
    run_config = resume.run_config(stage, settings, rows, reference, adapter)
    ogpsa = None
    if settings.ogpsa.project != "none" or settings.ogpsa.lookalike_barrier:
        ogpsa = OGPSACallback(settings.ogpsa, reference or [], **_replay(settings, tokenizer),
                              **_lookalike(settings, tokenizer))
    stage_files = StageFilesCallback(directory, run_config, stage=stage, subspace_fn=lambda: ogpsa and ogpsa.subspace)
    trainer = build_trainer(stage, model, tokenizer, rows.rows, settings, directory,
                            [cb for cb in (DivergenceCallback(), ogpsa, stage_files) if cb is not None]
                            + list(callbacks))
    checkpoint = resume.chosen_checkpoint(settings, files.partial_path(settings.output), directory, warn=True)
    if checkpoint:
        resume.check_resume(run_config, checkpoint, settings.max_steps)
        logger.info("resuming %s from %s, the newest complete checkpoint", stage, checkpoint)
        checkpoint = str(checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)
    sharding.unshard_trainable_(trainer.model)  # FSDP2: the whole LoRA weights for the export (every rank joins)
    if distributed.is_main():
        save_adapter(trainer.model, directory)
        tokenizer.save_pretrained(str(directory))  # with the chat template, as TRL's save_model does
        save_subspace(ogpsa.subspace if ogpsa else None, directory)
        write_model_card(directory / files.CARD_FILE, run_config=run_config, subspace=ogpsa.subspace if ogpsa else None,
                         metrics=files.read_jsonl(directory / files.METRICS_FILE))
        files.write_json(directory / files.RUN_CONFIG, run_config)
    distributed.barrier()  # the next stage (align's DPO) reads what rank 0 wrote
    del trainer, model
    gc.collect()


def _load_model(settings: TrainSettings, adapter: Path | None) -> torch.nn.Module:
    """The base with a trainable adapter that names `base_model_id` as its base in every file saved."""
    base = loading.load_base_model(settings.model, quantize=settings.quantize)
    if adapter is not None:
        model = loading.load_adapter(base, adapter, trainable=True, gradient_checkpointing=settings.use_gradient_checkpointing)
    else:
        config = loading.lora_config(r=settings.lora_r, alpha=settings.lora_alpha, dropout=settings.lora_dropout,
                             target_modules=settings.lora_target_modules or "all-linear",
                             use_rslora=settings.use_rslora, use_dora=settings.use_dora)
        model = loading.attach_lora(base, config, seed=settings.seed,
                            gradient_checkpointing=settings.use_gradient_checkpointing)
    for config in model.peft_config.values():
        config.base_model_name_or_path = settings.base_model_id or str(settings.model)
    return model


def _promote_final_stage(work: Path, sft_dir: Path, dpo_dir: Path, tokenizer) -> None:
    """The DPO stage's adapter becomes the top-level one, with a card describing both stages; metrics of both
    stages are concatenated."""
    for name in (files.ADAPTER_FILE, files.ADAPTER_CONFIG, files.SUBSPACE_FILE, files.RUN_CONFIG):
        if (dpo_dir / name).is_file():
            shutil.copy2(dpo_dir / name, work / name)
    tokenizer.save_pretrained(str(work))
    metrics = files.read_jsonl(sft_dir / files.METRICS_FILE) + files.read_jsonl(dpo_dir / files.METRICS_FILE)
    files.write_jsonl(work / files.METRICS_FILE, metrics)
    subspace = Subspace.load(work / files.SUBSPACE_FILE) if (work / files.SUBSPACE_FILE).is_file() else None
    write_model_card(work / files.CARD_FILE, run_config=files.read_json(dpo_dir / files.RUN_CONFIG), subspace=subspace,
                     metrics=metrics, earlier_stages=[files.read_json(sft_dir / files.RUN_CONFIG)])


__all__ = ["ReferenceSet", "run_align", "run_dpo", "run_sft"]
