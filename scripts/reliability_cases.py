"""Print the release checklist of bad-input cases: every case of tests/test_cli_errors.py, of
tests/test_faults.py's bad-input tables and of tests/test_reliability_trust.py's tables (model code, a resume
that cannot be exact, adapters that are not numbers, bounded prompt files), run through `lora-ogpsa` on a tiny
model, with its exit status and message (the tests assert these; this shows them). The kill -9 / full-disk /
concurrency / signal cases are tests only (tests/test_faults.py, tests/test_reliability*.py).

    python scripts/reliability_cases.py > /tmp/cases.md
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
TESTS = Path(__file__).resolve().parents[1] / "tests"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args: list) -> tuple[int, str]:
    from lora_ogpsa.cli import main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = main([str(arg) for arg in args])
    lines = [line for line in stderr.getvalue().splitlines() if line.startswith("lora-ogpsa:")]
    return status, lines[-1] if lines else ""


def main() -> None:
    logging.disable(logging.WARNING)
    sys.path.insert(0, str(TESTS))
    from lora_ogpsa.testing.tiny import save_tiny_model

    conftest, cli_errors, faults = _module("conftest"), _module("test_cli_errors"), _module("test_faults")
    root = Path(tempfile.mkdtemp(prefix="reliability-"))
    model = save_tiny_model(root / "model")
    data = {"sft": conftest.write_jsonl(root / "sft.jsonl", [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": conftest.REFUSAL}]}
        for p in conftest.HARMFUL]),
        "dpo": conftest.write_jsonl(root / "dpo.jsonl", [
            {"prompt": p, "chosen": conftest.REFUSAL, "rejected": f"Sure, step {i}."}
            for i, p in enumerate(conftest.HARMFUL)]),
        "reference": conftest.write_jsonl(root / "reference.jsonl", [
            {"prompt": f"What is {i} plus {i}?", "completion": f"{2 * i}."} for i in range(12)])}
    finished = root / "finished"
    assert _run(faults._sft(model, data, finished))[0] == 0
    rows = []
    for case in sorted(cli_errors.CASES):
        directory = root / f"c{len(rows)}"
        directory.mkdir()
        overrides, extra, _ = cli_errors.CASES[case]
        flags = {"--model": model, "--data": data["sft"], "--reference": data["reference"],
                 "--output": directory / "out", **overrides(directory)}
        rows.append((case, "sft", *_run(["sft", *[x for pair in flags.items() for x in pair], "--no-quantize",
                                             *extra])))
    for table, command in ((faults.BAD, "sft"), (faults.BAD_DPO, "dpo")):
        for case in sorted(table):
            directory = root / f"c{len(rows)}"
            directory.mkdir()
            shutil.copytree(finished, directory / "run")
            overrides, extra, _ = table[case](directory, model, finished)
            flags = {"--model": model, "--data": data["dpo" if command == "dpo" else "sft"],
                     "--reference": data["reference"], "--output": directory / "run", **overrides}
            rows.append((f"{case} (over a finished run, --overwrite)", command,
                         *_run([command, *[x for pair in flags.items() for x in pair], "--overwrite",
                                "--no-quantize", "--max-steps", "1", *extra])))
    prompts = root / "p.txt"
    prompts.write_text("hello\n")
    for case, extra in (("eval --batch-size 0", ["--batch-size", "0"]),
                        ("eval --max-new-tokens -1", ["--max-new-tokens", "-1"]),
                        ("eval --output an existing file", ["--output", data["sft"]])):
        args = ["eval", "--model", model, "--prompts", prompts, "--output", root / "e.json", *extra]
        rows.append((case, "eval", *_run(args)))
    model_copy = shutil.copytree(model, root / "model-copy")
    for case, command, flags in (  # issue 26 A: an output that is, contains or lies inside an input
            ("output is the model (--overwrite)", "sft", ["--model", model_copy, "--data", data["sft"],
                                                         "--output", model_copy, "--overwrite"]),
            ("output inside the input adapter", "dpo", ["--model", model, "--adapter", finished, "--data", data["dpo"],
                                                        "--output", finished / "sub"]),
            ("output contains the data file", "sft", ["--model", model, "--data", data["sft"], "--output", root,
                                                      "--overwrite"])):
        rows.append((case, command, *_run([command, *flags, "--reference", data["reference"], "--no-quantize",
                                           "--max-steps", "1"])))
    rows.append(("eval --output its own --prompts (--overwrite)", "eval",
                 *_run(["eval", "--model", model, "--prompts", prompts, "--output", prompts, "--overwrite"])))
    rows += _trust_cases(root, model, data, _module("test_reliability_trust"))
    print("| case | command | exit | message |\n|---|---|---|---|")
    for case, command, status, message in rows:
        shown = message.replace(str(root), "…").replace("|", "\\|")
        print(f"| {case} | {command} | {status} | {shown[:170]} |")
    print(f"\n{len(rows)} cases; {sum(status == 2 for *_, status, _ in rows)} exit 2")
    shutil.rmtree(root, ignore_errors=True)


def _trust_cases(root: Path, model: Path, data: dict, trust) -> list[tuple]:
    """The cases of tests/test_reliability_trust.py: no model code runs, no output is an input, a resume never
    mixes two runs, an adapter is numbers, prompt files and chat templates are bounded."""
    from lora_ogpsa.utils import limits

    rows, prompts = [], root / "p.txt"
    for how in ("config auto_map", "tokenizer auto_map", "a .py file beside config.json"):
        coded = trust._model_with_code(model, root / f"coded-{len(rows)}", root / "code-ran", how)
        rows.append((f"--model with {how}", "eval", *_run(trust._eval(coded, prompts, root / "e1.json"))))
    rows.append(("--trust_remote_code true", "sft", *_run(["sft", "--model", model, "--data", data["sft"],
                                                            "--output", root / "o1", "--trust_remote_code", "true"])))
    samples = root / "mine.samples.jsonl"
    samples.write_text('{"prompt": "What is 2 plus 2?"}\n')
    rows.append(("--prompts D/mine.samples.jsonl --output D/mine.json", "eval",
                 *_run(trust._eval(model, samples, root / "mine.json", "--overwrite"))))
    finished = root / "trust"
    finished.mkdir()
    shutil.copytree(model, finished / "model")
    shutil.copy(data["sft"], finished / "sft.jsonl")
    _run(trust._sft(finished / "model", data, finished / "run", "--max-steps", "2", "--save-steps", "1",
                    data=finished / "sft.jsonl"))
    for case, (change, extra, _) in sorted(trust.RESUME_CASES.items()):
        with tempfile.TemporaryDirectory() as aside, trust._in_place(finished, Path(aside)) as (m, d, r):
            change(m, d, r)
            rows.append((f"--resume: {case}", "sft", *_run(trust._sft(m, data, r, "--resume", "--max-steps", "3",
                                                                       *extra, data=d))))
    for how in sorted(trust.ADAPTER_MESSAGES):
        for command in trust.ADAPTER_COMMANDS:
            directory = root / f"a{len(rows)}"
            directory.mkdir()
            adapter = trust._spoiled_adapter(finished, directory / "adapter", how)
            args = trust.adapter_command(command, finished / "model", adapter, data, directory)
            rows.append((f"{how} adapter", command, *_run(args)))
    rows.append(("--base dequantized, adapter trained in full precision", "merge",
                 *_run(["merge", "--model", finished / "model", "--adapter", finished / "run", "--output",
                        root / "m1", "--base", "dequantized"])))
    for name, content, _ in trust.PROMPT_FILES:
        (root / name).write_bytes(content)
        rows.append((f"--prompts {name}", "eval", *_run(trust._eval(model, root / name, root / "e2.json"))))
    template = root / "loops.jinja"
    template.write_text("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}")
    limits.TEMPLATE_SECONDS = 1.0  # the shipped limit is 10 s
    rows.append(("a chat template that never ends (limit 1 s here)", "sft",
                 *_run(["sft", "--model", model, "--data", data["sft"], "--reference", data["reference"],
                        "--output", root / "o2", "--no-quantize", "--chat_template_path", template])))
    (root / "file").write_text("x")
    rows.append(("--cache-dir under a file", "demo", *_run(["demo", "--output", root / "d", "--cache-dir",
                                                             root / "file" / "cache"])))
    return rows


if __name__ == "__main__":
    main()
