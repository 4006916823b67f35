"""Regenerate the flag tables of docs/cli.md from the declarations they document.

    python scripts/gen_cli_docs.py            # rewrite the generated part of docs/cli.md
    python scripts/gen_cli_docs.py --check    # exit 1 when docs/cli.md is out of date (tests/test_docs.py)

The training commands' table is built from the dataclasses of `lora_ogpsa/train/arguments.py` (every field
declared there: the run, trainer-default, model and OGPSA settings, each with its commands, default and help);
every other command's table from its argparse subparser in `lora_ogpsa/cli.py`, so a command or flag added
there appears here on the next run. Only the text between the two markers is replaced.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "cli.md"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # this checkout's package, also when run as `python scripts/gen_cli_docs.py`
BEGIN = "<!-- BEGIN GENERATED: scripts/gen_cli_docs.py writes what follows; do not edit by hand -->"
END = "<!-- END GENERATED -->"


def _cell(value: Any) -> str:
    """A markdown table cell: one line, pipes escaped."""
    text = " ".join(str(value).split())
    return text.replace("|", "\\|")


def _default(value: Any) -> str:
    if value is None or value is dataclasses.MISSING:
        return "–"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list | tuple):
        return "`" + " ".join(map(str, value)) + "`" if value else "–"
    return f"`{value}`"


def _help(text: str | None) -> str:
    text = (text or "").replace("%(default).0s", "").replace("%%", "%")
    return _cell(text)


def _field_default(item: dataclasses.Field) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return None


def training_rows() -> list[tuple[str, str, str, str, str]]:
    """(flag, other names, commands, default, help) for every field `train/arguments.py` declares."""
    from lora_ogpsa.train import arguments as declared

    trainer = [item for item in dataclasses.fields(declared._DPODefaults) if item.init]
    sources: list[tuple[Iterable[dataclasses.Field], bool]] = [
        (dataclasses.fields(declared.RunArguments), False), (trainer, False),
        (dataclasses.fields(declared.ModelArguments), False), (dataclasses.fields(declared.OGPSA_ARGUMENTS), True)]
    rows, seen = [], set()
    for fields, is_ogpsa in sources:
        for item in fields:
            if item.name in seen or not item.init:
                continue
            seen.add(item.name)
            ours = declared.ours(item)
            commands = declared.TRAINING_COMMANDS if is_ogpsa else ours["commands"]
            aliases = sorted({name.replace("_", "-") for name in item.metadata.get("aliases", [])})
            rows.append((f"`--{item.name}`", " ".join(f"`{name}`" for name in aliases),
                         " ".join(commands), _default(_field_default(item)), _help(item.metadata.get("help"))))
    return rows


def _inherited_counts() -> dict[str, int]:
    """How many more flags each training command takes from TRL's configs than this table lists."""
    from lora_ogpsa.train import arguments as declared

    listed = {item.name for item in dataclasses.fields(declared._DPODefaults)}
    return {command: sum(1 for item in dataclasses.fields(cls) if item.init and item.name not in listed)
            for command, cls in declared.TRAINING_ARGUMENTS.items()}


def command_tables() -> dict[str, tuple[str, list[tuple[str, str, str]]]]:
    """Every non-training command of `lora-ogpsa`: (its help, [(flags, default, help)])."""
    from lora_ogpsa.cli import build_parser
    from lora_ogpsa.train.arguments import TRAINING_COMMANDS

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in action._choices_actions}
    tables = {}
    for name, subparser in action.choices.items():
        if name in TRAINING_COMMANDS:
            continue
        rows = [(" ".join(f"`{flag}`" for flag in flag_action.option_strings),
                 "–" if flag_action.default is None or flag_action.default == argparse.SUPPRESS
                 else _default(flag_action.default),
                 _help(flag_action.help)) for flag_action in subparser._actions
                if flag_action.option_strings and flag_action.dest != "help"]
        tables[name] = (helps.get(name) or "", rows)
    return tables


def render() -> str:
    """The generated part of docs/cli.md (between the markers, markers excluded)."""
    lines = ["", "### Training flags (`sft`, `dpo`, `align`)", "",
             "Every setting `lora_ogpsa/train/arguments.py` declares; each is a flag in `_` or `-` spelling and a "
             "key of `--config FILE.yaml`.", "",
             "| flag | other names | commands | default | help |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in training_rows()]
    counts = _inherited_counts()
    lines += ["", "Beyond these, every other field of TRL's `SFTConfig` (`sft`: "
              f"{counts['sft']} more) or `DPOConfig` (`dpo`, `align`: {counts['dpo']} more) is a flag with TRL's "
              "default and help, as `lora-ogpsa sft --help` lists them."]
    for name, (summary, rows) in command_tables().items():
        lines += ["", f"### `{name}`", "", f"{_cell(summary)}." if summary else "", "",
                  "| flag | default | help |", "|---|---|---|", *(f"| {' | '.join(row)} |" for row in rows)]
    return "\n".join(line for index, line in enumerate(lines)
                     if not (line == "" and index and lines[index - 1] == "")) + "\n"


def updated(text: str) -> str:
    """`text` (docs/cli.md) with its generated part replaced by `render()`."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC}: the markers {BEGIN!r} and {END!r} are missing; put them back around the tables")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{render()}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    """Rewrite docs/cli.md, or with --check report whether it is current (exit 1 when not)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md is out of date")
    args = parser.parse_args(argv)
    text = DOC.read_text(encoding="utf-8")
    new = updated(text)
    if args.check:
        if new != text:
            sys.stderr.write(f"{DOC} is out of date: run `python scripts/gen_cli_docs.py`\n")
            return 1
        return 0
    DOC.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
