"""Activation-space protection: the math, the collection, and the guarantee on a trained 4-bit adapter."""

import pytest
import torch
from peft import PeftModel

from lora_ogpsa.cli import main
from lora_ogpsa.config import OGPSAConfig
from lora_ogpsa.core.projector import project_rows_
from lora_ogpsa.core.subspace import Subspace
from lora_ogpsa.models.loading import load_base_model, load_tokenizer, lora_parameters
from lora_ogpsa.signals.activations import collect_input_moments, compute_input_basis, position_weights
from lora_ogpsa.signals.reference import ReferenceBatch, build_reference_set


def test_input_basis_reaches_the_energy_and_is_orthonormal():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    spectrum = torch.tensor([50.0, 30.0, 10.0, 6.0, 3.0, 1.0], dtype=torch.float64)  # total 100
    covariance = (q * spectrum) @ q.T
    shared = covariance.float()
    bases, energy = compute_input_basis({"a": shared, "b": shared, "c": covariance.float() * 2}, energy=0.85)
    assert bases["a"].shape == (3, 6) and energy["a"] == pytest.approx(0.90)  # 50+30 < 85 <= 50+30+10
    assert bases["a"] is bases["b"]  # a shared input is solved once
    assert torch.allclose(bases["a"] @ bases["a"].T, torch.eye(3), atol=1e-5)
    assert torch.allclose(bases["c"].abs(), bases["a"].abs(), atol=1e-4)  # scale does not change the span
    assert compute_input_basis({"a": shared}, energy=1.0)[0]["a"].shape == (6, 6)
    zero, captured = compute_input_basis({"z": torch.zeros(4, 4)}, energy=0.9)
    assert zero["z"].shape == (0, 4) and captured["z"] == 1.0
    with pytest.raises(ValueError, match="activation_energy"):
        compute_input_basis({"a": shared}, energy=0.0)


def test_project_rows_makes_rows_orthogonal_and_is_idempotent():
    torch.manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(10, 3))
    basis = basis.T  # (3, 10)
    matrix = torch.randn(4, 10)
    removed = project_rows_(matrix, basis)
    assert removed > 0 and (matrix @ basis.T).abs().max() < 1e-5
    assert project_rows_(matrix, basis) < 1e-9
    assert project_rows_(matrix, torch.zeros(0, 10)) == 0.0


def test_opening_positions_are_the_header_and_the_first_response_tokens():
    batch = ReferenceBatch(input_ids=torch.zeros(1, 12, dtype=torch.long),
                           attention_mask=torch.tensor([[1] * 11 + [0]]),
                           loss_weights=torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0.0]]))  # predicts 6..10
    weights = position_weights(batch, "opening", opening_tokens=2)
    assert weights.tolist() == [[0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]]  # 3 header positions + 2
    assert position_weights(batch, "all", 2).tolist() == batch.attention_mask.float().tolist()


def test_moments_are_shared_by_layers_with_one_input(tiny_model_dir, data_files):
    from lora_ogpsa.models.loading import attach_lora, lora_config

    base = load_base_model(tiny_model_dir, quantize=False, device="cpu")
    peft = attach_lora(base, lora_config(r=2), seed=0, gradient_checkpointing=False)
    tokenizer = load_tokenizer(tiny_model_dir)
    reference = build_reference_set(data_files["reference"], tokenizer, OGPSAConfig(reference_examples=4),
                                    max_length=64)
    moments = collect_input_moments(peft, reference.batches, lora_parameters(peft))
    names = sorted(moments)
    q = next(n for n in names if "q_proj" in n)
    k = next(n for n in names if "k_proj" in n and n.split("k_proj")[0] == q.split("q_proj")[0])
    o = next(n for n in names if "o_proj" in n and n.split("o_proj")[0] == q.split("q_proj")[0])
    assert moments[q] is moments[k] and moments[q] is not moments[o]
    assert torch.allclose(moments[q], moments[q].T) and float(torch.linalg.eigvalsh(moments[q].double()).min()) > -1e-3


def _relative_residuals(checkpoint, tiny_model_dir, data_files, energy):
    """Per LoRA layer of a saved checkpoint: ||A Uᵀ|| / ||A|| and ||ΔW X|| / (s ||B A||₂ ||X||) on the
    reference inputs, with U the input basis saved with the checkpoint."""
    base = load_base_model(tiny_model_dir, quantize=True, device="cpu")
    model = PeftModel.from_pretrained(base, str(checkpoint), is_trainable=True)
    parameters = lora_parameters(model)
    subspace = Subspace.load(checkpoint / "ogpsa_subspace.safetensors")
    tokenizer = load_tokenizer(tiny_model_dir)
    reference = build_reference_set(data_files["reference"], tokenizer, OGPSAConfig(reference_examples=12),
                                    max_length=64)
    moments = collect_input_moments(model, reference.batches, parameters)
    rows, outputs = [], []
    for name_a, basis in subspace.input_basis_by_name.items():
        a = parameters[name_a].detach().float()
        b = parameters[name_a.replace("lora_A", "lora_B")].detach().float()
        rows.append(float((a @ basis.T).norm() / a.norm()))
        moment = moments[name_a].double()  # Σ x xᵀ: ||M X||_F² = tr(M C Mᵀ)
        delta = (b @ a).double()
        spread = float(torch.linalg.matrix_norm(delta, ord=2))
        outputs.append(float(torch.trace(delta @ moment @ delta.T).sqrt() / (spread * torch.trace(moment).sqrt())))
    return rows, outputs, (1 - energy) ** 0.5


@pytest.mark.parametrize("resume", [False, True], ids=["straight", "resumed"])
def test_activation_guarantee_on_a_4bit_base(tiny_model_dir, data_files, tmp_path, resume):
    output = tmp_path / "out"
    energy = 0.99
    common = ["sft", "--model", tiny_model_dir, "--data", data_files["sft"], "--reference", data_files["reference"],
              "--output", output, "--protect", "activations", "--activation-energy", str(energy),
              "--refresh-every", "1", "--save-steps", "1", "--learning-rate", "1e-2", "--lora-r", "4",
              "--max-length", "64", "--reference-examples", "12", "--batch-size", "4"]
    if resume:
        assert main([str(arg) for arg in [*common, "--max-steps", "2"]]) == 0
        common.append("--resume")
    assert main([str(arg) for arg in [*common, "--max-steps", "4"]]) == 0
    for step in (2, 3):
        rows, outputs, bound = _relative_residuals(output / f"checkpoint-{step}", tiny_model_dir, data_files, energy)
        assert rows and max(rows) <= 1e-5  # every row of every lora_A in the null space of its input basis
        assert max(outputs) <= 1.25 * bound, (max(outputs), bound)


def test_without_activation_protection_the_bound_does_not_hold(tiny_model_dir, data_files, tmp_path):
    output = tmp_path / "plain"
    args = ["sft", "--model", tiny_model_dir, "--data", data_files["sft"], "--reference", data_files["reference"],
            "--output", output, "--protect", "activations", "--activation-energy", "0.99", "--refresh-every", "1",
            "--save-steps", "3", "--learning-rate", "1e-2", "--lora-r", "4", "--max-length", "64",
            "--reference-examples", "12", "--batch-size", "4", "--max-steps", "3"]
    assert main([str(arg) for arg in args]) == 0
    # Replace the constrained adapter by a plain run's (same settings, no projection), keep the bases.
    plain = tmp_path / "none"
    assert main([str(arg) for arg in [*args[:args.index("--output")], "--output", plain, "--ogpsa_project", "none",
                                      *args[args.index("--protect"):]]]) == 0
    (output / "checkpoint-3" / "adapter_model.safetensors").write_bytes(
        (plain / "adapter_model.safetensors").read_bytes())
    rows, outputs, bound = _relative_residuals(output / "checkpoint-3", tiny_model_dir, data_files, 0.99)
    assert max(rows) > 0.1 and max(outputs) > 1.25 * bound  # the test above can fail
