"""`TrainSettings`: the settings of one `sft|dpo|align` run, generated from the fields of `train.arguments`.

Its fields are the held fields of the argument dataclasses (named by their `setting`, e.g. `output` for
`output_dir`), plus `training_arguments` (every other TRL field the user set) and `ogpsa`; defaults and help
come from those declarations, so nothing is declared twice. The checks below name each flag.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import typing
from pathlib import Path
from typing import Any

from lora_ogpsa.callback.guards import check_modes
from lora_ogpsa.config import OGPSAConfig
from lora_ogpsa.models.loading import is_hub_id
from lora_ogpsa.train.arguments import (
    TRAINING_ARGUMENTS,
    DPOArguments,
    ModelArguments,
    RunArguments,
    field_defaults,
    held_fields,
    ours,
    setting_name,
)
from lora_ogpsa.utils.errors import InputError

TRAINER_FIELDS = frozenset(field_defaults(DPOArguments))
logger = logging.getLogger(__name__)
RESUMABLE = frozenset({"step", *(setting_name(item) for item in held_fields() if ours(item)["resumable"])})
"""Run-config keys that may differ between a checkpoint and the run resuming it."""


class _Checks:
    """The validation and helpers of `TrainSettings` (its fields are generated below)."""

    def __post_init__(self) -> None:
        if self.model is None or self.output is None:
            raise InputError("TrainSettings needs `model` and `output`")
        self.output = Path(self.output)
        self.model = self.model if is_hub_id(self.model) else Path(self.model)
        self.adapter = Path(self.adapter) if self.adapter is not None else None
        if self.max_steps != -1 and _not_int_at_least(self.max_steps, 1):
            raise InputError(f"--max-steps must be -1 (train --num_train_epochs epochs) or an integer >= 1, got "
                             f"{self.max_steps!r}")
        for name in ("batch_size", "gradient_accumulation_steps", "max_length", "lora_r"):
            if _not_int_at_least(getattr(self, name), 1):
                raise InputError(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("save_steps", "ddp_timeout"):
            if _not_int_at_least(getattr(self, name), 0):
                raise InputError(f"--{name.replace('_', '-')} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("dpo_max_steps", "dpo_batch_size", "dpo_save_steps"):
            value = getattr(self, name)
            if value is not None and _not_int_at_least(value, 1):
                raise InputError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        for name in ("learning_rate", "dpo_learning_rate", "beta"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise InputError(f"--{name.replace('_', '-')} must be a positive number, got {value!r}")
        alpha = self.lora_alpha
        if alpha is not None and not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
            raise InputError(f"--lora-alpha must be a positive number, got {alpha!r}")
        if not (isinstance(self.logging_steps, int | float) and self.logging_steps > 0):
            raise InputError(f"--logging-steps must be a positive number, got {self.logging_steps!r}")
        if not (isinstance(self.replay_fraction, int | float) and 0 < self.replay_fraction < 1):
            raise InputError(f"--replay-fraction must be in (0, 1), got {self.replay_fraction!r}")
        if self.replay is not None:
            try:
                check_modes(self.ogpsa, replay=True)
            except ValueError as error:
                raise InputError(f"--replay adds its gradient after the gradient projection: it needs --ogpsa_project grad, "
                                 f"got --ogpsa_project {self.ogpsa.project} (for plain replay mix the rows into --data)"
                                 ) from error
        if self.ogpsa.lookalike_barrier and self.lookalike is None:
            raise InputError("--lookalike_barrier needs --lookalike FILE: benign prompts that sound harmful, each with "
                             "the answer to keep (messages or prompt/completion rows)")
        if self.lookalike is not None and not self.ogpsa.lookalike_barrier:
            raise InputError(f"--lookalike {self.lookalike} is only read by --lookalike_barrier true; add it or drop "
                             "--lookalike")
        if not (isinstance(self.lora_dropout, int | float) and 0 <= self.lora_dropout < 1):
            raise InputError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.resume_from_checkpoint is not None:
            if str(self.resume_from_checkpoint).lower() in ("false", ""):
                self.resume_from_checkpoint = None
            else:
                if self.overwrite:
                    raise InputError("--resume_from_checkpoint and --overwrite contradict each other; give one of them")
                self.resume = True
        if self.resume and self.overwrite:
            raise InputError("--resume and --overwrite contradict each other; give one of them")
        if _not_int_at_least(self.seed, 0) or self.seed > SEED_MAX:
            raise InputError(f"--seed must be an integer in [0, {SEED_MAX}], got {self.seed!r}")
        if alpha is not None and alpha / self.lora_r > MAX_LORA_SCALE:
            raise InputError(f"--lora_alpha {alpha:g} with --lora_r {self.lora_r}: the LoRA scale alpha/r "
                             f"{alpha / self.lora_r:g} is over {MAX_LORA_SCALE}, where the adapter's output swamps the "
                             "base's and training diverges; use an alpha near r (e.g. 2r)")
        check_trainer_numbers(self.training_arguments, max_steps=self.max_steps)

    @property
    def use_gradient_checkpointing(self) -> bool:
        import torch

        return torch.cuda.is_available() if self.gradient_checkpointing is None else self.gradient_checkpointing

    def trainer_values(self) -> dict[str, Any]:
        """The trainer fields held here, under TRL's names (`beta` only where the stage has it)."""
        return {item.name: getattr(self, setting_name(item)) for item in held_fields() if item.name in TRAINER_FIELDS}

    def for_dpo_stage(self) -> TrainSettings:
        """The settings of `align`'s DPO stage: its own steps and learning rate where given."""
        return dataclasses.replace(self, max_steps=self.dpo_max_steps or self.max_steps,
                                   learning_rate=self.dpo_learning_rate or self.learning_rate,
                                   batch_size=self.dpo_batch_size or self.batch_size,
                                   save_steps=self.dpo_save_steps or self.save_steps)

    def to_run_config(self, stage: str, rows: Any, reference: Any, adapter: Path | None) -> dict[str, Any]:
        """What `ogpsa_config.json` records: every setting plus the data actually used."""
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.name != "ogpsa"}
        values = {key: str(value) if isinstance(value, Path) else value for key, value in values.items()}
        values.update(stage=stage, ogpsa=self.ogpsa.to_dict(), training_rows=len(rows), training_source=rows.source,
                      skipped_rows=rows.skipped, continued_adapter=str(adapter) if adapter else None,
                      gradient_checkpointing=self.use_gradient_checkpointing)
        if reference is not None:
            values.update(reference_rows=reference.rows, reference_hash=reference.fingerprint)
        return values


def _settings_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    types = {**typing.get_type_hints(RunArguments), **typing.get_type_hints(ModelArguments),
             **typing.get_type_hints(DPOArguments)}
    fields = [(setting_name(item), types[item.name], dataclasses.field(default=item.default,
                                                                      default_factory=item.default_factory,
                                                                      metadata=item.metadata))
              for item in held_fields()]
    return [*fields, ("training_arguments", dict[str, Any], dataclasses.field(default_factory=dict)),
            ("ogpsa", OGPSAConfig, dataclasses.field(default_factory=OGPSAConfig))]


TrainSettings = dataclasses.make_dataclass("TrainSettings", _settings_fields(), bases=(_Checks,))
TrainSettings.__module__ = __name__
TrainSettings.__doc__ = """One `lora-ogpsa sft|dpo|align` run: model, data, LoRA and trainer settings, and the OGPSA config.

Every field is a command-line flag and a key of the `--config` YAML file (see `train.arguments`)."""


def to_train_settings(command: str, values: dict[str, Any], defaults: dict[str, Any]) -> TrainSettings:
    """The `TrainSettings` of one run from the parsed flag values (flat dicts: field name → value).

    Trainer fields equal to their parsed default (`defaults`: the values of an empty command line) stay out of
    `training_arguments`, so the run config records what the user chose and TRL's own defaults apply to the
    rest.

    Raises:
        InputError: a required flag is missing, or a value is out of range (naming the flag).
    """
    from lora_ogpsa.train.arguments import REQUIRED, check_accepted

    for name in REQUIRED[command]:
        if values.get(name) is None:
            shown = {"model_name_or_path": "model", "output_dir": "output"}.get(name, name)
            raise InputError(f"{command}: --{shown} is required (flag or --config key '{shown}' / '{name}')")
    check_accepted(values)
    ogpsa = _ogpsa_config(values)
    if values["use_dora"] and ogpsa.project != "none":
        raise InputError("--use_dora: OGPSA projects lora_A/lora_B only and would leave DoRA's magnitude vectors "
                         "unprotected; use it with --ogpsa_project none, or drop --use_dora")
    held = {item.name: item for item in held_fields()}
    trainer_fields = field_defaults(TRAINING_ARGUMENTS[command])
    extra = {name: value for name, value in values.items()
             if name in trainer_fields and name not in held and value != defaults.get(name)}
    if values.get("project") in PROJECT_MODES:  # the OGPSA mode under its old flag, not a trackio project
        extra.pop("project", None)
    own = {setting_name(item): _integral(values[name]) if name in TRAINER_FIELDS else values[name]
           for name, item in held.items() if name in values}
    return TrainSettings(**own, training_arguments=extra, ogpsa=ogpsa)


def _integral(value: Any) -> Any:
    """TrainingArguments types steps as floats (a value in (0, 1) is a share of the run); 5.0 is the step count
    5, and 0.0 is 0."""
    return int(value) if isinstance(value, float) and value.is_integer() and value >= 0 else value


PROJECT_MODES = ("update", "grad", "none")


def _ogpsa_config(values: dict[str, Any]) -> OGPSAConfig:
    """The OGPSAConfig of the parsed flags; `--project update|grad|none` (the old spelling of `--ogpsa_project`,
    now TRL's trackio project) still sets the mode, with a deprecation line."""
    default = field_defaults(OGPSAConfig)["project"]
    mode = values.get("ogpsa_project", default)
    if values.get("project") in PROJECT_MODES:
        if mode != default and mode != values["project"]:
            raise InputError(f"--project {values['project']} and --ogpsa_project {mode} disagree; give --ogpsa_project "
                             "alone (--project is TRL's trackio project)")
        logger.warning("--project %s is deprecated for the OGPSA mode: use --ogpsa_project %s (--project is TRL's "
                       "trackio project)", values["project"], values["project"])
        mode = values["project"]
    values = {**values, "project": mode}
    try:
        return OGPSAConfig(**{name: values[name] for name in field_defaults(OGPSAConfig)})
    except ValueError as error:  # the config names the field as `name`; the CLI's flag is --name
        raise InputError(str(error).replace("`", "--", 1).replace("`", "", 1)) from error


SEED_MAX = 2**32 - 1  # numpy's seeds (transformers' set_seed seeds numpy too)
MAX_LORA_SCALE = 1024  # alpha/r; PEFT's defaults give 1-2, rsLoRA alpha/sqrt(r) stays far below this

# TrainingArguments fields whose range transformers or torch only reject after work has started (or never):
# name -> (check, the range in words).
_TRAINER_RANGES: dict[str, tuple[Any, str]] = {
    "adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_epsilon": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "max_grad_norm": (lambda v: v >= 0, ">= 0 (0 turns clipping off)"),
    "warmup_steps": (lambda v: v >= 0, ">= 0"),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "num_train_epochs": (lambda v: v > 0, "> 0 (fractions train part of an epoch), or give --max-steps"),
    "data_seed": (lambda v: v == int(v) and 0 <= v <= SEED_MAX, f"an integer in [0, {SEED_MAX}]"),
}


def check_trainer_numbers(values: dict[str, Any], *, max_steps: int) -> None:
    """Every number among the TRL/transformers fields the user set is finite, and those of `_TRAINER_RANGES`
    within their range (`num_train_epochs` only counts without --max-steps).

    Raises:
        InputError: naming the flag, the value and the range.
    """
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not math.isfinite(value):
            raise InputError(f"--{name} must be a finite number, got {value!r}")
        check, words = _TRAINER_RANGES.get(name, (None, ""))
        if name == "num_train_epochs" and max_steps != -1:
            continue
        if check is not None and not check(value):
            raise InputError(f"--{name} must be {words}, got {value!r}")


def _not_int_at_least(value: Any, low: int) -> bool:
    return isinstance(value, bool) or not isinstance(value, int) or value < low
