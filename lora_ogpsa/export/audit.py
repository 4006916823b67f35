"""Check a merged model against what it must reproduce: base + adapter, unmerged, on fixed token inputs.

The reference is the model the adapter is used with: the full-precision base + adapter for `original`, the
4-bit NF4 base (`load_base_model(quantize=True)`) + adapter for `dequantized`. Both models run on the CPU in
float32 (the merged one is upcast on load), one after the other, so the audit holds one model at a time and
only the rounding of the merged *weights* to the output dtype separates the two — not bf16 activations.

Tolerance = RELATIVE_TOLERANCE[(mode, dtype)] · max(1, max |reference logit|). Measured on SmolLM2-135M-Instruct
(30 layers, logit scale ~34) with a random r=16 all-linear adapter whose effect on the logits is 2.2; relative
differences below are max |diff| / logit scale:
- float32: merged and unmerged compute the same function in another order, W·x + s·B(A·x) vs (W + s·BA)·x, so
  they differ by float32 rounding only: measured 2.2e-6 (original) and 2.4e-6 (dequantized). 1e-5 leaves ~5×
  headroom and still flags any real merge error, which moves the logits by the adapter's effect (here 6e-2 of
  the scale). `dequantized` gets 2e-5: its 4-bit reference multiplies through bitsandbytes' CPU path (its own
  kernel where one is installed), a third summation order.
- bfloat16 / float16: every weight is rounded to 8 / 11 significant bits (relative error up to 2^-9 / 2^-12);
  the errors add up over the layers like noise: measured 6e-3 and 1.2e-2 (bf16; original, dequantized) and
  1.0e-3 (fp16). 4e-2 and 1e-2 leave 3-10× headroom, so a half-precision audit catches gross errors only (a
  missing, transposed or wildly scaled delta); for a tight check, merge in float32.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from lora_ogpsa.models.loading import load_adapter, load_base_model

logger = logging.getLogger(__name__)

AUDIT_BATCH, AUDIT_LENGTH, AUDIT_SEED = 2, 16, 0
RELATIVE_TOLERANCE = {
    ("original", "float32"): 1e-5, ("dequantized", "float32"): 2e-5,
    ("original", "bfloat16"): 4e-2, ("dequantized", "bfloat16"): 4e-2,
    ("original", "float16"): 1e-2, ("dequantized", "float16"): 1e-2,
}


class MergeAuditError(RuntimeError):
    """The merged model does not reproduce base + adapter (the command exits 1 and leaves nothing behind)."""


@dataclass(frozen=True)
class AuditResult:
    """Max abs logit difference between the merged model and base + adapter, and what it was held to."""

    max_logit_diff: float
    logit_scale: float  # max |reference logit|
    tolerance: float


def audit_tolerance(base: str, dtype: str, logit_scale: float) -> float:
    """The largest max-abs logit difference accepted for this merge mode and output dtype (module docstring)."""
    return RELATIVE_TOLERANCE[(base, dtype)] * max(1.0, logit_scale)


def audit_inputs(vocab_size: int) -> torch.Tensor:
    """Fixed random token ids, (AUDIT_BATCH, AUDIT_LENGTH): the same for every audit of the same vocabulary."""
    generator = torch.Generator().manual_seed(AUDIT_SEED)
    return torch.randint(0, vocab_size, (AUDIT_BATCH, AUDIT_LENGTH), generator=generator)


def audit_merge(merged_dir: Path, base_dir: Path, adapter_dir: Path, *, base: str, dtype: str,
                vocab_size: int) -> AuditResult:
    """Run the merged model and base + adapter on `audit_inputs`; raise when they differ beyond tolerance.

    Args:
        merged_dir: the merged model directory (loaded with `AutoModelForCausalLM.from_pretrained`).
        base_dir, adapter_dir: the merge inputs.
        base: "original" (full-precision reference) or "dequantized" (4-bit NF4 reference).
        dtype: the merged model's dtype name, for the tolerance.
        vocab_size: the token id range of the fixed inputs.

    Returns:
        The measured difference and the tolerance it passed.

    Raises:
        MergeAuditError: the merged checkpoint loads with missing/unexpected keys, or its logits differ.
    """
    input_ids = audit_inputs(vocab_size)
    reference = _reference_logits(base_dir, adapter_dir, quantize=base == "dequantized", input_ids=input_ids)
    merged = _merged_logits(merged_dir, input_ids)
    diff = float((merged - reference).abs().max())
    scale = float(reference.abs().max())
    result = AuditResult(diff, scale, audit_tolerance(base, dtype, scale))
    logger.info("audit: max |logit diff| %.3g (logit scale %.3g, tolerance %.3g)", diff, scale, result.tolerance)
    if not diff <= result.tolerance:  # also catches NaN
        raise MergeAuditError(f"merge audit failed: the merged model's logits differ from base + adapter by "
                              f"{diff:.3g} (tolerance {result.tolerance:.3g} for --base {base} --dtype {dtype}); "
                              "nothing was written")
    return result


def _reference_logits(base_dir: Path, adapter_dir: Path, *, quantize: bool, input_ids: torch.Tensor) -> torch.Tensor:
    model = load_adapter(load_base_model(base_dir, quantize=quantize, device="cpu"), adapter_dir, trainable=False)
    try:
        return _logits(model, input_ids)
    finally:
        del model
        gc.collect()  # free the reference before the merged model loads: one model in memory at a time


def _merged_logits(merged_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    model, info = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32, trust_remote_code=False,
                                                       output_loading_info=True)
    try:
        problems = {kind: sorted(keys)[:3] for kind, keys in info.items() if keys}
        if problems:
            raise MergeAuditError(f"merge audit failed: the merged checkpoint does not load cleanly ({problems})")
        return _logits(model, input_ids)
    finally:
        del model
        gc.collect()


@torch.no_grad()
def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits.float()  # (B, T, V)
