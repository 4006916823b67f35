"""The typed arguments `lora-ogpsa sft|dpo|align` is generated from, as TRL's own scripts are.

One command's flags are the fields of four dataclasses, parsed by TRL's `TrlParser`: the trainer's config
(`SFTArguments` = TRL's `SFTConfig`, `DPOArguments` = `DPOConfig`, i.e. every `TrainingArguments` field),
`ModelArguments` (TRL's `ModelConfig` names for the model and LoRA), the command's script arguments (data,
reference, output protocol) and `OGPSAConfig`. Every field is a flag (`--learning_rate` and `--learning-rate`)
and a key of `--config FILE.yaml`. The names this project used before TRL's are aliases
(`--batch-size` → `per_device_train_batch_size`, `--output` → `output_dir`, `--model` →
`model_name_or_path`); a few defaults differ from TRL's where we measured better ones for LoRA, each said in
its help. `to_train_settings` turns the parsed dataclasses into the `TrainSettings` of one run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from trl import DPOConfig, SFTConfig

from lora_ogpsa.config import OGPSAConfig, TrainSettings
from lora_ogpsa.errors import InputError


def _aliases(*names: str) -> list[str]:
    """`--old-name` and `--old_name` for every name."""
    return sorted({f"--{spelling}" for name in names for spelling in (name.replace("_", "-"), name.replace("-", "_"))})


@dataclass
class _OurTrainingDefaults:
    """Where our defaults or names differ from `TrainingArguments`' (fields override the trainer config's)."""

    output_dir: str | None = field(default=None, metadata={
        "help": "Output directory (required): the adapter, its subspace, checkpoints, metrics and card.",
        "aliases": _aliases("output")})
    per_device_train_batch_size: int = field(default=8, metadata={
        "help": "Examples (or preference pairs) per micro-batch and device.", "aliases": _aliases("batch_size")})
    learning_rate: float = field(default=1e-4, metadata={
        "help": "AdamW learning rate (TRL's default is 2e-5 for full fine-tuning; LoRA wants ~10x more)."})
    max_length: int | None = field(default=512, metadata={
        "help": "Tokens per example (prompt + response); longer ones are truncated at the end."})
    gradient_checkpointing: bool | None = field(default=None, metadata={
        "help": "Trade compute for memory (default: on with CUDA, off on the CPU, where it only costs time)."})
    logging_steps: float = field(default=10, metadata={
        "help": "Log (console, metrics.jsonl, trackers) every this many steps."})
    save_strategy: str = field(default="steps", metadata={
        "help": "When to save checkpoints: 'steps' every --save_steps (0: none), 'epoch', or 'no'."})
    save_steps: float = field(default=0, metadata={
        "help": "Save a checkpoint every this many optimizer steps (0: no checkpoints, only the final adapter)."})
    seed: int = field(default=0, metadata={"help": "Seed of the LoRA init, data order and reference sampling."})
    ddp_timeout: int = field(default=600, metadata={
        "help": "Several processes: seconds a rank waits for the others before the run fails."})
    # `--project` is OGPSA's (update|grad|none); TrainingArguments' trackio project is `--trackio_project`.
    project: str = field(default="huggingface", init=False)
    trackio_project: str | None = field(default=None, metadata={
        "help": "The trackio project to log to (TrainingArguments' `project`; `--project` is OGPSA's mode)."})


@dataclass
class SFTArguments(_OurTrainingDefaults, SFTConfig):
    """TRL's `SFTConfig`, with our defaults and aliases (see `_OurTrainingDefaults`)."""


@dataclass
class DPOArguments(_OurTrainingDefaults, DPOConfig):
    """TRL's `DPOConfig`, with our defaults and aliases (see `_OurTrainingDefaults`)."""


@dataclass
class ModelArguments:
    """The base model and the LoRA adapter (TRL's `ModelConfig` names)."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Base model: a local directory or a Hugging Face Hub ID (resolved through the local Hugging Face "
                "cache; nothing is downloaded).", "aliases": _aliases("model")})
    model_revision: str = field(default="main", metadata={"help": "Hub revision, for a Hub ID."})
    quantize: bool = field(default=True, metadata={
        "help": "Load the base in 4-bit NF4 (QLoRA); --no-quantize loads it in full precision.",
        "aliases": _aliases("load_in_4bit")})
    use_peft: bool = field(default=True, metadata={
        "help": "Always true: lora-ogpsa trains LoRA adapters (accepted so that TRL configs run unchanged)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank r."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: 2 * lora_r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "Module names to adapt, e.g. q_proj v_proj (default: every linear layer but the output head)."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA: scaling alpha/sqrt(r)."})
    use_dora: bool = field(default=False, metadata={
        "help": "DoRA (weight-decomposed LoRA). Only with --project none: OGPSA projects lora_A/lora_B and would "
                "leave DoRA's magnitude vectors unprotected."})


@dataclass
class _RunArguments:
    """What every training command shares beyond the trainer, model and OGPSA settings."""

    reference: str | None = field(default=None, metadata={
        "help": "Reference (general-capability) rows whose loss the updates must not move (JSONL of messages or "
                "prompt/completion); required unless --project none."})
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint in --output."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace an existing --output once the new run has finished."})
    replay: str | None = field(default=None, metadata={
        "help": "Contrastive replay rows (e.g. dangerous-sounding benign prompts with the base model's answers) whose "
                "gradient is added after the projection, so it is never cancelled by it."})
    replay_fraction: float = field(default=0.25, metadata={
        "help": "Share F of replay in each step: F/(1-F) x batch replay rows per step, weighted F/(1-F)."})
    base_model_id: str | None = field(default=None, metadata={
        "help": "What adapter_config.json names as the base (`base_model_name_or_path`), e.g. the Hub ID you will "
                "publish against (default: the Hub ID given, else the model directory's absolute path)."})


@dataclass
class SFTScriptArguments(_RunArguments):
    """`lora-ogpsa sft`: the training data."""

    data: str | None = field(default=None, metadata={
        "help": "SFT rows: JSONL (messages, or prompt/completion), JSON, Parquet, CSV or a save_to_disk directory.",
        "aliases": _aliases("dataset_name")})


@dataclass
class DPOScriptArguments(_RunArguments):
    """`lora-ogpsa dpo`: the preference data and an adapter to continue."""

    data: str | None = field(default=None, metadata={
        "help": "Preference rows (prompt, chosen, rejected).", "aliases": _aliases("dataset_name")})
    adapter: str | None = field(default=None, metadata={
        "help": "Continue this adapter (DPO reference model = base + this adapter, frozen)."})


@dataclass
class AlignScriptArguments(_RunArguments):
    """`lora-ogpsa align`: SFT then DPO on the same adapter; the DPO stage's own settings."""

    sft_data: str | None = field(default=None, metadata={"help": "SFT rows of the first stage."})
    dpo_data: str | None = field(default=None, metadata={"help": "Preference rows of the second stage."})
    dpo_learning_rate: float | None = field(default=None, metadata={
        "help": "DPO stage learning rate (default: --learning_rate)."})
    dpo_max_steps: int | None = field(default=None, metadata={"help": "DPO stage steps (default: --max_steps)."})
    dpo_batch_size: int | None = field(default=None, metadata={
        "help": "DPO stage pairs per micro-batch (default: --per_device_train_batch_size)."})
    dpo_save_steps: int | None = field(default=None, metadata={
        "help": "DPO stage checkpoint interval (default: --save_steps)."})


SCRIPT_ARGUMENTS = {"sft": SFTScriptArguments, "dpo": DPOScriptArguments, "align": AlignScriptArguments}
TRAINING_ARGUMENTS = {"sft": SFTArguments, "dpo": DPOArguments, "align": DPOArguments}
REQUIRED = {"sft": ("model_name_or_path", "data", "output_dir"), "dpo": ("model_name_or_path", "data", "output_dir"),
            "align": ("model_name_or_path", "sft_data", "dpo_data", "output_dir")}

_SHOWN = {"model_name_or_path": "model", "output_dir": "output"}  # the short names of the README

# Trainer fields that TrainSettings holds itself (the rest travel in `TrainSettings.training_arguments`).
_MAPPED = {"output_dir": "output", "per_device_train_batch_size": "batch_size", "learning_rate": "learning_rate",
           "max_steps": "max_steps", "save_steps": "save_steps", "seed": "seed", "max_length": "max_length",
           "gradient_accumulation_steps": "gradient_accumulation_steps", "ddp_timeout": "ddp_timeout",
           "gradient_checkpointing": "gradient_checkpointing", "beta": "beta", "logging_steps": "logging_steps"}


def dataclass_types(command: str) -> tuple[type, ...]:
    """The dataclasses a training command's flags come from, in parsing order."""
    return SCRIPT_ARGUMENTS[command], TRAINING_ARGUMENTS[command], ModelArguments, OGPSAConfig


def to_train_settings(command: str, values: dict[str, Any], defaults: dict[str, Any]) -> TrainSettings:
    """The `TrainSettings` of one run from the parsed flag values (flat dicts: field name → value).

    Trainer fields equal to their parsed default (`defaults`: the values of an empty command line) stay out of
    `training_arguments`, so the run config records what the user chose and TRL's own defaults apply to the
    rest.

    Raises:
        InputError: a required flag is missing, or a value is out of range (naming the flag).
    """
    for name in REQUIRED[command]:
        if values.get(name) is None:
            shown = _SHOWN.get(name, name)
            raise InputError(f"{command}: --{shown} is required (flag or --config key '{shown}' / '{name}')")
    if not values["use_peft"]:
        raise InputError("--use_peft false: lora-ogpsa trains LoRA adapters only; drop the flag")
    ogpsa = _ogpsa_config(values)
    if values["use_dora"] and ogpsa.project != "none":
        raise InputError("--use_dora: OGPSA projects lora_A/lora_B only and would leave DoRA's magnitude vectors "
                         "unprotected; use it with --project none, or drop --use_dora")
    trainer_fields = _field_defaults(TRAINING_ARGUMENTS[command])
    extra = {name: value for name, value in values.items()
             if name in trainer_fields and name not in _MAPPED and value != defaults.get(name)}
    if "trackio_project" in extra:
        extra["project"] = extra.pop("trackio_project")
    own = {field.name for field in dataclasses.fields(TrainSettings)}
    mapped = {ours: _integral(values[theirs]) for theirs, ours in _MAPPED.items() if theirs in values and ours in own}
    script = {name: values[name] for name in _field_defaults(SCRIPT_ARGUMENTS[command]) if name in own}
    lora = {name: values[name] for name in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                                            "use_rslora", "use_dora", "quantize", "model_revision")}
    return TrainSettings(model=values["model_name_or_path"], **mapped, **script, **lora, training_arguments=extra,
                         ogpsa=ogpsa)


def _integral(value: Any) -> Any:
    """TrainingArguments types steps as floats (a value < 1 is a share of the run); 5.0 is the step count 5."""
    return int(value) if isinstance(value, float) and value.is_integer() and value >= 1 else value


def _ogpsa_config(values: dict[str, Any]) -> OGPSAConfig:
    names = _field_defaults(OGPSAConfig)
    try:
        return OGPSAConfig(**{name: values[name] for name in names})
    except ValueError as error:  # the config names the field as `name`; the CLI's flag is --name
        raise InputError(str(error).replace("`", "--", 1).replace("`", "", 1)) from error


def _field_defaults(cls: type) -> dict[str, Any]:
    defaults = {}
    for item in dataclasses.fields(cls):
        if not item.init:
            continue
        if item.default is not dataclasses.MISSING:
            defaults[item.name] = item.default
        elif item.default_factory is not dataclasses.MISSING:
            defaults[item.name] = item.default_factory()
        else:
            defaults[item.name] = None
    return defaults
