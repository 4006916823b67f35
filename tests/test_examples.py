"""Every file in examples/ runs, on the tiny model, and does what its docstring says."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_ogpsa import Subspace
from lora_ogpsa.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(script, *args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    completed = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], cwd=cwd, env=env,
                               capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def _span_residual(before, after, subspace):
    """max over tensors of ||U Δ|| / ||Δ|| for the change between two adapter files."""
    worst = 0.0
    for name, basis in subspace.basis_by_name.items():
        change = (after[name].double() - before[name].double()).flatten()
        if basis.shape[0] and change.norm() > 0:
            worst = max(worst, float((basis.double() @ change).norm() / change.norm()))
    return worst


@pytest.fixture(scope="module")
def sft_example(tiny_model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("sft-example") / "sft"
    _run("trl_sft_with_ogpsa.py", "--model", tiny_model_dir, "--data", EXAMPLES / "data/sft.jsonl",
         "--reference", EXAMPLES / "data/reference.jsonl", "--output", output, "--max-steps", "3",
         "--save-steps", "1", cwd=output.parent)
    return output


def test_sft_example_writes_the_adapter_and_subspace_and_updates_are_orthogonal(sft_example):
    for directory in (sft_example, *(sft_example / f"checkpoint-{step}" for step in (1, 2, 3))):
        assert (directory / "adapter_model.safetensors").is_file()
        assert (directory / "ogpsa_subspace.safetensors").is_file()
    for step in (1, 2):  # checkpoint-N's subspace constrains update N+1
        before = load_file(str(sft_example / f"checkpoint-{step}" / "adapter_model.safetensors"))
        after = load_file(str(sft_example / f"checkpoint-{step + 1}" / "adapter_model.safetensors"))
        subspace = Subspace.load(sft_example / f"checkpoint-{step}" / "ogpsa_subspace.safetensors")
        assert all(tensor.dtype == torch.float32 for tensor in after.values())  # TRL's bf16 cast was undone
        assert _span_residual(before, after, subspace) <= 1e-4


def test_dpo_example_continues_the_sft_adapter(tiny_model_dir, sft_example, tmp_path):
    output = tmp_path / "dpo"
    _run("trl_dpo_with_ogpsa.py", "--model", tiny_model_dir, "--adapter", sft_example, "--data",
         EXAMPLES / "data/dpo.jsonl", "--reference", EXAMPLES / "data/reference.jsonl", "--output", output,
         "--max-steps", "2", "--save-steps", "1", cwd=tmp_path)
    assert (output / "ogpsa_subspace.safetensors").is_file()
    trained = load_file(str(output / "adapter_model.safetensors"))
    sft = load_file(str(sft_example / "adapter_model.safetensors"))
    assert set(trained) == set(sft) and any(not torch.equal(trained[name], sft[name]) for name in sft)
    # The DPO reference model is base + the frozen SFT adapter: TRL kept it as the "ref" adapter, unchanged.
    reference = load_file(str(output / "ref" / "adapter_model.safetensors"))
    assert all(torch.equal(reference[name], sft[name]) for name in sft)


@pytest.mark.parametrize("command", ["sft", "dpo", "align"])
def test_config_files_run(command, tiny_model_dir, tmp_path):
    output = tmp_path / command
    args = [command, "--config", str(EXAMPLES / f"configs/{command}.yaml"), "--model", str(tiny_model_dir),
            "--output", str(output), "--max-steps", "1", "--no-quantize", "--lora-r", "2"]
    if command == "align":
        args += ["--dpo-max-steps", "1"]
    cwd = Path.cwd()
    try:
        os.chdir(ROOT)  # the files name data relative to the repository root
        assert main(args) == 0
    finally:
        os.chdir(cwd)
    assert (output / "adapter_model.safetensors").is_file()


def test_load_and_merge_example(tiny_model_dir, data_files, tmp_path):
    adapter = tmp_path / "adapter"
    assert main(["sft", "--model", str(tiny_model_dir), "--data", str(data_files["sft"]), "--reference",
                 str(data_files["reference"]), "--output", str(adapter), "--max-steps", "2", "--no-quantize",
                 "--lora-r", "2", "--max-length", "64", "--learning-rate", "1e-2"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    printed = _run("load_and_merge.py", "--adapter", adapter, "--output", tmp_path / "merged", cwd=elsewhere)
    assert "base + adapter:" in printed and "merged model:" in printed
    lines = {line.split(":")[0]: line.split(":", 1)[1] for line in printed.splitlines() if ":" in line}
    assert lines["base + adapter"].strip() == lines["merged model"].strip()  # greedy: the same answer
    assert (tmp_path / "merged" / "README.md").read_text().count("base_model_relation: merge") == 1
