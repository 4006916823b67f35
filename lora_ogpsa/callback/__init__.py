"""The trainer callback: `OGPSACallback` routes trainer events to its parts (see `router`)."""

from lora_ogpsa.callback.router import OGPSACallback

__all__ = ["OGPSACallback"]
