"""What a TRL/PEFT user hits first (issue 23): help text, TRL's flags with TRL's meanings, resume, provenance."""

import argparse
import json
from pathlib import Path

import pytest
import torch

from lora_ogpsa.cli import _subparser, build_parser, main

COMMANDS = ("sft", "dpo", "align", "export", "merge", "eval", "demo")


def _help_actions(command):
    parser = _subparser(build_parser(), command)
    return parser, [action for action in parser._actions if action.option_strings
                    and not isinstance(action, argparse._HelpAction)]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_help_text_and_shows_its_default(command):
    parser, actions = _help_actions(command)
    assert [action.option_strings[0] for action in actions if not (action.help or "").strip()] == []
    text = parser.format_help()
    assert "(default: True)" not in text.split("--no-gradient-checkpointing")[-1].split("\n  --")[0]
    for action in actions:
        if action.default is argparse.SUPPRESS or isinstance(action, argparse._StoreConstAction):
            continue
        formatted = parser._get_formatter()._expand_help(action) if action.help else ""
        assert "default" in formatted.lower(), (command, action.option_strings[0], formatted)
        assert formatted.lower().count("default:") <= 1, (command, action.option_strings[0], formatted)


def _sft(tiny_model_dir, data_files, output, *extra):
    return main([str(arg) for arg in ["sft", "--model", tiny_model_dir, "--data", data_files["sft"], "--reference",
                                      data_files["reference"], "--output", output, "--no-quantize", "--lora-r", "2",
                                      "--max-length", "64", "--batch-size", "4", "--reference-examples", "4", *extra]])


def _adapter(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def test_resume_from_checkpoint_resumes_like_resume(tiny_model_dir, data_files, tmp_path, caplog):
    """Finding 1: `--resume_from_checkpoint out/checkpoint-N` was accepted and ignored (training began at step 1)."""
    import logging
    import shutil

    first = tmp_path / "a"
    assert _sft(tiny_model_dir, data_files, first, "--max-steps", "2", "--save-steps", "1", "--logging-steps", "1") == 0
    second = tmp_path / "b"
    shutil.copytree(first, second)
    assert _sft(tiny_model_dir, data_files, first, "--max-steps", "3", "--save-steps", "1", "--logging-steps", "1", "--resume") == 0
    with caplog.at_level(logging.INFO, logger="lora_ogpsa"):
        assert _sft(tiny_model_dir, data_files, second, "--max-steps", "3", "--save-steps", "1", "--logging-steps", "1",
                    "--resume_from_checkpoint", second / "checkpoint-2") == 0
    assert any("checkpoint-2" in record.getMessage() and "resuming" in record.getMessage() for record in caplog.records)
    ours, theirs = _adapter(first), _adapter(second)
    assert all(bool((ours[name] == theirs[name]).all()) for name in ours)  # bit for bit
    steps = [json.loads(line)["step"] for line in (second / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3]


def test_resume_from_a_checkpoint_of_another_run_is_refused(tiny_model_dir, data_files, tmp_path, capsys):
    other = tmp_path / "other" / "checkpoint-1"
    other.mkdir(parents=True)
    assert _sft(tiny_model_dir, data_files, tmp_path / "run", "--max-steps", "1",
                "--resume_from_checkpoint", other) == 2
    assert "not inside --output" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_save_steps_zero_and_completion_only_loss_false_on_the_command_line(tiny_model_dir, data_files, tmp_path):
    """Findings 6 and 3: `--save_steps 0` was refused as 0.0; `--completion_only_loss false` crashed SFTConfig."""
    assert _sft(tiny_model_dir, data_files, tmp_path / "a", "--max-steps", "1", "--save_steps", "0") == 0
    assert not list((tmp_path / "a").glob("checkpoint-*"))
    assert _sft(tiny_model_dir, data_files, tmp_path / "b", "--max-steps", "1", "--completion_only_loss",
                "false") == 0
    config = json.loads((tmp_path / "b" / "ogpsa_config.json").read_text())
    assert config["training_arguments"]["completion_only_loss"] is False


def test_a_three_turn_row_trains_every_assistant_turn(tiny_model_dir, tmp_path):
    """Finding 3: a `messages` row trained only its last reply; TRL's meaning trains every turn (all tokens by
    default; every assistant turn with --assistant_only_loss)."""
    from lora_ogpsa.data.rows import read_rows
    from lora_ogpsa.models.loading import load_tokenizer
    from lora_ogpsa.train.settings import TrainSettings
    from lora_ogpsa.train.trainers import sft_examples

    turns = [{"role": "user", "content": "Hi there, what is two plus two?"}, {"role": "assistant", "content": "Four."},
             {"role": "user", "content": "And three plus three?"}, {"role": "assistant", "content": "Six."},
             {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome."}]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": turns}) + "\n")
    tokenizer = load_tokenizer(tiny_model_dir)
    rows = read_rows(path, "sft").rows
    for extra, wanted, unwanted in (({}, ("Four.", "Thanks"), ()), ({"assistant_only_loss": True}, ("Four.", "Six."),
                                                                     ("Thanks",))):
        settings = TrainSettings(model=tiny_model_dir, output=tmp_path / "o", data=str(path), reference=str(path),
                                 training_arguments=extra)
        [example] = sft_examples(rows, tokenizer, settings)
        trained = tokenizer.decode([label for label in example["labels"] if label != -100])
        assert all(text in trained for text in wanted) and not any(text in trained for text in unwanted), trained


def test_project_is_trls_trackio_project_and_the_old_mode_spelling_still_works(caplog):
    """Finding 4: `project:` of a `trl sft` config collided with OGPSA's mode."""
    import logging

    from lora_ogpsa.cli import _training_settings, parse_args

    base = ["sft", "--model", "m", "--data", "d.jsonl", "--output", "o", "--reference", "r.jsonl"]
    settings = _training_settings(parse_args([*base, "--project", "my-trackio"]))
    assert settings.training_arguments["project"] == "my-trackio" and settings.ogpsa.project == "update"
    assert _training_settings(parse_args([*base, "--ogpsa_project", "grad"])).ogpsa.project == "grad"
    with caplog.at_level(logging.WARNING):
        old = _training_settings(parse_args([*base, "--project", "none"]))
    assert old.ogpsa.project == "none" and "project" not in old.training_arguments
    assert any("deprecated" in record.getMessage() and "--ogpsa_project none" in record.getMessage()
               for record in caplog.records)


TRL_CONFIGS = Path(__file__).parent / "data" / "trl_configs"
COMPARED = ("learning_rate", "lr_scheduler_type", "num_train_epochs", "per_device_train_batch_size",
            "gradient_accumulation_steps", "logging_steps", "report_to", "project", "beta", "max_length")


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_trls_own_config_parses_to_the_same_training_arguments(command, tmp_path):
    """Finding 4: a `trl sft|dpo --config` YAML with only `reference:` added runs through `lora-ogpsa`, and the
    TrainingArguments both build agree on every key the file sets."""
    import yaml
    from trl.scripts.dpo import make_parser as trl_dpo_parser
    from trl.scripts.sft import make_parser as trl_sft_parser

    from lora_ogpsa.cli import _training_settings, parse_args
    from lora_ogpsa.train.trainers import trainer_config

    source = TRL_CONFIGS / f"{command}.yaml"
    keys = yaml.safe_load(source.read_text())
    ours_file = tmp_path / "ours.yaml"
    ours_file.write_text(source.read_text() + "reference: examples/data/reference.jsonl\n")
    settings = _training_settings(parse_args([command, "--config", str(ours_file)]))
    ours = trainer_config(command, settings, tmp_path / "out")
    parser = (trl_sft_parser if command == "sft" else trl_dpo_parser)()
    on_cpu = [] if torch.cuda.is_available() else ["--use_cpu", "true"]  # TRL's bf16 default needs a GPU
    _, theirs, model_config = parser.parse_args_and_config(["--config", str(source), *on_cpu])[:3]
    for key in COMPARED:
        if key in keys:
            assert getattr(ours, key) == getattr(theirs, key), key
    assert (settings.lora_r, settings.lora_alpha) == (model_config.lora_r, model_config.lora_alpha)
    assert settings.model == model_config.model_name_or_path and settings.data == keys["dataset_name"]


@pytest.mark.parametrize(("key", "value", "reason"), [
    ("dtype", "bfloat16", "loads the base in float32"), ("attn_implementation", "flash_attention_2", "its own attention"),
    ("lora_task_type", "SEQ_CLS", "causal language models only"), ("bnb_4bit_quant_type", "fp4", "is NF4"),
    ("dataset_train_split", "validation", "reads the 'train' split"), ("load_in_8bit", "true", "NF4 or full"),
    ("lora_modules_to_save", "[lm_head]", "outside OGPSA's projection"), ("use_bnb_nested_quant", "false", "double"),
    ("use_peft", "false", "LoRA adapters only")])
def test_a_trl_key_at_a_value_we_do_not_run_is_refused_saying_why(key, value, reason, tmp_path, capsys):
    """Finding 4: every ModelConfig/ScriptArguments key is accepted with TRL's meaning or refused on one line."""
    config = tmp_path / "c.yaml"
    config.write_text(f"model_name_or_path: m\ndataset_name: d.jsonl\noutput_dir: {tmp_path / 'out'}\n"
                      f"ogpsa_project: none\n{key}: {value}\n")
    assert main(["sft", "--config", str(config)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and f"--{key} " in error and reason in error, error
    assert not (tmp_path / "out").exists()
