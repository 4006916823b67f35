"""Model cards: `write_model_card` describes an adapter directory (what it is, how it was made, how to load
it), `write_merged_card` a merged model. `train.stage_files` writes a card into every checkpoint."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lora_ogpsa.core.subspace import Subspace
from lora_ogpsa.utils.files import (
    CARD_FILE,
)

_EVAL_LABELS = {
    "harmful_refusal_rate": "harmful prompts refused (HarmBench)",
    "over_refusal_rate": "benign prompts refused (over-refusal)",
    "dangerous_sounding_refusal_rate": "held-out dangerous-sounding benign prompts refused",
    "utility_accuracy": "utility accuracy",
    "benign_nll": "NLL of the base model's benign answers",
}


def write_model_card(path: Path, *, run_config: Mapping[str, Any], subspace: Subspace | None,
                     metrics: Sequence[Mapping[str, Any]] = (), evaluation: Mapping[str, float] | None = None,
                     source: str | None = None, earlier_stages: Sequence[Mapping[str, Any]] = ()) -> None:
    """Write the card (`huggingface_hub.ModelCard`): metadata the Hub reads (`base_model`, `library_name: peft`,
    `pipeline_tag`, tags, evaluation numbers as `model-index`), then every training stage with its effective
    LoRA and OGPSA settings, the reference set and subspace, training and evaluation numbers, and usage.

    Args:
        earlier_stages: the run configs of stages before this one (`align`'s SFT stage), described first.
    """
    from huggingface_hub import ModelCard

    stages = [*earlier_stages, run_config]
    sections = [_title(run_config, stages, source), *(_stage(stage) for stage in stages),
                _reference(run_config, subspace), _training(metrics), _evaluation(evaluation),
                _usage(run_config), _quantization(run_config), _settings(run_config)]
    body = "\n\n".join(section for section in sections if section)
    card_data = _card_data(run_config, stages, evaluation)
    ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}\n").save(path)


def base_model_of(run_config: Mapping[str, Any]) -> str:
    """What the adapter is applied to: the Hub ID or absolute path it was trained on (`base_model_id`)."""
    return str(run_config.get("base_model_id") or run_config.get("model") or "BASE_MODEL")


def effective_lora(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The LoRA settings in force, defaults resolved (alpha 2·r when not given, every linear layer)."""
    r = run_config.get("lora_r", 16)
    alpha = run_config.get("lora_alpha") or 2 * r
    scaling = alpha / r ** 0.5 if run_config.get("use_rslora") else alpha / r
    return {"r": r, "lora_alpha": alpha, "scaling": scaling, "lora_dropout": run_config.get("lora_dropout"),
            "target_modules": run_config.get("lora_target_modules") or "all-linear",
            "use_rslora": bool(run_config.get("use_rslora")), "use_dora": bool(run_config.get("use_dora"))}


def _card_data(run_config: Mapping[str, Any], stages: Sequence[Mapping[str, Any]],
               evaluation: Mapping[str, float] | None):
    from huggingface_hub import EvalResult, ModelCardData

    kinds = [str(stage.get("stage", "sft")) for stage in stages]
    results = [EvalResult(task_type="text-generation", dataset_type="lora-ogpsa-demo", dataset_name=_EVAL_LABELS[key],
                          metric_type=key, metric_value=float(value))
               for key, value in (evaluation or {}).items() if key in _EVAL_LABELS and isinstance(value, int | float)]
    return ModelCardData(base_model=base_model_of(run_config), library_name="peft", pipeline_tag="text-generation",
                         tags=["lora", *dict.fromkeys(kinds), "trl", "ogpsa", "lora-ogpsa", "safety"],
                         model_name=f"lora-ogpsa {'→'.join(kinds)} adapter" if results else None,
                         eval_results=results or None)


def _title(run_config: Mapping[str, Any], stages: Sequence[Mapping[str, Any]], source: str | None) -> str:
    kinds = " → ".join(str(stage.get("stage", "adapter")).upper() for stage in stages)
    lines = [f"# Safety adapter ({kinds})", "",
             f"A LoRA adapter for `{base_model_of(run_config)}`, trained with lora-ogpsa (Python package "
             f"`lora-ogpsa`) by {kinds} on safety data. OGPSA removes from every safety update the low-rank "
             "subspace that the reference (general-capability) loss is most sensitive to, so that, to first "
             "order, the update does not move the reference loss.", "",
             f"- base model: `{base_model_of(run_config)}` (4-bit NF4 during training: "
             f"{run_config.get('quantize', '?')})"]
    if source:
        lines.append(f"- exported from: `{source}`")
    return "\n".join(lines)


def _stage(run_config: Mapping[str, Any]) -> str:
    if not run_config:
        return ""
    ogpsa = run_config.get("ogpsa", {})
    mode = ogpsa.get("project", "?")
    method = "plain LoRA (no projection)" if mode == "none" else (
        f"OGPSA, `{mode}` mode, k ≤ {ogpsa.get('max_directions')}, energy {ogpsa.get('energy')}, refresh every "
        f"{ogpsa.get('refresh_every')} steps, {ogpsa.get('reference_examples')} reference examples")
    lora = ", ".join(f"{key} {value}" for key, value in effective_lora(run_config).items())
    steps = run_config.get("max_steps")
    return "\n".join([f"## Stage: {str(run_config.get('stage', '?')).upper()}", "",
                      f"- data: `{run_config.get('training_source', '?')}` ({run_config.get('training_rows', '?')} "
                      "rows)",
                      f"- method: {method}", f"- LoRA: {lora}",
                      f"- learning rate {run_config.get('learning_rate')}, batch {run_config.get('batch_size')}, "
                      f"{'epochs' if steps == -1 else 'steps'} "
                      f"{run_config.get('training_arguments', {}).get('num_train_epochs', 3) if steps == -1 else steps}"
                      + (f", DPO beta {run_config.get('beta')}" if run_config.get("stage") == "dpo" else ""),
                      *([f"- continues the adapter `{_final_path(run_config['continued_adapter'])}` (DPO's reference "
                         "model: the base with that adapter, frozen)"] if run_config.get("continued_adapter") else [])])


def _final_path(path: str) -> str:
    """An adapter path as it reads once its run is finished (`OUT.partial/sft` → `OUT/sft`)."""
    from pathlib import PurePath

    return str(PurePath(*(part.removesuffix(".partial") for part in PurePath(path).parts)))


def _settings(run_config: Mapping[str, Any]) -> str:
    if not run_config:
        return ""
    resolved = {**run_config, **{key: value for key, value in effective_lora(run_config).items()
                                 if key in run_config and run_config[key] is None}}  # lora_alpha None → 2·r
    rows = [(key, value) for key, value in sorted(resolved.items()) if not isinstance(value, dict)]
    rows += [(f"{group}.{key}", value) for group in ("ogpsa", "training_arguments")
             for key, value in sorted(run_config.get(group, {}).items())]
    body = "\n".join(f"| {key} | `{value}` |" for key, value in rows)
    return f"## All settings (last stage)\n\n| setting | value |\n|---|---|\n{body}"


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
    base = base_model_of(run_config)
    return ("## Usage\n\n```python\nfrom peft import AutoPeftModelForCausalLM\nfrom transformers import "
            "AutoTokenizer\n\n"
            "model = AutoPeftModelForCausalLM.from_pretrained(\"THIS_DIRECTORY\")  # loads the base it names\n"
            "tokenizer = AutoTokenizer.from_pretrained(\"THIS_DIRECTORY\")  # saved with the chat template\n```\n\n"
            f"or merge it: `lora-ogpsa merge --model {base} --adapter THIS_DIRECTORY --output MERGED`. "
            "`ogpsa_subspace.safetensors` is only needed to continue training under the same constraint; leave "
            "it out when publishing (`lora-ogpsa export --no-subspace`).")


def _quantization(run_config: Mapping[str, Any]) -> str:
    """The exact 4-bit base the adapter was trained on, and a snippet that recreates it: a plain
    `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")` (no double quantization) gives other
    weights, so PEFT on it is another model than the one trained and merged."""
    if not run_config.get("quantize"):
        return ""
    from lora_ogpsa.models.loading import default_device, nf4_config

    device = default_device()
    dtype = str(nf4_config(device).bnb_4bit_compute_dtype).removeprefix("torch.")
    snippet = ("import torch\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, "
               "BitsAndBytesConfig\n\n"
               'quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", '
               f"bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.{dtype})\n"
               f'base = AutoModelForCausalLM.from_pretrained("{base_model_of(run_config)}", '
               "quantization_config=quantization, dtype=torch.float32)\n"
               'model = PeftModel.from_pretrained(base, "THIS_DIRECTORY")')
    return ("## The 4-bit base it was trained on\n\n"
            f"NF4 with double quantization, compute dtype {dtype}, bitsandbytes' default uint8 storage "
            f"(lora-ogpsa computes in bfloat16 on a CUDA device that supports it, in float32 otherwise; this card "
            f"was written on {device.type}). A 4-bit base without double quantization is another model. "
            f"The same base:\n\n```python\n{snippet}\n```\n\n"
            "`lora-ogpsa merge --base dequantized` merges into these 4-bit weights, dequantized.")


def write_merged_card(path: Path, *, base_model: str, adapter_dir: Path, base: str, dtype: str,
                      max_logit_diff: float | None) -> None:
    """The card of a merged model: `base_model_relation: merge`, and the adapter's own card below."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(base_model=base_model, base_model_relation="merge", library_name="transformers",
                         pipeline_tag="text-generation", tags=["lora-ogpsa", "ogpsa", "safety", "merge"])
    audit = "not run" if max_logit_diff is None else f"max logit difference {max_logit_diff:.2e} vs base + adapter"
    body = (f"# Merged model\n\n`{base_model}` with the LoRA adapter `{adapter_dir}` merged into its weights by "
            f"`lora-ogpsa merge` (delta added in float32 to the {base} weights, saved as {dtype}; audit: {audit}).")
    adapter_card = Path(adapter_dir) / CARD_FILE
    if adapter_card.is_file():
        text = ModelCard.load(adapter_card).text.strip()
        body += "\n\n## The adapter\n\n" + text.replace("\n## ", "\n### ").removeprefix("# ")
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n").save(path)
