"""The alignment-tax experiment's plans and variants are what they say (no training here)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from experiments import alignment_tax, demo_mix, refusal_tokens
from lora_ogpsa.config import OGPSAConfig
from lora_ogpsa.demo.plan import Plan
from lora_ogpsa.experiment import stats


@pytest.mark.parametrize("name", sorted(alignment_tax.VARIANTS))
def test_every_variant_is_a_valid_configuration(name):
    method = alignment_tax.VARIANTS[name]
    assert method.name == name.removeprefix("demo-")  # the run's directory, and the summary's row (the demo's own)
    args = alignment_tax.build_parser().parse_args(["--variants", name])
    ogpsa = dataclasses.replace(alignment_tax.plan(args, 0).ogpsa, project=method.project, **method.ogpsa)
    OGPSAConfig.from_dict(ogpsa.to_dict())  # raises on a field or value the config refuses


def test_variants_sharing_a_run_directory_are_refused_together():
    parser = alignment_tax.build_parser()
    assert alignment_tax.chosen_methods(parser, parser.parse_args(["--variants", "plain", "demo-ogpsa"]))[1].name == "ogpsa"
    with pytest.raises(SystemExit) as refused:
        alignment_tax.chosen_methods(parser, parser.parse_args(["--variants", "replay", "demo-replay"]))
    assert refused.value.code == 2


def test_demo_plan_is_make_demos_cpu_plan_with_the_seed():
    args = alignment_tax.build_parser().parse_args(["--plan", "demo", "--steps", "5", "--full-precision"])
    got = alignment_tax.plan(args, 2)
    # dev unless asked; a checkpoint every 8 steps, as every published table of this plan
    assert got == dataclasses.replace(Plan.demo(), seed=2, repeat_seeds=(), eval_split="dev", save_steps=8)
    test = alignment_tax.plan(alignment_tax.build_parser().parse_args(["--plan", "demo", "--split", "test"]), 2)
    assert test == dataclasses.replace(Plan.demo(), seed=2, repeat_seeds=(), save_steps=8)
    assert got.quantize and got.sft_steps == Plan().sft_steps  # the experiment's own options are ignored


def test_demo_plan_trains_to_a_dev_refusal_target_when_asked():
    args = alignment_tax.build_parser().parse_args(["--plan", "demo", "--max-steps", "128", "--until-refusal", "0.7"])
    got = alignment_tax.plan(args, 0)
    assert (got.sft_steps, got.save_steps, got.until_refusal) == (128, 8, 0.7)
    assert alignment_tax.plan(alignment_tax.build_parser().parse_args(["--plan", "demo"]), 0).until_refusal is None


def test_experiment_plan_takes_its_options():
    args = alignment_tax.build_parser().parse_args(["--steps", "5", "--full-precision", "--data", "demo"])
    got = alignment_tax.plan(args, 1)
    assert (got.sft_steps, got.quantize, got.seed, got.data_seed) == (5, False, 1, 0)
    assert got.data_sizes == alignment_tax.DATA_MIXES["demo"]


def test_demo_plan_with_a_dpo_stage_builds_the_pairs():
    args = alignment_tax.build_parser().parse_args(["--plan", "demo", "--dpo-steps", "12"])
    got = alignment_tax.plan(args, 0)
    assert (got.dpo_steps, got.dpo_save_steps) == (12, 12)
    assert got.data_sizes.dpo_pairs > 0 and got.data_sizes.dpo_lookalike > 0
    assert alignment_tax.VARIANTS["plain-align"].stages == "align"


def test_merged_report_keeps_the_variants_asked_and_says_which_are_missing(tmp_path):
    def write(directory, names):
        (tmp_path / directory).mkdir()
        part = {key: {name: {"of": name} for name in ("base", *names)}
                for key in ("models", "trajectories", "lambda_curves")}
        (tmp_path / directory / "report.json").write_text(json.dumps(part))
        return tmp_path / directory / "report.json"

    paths = [write("a", ["plain", "screen"]), write("b", ["replay"]), tmp_path / "absent" / "report.json"]
    merged = alignment_tax.merged_report(paths, ["plain", "replay"])
    assert all(set(merged[key]) == {"base", "plain", "replay"} for key in ("models", "trajectories", "lambda_curves"))
    with pytest.raises(SystemExit, match="no report of ogpsa"):
        alignment_tax.merged_report(paths, ["plain", "ogpsa"])


def test_tuning_entry_points_read_the_dev_split_only(tmp_path, monkeypatch):
    """Every choice (data mix, variant, detector cut) is made on dev: the mix probe evaluates dev and asks
    run_demo to refuse anything else; the detector's cut refuses a test-split (or unsplit) report."""
    seen = {}
    monkeypatch.setattr(demo_mix, "run_demo", lambda **kwargs: seen.update(kwargs) or {"models": {}})
    monkeypatch.setattr("sys.argv", ["demo_mix", "probe", "--sizes", "sft_quick=0"])
    demo_mix.main()
    assert seen["plan"].eval_split == "dev" and seen["tuning"] is True and seen["plan"].data_sizes.sft_quick == 0
    assert alignment_tax.plan(alignment_tax.build_parser().parse_args([]), 0).eval_split == "dev"  # the default
    for split, refused in (("test", True), (None, True), ("dev", False)):
        path = tmp_path / f"{split}.json"
        path.write_text(json.dumps({"settings": {"split": split} if split else {}, "responses": {}}))
        if refused:
            with pytest.raises(SystemExit, match="choose the detector's cut on a --split dev report"):
                refusal_tokens.dev_report(path)
        else:
            assert refusal_tokens.dev_report(path)["settings"]["split"] == "dev"


def test_every_published_results_file_names_its_split():
    """The protocol: each results file says which evaluation split it read (`dev`, `test`, or why `none`)."""
    results = Path(__file__).resolve().parents[1] / "experiments" / "results"
    files = sorted(results.glob("*.json"))
    assert files
    unnamed = [path.name for path in files if not str(json.loads(path.read_text()).get("split") or "").strip()]
    assert unnamed == []


@pytest.mark.parametrize(("names", "baseline"), [(["plain", "margin", "plain-align"], "plain"),
                                                 (["plain-align", "margin-t2-align"], "plain-align"),
                                                 (["margin", "ogpsa"], None)])
def test_methods_are_paired_against_plain_sft_or_plain_sft_then_dpo(monkeypatch, names, baseline):
    calls = []
    monkeypatch.setattr(stats, "paired_tax_difference",
                        lambda curves, name, against, level, metric: calls.append((name, against)) or {})
    paired = alignment_tax.paired_differences({0: {"trajectories": {}}}, names, [0.5])
    assert sorted(paired) == sorted(name for name in names if baseline and name != baseline)
    assert {against for _, against in calls} == ({baseline} if baseline else set())


def test_separability_constrained_direction_keeps_every_lookalike_margin_and_reads_planted_geometry():
    """`experiments.separability` on planted gradients: the constrained direction leaves every look-alike
    margin unchanged to first order; look-alikes orthogonal to the harmful rows cost nothing (cosine 0, all of the
    harmful progress kept), look-alikes equal to them leave nothing (held-out rise 1 per unit unconstrained)."""
    from experiments import separability

    generator = torch.Generator().manual_seed(0)
    harmful = torch.randn(16, 40, generator=generator) + torch.cat([torch.full((20,), 2.0), torch.zeros(20)])
    constraints = torch.randn(6, 40, generator=generator)
    direction = separability.constrained(harmful.mean(0), constraints)
    assert (constraints @ direction).abs().max() < 1e-4 * direction.norm()

    orthogonal = torch.cat([torch.zeros(16, 20), torch.randn(16, 20, generator=generator)], dim=1)
    harmful_only = torch.cat([harmful[:, :20], torch.zeros(16, 20)], dim=1)
    apart = separability.separability(harmful_only, orthogonal, seed=0)
    assert abs(apart["cosine_harmful_lookalike"]) < 1e-6 and apart["constrained_norm_kept"] == pytest.approx(1.0)
    assert apart["heldout_harmful_progress_kept"] == pytest.approx(1.0, abs=1e-4)
    same = separability.separability(harmful, harmful.clone(), seed=0)
    assert same["cosine_harmful_lookalike"] == pytest.approx(1.0)
    assert same["heldout_lookalike_per_harmful_unconstrained"] == pytest.approx(1.0, abs=0.3)
    rise = separability.update_rise({"harmful": harmful_only, "lookalike": orthogonal}, harmful_only.mean(0),
                                    torch.zeros(40))
    assert rise["lookalike_rise"] == pytest.approx(0.0, abs=1e-5) and rise["harmful_rise"] > 0


def test_lookalike_refusal_is_read_where_each_curve_reaches_the_level_and_averaged_only_when_all_do():
    point = lambda harmful, lookalike: {"harmful_refusal_rate": harmful,  # noqa: E731
                                        "dangerous_sounding_refusal_rate": lookalike}
    reports = {0: {"trajectories": {"plain": [point(0.0, 0.0), point(1.0, 0.4)]}},
               1: {"trajectories": {"plain": [point(0.0, 0.0), point(0.6, 0.2)]}}}
    found = alignment_tax.lookalike_at_levels(reports, ["plain"], [0.5, 0.7])["plain"]
    assert found["0.5"]["per_seed"] == pytest.approx([0.2, 0.2 * 5 / 6]) and found["0.5"]["mean"] == pytest.approx(
        (0.2 + 0.2 * 5 / 6) / 2)
    assert found["0.7"]["per_seed"][1] is None and found["0.7"]["mean"] is None
    lines = alignment_tax.lookalike_markdown({"plain": found}, ["0.5", "0.7"])
    assert lines[-1] == "| plain | 18.3% | — |"


def test_barrier_telemetry_reads_the_measured_refresh_margins(tmp_path):
    from experiments import barrier_telemetry

    run = tmp_path / "run"
    run.mkdir()
    steps = [{"step": step, "loss": 1.0, "ogpsa/barrier_active": active, "ogpsa/barrier_violated": active,
              "ogpsa/barrier_removed_share": 0.1 * active, "ogpsa/barrier_loss_progress_kept": 1 - 0.1 * active}
             for step, active in ((1, 0.0), (2, 2.0), (3, 4.0))]
    steps[0]["ogpsa/barrier_refresh_seconds"], steps[2]["ogpsa/barrier_refresh_seconds"] = 3.0, 5.0
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in [{"step": 0, "loss": 2.0}, *steps]))
    log = tmp_path / "train.log"
    log.write_text("step 1/3 | loss 1.0\n"
                   "12:00:00 INFO lora_ogpsa.callback: look-alike barrier refresh at step 0: 6 rows, margin "
                   "min/mean -9.00/4.00 (floor -3)\n"  # before any update: not a fall below the floor
                   "INFO lora_ogpsa.callback: look-alike barrier refresh at step 2: 6 rows, margin min/mean "
                   "-4.25/1.50 (floor -3)\n")
    summary = tmp_path / "telemetry.json"
    assert barrier_telemetry.main(["--run", f"a={run}:{log}", "--floor", "-3", "--split", "dev",
                                   "--summary", str(summary)]) == 0
    written = json.loads(summary.read_text())
    assert written["split"] == "dev" and written["command"].startswith("python -m experiments.barrier_telemetry")
    got = written["runs"]["a"]
    assert got["steps"] == 3 and got["mean_active"] == pytest.approx(2.0) and got["mean_refresh_seconds"] == 4.0
    assert got["mean_removed_share"] == pytest.approx(0.2) and got["mean_loss_progress_kept"] == pytest.approx(0.8)
    assert [item["step"] for item in got["refreshes"]] == [0, 2] and got["worst_below_floor"] == pytest.approx(1.25)
    with pytest.raises(ValueError, match="not a run with --lookalike_barrier"):
        barrier_telemetry.run_summary([{"step": 1, "loss": 1.0}], "", -3.0)
