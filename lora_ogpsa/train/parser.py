"""The command-line parser of every `lora-ogpsa` command (TRL's `TrlParser`, one-line errors), and the
training settings of one run parsed from option values the way the command line parses them (`compare`'s
methods are training options given as a mapping)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
import types
from collections.abc import Mapping
from typing import Any

from trl import TrlParser

from lora_ogpsa.train.arguments import OURS, attribute_docs, dataclass_types
from lora_ogpsa.utils.errors import InputError


class Parser(TrlParser):
    """TRL's parser (a transformers `HfArgumentParser`) whose errors are one line (exit 2) and which takes no
    abbreviated flags (argparse would read `--learn` as `--learning_rate`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        # argparse reads `-1e-3` as a flag ("expected one argument"); take it, like `-0.001`, as a number, so
        # the range check answers (argparse's own pattern plus an exponent).
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        """A help text that states its own default keeps it, without argparse's "(default: None)" after it."""
        text = kwargs.get("help")
        if isinstance(text, str) and "(default:" in text and "%(default)" not in text:
            kwargs["help"] = text + "%(default).0s"
        return super().add_argument(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(f"{message} (see `{self.prog} --help`)")

    def _add_dataclass_arguments(self, dtype: Any) -> None:
        Parser._docs = {**getattr(Parser, "_docs", {}), **attribute_docs(dtype)}
        super()._add_dataclass_arguments(dtype)

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, item: dataclasses.Field) -> None:
        """argparse gets every metadata key as a keyword; ours (`train.arguments.option`) stays out. A field
        without help text gets its attribute docstring's first sentence (OGPSAConfig documents its fields so)."""
        metadata = {k: v for k, v in item.metadata.items() if k != OURS}
        if not metadata.get("help") and item.name in getattr(Parser, "_docs", {}):
            metadata["help"] = Parser._docs[item.name]
        if metadata != dict(item.metadata):
            item = copy.copy(item)
            item.metadata = types.MappingProxyType(metadata)
        TrlParser._parse_dataclass_field(parser, item)


def option_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every key a parser takes (each long option without dashes, `-` as `_`) → its action."""
    return {option[2:].replace("-", "_"): action for action in parser._actions
            for option in action.option_strings if option.startswith("--") and action.dest != "help"}


def as_argv(values: Mapping[str, Any]) -> list[str]:
    """Option values as a command line: `{"learning_rate": 1e-4, "lora_target_modules": ["q_proj"]}` →
    `--learning_rate 0.0001 --lora_target_modules q_proj`; a None value is left out (the default stays)."""
    argv: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        items = value if isinstance(value, list | tuple) else [value]
        argv += [f"--{key}", *(str(item).lower() if isinstance(item, bool) else str(item) for item in items)]
    return argv


def training_settings(command: str, values: Mapping[str, Any], *, where: str = "training options"):
    """The `TrainSettings` of one `sft`/`dpo`/`align` run from option values (field names or flag names, as in
    a `--config` file), parsed and checked as the command line is.

    Raises:
        InputError: an unknown key (naming `where` and the closest known key), a value of the wrong type, or
            out of range.
    """
    import difflib

    from lora_ogpsa.train.settings import to_train_settings

    parser = Parser(dataclass_types(command), prog=f"lora-ogpsa {command}")
    keys = option_keys(parser)
    for key in values:
        if key not in keys:
            close = difflib.get_close_matches(key, list(keys), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"see `lora-ogpsa {command} --help`"
            raise InputError(f"{where}: unknown {command} option '{key}'; {hint}")
    defaults = vars(parser.parse_args([]))
    try:
        return to_train_settings(command, vars(parser.parse_args(as_argv(values))), defaults)
    except InputError as error:
        raise InputError(f"{where}: {error}") from None
