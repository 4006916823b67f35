"""Merge a LoRA adapter into its base model, shard by shard, and prove the result reproduces base + adapter.

    original:     W' = W                 + scaling · (B @ A)
    dequantized:  W' = dequant(NF4(W))   + scaling · (B @ A)     (the weights a QLoRA adapter was trained on)

scaling = lora_alpha / r (lora_alpha / √r with use_rslora), per module as PEFT resolves it; the product is
transposed for weights stored (in, out) (`fan_in_fan_out`, GPT-2's Conv1D). All math in float32; the result
is cast to the output dtype last. The base checkpoint is streamed one safetensors file at a time (read with
`pread`, not mmap, so only the tensors we hold count), so peak memory is about one shard plus the adapter.
The output is written into a hidden sibling directory, audited (`merge_audit`), and renamed into place only
when everything passed: a failed merge leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import GenerationConfig

from lora_ogpsa.export.audit import audit_merge
from lora_ogpsa.export.card import write_merged_card
from lora_ogpsa.export.plan import (
    LoraPair,
    MergePlan,
    NF4Spec,
    is_finite,
    plan_merge,
)
from lora_ogpsa.models.loading import SAFE_INDEX, SAFE_WEIGHTS
from lora_ogpsa.utils.errors import InputError
from lora_ogpsa.utils.files import ADAPTER_CONFIG, CARD_FILE, RUN_CONFIG, TOKENIZER_FILES, read_json
from lora_ogpsa.utils.outputs import atomic_directory, output_path, probe_writable

logger = logging.getLogger(__name__)

MergeBase = Literal["original", "dequantized"]
"""What the adapter is merged into: the original full-precision weights, or the dequantized 4-bit ones."""
OutputDtype = Literal["float32", "bfloat16", "float16"]
DTYPE_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Copied verbatim from the base, when present: what `AutoTokenizer` and `generate` read.
SIDE_FILES = ("generation_config.json", *TOKENIZER_FILES)


@dataclass(frozen=True)
class MergeReport:
    """What `merge_adapter` did.

    Attributes:
        output_dir: the merged model directory.
        base: "original" or "dequantized".
        dtype: the merged weights' dtype name.
        merged_tensors: base weights that received a LoRA delta.
        replaced_tensors: base tensors replaced by full tensors saved in the adapter (modules_to_save).
        dequantized_tensors: weights rounded through NF4 (dequantized mode; 0 otherwise).
        total_tensors: tensors written.
        shards: safetensors files written.
        bytes_written: bytes of tensor data written.
        merge_seconds: reading, merging and writing.
        audit_seconds: loading both models and comparing logits (0 without audit).
        max_logit_diff: max |merged − (base + adapter)| logit on the audit inputs (None without audit).
        logit_scale: max |reference logit| (None without audit).
        tolerance: what max_logit_diff was held to (None without audit).
    """

    output_dir: Path
    base: str
    dtype: str
    merged_tensors: int
    replaced_tensors: int
    dequantized_tensors: int
    total_tensors: int
    shards: int
    bytes_written: int
    merge_seconds: float
    audit_seconds: float = 0.0
    max_logit_diff: float | None = None
    logit_scale: float | None = None
    tolerance: float | None = None

    @property
    def seconds(self) -> float:
        """Total wall time."""
        return self.merge_seconds + self.audit_seconds

    def as_dict(self) -> dict:
        """JSON-ready fields (paths as strings), plus `seconds`."""
        return {**asdict(self), "output_dir": str(self.output_dir), "seconds": self.seconds}


def output_dtype(name: str) -> torch.dtype:
    """The torch dtype for a `--dtype` name.

    Raises:
        InputError: not one of float32, bfloat16, float16.
    """
    if name not in DTYPE_BY_NAME:
        raise InputError(f"--dtype must be one of {', '.join(DTYPE_BY_NAME)}, got {name!r}")
    return DTYPE_BY_NAME[name]


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, *,
               fan_in_fan_out: bool = False) -> torch.Tensor:
    """scaling · (B @ A) in float32, as PEFT's `get_delta_weight` computes it.

    Args:
        lora_a: (r, in_features), PEFT's lora_A.
        lora_b: (out_features, r), PEFT's lora_B.
        scaling: lora_alpha / r (or / √r with rslora).
        fan_in_fan_out: the base weight is stored (in, out): return the transpose.

    Returns:
        (out_features, in_features), or (in_features, out_features) with fan_in_fan_out; float32, new memory.
    """
    delta = lora_b.float() @ lora_a.float()  # (out, in)
    return (delta.T if fan_in_fan_out else delta).mul_(scaling)


def merge_lora(weight: torch.Tensor, pair: LoraPair) -> torch.Tensor:
    """W + scaling · (B @ A) in float32 (`lora_delta` added to W); `weight` is not modified.

    Args:
        weight: the base weight, any float dtype, shaped like `lora_delta`'s result.
        pair: the adapter's tensors and scaling for this weight.

    Returns:
        The merged weight, float32, new memory.
    """
    lora_a, lora_b = pair.lora_a.float(), pair.lora_b.float()
    if pair.fan_in_fan_out:  # W is (in, out): add (B @ A)ᵀ = Aᵀ @ Bᵀ
        lora_a, lora_b = lora_b.T, lora_a.T
    # One fused GEMM, C = scaling·(B @ A) + W: the same roundings as PEFT's (B @ A)·scaling + W, in one pass
    # over the weight and with no weight-sized temporary (measured 1.5× faster than the two-step form).
    return torch.addmm(weight.float(), lora_b, lora_a, alpha=pair.scaling)


def nf4_round_trip(weight: torch.Tensor, spec: NF4Spec) -> torch.Tensor:
    """dequant(NF4(W)) in float32: exactly the weight a 4-bit load with our `nf4_config` computes with.

    It builds the same bitsandbytes `Params4bit` transformers builds when it quantizes on load (float32 input,
    same blocksize / double quantization / storage), on the same device (CPU), and dequantizes it.

    Args:
        weight: (out, in) base weight ((in, out) for Conv1D, spec.transposed), any float dtype.
        spec: the quantization settings for this weight.

    Returns:
        Same shape as `weight`, float32.
    """
    import bitsandbytes as bnb

    value = weight.float()
    value = (value.T if spec.transposed else value).contiguous()
    quantized = bnb.nn.Params4bit(value, requires_grad=False, blocksize=spec.blocksize,
                                  compress_statistics=spec.compress_statistics, quant_type=spec.quant_type,
                                  quant_storage=spec.quant_storage).to(value.device)
    dequantized = bnb.functional.dequantize_4bit(quantized.data, quantized.quant_state)
    return dequantized.T if spec.transposed else dequantized


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, output_dir: str | Path, *,
                  base: MergeBase = "original", dtype: OutputDtype = "float32", audit: bool = True,
                  progress: bool = True) -> MergeReport:
    """Merge a LoRA adapter into its base and write a standalone model directory.

    Args:
        base_dir: the full-precision base model (config.json + safetensors, one file or sharded with an index).
        adapter_dir: a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors).
        output_dir: where the merged model goes; must not exist.
        base: "original" adds the delta to the base weights; "dequantized" to dequant(NF4(W)), the weights a
            QLoRA adapter was trained on, so the merged model reproduces the trained 4-bit model.
        dtype: the merged weights' dtype ("float32", "bfloat16", "float16"); the math is float32 regardless.
        audit: compare the merged model with base + adapter on fixed inputs before finishing (loads both
            models, one at a time: needs memory for one full model, unlike the streaming merge).
        progress: show a progress bar over the tensors.

    Returns:
        What was done and, with audit, the measured logit difference.

    Raises:
        InputError: bad input (see `plan_merge`), an existing output directory, or a merged tensor with
            NaN/Inf values (named). Nothing is written.
        MergeAuditError: the merged model does not reproduce base + adapter. Nothing is left behind.
    """
    torch_dtype = output_dtype(dtype)
    if base not in get_args(MergeBase):
        raise InputError(f"--base must be one of {', '.join(get_args(MergeBase))}, got {base!r}")
    output_dir = output_path(output_dir)
    if output_dir.exists():
        raise InputError(f"--output {output_dir}: already exists; choose a new directory or remove it first")
    probe_writable(output_dir)
    started = time.perf_counter()
    check_base_fits(Path(adapter_dir), base)
    plan = plan_merge(base_dir, adapter_dir, dequantize=base == "dequantized")
    with atomic_directory(output_dir) as staging:
        shards, nbytes = _write_weights(plan, staging, torch_dtype, progress=progress)
        _write_config(plan, staging, dtype)
        merged_at = time.perf_counter()
        checked = (audit_merge(staging, plan.base_dir, Path(adapter_dir), base=base, dtype=dtype,
                               vocab_size=plan.model_config.get_text_config().vocab_size) if audit else None)
        named = read_json(Path(adapter_dir) / ADAPTER_CONFIG).get("base_model_name_or_path")
        write_merged_card(staging / CARD_FILE, base_model=named or str(plan.base_dir), adapter_dir=Path(adapter_dir),
                          base=base, dtype=dtype, max_logit_diff=checked.max_logit_diff if checked else None)
    report = MergeReport(output_dir, base, dtype, merged_tensors=len(plan.lora_by_key),
                         replaced_tensors=len(plan.replacement_by_key), dequantized_tensors=len(plan.nf4_by_key),
                         total_tensors=len(plan.info_by_key), shards=shards, bytes_written=nbytes,
                         merge_seconds=merged_at - started, audit_seconds=time.perf_counter() - merged_at,
                         **(asdict(checked) if checked else {}))
    logger.info("merged %d tensors (%d replaced, %d NF4) into %s: %d shards, %.1f MB, %.1f s",
                report.merged_tensors, report.replaced_tensors, report.dequantized_tensors, output_dir, shards,
                nbytes / 1e6, report.seconds)
    return report


def check_base_fits(adapter_dir: Path, base: MergeBase) -> None:
    """`--base dequantized` reproduces a model trained on the 4-bit base: refused for an adapter whose run config
    says it was trained in full precision (the merged model would differ from the trained one); the reverse,
    `original` for a 4-bit-trained adapter, is allowed (the common choice) and warned about.

    Raises:
        InputError: dequantized for a full-precision-trained adapter.
    """
    path = adapter_dir / RUN_CONFIG
    recorded = read_json(path, flag="--adapter") if path.is_file() else None
    quantized = recorded.get("quantize") if isinstance(recorded, dict) else None
    if base == "dequantized" and quantized is False:
        raise InputError(f"--base dequantized: {path} says the adapter was trained on the full-precision base "
                         "(quantize: false), which dequantized NF4 weights are not; merge with --base original")
    if base == "original" and quantized is True:
        logger.warning("--base original: %s says the adapter was trained on the 4-bit base; the merged model "
                       "differs slightly from the trained one (--base dequantized reproduces it)", path)


def _write_weights(plan: MergePlan, staging: Path, dtype: torch.dtype, *, progress: bool) -> tuple[int, int]:
    """Write one output safetensors file per base file (+ index when sharded); return (files, bytes)."""
    shards = plan.shards
    names = [SAFE_WEIGHTS] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map, nbytes = {}, 0
    with tqdm(total=len(plan.info_by_key), unit="tensor", desc="merge", **({} if progress else {"disable": True})) as bar:
        for shard, name in zip(shards, names, strict=True):
            bar.set_postfix_str(shard.name)
            tensors = _merged_shard(plan, shard, dtype, bar)
            save_file(tensors, staging / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            nbytes += sum(tensor.nbytes for tensor in tensors.values())
            del tensors  # the next shard's tensors replace these: one shard in memory at a time
    if len(shards) > 1:
        index = {"metadata": {"total_size": nbytes}, "weight_map": dict(sorted(weight_map.items()))}
        (staging / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return len(shards), nbytes


def _merged_shard(plan: MergePlan, shard: Path, dtype: torch.dtype, bar: tqdm) -> dict[str, torch.Tensor]:
    """The output tensors of one base file."""
    tensors = {}
    # pread, not mmap: mapped pages we touched would stay resident (and in RSS) until the file is closed.
    with safe_open(shard, framework="pt", device="cpu", backend="pread") as handle:
        for key in plan.keys_in(shard):
            tensors[key] = _merged_tensor(plan, key, handle.get_tensor(key), dtype)
            bar.update()
    return tensors


def _merged_tensor(plan: MergePlan, key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One output tensor: replaced, NF4 round trip, LoRA delta, cast; refuses NaN/Inf naming the tensor."""
    if key in plan.replacement_by_key:  # a trained full copy (modules_to_save): used as is, never NF4-rounded
        tensor = plan.replacement_by_key[key]
    elif key in plan.nf4_by_key:
        tensor = nf4_round_trip(tensor, plan.nf4_by_key[key])
    if not tensor.is_floating_point():
        return tensor
    if key in plan.lora_by_key:
        tensor = merge_lora(tensor, plan.lora_by_key[key])
    output = tensor.to(dtype).contiguous()
    if not is_finite(output):
        overflow = dtype == torch.float16 and is_finite(tensor)
        raise InputError(f"merged tensor {key} " + (
            "overflows float16 (|value| > 65504); use --dtype bfloat16 or float32" if overflow else
            "has NaN/Inf values; check the adapter and the base weights"))
    return output


def _write_config(plan: MergePlan, staging: Path, dtype: str) -> None:
    """config.json for the merged weights (no quantization_config, the chosen dtype), generation config,
    tokenizer files."""
    config = {k: v for k, v in plan.config.items() if k not in ("quantization_config", "torch_dtype")}
    config["dtype"] = dtype
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copied = [name for name in SIDE_FILES if (plan.base_dir / name).is_file()]
    for name in copied:
        shutil.copy2(plan.base_dir / name, staging / name)
    if "generation_config.json" not in copied:
        GenerationConfig.from_model_config(plan.model_config).save_pretrained(staging)
    logger.info("copied from the base: %s", ", ".join(copied) or "nothing")
