"""A LoRA adapter with its delta scaled by λ, folded into the weights: W + λ·ΔW as an ordinary PEFT adapter.

ΔW = s·B·A (s = lora_alpha / r, or / √r with rsLoRA) is linear in B, so B ← λ·B gives exactly λ·ΔW while the
config, and with it s, stays unchanged: the written adapter loads with `PeftModel.from_pretrained` as any other,
and any tool that reads `adapter_config.json` sees the same rank and alpha. PEFT's own knobs do not persist:
`peft.helpers.rescale_adapter_scale` and `LoraLayer.set_scale` change `scaling` in memory only (it is
recomputed from the config on load), and rewriting `lora_alpha` to λ·alpha would hide λ in a hyper-parameter
(and interact with `alpha_pattern`, rsLoRA). DoRA (the magnitude vector renormalises W + ΔW, so scaling B is
not λ·ΔW), LoRA biases and fully trained modules are refused.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from lora_ogpsa.models.loading import LORA_TENSOR_MARKERS
from lora_ogpsa.utils.errors import InputError
from lora_ogpsa.utils.files import ADAPTER_CONFIG, ADAPTER_FILE, read_json, read_safetensors


def scale_lora_delta(tensors: Mapping[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """The adapter's tensors with every lora_B multiplied by `scale` (lora_A unchanged): ΔW → scale·ΔW.

    Raises:
        InputError: a tensor that is neither a lora_A nor a lora_B weight (DoRA magnitude, LoRA bias, a fully
            trained module), whose scaling would not scale the delta.
    """
    scaled = {}
    for name, tensor in tensors.items():
        if not name.endswith(".weight") or not any(marker in name for marker in LORA_TENSOR_MARKERS):
            raise InputError(f"adapter tensor {name}: only lora_A/lora_B weights can be scaled by λ (DoRA, LoRA "
                             "biases and fully trained modules cannot); use a plain LoRA adapter")
        scaled[name] = tensor * scale if LORA_TENSOR_MARKERS[1] in name else tensor.clone()
    return scaled


def write_scaled_adapter(source: Path, directory: Path, scale: float) -> None:
    """Write `source`'s adapter into `directory` (which exists) with λ = `scale` folded into lora_B.

    Raises:
        InputError: `scale` outside (0, 1], a DoRA or biased adapter, or a tensor that is not LoRA's.
    """
    from safetensors.torch import save_file

    if not 0.0 < scale <= 1.0:
        raise InputError(f"λ must be in (0, 1], got {scale}")
    config = read_json(source / ADAPTER_CONFIG, flag="--adapter")
    if config.get("use_dora") or config.get("lora_bias"):
        raise InputError(f"--adapter {source}: a {'DoRA' if config.get('use_dora') else 'biased LoRA'} adapter "
                         "cannot be scaled by λ through lora_B; use a plain LoRA adapter")
    tensors = read_safetensors(source / ADAPTER_FILE, flag="--adapter")
    save_file({name: tensor.contiguous() for name, tensor in scale_lora_delta(tensors, scale).items()},
              str(directory / ADAPTER_FILE), metadata={"format": "pt", "lora_ogpsa_lambda": repr(scale)})
    shutil.copyfile(source / ADAPTER_CONFIG, directory / ADAPTER_CONFIG)
