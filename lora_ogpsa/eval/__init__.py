"""Evaluation: generation, metrics, prompt sets, intervals and `lora-ogpsa eval`."""
