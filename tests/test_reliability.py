"""Nothing a user has is lost: failed resumes, quoted booleans, concurrent runs, changed settings on resume."""

import logging
import os

import pytest
from conftest import file_digests

from lora_ogpsa.cli import main
from lora_ogpsa.utils.outputs import output_lock


def _run(args):
    return main([str(arg) for arg in args])


def _sft(tiny_model_dir, data_files, output, *extra):
    return ["sft", "--model", tiny_model_dir, "--data", data_files["sft"], "--reference", data_files["reference"],
            "--output", output, "--no-quantize", "--lora-r", "2", "--max-length", "64", "--batch-size", "4",
            "--reference-examples", "4", *extra]


@pytest.fixture(scope="module")
def finished(tiny_model_dir, data_files, tmp_path_factory):
    output = tmp_path_factory.mktemp("finished") / "run"
    assert _run(_sft(tiny_model_dir, data_files, output, "--max-steps", "2", "--save-steps", "1")) == 0
    return output


def test_a_failed_resume_of_a_finished_run_leaves_it_untouched(tiny_model_dir, data_files, finished, tmp_path,
                                                               capsys):
    output = tmp_path / "run"
    os.system(f"cp -r {finished} {output}")
    checkpoint = output / "checkpoint-2" / "adapter_model.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])  # truncated: resuming from it must fail
    before = file_digests(output)
    assert _run(_sft(tiny_model_dir, data_files, output, "--max-steps", "3", "--resume")) != 0
    assert file_digests(output) == before  # the finished run was never moved or changed
    capsys.readouterr()
    assert _run(_sft(tiny_model_dir, data_files, output, "--max-steps", "3")) == 2  # and is not replaced either
    assert "exists and is not empty" in capsys.readouterr().err and file_digests(output) == before


def test_resume_with_changed_settings_is_refused(tiny_model_dir, data_files, finished, tmp_path, capsys):
    output = tmp_path / "run"
    os.system(f"cp -r {finished} {output}")
    before = file_digests(output)
    assert _run(_sft(tiny_model_dir, data_files, output, "--max-steps", "3", "--resume",
                     "--learning-rate", "5e-4")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lora-ogpsa:")]
    assert len(errors) == 1 and "learning_rate: 0.0001 -> 0.0005" in errors[0]
    assert file_digests(output) == before


def test_resume_with_nothing_to_resume_is_an_error(tiny_model_dir, data_files, tmp_path, capsys):
    assert _run(_sft(tiny_model_dir, data_files, tmp_path / "typo", "--max-steps", "1", "--resume")) == 2
    assert "--resume: nothing to resume" in capsys.readouterr().err and not (tmp_path / "typo").exists()


@pytest.mark.parametrize("text", ['overwrite: "false"\n', "no_quantize: 'false'\n", 'resume: "no"\n'])
def test_a_quoted_boolean_in_config_is_an_error(tiny_model_dir, data_files, tmp_path, capsys, text):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert _run([*_sft(tiny_model_dir, data_files, tmp_path / "o", "--max-steps", "1"), "--config", config]) == 2
    assert "must be true or false (unquoted)" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_second_run_into_the_same_output_is_refused(tiny_model_dir, data_files, tmp_path, capsys):
    output = tmp_path / "busy"
    with output_lock(output):
        assert _run(_sft(tiny_model_dir, data_files, output, "--max-steps", "1")) == 2
    assert f"in use by another run (pid {os.getpid()})" in capsys.readouterr().err
    assert not output.exists() and not (tmp_path / "busy.partial").exists()
    assert _run(_sft(tiny_model_dir, data_files, output, "--max-steps", "1")) == 0  # released afterwards


def test_eval_refuses_an_existing_output_file(tiny_model_dir, tmp_path, capsys):
    precious = tmp_path / "train.jsonl"
    precious.write_text("my data\n")
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    assert _run(["eval", "--model", tiny_model_dir, "--prompts", prompts, "--output", precious]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and precious.read_text() == "my data\n"


def test_resume_passes_over_an_incomplete_checkpoint(tiny_model_dir, data_files, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    output = tmp_path / "run"
    args = _sft(tiny_model_dir, data_files, output, "--save-steps", "1")
    assert _run([*args, "--max-steps", "3"]) == 0
    work = tmp_path / "run.partial"
    os.rename(output, work)  # as if killed while saving checkpoint 3: its marker and trainer state missing
    (work / "checkpoint-3" / "lora_ogpsa_complete.json").unlink()
    (work / "checkpoint-3" / "trainer_state.json").unlink()
    assert _run([*args, "--max-steps", "3", "--resume"]) == 0
    assert "checkpoint-3 is incomplete" in caplog.text
    assert "checkpoint-2, the newest complete checkpoint" in caplog.text
    assert (output / "adapter_model.safetensors").is_file() and (output / "checkpoint-3" /
                                                                "lora_ogpsa_complete.json").is_file()


def test_a_non_string_path_in_config_is_an_error(tiny_model_dir, data_files, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("data: 5\n")
    assert _run(["sft", "--model", tiny_model_dir, "--output", tmp_path / "o", "--config", config]) == 2
    assert "key 'data' must be a string" in capsys.readouterr().err


def test_unexpected_errors_are_one_line_without_pickle_advice():
    from lora_ogpsa.cli import _one_line

    error = RuntimeError("\n  Weights only load failed.\n  Re-running with weights_only=False will work\nmore")
    assert _one_line(error) == "Weights only load failed."
    assert _one_line(ValueError("")) == "ValueError"
