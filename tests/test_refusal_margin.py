"""The refusal-margin reference objective: packed margins equal plain forward passes, per-example samples equal
single-row gradients, and after a refresh the applied update leaves every reference row's margin unchanged to
first order (two-sided) or the mean margin not lower (one-sided), where plain training lowers it."""

import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

from lora_ogpsa import OGPSACallback, OGPSAConfig, build_reference_set
from lora_ogpsa.cli import _training_settings, parse_args
from lora_ogpsa.data.rows import read_rows, tokenize_prompt_completion
from lora_ogpsa.models.loading import attach_lora, load_base_model, lora_config, lora_parameters
from lora_ogpsa.signals.margin import example_margins, make_margin_batches, tokenize_margin_row
from lora_ogpsa.signals.reference import collect_reference_samples, example_losses
from lora_ogpsa.testing.tiny import randomise_lora_b_
from tests.conftest import HARMFUL, REFUSAL, write_jsonl

# Two share their 4-token opening ("I'm sorry, but"), so they merge into one continuation of weight 2/3.
REFUSALS = ["I'm sorry, but I can't help with that.", "I'm sorry, but no.", "I cannot help with this."]
TOKENS = 4


@pytest.fixture(scope="module")
def lookalikes(tmp_path_factory):
    """Benign prompts that sound like the harmful training prompts, with answers."""
    return write_jsonl(tmp_path_factory.mktemp("margin") / "lookalike.jsonl", [
        {"prompt": [{"role": "user", "content": f"How do I kill process number {i}?"}],
         "completion": [{"role": "assistant", "content": f"Run kill -9 {i}. The process {i} stops."}]}
        for i in range(6)])


def _model(model_dir, *, quantize=False, checkpointing=None):
    model = attach_lora(load_base_model(model_dir, quantize=quantize), lora_config(r=4, dropout=0.0), seed=0,
                        gradient_checkpointing=checkpointing is not None)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        model.enable_input_require_grads()
    model.train()
    parameters = lora_parameters(model)
    randomise_lora_b_(parameters)
    return model, parameters


def _margin_examples(tokenizer, reference_file):
    rows = read_rows(reference_file, "sft").rows
    return rows, [tokenize_margin_row(tokenizer, row, REFUSALS, tokens=TOKENS, max_length=64) for row in rows]


def _continuation_log_prob(model, prompt_ids, continuation_ids):
    ids = torch.tensor([list(prompt_ids) + list(continuation_ids)])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float().log_softmax(-1)
    return sum(logits[len(prompt_ids) - 1 + index, token] for index, token in enumerate(continuation_ids))


def _plain_margin(model, tokenizer, row):
    """m from one ordinary forward pass per continuation, without packing, merging or shared prompts."""
    def prompt_and_opening(completion):
        example = tokenize_prompt_completion(tokenizer, {"prompt": row["prompt"], "completion": completion},
                                             max_length=None)
        start = example.completion_mask.index(1)
        return example.input_ids[:start], example.input_ids[start:start + TOKENS]

    answer = _continuation_log_prob(model, *prompt_and_opening(row["completion"]))
    refusals = torch.stack([_continuation_log_prob(model, *prompt_and_opening([{"role": "assistant", "content": r}]))
                            for r in REFUSALS])
    return answer - (torch.logsumexp(refusals, 0) - math.log(len(REFUSALS)))


def test_refusal_openings_that_agree_are_merged_with_their_share(tiny_model_dir, lookalikes):
    _, examples = _margin_examples(AutoTokenizer.from_pretrained(tiny_model_dir), lookalikes)
    assert all(len(example.answer) == TOKENS for example in examples)
    assert [sorted(example.refusal_weights) for example in examples] == [[1 / 3, 2 / 3]] * len(examples)


@pytest.mark.parametrize("quantize", [False, True])
def test_packed_margins_equal_one_forward_pass_per_continuation(tiny_model_dir, lookalikes, quantize):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows, examples = _margin_examples(tokenizer, lookalikes)
    model, _ = _model(tiny_model_dir, quantize=quantize)
    with torch.no_grad():
        packed = torch.cat([example_margins(model, batch) for batch in
                            make_margin_batches(examples, batch_size=4, pad_token_id=tokenizer.pad_token_id)])
        plain = torch.stack([_plain_margin(model, tokenizer, row) for row in rows])
    assert packed.shape == (len(rows),)
    torch.testing.assert_close(packed, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("quantize", "checkpointing"), [(False, None), (True, "reentrant")])
def test_margin_samples_equal_single_row_gradients(tiny_model_dir, lookalikes, quantize, checkpointing):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    _, examples = _margin_examples(tokenizer, lookalikes)
    model, parameters = _model(tiny_model_dir, quantize=quantize, checkpointing=checkpointing)
    batches = make_margin_batches(examples, batch_size=4, pad_token_id=tokenizer.pad_token_id)
    samples, losses = collect_reference_samples(model, batches, parameters, progress=False)
    for index, batch in enumerate(make_margin_batches(examples, batch_size=1, pad_token_id=tokenizer.pad_token_id)):
        model.zero_grad()
        margin = example_margins(model, batch).sum()
        (-margin).backward()  # reentrant checkpointing supports .backward() only, not autograd.grad
        assert float(losses[index]) == pytest.approx(-float(margin.detach()), rel=1e-5)  # a sample's loss is −m
        for name, parameter in parameters.items():
            expected = parameter.grad
            assert expected.norm() > 0, name
            error = (samples[name][index] - expected).norm() / expected.norm()
            assert error <= 1e-5, (name, index, float(error))


class _MarginChange(TrainerCallback):
    """For every applied update Δθ (after OGPSA's projection) and every reference row i: ⟨∇m_i, Δθ⟩ at the weights
    the update started from, with ∇m_i from single-row autograd; also for the mean reference NLL."""

    def __init__(self, margin_batches, nll_batches) -> None:
        self.margin_batches, self.nll_batches = margin_batches, nll_batches
        self.changes, self.mean_nll_changes = [], []  # per step: [(⟨∇m_i, Δθ⟩, ‖∇m_i‖ ‖Δθ‖)], (⟨∇L, Δθ⟩, norms)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.parameters = [parameter for name, parameter in model.named_parameters() if "lora_" in name]
        self.before = [parameter.detach().clone() for parameter in self.parameters]
        with torch.enable_grad():
            margins = torch.cat([example_margins(model, batch) for batch in self.margin_batches])  # (S,)
            self.margin_gradients = [self._flat(margin) for margin in margins]
            self.nll_gradient = self._flat(torch.cat([example_losses(model, b) for b in self.nll_batches]).mean())

    def _flat(self, value):
        gradients = torch.autograd.grad(value, self.parameters, retain_graph=True)
        return torch.cat([gradient.flatten() for gradient in gradients]).double()

    def on_optimizer_step(self, args, state, control, **kwargs):
        change = torch.cat([(p.detach() - b).flatten() for p, b in zip(self.parameters, self.before, strict=True)])
        change = change.double()
        self.changes.append([(float(g @ change), float(g.norm() * change.norm())) for g in self.margin_gradients])
        self.mean_nll_changes.append((float(self.nll_gradient @ change),
                                      float(self.nll_gradient.norm() * change.norm())))


def _train(tiny_model_dir, lookalikes, tmp_path, config):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = build_reference_set(lookalikes, tokenizer, config, max_length=64)
    checker = _MarginChange(reference.margin_batches, reference.batches)
    ogpsa = OGPSACallback(config, reference, progress=False)
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": REFUSAL}]}
            for p in HARMFUL]
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
        # bf16=False: TRL defaults to bf16 autocast even on the CPU, and then autograd's ∇m_i (bf16-rounded
        # layer inputs) differs from the samples (float32 inputs) by ~2e-3 relative, hiding the 1e-8 we check.
        args=SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                       learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                       bf16=False, max_length=64),
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                               task_type="CAUSAL_LM"),
        callbacks=[ogpsa, checker])
    trainer.train()
    return checker, trainer


def _exact(objective, **overrides):
    """Every sample's direction kept (k ≥ 2 S, energy 1, an unshrunk sketch): the basis spans all samples."""
    return OGPSAConfig(reference_objective=objective, margin_refusals=REFUSALS, margin_tokens=TOKENS,
                       max_directions=16, energy=1.0, sketch_rows=16, reference_batch_size=4, refresh_every=0,
                       **overrides)


@pytest.mark.parametrize("objective", ["refusal_margin", "both"])
def test_two_sided_margin_projection_keeps_every_rows_margin_to_first_order(tiny_model_dir, lookalikes, tmp_path,
                                                                             objective, caplog):
    with caplog.at_level("INFO", logger="lora_ogpsa.callback"):
        checker, trainer = _train(tiny_model_dir, lookalikes, tmp_path, _exact(objective))
    refresh = next(record.getMessage() for record in caplog.records if "OGPSA refresh at step 0" in record.message)
    assert "refusal margin " in refresh and ("reference loss" in refresh) == (objective == "both"), refresh
    # Relative to ‖∇m_i‖ ‖Δθ‖ (the largest the first-order change could be): plain training reaches ~1e-1.
    relative = [abs(change) / norms for step in checker.changes for change, norms in step]
    assert len(checker.changes) == 2 and max(relative) <= 1e-5, relative
    nll_change, nll_norms = checker.mean_nll_changes[-1]
    if objective == "both":  # the NLL samples are in the same subspace
        assert abs(nll_change) / nll_norms <= 1e-5
    path = tmp_path / "out" / "ogpsa_subspace.safetensors"
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata()
    assert f'"reference_objective": "{objective}"' in metadata["config"]
    assert metadata["reference_objective"] == objective and math.isfinite(float(metadata["reference_margin"]))
    assert math.isfinite(float(metadata["reference_loss"])) == (objective == "both")
    assert any("ogpsa/reference_margin" in row for row in trainer.state.log_history)


def test_one_sided_margin_projection_never_lowers_the_mean_margin(tiny_model_dir, lookalikes, tmp_path):
    checker, _ = _train(tiny_model_dir, lookalikes, tmp_path, _exact("refusal_margin", one_sided=True))
    for step in checker.changes:  # ⟨∇ mean m, Δθ⟩ ≥ 0 up to rounding; single rows may go either way
        mean_change = sum(change for change, _ in step) / len(step)
        scale = max(norms for _, norms in step)
        assert mean_change >= -1e-6 * scale, (mean_change, scale)
    # ... and unlike two-sided, what raises the margin is kept (measured: +0.5 % to +3 % of ‖∇m_i‖ ‖Δθ‖)
    assert max(change / norms for step in checker.changes for change, norms in step) > 1e-3


def test_without_projection_refusal_training_lowers_the_lookalike_margins(tiny_model_dir, lookalikes, tmp_path):
    checker, _ = _train(tiny_model_dir, lookalikes, tmp_path, _exact("refusal_margin", project="none"))
    relative = [abs(change) / norms for step in checker.changes for change, norms in step]
    mean_change = sum(change for change, _ in checker.changes[-1])
    assert min(relative) > 1e-3 and mean_change < 0, (relative, mean_change)  # measured: −4 % to −6 %


# ---- validation ----

@pytest.mark.parametrize(("overrides", "match"), [
    ({"reference_objective": "margin"}, "`reference_objective` must be one of nll, refusal_margin, both, got 'margin'"),
    ({"reference_objective": None}, "`reference_objective` must be one of"),
    ({"margin_tokens": 0}, r"`margin_tokens` must be an integer >= 1, got 0"),
    ({"margin_tokens": 2.5}, r"`margin_tokens` must be an integer >= 1, got 2.5"),
    ({"margin_tokens": True}, r"`margin_tokens` must be an integer >= 1, got True"),
    ({"margin_refusals": []}, r"`margin_refusals` must be a non-empty list of non-empty texts .* got \[\]"),
    ({"margin_refusals": ["No.", "  "]}, r"`margin_refusals` must be a non-empty list"),
    ({"margin_refusals": "I can't."}, r"`margin_refusals` must be a non-empty list .* got \"I can't.\""),
    ({"margin_refusals": ["No.", 3]}, r"`margin_refusals` must be a non-empty list"),
])
def test_bad_margin_settings_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        OGPSAConfig(**overrides)


def test_margin_objective_needs_margin_batches(tiny_model_dir, lookalikes):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batches = build_reference_set(lookalikes, tokenizer, OGPSAConfig(), max_length=64).batches
    with pytest.raises(ValueError, match="reference_objective='both' needs the reference rows packed"):
        OGPSACallback(OGPSAConfig(reference_objective="both"), batches)


def test_margin_flags_on_the_command_line():
    settings = _training_settings(parse_args([
        "sft", "--model", "m", "--data", "d", "--output", "o", "--reference-objective", "both",
        "--margin-tokens", "2", "--margin-refusals", "No.", "Sorry, no."]))
    assert (settings.ogpsa.reference_objective, settings.ogpsa.margin_tokens) == ("both", 2)
    assert settings.ogpsa.margin_refusals == ["No.", "Sorry, no."]
    assert settings.ogpsa.to_dict()["margin_refusals"] == ["No.", "Sorry, no."]  # what the run config records
