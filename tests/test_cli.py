"""The TRL-style command line: generated from the dataclasses, both spellings, YAML, old names, trackers."""

import dataclasses
import json
import re

import pytest
from safetensors import safe_open
from transformers import TrainingArguments

from lora_ogpsa import __version__
from lora_ogpsa.cli import _training_settings, build_parser, main, parse_args


@pytest.mark.parametrize("command", ["sft", "dpo", "align"])
def test_help_lists_every_training_arguments_field(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    shown = capsys.readouterr().out
    names = [field.name for field in dataclasses.fields(TrainingArguments) if field.init]
    missing = [name for name in names if f"--{name}" not in shown]
    assert missing == []
    for flag in ("--ogpsa_project", "--project", "--lora_target_modules", "--use_rslora", "--max_directions",
                 "--reference", "--no-quantize", "--batch-size", "--output"):
        assert flag in shown
    assert "AdamW learning rate" in shown  # each field's help is shown


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"lora-ogpsa {__version__}"


def _settings(argv):
    return _training_settings(parse_args(argv))


def test_underscore_and_dash_spellings_are_the_same_flag():
    base = ["sft", "--model", "m", "--data", "d", "--output", "o"]
    dashes = _settings([*base, "--learning-rate", "3e-4", "--max-steps", "7", "--lr-scheduler-type", "cosine"])
    underscores = _settings([*base, "--learning_rate", "3e-4", "--max_steps", "7", "--lr_scheduler_type", "cosine"])
    assert dashes == underscores
    assert (dashes.learning_rate, dashes.max_steps) == (3e-4, 7)
    assert dashes.training_arguments == {"lr_scheduler_type": "cosine"}


def test_old_flags_are_aliases_of_trl_names():
    old = _settings(["sft", "--model", "m", "--data", "d", "--output", "o", "--batch-size", "3", "--no-quantize",
                     "--seed", "5", "--max-length", "99", "--save-steps", "4"])
    new = _settings(["sft", "--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o",
                     "--per_device_train_batch_size", "3", "--no_quantize", "--seed", "5", "--max_length", "99",
                     "--save_steps", "4"])
    assert old == new
    assert (old.batch_size, old.quantize, old.seed, old.max_length, old.save_steps) == (3, False, 5, 99, 4)


def test_defaults_left_alone_are_not_recorded_as_choices():
    settings = _settings(["dpo", "--model", "m", "--data", "d", "--output", "o"])
    assert settings.training_arguments == {}
    assert (settings.max_steps, settings.logging_steps, settings.beta) == (-1, 10, 0.1)


def test_a_trl_style_yaml_runs_with_only_our_keys_added(tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text(
        "# as for `trl sft --config`\n"
        "model_name_or_path: HuggingFaceTB/SmolLM2-135M-Instruct\n"
        "dataset_name: data/sft.jsonl\n"
        "learning_rate: 2.0e-4\nnum_train_epochs: 1\nper_device_train_batch_size: 2\n"
        "gradient_accumulation_steps: 8\nlogging_steps: 5\noutput_dir: runs/x\nreport_to: tensorboard\n"
        "use_peft: true\nlora_r: 32\nlora_alpha: 16\nlora_target_modules: [q_proj, v_proj]\nload_in_4bit: true\n"
        "lr_scheduler_type: cosine\nwarmup_steps: 0.1\nweight_decay: 0.01\noptim: paged_adamw_8bit\n"
        "save_total_limit: 2\nenv:\n  SOME_VAR: 1\n"
        "# ours\nreference: data/reference.jsonl\nproject: update\nmax_directions: 4\n")
    settings = _settings(["sft", "--config", str(config), "--lora_r", "8"])  # the flag wins over the file
    assert str(settings.model) == "HuggingFaceTB/SmolLM2-135M-Instruct" and settings.data == "data/sft.jsonl"
    assert (settings.lora_r, settings.lora_alpha, settings.lora_target_modules) == (8, 16, ["q_proj", "v_proj"])
    assert (settings.batch_size, settings.gradient_accumulation_steps, settings.logging_steps) == (2, 8, 5)
    assert settings.quantize and settings.ogpsa.max_directions == 4
    assert settings.training_arguments == {"num_train_epochs": 1.0, "report_to": "tensorboard",
                                           "lr_scheduler_type": "cosine", "warmup_steps": 0.1,
                                           "weight_decay": 0.01, "optim": "paged_adamw_8bit",
                                           "save_total_limit": 2}


def test_old_yaml_keys_keep_working(tmp_path):
    config = tmp_path / "old.yaml"
    config.write_text("model: m\ndata: d\noutput: o\nbatch_size: 4\nlearning_rate: 1.0e-3\nmax_steps: 3\n"
                      "no_quantize: true\nlora_r: 4\nrefresh_every: 2\nreference_examples: 6\n")
    settings = _settings(["sft", "--config", str(config)])
    assert (settings.batch_size, settings.learning_rate, settings.max_steps, settings.quantize) == (4, 1e-3, 3, False)
    assert (settings.lora_r, settings.ogpsa.refresh_every, settings.ogpsa.reference_examples) == (4, 2, 6)


def test_the_parser_takes_no_abbreviations():
    parser = build_parser()
    subparser = next(a for a in parser._actions if a.dest == "command").choices["sft"]
    assert subparser.allow_abbrev is False and parser.allow_abbrev is False


def _events(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(directory.rglob("events.out.tfevents.*"))
    assert files, f"no event files under {directory}"
    tags = set()
    for path in files:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


def test_epochs_target_modules_tensorboard_and_console_lines(tiny_model_dir, data_files, tmp_path, capsys):
    output = tmp_path / "out"
    args = ["sft", "--model", tiny_model_dir, "--data", data_files["sft"], "--reference", data_files["reference"],
            "--output", output, "--no-quantize", "--num_train_epochs", "1", "--batch-size", "4",
            "--lora_target_modules", "q_proj", "v_proj", "--lora-r", "2", "--max-length", "64",
            "--reference-examples", "4", "--report_to", "tensorboard", "--logging_steps", "2"]
    assert main([str(arg) for arg in args]) == 0
    rows = sum(1 for _ in data_files["sft"].open())
    trained_steps = max(line["step"] for line in map(json.loads, (output / "metrics.jsonl").open()))
    assert trained_steps == -(-rows // 4)  # one epoch, no --max_steps
    with safe_open(str(output / "adapter_model.safetensors"), framework="pt") as handle:
        modules = {re.search(r"\.(\w+_proj)\.lora_", name).group(1) for name in handle.keys()}  # noqa: SIM118
    assert modules == {"q_proj", "v_proj"}
    tags = _events(output)
    assert {"train/loss", "train/ogpsa/span_fraction"} <= tags
    console = [line for line in capsys.readouterr().out.splitlines() if "| loss" in line]
    assert len(console) == trained_steps // 2 and console[0].startswith(f"step 2/{trained_steps} | loss ")


def test_demo_seeds_flag_sets_the_repeat_seeds_and_refuses_zero(tmp_path, capsys):
    from lora_ogpsa.demo.plan import Plan

    assert parse_args(["demo", "--seeds", "3"]).seeds == 3
    assert Plan.demo(seeds=3).repeat_seeds == (1, 2)
    assert Plan.demo(seeds=1).repeat_seeds == ()
    output = tmp_path / "demo"
    assert main(["demo", "--seeds", "0", "--output", str(output)]) == 2
    assert "--seeds must be an integer >= 1, got 0" in capsys.readouterr().err
    assert not output.exists()
