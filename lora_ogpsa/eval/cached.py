"""Cached evaluations of one base model on one set of suites: the base, adapters on it (also with their delta
scaled by λ), and merged models, each cached by the hash of its weights, the suites and λ (the demo, `compare`
and `calibrate` all evaluate through it)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from lora_ogpsa.utils.files import ADAPTER_FILE, file_sha256, write_json

logger = logging.getLogger(__name__)

LAMBDAS = (0.25, 0.5, 0.75)
"""The interior points of the λ-curve (λ = 0 is the base, λ = 1 the final adapter): W + λ·ΔW, the WiSE-FT /
model-averaging baseline (Lin et al. 2024), which costs no training."""


_LOGGED = {"harmful_refusal_rate": "harmful refused", "dangerous_sounding_refusal_rate": "look-alike benign refused",
           "over_refusal_rate": "benign refused", "utility_accuracy": "utility"}


class Evaluator:
    """Evaluates the base, adapters on it, and merged models, caching results per weights file."""

    def __init__(self, model_path: Path, suites, max_new_tokens: int, batch_size: int, cache: Path) -> None:
        self.model_path, self.suites, self.cache = model_path, suites, cache
        self.kwargs = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "keep_responses": True}
        self._base = None
        self._tokenizer = None
        key = json.dumps([dataclasses.asdict(suites), max_new_tokens, "v2"], sort_keys=True, default=str)
        self.suites_key = hashlib.sha256(key.encode()).hexdigest()[:12]

    def trajectory(self, run_dir: Path, stages: str) -> list[dict[str, Any]]:
        """Metrics of every saved checkpoint (`align`: SFT's, then DPO's) and of the final adapter; `stages` is
        the training command (`sft`, `dpo` or `align`)."""
        points = []
        for stage, directory in ([(stages, run_dir)] if stages != "align" else [("sft", run_dir / "sft"),
                                                                                 ("dpo", run_dir / "dpo")]):
            checkpoints = sorted(directory.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
            points += [self.evaluate(path, f"{stage}-{path.name.split('-')[1]}") for path in checkpoints]
        return [*points, self.evaluate(run_dir, "final")]

    def lambda_curve(self, run_dir: Path, base: dict[str, Any], final: dict[str, Any],
                     lambdas: tuple[float, ...] = LAMBDAS) -> list[dict[str, Any]]:
        """The final adapter with its delta scaled by λ ∈ {0, *lambdas, 1}, in λ order: no retraining. A λ above 1
        amplifies the delta (the curve continues past the trained model)."""
        inner = [{**self.evaluate(run_dir, f"λ={scale:g}", scale=scale), "lambda": scale} for scale in lambdas]
        ends = [{**base, "label": "λ=0", "lambda": 0.0}, {**final, "label": "λ=1", "lambda": 1.0}]
        return sorted([*ends, *inner], key=lambda point: point["lambda"])

    def evaluate(self, adapter: Path | None, label: str, *, merged: bool = False, scale: float = 1.0) -> dict[str, Any]:
        """Metrics of base (+ adapter · scale), or of a merged model directory; cached."""
        weights = None if adapter is None else (adapter / ("model.safetensors" if merged else ADAPTER_FILE))
        key = f"{'base' if weights is None else file_sha256(weights)[:16]}-{self.suites_key}"
        path = self.cache / (f"{key}.json" if scale == 1.0 else f"{key}-x{scale:g}.json")
        if path.is_file():
            return {**json.loads(path.read_text()), "label": label}
        metrics = self._run(adapter, merged, scale)
        self.cache.mkdir(parents=True, exist_ok=True)
        write_json(path, metrics)
        logger.info("evaluation: %s: %s", label, ", ".join(
            f"{name} {100 * metrics[key]:.0f}%" for key, name in _LOGGED.items() if metrics.get(key) is not None))
        return {**metrics, "label": label}

    def _run(self, adapter: Path | None, merged: bool, scale: float) -> dict[str, Any]:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
        from transformers import AutoModelForCausalLM

        from lora_ogpsa.eval.generation import evaluate_suites
        from lora_ogpsa.models.loading import load_tokenizer

        self._tokenizer = self._tokenizer or load_tokenizer(self.model_path)
        if merged:
            model = AutoModelForCausalLM.from_pretrained(adapter, dtype=torch.float32, trust_remote_code=False)
            return evaluate_suites(model, self._tokenizer, self.suites, **self.kwargs)
        base = self._base_model()
        if adapter is None:
            return evaluate_suites(base, self._tokenizer, self.suites, **self.kwargs)
        model = PeftModel.from_pretrained(base, str(adapter))
        layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
        originals = [layer.get_base_layer().weight.detach().clone() for layer in layers]
        for layer in layers:  # ΔW = s·B A: scaling s by λ scales the delta exactly
            layer.scaling = {name: value * scale for name, value in layer.scaling.items()}
        # W + λ·ΔW folded into the weights for the generation (a third faster on the CPU than the LoRA branch);
        # the exact original weights are put back afterwards, so every evaluation sees the same base
        model.merge_adapter()
        try:
            return evaluate_suites(model, self._tokenizer, self.suites, **self.kwargs)
        finally:
            with torch.no_grad():
                for layer, weight in zip(layers, originals, strict=True):
                    layer.get_base_layer().weight.copy_(weight)
                    layer.merged_adapters = []
            self._base = model.unload()  # the base without LoRA layers, for the next adapter

    def _base_model(self):
        if self._base is None:
            from lora_ogpsa.models.loading import load_base_model

            self._base = load_base_model(self.model_path, quantize=False)
        return self._base
