"""Fault injection: kill -9 at chosen points, a full disk, concurrent runs, hostile and bad input — and after
each, every file that existed before is byte-identical and a rerun ends where an uninterrupted run does.

Kills run `tests/fault_runner.py` in a subprocess that SIGKILLs itself exactly when a given file has been
written or a given directory is about to be renamed (no timing races); the full disk is a writer that raises
ENOSPC at a given file.
"""

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import file_digests
from safetensors.torch import load_file

from lora_ogpsa.cli import main
from lora_ogpsa.utils.outputs import output_lock

RUNNER = Path(__file__).with_name("fault_runner.py")
TIMEOUT = 900
"""Seconds a child run may take: a tiny run takes ~20 s alone, and ten times that on a busy 2-core machine."""


def _default_signals():
    """In the child, before exec: SIGINT and SIGTERM at their defaults. A background job (`nohup make test &`)
    inherits SIGINT ignored, and a child that ignores Ctrl-C would never show how the command handles it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _sft(model, data_files, output, *extra):
    return [str(arg) for arg in ["sft", "--model", model, "--data", data_files["sft"], "--reference",
                                 data_files["reference"], "--output", output, "--no-quantize", "--lora-r", "2",
                                 "--max-length", "64", "--batch-size", "4", "--reference-examples", "4",
                                 "--learning-rate", "1e-3", "--max-steps", "4", "--save-steps", "2", *extra]]


def _faulty(args, fault_at, fault="kill", **env):
    """Start the CLI in a subprocess with a fault at `fault_at` (a glob on absolute paths)."""
    environment = {**os.environ, "FAULT_AT": str(fault_at), "FAULT": fault, "TQDM_DISABLE": "1",
                   "PYTHONPATH": os.pathsep.join(sys.path), **env}
    return subprocess.Popen([sys.executable, str(RUNNER), *args], env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)


def _paused_at_checkpoint_2(model, data_files, output):
    """A run into `output` in a subprocess, held while it writes checkpoint-2 (returned once it is there)."""
    flag = output.with_name("paused")
    process = _faulty(_sft(model, data_files, output), f"{output}.partial/checkpoint-2/optimizer.pt",
                      fault="pause", FAULT_FLAG=str(flag))
    deadline = time.monotonic() + TIMEOUT
    while not flag.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    return process


def _adapter(directory):
    return load_file(str(directory / "adapter_model.safetensors"))


def _same_adapter(one, other):
    first, second = _adapter(one), _adapter(other)
    return first.keys() == second.keys() and all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)


@pytest.fixture(scope="module")
def straight(tiny_model_dir, data_files, tmp_path_factory):
    """The uninterrupted run every interrupted one must end equal to."""
    output = tmp_path_factory.mktemp("straight") / "run"
    assert main(_sft(tiny_model_dir, data_files, output)) == 0
    return output


def test_kill_9_during_a_checkpoint_save_then_resume_ends_equal(tiny_model_dir, data_files, straight, tmp_path,
                                                                  caplog, capsys):
    output = tmp_path / "run"
    process = _faulty(_sft(tiny_model_dir, data_files, output), f"{output}.partial/checkpoint-4/optimizer.pt")
    assert process.wait(timeout=TIMEOUT) == -9
    cut = tmp_path / "run.partial" / "checkpoint-4"
    assert (cut / "optimizer.pt").is_file() and not (cut / "lora_ogpsa_complete.json").exists()
    left = file_digests(tmp_path / "run.partial")  # issue 26 E: a new run without --resume deletes nothing
    assert main(_sft(tiny_model_dir, data_files, output)) == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.count("\n") == 0 and "run.partial holds an earlier run that did not finish; pass --resume" in stderr
    assert file_digests(tmp_path / "run.partial") == left and not output.exists()
    caplog.set_level(logging.INFO)
    assert main(_sft(tiny_model_dir, data_files, output, "--resume")) == 0
    assert "checkpoint-4 is incomplete" in caplog.text and "from " in caplog.text and "checkpoint-2" in caplog.text
    assert _same_adapter(straight, output)


FULL_DISK_ERRORS = {  # what a full disk raises: Python's errno, and torch's zip writer, which checks positions
    "ENOSPC": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "torch's unexpected pos": lambda: RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 640 "
                                                   "vs 554"),
}


@pytest.mark.parametrize("raised", sorted(FULL_DISK_ERRORS))
def test_a_full_disk_during_a_checkpoint_save_then_resume_ends_equal(tiny_model_dir, data_files, straight, tmp_path,
                                                                      monkeypatch, capsys, raised):
    output = tmp_path / "run"
    save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if str(path).endswith("checkpoint-4/optimizer.pt"):
            raise FULL_DISK_ERRORS[raised]()
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(_sft(tiny_model_dir, data_files, output)) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "lora-ogpsa:" in line]
    assert len(errors) == 1 and __import__("re").search(
        rf"lora-ogpsa: failed: no space left on \S+ \(mounted at /\S*\) while writing {output}.partial; free space", errors[0]
    ), errors
    monkeypatch.setattr(torch, "save", save)
    assert main(_sft(tiny_model_dir, data_files, output, "--resume")) == 0  # from checkpoint-2: exact again
    assert _same_adapter(straight, output)


@pytest.mark.parametrize("point", ["before replacing", "between the two renames"])
def test_kill_9_while_replacing_a_finished_run_keeps_it(tiny_model_dir, data_files, straight, tmp_path, capsys, point):
    output = tmp_path / "run"
    shutil.copytree(straight, output)
    before = file_digests(output)
    at = output if point == "before replacing" else f"{output}.partial"  # rename run -> run.old, then .partial -> run
    process = _faulty(_sft(tiny_model_dir, data_files, output, "--overwrite", "--max-steps", "2"), at)
    assert process.wait(timeout=TIMEOUT) == -9
    if point == "between the two renames":
        assert not output.exists() and (tmp_path / "run.old").is_dir()
    # the next run into it (any command holding its lock) finds the finished run whole and refuses to replace it
    assert main(_sft(tiny_model_dir, data_files, output)) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert file_digests(output) == before and not (tmp_path / "run.old").exists()


def test_kill_9_during_merge_leaves_only_what_a_rerun_removes(tiny_model_dir, straight, tmp_path):
    merged = tmp_path / "merged"
    args = ["merge", "--model", str(tiny_model_dir), "--adapter", str(straight), "--output", str(merged)]
    process = _faulty(args, f"{merged}.partial/*.safetensors")
    assert process.wait(timeout=TIMEOUT) == -9
    assert not merged.exists() and (tmp_path / "merged.partial").is_dir()
    assert main(args) == 0
    assert sorted(path.name for path in tmp_path.iterdir() if not path.name.startswith(".")) == ["merged"]


def test_a_concurrent_run_is_refused_and_the_live_run_finishes(tiny_model_dir, data_files, straight, tmp_path,
                                                               capsys):
    output = tmp_path / "run"
    process = _paused_at_checkpoint_2(tiny_model_dir, data_files, output)
    live = file_digests(tmp_path / "run.partial")
    for args in (_sft(tiny_model_dir, data_files, output), _sft(tiny_model_dir, data_files, output, "--overwrite"),
                 _sft(tiny_model_dir, data_files, output, "--resume")):
        assert main(args) == 2
        assert f"in use by another run (pid {process.pid})" in capsys.readouterr().err
        assert file_digests(tmp_path / "run.partial") == live
    (tmp_path / "paused").unlink()
    assert process.wait(timeout=TIMEOUT) == 0
    assert _same_adapter(straight, output)


@pytest.mark.parametrize("signum, status, word", [(signal.SIGTERM, 143, "terminated"),
                                                  (signal.SIGINT, 130, "interrupted")])
def test_a_signal_mid_run_ends_in_one_line_and_the_run_resumes(tiny_model_dir, data_files, straight, tmp_path,
                                                               signum, status, word):
    """Issue 26 D: SIGTERM / Ctrl-C mid-run exit 143 / 130 with one line, the lock removed, OUT.partial kept
    and --resume ending equal to the uninterrupted run."""
    output = tmp_path / "run"
    process = _paused_at_checkpoint_2(tiny_model_dir, data_files, output)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=TIMEOUT)
    said = [line for line in stderr.splitlines() if line.startswith("lora-ogpsa:")]
    assert process.returncode == status and "Traceback" not in stderr, stderr
    assert len(said) == 1 and said[0].startswith(f"lora-ogpsa: {word} ("), stderr
    assert not (tmp_path / ".run.lock").exists() and (tmp_path / "run.partial").is_dir() and not output.exists()
    assert main(_sft(tiny_model_dir, data_files, output, "--resume")) == 0
    assert _same_adapter(straight, output)


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_the_command_starts_is_one_line(tiny_model_dir, data_files, tmp_path, signum, status):
    """A signal during the seconds of importing torch/TRL: no traceback (issue 26 D). The child says when its
    SIGTERM handler is in place (a marker file) and is then importing the command; the signal goes then."""
    output, ready = tmp_path / "run", tmp_path / "ready"
    code = ("import signal, sys\nfrom lora_ogpsa import entry\nset_handler = signal.signal\n"
            "def marked(signum, handler):\n    previous = set_handler(signum, handler)\n"
            f"    if signum == signal.SIGTERM:\n        open({str(ready)!r}, 'w').close()\n    return previous\n"
            "signal.signal = marked\nsys.exit(entry.main(sys.argv[1:]))\n")
    process = subprocess.Popen([sys.executable, "-c", code, *_sft(tiny_model_dir, data_files, output)],
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)
    deadline = time.monotonic() + TIMEOUT
    while not ready.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == status and "Traceback" not in stderr, stderr
    assert [line for line in stderr.splitlines() if line.strip()][-1].startswith("lora-ogpsa: "), stderr
    assert not output.exists() and not (tmp_path / ".run.lock").exists()


def test_the_entry_point_imports_no_torch_before_its_signal_handler():
    code = "import sys, lora_ogpsa.entry; print(sorted({'torch', 'trl', 'transformers'} & set(sys.modules)))"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout
    assert shown.strip() == "[]", shown


def test_a_diverging_run_stops_at_its_step_and_keeps_its_partial(tiny_model_dir, data_files, tmp_path, capsys):
    """Issue 26 B: --learning-rate 1e30 is caught where it breaks (exit 1, the step named), not at a file write."""
    output = tmp_path / "run"
    assert main(_sft(tiny_model_dir, data_files, output, "--learning-rate", "1e30")) == 1
    stderr = capsys.readouterr().err  # tqdm's cursor codes share lines with it: search, do not split
    assert stderr.count("lora-ogpsa:") == 1 and __import__("re").search(
        r"lora-ogpsa: failed: TrainingDivergedError: training diverged at step \d+: (a trainable weight is not "
        r"finite|the loss)", stderr), stderr
    assert (tmp_path / "run.partial").is_dir() and not output.exists()


def test_export_into_an_output_in_use_is_refused(straight, tmp_path, capsys):
    output = tmp_path / "exported"
    with output_lock(output):
        assert main(["export", "--adapter", str(straight), "--output", str(output)]) == 2
    assert "in use by another run" in capsys.readouterr().err and not output.exists()


def test_a_symlinked_output_is_replaced_where_it_points(tiny_model_dir, data_files, straight, tmp_path):
    target, link = tmp_path / "disk" / "run", tmp_path / "run"
    shutil.copytree(straight, target)
    (target / "adapter_model.safetensors").write_bytes(b"old")
    link.symlink_to(target, target_is_directory=True)
    assert main(_sft(tiny_model_dir, data_files, link, "--overwrite", "--max-steps", "2")) == 0
    assert link.is_symlink() and _adapter(target)  # the link stays; the run it points at is the new one
    assert sorted(path.name for path in target.parent.iterdir() if not path.name.startswith(".")) == ["run"]


def test_hostile_yaml_runs_nothing(tiny_model_dir, data_files, tmp_path, capsys):
    planted = tmp_path / "planted"
    config = tmp_path / "c.yaml"
    config.write_text(f"max_steps: !!python/object/apply:os.system ['touch {planted}']\n")
    assert main([*_sft(tiny_model_dir, data_files, tmp_path / "o"), "--config", str(config)]) == 2
    assert "--config" in capsys.readouterr().err
    assert not planted.exists() and not (tmp_path / "o").exists()


# ---- bad input on top of a finished run: exit 2, one line, and the run is byte-identical afterwards ----

STRICT_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _row(*turns):
    return json.dumps({"messages": [{"role": role, "content": content} for role, content in turns]})


def _write(path, text):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _changed_copy(source, target, change):
    shutil.copytree(source, target)
    change(target)
    return target


def _strict(model):
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = STRICT_TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _json_edit(path, change):
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def _no_template(model):
    _json_edit(model / "tokenizer_config.json", lambda config: config.pop("chat_template", None))
    (model / "chat_template.jinja").unlink(missing_ok=True)


def _wider_model(path):
    from lora_ogpsa.testing.tiny import save_tiny_model

    return save_tiny_model(path, hidden=96)


def _rank(adapter):
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))


# case: t (the case's directory), m (the tiny model), a (the finished run) -> (flag overrides, extra, message)
BAD = {
    "empty assistant turn": lambda t, m, a: ({"--data": _write(t / "d.jsonl", _row(("user", "hi"), ("assistant", " ")))},
                                             [], r"d.jsonl:1: field 'messages'\[1\].content is empty"),
    "roles out of order": lambda t, m, a: (
        {"--data": _write(t / "d.jsonl", _row(("user", "a"), ("assistant", "b")) + "\n"
                          + _row(("user", "a"), ("user", "b"), ("assistant", "c"))),
         "--model": _changed_copy(m, t / "model", _strict), "--ogpsa_project": "none"},
        [], r"d.jsonl:2: the model's chat template rejects this row \(Conversation roles must alternate"),
    "row over the size limit": lambda t, m, a: (
        {"--data": _write(t / "d.jsonl", _row(("user", "x" * (1 << 20)), ("assistant", "y")))}, [],
        r"d.jsonl:1: the row is 1.0 MiB, over the 1 MiB limit per row"),
    "every prompt fills --max-length": lambda t, m, a: ({"--ogpsa_project": "none"}, ["--max-length", "6", "--assistant_only_loss", "true"],
                                                        r"every row's prompt fills --max-length 6"),
    "non-UTF-8 data": lambda t, m, a: ({"--data": _write(t / "d.jsonl", b'{"prompt": "\xff\xfe"}\n')}, [],
                                       r"d.jsonl:1: not UTF-8 text"),
    "deeply nested JSON": lambda t, m, a: ({"--data": _write(t / "d.jsonl", "[" * 100_000 + "]" * 100_000)}, [],
                                           r"d.jsonl:1: (JSON nested too deeply|invalid JSON)"),
    "truncated model weights": lambda t, m, a: (
        {"--model": _changed_copy(m, t / "model", lambda d: _truncate(d / "model.safetensors"))}, [],
        r"model.safetensors: not a readable safetensors file"),
    "model without weights": lambda t, m, a: (
        {"--model": _changed_copy(m, t / "model", lambda d: (d / "model.safetensors").unlink())}, [],
        r"no model.safetensors or model.safetensors.index.json in it"),
    # issue 26 B: the model's config and tokenizer are checked before any work
    "config field of the wrong type": lambda t, m, a: (
        {"--model": _changed_copy(m, t / "model", lambda d: _json_edit(d / "config.json",
                                                                       lambda c: c.update(hidden_size="abc")))},
        [], r"config.json: .*'hidden_size'.*; fix the value or re-save the model"),
    "tokenizer without a chat template": lambda t, m, a: (
        {"--model": _changed_copy(m, t / "model", _no_template)}, [],
        r"its tokenizer has no chat template .*give one with --chat_template_path FILE.jinja"),
    "chat template from a directory": lambda t, m, a: ({"--chat_template_path": m}, [],
                                                       r"--chat_template_path .*: give a Jinja template file"),
    "unwritable output": lambda t, m, a: ({"--output": Path("/proc/lora-ogpsa-test/out")}, [],
                                          r"cannot write in /proc"),
    "output under a file": lambda t, m, a: ({"--output": _write(t / "f", "x") / "out"}, [],
                                            r"cannot write in .*f \(.*not a directory"),
}
BAD_DPO = {
    "adapter whose config has another rank": lambda t, m, a: (
        {"--adapter": _changed_copy(a, t / "adapter", _rank)}, [], r"has rank 2, adapter_config.json says r=8"),
    "truncated adapter weights": lambda t, m, a: (
        {"--adapter": _changed_copy(a, t / "adapter", lambda d: _truncate(d / "adapter_model.safetensors"))}, [],
        r"adapter_model.safetensors: not a readable safetensors file"),
    "adapter of another base": lambda t, m, a: (
        {"--model": _wider_model(t / "wide"), "--adapter": a}, [],
        r"--adapter .*: its model.layers.0.\S+ is \d+ x \d+, --model .*wide has \d+ x \d+; the adapter was "
        r"trained on another base \(.*\) — give that base as --model"),
}


@pytest.mark.parametrize("case", sorted(BAD) + sorted(BAD_DPO))
def test_bad_input_over_a_finished_run_exits_2_and_changes_nothing(tiny_model_dir, data_files, straight, tmp_path,
                                                                   capsys, case):
    output = tmp_path / "run"
    shutil.copytree(straight, output)
    before = file_digests(output)
    overrides, extra, message = (BAD.get(case) or BAD_DPO[case])(tmp_path, tiny_model_dir, straight)
    capsys.readouterr()  # what building the case printed (a model's save progress bar)
    command = "dpo" if case in BAD_DPO else "sft"
    flags = {"--model": tiny_model_dir, "--data": data_files["dpo" if command == "dpo" else "sft"],
             "--reference": data_files["reference"], "--output": output, "--overwrite": None, **overrides}
    args = [command, *[str(item) for pair in flags.items() for item in pair if item is not None], "--no-quantize",
            "--max-steps", "1", *extra]
    assert main(args) == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.count("\n") == 0 and stderr.startswith("lora-ogpsa: error:"), stderr
    assert __import__("re").search(message, stderr), stderr
    assert file_digests(output) == before and not (tmp_path / "run.partial").exists()


def test_a_resume_from_a_truncated_subspace_fails_and_keeps_the_finished_run(tiny_model_dir, data_files, straight,
                                                                               tmp_path, capsys):
    output = tmp_path / "run"
    shutil.copytree(straight, output)
    _truncate(output / "checkpoint-4" / "ogpsa_subspace.safetensors")
    before = file_digests(output)
    assert main(_sft(tiny_model_dir, data_files, output, "--resume", "--max-steps", "6")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lora-ogpsa:")]
    assert len(errors) == 1 and "ogpsa_subspace.safetensors" in errors[0]
    assert file_digests(output) == before
    assert main(_sft(tiny_model_dir, data_files, output, "--max-steps", "6")) == 2  # and no later run deletes it
    assert file_digests(output) == before


def test_a_failed_json_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    from lora_ogpsa.utils import files
    target = tmp_path / "report.json"
    target.write_text('{"old": true}\n')

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "replace", full_disk)
    with pytest.raises(OSError):
        files.write_json(target, {"new": True})
    assert target.read_text() == '{"old": true}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_refused_run_leaves_no_parent_directories(tiny_model_dir, data_files, tmp_path):
    output = tmp_path / "new" / "deeper" / "run"
    assert main(_sft(tiny_model_dir, data_files, output, "--max-length", "6", "--assistant_only_loss", "true",
                     "--ogpsa_project", "none")) == 2
    assert sorted(tmp_path.iterdir()) == []


def test_valid_peft_adapters_pass_the_adapter_check(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from lora_ogpsa.models.loading import check_adapter_dir, load_base_model

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2},
                        modules_to_save=["lm_head"])
    model = get_peft_model(load_base_model(tiny_model_dir, quantize=False, device="cpu"), config)
    model.save_pretrained(tmp_path / "adapter")
    assert check_adapter_dir(tmp_path / "adapter") == tmp_path / "adapter"
