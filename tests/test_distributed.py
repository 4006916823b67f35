"""Data-parallel training on 2 CPU processes (gloo), launched with torchrun."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lora_ogpsa import Subspace
from lora_ogpsa.cli import main

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
# Dropout 0: each rank draws its own dropout masks, so runs with dropout cannot match a single process.
# k = every direction the 12 samples span: no cut between near-equal singular values, where the basis would
# swing with the last-bit differences of DDP's gradient averaging.
FLAGS = ["--max-steps", "4", "--save-steps", "1", "--logging-steps", "1", "--no-quantize", "--lora-r", "4", "--max-length", "64",
         "--lora-dropout", "0", "--refresh-every", "2", "--learning-rate", "1e-3", "--reference-examples", "12",
         "--reference-batch-size", "4", "--max-directions", "16", "--energy", "1.0"]


def _launch(args, tmp_path, timeout=300, launcher="torchrun"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    port = str(29500 + os.getpid() % 1000)
    if launcher == "torchrun":
        command = [TORCHRUN, "--nproc_per_node", "2", "--master_port", port, *args]
    else:  # accelerate's `--cpu` means one process; `--multi_gpu` launches torchrun-style workers (gloo on CPU)
        command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                   "--main_process_port", port, *args]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)


def _common(tiny_model_dir, data_files):
    return ["sft", "--model", str(tiny_model_dir), "--data", str(data_files["sft"]), "--reference",
            str(data_files["reference"]), *FLAGS]


@pytest.fixture(scope="module")
def single_process(tiny_model_dir, data_files, tmp_path_factory):
    output = tmp_path_factory.mktemp("single") / "out"
    assert main([*_common(tiny_model_dir, data_files), "--output", str(output), "--batch-size", "4"]) == 0
    return load_file(str(output / "adapter_model.safetensors"))


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_match_one_with_the_same_global_batch(tiny_model_dir, data_files, tmp_path, single_process,
                                                            launcher):
    output = tmp_path / "ddp"
    completed = _launch(["-m", "lora_ogpsa", *_common(tiny_model_dir, data_files), "--output", str(output),
                         "--batch-size", "2"], tmp_path, launcher=launcher)
    assert completed.returncode == 0, completed.stderr[-3000:]
    ddp = load_file(str(output / "adapter_model.safetensors"))
    assert max(float((ddp[name] - single_process[name]).abs().max()) for name in ddp) <= 1e-5
    for step in range(1, 4):  # the update orthogonality holds under DDP too
        before = load_file(str(output / f"checkpoint-{step}" / "adapter_model.safetensors"))
        after = load_file(str(output / f"checkpoint-{step + 1}" / "adapter_model.safetensors"))
        basis = Subspace.load(output / f"checkpoint-{step}" / "ogpsa_subspace.safetensors").basis_by_name
        for name, value in before.items():
            change = (after[name] - value).reshape(-1)
            assert (basis[name] @ change).norm() <= 1e-5 * change.norm()
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in metrics if "loss" in row] == [1, 2, 3, 4]  # written once, by rank 0


WORKER = """
import os, sys
from transformers import TrainerCallback
from lora_ogpsa.cli import main

class DieOnRank1(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if os.environ["RANK"] == "1" and state.global_step == 2:
            os._exit(9)  # a killed process: no exception, no cleanup

mode, *args = sys.argv[1:]
if mode == "bad-input" and os.environ["RANK"] == "1":
    args[args.index("--data") + 1] = "/nonexistent/rank1.jsonl"
if mode == "killed":
    import lora_ogpsa.train.run as train
    run_sft = train.run_sft
    train.run_sft = lambda settings, callbacks=(): run_sft(settings, [DieOnRank1()])
sys.exit(main(args))
"""


@pytest.mark.parametrize("mode", ["bad-input", "killed"])
def test_a_failing_rank_ends_the_whole_run_with_a_clear_error(tiny_model_dir, data_files, tmp_path, mode):
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(WORKER))
    args = ["sft", "--model", str(tiny_model_dir), "--data", str(data_files["sft"]), "--reference",
            str(data_files["reference"]), "--output", str(tmp_path / "out"), "--batch-size", "2", *FLAGS,
            "--ddp-timeout", "60"]
    completed = _launch([str(worker), mode, *args], tmp_path, timeout=240)  # a hang fails the test here
    assert completed.returncode != 0
    if mode == "bad-input":
        assert "lora-ogpsa: error: --data /nonexistent/rank1.jsonl: no such file" in completed.stderr
    else:
        assert "exitcode  : 9" in completed.stderr and "rank      : 1" in completed.stderr
    assert not (tmp_path / "out").exists()
