"""Issue 26, cause A: an output that is, contains or lies inside an input is refused before anything is
written (exit 2, one line), and every input stays byte-identical."""

import hashlib
import shutil

import pytest

from lora_ogpsa.cli import main


def _digests(*roots):
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest()
            for root in roots for path in ([root] if root.is_file() else sorted(root.rglob("*"))) if path.is_file()}


@pytest.mark.parametrize("case", ["output is the model (with --overwrite)", "output inside the model",
                                  "output contains the data file", "output is the model through a symlink"])
def test_training_output_apart_from_every_input(case, tiny_model_dir, data_files, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    data = tmp_path / "data" / "sft.jsonl"
    data.parent.mkdir()
    shutil.copy(data_files["sft"], data)
    output, relation = {"output is the model (with --overwrite)": (model, "is"),
                        "output inside the model": (model / "sub", "lies inside"),
                        "output contains the data file": (data.parent, "contains"),
                        "output is the model through a symlink": (tmp_path / "link", "is")}[case]
    if case.endswith("symlink"):
        output.symlink_to(model, target_is_directory=True)
    before = _digests(model, data)
    args = ["sft", "--model", model, "--data", data, "--reference", data_files["reference"], "--output", output,
            "--no-quantize", "--max-steps", "1", "--overwrite"]
    assert main([str(arg) for arg in args]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and f"{relation} the input" in error, error
    assert _digests(model, data) == before and not (model / "sub").exists()
    assert not any(path.name.endswith(".partial") for path in tmp_path.rglob("*"))


def test_eval_output_is_not_its_prompt_file(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "How do I bake bread?"}\n')
    before = prompts.read_bytes()
    args = ["eval", "--model", tiny_model_dir, "--prompts", prompts, "--output", prompts, "--overwrite"]
    assert main([str(arg) for arg in args]) == 2
    assert "is the input --prompts" in capsys.readouterr().err and prompts.read_bytes() == before


def test_merge_output_inside_the_adapter_is_refused(tiny_model_dir, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    args = ["merge", "--model", tiny_model_dir, "--adapter", adapter, "--output", adapter / "merged"]
    assert main([str(arg) for arg in args]) == 2
    assert "lies inside the input --adapter" in capsys.readouterr().err and not (adapter / "merged").exists()
