"""What only a CUDA device exercises: bf16 autocast, bitsandbytes' CUDA 4-bit kernels, gradient checkpointing
(on by default with CUDA), the subspace math on device tensors. Skipped without CUDA; `make gpu-check` runs
them (`pytest -m gpu`).
"""

import pytest
import torch
from safetensors.torch import load_file

from lora_ogpsa import Subspace, compute_subspace
from lora_ogpsa.cli import main
from lora_ogpsa.core.sketch import GradientSketch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _projector_distance(first, second):
    first, second = first.double().cpu(), second.double().cpu()
    return float((first.T @ first - second.T @ second).norm())


def test_bf16_autocast_with_float32_lora_keeps_the_update_orthogonal(tiny_model_dir, data_files, tmp_path):
    # 4-bit base (bf16 compute on CUDA), bf16 autocast, gradient checkpointing on (the CUDA default)
    output = tmp_path / "run"
    assert main(["sft", "--model", str(tiny_model_dir), "--data", str(data_files["sft"]), "--reference",
                 str(data_files["reference"]), "--output", str(output), "--max-steps", "4", "--save-steps", "1",
                 "--logging-steps", "1", "--batch-size", "4", "--lora-r", "4", "--max-length", "64",
                 "--learning-rate", "1e-3", "--refresh-every", "2", "--reference-examples", "12",
                 "--reference-batch-size", "4", "--max-directions", "8", "--bf16", "true"]) == 0
    for step in range(1, 4):
        before = load_file(str(output / f"checkpoint-{step}" / "adapter_model.safetensors"))
        after = load_file(str(output / f"checkpoint-{step + 1}" / "adapter_model.safetensors"))
        basis = Subspace.load(output / f"checkpoint-{step}" / "ogpsa_subspace.safetensors").basis_by_name
        for name, value in before.items():
            assert value.dtype == torch.float32, name
            change = (after[name] - value).reshape(-1)
            assert (basis[name] @ change).norm() <= 1e-5 * change.norm() + 1e-12, (step, name)


def _cuda_model(model_dir, *, compute_dtype, checkpointing=None):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lora_ogpsa.models.loading import attach_lora, disable_cpu_repack_, lora_config, lora_parameters

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute_dtype)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, quantization_config=config,
                                                device_map={"": torch.device("cuda")})
    disable_cpu_repack_(base)
    model = attach_lora(base, lora_config(r=4, dropout=0.1), seed=0, gradient_checkpointing=checkpointing is not None)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        model.enable_input_require_grads()
    model.train()
    parameters = lora_parameters(model)
    with torch.no_grad():  # lora_B off zero, so that lora_A has a reference gradient too
        for name, parameter in parameters.items():
            if ".lora_B." in name:
                parameter.normal_(0, 0.1, generator=torch.Generator("cuda").manual_seed(len(name)))
    return model, parameters


def _reference_batches(model_dir, reference_file, batch_size):
    from lora_ogpsa.data.rows import read_rows, tokenize_rows
    from lora_ogpsa.models.loading import load_tokenizer
    from lora_ogpsa.signals.reference import make_batches

    tokenizer = load_tokenizer(model_dir)
    examples = tokenize_rows(tokenizer, read_rows(reference_file, "sft").rows[:6], max_length=48)
    return make_batches(examples, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id)


# float32 compute: batched and single-example CUDA kernels agree to float32 rounding; bf16 compute: to bf16's.
@pytest.mark.parametrize(("compute_dtype", "tolerance"), [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_4bit_cuda_per_example_gradients_equal_single_example_passes(tiny_model_dir, data_files, compute_dtype,
                                                                     tolerance):
    from lora_ogpsa.signals.reference import collect_reference_samples, example_losses

    model, parameters = _cuda_model(tiny_model_dir, compute_dtype=compute_dtype)
    samples, _ = collect_reference_samples(model, _reference_batches(tiny_model_dir, data_files["reference"], 4),
                                           parameters, progress=False)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    for index, batch in enumerate(_reference_batches(tiny_model_dir, data_files["reference"], 1)):
        model.zero_grad()
        example_losses(model, batch).sum().backward()
        for name, parameter in parameters.items():
            expected = parameter.grad.float()
            assert expected.norm() > 0, name
            error = float((samples[name][index] - expected).norm() / expected.norm())
            assert error <= tolerance, (name, index, error)


@pytest.mark.parametrize("checkpointing", ["reentrant", "non-reentrant"])
def test_gradient_checkpointing_gives_the_same_reference_gradients(tiny_model_dir, data_files, checkpointing):
    from lora_ogpsa.signals.reference import collect_reference_samples

    batches = _reference_batches(tiny_model_dir, data_files["reference"], 3)
    plain_model, plain_parameters = _cuda_model(tiny_model_dir, compute_dtype=torch.float32)
    plain, _ = collect_reference_samples(plain_model, batches, plain_parameters, progress=False)
    model, parameters = _cuda_model(tiny_model_dir, compute_dtype=torch.float32, checkpointing=checkpointing)
    checkpointed, _ = collect_reference_samples(model, batches, parameters, progress=False)
    for name, value in plain.items():
        assert float((checkpointed[name] - value).norm()) <= 1e-5 * float(value.norm()) + 1e-12, name


def test_subspace_math_on_cuda_matches_the_cpu():
    generator = torch.Generator().manual_seed(0)
    spectrum = torch.tensor([10.0, 5.0, 3.0, 2.0, 1.0])  # well separated: the basis does not hinge on rounding
    samples = {name: ((torch.randn(40, 5, generator=generator) * spectrum) @ torch.randn(5, 1536, generator=generator))
               .reshape(40, *shape) for name, shape in (("a", (16, 96)), ("b", (96, 16)))}
    samples["a"][5] = float("nan")
    on_cuda = {name: value.cuda() for name, value in samples.items()}
    cpu = compute_subspace(samples, max_directions=8, energy=1.0)
    cuda = compute_subspace(on_cuda, max_directions=8, energy=1.0)
    sketch = GradientSketch({name: value[0] for name, value in on_cuda.items()}, rows=16)
    for start in range(0, 40, 8):
        sketch.add_({name: value[start:start + 8] for name, value in on_cuda.items()})
    sketched = sketch.subspace(max_directions=8, energy=1.0)
    for name in samples:
        assert cuda.directions_by_name[name] == cpu.directions_by_name[name] == 5
        assert cuda.basis_by_name[name].device.type == "cuda"
        assert _projector_distance(cuda.basis_by_name[name], cpu.basis_by_name[name]) <= 1e-4, name
        assert torch.allclose(cuda.mean_coefficients_by_name[name].cpu(), cpu.mean_coefficients_by_name[name],
                              atol=1e-4)
        assert sketched.basis_by_name[name].device.type == "cuda"
        assert sketched.dropped_by_name[name] == cpu.dropped_by_name[name]
        # rank 5 ≤ the sketch's 16 rows: the shrinks lose nothing of the span
        assert _projector_distance(sketched.basis_by_name[name], cpu.basis_by_name[name]) <= 1e-3, name
