"""The refusal detector under its contract name (`lora_ogpsa.refusal.is_refusal`); it lives in `eval.refusal`."""

from lora_ogpsa.eval.refusal import is_refusal

__all__ = ["is_refusal"]
