"""TRL trainers configured for a stage: arguments only, never subclassing (STYLE.md rule 2)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback

from lora_ogpsa.config import TrainSettings


def common_arguments(settings: TrainSettings, directory: Path) -> dict[str, Any]:
    """TrainingArguments shared by SFT and DPO: one log line per step, checkpoints every `save_steps`."""
    use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return {
        "output_dir": str(directory),
        "max_steps": settings.max_steps,
        "per_device_train_batch_size": settings.batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "learning_rate": settings.learning_rate,
        "seed": settings.seed,
        "logging_steps": 1,
        "save_strategy": "steps" if settings.save_steps else "no",
        "save_steps": settings.save_steps or 500,
        "report_to": "none",
        "bf16": use_bf16,
        "use_cpu": not torch.cuda.is_available(),
        "gradient_checkpointing": settings.use_gradient_checkpointing,
        "max_length": settings.max_length,
        "dataloader_num_workers": 0,
        "ddp_timeout": settings.ddp_timeout,
    }


def build_trainer(stage: str, model: torch.nn.Module, tokenizer: Any, rows: Sequence[dict], settings: TrainSettings,
                  directory: Path, callbacks: Sequence[TrainerCallback]):
    """An SFTTrainer or DPOTrainer over `model` (a PeftModel) with our callbacks.

    TRL casts trainable LoRA tensors to bf16 on a quantized base; their exact float32 values are put back
    right after construction (a bf16 round trip would also make the DPO policy differ from its reference copy).
    """
    trainable = {name: parameter.detach().clone() for name, parameter in model.named_parameters()
                 if parameter.requires_grad}
    dataset = Dataset.from_list(list(rows))
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common_arguments(settings, directory), completion_only_loss=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=list(callbacks))
    else:
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common_arguments(settings, directory), beta=settings.beta)
        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=list(callbacks))
    for name, parameter in trainer.model.named_parameters():
        if name in trainable:
            parameter.data = trainable[name].to(parameter.device)
    return trainer
