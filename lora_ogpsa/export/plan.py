"""What a merge will do, decided (and every input checked) before anything is written.

The plan says, for every tensor of the base's safetensors checkpoint, whether it gets a LoRA delta, is replaced
wholesale by a tensor saved in the adapter (`modules_to_save`), and (dequantized mode) is rounded through NF4.
Nothing is guessed from key names: the adapter is matched against a PEFT model built from the base config on
the *meta* device, so PEFT itself decides which modules the adapter wraps and with which scaling (`r`,
`lora_alpha`, `use_rslora`, `rank_pattern`, `alpha_pattern`, `layers_to_transform`, `fan_in_fan_out`), and
transformers' own 4-bit quantizer decides which weights a 4-bit load quantizes (every `nn.Linear` except the
output embedding / tied weights: so `lm_head`, embeddings and norms stay full precision) — without allocating
a single base weight.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from lora_ogpsa.models.loading import (
    ADAPTER_NAME,
    SAFE_INDEX,
    check_adapter_numbers,
    nf4_config,
    resolve_model_dir,
    weight_files,
)
from lora_ogpsa.utils.errors import InputError, first_line
from lora_ogpsa.utils.files import ADAPTER_CONFIG, ADAPTER_FILE, read_json, safetensors_header

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
# LoraConfig fields whose adapters cannot be folded into W + scaling·(B @ A): the value each must have.
_UNMERGEABLE = {"use_dora": False, "lora_bias": False, "target_parameters": None, "trainable_token_indices": None,
                "layer_replication": None, "alora_invocation_tokens": None, "use_qalora": False}
_UNSUPPORTED_TENSORS = {"lora_magnitude_vector": "DoRA", "lora_embedding_": "LoRA on embeddings",
                        ".lora_B.bias": "a LoRA bias", "trainable_tokens_": "trainable tokens"}


@dataclass(frozen=True)
class TensorInfo:
    """Where one base tensor lives and what it is, read from the safetensors header."""

    shard: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: "F32", "BF16", ...


@dataclass(frozen=True)
class LoraPair:
    """One adapted base weight: W ← W + scaling · (B @ A), the product transposed when W is stored (in, out)."""

    lora_a: torch.Tensor  # (r, in_features)
    lora_b: torch.Tensor  # (out_features, r)
    scaling: float
    fan_in_fan_out: bool


@dataclass(frozen=True)
class NF4Spec:
    """How a 4-bit load quantizes one weight: the arguments of the bitsandbytes `Params4bit` transformers builds."""

    blocksize: int
    compress_statistics: bool
    quant_type: str
    quant_storage: torch.dtype
    transposed: bool  # Conv1D weights are stored (in, out); transformers quantizes their transpose


@dataclass
class MergePlan:
    """Everything the writer needs; built by `plan_merge`, which has already validated every input.

    Attributes:
        base_dir: the base model directory.
        config: the base's `config.json` as a dict (rewritten for the merged model).
        model_config: the same, parsed by transformers.
        info_by_key: every checkpoint tensor, in shard order.
        lora_by_key: base weight key → the LoRA pair added to it.
        replacement_by_key: base tensor key → full tensor from the adapter that replaces it (`modules_to_save`).
        nf4_by_key: base weight key → its NF4 round trip (dequantized mode only; empty otherwise).
    """

    base_dir: Path
    config: dict
    model_config: PretrainedConfig
    info_by_key: dict[str, TensorInfo]
    lora_by_key: dict[str, LoraPair]
    replacement_by_key: dict[str, torch.Tensor]
    nf4_by_key: dict[str, NF4Spec]

    @property
    def shards(self) -> list[Path]:
        """The checkpoint files, in order."""
        return list(dict.fromkeys(info.shard for info in self.info_by_key.values()))

    def keys_in(self, shard: Path) -> list[str]:
        """The tensor keys stored in one checkpoint file."""
        return [key for key, info in self.info_by_key.items() if info.shard == shard]


def plan_merge(base_dir: str | Path, adapter_dir: str | Path, *, dequantize: bool) -> MergePlan:
    """Read and check the base checkpoint and the adapter; decide what happens to every base tensor.

    Args:
        base_dir: a full-precision model directory with safetensors weights (one file or an index).
        adapter_dir: a PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`).
        dequantize: also plan the NF4 round trip of every weight a 4-bit load quantizes.

    Returns:
        The plan; the adapter tensors are in memory, base tensors are not.

    Raises:
        InputError: a missing, truncated or unreadable file; an adapter for another architecture or other
            shapes; an adapter kind merge does not support (DoRA, LoRA bias, embedding LoRA, other PEFT types).
    """
    base_dir = resolve_model_dir(base_dir)
    adapter_dir = Path(adapter_dir)
    config = read_base_config(base_dir)
    model_config = _parse_config(base_dir)
    info_by_key = read_checkpoint(base_dir)
    lora_config = read_adapter_config(adapter_dir)
    tensor_by_name = read_adapter_tensors(adapter_dir)
    layer_by_path, module_paths = _lora_layers(model_config, lora_config, adapter_dir)
    lora_by_key, replacement_by_key = _match_adapter(tensor_by_name, layer_by_path, module_paths, info_by_key,
                                                     adapter_dir)
    nf4_by_key = _nf4_specs(model_config, info_by_key) if dequantize else {}
    nf4_by_key = {key: spec for key, spec in nf4_by_key.items() if key not in replacement_by_key}
    return MergePlan(base_dir, config, model_config, info_by_key, lora_by_key, replacement_by_key, nf4_by_key)


def read_base_config(base_dir: Path) -> dict:
    """The base's `config.json`; refuses a pre-quantized checkpoint (its weights are not full precision)."""
    config = _read_json(base_dir / "config.json", flag="--model")
    if config.get("quantization_config"):
        raise InputError(f"--model {base_dir}: config.json has a quantization_config (a pre-quantized "
                         "checkpoint); merge needs the full-precision base the adapter was trained from")
    return config


def read_checkpoint(base_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of the base's safetensors checkpoint, in shard order (headers only, no tensor data)."""
    info_by_key: dict[str, TensorInfo] = {}
    for shard, expected_keys in weight_files(base_dir):
        found = _read_header(shard)
        missing = sorted(set(expected_keys) - set(found))
        if missing:
            raise InputError(f"--model {shard}: tensor {missing[0]} listed in {SAFE_INDEX} is not in this file; "
                             "the checkpoint is incomplete — copy it again")
        info_by_key.update(found)
    return info_by_key


def read_adapter_config(adapter_dir: Path) -> LoraConfig:
    """The adapter's LoRA config; refuses other PEFT types and LoRA variants that do not merge into W."""
    if not adapter_dir.is_dir():
        raise InputError(f"--adapter {adapter_dir}: no such directory; give a PEFT adapter directory")
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise InputError(f"--adapter {adapter_dir}: no {ADAPTER_CONFIG} in it; give a directory written by "
                         "`lora-ogpsa sft|dpo|align|export` or PEFT's save_pretrained")
    try:
        config = PeftConfig.from_pretrained(str(adapter_dir))
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise InputError(f"--adapter {adapter_dir / ADAPTER_CONFIG}: not a PEFT config ({first_line(error)})") \
            from error
    if not isinstance(config, LoraConfig):
        raise InputError(f"--adapter {adapter_dir}: peft_type is {config.peft_type}, merge supports LORA only")
    for field_name, mergeable in _UNMERGEABLE.items():
        value = getattr(config, field_name, mergeable)
        if value not in (mergeable, None, False, {}, []):
            raise InputError(f"--adapter {adapter_dir / ADAPTER_CONFIG}: `{field_name}` is {value!r}; merge "
                             "supports plain LoRA only — use PeftModel.merge_and_unload for this adapter")
    return config


def read_adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The adapter tensors, keyed as saved; refuses a missing, truncated or non-finite file."""
    path = adapter_dir / ADAPTER_FILE
    if not path.is_file():
        raise InputError(f"--adapter {adapter_dir}: no {ADAPTER_FILE} in it; merge reads safetensors "
                         "adapters only — re-save it with save_pretrained(safe_serialization=True)")
    try:
        tensor_by_name = load_file(path, device="cpu")
    except (SafetensorError, OSError) as error:
        raise InputError(f"--adapter {path}: not a readable safetensors file ({first_line(error)}); it is "
                         "truncated or corrupt — copy it again") from error
    check_adapter_numbers(tensor_by_name, path)
    return tensor_by_name


def is_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in a tensor (True for integer tensors)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = tensor.aminmax()  # one NaN-propagating pass, no mask: ~8× faster than isfinite().all()
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _read_header(shard: Path) -> dict[str, TensorInfo]:
    """Shapes and dtypes of one file's tensors."""
    return {key: TensorInfo(shard, shape, dtype)
            for key, (shape, dtype) in safetensors_header(shard, flag="--model").items()}


def _parse_config(base_dir: Path) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(str(base_dir), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"--model {base_dir / 'config.json'}: transformers cannot read it "
                         f"({first_line(error)})") from error


def _meta_model(config: PretrainedConfig) -> torch.nn.Module:
    """The base architecture on the meta device: module names, shapes and types, no memory."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError) as error:
        raise InputError(f"--model: transformers cannot build a causal LM from its config.json "
                         f"({first_line(error)})") from error


def _lora_layers(config: PretrainedConfig, lora_config: LoraConfig,
                 adapter_dir: Path) -> tuple[dict[str, LoraLayer], set[str]]:
    """The LoRA layers PEFT wraps into this base for this config (on meta), and all base module paths."""
    model = _meta_model(config)
    module_paths = {name for name, _ in model.named_modules()}
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(model, lora_config, adapter_name=ADAPTER_NAME)
    except (ValueError, KeyError, RuntimeError, TypeError) as error:
        raise InputError(f"--adapter {adapter_dir}: its {ADAPTER_CONFIG} does not fit this base "
                         f"({first_line(error)}); was it trained on another architecture?") from error
    layer_by_path = {name.removeprefix(PEFT_PREFIX): module for name, module in peft_model.named_modules()
                     if isinstance(module, LoraLayer)}
    return layer_by_path, module_paths


def _match_adapter(tensor_by_name: dict[str, torch.Tensor], layer_by_path: dict[str, LoraLayer],
                   module_paths: set[str], info_by_key: dict[str, TensorInfo],
                   adapter_dir: Path) -> tuple[dict[str, LoraPair], dict[str, torch.Tensor]]:
    """Pair every adapter tensor with the base tensor it changes: (lora_by_key, replacement_by_key)."""
    halves_by_path: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    replacement_by_key: dict[str, torch.Tensor] = {}
    where = adapter_dir / ADAPTER_FILE
    for name, tensor in tensor_by_name.items():
        key = name.removeprefix(PEFT_PREFIX)
        unsupported = next((kind for marker, kind in _UNSUPPORTED_TENSORS.items() if marker in name), None)
        if unsupported or key == name:
            what = f"belongs to {unsupported}" if unsupported else f"does not start with {PEFT_PREFIX!r}"
            raise InputError(f"--adapter {where}: tensor {name} {what}; merge supports plain LoRA on linear "
                             "layers only — use PeftModel.merge_and_unload")
        path, _, half = key.removesuffix(".weight").rpartition(".")
        if key.endswith(".weight") and half in ("lora_A", "lora_B"):
            halves_by_path[path][half] = tensor
        else:
            replacement_by_key[key] = _placed(key, tensor, info_by_key, where)
    uncovered = sorted(path for path in halves_by_path if path not in layer_by_path)
    for path in uncovered:
        _check_known_module(path, module_paths, where)
    if uncovered:
        # PEFT would load the adapter and silently leave these deltas out; a merge that drops trained weights is
        # never what was meant.
        raise InputError(f"--adapter {where}: holds LoRA tensors for {len(uncovered)} module(s) that "
                         f"{ADAPTER_CONFIG}'s target_modules does not cover (e.g. {uncovered[0]}); they would be "
                         f"dropped — add them to target_modules in {ADAPTER_CONFIG}, or re-save the adapter")
    lora_by_key = {path + ".weight": _lora_pair(path, halves, layer_by_path[path], info_by_key, where)
                   for path, halves in halves_by_path.items()}
    return lora_by_key, replacement_by_key


def _check_known_module(path: str, module_paths: set[str], where: Path) -> None:
    if path not in module_paths:
        raise InputError(f"--adapter {where}: module {path} does not exist in this base; the adapter was "
                         "trained on another architecture")


def _lora_pair(path: str, halves: dict[str, torch.Tensor], layer: LoraLayer, info_by_key: dict[str, TensorInfo],
               where: Path) -> LoraPair:
    """Check one module's lora_A / lora_B against PEFT's layer and the base weight; return the pair."""
    if not isinstance(layer, LoraLinear):
        raise InputError(f"--adapter {where}: {path} is a {type(layer).__name__} LoRA layer; merge supports "
                         "LoRA on linear layers only — use PeftModel.merge_and_unload")
    for half in ("lora_A", "lora_B"):
        if half not in halves:
            raise InputError(f"--adapter {where}: {path} has no {half}.weight; the adapter file is incomplete")
        expected = tuple(getattr(layer, half)[ADAPTER_NAME].weight.shape)
        if tuple(halves[half].shape) != expected:
            raise InputError(f"--adapter {where}: {path}.{half}.weight has shape {tuple(halves[half].shape)}, this "
                             f"base expects {expected}; the adapter was trained on a base with other shapes")
    key = f"{path}.weight"
    if key not in info_by_key:
        raise InputError(f"--adapter {where}: the base checkpoint has no {key} to merge {path} into; re-save the "
                         "base with save_pretrained")
    pair = LoraPair(halves["lora_A"], halves["lora_B"], float(layer.scaling[ADAPTER_NAME]),
                    bool(layer.fan_in_fan_out))
    out_in = (pair.lora_b.shape[0], pair.lora_a.shape[1])
    if info_by_key[key].shape != (out_in[::-1] if pair.fan_in_fan_out else out_in):
        raise InputError(f"--model {info_by_key[key].shard}: {key} has shape {info_by_key[key].shape}, the "
                         f"adapter expects {out_in}; the checkpoint does not match its config.json")
    return pair


def _placed(key: str, tensor: torch.Tensor, info_by_key: dict[str, TensorInfo], where: Path) -> torch.Tensor:
    """A full tensor saved in the adapter (modules_to_save): it must replace a base tensor of the same shape."""
    info = info_by_key.get(key)
    if info is None or info.shape != tuple(tensor.shape):
        found = "not in the base checkpoint" if info is None else f"shape {info.shape} in the base"
        raise InputError(f"--adapter {where}: full tensor {PEFT_PREFIX}{key} {tuple(tensor.shape)} cannot be "
                         f"placed ({key} is {found}); was the adapter trained on another architecture?")
    logger.info("%s is replaced by the full tensor saved in the adapter (modules_to_save)", key)
    return tensor


def _nf4_specs(config: PretrainedConfig, info_by_key: dict[str, TensorInfo]) -> dict[str, NF4Spec]:
    """The weights a 4-bit load with our `nf4_config` quantizes, and how: asked of transformers' quantizer."""
    from transformers.quantizers.auto import AutoHfQuantizer

    model = _meta_model(config)
    quantizer = AutoHfQuantizer.from_config(nf4_config(torch.device("cpu")), pre_quantized=False)
    quantizer.preprocess_model(model=model, dtype=torch.float32, device_map={"": torch.device("cpu")},
                               checkpoint_files=None, use_kernels=False)
    specs = {}
    for key in info_by_key:
        if not _needs_quantization(quantizer, model, key):
            continue
        param, module = model.get_parameter(key), model.get_submodule(key.rpartition(".")[0])
        specs[key] = NF4Spec(param.blocksize, param.compress_statistics, param.quant_type, param.quant_storage,
                             issubclass(getattr(module, "source_cls", torch.nn.Linear), Conv1D))
    return specs


def _needs_quantization(quantizer, model: torch.nn.Module, key: str) -> bool:
    try:
        return bool(quantizer.param_needs_quantization(model, key))
    except AttributeError:  # a checkpoint key the model lacks: transformers drops it on load, never quantizes it
        return False


def _read_json(path: Path, *, flag: str) -> dict:
    value = read_json(path, flag=flag)
    if not isinstance(value, dict):
        raise InputError(f"{flag} {path}: expected a JSON object, got {type(value).__name__}")
    return value
