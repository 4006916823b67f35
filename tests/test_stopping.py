"""Training to matched safety (`compare --until_refusal`): a run stops at the first checkpoint whose dev harmful
refusal reaches the target, a run that never reaches it stops at the cap and says so, the dev reading leaves the
run unchanged (random states put back: the same weights as the capped run), and a rerun trains nothing."""

import json
import random
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerControl

from lora_ogpsa.cli import main
from lora_ogpsa.eval.cached import Evaluator
from lora_ogpsa.eval.stats import bootstrap_ci
from lora_ogpsa.experiment.stopping import RefusalTarget, StopAtRefusal
from lora_ogpsa.train import run as train
from tests.test_compare import write_config


class ReadingsByStep:
    """A dev evaluator whose harmful refusal is `rates[step]`, and which draws random numbers as it reads (a
    model load or a sampled generation would)."""

    suites_key = "planted"

    def __init__(self, rates):
        self.rates, self.read = rates, []

    def evaluate(self, adapter, label):
        torch.rand(3), random.random()
        step = int(adapter.name.split("-")[1])
        self.read.append(step)
        return {"harmful_refusal_rate": self.rates[step]}


def save(callback, step, output_dir="/runs/plain"):
    args, state = SimpleNamespace(output_dir=output_dir), SimpleNamespace(global_step=step, is_world_process_zero=True)
    return callback.on_save(args, state, TrainerControl())


def test_the_run_stops_at_the_first_checkpoint_at_or_above_the_target_and_keeps_the_random_state():
    evaluator = ReadingsByStep({8: 0.2, 16: 0.5, 24: 0.9})
    callback = StopAtRefusal(RefusalTarget(0.5, evaluator), "plain")
    torch.manual_seed(0), random.seed(0)
    expected = torch.rand(2), random.random()
    torch.manual_seed(0), random.seed(0)
    assert save(callback, 8).should_training_stop is False
    after = torch.rand(2), random.random()  # the reading drew numbers; the run's streams are unchanged
    assert torch.equal(after[0], expected[0]) and after[1] == expected[1]
    assert save(callback, 16).should_training_stop is True
    assert evaluator.read == [8, 16]
    assert callback.record(48) == {"target": 0.5, "split": "dev", "max_steps": 48, "stopped_at": 16, "readings": [
        {"step": 8, "dev_harmful_refusal_rate": 0.2}, {"step": 16, "dev_harmful_refusal_rate": 0.5}]}


def planted_by_step(per_step):
    """`Evaluator._run` planted by checkpoint: harmful refusal `per_step[method] · step` (the final adapter
    counts as the checkpoint it equals; a checkpoint is read in `METHOD.partial` while its run trains); benign
    refusal and utility unchanged."""

    def run(self, adapter, merged, scale):
        step = 0 if adapter is None else int(adapter.name.split("-")[1]) if adapter.name.startswith("checkpoint") \
            else None
        method = None if adapter is None else (adapter.parent if step else adapter).name.removesuffix(".partial")
        if step is None:  # the final adapter: the step of the checkpoint it equals
            weights = (adapter / "adapter_model.safetensors").read_bytes()
            step = max(int(path.parent.name.split("-")[1]) for path in adapter.glob("checkpoint-*/adapter_model.safetensors")
                       if path.read_bytes() == weights)
        suites = self.suites
        refused = min(1.0, step * per_step.get(method, 0.0))
        flags = {"harmful_refusal_rate": [i < refused * len(suites.harmful) for i in range(len(suites.harmful))],
                 "over_refusal_rate": [False] * len(suites.benign), "utility_accuracy": [True] * len(suites.utility),
                 "dangerous_sounding_refusal_rate": [False for kind in suites.benign_kinds
                                                     if kind == "sounds_dangerous"]}
        metrics = {key: (sum(values) / len(values) if values else None) for key, values in flags.items()}
        metrics.update({f"{key}_ci": bootstrap_ci(values) if values else None for key, values in flags.items()})
        metrics["responses"] = {
            "harmful": [{"prompt": p, "response": "", "refused": r} for p, r in
                        zip(suites.harmful, flags["harmful_refusal_rate"], strict=True)],
            "benign": [{"prompt": p, "response": "", "refused": False, "kind": k} for p, k in
                       zip(suites.benign, suites.benign_kinds, strict=True)],
            "utility": [{"prompt": item.question, "response": "", "refused": False, "correct": True}
                        for item in suites.utility]}
        return {**metrics, "benign_nll": None, "n_harmful": len(suites.harmful), "n_benign": len(suites.benign),
                "n_utility": len(suites.utility),
                "n_dangerous_sounding": len(flags["dangerous_sounding_refusal_rate"])}

    return run


def test_compare_trains_each_method_to_the_dev_target_or_the_cap(tiny_model_dir, tmp_path, data_files, monkeypatch):
    """`fast` reaches 50 % dev refusal at step 2 of 4 and stops there; `slow` never does and runs to the cap; the
    report says which; a rerun trains and evaluates nothing."""
    monkeypatch.setattr(Evaluator, "_run", planted_by_step({"fast": 0.25, "slow": 0.1}))
    plain = {"ogpsa_project": "none"}
    config = write_config(tmp_path, tiny_model_dir, data_files, {"fast": plain, "slow": {**plain, "learning_rate": 2e-4}},
                          max_steps=4, until_refusal=0.5)
    output = tmp_path / "out"
    assert main(["compare", "--config", str(config), "--output_dir", str(output)]) == 0
    report = json.loads((output / "report.json").read_text())
    stops = report["stops"]["0"]
    assert stops["fast"]["stopped_at"] == 2 and [r["step"] for r in stops["fast"]["readings"]] == [1, 2]
    assert stops["slow"]["stopped_at"] is None and len(stops["slow"]["readings"]) == 4
    assert [p["label"] for p in report["trajectories"]["fast"]] == ["base", "sft-1", "sft-2", "final"]
    assert [p["label"] for p in report["trajectories"]["slow"]][-2:] == ["sft-4", "final"]
    assert report["settings"]["until_refusal"] == 0.5
    assert json.loads((output / "seed-0" / "fast" / "until_refusal.json").read_text())["stopped_at"] == 2
    markdown = (output / "report.md").read_text()
    assert "## Trained to matched safety" in markdown and "| 0 | slow | cap (4 steps) | 40% |" in markdown
    assert "| 0 | fast | step 2 | 50% |" in markdown

    def refuse(*args, **kwargs):
        raise AssertionError("a rerun must not train or evaluate again")

    monkeypatch.setattr(train, "run_sft", refuse)
    monkeypatch.setattr(Evaluator, "_run", refuse)
    assert main(["compare", "--config", str(config), "--output_dir", str(output)]) == 0
    assert json.loads((output / "report.json").read_text())["stops"] == report["stops"]


def test_a_run_that_never_reaches_the_target_has_the_weights_of_the_capped_run(tiny_model_dir, tmp_path,
                                                                               data_files):
    """Real training and greedy dev evaluation on the tiny model (which never refuses): with the target the run
    goes to the cap with the same adapter, bit for bit, as without it."""
    adapters = {}
    for name, extra in (("capped", {}), ("target", {"until_refusal": 1.0})):
        config = write_config(tmp_path, tiny_model_dir, data_files, {"plain": {"ogpsa_project": "none"}},
                              max_steps=3, **extra)
        output = tmp_path / name
        assert main(["compare", "--config", str(config), "--output_dir", str(output)]) == 0
        adapters[name] = load_file(output / "seed-0" / "plain" / "adapter_model.safetensors")
    record = json.loads((tmp_path / "target" / "seed-0" / "plain" / "until_refusal.json").read_text())
    assert record["stopped_at"] is None and [r["step"] for r in record["readings"]] == [1, 2, 3]
    assert adapters["capped"].keys() == adapters["target"].keys()
    assert all(torch.equal(adapters["capped"][key], adapters["target"][key]) for key in adapters["capped"])


@pytest.mark.parametrize(("change", "message"), [
    ({"until_refusal": 1.5}, "until_refusal: every value must be in (0, 1], got 1.5"),
    ({"until_refusal": 0.5, "save_steps": 0}, "until_refusal: read at every checkpoint, and save_steps is 0"),
    ({"until_refusal": 0.5, "stage": "align", "data": None}, "until_refusal: stage align trains SFT then DPO"),
])
def test_a_bad_target_is_one_line_before_any_training(tiny_model_dir, tmp_path, data_files, monkeypatch, capsys,
                                                      change, message):
    monkeypatch.setattr(train, "run_sft", lambda *a, **k: pytest.fail("trained despite a bad configuration"))
    extra = {"sft_data": str(data_files["sft"]), "dpo_data": str(data_files["dpo"])} if "stage" in change else {}
    config = write_config(tmp_path, tiny_model_dir, data_files, {"plain": {"ogpsa_project": "none"}},
                          **change, **extra)
    assert main(["compare", "--config", str(config), "--output_dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1, error
