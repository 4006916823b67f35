"""Model loading and LoRA: the stack quirks of docs/STACK.md, each pinned by a test."""

import pytest
import torch
from safetensors import safe_open

from lora_ogpsa.models.loading import (
    attach_lora,
    is_quantized,
    load_adapter,
    load_base_model,
    load_tokenizer,
    lora_config,
    lora_parameters,
)
from lora_ogpsa.utils.errors import InputError


def _batch(model_dir):
    tokenizer = load_tokenizer(model_dir)
    encoded = tokenizer(["The capital of France is Paris.", "Two plus two is four."], return_tensors="pt",
                        padding=True)
    return {**encoded, "labels": encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)}


def _lora_grads(model, batch):
    model.zero_grad()
    model(**batch).loss.backward()
    return {name: p.grad.clone() for name, p in lora_parameters(model).items()}


def test_cpu_repack_is_disabled_so_eval_forwards_do_not_corrupt_gradients(tiny_model_dir):
    import bitsandbytes as bnb

    model = attach_lora(load_base_model(tiny_model_dir, quantize=True), lora_config(r=4), seed=0,
                        gradient_checkpointing=False)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(not layer.support_avx512bf16_for_cpu for layer in layers)
    batch = _batch(tiny_model_dir)
    model.train()
    before = _lora_grads(model, batch)
    model.eval()
    with torch.no_grad():
        model(**batch)  # on AVX512-BF16 CPUs this repacked the weights in place
    model.train()
    after = _lora_grads(model, batch)
    assert all(torch.allclose(before[name], after[name], rtol=1e-5, atol=1e-7) for name in before)


def test_gradient_checkpointing_on_4bit_base_gives_nonzero_lora_gradients(tiny_model_dir):
    model = attach_lora(load_base_model(tiny_model_dir, quantize=True), lora_config(r=4), seed=0,
                        gradient_checkpointing=True)
    assert is_quantized(model) and model.is_gradient_checkpointing
    model.train()
    grads = _lora_grads(model, _batch(tiny_model_dir))
    assert all(grads[name].abs().sum() > 0 for name in grads if ".lora_B." in name)


def test_lora_tensors_stay_float32_through_trl(tiny_model_dir, tmp_path):
    from lora_ogpsa.train.settings import TrainSettings
    from lora_ogpsa.train.trainers import build_trainer

    model = attach_lora(load_base_model(tiny_model_dir, quantize=True), lora_config(r=4), seed=0,
                        gradient_checkpointing=False)
    before = {name: p.detach().clone() for name, p in lora_parameters(model).items()}
    rows = [{"prompt": "What is 2+2?", "completion": "4"}] * 4
    settings = TrainSettings(model=tiny_model_dir, output=tmp_path / "o", max_steps=1, max_length=32)
    trainer = build_trainer("sft", model, load_tokenizer(tiny_model_dir), rows, settings, tmp_path / "o", [])
    after = lora_parameters(trainer.model)
    assert all(p.dtype == torch.float32 and torch.equal(p.detach(), before[name]) for name, p in after.items())


def test_lora_parameter_names_are_the_adapter_file_keys(tiny_model_dir, tmp_path):
    model = attach_lora(load_base_model(tiny_model_dir, quantize=False), lora_config(r=2), seed=0,
                        gradient_checkpointing=False)
    model.save_pretrained(str(tmp_path))
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle:
        assert set(handle.keys()) == set(lora_parameters(model))
    loaded = load_adapter(load_base_model(tiny_model_dir, quantize=False), tmp_path, trainable=True)
    assert set(lora_parameters(loaded)) == set(lora_parameters(model))


def test_loading_errors_are_input_errors(tiny_model_dir, tmp_path):
    with pytest.raises(InputError, match="no such directory"):
        load_base_model(tmp_path / "missing", quantize=False)
    with pytest.raises(InputError, match=r"no adapter_config\.json"):
        load_adapter(load_base_model(tiny_model_dir, quantize=False), tmp_path, trainable=False)
    with pytest.raises(InputError, match="--lora-r must be >= 1"):
        lora_config(r=0)
