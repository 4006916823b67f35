"""FSDP2 (per-parameter `fully_shard`, DTensor shards) on 2 CPU processes (gloo), launched with `accelerate launch`
and the example config; FSDP1 and DeepSpeed refused with projection."""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lora_ogpsa import Subspace
from lora_ogpsa.callback.guards import refuse_sharded_training, sharding_engine
from lora_ogpsa.cli import main
from lora_ogpsa.core.projector import StackedBasis
from lora_ogpsa.signals.sharding import flat_range
from lora_ogpsa.utils.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "accelerate_fsdp2.yaml"
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent))
needs_launcher = pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher not installed")
# As tests/test_distributed.py: dropout 0 (each rank draws its own masks) and k = every direction the 12 samples
# span (no cut between near-equal singular values, where the basis would swing with last-bit differences).
FLAGS = ["--save-steps", "1", "--logging-steps", "1", "--no-quantize", "--lora-r", "4", "--max-length", "64",
         "--lora-dropout", "0", "--refresh-every", "2", "--learning-rate", "1e-3", "--reference-examples", "12",
         "--reference-batch-size", "4", "--max-directions", "16", "--energy", "1.0"]
# The FSDP2 run sums the two ranks' gradients in another order than one process does (reduce-scatter): last-bit
# differences, measured 6e-7 on weights of size ~0.1 after 4 steps.
TOLERANCE = 1e-5

WORKER = """
import os, sys
from pathlib import Path

import accelerate.state as state
from accelerate.utils import DistributedType
from transformers import TrainerCallback

# accelerate turns FSDP on only on accelerators (on CPU it silently runs DDP instead). This lets the same FSDP2 path
# -- fully_shard, DTensor shards, the trainer's FSDP checkpoints -- run on CPU with gloo; nothing else is changed.
_init = state.AcceleratorState.__init__


def _init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = state.PartialState().distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


state.AcceleratorState.__init__ = _init_fsdp_on_cpu


class Record(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from torch.distributed.tensor import DTensor
        from lora_ogpsa.models.loading import lora_parameters

        parameters = lora_parameters(model).values()
        sharded = sum(isinstance(p, DTensor) for p in parameters)
        held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in parameters)
        total = sum(p.numel() for p in parameters)
        base = [p for p in model.parameters() if not p.requires_grad]
        base_held = sum((p.to_local() if isinstance(p, DTensor) else p).untyped_storage().nbytes() for p in base)
        Path(os.environ["RECORD"], "rank" + os.environ["RANK"]).write_text(
            f"{sharded} {len(parameters)} {held} {total} {sum(isinstance(p, DTensor) for p in base)} {len(base)} "
            f"{base_held} {str(next(iter(parameters)).dtype)}")

    def on_save(self, args, state, control, **kwargs):
        if os.environ.get("STOP_AT") == str(state.global_step):
            raise KeyboardInterrupt  # as Ctrl-C: the checkpoints stay in OUTPUT.partial


import lora_ogpsa.train.run as train

run_sft = train.run_sft
train.run_sft = lambda settings, callbacks=(): run_sft(settings, [*callbacks, Record()])
from lora_ogpsa.cli import main
from lora_ogpsa.core.projector import StackedBasis
from lora_ogpsa.signals.sharding import flat_range

sys.exit(main(sys.argv[1:]))
"""


def _launch(tmp_path, args, config=CONFIG, **env):
    worker = tmp_path / "fsdp_worker.py"
    worker.write_text(textwrap.dedent(WORKER))
    record = tmp_path / "record"
    record.mkdir(exist_ok=True)
    # CPU processes with gloo whatever the machine has (two ranks cannot share one GPU under nccl).
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
                   "CUDA_VISIBLE_DEVICES": "", "RECORD": str(record), **env}
    command = [ACCELERATE, "launch", "--config_file", str(config), "--num_processes", "2", "--main_process_port",
               str(29500 + (os.getpid() + 7) % 1000), str(worker), *args]
    completed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=environment,
                               check=False)
    return completed, [record.joinpath(f"rank{rank}").read_text().split() for rank in (0, 1)
                       if record.joinpath(f"rank{rank}").is_file()]


def _sft(tiny_model_dir, data_files, output, steps):
    return ["sft", "--model", str(tiny_model_dir), "--data", str(data_files["sft"]), "--reference",
            str(data_files["reference"]), "--output", str(output), "--max-steps", str(steps), *FLAGS]


@pytest.fixture(scope="module")
def fsdp_run(tiny_model_dir, data_files, tmp_path_factory):
    """An uninterrupted FSDP2 run of 4 steps, global batch 4 (2 per rank), and what each rank held."""
    root = tmp_path_factory.mktemp("fsdp2")
    completed, records = _launch(root, [*_sft(tiny_model_dir, data_files, root / "out", 4), "--batch-size", "2"])
    assert completed.returncode == 0, completed.stderr[-3000:]
    return root / "out", records


@needs_launcher
def test_fsdp2_shards_the_lora_weights_and_matches_one_process(fsdp_run, tiny_model_dir, data_files, tmp_path):
    output, records = fsdp_run
    assert len(records) == 2
    for sharded, count, held, total, *_ in records:  # every LoRA weight a DTensor; each rank holds half of them
        assert sharded == count and int(held) == int(total) // 2
    single = tmp_path / "single"
    assert main([*_sft(tiny_model_dir, data_files, single, 4), "--batch-size", "4"]) == 0
    ours, reference = load_file(str(output / "adapter_model.safetensors")), load_file(
        str(single / "adapter_model.safetensors"))
    assert set(ours) == set(reference)
    assert max(float((ours[name] - reference[name]).abs().max()) for name in ours) <= TOLERANCE


@needs_launcher
def test_fsdp2_applied_update_is_orthogonal_to_the_basis_in_force(fsdp_run):
    output, _ = fsdp_run
    for step in range(1, 4):  # checkpoint-N's subspace is the one that constrains update N+1
        before = load_file(str(output / f"checkpoint-{step}" / "adapter_model.safetensors"))
        after = load_file(str(output / f"checkpoint-{step + 1}" / "adapter_model.safetensors"))
        basis = Subspace.load(output / f"checkpoint-{step}" / "ogpsa_subspace.safetensors").basis_by_name
        assert sum(b.shape[0] for b in basis.values()) > 0
        for name, value in before.items():
            change = (after[name] - value).reshape(-1).double()
            assert (basis[name].double() @ change).norm() <= 1e-5 * change.norm()


@needs_launcher
@pytest.mark.parametrize("state_dict_type", ["FULL_STATE_DICT", "SHARDED_STATE_DICT"])
def test_fsdp2_resume_equals_the_uninterrupted_run(fsdp_run, tiny_model_dir, data_files, tmp_path, state_dict_type):
    """The trainer's FSDP checkpoint (whole or sharded weights and optimizer) plus the subspace file: exact resume."""
    config = tmp_path / "fsdp2.yaml"
    config.write_text(CONFIG.read_text().replace("FULL_STATE_DICT", state_dict_type))
    output = tmp_path / "out"
    args = [*_sft(tiny_model_dir, data_files, output, 4), "--batch-size", "2"]
    stopped, _ = _launch(tmp_path, args, config, STOP_AT="2")
    assert stopped.returncode != 0 and (tmp_path / "out.partial" / "checkpoint-2").is_dir()
    assert not (tmp_path / "out.partial" / "checkpoint-3").exists()
    resumed, _ = _launch(tmp_path, [*args, "--resume"], config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed the subspace of step 2" in resumed.stderr
    straight, again = load_file(str(fsdp_run[0] / "adapter_model.safetensors")), load_file(
        str(output / "adapter_model.safetensors"))
    assert max(float((straight[name] - again[name]).abs().max()) for name in straight) <= 1e-6
    assert torch.equal(Subspace.load(fsdp_run[0] / "ogpsa_subspace.safetensors").basis_by_name[next(iter(straight))],
                       Subspace.load(output / "ogpsa_subspace.safetensors").basis_by_name[next(iter(straight))])


@pytest.mark.parametrize(("args", "env", "engine"), [
    ({"fsdp": True, "fsdp_config": {"version": 1}}, {}, "FSDP1"),
    ({"fsdp": True, "fsdp_config": {"version": 2}}, {}, None),
    ({"fsdp": True, "fsdp_config": {}}, {}, None),  # transformers' default is FSDP2
    ({}, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, None),
    ({}, {"ACCELERATE_USE_FSDP": "true"}, "FSDP1"),  # accelerate's default is FSDP1
    ({"deepspeed": "ds_config.json"}, {}, "DeepSpeed"),
    ({}, {"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed"),
    ({}, {}, None),
])
def test_fsdp_engines_that_step_inside_themselves_are_refused(args, env, engine, monkeypatch):
    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    namespace = SimpleNamespace(**args)
    assert sharding_engine(namespace) == engine
    if engine is None:
        refuse_sharded_training(namespace)
    else:
        with pytest.raises(InputError, match=f"cannot run under {engine}.*use FSDP2"):
            refuse_sharded_training(namespace)


def test_fsdp1_launch_exits_2_with_one_line_naming_fsdp2(tiny_model_dir, data_files, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}
    completed = subprocess.run([sys.executable, "-m", "lora_ogpsa", *_sft(tiny_model_dir, data_files,
                                                                          tmp_path / "out", 2)],
                               capture_output=True, text=True, timeout=300, env=env, check=False)
    assert completed.returncode == 2, completed.stderr[-2000:]
    errors = [line for line in completed.stderr.splitlines() if line.startswith("lora-ogpsa: error")]
    assert len(errors) == 1 and "FSDP1" in errors[0] and "FSDP2" in errors[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@needs_launcher
def test_fsdp2_on_a_4bit_base_shards_it_and_keeps_the_update_orthogonal(tiny_model_dir, data_files, tmp_path):
    """NF4 weights stored as float (`bnb_4bit_quant_storage`, set by the loader under an FSDP launch) are sharded
    like any weight; the projection is exact on the float32 LoRA shards as on a full-precision base."""
    output = tmp_path / "out"
    args = [*_sft(tiny_model_dir, data_files, output, 2), "--batch-size", "2"]
    args.remove("--no-quantize")
    completed, records = _launch(tmp_path, args)
    assert completed.returncode == 0, completed.stderr[-3000:]
    for sharded, count, _, _, base_sharded, base_count, _, dtype in records:
        assert sharded == count and dtype == "torch.float32"
        assert int(base_sharded) == int(base_count)  # the 4-bit weights too (none left whole on every rank)
    before = load_file(str(output / "checkpoint-1" / "adapter_model.safetensors"))
    after = load_file(str(output / "checkpoint-2" / "adapter_model.safetensors"))
    basis = Subspace.load(output / "checkpoint-1" / "ogpsa_subspace.safetensors").basis_by_name
    for name, value in before.items():
        change = (after[name] - value).reshape(-1).double()
        assert change.norm() > 0 and (basis[name].double() @ change).norm() <= 1e-5 * change.norm()


@pytest.mark.parametrize("rows", [4, 5, 1])
def test_fsdp_flat_range_is_torch_chunk_of_the_rows(rows):
    weight = torch.arange(rows * 3).reshape(rows, 3)
    chunks = torch.chunk(weight, 2)
    for rank in (0, 1):
        start, stop = flat_range(weight.shape, rank, 2)
        expected = chunks[rank].reshape(-1) if rank < len(chunks) else weight.new_zeros(0)
        assert torch.equal(weight.reshape(-1)[start:stop], expected)


@pytest.mark.parametrize("one_sided", [False, True])
def test_fsdp_split_projection_equals_the_whole_one(one_sided):
    """Two 'ranks' (threads) each project their columns with one summing reduction: the whole projection."""
    generator = torch.Generator().manual_seed(0)
    shapes = {"a": (4, 6), "b": (6, 4), "c": (5, 2)}  # a and b: same numel, other shapes; c: uneven chunks
    bases = {name: torch.linalg.qr(torch.randn(math.prod(shape), 3, generator=generator))[0].T
             for name, shape in shapes.items()}  # (3, n), orthonormal rows
    rising = {name: torch.randn(3, generator=generator) for name in shapes}
    before = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    after = {name: value + torch.randn(value.shape, generator=generator) for name, value in before.items()}
    whole = {name: value.clone() for name, value in after.items()}
    expected = StackedBasis(bases, rising).project_change_(whole, StackedBasis(bases).snapshot(before),
                                                           one_sided=one_sided)
    barrier, deposits = threading.Barrier(2), [None, None]

    def reduce_for(rank):
        def reduce_(tensors):
            deposits[rank] = [tensor.clone() for tensor in tensors]
            barrier.wait()
            for index, tensor in enumerate(tensors):
                tensor.copy_(deposits[0][index] + deposits[1][index])
            barrier.wait()
        return reduce_

    results, stats = {}, [None, None]

    def run(rank):
        ranges = {name: flat_range(shape, rank, 2) for name, shape in shapes.items()}
        mine = {name: basis[:, slice(*ranges[name])] for name, basis in bases.items()}
        split = StackedBasis(mine, rising, reduce_=reduce_for(rank), key_by_name=shapes)
        local = {name: value.reshape(-1)[slice(*ranges[name])].clone() for name, value in after.items()}
        snapshot = split.snapshot({name: value.reshape(-1)[slice(*ranges[name])] for name, value in before.items()})
        stats[rank] = split.project_change_(local, snapshot, one_sided=one_sided)
        results[rank] = local

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, value in whole.items():
        joined = torch.cat([results[0][name], results[1][name]])
        assert torch.allclose(joined, value.reshape(-1), atol=1e-6)
    for rank in (0, 1):
        assert stats[rank].squared_norm == pytest.approx(expected.squared_norm, rel=1e-5)
        assert stats[rank].squared_in_span == pytest.approx(expected.squared_in_span, rel=1e-5)


def test_fsdp_benchmark_runs_on_a_tiny_model(tmp_path):
    """`python -m benchmarks.fsdp --quick`: both engines on 2 processes; the base bytes each rank holds halve."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "CUDA_VISIBLE_DEVICES": ""}
    completed = subprocess.run([sys.executable, "-m", "benchmarks.fsdp", "--quick", "--output-dir", str(tmp_path)],
                               cwd=ROOT, capture_output=True, text=True, check=False, timeout=600, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    written = json.loads((tmp_path / "fsdp_quick.json").read_text())
    assert {(row["engine"], row["rank"]) for row in written["results"]} == {
        (engine, rank) for engine in ("ddp", "fsdp2") for rank in (0, 1)}
    assert written["ratios"]["base_held_mb"] == pytest.approx(0.5, abs=0.01) and written["target_met"]
    assert "| engine" in completed.stdout
