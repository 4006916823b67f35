"""lora_ogpsa: safety alignment with LoRA/QLoRA and Orthogonal Gradient Projection (OGPSA).

The public API is small: the config, the subspace math and the trainer callback. Everything else is reached
through the `lora-ogpsa` command.
"""

from lora_ogpsa.config import OGPSAConfig
from lora_ogpsa.projector import project_out
from lora_ogpsa.subspace import Subspace, compute_subspace

__all__ = ["OGPSAConfig", "Subspace", "compute_subspace", "project_out"]
__version__ = "0.1.0"
