"""Every setting of `lora-ogpsa sft|dpo|align`, declared once: the typed dataclasses the CLI is generated from.

One command's flags are the fields of four dataclasses, parsed by TRL's `TrlParser`: the trainer's config
(`SFTArguments` = TRL's `SFTConfig`, `DPOArguments` = `DPOConfig`, i.e. every `TrainingArguments` field),
`ModelArguments` (TRL's `ModelConfig` names for the model and LoRA), the command's script arguments (data,
reference, output protocol) and `OGPSAConfig`. Every field is a flag (`--learning_rate` and `--learning-rate`)
and a key of `--config FILE.yaml`; a few defaults differ from TRL's where we measured better ones for LoRA,
each said in its help.

A field is declared with `option(default, help, ...)`: its default, help, flag aliases, the commands that have
it, the name it has in the run settings (`TrainSettings`, generated from these fields in `train.settings`) and
whether it may change when a run resumes. Adding a setting is one `option(...)` here plus its use.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from trl import DPOConfig, SFTConfig

from lora_ogpsa.config import OGPSAConfig

TRAINING_COMMANDS = ("sft", "dpo", "align")
OURS = "lora_ogpsa"
"""The metadata key of our own field information (the parser hands the rest to argparse)."""


def option(default: Any = None, help: str = "", *, aliases: tuple[str, ...] = (), commands=TRAINING_COMMANDS,
           setting: str | None = None, resumable: bool = False, held: bool = True, factory=None,
           accepts: tuple | None = None, why: str = "") -> Any:
    """A dataclass field with its CLI metadata.

    Args:
        default: the default value (`factory` for a mutable one).
        help: the `--help` text (the default is appended by the parser).
        aliases: older names of the flag (both `-` and `_` spellings are accepted).
        commands: the training commands that have this flag.
        setting: its name in `TrainSettings` when it differs from the field's (the short names of docs/cli.md).
        resumable: whether `--resume` may continue a run whose checkpoint recorded another value.
        held: whether `TrainSettings` holds it (else a trainer field travels in `training_arguments`; another
            field is only checked).
        accepts: a TRL field we take only at these values (`check_accepted` refuses the others, with `why`).
        why: the reason a value outside `accepts` is refused, and what to do instead.
    """
    ours = {"commands": tuple(commands), "setting": setting, "resumable": resumable, "held": held,
            "accepts": accepts, "why": why}
    metadata = {"help": help, "aliases": _spellings(*aliases), OURS: ours}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def ours(item: dataclasses.Field) -> dict[str, Any]:
    """Our metadata of a field (`option`'s keywords); TRL's own fields have the defaults."""
    return item.metadata.get(OURS, {"commands": TRAINING_COMMANDS, "setting": None, "resumable": False,
                                    "held": True, "accepts": None, "why": ""})


def _spellings(*names: str) -> list[str]:
    """`--old-name` and `--old_name` for every name."""
    return sorted({f"--{spelling}" for name in names for spelling in (name.replace("_", "-"), name.replace("-", "_"))})


@dataclass
class _OurTrainingDefaults:
    """The trainer fields `TrainSettings` holds, with our defaults and names (they override the TRL config's)."""

    output_dir: str | None = option(None, "Output directory (required): the adapter, its subspace, checkpoints, "
                                    "metrics and card.", aliases=("output",), setting="output",
                                    resumable=True)
    per_device_train_batch_size: int = option(8, "Examples (or preference pairs) per micro-batch and device.",
                                              aliases=("batch_size",), setting="batch_size")
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.")
    learning_rate: float = option(1e-4, "AdamW learning rate, linear decay to 0 (TRL's default is 2e-5 for full "
                                  "fine-tuning; LoRA wants ~10x more).")
    max_steps: int = option(-1, "Optimizer steps (per stage for align); -1: --num_train_epochs epochs (TRL's default "
                            "3).", resumable=True)
    max_length: int | None = option(512, "Tokens per example (prompt + response); longer ones are truncated at the "
                                    "end.")
    gradient_checkpointing: bool | None = option(None, "Trade compute for memory (default: on with CUDA, off on the "
                                                 "CPU, where it only costs time).", resumable=True)
    logging_steps: float = option(10, "Log (console, metrics.jsonl, trackers) every this many steps.", resumable=True)
    save_strategy: str = option("steps", "When to save checkpoints: 'steps' every --save_steps (0: none), 'epoch', "
                                "or 'no'.", held=False)
    save_steps: float = option(0, "Save a checkpoint every this many optimizer steps (0: no checkpoints, only the "
                               "final adapter).", resumable=True)
    resume_from_checkpoint: str | None = option(
        None, "TRL's resume: a checkpoint-N directory of this run (in --output, OUTPUT.partial, or a stage's "
        "folder of either) to continue from, or 'true' for the newest complete one; implies --resume, with its "
        "guarantees (the same settings, the subspace in force restored).", resumable=True)
    seed: int = option(0, "Seed of the LoRA init, data order and reference sampling.")
    ddp_timeout: int = option(600, "Several processes: seconds a rank waits for the others before the run fails.",
                              resumable=True)


@dataclass
class _DPODefaults(_OurTrainingDefaults):
    beta: float = option(0.1, "DPO's beta: strength of the KL anchor to the reference model.",
                         commands=("dpo", "align"))


@dataclass
class SFTArguments(_OurTrainingDefaults, SFTConfig):
    """TRL's `SFTConfig`, with our defaults and aliases (see `_OurTrainingDefaults`)."""


@dataclass
class DPOArguments(_DPODefaults, DPOConfig):
    """TRL's `DPOConfig`, with our defaults and aliases (see `_OurTrainingDefaults`)."""


@dataclass
class ModelArguments:
    """The base model and the LoRA adapter (TRL's `ModelConfig` names)."""

    model_name_or_path: str | None = option(None, "Base model: a local directory or a Hugging Face Hub ID (resolved "
                                            "through the local Hugging Face cache; nothing is downloaded).",
                                            aliases=("model",), setting="model")
    model_revision: str = option("main", "Hub revision, for a Hub ID.")
    quantize: bool = option(True, "Load the base in 4-bit NF4 (QLoRA); --no-quantize loads it in full precision.",
                            aliases=("load_in_4bit",))
    use_peft: bool = option(True, "Always true: lora-ogpsa trains LoRA adapters (accepted so that TRL configs run "
                            "unchanged).", held=False,
                            accepts=(True,), why="lora-ogpsa trains LoRA adapters only; drop the flag")
    lora_r: int = option(16, "LoRA rank r.")
    lora_alpha: float | None = option(None, "LoRA alpha (default: 2 * lora_r).")
    lora_dropout: float = option(0.05, "Dropout on the LoRA input.")
    lora_target_modules: list[str] | None = option(None, "Module names to adapt, e.g. q_proj v_proj (default: every "
                                                   "linear layer but the output head).")
    use_rslora: bool = option(False, "Rank-stabilised LoRA: scaling alpha/sqrt(r).")
    use_dora: bool = option(False, "DoRA (weight-decomposed LoRA). Only with --ogpsa_project none: OGPSA projects "
                            "lora_A/lora_B and would leave DoRA's magnitude vectors unprotected.")
    # TRL's ModelConfig fields that lora-ogpsa takes at the values it runs with (a `trl sft` YAML runs unchanged
    # when it asks for what we do, and fails on one line saying why when it asks for something else)
    dtype: str | None = option(None, "TRL's model dtype: float32 or auto (the base is loaded in float32; a 4-bit "
                               "base computes in bf16 on CUDA) (default: float32).", held=False,
                               accepts=(None, "auto", "float32"),
                               why="lora-ogpsa loads the base in float32 (4-bit: NF4, bf16 compute on CUDA); "
                                   "drop the key or set float32")
    attn_implementation: str | None = option(None, "TRL's attention implementation: only the model's own (its "
                                             "config's) is used (default: the model's).", held=False,
                                             accepts=(None,),
                                             why="lora-ogpsa loads the model with its own attention "
                                                 "implementation; drop the key")
    lora_task_type: str = option("CAUSAL_LM", "PEFT task type: CAUSAL_LM, the only one lora-ogpsa trains.",
                                 held=False, accepts=("CAUSAL_LM",),
                                 why="lora-ogpsa trains causal language models only; use CAUSAL_LM")
    lora_target_parameters: list[str] | None = option(None, "PEFT target parameters: not supported (default: "
                                                      "none).", held=False, accepts=(None,),
                                                      why="OGPSA projects the lora_A/lora_B of target modules "
                                                          "only; use --lora_target_modules")
    lora_modules_to_save: list[str] | None = option(None, "PEFT modules trained in full: not supported (default: "
                                                    "none).", held=False, accepts=(None,),
                                                    why="fully trained modules would move outside OGPSA's "
                                                        "projection; adapt them with --lora_target_modules")
    load_in_8bit: bool = option(False, "8-bit base: not supported; the base is 4-bit NF4 (--load_in_4bit) or full "
                                "precision (--no-quantize).", held=False, accepts=(False,),
                                why="the base is 4-bit NF4 or full precision; use --load_in_4bit or --no-quantize")
    bnb_4bit_quant_type: str = option("nf4", "4-bit quantization type: nf4, the only one (the merge audit "
                                      "reproduces NF4).", held=False, accepts=("nf4",),
                                      why="lora-ogpsa's 4-bit base is NF4 (its merge audit requantizes NF4); use nf4")
    use_bnb_nested_quant: bool | None = option(None, "Nested (double) quantization of the 4-bit base: always on "
                                               "(default: true).", held=False, accepts=(None, True),
                                               why="lora-ogpsa always double-quantizes its 4-bit base, as its merge "
                                                   "audit assumes; drop the key")
    bnb_4bit_quant_storage: str | None = option(None, "4-bit storage dtype: not supported (default: uint8).",
                                                held=False, accepts=(None,),
                                                why="lora-ogpsa stores NF4 in bitsandbytes' default uint8; drop "
                                                    "the key")


@dataclass
class RunArguments:
    """The training commands' own settings beyond the trainer, model and OGPSA ones (each command shows those
    whose `commands` name it)."""

    data: str | None = option(None, "Training rows: SFT rows for sft (messages, or prompt/completion), preference "
                              "rows (prompt, chosen, rejected) for dpo; JSONL, JSON, Parquet, CSV or a save_to_disk "
                              "directory.", aliases=("dataset_name",), commands=("sft", "dpo"))
    dataset_config: str | None = option(None, "TRL's dataset configuration: local data have none (default: none).",
                                        held=False, accepts=(None,),
                                        why="--data/--dataset_name is a local file or folder, which has no "
                                            "configurations; drop the key", commands=("sft", "dpo"))
    dataset_train_split: str = option("train", "The split read from a DatasetDict or a folder of split files: "
                                      "train, as TRL's default.", held=False, accepts=("train",),
                                      why="lora-ogpsa reads the 'train' split; save the split you want as its own "
                                          "data set (or name it train)", commands=("sft", "dpo"))
    dataset_test_split: str = option("test", "TRL's evaluation split: unused, as in TRL without --eval_strategy "
                                     "(which lora-ogpsa refuses).", held=False, commands=("sft", "dpo"))
    dataset_streaming: bool = option(False, "Streaming datasets: not supported (every row is checked before "
                                     "training).", held=False, accepts=(False,),
                                     why="every row is read and checked before training; drop the key")
    ignore_bias_buffers: bool = option(False, "TRL's DDP switch for boolean buffers: not supported.", held=False,
                                       accepts=(False,), why="not needed by the models lora-ogpsa trains; drop the "
                                                             "key")
    sft_data: str | None = option(None, "SFT rows of the first stage.", commands=("align",))
    dpo_data: str | None = option(None, "Preference rows of the second stage.", commands=("align",))
    adapter: str | None = option(None, "Continue this adapter (DPO reference model = base + this adapter, frozen).",
                                 commands=("dpo",))
    reference: str | None = option(None, "Reference (general-capability) rows whose loss the updates must not move "
                                   "(JSONL of messages or prompt/completion); required unless --ogpsa_project none.")
    resume: bool = option(False, "Continue from the last checkpoint in --output.", resumable=True)
    overwrite: bool = option(False, "Replace an existing --output once the new run has finished.", resumable=True)
    replay: str | None = option(None, "Contrastive replay rows (e.g. dangerous-sounding benign prompts with the base "
                                "model's answers) whose gradient is added after the projection, so it is never "
                                "cancelled by it.")
    lookalike: str | None = option(None, "Look-alike rows for --lookalike_barrier: benign prompts that sound harmful, "
                                   "each with the answer to keep (messages or prompt/completion), from training or "
                                   "reference banks, never from an evaluation suite.")
    replay_fraction: float = option(0.25, "Share F of replay in each step: F/(1-F) x batch replay rows per step, "
                                    "weighted F/(1-F).")
    base_model_id: str | None = option(None, "What adapter_config.json names as the base (`base_model_name_or_path`), "
                                       "e.g. the Hub ID you will publish against (default: the Hub ID given, else "
                                       "the model directory's absolute path).", resumable=True)
    dpo_learning_rate: float | None = option(None, "DPO stage learning rate (default: --learning_rate).",
                                             commands=("align",))
    dpo_max_steps: int | None = option(None, "DPO stage steps (default: --max_steps).", commands=("align",),
                                       resumable=True)
    dpo_batch_size: int | None = option(None, "DPO stage pairs per micro-batch (default: "
                                        "--per_device_train_batch_size).", commands=("align",))
    dpo_save_steps: int | None = option(None, "DPO stage checkpoint interval (default: --save_steps).",
                                        commands=("align",), resumable=True)


def _script_arguments(command: str) -> type:
    """The `RunArguments` fields the command has, as its own dataclass (what `--help` shows)."""
    types = typing.get_type_hints(RunArguments)
    kept = [(item.name, types[item.name], item) for item in dataclasses.fields(RunArguments)
            if command in ours(item)["commands"]]
    return dataclasses.make_dataclass(f"{command.upper()}ScriptArguments", kept)


SCRIPT_ARGUMENTS = {command: _script_arguments(command) for command in TRAINING_COMMANDS}
TRAINING_ARGUMENTS = {"sft": SFTArguments, "dpo": DPOArguments, "align": DPOArguments}
REQUIRED = {"sft": ("model_name_or_path", "data", "output_dir"), "dpo": ("model_name_or_path", "data", "output_dir"),
            "align": ("model_name_or_path", "sft_data", "dpo_data", "output_dir")}


OGPSA_PREFIXED = {"project": "ogpsa_project"}
"""OGPSAConfig fields whose flag carries the `ogpsa_` prefix, because TRL has a field of the same name
(TrainingArguments' `project` is the trackio project). `--project update|grad|none` still sets the OGPSA mode,
with a deprecation line (`train.settings`)."""


def _ogpsa_arguments() -> type:
    """`OGPSAConfig`'s fields as flags: the same defaults and types, the colliding names prefixed."""
    types = typing.get_type_hints(OGPSAConfig)
    kept = [(OGPSA_PREFIXED.get(item.name, item.name), types[item.name],
             field(default=item.default, metadata={"help": help_of(OGPSAConfig, item.name)})
             if item.default_factory is dataclasses.MISSING else
             field(default_factory=item.default_factory, metadata={"help": help_of(OGPSAConfig, item.name)}))
            for item in dataclasses.fields(OGPSAConfig) if item.init]
    return dataclasses.make_dataclass("OGPSAArguments", kept)


def help_of(cls: type, name: str) -> str:
    """The first sentence of the string literal right after a field's declaration (how our dataclasses
    document their fields); empty when there is none."""
    return attribute_docs(cls).get(name, "")


def attribute_docs(cls: type) -> dict[str, str]:
    """Field name → the first sentence of its attribute docstring, for a class and its bases of this package."""
    import ast
    import inspect
    import itertools

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not klass.__module__.startswith("lora_ogpsa"):
            continue
        try:
            body = ast.parse(inspect.getsource(klass)).body[0].body
        except (OSError, TypeError, IndexError, AttributeError):
            continue
        for node, after in itertools.pairwise(body):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                text = " ".join(after.value.value.split())
                docs[node.target.id] = text.split(". ")[0].rstrip(".").replace("%", "%%") + "."
    return docs


OGPSA_ARGUMENTS = _ogpsa_arguments()


def dataclass_types(command: str) -> tuple[type, ...]:
    """The dataclasses a training command's flags come from, in parsing order."""
    return SCRIPT_ARGUMENTS[command], TRAINING_ARGUMENTS[command], ModelArguments, OGPSA_ARGUMENTS


def held_fields() -> list[dataclasses.Field]:
    """Every field `TrainSettings` holds, in order: run, trainer, then model settings."""
    trainer = [item for item in dataclasses.fields(_DPODefaults) if item.init]
    return [item for item in [*dataclasses.fields(RunArguments), *trainer, *dataclasses.fields(ModelArguments)]
            if ours(item)["held"]]


def check_accepted(values: dict[str, Any]) -> None:
    """Refuse a TRL field given at a value lora-ogpsa does not run with (an `option(..., accepts=...)`).

    Raises:
        InputError: naming the flag, the value and why.
    """
    from lora_ogpsa.utils.errors import InputError

    if values.get("trust_remote_code"):  # TRL's field: model code would run; here it never does
        raise InputError("--trust_remote_code true: lora-ogpsa never runs code from a model directory; use a model "
                         "whose architecture transformers ships, and drop the flag")
    for cls in (RunArguments, ModelArguments):
        for item in dataclasses.fields(cls):
            accepted = ours(item)["accepts"]
            if accepted is not None and item.name in values and values[item.name] not in accepted:
                raise InputError(f"--{item.name} {values[item.name]}: {ours(item)['why']}")


def setting_name(item: dataclasses.Field) -> str:
    """The field's name in `TrainSettings` (and in `ogpsa_config.json`)."""
    return ours(item)["setting"] or item.name



def field_defaults(cls: type) -> dict[str, Any]:
    """Field name → default (None for a field without one) of a dataclass's init fields."""
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
