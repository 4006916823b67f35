"""What the callback checks and fixes on the trainer before it can promise its guarantee.

`check_modes` is the one place where mode combinations are validated, for every entry point (the CLI's
settings and the Python API both reach it through `OGPSACallback.__init__`).
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import TrainerCallback

from lora_ogpsa.config import OGPSAConfig
from lora_ogpsa.signals import sharding
from lora_ogpsa.utils.errors import InputError

logger = logging.getLogger(__name__)


def check_modes(config: OGPSAConfig, *, replay: bool) -> None:
    """Refuse mode combinations that would silently do something else than asked.

    Raises:
        ValueError: replay without a gradient projection (it is added after the projected gradient, so it
            needs `project='grad'`; with `update` the projection of the applied change would remove it again,
            with `none` there is nothing to add it after).
    """
    if replay and config.project != "grad":
        raise ValueError(f"replay adds its gradient after a gradient projection: it needs project='grad', got "
                         f"project={config.project!r} (for plain replay mix the rows into the training data)")


def make_safe_(model: torch.nn.Module, parameters: dict[str, torch.nn.Parameter]) -> None:
    """float32 LoRA weights, no bitsandbytes CPU repack, no trainable weight outside the projection.

    Raises:
        ValueError: a trainable weight that is not a LoRA A/B weight (it would move unprojected).
    """
    from lora_ogpsa.models.loading import disable_cpu_repack_, keep_lora_float32_

    check_fsdp2_(model, parameters)
    cast = [name for name, parameter in parameters.items() if parameter.dtype != torch.float32]
    if cast:
        keep_lora_float32_(model)
        logger.info("OGPSACallback: cast %d LoRA weights back to float32 (the trainer had made them %s); the "
                    "projection needs float32 to stay exact", len(cast), parameters[cast[0]].dtype)
    disable_cpu_repack_(model)
    projected = {id(parameter) for parameter in parameters.values()}
    loose = [name for name, parameter in model.named_parameters()
             if parameter.requires_grad and id(parameter) not in projected]
    if loose:
        raise ValueError(f"OGPSACallback: {len(loose)} trainable weights are not LoRA A/B weights (e.g. {loose[0]}): "
                         "they would move unprojected; freeze them (no modules_to_save, no DoRA) or use "
                         "project='none'")


def run_first(callback: TrainerCallback, frame) -> None:
    """Move `callback` to the front of the trainer's callback list, so that the metrics it adds in `on_log`
    are in `logs` when the integration callbacks (TensorBoard, W&B, trackio, ...) write them: the Trainer
    puts those before any user callback, and `on_log` runs in list order.

    The trainer is not passed to callbacks; its `CallbackHandler` is the caller of this event (found on the
    stack). Moving an element from later in the list to its front while the handler iterates over the list
    keeps every later element at its index, so the current event still reaches each callback once.
    """
    from transformers.trainer_callback import CallbackHandler

    while frame is not None and not isinstance(frame.f_locals.get("self"), CallbackHandler):
        frame = frame.f_back
    if frame is None:
        logger.warning("OGPSACallback: trainer callbacks not found; trackers may miss the ogpsa/* metrics")
        return
    callbacks = frame.f_locals["self"].callbacks
    if callback in callbacks and callbacks[0] is not callback:
        callbacks.remove(callback)
        callbacks.insert(0, callback)


def refuse_sharded_training(args) -> None:
    """Refuse the engines that step the optimizer inside themselves on flat shards (DeepSpeed ZeRO, FSDP1): the
    trainer events this callback hooks would not see the update it must project. FSDP2 (per-parameter DTensor
    shards, the ordinary torch optimizer) and DDP are supported.

    Raises:
        InputError: DeepSpeed or FSDP1 configured (trainer arguments or `accelerate launch`'s environment).
    """
    engine = sharding_engine(args)
    if engine is not None:
        raise InputError(f"OGPSA projection cannot run under {engine} (its optimizer steps inside the engine, unseen "
                         "by the callback): use FSDP2 (accelerate config `fsdp_version: 2`, see "
                         "examples/accelerate_fsdp2.yaml), DDP (torchrun), or --ogpsa_project none")


def sharding_engine(args) -> str | None:
    """'DeepSpeed' or 'FSDP1' when one is configured, else None (FSDP2, DDP or one process)."""
    state = getattr(args, "distributed_state", None)
    kind = str(getattr(state, "distributed_type", ""))
    if getattr(args, "deepspeed", None) or _env_true("ACCELERATE_USE_DEEPSPEED") or "DEEPSPEED" in kind:
        return "DeepSpeed"
    if getattr(args, "fsdp", None):
        config = getattr(args, "fsdp_config", None) or {}
        version = int(config.get("version", config.get("fsdp_version", 2)))  # transformers' default: 2
    elif _env_true("ACCELERATE_USE_FSDP") or "FSDP" in kind:
        version = int(os.environ.get("FSDP_VERSION", "1"))  # accelerate's default: 1
    else:
        return None
    return None if version == 2 else f"FSDP{version}"


def check_fsdp2_(model: torch.nn.Module, parameters: dict[str, torch.nn.Parameter]) -> None:
    """Under FSDP2, the LoRA weights must be float32 `Shard(0)` DTensors (`sharding.check_layout`): a cast after
    `fully_shard` would replace the sharded parameters FSDP manages.

    Raises:
        ValueError: a LoRA weight left whole, sharded another way, or not float32.
    """
    from torch.distributed.fsdp import FSDPModule

    if not (isinstance(model, FSDPModule) or sharding.is_sharded(parameters)):
        return
    sharding.check_layout(parameters)
    low = [name for name, parameter in parameters.items() if parameter.dtype != torch.float32]
    if low:
        raise ValueError(f"OGPSACallback under FSDP2: LoRA weight {low[0]} is {parameters[low[0]].dtype}; the "
                         "projection needs float32: cast the LoRA weights to float32 before the trainer shards them "
                         "(lora_ogpsa.models.loading.keep_lora_float32_) or set mixed_precision")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")
