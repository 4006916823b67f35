"""Every setting of `lora-ogpsa compare` and `lora-ogpsa calibrate`, declared once (`train.arguments.option`):
the dataclasses their flags and `--config` keys are generated from (TRL's parser, as for the training
commands). The suites are shared by both commands (`SuiteArguments`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lora_ogpsa.train.arguments import option
from lora_ogpsa.utils.errors import InputError

COMPARE, CALIBRATE = ("compare",), ("calibrate",)
MAPPING_FIELDS = ("methods", "training")
"""Fields holding a mapping: a YAML mapping in `--config`, a JSON object on the command line."""


@dataclass
class SuiteArguments:
    """The evaluation suites: the user's own files, each dealt once into dev and test by `split_seed` (or its
    test part given as a file of its own)."""

    harmful: str | None = option(None, "Harmful prompts, refusal wanted: .txt (one per line) or .jsonl with a "
                                 "'prompt' field.", commands=COMPARE + CALIBRATE)
    benign: str | None = option(None, "Benign prompts, refusal not wanted: .txt or .jsonl; a .jsonl row may carry "
                                "'sounds_harmful': true (a look-alike: its refusal rate is reported apart).",
                                commands=COMPARE + CALIBRATE)
    utility: str | None = option(None, "Utility questions (optional): .jsonl with 'prompt' and 'answers' (the "
                                 "accepted short answers).", commands=COMPARE + CALIBRATE)
    harmful_test: str | None = option(None, "The harmful suite's test part as its own file (then --harmful is the "
                                      "dev part, and nothing is dealt).", commands=COMPARE + CALIBRATE)
    benign_test: str | None = option(None, "The benign suite's test part as its own file.",
                                     commands=COMPARE + CALIBRATE)
    utility_test: str | None = option(None, "The utility suite's test part as its own file.",
                                      commands=COMPARE + CALIBRATE)
    split_seed: int = option(0, "Seed of the one deal of every suite into dev and test.", commands=COMPARE + CALIBRATE)
    dev_share: float = option(0.5, "Share of each dealt suite that goes to dev (the rest is test).",
                              commands=COMPARE + CALIBRATE)
    limit: int | None = option(None, "Only the first N prompts of each suite part: a quick look, not a result "
                               "(default: all).", commands=COMPARE + CALIBRATE)
    max_new_tokens: int = option(16, "Greedy new tokens per harmful/benign response (a refusal is decided in the "
                                 "opening; utility answers get 32).", commands=COMPARE + CALIBRATE)
    eval_batch_size: int = option(32, "Prompts per generation batch.", commands=COMPARE + CALIBRATE)


@dataclass
class CompareArguments:
    """`lora-ogpsa compare`: methods × seeds trained on one base, stage and data, every checkpoint evaluated."""

    model: str | None = option(None, "Base model directory (required).", commands=COMPARE)
    stage: str = option("sft", "Training command of every method: sft, dpo or align (SFT then DPO).",
                        commands=COMPARE)
    data: str | None = option(None, "Training rows of the sft or dpo stage.", commands=COMPARE)
    sft_data: str | None = option(None, "SFT rows of the align stage.", commands=COMPARE)
    dpo_data: str | None = option(None, "Preference rows of the align stage.", commands=COMPARE)
    reference: str | None = option(None, "Reference rows OGPSA protects (and a replay method may mix in).",
                                   commands=COMPARE)
    methods: dict | str | None = option(None, "Methods to compare: name -> training options it overrides, e.g. "
                                        "{plain: {ogpsa_project: none}, ogpsa: {}} (a JSON object on the command "
                                        "line; required).", commands=COMPARE)
    training: dict | str | None = option(None, "Training options shared by every method (a method's own "
                                         "override wins), e.g. {learning_rate: 3e-4, lora_r: 16}.",
                                         commands=COMPARE)
    baseline: str | None = option(None, "The method every other is paired against (default: the first).",
                                  commands=COMPARE)
    seeds: list[int] = option(None, "Training seeds: every method is trained once per seed (default: 0).",
                              commands=COMPARE, factory=lambda: [0])
    max_steps: int = option(32, "Optimizer steps per run (per stage for align).", commands=COMPARE)
    save_steps: int = option(8, "A checkpoint every this many steps: each is evaluated (the curve along which "
                             "methods are matched in safety).", commands=COMPARE)
    until_refusal: float | None = option(None, "Train each run only until a checkpoint's harmful refusal on the "
                                         "dev split reaches this rate, in (0, 1] (read every save_steps; max_steps "
                                         "is then the cap): every method trained to matched safety. The report "
                                         "says where each run stopped, or that it stopped at the cap.",
                                         commands=COMPARE)
    lambdas: list[float] | None = option(None, "Also evaluate each final adapter scaled by these λ in (0, 1) (the "
                                         "λ-curve; default: none).", commands=COMPARE)
    levels: list[float] = option(None, "Harmful-refusal levels at which the tax is read.", commands=COMPARE,
                                 factory=lambda: [0.3, 0.5, 0.7, 0.9])
    split: str = option("test", "The split every checkpoint is evaluated on: dev while choosing, test for the "
                        "final table.", commands=COMPARE)
    output_dir: str | None = option(None, "Output directory (required): runs, evaluations, report.", commands=COMPARE)


@dataclass
class CalibrateArguments:
    """`lora-ogpsa calibrate`: the λ (and checkpoint) reaching a harmful-refusal target with the least tax."""

    model: str | None = option(None, "Base model directory (required).", commands=CALIBRATE)
    adapter: list[str] | None = option(None, "The adapter, or several checkpoints of one run (required).",
                                       commands=CALIBRATE)
    target_refusal: float | None = option(None, "Harmful-refusal rate to reach on dev, in (0, 1] (required).",
                                          commands=CALIBRATE)
    grid: list[float] = option(None, "λ evaluated on dev before bisecting, in (0, 1].", commands=CALIBRATE,
                               factory=lambda: [0.25, 0.5, 0.75, 1.0])
    bisection_steps: int = option(4, "Bisection steps between the grid points where refusal first crosses the "
                                  "target.", commands=CALIBRATE)
    output_dir: str | None = option(None, "Output directory (required): the folded adapter, its card and "
                                    "calibration.json.", commands=CALIBRATE)
    overwrite: bool = option(False, "Replace an existing --output_dir.", commands=CALIBRATE)
    evaluation_cache: str | None = option(None, "Where evaluations are cached by weights and suites (default: "
                                          "'.NAME.evaluations' beside --output_dir): a rerun, e.g. with another "
                                          "target, re-evaluates nothing.", commands=CALIBRATE)


def parse_mapping(text: Any) -> dict:
    """A mapping given as JSON text (the command line) or already a mapping (a YAML `--config`)."""
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"expected a JSON object such as '{{\"plain\": {{\"ogpsa_project\": \"none\"}}}}', got "
                         f"{text!r} ({error.msg})") from None
    if not isinstance(value, dict):
        raise InputError(f"expected a JSON object, got {type(value).__name__} {text!r}")
    return value
