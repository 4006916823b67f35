"""Bad input: exit 2, one clear line on stderr naming what is wrong, and nothing written."""

import gzip
import json
import re

import pytest

from lora_ogpsa.cli import main


def _loop(path):
    path.with_name("other").symlink_to(path)
    path.symlink_to(path.with_name("other"))
    return path


def _gzipped(path):
    path.write_bytes(gzip.compress((GOOD_LINE + "\n").encode()))
    return path


def _bad_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    return path


GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]})

# case: (flag overrides, extra flags, expected message); `t` is the test's tmp_path
CASES = {
    "missing data file": (lambda t: {"--data": t / "nope.jsonl"}, [], r"--data .*nope.jsonl: no such file"),
    "empty data file": (lambda t: {"--data": _bad_file(t, "e.jsonl", "")}, [], r"e.jsonl: the file is empty"),
    "invalid JSON line": (lambda t: {"--data": _bad_file(t, "j.jsonl", GOOD_LINE + "\n{oops\n")}, [],
                          r"j.jsonl:2: invalid JSON"),
    "missing field": (lambda t: {"--data": _bad_file(t, "m.jsonl", GOOD_LINE + "\n" + json.dumps({"text": "x"}))},
                      [], r"m.jsonl:2: missing field 'messages'"),
    "wrong field type": (lambda t: {"--data": _bad_file(t, "w.jsonl", json.dumps({"prompt": "x", "completion": 5}))},
                         [], r"w.jsonl:1: field 'completion' must be a string"),
    "nonexistent model": (lambda t: {"--model": t / "no-model"}, [], r"--model .*no-model: no such directory"),
    "model without config": (lambda t: {"--model": t}, [], r"no config.json"),
    "empty reference": (lambda t: {"--reference": _bad_file(t, "r.jsonl", "\n\n")}, [],
                        r"--reference .*no usable rows"),
    "bad energy": (lambda t: {}, ["--energy", "1.5"], r"--energy must be in \(0, 1\]"),
    "bad steps": (lambda t: {}, ["--max-steps", "0"], r"--max-steps must be -1 .* or an integer >= 1"),
    "bad alpha": (lambda t: {}, ["--lora-alpha", "nan"], r"--lora-alpha must be a positive number"),
    "abbreviated flag": (lambda t: {}, ["--learn", "1e-3"], r"unrecognized arguments: --learn"),
    "bad trainer value": (lambda t: {}, ["--lr_scheduler_type", "wobbly"], r"invalid choice: 'wobbly'"),
    "dora with projection": (lambda t: {}, ["--use_dora"], r"--use_dora: OGPSA projects lora_A/lora_B only"),
    "replay without projection": (lambda t: {}, ["--ogpsa_project", "none", "--replay", "r.jsonl"],
                                  r"--replay adds its gradient after the gradient projection: it needs --ogpsa_project grad"),
    "replay with update": (lambda t: {}, ["--replay", "r.jsonl"], r"it needs --ogpsa_project grad, got --ogpsa_project update"),
    "bad replay fraction": (lambda t: {}, ["--replay-fraction", "1.5"], r"--replay-fraction must be in \(0, 1\)"),
    "unknown flag": (lambda t: {}, ["--max-stepz", "3"], r"unrecognized arguments: --max-stepz"),
    "bad mode": (lambda t: {}, ["--ogpsa_project", "both"], r"invalid choice: 'both'"),
    "bad config key": (lambda t: {"--config": _bad_file(t, "c.yaml", "max_step: 3\n")}, [],
                       r"--config .*c.yaml: unknown key 'max_step'; did you mean 'max_steps'\?"),
    "resume and overwrite": (lambda t: {}, ["--resume", "--overwrite"], r"--resume and --overwrite contradict"),
    # issue 26, causes B, C and F: numbers out of range, caught before OUT.partial exists
    "negative seed": (lambda t: {}, ["--seed", "-1"], r"--seed must be an integer in \[0, 4294967295\], got -1"),
    "beta1 over 1": (lambda t: {}, ["--adam_beta1", "2"], r"--adam_beta1 must be in \[0, 1\), got 2"),
    "negative warmup": (lambda t: {}, ["--warmup_steps", "-1"], r"--warmup_steps must be >= 0, got -1"),
    "zero epochs": (lambda t: {}, ["--num_train_epochs", "0"], r"--num_train_epochs must be > 0"),
    "negative epochs": (lambda t: {}, ["--num_train_epochs", "-1"], r"--num_train_epochs must be > 0"),
    "huge alpha": (lambda t: {}, ["--lora-alpha", "1e30"], r"the LoRA scale alpha/r .* is over 1024"),
    "nan grad norm": (lambda t: {}, ["--max_grad_norm", "nan"], r"--max_grad_norm must be a finite number"),
    "negative weight decay": (lambda t: {}, ["--weight_decay", "-1"], r"--weight_decay must be >= 0, got -1"),
    "negative learning rate, exponent": (lambda t: {}, ["--learning-rate", "-1e-3"],
                                         r"--learning-rate must be a positive number, got -0.001"),
    "absent target module": (lambda t: {}, ["--lora_target_modules", "nonexistent_proj"],
                             r"--lora_target_modules nonexistent_proj: no such linear module in --model .*it has .*q_proj"),
    "rank over the layer": (lambda t: {}, ["--lora-r", "4096"], r"--lora-r 4096 is over the smaller dimension of "),
    "output name too long": (lambda t: {"--output": t / ("o" * 250)}, [],
                             r"the name is 250 bytes; .* use a name of at most 241 bytes"),
    "output a symlink loop": (lambda t: {"--output": _loop(t / "loop")}, [], r"loop: a symlink loop; remove the link"),
    "lone surrogate": (lambda t: {"--data": _bad_file(t, "s.jsonl", GOOD_LINE + "\n" + GOOD_LINE.replace("hi", "\\ud800"))},
                       [], r"s.jsonl:2: a lone UTF-16 surrogate"),
    "gzip data": (lambda t: {"--data": _gzipped(t / "d.jsonl")}, ["--max-steps", "1"],
                  r"d.jsonl: a gzip archive, not JSON Lines text; decompress it first"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tiny_model_dir, data_files, tmp_path, capsys, case):
    overrides, extra, message = CASES[case]
    output = tmp_path / "out"
    flags = {"--model": tiny_model_dir, "--data": data_files["sft"], "--reference": data_files["reference"],
             "--output": output, **overrides(tmp_path)}
    args = ["sft", *[pair for item in flags.items() for pair in item], "--no-quantize", *extra]
    assert main([str(arg) for arg in args]) == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.count("\n") == 0 and stderr.startswith("lora-ogpsa: error:")
    assert re.search(message, stderr), stderr
    assert not output.exists() and not (tmp_path / "out.partial").exists()


def test_existing_output_is_refused_and_left_untouched(tiny_model_dir, data_files, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    args = ["sft", "--model", tiny_model_dir, "--data", data_files["sft"], "--reference", data_files["reference"],
            "--output", output, "--no-quantize", "--max-steps", "1"]
    assert main([str(arg) for arg in args]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in output.iterdir()] == ["keep.txt"] and (output / "keep.txt").read_text() == "precious"


def test_dpo_adapter_without_config_is_refused(tiny_model_dir, data_files, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = ["dpo", "--model", tiny_model_dir, "--data", data_files["dpo"], "--reference", data_files["reference"],
            "--adapter", tmp_path / "empty", "--output", tmp_path / "out", "--no-quantize"]
    assert main([str(arg) for arg in args]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_degenerate_input_is_a_warning_with_a_count(tiny_model_dir, data_files, tmp_path, caplog):
    rows = [json.loads(line) for line in data_files["dpo"].read_text().splitlines()]
    rows[0]["rejected"] = rows[0]["chosen"]
    dpo = tmp_path / "dpo.jsonl"
    dpo.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["dpo", "--model", tiny_model_dir, "--data", dpo, "--reference", data_files["reference"],
            "--output", tmp_path / "out", "--no-quantize", "--max-steps", "1", "--reference-examples", "100",
            "--max-length", "64", "--lora-r", "2"]
    assert main([str(arg) for arg in args]) == 0
    assert "skipped 1 preference rows whose chosen equals rejected" in caplog.text
    assert "has 12 rows, fewer than reference_examples=100: using all of them" in caplog.text
    config = json.loads((tmp_path / "out" / "ogpsa_config.json").read_text())
    assert (config["skipped_rows"], config["reference_rows"], config["training_rows"]) == (1, 12, 15)
