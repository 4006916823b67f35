"""Adapters the ecosystem loads unchanged; re-export of checkpoints; the model card; refusing bad input."""

import logging

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from lora_ogpsa import Subspace
from lora_ogpsa.cli import main
from lora_ogpsa.config import OGPSAConfig, TrainSettings
from lora_ogpsa.export import export_adapter, warn_about_adapter
from lora_ogpsa.train import run_sft

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
    # refresh_every=20 > max_steps: the basis in force was computed after step 1 (DESIGN.md §1.4)
    assert subspace.metadata["step"] == "1" and len(subspace.metadata["reference_hash"]) == 16


def test_model_card_describes_the_run(trained):
    card = (trained[0] / "README.md").read_text()
    for expected in ("base model", "OGPSA, `update` mode", "reference data", "hash `", "k per tensor min/median/max",
                     "PeftModel.from_pretrained", "| lora_r | `4` |"):
        assert expected in card, expected


def test_export_a_checkpoint_as_a_standalone_adapter(trained, tmp_path, capsys):
    output, _ = trained
    assert main(["export", "--adapter", str(output / "checkpoint-2"), "--output", str(tmp_path / "exported")]) == 0
    exported = tmp_path / "exported"
    assert sorted(p.name for p in exported.iterdir()) == sorted(
        ["README.md", "adapter_config.json", "adapter_model.safetensors", "ogpsa_config.json",
         "ogpsa_subspace.safetensors"])
    original = load_file(str(output / "checkpoint-2" / "adapter_model.safetensors"))
    copied = load_file(str(exported / "adapter_model.safetensors"))
    assert all(torch.equal(original[name], copied[name]) for name in original)
    assert "exported from" in (exported / "README.md").read_text()
    assert main(["export", "--adapter", str(output / "checkpoint-2"), "--output", str(tmp_path / "bare"),
                 "--no-subspace"]) == 0
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]


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
                                    (truncated, tmp_path / "o2", "corrupt or truncated"),
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
