"""merge_adapter: merged checkpoints reproduce base + adapter; bad inputs fail with one line and leave nothing.

A tiny random Llama saved in six safetensors shards is the base; adapters are made directly with PEFT (lora_B
filled with random values so the delta is not zero), on the full-precision base or on the 4-bit NF4 base.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

from lora_ogpsa.export import merge as merge_module
from lora_ogpsa.export.audit import MergeAuditError, audit_inputs
from lora_ogpsa.export.merge import lora_delta, merge_adapter, merge_lora, nf4_round_trip
from lora_ogpsa.export.plan import LoraPair, plan_merge
from lora_ogpsa.models.loading import load_adapter, load_base_model
from lora_ogpsa.testing.tiny import save_tiny_model, tiny_config
from lora_ogpsa.utils.errors import InputError

VOCAB = 384


def _fill_lora_b_(model, seed=0, std=0.05):
    """Random lora_B (PEFT starts it at zero), so the adapter changes the model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def _save_adapter(model, path, seed=0, **lora_kwargs):
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **lora_kwargs})
    peft_model = get_peft_model(model, config)
    _fill_lora_b_(peft_model, seed)
    peft_model.save_pretrained(path)
    return path


@torch.no_grad()
def _logits(model):
    model.eval()
    return model(input_ids=audit_inputs(model.config.vocab_size)).logits.float()


def _listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("base") / "tiny", max_shard_size="100KB")
    assert len(list(path.glob("model-*.safetensors"))) >= 4  # the point: a sharded base
    return path


@pytest.fixture(scope="module")
def adapter_dir(base_dir, tmp_path_factory):
    model = load_base_model(base_dir, quantize=False, device="cpu")
    return _save_adapter(model, tmp_path_factory.mktemp("adapter") / "lora")


@pytest.fixture(scope="module")
def qlora_adapter_dir(base_dir, tmp_path_factory):
    model = load_base_model(base_dir, quantize=True, device="cpu")
    return _save_adapter(model, tmp_path_factory.mktemp("qlora") / "lora", seed=1)


def _reference_logits(base_dir, adapter_dir, *, quantize):
    return _logits(load_adapter(load_base_model(base_dir, quantize=quantize, device="cpu"), adapter_dir,
                                trainable=False))


# ---- merged models reproduce base + adapter ----

def test_original_merge_reproduces_full_precision_base_plus_adapter(base_dir, adapter_dir, tmp_path):
    report = merge_adapter(base_dir, adapter_dir, tmp_path / "merged", progress=False)

    merged, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not any(info.values()), info
    reference = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir))
    assert float((_logits(merged) - reference).abs().max()) <= 1e-4
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == report.shards == len(list(base_dir.glob("model-*")))
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").encode("hello") == \
        AutoTokenizer.from_pretrained(base_dir).encode("hello")
    assert (tmp_path / "merged" / "generation_config.json").is_file()
    assert report.merged_tensors == 14 and report.dequantized_tensors == 0  # 7 linear layers × 2 blocks
    assert report.max_logit_diff <= report.tolerance <= 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # the staging directory is gone


def test_dequantized_merge_reproduces_the_4bit_model_it_was_trained_on(base_dir, qlora_adapter_dir, tmp_path):
    report = merge_adapter(base_dir, qlora_adapter_dir, tmp_path / "dequantized", base="dequantized",
                           progress=False)
    merge_adapter(base_dir, qlora_adapter_dir, tmp_path / "original", audit=False, progress=False)

    reference = _reference_logits(base_dir, qlora_adapter_dir, quantize=True)
    dequantized = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized"))
    original = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "original"))
    assert float((dequantized - reference).abs().max()) <= 1e-4
    assert float((original - reference).abs().max()) > 100 * float((dequantized - reference).abs().max())
    assert report.dequantized_tensors == 14
    assert "quantization_config" not in json.loads((tmp_path / "dequantized" / "config.json").read_text())


def test_nf4_round_trip_is_bit_exact_with_a_4bit_load(base_dir, adapter_dir):
    import bitsandbytes as bnb

    plan = plan_merge(base_dir, adapter_dir, dequantize=True)
    quantized = load_base_model(base_dir, quantize=True, device="cpu")
    for key, spec in plan.nf4_by_key.items():
        weight = quantized.get_parameter(key)
        with safe_open(plan.info_by_key[key].shard, framework="pt") as handle:
            ours = nf4_round_trip(handle.get_tensor(key), spec)
        assert torch.equal(ours, bnb.functional.dequantize_4bit(weight.data, weight.quant_state)), key
    # transformers keeps the output layer, embeddings and norms in full precision: so does the plan
    assert not any(k.startswith(("lm_head", "model.embed_tokens")) or "norm" in k for k in plan.nf4_by_key)
    assert len(plan.nf4_by_key) == 14


def test_peft_options_are_honoured(base_dir, tmp_path):
    """rslora, rank and alpha patterns, layers_to_transform and a modules_to_save output layer."""
    model = load_base_model(base_dir, quantize=False, device="cpu")
    adapter = _save_adapter(model, tmp_path / "lora", r=4, lora_alpha=6, use_rslora=True,
                            rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3}, layers_to_transform=[1],
                            modules_to_save=["lm_head"],
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"])
    weights = load_file(adapter / "adapter_model.safetensors")
    weights["base_model.model.lm_head.weight"] += 0.05  # a trained output layer, not the base's copy
    save_file(weights, adapter / "adapter_model.safetensors", metadata={"format": "pt"})

    report = merge_adapter(base_dir, adapter, tmp_path / "merged", progress=False)

    assert (report.merged_tensors, report.replaced_tensors) == (7, 1)
    reference = _reference_logits(base_dir, adapter, quantize=False)
    merged = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"))
    assert float((merged - reference).abs().max()) <= 1e-4


@pytest.mark.parametrize("base", ["original", "dequantized"])
def test_fan_in_fan_out_conv1d_base(tmp_path, base):
    """GPT-2 stores its Conv1D weights (in, out): the delta and the NF4 round trip are transposed."""
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    model = load_base_model(tmp_path / "gpt2", quantize=base == "dequantized", device="cpu")
    adapter = _save_adapter(model, tmp_path / "lora", target_modules=["c_attn", "c_proj", "c_fc"],
                            fan_in_fan_out=True)

    report = merge_adapter(tmp_path / "gpt2", adapter, tmp_path / "merged", base=base, progress=False)

    reference = _reference_logits(tmp_path / "gpt2", adapter, quantize=base == "dequantized")
    merged = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"))
    assert float((merged - reference).abs().max()) <= 1e-4
    assert (report.merged_tensors, report.dequantized_tensors) == (8, 8 if base == "dequantized" else 0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_output(base_dir, adapter_dir, tmp_path, dtype):
    report = merge_adapter(base_dir, adapter_dir, tmp_path / "merged", dtype=dtype, progress=False)

    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == dtype
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == getattr(torch, dtype)
    reference = _reference_logits(base_dir, adapter_dir, quantize=False)
    assert float((_logits(merged.float()) - reference).abs().max()) <= report.tolerance
    assert report.tolerance > 1e-4 and report.max_logit_diff <= report.tolerance


def test_lora_delta_matches_peft(base_dir):
    model = get_peft_model(load_base_model(base_dir, quantize=False, device="cpu"),
                           LoraConfig(r=4, lora_alpha=12, use_rslora=True, target_modules=["q_proj"]))
    _fill_lora_b_(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    lora_a, lora_b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    assert torch.equal(lora_delta(lora_a, lora_b, layer.scaling["default"]), layer.get_delta_weight("default"))
    assert torch.equal(lora_delta(lora_a, lora_b, 2.0, fan_in_fan_out=True), (lora_b @ lora_a).T * 2.0)
    assert layer.scaling["default"] == 12 / 2  # rslora: alpha / √r
    weight = layer.base_layer.weight.detach()
    for fan_in_fan_out, stored in ((False, weight), (True, weight.T.contiguous())):
        pair = LoraPair(lora_a, lora_b, 6.0, fan_in_fan_out)
        expected = stored + lora_delta(lora_a, lora_b, 6.0, fan_in_fan_out=fan_in_fan_out)
        torch.testing.assert_close(merge_lora(stored, pair), expected, rtol=1e-6, atol=1e-7)


# ---- failures: one InputError line (or MergeAuditError), nothing left behind ----

def _copy(directory: Path, target: Path) -> Path:
    shutil.copytree(directory, target)
    return target


def _expect_nothing_written(tmp_path, call, error=InputError, match=None):
    before = _listing(tmp_path)
    with pytest.raises(error, match=match) as caught:
        call()
    assert "\n" not in str(caught.value)
    assert _listing(tmp_path) == before


def test_output_directory_that_exists(base_dir, adapter_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    _expect_nothing_written(tmp_path, lambda: merge_adapter(base_dir, adapter_dir, tmp_path / "out"),
                            match="--output .*already exists")


def test_adapter_for_another_architecture(base_dir, tmp_path):
    deeper = AutoModelForCausalLM.from_config(tiny_config(VOCAB, layers=3))
    adapter = _save_adapter(deeper, tmp_path / "deeper")
    _expect_nothing_written(tmp_path, lambda: merge_adapter(base_dir, adapter, tmp_path / "out"),
                            match="another architecture")


def test_adapter_with_other_shapes(base_dir, tmp_path):
    narrower = AutoModelForCausalLM.from_config(tiny_config(VOCAB, hidden=32))
    adapter = _save_adapter(narrower, tmp_path / "narrow")
    _expect_nothing_written(tmp_path, lambda: merge_adapter(base_dir, adapter, tmp_path / "out"),
                            match="has shape .* other shapes")


def test_missing_shard(base_dir, adapter_dir, tmp_path):
    base = _copy(base_dir, tmp_path / "base")
    (base / "model-00002-of-00006.safetensors").unlink()
    _expect_nothing_written(tmp_path, lambda: merge_adapter(base, adapter_dir, tmp_path / "out"),
                            match="shard model-00002-of-00006.safetensors .* is missing")


def test_truncated_shard(base_dir, adapter_dir, tmp_path):
    base = _copy(base_dir, tmp_path / "base")
    shard = base / "model-00003-of-00006.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    _expect_nothing_written(tmp_path, lambda: merge_adapter(base, adapter_dir, tmp_path / "out"),
                            match="model-00003-of-00006.safetensors: .*truncated or corrupt")


def test_truncated_adapter(base_dir, adapter_dir, tmp_path):
    adapter = _copy(adapter_dir, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    _expect_nothing_written(tmp_path, lambda: merge_adapter(base_dir, adapter, tmp_path / "out"),
                            match="adapter_model.safetensors: .*truncated or corrupt")


def test_adapter_directory_without_config(base_dir, adapter_dir, tmp_path):
    adapter = _copy(adapter_dir, tmp_path / "adapter")
    (adapter / "adapter_config.json").unlink()
    _expect_nothing_written(tmp_path, lambda: merge_adapter(base_dir, adapter, tmp_path / "out"),
                            match="no adapter_config.json")


def test_adapter_tensors_its_config_does_not_cover_are_refused(base_dir, adapter_dir, tmp_path):
    adapter = _copy(adapter_dir, tmp_path / "adapter")
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = ["q_proj"]  # the weights file still holds every linear layer's delta
    config_path.write_text(json.dumps(config))
    _expect_nothing_written(tmp_path, lambda: merge_adapter(base_dir, adapter, tmp_path / "out"),
                            match="target_modules does not cover .* they would be dropped")


def test_base_without_safetensors(base_dir, adapter_dir, tmp_path):
    base = _copy(base_dir, tmp_path / "base")
    for path in base.glob("model*.safetensors*"):
        path.unlink()
    _expect_nothing_written(tmp_path, lambda: merge_adapter(base, adapter_dir, tmp_path / "out"),
                            match="no model.safetensors or model.safetensors.index.json")


def test_prequantized_base(base_dir, adapter_dir, tmp_path):
    base = _copy(base_dir, tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "quantization_config": {"load_in_4bit": True}}))
    _expect_nothing_written(tmp_path, lambda: merge_adapter(base, adapter_dir, tmp_path / "out"),
                            match="quantization_config")


def test_dora_is_refused(base_dir, tmp_path):
    adapter = _save_adapter(load_base_model(base_dir, quantize=False, device="cpu"), tmp_path / "dora",
                            use_dora=True)
    _expect_nothing_written(tmp_path, lambda: merge_adapter(base_dir, adapter, tmp_path / "out"),
                            match="`use_dora` is True")


@pytest.mark.parametrize(("kwargs", "match"), [({"dtype": "int8"}, "--dtype must be one of"),
                                               ({"base": "nf4"}, "--base must be one of")])
def test_bad_mode_or_dtype(base_dir, adapter_dir, tmp_path, kwargs, match):
    _expect_nothing_written(tmp_path, lambda: merge_adapter(base_dir, adapter_dir, tmp_path / "out", **kwargs),
                            match=match)


def test_nan_in_the_adapter_names_the_tensor(base_dir, adapter_dir, tmp_path):
    adapter = _copy(adapter_dir, tmp_path / "adapter")
    weights = load_file(adapter / "adapter_model.safetensors")
    name = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    weights[name][0, 0] = float("nan")
    save_file(weights, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    _expect_nothing_written(tmp_path, lambda: merge_adapter(base_dir, adapter, tmp_path / "out"),
                            match=f"tensor {name} has NaN/Inf")


def test_nan_in_a_merged_tensor_names_it(base_dir, adapter_dir, tmp_path):
    base = _copy(base_dir, tmp_path / "base")
    key = "model.layers.0.self_attn.q_proj.weight"
    shard = base / json.loads((base / "model.safetensors.index.json").read_text())["weight_map"][key]
    tensors = load_file(shard)
    tensors[key][3, 5] = float("inf")
    save_file(tensors, shard, metadata={"format": "pt"})
    _expect_nothing_written(tmp_path, lambda: merge_adapter(base, adapter_dir, tmp_path / "new" / "out"),
                            match=f"merged tensor {key} has NaN/Inf")


def test_float16_overflow_names_the_tensor(base_dir, adapter_dir, tmp_path):
    adapter = _copy(adapter_dir, tmp_path / "adapter")
    weights = load_file(adapter / "adapter_model.safetensors")
    weights["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"] *= 1e8
    save_file(weights, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    _expect_nothing_written(tmp_path, lambda: merge_adapter(base_dir, adapter, tmp_path / "out", dtype="float16"),
                            match="merged tensor model.layers.0.mlp.down_proj.weight overflows float16")


def test_audit_catches_a_wrong_merge(base_dir, adapter_dir, tmp_path, monkeypatch):
    correct = merge_module.merge_lora
    monkeypatch.setattr(merge_module, "merge_lora",
                        lambda weight, pair: correct(weight, LoraPair(pair.lora_a, pair.lora_b, 1.1 * pair.scaling,
                                                                      pair.fan_in_fan_out)))
    _expect_nothing_written(tmp_path, lambda: merge_adapter(base_dir, adapter_dir, tmp_path / "out"),
                            error=MergeAuditError, match="merge audit failed")


# ---- the command line, on an adapter trained by `lora-ogpsa sft` on the 4-bit base ----

def test_cli_merges_a_trained_qlora_adapter(tiny_model_dir, data_files, tmp_path, capsys):
    from lora_ogpsa.cli import main

    adapter = tmp_path / "trained"
    assert main(["sft", "--model", str(tiny_model_dir), "--data", str(data_files["sft"]), "--reference",
                 str(data_files["reference"]), "--output", str(adapter), "--max-steps", "2", "--learning-rate",
                 "1e-2", "--lora-r", "4", "--max-length", "64", "--reference-examples", "4"]) == 0
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--output", str(merged),
                 "--base", "dequantized"]) == 0
    assert "audit: max logit difference" in capsys.readouterr().out
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config
    expected = _reference_logits(tiny_model_dir, adapter, quantize=True)
    actual = _logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32))
    assert (actual - expected).abs().max() <= 1e-4
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--output", str(merged)]) == 2
    assert "already exists" in capsys.readouterr().err
