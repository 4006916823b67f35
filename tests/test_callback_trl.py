"""OGPSACallback in a plain TRL script: 4-bit base, `peft_config=`, no project helper but the reference builder."""

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
from trl import SFTConfig, SFTTrainer

from lora_ogpsa import OGPSACallback, OGPSAConfig, build_reference_set
from tests.conftest import HARMFUL, REFUSAL


class _AppliedUpdates(TrainerCallback):
    """Records ||U Δθ|| / ||Δθ|| of every applied update against the basis in force (runs after OGPSA's)."""

    def __init__(self, ogpsa: OGPSACallback) -> None:
        self.ogpsa, self.residuals, self.dtypes = ogpsa, [], set()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.before = {name: p.detach().clone() for name, p in self.ogpsa._parameters.items()}
        self.basis = {name: basis.clone() for name, basis in self.ogpsa.subspace.basis_by_name.items()}

    def on_optimizer_step(self, args, state, control, **kwargs):
        worst = 0.0
        for name, parameter in self.ogpsa._parameters.items():
            self.dtypes.add(parameter.dtype)
            change = (parameter.detach() - self.before[name]).double().flatten()
            basis = self.basis[name].double()
            if basis.shape[0] and change.norm() > 0:
                worst = max(worst, float((basis @ change).norm() / change.norm()))
        self.residuals.append(worst)


def test_sft_trainer_with_peft_config_on_4bit_keeps_every_update_orthogonal(tiny_model_dir, data_files, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quantization,
                                                 dtype=torch.float32, device_map={"": "cpu"})
    config = OGPSAConfig(max_directions=4, reference_examples=8, refresh_every=2)
    ogpsa = OGPSACallback(config, build_reference_set(data_files["reference"], tokenizer, config, max_length=64))
    checker = _AppliedUpdates(ogpsa)
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": REFUSAL}]}
            for p in HARMFUL]
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
        args=SFTConfig(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                       learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                       max_length=64),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[ogpsa, checker])
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.bfloat16}  # TRL's cast
    trainer.train()
    assert checker.dtypes == {torch.float32}  # cast back before the first step
    assert len(checker.residuals) == 4 and max(checker.residuals) <= 1e-5, checker.residuals
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "out" / "ogpsa_subspace.safetensors").is_file()  # written at the end of training


class _ReplayCheck(TrainerCallback):
    """After OGPSA's step preparation: the gradient's component in the basis is exactly the replay part."""

    def __init__(self, ogpsa: OGPSACallback, replay_batches, weight: float) -> None:
        self.ogpsa, self.batches, self.weight, self.errors, self.sizes = ogpsa, replay_batches, weight, [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        from lora_ogpsa.signals.reference import example_losses

        names = list(self.ogpsa._parameters)
        parameters = [self.ogpsa._parameters[name] for name in names]
        batch = self.batches[state.global_step % len(self.batches)]
        with torch.enable_grad():
            replay = torch.autograd.grad(example_losses(model, batch).mean(), parameters, allow_unused=True)
        for name, parameter, g_replay in zip(names, parameters, replay, strict=True):
            basis = self.ogpsa.subspace.basis_by_name[name].double()
            if basis.shape[0] == 0 or g_replay is None:
                continue
            in_span = basis @ parameter.grad.double().flatten()
            expected = self.weight * (basis @ g_replay.double().flatten())
            self.sizes.append(float(expected.norm()))
            self.errors.append(float((in_span - expected).norm() / expected.norm().clamp_min(1e-30)))


def test_replay_gradient_is_added_after_the_projection(tiny_model_dir, data_files, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = OGPSAConfig(max_directions=4, reference_examples=8, refresh_every=0, project="grad")
    replay = build_reference_set(data_files["reference"], tokenizer,
                                 OGPSAConfig(reference_examples=12, reference_batch_size=3), max_length=64)
    ogpsa = OGPSACallback(config, build_reference_set(data_files["reference"], tokenizer, config, max_length=64),
                          replay=replay, replay_weight=0.5)
    check = _ReplayCheck(ogpsa, replay.batches, 0.5)
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": REFUSAL}]}
            for p in HARMFUL]
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
        args=SFTConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                       learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                       max_length=64),
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                               task_type="CAUSAL_LM"),
        callbacks=[ogpsa, check])
    trainer.train()
    assert check.sizes and max(check.sizes) > 0  # replay does push along protected directions ...
    assert max(check.errors) <= 1e-4, max(check.errors)  # ... and that push is all that is left in the span
    assert any("ogpsa/replay_loss" in row for row in trainer.state.log_history)
