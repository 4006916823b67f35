"""What the callback checks and fixes on the trainer before it can promise its guarantee.

`check_modes` is the one place where mode combinations are validated, for every entry point (the CLI's
settings and the Python API both reach it through `OGPSACallback.__init__`).
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

from lora_ogpsa.config import OGPSAConfig

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
    """DeepSpeed and FSDP step the optimizer inside their engines on sharded tensors: the trainer events this
    callback hooks would not see the update it must project. Refuse instead of projecting the wrong thing."""
    state = getattr(args, "distributed_state", None)
    kind = str(getattr(state, "distributed_type", ""))
    if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None) or "DEEPSPEED" in kind or "FSDP" in kind:
        raise ValueError("OGPSA projection does not support DeepSpeed or FSDP (the optimizer steps on sharded "
                         "tensors inside their engines); use DDP (torchrun) or --ogpsa_project none")
