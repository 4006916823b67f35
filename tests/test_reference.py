"""Per-example reference gradients from one backward pass equal single-example backward passes."""

import pytest
import torch

from lora_ogpsa.data.rows import read_rows, tokenize_rows
from lora_ogpsa.models.loading import (
    attach_lora,
    load_base_model,
    load_tokenizer,
    lora_config,
    lora_parameters,
)
from lora_ogpsa.signals.reference import collect_reference_samples, example_losses, make_batches
from lora_ogpsa.testing.tiny import randomise_lora_b_


def _model(model_dir, *, quantize, checkpointing):
    model = attach_lora(load_base_model(model_dir, quantize=quantize), lora_config(r=4, dropout=0.1), seed=0,
                        gradient_checkpointing=checkpointing is not None)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        model.enable_input_require_grads()
    model.train()
    parameters = lora_parameters(model)
    randomise_lora_b_(parameters)  # so that lora_A has a reference gradient too
    return model, parameters


def _examples(model_dir, reference_file):
    tokenizer = load_tokenizer(model_dir)
    return tokenizer, tokenize_rows(tokenizer, read_rows(reference_file, "sft").rows[:6], max_length=48)


@pytest.mark.parametrize(("quantize", "checkpointing"), [
    (False, None), (False, "reentrant"), (False, "non-reentrant"), (True, None), (True, "reentrant"),
])
def test_per_example_gradients_equal_single_example_backward(tiny_model_dir, data_files, quantize, checkpointing):
    tokenizer, examples = _examples(tiny_model_dir, data_files["reference"])
    model, parameters = _model(tiny_model_dir, quantize=quantize, checkpointing=checkpointing)
    weights = {"opening_tokens": 2, "later_token_weight": 0.25, "pad_token_id": tokenizer.pad_token_id}
    batches = make_batches(examples, batch_size=4, **weights)
    samples, example_loss = collect_reference_samples(model, batches, parameters, progress=False)
    assert all(value.shape == (6, *parameters[name].shape) for name, value in samples.items())
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    losses = []
    for index, batch in enumerate(make_batches(examples, batch_size=1, **weights)):
        model.zero_grad()
        loss = example_losses(model, batch).sum()
        loss.backward()
        losses.append(float(loss))
        for name, parameter in parameters.items():
            expected = parameter.grad
            assert expected.norm() > 0, name
            error = (samples[name][index] - expected).norm() / expected.norm()
            assert error <= 1e-5, (name, index, float(error))
    assert example_loss.tolist() == pytest.approx(losses, rel=1e-5)


def test_collection_restores_model_state(tiny_model_dir, data_files):
    tokenizer, examples = _examples(tiny_model_dir, data_files["reference"])
    model, parameters = _model(tiny_model_dir, quantize=False, checkpointing=None)
    grads = {name: torch.full_like(parameter, 0.5) for name, parameter in parameters.items()}
    for name, parameter in parameters.items():
        parameter.grad = grads[name].clone()
    hooks_before = sum(len(module._forward_hooks) for module in model.modules())
    batches = make_batches(examples, batch_size=3, pad_token_id=tokenizer.pad_token_id)
    collect_reference_samples(model, batches, parameters, progress=False)
    assert sum(len(module._forward_hooks) for module in model.modules()) == hooks_before
    assert all(torch.equal(parameters[name].grad, grads[name]) for name in parameters)
    assert model.training and all(m.training for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_collection_restores_state_when_it_fails(tiny_model_dir, data_files):
    tokenizer, examples = _examples(tiny_model_dir, data_files["reference"])
    model, parameters = _model(tiny_model_dir, quantize=False, checkpointing=None)
    hooks_before = sum(len(module._forward_hooks) for module in model.modules())
    batches = make_batches(examples, batch_size=3, pad_token_id=tokenizer.pad_token_id)
    batches[1].input_ids[0, 0] = 10**6  # out of the vocabulary: the second forward fails
    with pytest.raises((IndexError, RuntimeError)):
        collect_reference_samples(model, batches, parameters, progress=False)
    assert sum(len(module._forward_hooks) for module in model.modules()) == hooks_before
    assert all(m.training for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_opening_token_weights():
    from lora_ogpsa.data.rows import TokenizedExample

    example = TokenizedExample([1, 2, 3, 4, 5, 6, 7], [0, 0, 1, 1, 1, 1, 1])
    batch = make_batches([example], batch_size=1, pad_token_id=0, opening_tokens=2, later_token_weight=0.25)[0]
    # weight of predicting token t+1: zero on the prompt, 1 on the first two response tokens, 0.25 after
    assert batch.loss_weights.tolist() == [[0.0, 1.0, 1.0, 0.25, 0.25, 0.25]]
    uniform = make_batches([example], batch_size=1, pad_token_id=0)[0]
    assert uniform.loss_weights.tolist() == [[0.0, 1.0, 1.0, 1.0, 1.0, 1.0]]
