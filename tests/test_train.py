"""Training end to end on a tiny random Llama saved to disk: the invariants OGPSA promises, checked on files."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lora_ogpsa import Subspace
from lora_ogpsa.cli import main

# --logging-steps 1: these tests read every step's metrics
COMMON = ["--max-length", "64", "--batch-size", "4", "--lora-r", "4", "--reference-examples", "8",
          "--reference-batch-size", "4", "--max-directions", "4", "--logging-steps", "1"]


def _run(args):
    return main([str(arg) for arg in args])


def _sft(tiny_model_dir, data_files, output, *extra):
    return _run(["sft", "--model", tiny_model_dir, "--data", data_files["sft"], "--reference", data_files["reference"],
                 "--output", output, *COMMON, *extra])


def _metrics(directory):
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def _adapter(directory):
    return load_file(str(directory / "adapter_model.safetensors"))


@pytest.mark.parametrize("quantize", [True, False], ids=["4bit", "full"])
def test_update_mode_applied_change_is_orthogonal_to_the_basis_in_force(tiny_model_dir, data_files, tmp_path,
                                                                          quantize):
    output = tmp_path / "out"
    # lr 1e-3: at 1e-4 the float32 rounding of θ itself (≈ sqrt(k/n)·eps·‖θ‖/‖Δθ‖) nears 1e-5 on a model this
    # small; the projection is exact, the storage is not.
    flags = ["--ogpsa_project", "update", "--save-steps", "1", "--max-steps", "6", "--refresh-every", "3",
             "--learning-rate", "1e-3"] + ([] if quantize else ["--no-quantize"])
    assert _sft(tiny_model_dir, data_files, output, *flags) == 0
    for name in ("adapter_model.safetensors", "adapter_config.json", "ogpsa_subspace.safetensors",
                 "ogpsa_config.json", "README.md", "metrics.jsonl"):
        assert (output / name).is_file(), name
    worst = 0.0
    for step in range(1, 6):
        before, after = _adapter(output / f"checkpoint-{step}"), _adapter(output / f"checkpoint-{step + 1}")
        subspace = Subspace.load(output / f"checkpoint-{step}" / "ogpsa_subspace.safetensors")
        assert set(subspace.basis_by_name) == set(before)
        for name, value in before.items():
            change = (after[name] - value).reshape(-1)
            assert change.norm() > 0
            worst = max(worst, float((subspace.basis_by_name[name] @ change).norm() / change.norm()))
            # the refresh after the first step protects lora_A too (its reference gradient was 0 at step 0)
            assert subspace.directions_by_name[name] > 0, (step, name)
    assert worst <= 1e-5
    metrics = _metrics(output)
    assert [row["step"] for row in metrics if "loss" in row] == [1, 2, 3, 4, 5, 6]
    first = metrics[0]
    assert first["ogpsa/k_min_lora_B"] >= 1 and first["ogpsa/k_min_lora_A"] == 0  # the step-0 basis
    assert all(row["ogpsa/k_min_lora_A"] >= 1 for row in metrics[1:] if "loss" in row)
    assert all(0 <= row["ogpsa/span_fraction"] <= 1 and "ogpsa/removed_norm" in row for row in metrics if "loss" in row)
    refreshes = [row["step"] for row in metrics if "ogpsa/refresh_seconds" in row]
    assert refreshes == [1, 3]  # steps 0 and 1 share the first log line; none after the last step


def test_grad_mode_gradient_given_to_the_optimizer_is_orthogonal(tiny_model_dir, data_files, tmp_path):
    from transformers import TrainerCallback

    from lora_ogpsa.config import OGPSAConfig
    from lora_ogpsa.models.loading import lora_parameters
    from lora_ogpsa.train.run import run_sft
    from lora_ogpsa.train.settings import TrainSettings

    captured = {}

    class CaptureGradients(TrainerCallback):  # runs after OGPSACallback: sees what optimizer.step() will see
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads = {name: p.grad.detach().clone() for name, p in lora_parameters(model).items()}
            captured[state.global_step + 1] = grads

    settings = TrainSettings(model=tiny_model_dir, output=tmp_path / "out", data=str(data_files["sft"]),
                             reference=str(data_files["reference"]), max_steps=4, save_steps=1, batch_size=4,
                             max_length=64, lora_r=4, quantize=False,
                             ogpsa=OGPSAConfig(project="grad", refresh_every=2, reference_examples=8,
                                               max_directions=4, reference_batch_size=4))
    run_sft(settings, callbacks=[CaptureGradients()])
    checked = 0
    for update in range(2, 5):  # update N+1 is constrained by checkpoint N's basis
        subspace = Subspace.load(tmp_path / "out" / f"checkpoint-{update - 1}" / "ogpsa_subspace.safetensors")
        for name, grad in captured[update].items():
            basis = subspace.basis_by_name[name]
            assert basis.shape[0] > 0
            assert (basis @ grad.reshape(-1)).norm() <= 1e-5 * grad.norm()
            checked += 1
    assert checked == 3 * len(captured[2])


def test_none_mode_equals_plain_trl_and_peft(tiny_model_dir, data_files, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from lora_ogpsa.data.rows import read_rows
    from lora_ogpsa.models.loading import load_tokenizer

    rows = read_rows(data_files["sft"], "sft").rows
    prompt_completion = tmp_path / "pc.jsonl"
    prompt_completion.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = {**data_files, "sft": prompt_completion}
    assert _sft(tiny_model_dir, data, tmp_path / "ours", "--ogpsa_project", "none", "--no-quantize", "--max-steps", "4",
                "--learning-rate", "1e-3", "--seed", "3") == 0
    assert not (tmp_path / "ours" / "ogpsa_subspace.safetensors").exists()

    args = SFTConfig(output_dir=str(tmp_path / "plain"), max_steps=4, per_device_train_batch_size=4,
                     learning_rate=1e-3, seed=3, logging_steps=1, save_strategy="no", report_to="none", bf16=False,
                     use_cpu=True, gradient_checkpointing=False, max_length=64, dataloader_num_workers=0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                         args=args, train_dataset=Dataset.from_list(rows), processing_class=load_tokenizer(
                             tiny_model_dir), peft_config=lora)
    trainer.train()
    ours = _adapter(tmp_path / "ours")
    plain = {name.replace(".default.", "."): p.detach() for name, p in trainer.model.named_parameters()
             if p.requires_grad}
    assert set(ours) == set(plain)
    assert max(float((ours[name] - plain[name]).abs().max()) for name in ours) <= 1e-6


def test_resume_after_an_interruption_ends_with_the_same_adapter(tiny_model_dir, data_files, tmp_path):
    from transformers import TrainerCallback

    from lora_ogpsa.config import OGPSAConfig
    from lora_ogpsa.train.run import run_sft
    from lora_ogpsa.train.settings import TrainSettings

    class StopAfterCheckpoint3(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    def settings(output, **changes):
        return TrainSettings(model=tiny_model_dir, output=output, data=str(data_files["sft"]),
                             reference=str(data_files["reference"]), max_steps=6, save_steps=1, batch_size=4,
                             max_length=64, lora_r=4, quantize=True, learning_rate=1e-3, logging_steps=1,
                             ogpsa=OGPSAConfig(refresh_every=2, reference_examples=8, max_directions=4,
                                               reference_batch_size=4), **changes)

    run_sft(settings(tmp_path / "straight"))
    with pytest.raises(KeyboardInterrupt):
        run_sft(settings(tmp_path / "interrupted"), callbacks=[StopAfterCheckpoint3()])
    assert not (tmp_path / "interrupted").exists() and (tmp_path / "interrupted.partial" / "checkpoint-3").is_dir()
    assert _sft(tiny_model_dir, data_files, tmp_path / "interrupted", "--resume", "--max-steps", "6",
                "--save-steps", "1", "--learning-rate", "1e-3", "--refresh-every", "2") == 0
    straight, resumed = _adapter(tmp_path / "straight"), _adapter(tmp_path / "interrupted")
    assert max(float((straight[name] - resumed[name]).abs().max()) for name in straight) <= 1e-6
    assert [row["step"] for row in _metrics(tmp_path / "interrupted") if "loss" in row] == [1, 2, 3, 4, 5, 6]
    assert not (tmp_path / "interrupted.partial").exists()


def test_continuing_a_finished_run_performs_the_refresh_skipped_at_its_end(tiny_model_dir, data_files, tmp_path):
    output = tmp_path / "out"
    flags = ["--save-steps", "2", "--refresh-every", "2", "--no-quantize"]
    assert _sft(tiny_model_dir, data_files, output, "--max-steps", "4", *flags) == 0
    assert Subspace.load(output / "ogpsa_subspace.safetensors").metadata["step"] == "2"  # step 4's was skipped
    assert _sft(tiny_model_dir, data_files, output, "--max-steps", "6", "--resume", *flags) == 0
    assert Subspace.load(output / "ogpsa_subspace.safetensors").metadata["step"] == "4"  # done on resume
    metrics = [row for row in _metrics(output) if "loss" in row]
    assert [row["step"] for row in metrics] == [1, 2, 3, 4, 5, 6]
    assert "ogpsa/refresh_seconds" in metrics[4]  # the step-4 refresh, done on resume, shows in step 5's line


@pytest.mark.parametrize("mode", ["update", "grad", "none"])
def test_align_runs_sft_then_dpo_on_the_same_adapter(tiny_model_dir, data_files, tmp_path, mode):
    output = tmp_path / "aligned"
    assert _run(["align", "--model", tiny_model_dir, "--sft-data", data_files["sft"], "--dpo-data", data_files["dpo"],
                 "--reference", data_files["reference"], "--output", output, "--ogpsa_project", mode, "--max-steps", "3",
                 "--learning-rate", "1e-3", "--no-quantize", *COMMON]) == 0
    for stage in ("sft", "dpo"):
        assert (output / stage / "adapter_model.safetensors").is_file()
    dpo_metrics = _metrics(output / "dpo")
    assert dpo_metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # reference = base + the SFT adapter
    sft_adapter, final = _adapter(output / "sft"), _adapter(output)
    assert final.keys() == sft_adapter.keys()
    assert any(not torch.equal(final[name], sft_adapter[name]) for name in final)
    assert torch.equal(final[next(iter(final))], _adapter(output / "dpo")[next(iter(final))])
    steps = [row for row in _metrics(output) if "loss" in row]
    assert [row["stage"] for row in steps] == ["sft"] * 3 + ["dpo"] * 3
    assert all(("ogpsa/span_fraction" in row) == (mode != "none") for row in steps)


def test_dpo_continues_an_adapter_against_itself(tiny_model_dir, data_files, tmp_path):
    assert _sft(tiny_model_dir, data_files, tmp_path / "sft", "--max-steps", "2", "--learning-rate", "1e-3",
                "--no-quantize") == 0
    assert _run(["dpo", "--model", tiny_model_dir, "--adapter", tmp_path / "sft", "--data", data_files["dpo"],
                 "--reference", data_files["reference"], "--output", tmp_path / "dpo", "--max-steps", "2",
                 "--no-quantize", *COMMON]) == 0
    assert _metrics(tmp_path / "dpo")[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    config = json.loads((tmp_path / "dpo" / "ogpsa_config.json").read_text())
    assert config["continued_adapter"] == str(tmp_path / "sft") and config["stage"] == "dpo"


def test_config_file_with_flag_overrides(tiny_model_dir, data_files, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {data_files['sft']}\nreference: {data_files['reference']}\n"
                      "max_steps: 1\nlora_r: 2\nno_quantize: true\nproject: grad\nmax_length: 64\n")
    assert _run(["sft", "--config", config, "--output", tmp_path / "out", "--lora-r", "3"]) == 0
    run_config = json.loads((tmp_path / "out" / "ogpsa_config.json").read_text())
    assert (run_config["lora_r"], run_config["max_steps"], run_config["quantize"]) == (3, 1, False)
    assert run_config["ogpsa"]["project"] == "grad"


def test_one_sided_update_never_raises_the_reference_loss_to_first_order(tiny_model_dir, data_files, tmp_path):
    output = tmp_path / "out"
    assert _sft(tiny_model_dir, data_files, output, "--one-sided", "--save-steps", "1", "--max-steps", "4",
                "--refresh-every", "2", "--learning-rate", "1e-3", "--no-quantize") == 0
    kept_some = False
    for step in range(1, 4):
        before, after = _adapter(output / f"checkpoint-{step}"), _adapter(output / f"checkpoint-{step + 1}")
        subspace = Subspace.load(output / f"checkpoint-{step}" / "ogpsa_subspace.safetensors")
        for name, value in before.items():
            change = (after[name] - value).reshape(-1)
            coefficients = subspace.basis_by_name[name] @ change  # the applied change along protected rows
            slope = subspace.mean_coefficients_by_name[name]
            assert (coefficients * slope <= 1e-5 * change.norm() * slope.abs()).all()  # nothing that raises it
            kept_some |= bool((coefficients.abs() > 1e-3 * change.norm()).any())
    assert kept_some  # unlike two-sided projection, loss-lowering components survive
