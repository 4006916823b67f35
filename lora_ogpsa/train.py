"""SFT, DPO and SFT→DPO with TRL's trainers plus OGPSACallback: assembly only, no math.

A command validates every input before it writes anything, trains in `OUTPUT.partial/` (kept on failure, so
`--resume` can continue from its last checkpoint) and renames it to OUTPUT when complete.
"""

from __future__ import annotations

import gc
import logging
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from lora_ogpsa import distributed
from lora_ogpsa.callback import SUBSPACE_FILE, OGPSACallback, StageFilesCallback
from lora_ogpsa.config import TrainSettings
from lora_ogpsa.data import Rows, read_rows, tokenize_rows
from lora_ogpsa.errors import InputError
from lora_ogpsa.export import (
    ADAPTER_CONFIG,
    ADAPTER_FILE,
    CARD_FILE,
    METRICS_FILE,
    RUN_CONFIG,
    check_output_dir,
    finalize_directory,
    partial_path,
    read_metrics,
    save_adapter,
    save_subspace,
    write_json,
)
from lora_ogpsa.model import (
    attach_lora,
    check_model_dir,
    keep_lora_float32_,
    load_adapter,
    load_base_model,
    load_tokenizer,
    lora_config,
)
from lora_ogpsa.model_card import write_model_card
from lora_ogpsa.reference import ReferenceBatch, make_batches

logger = logging.getLogger(__name__)

Stage = Literal["sft", "dpo"]


@dataclass
class ReferenceSet:
    """The tokenized reference examples used for every refresh, and what names them."""

    batches: list[ReferenceBatch]
    rows: int
    source: str
    fingerprint: str


def run_sft(settings: TrainSettings, callbacks: Sequence[TrainerCallback] = ()) -> Path:
    """`lora-ogpsa sft`: train a fresh adapter on SFT data; returns the output directory."""
    return _run_single("sft", settings, settings.data, callbacks)


def run_dpo(settings: TrainSettings, callbacks: Sequence[TrainerCallback] = ()) -> Path:
    """`lora-ogpsa dpo`: train a fresh adapter, or continue `settings.adapter`, on preference data."""
    return _run_single("dpo", settings, settings.data, callbacks)


def run_align(settings: TrainSettings, callbacks: Sequence[TrainerCallback] = ()) -> Path:
    """`lora-ogpsa align`: SFT, then DPO on the same adapter with base + frozen SFT adapter as the DPO
    reference model. Writes `sft/`, `dpo/` and the final adapter at the top of the output directory."""
    tokenizer, reference = _validate_common(settings)
    sft_rows = read_rows(settings.sft_data, "sft", flag="--sft-data")
    dpo_rows = read_rows(settings.dpo_data, "preference", flag="--dpo-data")
    work = _prepare_work_dir(settings)
    sft_dir, dpo_dir = work / "sft", work / "dpo"
    if not _stage_complete(sft_dir):
        _train_stage("sft", settings, sft_dir, sft_rows, reference, tokenizer, None, callbacks)
    if not _stage_complete(dpo_dir):
        dpo_settings = settings.for_dpo_stage()
        _train_stage("dpo", dpo_settings, dpo_dir, dpo_rows, reference, tokenizer, sft_dir, callbacks)
    if distributed.is_main():
        _promote_final_stage(work, sft_dir, dpo_dir)
        finalize_directory(work, settings.output)
        logger.info("aligned adapter written to %s", settings.output)
    distributed.barrier()
    return settings.output


def _run_single(stage: Stage, settings: TrainSettings, data: str | None,
                callbacks: Sequence[TrainerCallback]) -> Path:
    tokenizer, reference = _validate_common(settings)
    rows = read_rows(data, "sft" if stage == "sft" else "preference", flag="--data")
    adapter = settings.adapter if stage == "dpo" else None
    if adapter is not None and not (adapter / ADAPTER_CONFIG).is_file():
        raise InputError(f"--adapter {adapter}: no {ADAPTER_CONFIG} in it; give a directory written by "
                         "`lora-ogpsa sft|dpo|align|export` or PEFT's save_pretrained")
    work = _prepare_work_dir(settings)
    _train_stage(stage, settings, work, rows, reference, tokenizer, adapter, callbacks)
    if distributed.is_main():
        finalize_directory(work, settings.output)
        logger.info("adapter written to %s", settings.output)
    distributed.barrier()
    return settings.output


def _validate_common(settings: TrainSettings):
    """Every check that needs no training, before anything is written."""
    check_output_dir(settings.output, overwrite=settings.overwrite, resume=settings.resume)
    check_model_dir(settings.model)
    tokenizer = load_tokenizer(settings.model)
    reference = _load_reference(settings, tokenizer) if settings.ogpsa.project != "none" else None
    return tokenizer, reference


def _load_reference(settings: TrainSettings, tokenizer) -> ReferenceSet:
    if settings.reference is None:
        raise InputError("--reference is required unless --project none: give general-capability examples "
                         "(JSONL of messages or prompt/completion rows)")
    rows = read_rows(settings.reference, "sft", flag="--reference")
    wanted = settings.ogpsa.reference_examples
    if len(rows) < wanted:
        logger.warning("--reference %s has %d rows, fewer than reference_examples=%d: using all of them",
                       rows.source, len(rows), wanted)
    chosen = rows.rows if len(rows) <= wanted else random.Random(settings.seed).sample(rows.rows, wanted)
    examples = tokenize_rows(tokenizer, chosen, max_length=settings.max_length, source=f"--reference {rows.source}")
    from lora_ogpsa.data import fingerprint

    batches = make_batches(examples, batch_size=settings.ogpsa.reference_batch_size,
                           pad_token_id=tokenizer.pad_token_id, opening_tokens=settings.ogpsa.opening_tokens,
                           later_token_weight=settings.ogpsa.later_token_weight)
    return ReferenceSet(batches, len(examples), rows.source, fingerprint(examples))


def _prepare_work_dir(settings: TrainSettings) -> Path:
    """The directory training writes into: `OUTPUT.partial`, continued with --resume, fresh otherwise.

    Every input has been checked by now; with several processes this is where they first meet, and only
    rank 0 touches the file system.
    """
    distributed.start(settings.ddp_timeout)
    output, work = settings.output, partial_path(settings.output)
    if distributed.is_main():
        if settings.resume and not work.exists() and output.is_dir() and any(output.iterdir()):
            output.rename(work)  # continue a completed run (e.g. with more steps)
        elif settings.resume and not work.exists():
            logger.warning("--resume: nothing to resume in %s; starting a fresh run", work)
        elif not settings.resume and work.exists():
            logger.warning("removing %s, left by an earlier run that did not finish (use --resume to continue "
                           "one)", work)
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    return work


def _stage_complete(directory: Path) -> bool:
    return (directory / RUN_CONFIG).is_file() and (directory / ADAPTER_FILE).is_file()


def _train_stage(stage: Stage, settings: TrainSettings, directory: Path, rows: Rows, reference: ReferenceSet | None,
                 tokenizer, adapter: Path | None, callbacks: Sequence[TrainerCallback]) -> None:
    """Train one stage into `directory` and write its outputs there (the run config last: the stage marker)."""
    from lora_ogpsa.trainers import build_trainer

    if distributed.is_main():
        directory.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    model = _load_model(settings, adapter)
    run_config = settings.to_run_config(stage, rows, reference, adapter)
    ogpsa = None
    if settings.ogpsa.project != "none":
        ogpsa = OGPSACallback(settings.ogpsa, reference.batches,
                              metadata={"reference_hash": reference.fingerprint, "reference": reference.source})
    files = StageFilesCallback(directory, run_config, stage=stage, subspace_fn=lambda: ogpsa and ogpsa.subspace)
    trainer = build_trainer(stage, model, tokenizer, rows.rows, settings, directory,
                            [cb for cb in (ogpsa, files) if cb is not None] + list(callbacks))
    checkpoint = get_last_checkpoint(str(directory)) if settings.resume else None
    if checkpoint:
        logger.info("resuming %s from %s", stage, checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)
    if distributed.is_main():
        save_adapter(trainer.model, directory)
        save_subspace(ogpsa.subspace if ogpsa else None, directory)
        write_model_card(directory / CARD_FILE, run_config=run_config, subspace=ogpsa.subspace if ogpsa else None,
                         metrics=read_metrics(directory / METRICS_FILE))
        write_json(directory / RUN_CONFIG, run_config)
    distributed.barrier()  # the next stage (align's DPO) reads what rank 0 wrote
    del trainer, model
    gc.collect()


def _load_model(settings: TrainSettings, adapter: Path | None) -> torch.nn.Module:
    base = load_base_model(settings.model, quantize=settings.quantize)
    if adapter is not None:
        return load_adapter(base, adapter, trainable=True, gradient_checkpointing=settings.use_gradient_checkpointing)
    config = lora_config(r=settings.lora_r, alpha=settings.lora_alpha, dropout=settings.lora_dropout)
    return attach_lora(base, config, seed=settings.seed, gradient_checkpointing=settings.use_gradient_checkpointing)


def _promote_final_stage(work: Path, sft_dir: Path, dpo_dir: Path) -> None:
    """The DPO stage's adapter becomes the top-level one; metrics of both stages are concatenated."""
    for name in (ADAPTER_FILE, ADAPTER_CONFIG, SUBSPACE_FILE, CARD_FILE, RUN_CONFIG):
        if (dpo_dir / name).is_file():
            shutil.copy2(dpo_dir / name, work / name)
    lines = read_metrics(sft_dir / METRICS_FILE) + read_metrics(dpo_dir / METRICS_FILE)
    import json

    (work / METRICS_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines))


__all__ = ["ReferenceSet", "keep_lora_float32_", "run_align", "run_dpo", "run_sft"]
