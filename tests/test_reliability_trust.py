"""Trust nothing a file says: no code from a model directory runs, no output is an input, a resume never mixes
two runs, an adapter is numbers before it is used. Each case exits as stated and changes no user file."""

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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
    assert error.startswith(f"lora-ogpsa: error: --model {model}: ") and "model code, which lora-ogpsa never runs" \
        in error and "cannot load" not in error, error
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


# ---- a resume that cannot be exact is refused before anything is written ----

def _sft(tiny_model_dir, data_files, output, *extra, data=None):
    return ["sft", "--model", tiny_model_dir, "--data", data or data_files["sft"], "--reference",
            data_files["reference"], "--output", output, "--no-quantize", "--lora-r", "2", "--max-length", "64",
            "--batch-size", "4", "--reference-examples", "4", *extra]


@pytest.fixture(scope="module")
def finished(tiny_model_dir, data_files, tmp_path_factory):
    """A finished run with checkpoints 1 and 2, trained on its own copies of the model and the data (the
    cases below change them in place)."""
    root = tmp_path_factory.mktemp("finished")
    model, data = shutil.copytree(tiny_model_dir, root / "model"), shutil.copy(data_files["sft"], root / "sft.jsonl")
    args = _sft(model, data_files, root / "run", "--max-steps", "2", "--save-steps", "1", data=data)
    assert _run(args) == 0
    return root


@contextlib.contextmanager
def _in_place(finished, tmp_path):
    """The finished run's model, data and output as they are (changed in place by a case: the run config records
    their paths), restored from a copy afterwards."""
    names = ("model", "sft.jsonl", "run")
    for name in names:
        (shutil.copytree if (finished / name).is_dir() else shutil.copy)(finished / name, tmp_path / name)
    try:
        yield (finished / name for name in names)
    finally:
        for name in names:
            shutil.rmtree(finished / name, ignore_errors=True) if (finished / name).is_dir() else None
            shutil.move(tmp_path / name, finished / name)
        shutil.rmtree(finished / "run.partial", ignore_errors=True)


def _swap_rows(data):
    rows = data.read_text().splitlines()
    data.write_text("\n".join([rows[1], rows[0], *rows[2:]]) + "\n")  # same rows, same count: another order


def _new_weights(model):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(model / "model.safetensors"))
    name = sorted(name for name in tensors if name.endswith("q_proj.weight"))[0]
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})


def _state_step(run, step):
    path = run / "checkpoint-2" / "trainer_state.json"
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "global_step": step}))


def _pickled(run, marker):
    class Planted:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (run / "checkpoint-2" / "rng_state.pth").write_bytes(pickle.dumps(Planted()))


def _wrong_k(run):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = run / "checkpoint-2" / "ogpsa_subspace.safetensors"
    with safe_open(str(path), "pt") as handle:
        metadata, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    name = sorted(name for name, basis in tensors.items() if basis.shape[0] > 0)[0]
    basis, _ = torch.linalg.qr(torch.randn(tensors[name].shape[1], tensors[name].shape[0] + 1))
    tensors[name] = basis.T.contiguous()  # orthonormal, one direction more than was computed
    save_file(tensors, str(path), metadata=metadata)


RESUME_CASES = {  # case: (change to the copies (model, data, run), extra flags, the message)
    "a pickle in the checkpoint": (lambda m, d, r: _pickled(r, m.parent / "pickle-ran"), [],
                                   r"--resume .*checkpoint-2/rng_state.pth: not a plain tensor file"),
    "a subspace of the wrong k": (lambda m, d, r: _wrong_k(r), [],
                                  r"ogpsa_subspace.safetensors: basis .* has k = \d+ directions, the values recorded "
                                  r"with it \d+; the file was altered"),
    "data rewritten in place (same row count)": (lambda m, d, r: _swap_rows(d), [],
                                                 r"training_sha256 \(the training data changed\)"),
    "base weights replaced at the same path": (lambda m, d, r: _new_weights(m), [],
                                               r"model_sha256 \(the base weights changed\)"),
    "checkpoint's run config deleted": (lambda m, d, r: (r / "checkpoint-2" / "ogpsa_config.json").unlink(),
                                        ["--learning-rate", "5e-3", "--lora_alpha", "64"],
                                        r"checkpoint-2/ogpsa_config.json is missing, so the settings"),
    "trainer_state.json global_step 100": (lambda m, d, r: _state_step(r, 100), [],
                                           r"trainer_state.json: global_step is 100, the checkpoint's name says 2"),
    "checkpoint past --max-steps": (lambda m, d, r: None, ["--max-steps", "1"],
                                    r"checkpoint-2 is past --max-steps 1; give --max-steps 2 or more"),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_a_resume_that_cannot_be_exact_is_refused(finished, data_files, tmp_path, capsys, case):
    change, extra, message = RESUME_CASES[case]
    with _in_place(finished, tmp_path) as (model, data, run):
        change(model, data, run)
        before = file_digests(run)
        assert _run(_sft(model, data_files, run, "--resume", "--max-steps", "3", *extra, data=data)) == 2
        error = _one_error(capsys)
        assert re.search(message, error) and "model:" not in error and "data:" not in error, error
        assert file_digests(run) == before and not (finished / "run.partial").exists()
        assert not (finished / "pickle-ran").exists()


def test_resume_of_a_finished_run_without_checkpoints_is_refused(tiny_model_dir, data_files, tmp_path, capsys):
    """It trained a new run from step 0 and renamed it over the finished output, exit 0."""
    run = tmp_path / "run"
    assert _run(_sft(tiny_model_dir, data_files, run, "--max-steps", "2")) == 0
    before = file_digests(run)
    args = _sft(tiny_model_dir, data_files, run, "--resume", "--max-steps", "6", "--learning-rate", "5e-4")
    assert _run(args) == 2
    assert "--resume: nothing to resume in" in _one_error(capsys)
    assert file_digests(run) == before and not (tmp_path / "run.partial").exists()


def test_resume_with_the_same_files_still_continues(finished, data_files, tmp_path):
    with _in_place(finished, tmp_path) as (model, data, run):
        assert _run(_sft(model, data_files, run, "--resume", "--max-steps", "3", "--save-steps", "1", data=data)) == 0
        assert json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3


# ---- every file a command writes is in its output check and its lock ----

def _eval(model, prompts, output, *extra):
    return ["eval", "--model", model, "--prompts", prompts, "--output", output, "--max-new-tokens", "2", *extra]


def test_eval_never_writes_its_samples_file_over_the_prompts(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "mine.samples.jsonl"
    prompts.write_text('{"prompt": "What is 2 plus 2?", "answers": ["4"]}\n')
    before = prompts.read_bytes()
    assert _run(_eval(tiny_model_dir, prompts, tmp_path / "mine.json", "--overwrite")) == 2
    error = _one_error(capsys)
    assert "its per-prompt records go to" in error and "which is the input --prompts" in error, error
    assert prompts.read_bytes() == before and not (tmp_path / "mine.json").exists()


def test_an_eval_whose_samples_file_is_another_evals_output_is_refused(tiny_model_dir, tmp_path, capsys):
    from lora_ogpsa.utils.outputs import output_lock

    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    with output_lock(tmp_path / "x.samples.jsonl"):  # held by an eval with --output x.samples.jsonl
        assert _run(_eval(tiny_model_dir, prompts, tmp_path / "x.json")) == 2
    assert "in use by another run" in _one_error(capsys)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["p.txt"]


def test_a_full_disk_during_eval_keeps_both_old_files(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from lora_ogpsa.utils import files

    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\nhow are you\n")
    output = tmp_path / "x.json"
    assert _run(_eval(tiny_model_dir, prompts, output)) == 0
    before = file_digests(tmp_path)
    real = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        if self.name == ".x.json.partial":  # the summary, written after the samples
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(files.Path, "write_text", full_disk)
    assert _run(_eval(tiny_model_dir, prompts, output, "--overwrite", "--limit", "1")) == 1
    assert re.search(r"failed: no space left on .* while writing .*x.json", _one_error(capsys))
    assert file_digests(tmp_path) == before  # both files as they were, no temporary left
    monkeypatch.setattr(files.Path, "write_text", real)
    assert _run(_eval(tiny_model_dir, prompts, output, "--overwrite", "--limit", "1")) == 0  # and a rerun works
    assert json.loads(output.read_text())["n"] == 1


# ---- an adapter is checked as numbers before it is used ----

def _spoiled_adapter(finished, target, how):
    from safetensors.torch import load_file, save_file

    shutil.copytree(finished / "run", target, ignore=shutil.ignore_patterns("checkpoint-*"))
    path = target / "adapter_model.safetensors"
    tensors = load_file(str(path))
    name = sorted(name for name in tensors if ".lora_B." in name)[0]
    if how == "int32":
        tensors = {key: (value * 1e6).to(torch.int32) for key, value in tensors.items()}
    else:
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    return target


ADAPTER_MESSAGES = {"int32": r"is stored as torch.int32, not floating point; not a trained LoRA adapter",
                    "nan": r"has NaN/Inf values; the adapter is corrupt"}


ADAPTER_COMMANDS = ("eval", "export", "merge --no-audit", "dpo --adapter")


def adapter_command(command, model, adapter, data_files, directory):
    """The command line of one of ADAPTER_COMMANDS using `adapter`; it writes nothing but under `directory/out*`."""
    prompts = directory / "p.txt"
    prompts.write_text("hello\n")
    out = directory / "out"
    return {"eval": _eval(model, prompts, directory / "out.json", "--adapter", adapter),
            "export": ["export", "--adapter", adapter, "--output", out],
            "merge --no-audit": ["merge", "--model", model, "--adapter", adapter, "--output", out, "--no-audit"],
            "dpo --adapter": ["dpo", "--model", model, "--adapter", adapter, "--data", data_files["dpo"],
                              "--reference", data_files["reference"], "--output", out, "--no-quantize",
                              "--max-steps", "1"]}[command]


@pytest.mark.parametrize("how", sorted(ADAPTER_MESSAGES))
@pytest.mark.parametrize("command", ADAPTER_COMMANDS)
def test_an_adapter_that_is_not_finite_floats_is_refused(finished, data_files, tmp_path, capsys, how, command):
    adapter = _spoiled_adapter(finished, tmp_path / "adapter", how)
    before = file_digests(adapter)
    assert _run(adapter_command(command, finished / "model", adapter, data_files, tmp_path)) == 2
    error = _one_error(capsys)
    assert re.search(ADAPTER_MESSAGES[how], error) and "adapter_model.safetensors: tensor " in error, error
    assert file_digests(adapter) == before and not any(path.name.startswith("out") for path in tmp_path.iterdir())


def test_merge_into_dequantized_weights_is_refused_for_a_full_precision_adapter(finished, tmp_path, capsys):
    """Its audit passed though the merged logits differed from the trained model's by 0.094."""
    args = ["merge", "--model", finished / "model", "--adapter", finished / "run", "--output", tmp_path / "m"]
    assert _run([*args, "--base", "dequantized"]) == 2
    assert "--base dequantized: " in (error := _one_error(capsys)) and "quantize: false" in error, error
    assert not (tmp_path / "m").exists()


def test_merge_into_the_original_weights_warns_for_a_4bit_adapter(finished, tmp_path, caplog):
    adapter = shutil.copytree(finished / "run", tmp_path / "adapter", ignore=shutil.ignore_patterns("checkpoint-*"))
    config = json.loads((adapter / "ogpsa_config.json").read_text())
    (adapter / "ogpsa_config.json").write_text(json.dumps({**config, "quantize": True}))
    assert _run(["merge", "--model", finished / "model", "--adapter", adapter, "--output", tmp_path / "m",
                 "--no-audit"]) == 0
    assert "was trained on the 4-bit base" in caplog.text and (tmp_path / "m" / "model.safetensors").is_file()


# ---- the Python API's contracts: what was given and what is expected ----

def test_ogpsa_callback_with_an_empty_reference_raises_before_training():
    from lora_ogpsa import OGPSACallback, OGPSAConfig

    callback = OGPSACallback(OGPSAConfig(), [])
    with pytest.raises(ValueError, match="no reference batches; the protected subspace would be empty"):
        callback.on_train_begin(args=None, state=None, control=None, model=None)
    OGPSACallback(OGPSAConfig(project="none"), []).on_train_begin(None, None, None)  # plain LoRA needs none


@pytest.mark.parametrize("samples, message", [
    (torch.zeros(0, 4, 3), r"shape \(0, 4, 3\) holds no sample; give S >= 1"),
    (torch.ones(5, 3, dtype=torch.int64), r"must be floating point \(gradients\), got torch.int64"),
    (torch.ones(5), r"must have shape \(S, \*param_shape\), got \(5,\)"),
    ([[1.0, 2.0]], r"must be a torch.Tensor \(S, \*param_shape\), got list"),
])
def test_compute_subspace_says_what_was_given_and_what_is_expected(samples, message):
    from lora_ogpsa import compute_subspace

    with pytest.raises((ValueError, TypeError), match=message):
        compute_subspace({"w": samples}, max_directions=2, energy=0.9)


@pytest.mark.parametrize("vectors, basis, message", [
    (torch.ones(3, 4), torch.ones(4), r"`basis` must be \(k, n\), .* got shape \(4,\)"),
    (torch.ones(3, 4), torch.ones(1, 1, 4), r"`basis` must be \(k, n\), .* got shape \(1, 1, 4\)"),
    (torch.ones(3, 4, dtype=torch.int32), torch.eye(4)[:1], r"`vectors` must be a floating-point tensor, got torch.int32"),
    (torch.ones(3, 5), torch.eye(4)[:1], r"`vectors` must be \(\.\.\., n\) with n = 4 entries .* got shape \(3, 5\)"),
    (torch.ones(3, 4), torch.eye(4, dtype=torch.int64)[:1], r"`basis` must be a floating-point tensor"),
])
def test_project_out_says_what_was_given_and_what_is_expected(vectors, basis, message):
    from lora_ogpsa import project_out

    with pytest.raises(ValueError, match=message):
        project_out(vectors, basis)


def test_project_out_still_projects():
    from lora_ogpsa import project_out

    basis = torch.eye(4)[:2]  # (k=2, n=4)
    assert torch.equal(project_out(torch.ones(3, 4), basis), torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3))
    assert torch.equal(project_out(torch.ones(4), torch.zeros(0, 4)), torch.ones(4))  # k = 0: unchanged


# ---- bounds: work a file can cause is limited, and said in one line ----

def test_a_chat_template_that_never_ends_is_refused(tiny_model_dir, data_files, tmp_path, capsys, monkeypatch):
    from lora_ogpsa.utils import limits

    monkeypatch.setattr(limits, "TEMPLATE_SECONDS", 1.0)  # a real template renders in milliseconds
    template = tmp_path / "loops.jinja"
    template.write_text("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
                        "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    args = ["sft", "--model", tiny_model_dir, "--data", data_files["sft"], "--reference", data_files["reference"],
            "--output", tmp_path / "out", "--no-quantize", "--chat_template_path", template]
    assert _run(args) == 2
    assert "its chat template did not render a 3-message conversation in 1 s" in _one_error(capsys)
    assert not (tmp_path / "out").exists()


PROMPT_FILES = [  # (file name, content, message) of eval --prompts files refused in one line
    ("big.txt", b"x" * ((1 << 20) + 10) + b"\n", r"big.txt:1: the line is over the 1 MiB limit per row"),
    ("big.jsonl", b'{"prompt": "' + b"x" * (1 << 20) + b'"}\n', r"big.jsonl:1: the row is 1.0 MiB, over the 1 MiB"),
    ("binary.txt", b"hello\n\x00\x01\x02\xff\n", r"binary.txt:2: a NUL byte — a binary file, not text"),
    ("latin1.txt", b"caf\xe9\n", r"latin1.txt:1: not UTF-8 text \(byte 3\)"),
]


def test_a_chat_template_that_never_ends_on_one_row_is_refused_naming_it(tiny_model_dir, data_files, tmp_path,
                                                                         capsys, monkeypatch):
    from lora_ogpsa.utils import limits

    monkeypatch.setattr(limits, "TEMPLATE_SECONDS", 1.0)
    template = tmp_path / "trap.jinja"
    template.write_text("{% for m in messages %}{% if 'trap' in m['content'] %}{% for a in range(100000) %}"
                        "{% for b in range(100000) %}{% endfor %}{% endfor %}{% endif %}{{ m['content'] }}{% endfor %}")
    data = tmp_path / "d.jsonl"
    rows = data_files["sft"].read_text().splitlines()
    data.write_text("\n".join([rows[0], rows[1].replace("How do I", "trap: how do I"), *rows[2:]]) + "\n")
    args = ["sft", "--model", tiny_model_dir, "--data", data, "--reference", data_files["reference"],
            "--output", tmp_path / "out", "--no-quantize", "--chat_template_path", template, "--ogpsa_project", "none"]
    assert _run(args) == 2
    assert re.search(r"--data .*d.jsonl:2: the chat template did not render this row in 1 s", _one_error(capsys))
    assert not (tmp_path / "out").exists()


def test_a_chat_template_that_never_ends_on_one_eval_prompt_is_refused(tiny_model_dir, tmp_path, capsys,
                                                                       monkeypatch):
    import shutil

    from lora_ogpsa.utils import limits

    monkeypatch.setattr(limits, "TEMPLATE_SECONDS", 1.0)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    template = (model / "chat_template.jinja").read_text()
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if 'trap' in m['content'] %}{% for a in range(100000) %}{% for b in range(100000) %}"
        "{% endfor %}{% endfor %}{% endif %}{% endfor %}" + template)
    prompts = tmp_path / "p.txt"
    prompts.write_text("What is 2 plus 2?\na trap: what is 3 plus 3?\n")
    assert _run(_eval(model, prompts, tmp_path / "out.json")) == 2
    assert "evaluation prompt 'a trap: what is 3 plus 3?': the chat template did not render this row in 1 s" in \
        _one_error(capsys)
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("name, content, message", PROMPT_FILES)
def test_eval_prompt_files_are_bounded_text(tiny_model_dir, tmp_path, capsys, name, content, message):
    prompts = tmp_path / name
    prompts.write_bytes(content)
    assert _run(_eval(tiny_model_dir, prompts, tmp_path / "out.json")) == 2
    assert re.search(message, _one_error(capsys))
    assert not (tmp_path / "out.json").exists()


def test_the_demo_checks_its_cache_can_be_written_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    args = ["demo", "--output", tmp_path / "demo", "--cache-dir", tmp_path / "file" / "cache", "--max-steps", "1"]
    assert _run(args) == 2
    assert re.search(r"--cache-dir .*file/cache/x: cannot write in .*file", _one_error(capsys))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file"]


def test_resume_of_a_finished_align_run_is_refused(tiny_model_dir, data_files, tmp_path, capsys):
    """Both stages finished: --resume would train nothing and replace the run with a copy of itself."""
    run = tmp_path / "aligned"
    args = ["align", "--model", tiny_model_dir, "--sft-data", data_files["sft"], "--dpo-data", data_files["dpo"],
            "--reference", data_files["reference"], "--output", run, "--no-quantize", "--lora-r", "2",
            "--max-length", "64", "--batch-size", "4", "--reference-examples", "4", "--max-steps", "1"]
    assert _run(args) == 0
    before = file_digests(run)
    assert _run([*args, "--resume"]) == 2
    assert "--resume: nothing to resume in" in (error := _one_error(capsys)) and "both stages" in error, error
    assert file_digests(run) == before and not (tmp_path / "aligned.partial").exists()


def test_time_limit_stops_a_loop_and_puts_an_outer_timer_back():
    import signal

    from lora_ogpsa.utils.errors import InputError
    from lora_ogpsa.utils.limits import time_limit

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    signal.setitimer(signal.ITIMER_REAL, 30.0)  # an outer timer, e.g. a test runner's
    try:
        with pytest.raises(InputError, match="over its time"), time_limit(0.2, "over its time"):
            while True:
                pass
        with time_limit(5.0, "unused"):
            quick = sum(range(1000))
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert quick == 499500 and 20.0 < left <= 30.0 and not fired  # the outer timer runs on, not restarted
        signal.raise_signal(signal.SIGALRM)
        assert fired == [True]  # the outer handler is back too
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
