"""lora_ogpsa: safety alignment with LoRA/QLoRA and Orthogonal Gradient Projection (OGPSA).

The public API is small: the config, the subspace math, the trainer callback and the builder of its reference
batches. Everything else is reached through the `lora-ogpsa` command. `OGPSACallback` and
everything is imported lazily: `import lora_ogpsa` loads no torch (the command's signal handling starts
before the heavy imports, `lora_ogpsa.entry`), and the math needs only torch.
"""

import logging
from typing import Any

__all__ = ["OGPSACallback", "OGPSAConfig", "ReferenceSet", "Subspace", "build_lookalike_set", "build_reference_set",
           "compute_subspace", "project_out"]
__version__ = "0.1.0"


class _DropOptionalKernelNotice(logging.Filter):
    """bitsandbytes warns at import (peft imports it) that an optional CPU kernel package is missing; that
    changes nothing here, and the warning would greet every command."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropOptionalKernelNotice())


def __getattr__(name: str) -> Any:
    if name == "OGPSAConfig":
        from lora_ogpsa.config import OGPSAConfig

        return OGPSAConfig
    if name == "project_out":
        from lora_ogpsa.core.projector import project_out

        return project_out
    if name in ("Subspace", "compute_subspace"):
        from lora_ogpsa.core import subspace

        return getattr(subspace, name)
    if name == "OGPSACallback":
        from lora_ogpsa.callback.router import OGPSACallback

        return OGPSACallback
    if name in ("ReferenceSet", "build_lookalike_set", "build_reference_set"):
        from lora_ogpsa.signals import reference
        return getattr(reference, name)
    raise AttributeError(f"module 'lora_ogpsa' has no attribute {name!r}")
