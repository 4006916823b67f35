"""Loading base models and LoRA adapters."""
