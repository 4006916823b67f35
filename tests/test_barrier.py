"""The look-alike barrier: the dual solver is exact (KKT), a barrier step keeps every look-alike margin's
first-order change above its bound, an inactive barrier changes nothing, it composes with the reference
projection (both guarantees at once), and a resumed run equals the uninterrupted one."""

import json

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from lora_ogpsa import OGPSACallback, OGPSAConfig, build_lookalike_set, build_reference_set
from lora_ogpsa.cli import _training_settings, main, parse_args
from lora_ogpsa.core.barrier import apply_barrier_, gram_matrix, margin_bounds, solve_nonnegative_qp
from lora_ogpsa.signals.margin import example_margins
from lora_ogpsa.utils.errors import InputError
from tests.conftest import HARMFUL, REFUSAL, write_jsonl

REFUSALS = ["I'm sorry, but I can't help with that.", "I cannot help with this."]


# ---- the math ----

def _problem(seed, rows=12, size=200, basis_size=0):
    generator = torch.Generator().manual_seed(seed)
    gradients = torch.randn(rows, size, generator=generator, dtype=torch.float64)
    update = torch.randn(size, generator=generator, dtype=torch.float64)
    bounds = -torch.rand(rows, generator=generator, dtype=torch.float64) * float(seed % 3)  # b ≤ 0: d = 0 feasible
    basis = torch.linalg.qr(torch.randn(size, basis_size, generator=generator, dtype=torch.float64))[0].T
    return gradients, update, bounds, basis


@pytest.mark.parametrize("seed", range(12))
def test_dual_solution_satisfies_the_kkt_conditions(seed):
    gradients, update, bounds, _ = _problem(seed)
    gram = gradients @ gradients.T
    target = bounds - gradients @ update
    multipliers = solve_nonnegative_qp(gram, target)
    residual = target - gram @ multipliers  # = b − G d*
    scale = float(target.abs().max()) + 1.0
    assert bool((multipliers >= 0).all())
    assert float(residual.max()) <= 1e-9 * scale  # primal feasibility: G d* ≥ b
    assert float((multipliers * residual).abs().max()) <= 1e-9 * scale  # complementary slackness


@pytest.mark.parametrize("seed", range(6))
def test_barrier_update_is_feasible_closest_and_orthogonal_to_the_basis(seed):
    gradients, update, bounds, basis = _problem(seed, basis_size=5)
    updates = {"w": update.float().clone()}
    stats = apply_barrier_(updates, {"w": gradients.float()}, bounds, basis_by_name={"w": basis.float()})
    applied = updates["w"].double()
    assert float((bounds - gradients @ applied).max()) <= 1e-5 * float(gradients.norm(dim=1).max() * applied.norm())
    correction = applied - update
    assert float((basis @ correction).norm()) <= 1e-5 * float(correction.norm() + 1e-12)
    assert stats.worst_violation <= 1e-6 * (1 + float(bounds.abs().max()))
    # closest: no feasible point of the form d* + t·(d₀ − d*) with t ∈ (0, 1] (toward d₀) satisfies every constraint
    if stats.active:
        nearer = applied + 1e-3 * (update - applied)
        assert float((bounds - gradients @ nearer).max()) > 0


def test_no_violated_constraint_leaves_the_update_unchanged():
    gradients, update, _, _ = _problem(0)
    bounds = gradients @ update - 1.0  # every constraint holds with room
    updates = {"w": update.float().clone()}
    stats = apply_barrier_(updates, {"w": gradients.float()}, bounds)
    assert stats.active == 0 and stats.violated == 0 and torch.equal(updates["w"], update.float())


def test_parallel_constraints_are_solved():
    gradients, update, _, _ = _problem(1, rows=6, size=50)
    gradients[1] = 2 * gradients[0]  # a singular Gram matrix
    bounds = torch.zeros(6, dtype=torch.float64)
    updates = {"w": update.float().clone()}
    apply_barrier_(updates, {"w": gradients.float()}, bounds)
    assert float((bounds - gradients @ updates["w"].double()).max()) <= 1e-5 * float(update.norm())


def test_bounds_give_the_room_above_the_floor():
    margins = torch.tensor([5.0, 2.0, -1.0])
    bounds = margin_bounds(margins, floor=2.0, step_share=0.5, slack=0.1)
    assert torch.allclose(bounds, torch.tensor([-1.6, -0.1, -0.1], dtype=torch.float64))


def test_gram_with_a_basis_is_the_projected_gram():
    gradients, _, _, basis = _problem(3, basis_size=4)
    projected = gradients - (gradients @ basis.T) @ basis
    assert torch.allclose(gram_matrix({"w": gradients}, {"w": basis}), projected @ projected.T, atol=1e-9)


@pytest.mark.parametrize(("overrides", "match"), [
    ({"barrier_step_share": 0}, r"`barrier_step_share` must be in \(0, 1\], got 0"),
    ({"barrier_slack": -0.5}, r"`barrier_slack` must be a finite number >= 0, got -0.5"),
    ({"barrier_floor": float("inf")}, r"`barrier_floor` must be a finite number, got inf"),
    ({"barrier_refresh_every": -1}, r"`barrier_refresh_every` must be an integer >= 0, got -1"),
    ({"lookalike_examples": 0}, r"`lookalike_examples` must be an integer >= 1, got 0"),
    ({"lookalike_barrier": "yes"}, r"`lookalike_barrier` must be true or false, got 'yes'"),
    ({"lookalike_barrier": True, "protect": "activations"}, r"`lookalike_barrier` needs protect='gradients'"),
])
def test_bad_barrier_settings_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        OGPSAConfig(**overrides)


# ---- on a trainer ----

@pytest.fixture(scope="module")
def lookalikes(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("barrier") / "lookalike.jsonl", [
        {"prompt": [{"role": "user", "content": f"How do I kill process number {i}?"}],
         "completion": [{"role": "assistant", "content": f"Run kill -9 {i}. The process {i} stops."}]}
        for i in range(6)])


class _MarginChange(TrainerCallback):
    """The first-order change g_jᵀΔθ of every look-alike margin over each applied update (autograd, one row at a
    time, at the weights before the step), and the applied update itself."""

    def __init__(self, batches):
        self.batches, self.changes, self.margins, self.updates = batches, [], [], []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        self.parameters = [p for name, p in model.named_parameters() if "lora_" in name]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.before = [p.detach().clone() for p in self.parameters]
        with torch.enable_grad():
            margins = torch.cat([example_margins(self.model, batch) for batch in self.batches])
            self.gradients = [torch.cat([g.flatten() for g in torch.autograd.grad(m, self.parameters,
                                                                                   retain_graph=True)]).double()
                              for m in margins]
        self.margins.append(margins.detach().double())

    def on_optimizer_step(self, args, state, control, **kwargs):
        update = torch.cat([(p.detach() - b).flatten() for p, b in zip(self.parameters, self.before, strict=True)])
        self.updates.append(update.double())
        self.changes.append([(float(g @ update.double()), float(g.norm() * update.norm())) for g in self.gradients])


def _train(model_dir, lookalikes, output, config, *, steps=2, callbacks=(), resume=None, save_steps=0, stage="sft"):
    """SFT on refusals of harmful prompts, or (`stage="dpo"`) DPO preferring the refusal to an answer."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = build_reference_set(lookalikes, tokenizer, config, max_length=64) if config.project != "none" else []
    lookalike = build_lookalike_set(lookalikes, tokenizer, config, max_length=64) if config.lookalike_barrier else None
    ogpsa = OGPSACallback(config, reference, progress=False, lookalike=lookalike)
    common = dict(output_dir=str(output), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                  logging_steps=1, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                  report_to="none", use_cpu=True, bf16=False, max_length=64, seed=0, data_seed=0)
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    if stage == "dpo":
        rows = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": REFUSAL}],
                 "rejected": [{"role": "assistant", "content": f"Sure. Step one for device {i}: take the parts."}]}
                for i, p in enumerate(HARMFUL)]
        trainer_class, args = DPOTrainer, DPOConfig(**common)
    else:
        rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": REFUSAL}]}
                for p in HARMFUL]
        trainer_class, args = SFTTrainer, SFTConfig(**common)
    trainer = trainer_class(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(rows), args=args,
                            peft_config=peft_config, callbacks=[ogpsa, *callbacks])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, ogpsa, lookalike


def _barrier(**overrides):
    values = {"lookalike_barrier": True, "margin_refusals": REFUSALS, "barrier_refresh_every": 1,
              "lookalike_examples": 6, "reference_batch_size": 3, "barrier_floor": 1e6, **overrides}
    return OGPSAConfig(**values)


def test_barrier_step_keeps_every_lookalike_margin_from_falling(tiny_model_dir, lookalikes, tmp_path):
    # floor 1e6: every margin is below it, so none may fall (ε = 0) to first order
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batches = build_lookalike_set(lookalikes, tokenizer, _barrier(), max_length=64).margin_batches
    checker = _MarginChange(batches)
    trainer, _, _ = _train(tiny_model_dir, lookalikes, tmp_path / "out", _barrier(project="none"),
                               callbacks=[checker], steps=3)
    relative = [change / norms for step in checker.changes for change, norms in step]
    assert len(checker.changes) == 3 and min(relative) >= -1e-6, relative
    logged = [row for row in trainer.state.log_history if "ogpsa/barrier_active" in row]
    assert logged and max(row["ogpsa/barrier_active"] for row in logged) >= 1


def test_barrier_holds_under_dpo_and_dpo_without_it_lowers_some_lookalike_margin(tiny_model_dir, lookalikes,
                                                                                     tmp_path):
    # the barrier acts on the update applied, whatever loss made it: a DPO step keeps the margins as an SFT one does
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batches = build_lookalike_set(lookalikes, tokenizer, _barrier(), max_length=64).margin_batches
    guarded, plain = _MarginChange(batches), _MarginChange(batches)
    trainer, _, _ = _train(tiny_model_dir, lookalikes, tmp_path / "barrier", _barrier(project="none"),
                           callbacks=[guarded], steps=3, stage="dpo")
    relative = [change / norms for step in guarded.changes for change, norms in step]
    assert len(guarded.changes) == 3 and min(relative) >= -1e-6, relative
    assert any(row.get("ogpsa/barrier_active", 0) >= 1 for row in trainer.state.log_history)
    _train(tiny_model_dir, lookalikes, tmp_path / "plain", OGPSAConfig(project="none"), callbacks=[plain], steps=3,
           stage="dpo")
    assert min(change / norms for step in plain.changes for change, norms in step) < -1e-3  # the check can fail


def test_without_the_barrier_refusal_training_lowers_some_lookalike_margin(tiny_model_dir, lookalikes, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batches = build_lookalike_set(lookalikes, tokenizer, _barrier(), max_length=64).margin_batches
    checker = _MarginChange(batches)
    _train(tiny_model_dir, lookalikes, tmp_path / "out", OGPSAConfig(project="none"), callbacks=[checker], steps=3)
    assert min(change / norms for step in checker.changes for change, norms in step) < -1e-3  # the check can fail


def test_inactive_barrier_changes_nothing(tiny_model_dir, lookalikes, tmp_path):
    plain, _, _ = _train(tiny_model_dir, lookalikes, tmp_path / "plain", OGPSAConfig(project="none"))
    barrier, _, _ = _train(tiny_model_dir, lookalikes, tmp_path / "barrier",
                           _barrier(project="none", barrier_floor=-1e6))  # all the room in the world
    for (name, a), (_, b) in zip(plain.model.named_parameters(), barrier.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert all(row.get("ogpsa/barrier_active", 0) == 0 for row in barrier.state.log_history)


def test_barrier_and_reference_projection_hold_together(tiny_model_dir, lookalikes, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batches = build_lookalike_set(lookalikes, tokenizer, _barrier(), max_length=64).margin_batches
    checker = _MarginChange(batches)
    _, ogpsa, _ = _train(tiny_model_dir, lookalikes, tmp_path / "out", _barrier(refresh_every=0, max_directions=2),
                         callbacks=[checker], steps=3)
    relative = [change / norms for step in checker.changes for change, norms in step]
    assert min(relative) >= -1e-6, relative
    names = list(ogpsa._parameters)
    basis = torch.block_diag(*[ogpsa.subspace.basis_by_name[name].double() for name in names])  # (Σk, n)
    for update in checker.updates[1:]:  # the basis in force since the refresh after step 1
        assert float((basis @ update).norm()) <= 1e-5 * float(update.norm())


def test_resumed_barrier_run_equals_the_uninterrupted_one(tiny_model_dir, lookalikes, tmp_path):
    config = _barrier(project="none", barrier_refresh_every=3, barrier_floor=0.5)
    whole, _, _ = _train(tiny_model_dir, lookalikes, tmp_path / "whole", config, steps=5, save_steps=2)
    assert sum(row.get("ogpsa/barrier_active", 0) for row in whole.state.log_history) >= 2  # it acted
    assert (tmp_path / "whole" / "checkpoint-2" / "ogpsa_barrier.safetensors").is_file()
    saved = load_file(str(tmp_path / "whole" / "checkpoint-2" / "ogpsa_barrier.safetensors"))
    assert int(saved["__refresh_step__"]) == 0  # checkpoint 2 lies inside the interval refreshed at step 0
    final = {name: p.detach().clone() for name, p in whole.model.named_parameters()}
    resumed, _, _ = _train(tiny_model_dir, lookalikes, tmp_path / "whole", config, steps=5, save_steps=2,
                           resume=str(tmp_path / "whole" / "checkpoint-2"))
    for name, p in resumed.model.named_parameters():
        assert torch.allclose(final[name], p, atol=1e-6, rtol=0), name
    # the check can fail: without the saved state the resume refreshes at step 2, and the run differs
    (tmp_path / "whole" / "checkpoint-2" / "ogpsa_barrier.safetensors").unlink()
    fresh, _, _ = _train(tiny_model_dir, lookalikes, tmp_path / "whole", config, steps=5, save_steps=2,
                         resume=str(tmp_path / "whole" / "checkpoint-2"))
    assert any(not torch.allclose(final[name], p, atol=1e-6, rtol=0) for name, p in fresh.model.named_parameters())


def test_callback_refuses_lookalike_rows_without_the_barrier_and_the_reverse(tiny_model_dir, lookalikes):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lookalike = build_lookalike_set(lookalikes, tokenizer, _barrier(), max_length=64)
    with pytest.raises(ValueError, match="lookalike_barrier needs the look-alike rows"):
        OGPSACallback(_barrier(project="none"), [])
    with pytest.raises(ValueError, match="look-alike rows given but lookalike_barrier is off"):
        OGPSACallback(OGPSAConfig(project="none"), [], lookalike=lookalike)


# ---- the command line ----

def test_barrier_flags_on_the_command_line():
    settings = _training_settings(parse_args([
        "sft", "--model", "m", "--data", "d", "--output", "o", "--lookalike_barrier", "true", "--lookalike", "l.jsonl",
        "--barrier-floor", "3", "--barrier_step_share", "0.5", "--lookalike_examples", "16"]))
    assert settings.ogpsa.lookalike_barrier and str(settings.lookalike) == "l.jsonl"
    assert (settings.ogpsa.barrier_floor, settings.ogpsa.barrier_step_share, settings.ogpsa.lookalike_examples) == (
        3.0, 0.5, 16)


@pytest.mark.parametrize(("extra", "match"), [
    (["--lookalike_barrier", "true"], "--lookalike_barrier needs --lookalike FILE"),
    (["--lookalike", "l.jsonl"], "--lookalike l.jsonl is only read by --lookalike_barrier true"),
])
def test_barrier_flags_without_their_partner_are_refused(extra, match):
    with pytest.raises(InputError, match=match):
        _training_settings(parse_args(["sft", "--model", "m", "--data", "d", "--output", "o", *extra]))


def test_sft_command_with_the_barrier_logs_it_and_saves_its_state(tiny_model_dir, data_files, lookalikes, tmp_path):
    output = tmp_path / "out"
    args = ["sft", "--model", tiny_model_dir, "--data", data_files["sft"], "--reference", data_files["reference"],
            "--output", output, "--no-quantize", "--max_steps", "2", "--save_steps", "1", "--batch-size", "4",
            "--lora-r", "2", "--max-length", "64", "--reference-examples", "4", "--lookalike_barrier", "true",
            "--lookalike", lookalikes, "--lookalike_examples", "4", "--barrier_floor", "100", "--logging_steps", "1"]
    assert main([str(arg) for arg in args]) == 0
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").open()]
    assert any(row.get("ogpsa/barrier_active", 0) >= 1 for row in metrics)
    assert (output / "checkpoint-1" / "ogpsa_barrier.safetensors").is_file()
    assert json.loads((output / "ogpsa_config.json").read_text())["ogpsa"]["lookalike_barrier"] is True


def test_align_command_applies_the_barrier_in_both_stages(tiny_model_dir, data_files, lookalikes, tmp_path):
    output = tmp_path / "out"
    args = ["align", "--model", tiny_model_dir, "--sft-data", data_files["sft"], "--dpo-data", data_files["dpo"],
            "--reference", data_files["reference"], "--output", output, "--no-quantize", "--max-steps", "2",
            "--batch-size", "4", "--lora-r", "2", "--max-length", "64", "--reference-examples", "4",
            "--ogpsa_project", "none", "--lookalike_barrier", "true", "--lookalike", lookalikes,
            "--lookalike_examples", "4", "--barrier_floor", "100", "--logging_steps", "1"]
    assert main([str(arg) for arg in args]) == 0
    for stage in ("sft", "dpo"):
        metrics = [json.loads(line) for line in (output / stage / "metrics.jsonl").open()]
        assert any(row.get("ogpsa/barrier_active", 0) >= 1 for row in metrics), stage
