"""The base's layer shapes read from its safetensors headers, and the checks built on them (issue 26 B)."""

import json
import shutil

import pytest
from peft import get_peft_model

from lora_ogpsa.models.loading import load_base_model, lora_config
from lora_ogpsa.models.shapes import check_adapter_fits, check_lora_targets, linear_shapes
from lora_ogpsa.testing.tiny import save_tiny_model
from lora_ogpsa.utils.errors import InputError


def test_linear_shapes_are_the_models_linear_layers(tiny_model_dir):
    shapes = linear_shapes(tiny_model_dir)
    # the tiny Llama: hidden 64, 4 heads of 16 with 2 KV heads, MLP 128; embeddings and lm_head are no targets
    assert shapes["model.layers.0.self_attn.q_proj"] == (64, 64)
    assert shapes["model.layers.0.self_attn.k_proj"] == (32, 64)
    assert shapes["model.layers.1.mlp.down_proj"] == (64, 128)
    assert not any("embed" in name or "lm_head" in name for name in shapes) and len(shapes) == 2 * 7
    assert linear_shapes(tiny_model_dir, with_embeddings=True)["lm_head"][1] == 64


def test_a_pre_quantized_base_gives_no_shapes(tiny_model_dir, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "quantization_config": {"load_in_4bit": True}}))
    assert linear_shapes(model) == {}
    check_lora_targets(model, ["nonexistent_proj"], 4096)  # packed shapes say nothing: PEFT's checks stand


def test_an_adapter_fits_its_own_base_and_not_a_wider_one(tiny_model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    model = get_peft_model(load_base_model(tiny_model_dir, quantize=False, device="cpu"),
                           lora_config(r=2, target_modules=["q_proj", "lm_head"]))
    model.save_pretrained(adapter)
    check_adapter_fits(tiny_model_dir, adapter)  # lm_head LoRA included
    wide = save_tiny_model(tmp_path / "wide", hidden=96)
    with pytest.raises(InputError, match=r"--adapter .*adapter: its lm_head is \d+ x 64, --model .*wide has \d+ x 96"):
        check_adapter_fits(wide, adapter)
