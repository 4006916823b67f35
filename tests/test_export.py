"""Adapters the ecosystem loads unchanged; re-export of checkpoints; the model card; refusing bad input."""

import logging

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from lora_ogpsa import Subspace
from lora_ogpsa.cli import main
from lora_ogpsa.config import OGPSAConfig
from lora_ogpsa.export.adapter import export_adapter, warn_about_adapter
from lora_ogpsa.train.run import run_sft
from lora_ogpsa.train.settings import TrainSettings
from lora_ogpsa.utils.files import TOKENIZER_FILES

INPUT_IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 3], [8, 8, 120, 64, 31, 2, 77]])


@pytest.fixture(scope="module")
def trained(tiny_model_dir, data_files, tmp_path_factory):
    """A full-precision SFT run with two checkpoints, and the trained model's logits on fixed inputs."""
    logits = {}

    class TrainedLogits(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            model.eval()
            with torch.no_grad():
                logits["trained"] = model(input_ids=INPUT_IDS).logits.float()

    output = tmp_path_factory.mktemp("export") / "out"
    settings = TrainSettings(model=tiny_model_dir, output=output, data=str(data_files["sft"]),
                             reference=str(data_files["reference"]), max_steps=4, save_steps=2, batch_size=4,
                             max_length=64, lora_r=4, quantize=False, learning_rate=1e-2,
                             ogpsa=OGPSAConfig(reference_examples=8, max_directions=3, reference_batch_size=4))
    run_sft(settings, callbacks=[TrainedLogits()])
    return output, logits["trained"]


def test_adapter_loads_unchanged_with_peft_and_transformers(tiny_model_dir, trained):
    output, expected = trained
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(input_ids=INPUT_IDS).logits
        peft_logits = PeftModel.from_pretrained(base, str(output)).eval()(input_ids=INPUT_IDS).logits
    assert (peft_logits - expected).abs().max() <= 1e-5
    assert (base_logits - expected).abs().max() > 1e-3  # the adapter does change the model
    native = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    native.load_adapter(str(output))
    with torch.no_grad():
        assert (native.eval()(input_ids=INPUT_IDS).logits - expected).abs().max() <= 1e-5


def test_subspace_sidecar_matches_the_adapter_keys(trained):
    output, _ = trained
    adapter = load_file(str(output / "adapter_model.safetensors"))
    subspace = Subspace.load(output / "ogpsa_subspace.safetensors",
                             numel_by_name={name: value.numel() for name, value in adapter.items()})
    # refresh_every=20 > max_steps: the basis in force was computed after step 1 (docs/ARCHITECTURE.md, "One refresh")
    assert subspace.metadata["step"] == "1" and len(subspace.metadata["reference_hash"]) == 16


def test_model_card_describes_the_run(trained):
    card = (trained[0] / "README.md").read_text()
    for expected in ("base model", "OGPSA, `update` mode", "reference data", "hash `", "k per tensor min/median/max",
                     "AutoPeftModelForCausalLM.from_pretrained", "| lora_r | `4` |"):
        assert expected in card, expected
    # the settings table shows the alpha in force, not `None` (issue 23, finding 8)
    assert "| lora_alpha | `8` |" in card and "| lora_alpha | `None` |" not in card


def test_a_dpo_stage_card_names_the_adapter_it_continued():
    from lora_ogpsa.export.card import _stage

    text = _stage({"stage": "dpo", "lora_r": 4, "lora_alpha": None, "max_steps": 2, "beta": 0.1,
                   "ogpsa": {"project": "none"}, "continued_adapter": "/runs/out.partial/sft"})
    assert "continues the adapter `/runs/out/sft`" in text


def test_export_a_checkpoint_as_a_standalone_adapter(trained, tmp_path, capsys):
    output, _ = trained
    assert main(["export", "--adapter", str(output / "checkpoint-2"), "--output", str(tmp_path / "exported")]) == 0
    exported = tmp_path / "exported"
    tokenizer = sorted(p.name for p in (output / "checkpoint-2").iterdir() if p.name in TOKENIZER_FILES)
    assert "tokenizer.json" in tokenizer
    assert sorted(p.name for p in exported.iterdir()) == sorted(
        ["README.md", "adapter_config.json", "adapter_model.safetensors", "ogpsa_config.json",
         "ogpsa_subspace.safetensors", *tokenizer])
    original = load_file(str(output / "checkpoint-2" / "adapter_model.safetensors"))
    copied = load_file(str(exported / "adapter_model.safetensors"))
    assert all(torch.equal(original[name], copied[name]) for name in original)
    assert "exported from" in (exported / "README.md").read_text()
    assert main(["export", "--adapter", str(output / "checkpoint-2"), "--output", str(tmp_path / "bare"),
                 "--no-subspace"]) == 0
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == sorted([
        "README.md", "adapter_config.json", "adapter_model.safetensors", *tokenizer])


def test_export_refuses_bad_input_and_writes_nothing(trained, tmp_path, capsys):
    output, _ = trained
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "adapter_config.json").write_text((output / "adapter_config.json").read_text())
    data = (output / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "x").write_text("x")
    for source, target, message in [(tmp_path / "nothing", tmp_path / "o1", "no adapter_config.json"),
                                    (truncated, tmp_path / "o2", "truncated or corrupt"),
                                    (output, existing, "exists and is not empty")]:
        assert main(["export", "--adapter", str(source), "--output", str(target)]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert [p.name for p in existing.iterdir()] == ["x"]


def test_warns_about_untrained_adapters_and_leaking_base_weights(tmp_path, caplog):
    tensors = {"m.q.lora_A.weight": torch.ones(2, 4), "m.q.lora_B.weight": torch.zeros(4, 2),
               "m.lm_head.modules_to_save.weight": torch.ones(10, 4)}
    with caplog.at_level(logging.WARNING):
        warn_about_adapter(tmp_path / "a.safetensors", tensors)
    assert "every lora_B is zero" in caplog.text and "full base weights" in caplog.text


def test_export_python_api_checks_the_copy(trained, tmp_path):
    output, _ = trained
    exported = export_adapter(output, tmp_path / "copy", include_subspace=True)
    copied = Subspace.load(exported / "ogpsa_subspace.safetensors")
    original = Subspace.load(output / "ogpsa_subspace.safetensors")
    assert all(torch.equal(copied.basis_by_name[name], basis) for name, basis in original.basis_by_name.items())


def test_artefacts_travel_from_another_working_directory(tiny_model_dir, trained, tmp_path, monkeypatch):
    import json

    from huggingface_hub import ModelCard
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    output, expected = trained
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    for checkpoint in output.glob("checkpoint-*"):  # the checkpoints name the same base
        assert json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"] == \
            str(tiny_model_dir.resolve())
    monkeypatch.chdir(tmp_path)
    model = AutoPeftModelForCausalLM.from_pretrained(str(output), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (model(input_ids=INPUT_IDS).logits - expected).abs().max() <= 1e-5
    tokenizer = AutoTokenizer.from_pretrained(str(output))
    assert tokenizer.chat_template and tokenizer.chat_template == AutoTokenizer.from_pretrained(
        str(tiny_model_dir)).chat_template
    card = ModelCard.load(output / "README.md")
    assert card.data.base_model == str(tiny_model_dir.resolve())
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert {"lora", "sft", "trl", "ogpsa"} <= set(card.data.tags)
    assert "lora_alpha 8" in card.text and "None" not in card.text.split("## All settings")[0]


def test_base_model_id_names_what_users_will_load(tiny_model_dir, data_files, tmp_path):
    import json

    from huggingface_hub import ModelCard

    output = tmp_path / "out"
    assert main(["sft", "--model", str(tiny_model_dir), "--data", str(data_files["sft"]), "--ogpsa_project", "none",
                 "--output", str(output), "--max-steps", "1", "--no-quantize", "--lora-r", "2", "--max-length",
                 "64", "--base-model-id", "my-org/my-base"]) == 0
    assert json.loads((output / "adapter_config.json").read_text())["base_model_name_or_path"] == "my-org/my-base"
    assert ModelCard.load(output / "README.md").data.base_model == "my-org/my-base"


def test_the_card_recreates_the_exact_4bit_base_it_was_trained_on():
    """The card's snippet builds the BitsAndBytesConfig training used (NF4, double quantization, compute dtype);
    a full-precision run's card has no such section."""
    import re

    import torch
    from transformers import BitsAndBytesConfig

    from lora_ogpsa.export.card import _quantization
    from lora_ogpsa.models.loading import default_device, nf4_config

    text = _quantization({"quantize": True, "model": "/models/base"})
    line = re.search(r"^quantization = (BitsAndBytesConfig\(.*\))$", text, re.MULTILINE).group(1)
    built = eval(line, {"BitsAndBytesConfig": BitsAndBytesConfig, "torch": torch})  # the card's own snippet
    assert built.to_dict() == nf4_config(default_device()).to_dict()
    assert built.bnb_4bit_use_double_quant and 'from_pretrained("/models/base"' in text
    assert _quantization({"quantize": False}) == ""
