"""The model card (`README.md`) of an adapter directory: what it is, how it was made, how to load it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lora_ogpsa.subspace import Subspace

_EVAL_LABELS = {
    "harmful_refusal_rate": "harmful prompts refused (HarmBench)",
    "over_refusal_rate": "benign prompts refused (over-refusal)",
    "utility_accuracy": "utility accuracy",
    "benign_nll": "NLL of the base model's benign answers",
}


def write_model_card(path: Path, *, run_config: Mapping[str, Any], subspace: Subspace | None,
                     metrics: Sequence[Mapping[str, Any]] = (), evaluation: Mapping[str, float] | None = None,
                     source: str | None = None) -> None:
    """Write the card: base model, method and settings, reference set, k summary, training and eval numbers."""
    sections = [_header(run_config, source), _settings(run_config), _reference(run_config, subspace),
                _training(metrics), _evaluation(evaluation), _usage(run_config)]
    path.write_text("\n\n".join(section for section in sections if section) + "\n")


def _header(run_config: Mapping[str, Any], source: str | None) -> str:
    stage = run_config.get("stage", "adapter")
    mode = run_config.get("ogpsa", {}).get("project", "?")
    method = "plain LoRA (no projection)" if mode == "none" else f"OGPSA, `{mode}` mode"
    lines = ["---", "library_name: peft", "tags: [lora, safety, ogpsa, lora-ogpsa]", "---", "",
             f"# Safety adapter ({stage}, {method})", "",
             f"A LoRA adapter trained with [lora-ogpsa](https://github.com/) by {stage.upper()} on safety data. "
             "OGPSA removes from every safety update the low-rank subspace that the reference (general-capability) "
             "loss is most sensitive to, so that, to first order, the update does not move the reference loss.", "",
             f"- base model: `{run_config.get('model', '?')}`",
             f"- 4-bit (NF4) base during training: {run_config.get('quantize', '?')}"]
    if source:
        lines.append(f"- exported from: `{source}`")
    return "\n".join(lines)


def _settings(run_config: Mapping[str, Any]) -> str:
    if not run_config:
        return ""
    rows = [(key, value) for key, value in sorted(run_config.items()) if not isinstance(value, dict)]
    rows += [(f"ogpsa.{key}", value) for key, value in sorted(run_config.get("ogpsa", {}).items())]
    body = "\n".join(f"| {key} | `{value}` |" for key, value in rows)
    return f"## Settings\n\n| setting | value |\n|---|---|\n{body}"


def _reference(run_config: Mapping[str, Any], subspace: Subspace | None) -> str:
    lines = ["## Reference set and subspace", "",
             f"- reference data: `{run_config.get('reference', '?')}` "
             f"({run_config.get('reference_rows', '?')} examples used, hash `{run_config.get('reference_hash', '?')}`)"]
    if subspace is None:
        lines.append("- no subspace (plain LoRA, or exported without the sidecar)")
        return "\n".join(lines)
    summary = subspace.summary()
    lines += [f"- subspace of step {subspace.metadata.get('step', '?')}: k per tensor min/median/max "
              f"{summary['k_min']}/{summary['k_median']:g}/{summary['k_max']} over {summary['tensors']} tensors "
              f"({summary['k_zero']} with k = 0), {summary['directions']} directions, {summary['megabytes']:.1f} MiB",
              "- `ogpsa_subspace.safetensors` holds one `(k, numel)` orthonormal basis per adapter tensor (same key "
              "as in `adapter_model.safetensors`): continue training under the same constraint with "
              "`lora-ogpsa ... --adapter DIR`."]
    return "\n".join(lines)


def _training(metrics: Sequence[Mapping[str, Any]]) -> str:
    steps = [row for row in metrics if "loss" in row]
    if not steps:
        return ""
    first, last = steps[0], steps[-1]
    lines = ["## Training", "", f"- optimizer steps: {last.get('step', '?')}",
             f"- loss: {first['loss']:.4f} (first logged) → {last['loss']:.4f} (last)"]
    fractions = [row["ogpsa/span_fraction"] for row in steps if "ogpsa/span_fraction" in row]
    if fractions:
        lines.append(f"- share of the update's energy removed by the projection: mean {sum(fractions) / len(fractions):.3f}")
    return "\n".join(lines)


def _evaluation(evaluation: Mapping[str, float] | None) -> str:
    if not evaluation:
        return ""
    rows = "\n".join(f"| {_EVAL_LABELS.get(key, key)} | {value:.4g} |" for key, value in evaluation.items()
                     if isinstance(value, int | float))
    return f"## Evaluation\n\n| metric | value |\n|---|---|\n{rows}"


def _usage(run_config: Mapping[str, Any]) -> str:
    base = run_config.get("model", "BASE_MODEL")
    return ("## Usage\n\n```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f"base = AutoModelForCausalLM.from_pretrained(\"{base}\")\n"
            "model = PeftModel.from_pretrained(base, \"THIS_DIRECTORY\")\n```\n\n"
            f"or merge it: `lora-ogpsa merge --model {base} --adapter THIS_DIRECTORY --output MERGED`.")
