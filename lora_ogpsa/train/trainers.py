"""TRL trainers configured for a stage: arguments only, never subclassing (docs/ARCHITECTURE.md, "Rules")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from lora_ogpsa.train.settings import TrainSettings
from lora_ogpsa.utils.errors import InputError, first_line

# Shown on the console line, in this order, when a log has them (everything still reaches metrics.jsonl and
# the trackers of `report_to`).
_CONSOLE_KEYS = {"loss": "loss", "grad_norm": "grad_norm", "learning_rate": "lr", "rewards/accuracies": "reward_acc",
                 "ogpsa/span_fraction": "span", "ogpsa/reference_loss": "ref_loss", "ogpsa/refresh_seconds": "refresh_s"}


def common_arguments(settings: TrainSettings, directory: Path) -> dict[str, Any]:
    """TrainingArguments shared by SFT and DPO; `settings.training_arguments` (any other TRL field) wins."""
    use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    precision = {} if {"bf16", "fp16"} & set(settings.training_arguments) else {"bf16": use_bf16}
    held = settings.trainer_values()
    held.pop("beta", None)  # DPO's, given by `trainer_config`
    return {
        **held,
        "output_dir": str(directory),
        "save_strategy": "steps" if settings.save_steps else "no",
        "save_steps": settings.save_steps or 500,
        **precision,
        "use_cpu": not torch.cuda.is_available(),
        "gradient_checkpointing": settings.use_gradient_checkpointing,
        "dataloader_num_workers": 0,
        **settings.training_arguments,
    }


def trainer_config(stage: str, settings: TrainSettings, directory: Path):
    """The stage's TRL config (`SFTConfig` or `DPOConfig`), or InputError naming what TRL refused."""
    from trl import DPOConfig, SFTConfig

    if settings.training_arguments.get("eval_strategy", "no") not in ("no", None):
        raise InputError("--eval_strategy: lora-ogpsa takes no evaluation data yet; evaluate the saved "
                         "checkpoints with `lora-ogpsa eval` instead")
    try:
        if stage == "sft":
            # the loss masks are in the tokenized rows (`data.rows.tokenize_sft_row`), so TRL's own switches stay off
            masking = ("completion_only_loss", "assistant_only_loss")
            return SFTConfig(**{key: value for key, value in common_arguments(settings, directory).items()
                                if key not in masking})
        return DPOConfig(**common_arguments(settings, directory), beta=settings.beta)
    except (ValueError, TypeError) as error:
        raise InputError(f"training arguments: {first_line(error)}") from error


def build_trainer(stage: str, model: torch.nn.Module, tokenizer: Any, rows: Sequence[dict], settings: TrainSettings,
                  directory: Path, callbacks: Sequence[TrainerCallback]):
    """An SFTTrainer or DPOTrainer over `model` (a PeftModel) with our callbacks and a one-line console log.

    TRL casts trainable LoRA tensors to bf16 on a quantized base; their exact float32 values are put back
    right after construction (a bf16 round trip would also make the DPO policy differ from its reference copy).
    """
    trainable = {name: parameter.detach().clone() for name, parameter in model.named_parameters()
                 if parameter.requires_grad}
    args = trainer_config(stage, settings, directory)
    dataset = Dataset.from_list(sft_examples(rows, tokenizer, settings) if stage == "sft" else list(rows))
    if stage == "sft":
        from trl import SFTTrainer

        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=list(callbacks))
    else:
        from trl import DPOTrainer

        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=list(callbacks))
    for name, parameter in trainer.model.named_parameters():
        if name in trainable:
            parameter.data = trainable[name].to(parameter.device)
    for noisy in (ProgressCallback, PrinterCallback):
        if trainer.pop_callback(noisy) is not None:
            trainer.add_callback(ConsoleLogCallback)
    return trainer


def loss_masking(settings: TrainSettings) -> dict[str, Any]:
    """TRL's `completion_only_loss` and `assistant_only_loss` as given (TRL's defaults otherwise)."""
    values = settings.training_arguments
    return {"completion_only_loss": values.get("completion_only_loss"),
            "assistant_only_loss": bool(values.get("assistant_only_loss", False))}


def sft_examples(rows: Sequence[dict], tokenizer: Any, settings: TrainSettings) -> list[dict[str, list[int]]]:
    """SFT rows as TRL's pre-tokenized examples (`input_ids`, `labels` with -100 off the loss), each row masked
    by its own format (`data.rows.tokenize_sft_row`); TRL truncates them to `max_length` as it truncates its own."""
    from lora_ogpsa.data.rows import tokenize_sft_row

    examples = []
    for row in rows:
        example = tokenize_sft_row(tokenizer, row, max_length=None, **loss_masking(settings))
        examples.append({"input_ids": example.input_ids,
                         "labels": [token if keep else -100
                                    for token, keep in zip(example.input_ids, example.completion_mask, strict=True)]})
    return examples


def console_line(logs: Mapping[str, Any], step: int, max_steps: int) -> str:
    """`step 10/100 | loss 1.234 | lr 9.5e-05 | span 0.052`: the log's main numbers on one line."""
    parts = [f"step {step}/{max_steps}"]
    parts += [f"{label} {_short(logs[key])}" for key, label in _CONSOLE_KEYS.items() if key in logs]
    return " | ".join(parts)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class ConsoleLogCallback(ProgressCallback):
    """transformers' progress bar, with one short line per log event instead of the whole metrics dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (state.is_world_process_zero and logs and "loss" in logs):
            return
        line = console_line(logs, state.global_step, state.max_steps)
        (self.training_bar or tqdm).write(line)
