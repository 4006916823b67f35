"""The demo report: interpolation at matched safety, and the files it writes."""

import json

import pytest

from lora_ogpsa.experiment.report import build_report, final_table, matched_table, verdict, write_report
from lora_ogpsa.experiment.stats import interpolate_at, matched_safety, tax_at, tax_table

BASE = {"harmful_refusal_rate": 0.0, "over_refusal_rate": 0.0, "utility_accuracy": 1.0, "benign_nll": 1.0}


def _point(safety, utility, over, nll=1.5, label="x"):
    return {"harmful_refusal_rate": safety, "utility_accuracy": utility, "over_refusal_rate": over,
            "benign_nll": nll, "label": label}


TRAJECTORIES = {
    "ogpsa": [BASE, _point(0.4, 0.9, 0.1), _point(0.8, 0.8, 0.2)],
    "plain": [BASE, _point(0.6, 0.4, 0.5), _point(1.0, 0.0, 1.0)],
}


def test_interpolates_linearly_along_training_order():
    points = TRAJECTORIES["plain"]
    assert interpolate_at(points, 0.3, "utility_accuracy") == pytest.approx(0.7)  # halfway from 1.0 to 0.4
    assert interpolate_at(points, 0.6, "over_refusal_rate") == pytest.approx(0.5)
    assert interpolate_at(points, 0.8, "utility_accuracy") == pytest.approx(0.2)
    assert interpolate_at(points, 0.0, "utility_accuracy") == pytest.approx(1.0)
    assert interpolate_at(TRAJECTORIES["ogpsa"], 0.9, "utility_accuracy") is None  # never reached


def test_first_upward_crossing_counts():
    points = [BASE, _point(0.6, 0.5, 0.1), _point(0.2, 0.9, 0.0), _point(0.6, 0.1, 0.3)]
    assert interpolate_at(points, 0.3, "utility_accuracy") == pytest.approx(0.75)


def test_matched_safety_keeps_levels_every_method_reaches():
    rows = matched_safety(TRAJECTORIES, levels=(0.3, 0.5, 0.7, 0.9))
    assert [row["harmful_refusal_rate"] for row in rows] == [0.3, 0.5, 0.7]
    at_half = rows[1]
    assert at_half["ogpsa"]["utility_accuracy"] == pytest.approx(0.875)
    assert at_half["plain"]["utility_accuracy"] == pytest.approx(0.5)
    assert at_half["plain"]["over_refusal_rate"] == pytest.approx(5 / 12)


def test_report_files_and_tables(tmp_path):
    report = build_report(model_path="/models/base", settings={"steps": 3},
                          models={"base": BASE, "ogpsa": TRAJECTORIES["ogpsa"][-1], "plain": TRAJECTORIES["plain"][-1]},
                          trajectories=TRAJECTORIES, timings={"total": 12.0})
    paths = write_report(report, tmp_path)
    written = json.loads(paths["json"].read_text())
    assert written["model_path"] == "/models/base" and set(written["models"]) == {"base", "ogpsa", "plain"}
    assert written["models"]["ogpsa"]["harmful_refusal_rate"] == 0.8
    assert written["trajectories"]["plain"][1]["utility_accuracy"] == 0.4
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = paths["markdown"].read_text()
    assert "## At matched safety" in text and "| 50% | 88% / 12% | 50% / 42% |" in text
    assert "| OGPSA (update mode) | 80% | – | 20% | 80% | 1.500 |" in final_table(report)
    assert "## Alignment tax at matched safety" in text and written["verdict"].startswith("The final OGPSA")
    assert "no common" in matched_table({"matched_safety": [], "trajectories": TRAJECTORIES})


def test_alignment_tax_at_matched_safety_with_an_interval():
    # at 50 % harmful refused: ogpsa utility 0.875, over-refusal 0.125 -> tax 12.5 + 12.5 = 25 points
    assert tax_at(TRAJECTORIES["ogpsa"], 0.5)["tax"] == pytest.approx(25.0)
    assert tax_at(TRAJECTORIES["ogpsa"], 0.5)["ci"] is None  # no per-point intervals given
    assert tax_at(TRAJECTORIES["ogpsa"], 0.9) is None  # never reached
    with_ci = [{**p, "utility_accuracy_ci": [p["utility_accuracy"] - 0.03, p["utility_accuracy"] + 0.03],
                "over_refusal_rate_ci": [p["over_refusal_rate"] - 0.04, p["over_refusal_rate"] + 0.04]}
               for p in TRAJECTORIES["plain"]]
    found = tax_at(with_ci, 0.3)  # utility 0.7, over-refusal 0.25 -> 30 + 25 = 55
    assert found["tax"] == pytest.approx(55.0) and found["ci"] == pytest.approx([50.0, 60.0])  # hypot(3, 4) = 5
    table = tax_table({"ogpsa": TRAJECTORIES["ogpsa"], "plain λ": TRAJECTORIES["plain"]}, levels=(0.5, 0.9))
    assert set(table["ogpsa"]) == {"0.5"} and set(table["plain λ"]) == {"0.5", "0.9"}


def test_verdict_says_whether_the_model_is_usable_and_compares_with_plain():
    good = {"harmful_refusal_rate": 0.8, "dangerous_sounding_refusal_rate": 0.1, "utility_accuracy": 0.9}
    report = {"models": {"ogpsa": good}, "tax": {"ogpsa": {"0.5": {"tax": 5.0, "ci": [2.0, 8.0]}},
                                                 "plain": {"0.5": {"tax": 20.0, "ci": [15.0, 25.0]}}}}
    text = verdict(report)
    assert "usable by this project's bar" in text and "do not overlap" in text and "At 50% HarmBench" in text
    bad = verdict({"models": {"ogpsa": {**good, "dangerous_sounding_refusal_rate": 0.6}}, "tax": {}})
    assert "not yet usable: dangerous-sounding benign refused 60%" in bad and "cannot be compared" in bad


def test_intervals_are_cut_to_what_a_rate_or_a_tax_can_be():
    from lora_ogpsa.experiment.stats import across_seeds, clip_interval, tax_range

    assert clip_interval([-0.2, 0.4], 0.0, 1.0) == [0.0, 0.4] and clip_interval(None, 0.0, 1.0) is None
    assert clip_interval([0.7, 1.3], 0.0, 1.0) == [0.7, 1.0]
    assert tax_range(BASE) == (0.0, 200.0)  # the base answers everything: no tax below 0
    # three seeds whose HarmBench refusal spreads widely: the t-interval passes 100 %, the reported one stops there
    seeds = {seed: {"models": {"base": {**BASE, "dangerous_sounding_refusal_rate": 0.0},
                               "ogpsa": {**_point(safety, 0.9, 0.1), "dangerous_sounding_refusal_rate": 0.1}},
                    "trajectories": {"ogpsa": [BASE, _point(safety, 0.9, 0.1)]}, "lambda_curves": {}}
             for seed, safety in enumerate((0.5, 0.98, 1.0))}
    final = across_seeds(seeds)["finals"]["ogpsa"]["harmful_refusal_rate"]
    assert final["ci"][1] == 1.0 and final["ci"][0] < final["mean"] < 1.0
    # a tax interval from wide per-point intervals stops at the tax the base allows (0 here)
    wide = [{**p, "utility_accuracy_ci": [p["utility_accuracy"] - 0.4, p["utility_accuracy"] + 0.4],
             "over_refusal_rate_ci": [p["over_refusal_rate"] - 0.3, p["over_refusal_rate"] + 0.3]}
            for p in TRAJECTORIES["ogpsa"]]
    assert tax_at(wide, 0.3)["ci"][0] == 0.0


def test_coinciding_points_share_one_label_in_the_plot():
    from lora_ogpsa.experiment.report import point_labels

    last = _point(0.8, 0.8, 0.2, label="sft-32")
    curves = {"ogpsa": [{**BASE, "label": "base"}, last, {**last, "label": "final"}],
              "plain": [{**BASE, "label": "base"}, _point(0.6, 0.4, 0.5, label="sft-32"),
                        _point(0.6, 0.4, 0.5, label="final")]}
    labels = point_labels(curves, "utility_accuracy")
    assert labels == {(0.0, 1.0): "base", (0.8, 0.8): "sft-32 = final", (0.6, 0.4): "sft-32 = final"}
