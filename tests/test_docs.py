"""The README and docs/: size, links that resolve, no wording that dates them, intervals inside what a rate
can be, and the generated flag tables of docs/cli.md kept current (scripts/gen_cli_docs.py)."""

import argparse
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
TEXTS = [ROOT / "README.md", *DOCS]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_short_and_says_what_a_newcomer_needs():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.encode()) <= 12_000
    for needed in ("arxiv.org/abs/2602.07892", "## Install", "## Quickstart", "make demo", "## Limitations",
                   "## Citation", "Apache-2.0", "alignment_tax_test"):
        assert needed in text, needed


def test_docs_name_no_session_round_or_issue():
    for path in TEXTS:
        text = path.read_text(encoding="utf-8")
        found = re.findall(r"(?i)this round|previous round|issue [0-9]|\bsession\b", text)
        assert not found, (path.name, found)


def test_relative_links_resolve():
    for path in TEXTS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            assert (path.parent / target).exists(), (path.name, target)


def test_percent_intervals_stay_within_0_and_100():
    pattern = re.compile(r"(\d+(?:\.\d+)?) ?% \[(−|-)?(\d+(?:\.\d+)?)%?, (\d+(?:\.\d+)?)%?\]")
    for path in TEXTS:
        for value, minus, low, high in pattern.findall(path.read_text(encoding="utf-8")):
            assert not minus and float(high) <= 100 and float(low) <= float(value) <= float(high), \
                (path.name, value, low, high)


def test_licence_and_citation():
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] and citation["license"] == "Apache-2.0"
    assert any("2602.07892" in reference["url"] for reference in citation["references"])


def test_cli_reference_is_generated_and_current():
    gen = _generator()
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert gen.updated(text) == text, "docs/cli.md is out of date: run `python scripts/gen_cli_docs.py`"
    for flag in ("`--reference`", "`--ogpsa_project`", "`--max_directions`", "`--lora_r`", "`--beta`"):
        assert flag in text, flag


def test_the_check_fails_on_a_stale_table(tmp_path, monkeypatch):
    gen = _generator()
    stale = tmp_path / "cli.md"
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    stale.write_text(text.replace("| `--lora_r` |  | sft dpo align | `16` |", "| `--lora_r` |  | sft dpo align | `8` |"))
    monkeypatch.setattr(gen, "DOC", stale)
    assert gen.main(["--check"]) == 1
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0  # regenerated: current again
    assert stale.read_text() == text


def test_a_command_or_flag_added_later_appears_in_the_tables(monkeypatch):
    """Commands another part adds to the CLI (its subparsers) are documented on the next run, unchanged code."""
    import lora_ogpsa.cli as cli

    gen = _generator()
    build = cli.build_parser

    def with_new_command():
        parser = build()
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        new = commands.add_parser("audit-later", help="a command added later")
        new.add_argument("--output_dir", default="runs/audit", help="where | the report goes")
        return parser

    monkeypatch.setattr(cli, "build_parser", with_new_command)
    text = gen.render()
    assert "### `audit-later`" in text and "| `--output_dir` | `runs/audit` | where \\| the report goes |" in text


def test_the_generator_refuses_a_file_without_markers():
    with pytest.raises(SystemExit, match="markers"):
        _generator().updated("# Command line\n")


def test_the_readme_data_rows_are_valid_rows(tmp_path):
    """Every JSON row the README shows is read by the data reader in its own kind (SFT or preference)."""
    import json

    from lora_ogpsa.data.rows import read_rows

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = [json.loads(line) for block in re.findall(r"```json\n(.*?)```", text, re.DOTALL)
            for line in block.splitlines() if line.strip()]
    preference = [row for row in rows if "chosen" in row]
    sft = [row for row in rows if "chosen" not in row]
    assert sft and preference
    for kind, chosen in (("sft", sft), ("preference", preference)):
        path = tmp_path / f"{kind}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in chosen))
        assert read_rows(path, kind).rows == chosen


def test_example_configs_use_the_current_keys():
    """`project:` is TRL's trackio project; OGPSA's mode is `ogpsa_project:` (the old key only warns)."""
    for path in sorted((ROOT / "examples" / "configs").glob("*.yaml")):
        values = yaml.safe_load(path.read_text())
        assert "project" not in values and values["ogpsa_project"] in ("update", "grad", "none"), path.name


def test_examples_readme_names_importable_modules():
    import importlib

    text = (ROOT / "examples" / "README.md").read_text(encoding="utf-8")
    for dotted in re.findall(r"`(lora_ogpsa(?:\.\w+)+)`", text):
        module, _, name = dotted.rpartition(".")
        assert hasattr(importlib.import_module(module), name), dotted
