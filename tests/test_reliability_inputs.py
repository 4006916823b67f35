"""Issue 26, cause A: an output that is, contains or lies inside an input is refused before anything is
written (exit 2, one line), and every input stays byte-identical."""

import hashlib
import json
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


def test_a_dotdot_output_makes_no_directory_on_the_way(tiny_model_dir, data_files, tmp_path):
    """Issue 26 F: `x/new/../out` writes `x/out` and leaves no empty `x/new` behind."""
    (tmp_path / "x").mkdir()
    args = ["sft", "--model", tiny_model_dir, "--data", data_files["sft"], "--reference", data_files["reference"],
            "--output", f"{tmp_path}/x/new/../out", "--no-quantize", "--max-steps", "1", "--lora-r", "2",
            "--max-length", "64"]
    assert main([str(arg) for arg in args]) == 0
    assert sorted(path.name for path in (tmp_path / "x").iterdir()) == ["out"]
    assert (tmp_path / "x" / "out" / "adapter_model.safetensors").is_file()


def test_a_model_without_chat_template_trains_with_chat_template_path(tiny_model_dir, data_files, tmp_path):
    """Issue 26 B: TRL's --chat_template_path gives the template a tokenizer lacks (rows and reference are
    rendered with it too)."""
    from lora_ogpsa.testing.tiny import CHAT_TEMPLATE

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    template = tmp_path / "chatml.jinja"
    template.write_text(CHAT_TEMPLATE)
    args = ["sft", "--model", model, "--data", data_files["sft"], "--reference", data_files["reference"],
            "--output", tmp_path / "out", "--no-quantize", "--max-steps", "1", "--lora-r", "2", "--max-length", "64",
            "--chat_template_path", template]
    assert main([str(arg) for arg in args]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
