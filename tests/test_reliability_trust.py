"""Trust nothing a file says: no code from a model directory runs, no output is an input, a resume never mixes
two runs, an adapter is numbers before it is used. Each case exits as stated and changes no user file."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import file_digests

from lora_ogpsa.cli import main

EVIL_CODE = "from pathlib import Path\nPath({marker!r}).write_text('ran')\n"


def _run(args):
    return main([str(arg) for arg in args])


def _one_error(capsys):
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lora-ogpsa:")]
    assert len(lines) == 1, lines
    return lines[0]


def _model_with_code(tiny_model_dir, target, marker, how):
    """A copy of the tiny model that brings Python code: `auto_map` (config or tokenizer) or a bare *.py file."""
    shutil.copytree(tiny_model_dir, target)
    (target / "configuration_evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    if how == "config auto_map":
        config = json.loads((target / "config.json").read_text())
        config.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
        (target / "config.json").write_text(json.dumps(config))
    elif how == "tokenizer auto_map":
        config = json.loads((target / "tokenizer_config.json").read_text())
        config["auto_map"] = {"AutoTokenizer": ["configuration_evil.EvilTokenizer", None]}
        (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("how", ["config auto_map", "tokenizer auto_map", "a .py file beside config.json"])
@pytest.mark.parametrize("command", ["sft", "eval", "merge"])
def test_a_model_directory_with_code_is_refused_before_any_load(tiny_model_dir, data_files, tmp_path, capsys, how,
                                                                command):
    marker = tmp_path / "code-ran"
    model = _model_with_code(tiny_model_dir, tmp_path / "model", marker, how)
    before = file_digests(model)
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    args = {"sft": ["sft", "--model", model, "--data", data_files["sft"], "--reference", data_files["reference"],
                    "--output", tmp_path / "out", "--no-quantize", "--max-steps", "1"],
            "eval": ["eval", "--model", model, "--prompts", prompts, "--output", tmp_path / "out.json"],
            "merge": ["merge", "--model", model, "--adapter", tmp_path / "adapter", "--output", tmp_path / "out"]
            }[command]
    (tmp_path / "adapter").mkdir()  # merge reads the model first: the adapter is never reached
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"r": 2}')
    assert _run(args) == 2
    error = _one_error(capsys)
    assert "model code, which lora-ogpsa never runs" in error and str(model) in error, error
    assert not marker.exists() and file_digests(model) == before
    assert not any(path.name.startswith("out") for path in tmp_path.iterdir())


def test_echo_y_into_eval_of_a_model_with_auto_map_runs_nothing(tiny_model_dir, tmp_path):
    """The issue's acceptance line: `echo y | lora-ogpsa eval --model DIR_WITH_AUTO_MAP ...` creates no file,
    exits 2, and stdin is never read (transformers' "run the custom code? [y/N]" never appears)."""
    marker = tmp_path / "code-ran"
    model = _model_with_code(tiny_model_dir, tmp_path / "model", marker, "config auto_map")
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    done = subprocess.run([sys.executable, "-m", "lora_ogpsa", "eval", "--model", str(model), "--prompts",
                           str(prompts), "--output", str(tmp_path / "out.json")], input="y\ny\n", text=True,
                          capture_output=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 2, done.stderr
    assert "custom code" not in done.stdout + done.stderr and "model code" in done.stderr
    assert not marker.exists() and sorted(path.name for path in tmp_path.iterdir()) == ["model", "p.txt"]


def test_trust_remote_code_true_is_refused_with_the_reason(tiny_model_dir, data_files, tmp_path, capsys):
    args = ["sft", "--model", tiny_model_dir, "--data", data_files["sft"], "--reference", data_files["reference"],
            "--output", tmp_path / "out", "--no-quantize", "--trust_remote_code", "true"]
    assert _run(args) == 2
    assert "--trust_remote_code true: lora-ogpsa never runs code from a model directory" in _one_error(capsys)
    assert not (tmp_path / "out").exists()


def test_every_auto_class_load_passes_trust_remote_code_false():
    """A grep over the package, as the AST sees it: every `Auto*.from_pretrained` / `from_config` call names
    `trust_remote_code=False` itself (a `**kwargs` alone does not count)."""
    import ast

    import lora_ogpsa

    missing, checked = [], 0
    for path in sorted(Path(lora_ogpsa.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("from_pretrained", "from_config")
                    and isinstance(node.func.value, ast.Name) and node.func.value.id.startswith("Auto")):
                continue
            if node.func.value.id == "AutoHfQuantizer":
                continue  # builds a quantizer from a config object: no model code is involved
            checked += 1
            given = {keyword.arg: keyword.value for keyword in node.keywords}
            value = given.get("trust_remote_code")
            if not (isinstance(value, ast.Constant) and value.value is False):
                missing.append(f"{path.name}:{node.lineno}")
    assert missing == [] and checked >= 8, (missing, checked)  # 8: the loads this package makes today
