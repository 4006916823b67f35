"""`lora-ogpsa` (also `python -m lora_ogpsa`): sft, dpo, align, export, merge, eval, demo, compare, calibrate.

Every flag can also come from `--config FILE.yaml` (flag names with `-` → `_`); flags given on the command
line override the file. Exit status: 0 success, 2 bad input (one line on stderr naming the file, row and
field), 1 any other failure, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lora_ogpsa.train.arguments import dataclass_types
from lora_ogpsa.train.parser import Parser as _Parser
from lora_ogpsa.utils.errors import InputError, disk_full_line, interrupted

logger = logging.getLogger("lora_ogpsa")

PROG = "lora-ogpsa"


def build_parser() -> argparse.ArgumentParser:
    """The full command-line parser (one subparser per command)."""
    from lora_ogpsa import __version__
    parser = _Parser(prog=PROG, description="Safety alignment with LoRA/QLoRA and OGPSA (orthogonal gradient "
                                             "projection) of the safety updates away from a reference subspace.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--log-level", dest="console_log_level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="what the console shows (before the command)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, help_text in (("sft", "supervised fine-tuning on safety data"),
                            ("dpo", "DPO on preference pairs (fresh adapter, or continue --adapter)"),
                            ("align", "SFT, then DPO on the same adapter (DPO reference = base + SFT adapter)")):
        _add_training_flags(commands.add_parser(name, help=help_text, description=help_text,
                                                dataclass_types=dataclass_types(name)))
    _add_export_flags(commands.add_parser("export", help="re-export a checkpoint as a clean standalone adapter"))
    _add_merge_flags(commands.add_parser("merge", help="merge an adapter into the base model"))
    _add_eval_flags(commands.add_parser("eval", help="generate on a prompt set and measure refusals"))
    _add_demo_flags(commands.add_parser("demo", help="the main job: align SmolLM2-135M-Instruct end to end"))
    _add_experiment_flags(commands.add_parser("compare", help="methods x seeds on your model and suites: tax at "
                                              "matched safety, paired", dataclass_types=_experiment_types("compare")))
    _add_experiment_flags(commands.add_parser("calibrate", help="scale a finished adapter by the λ reaching a "
                                              "refusal target with the least tax",
                                              dataclass_types=_experiment_types("calibrate")))
    return parser


def _experiment_types(command: str) -> tuple[type, ...]:
    from lora_ogpsa.experiment.arguments import CalibrateArguments, CompareArguments, SuiteArguments

    return ({"compare": CompareArguments, "calibrate": CalibrateArguments}[command], SuiteArguments)


def _add_experiment_flags(parser: argparse.ArgumentParser) -> None:
    """`--config`, and mapping fields (`methods`, `training`) read as JSON on the command line."""
    from lora_ogpsa.experiment.arguments import MAPPING_FIELDS, parse_mapping

    parser.add_argument("--config", type=Path, help="YAML file of the settings (keys: the flag names); flags "
                                                    "given on the command line override it")
    for action in parser._actions:
        if action.dest in MAPPING_FIELDS:
            action.type = parse_mapping


def _add_training_flags(parser: argparse.ArgumentParser) -> None:
    """Beyond the dataclass fields: `--config`, and the old `--[no-]gradient-checkpointing` switch."""
    parser.add_argument("--config", type=Path, help="YAML file of flag values (keys: field names, as for `trl sft "
                                                    "--config`); flags given on the command line override it")
    checkpointing = next(action for action in parser._actions if action.dest == "gradient_checkpointing")
    checkpointing.nargs, checkpointing.const = "?", True  # a bare --gradient-checkpointing means true
    parser.add_argument("--no-gradient-checkpointing", "--no_gradient_checkpointing", action="store_false",
                        dest="gradient_checkpointing", default=argparse.SUPPRESS,
                        help="turn gradient checkpointing off (the same as --gradient_checkpointing false)")


def _add_export_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file of flag values")
    parser.add_argument("--adapter", help="a training output or checkpoint-N directory")
    parser.add_argument("--output", help="where the standalone adapter goes")
    parser.add_argument("--no-subspace", action="store_true", help="leave out ogpsa_subspace.safetensors")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output once the export is done")


def _add_merge_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file of flag values")
    parser.add_argument("--model", help="base model directory")
    parser.add_argument("--adapter", help="adapter directory")
    parser.add_argument("--output", help="directory for the merged model")
    parser.add_argument("--base", choices=["original", "dequantized"], default="original",
                        help="original: add the delta to the full-precision weights; dequantized: to dequant(NF4(W))")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype of the merged weights")
    parser.add_argument("--no-audit", action="store_true",
                        help="skip comparing the merged model with base + adapter (it loads a full model)")


def _add_eval_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file of flag values")
    parser.add_argument("--model", help="model directory (a base, or a merged model)")
    parser.add_argument("--adapter", help="adapter directory to apply on top of --model")
    parser.add_argument("--prompts", help="a .txt (one prompt per line) or .jsonl (`prompt` field) file, or a "
                                          "built-in suite: harmbench-test, benign-test, utility-test, "
                                          "donotanswer-heldout-test (and each -dev split), harmbench, utility")
    parser.add_argument("--output", help="JSON file for the results")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="greedy new tokens per response")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch")
    parser.add_argument("--quantize", action="store_true", help="load the base in 4-bit NF4")
    parser.add_argument("--limit", type=int, help="evaluate only the first N prompts")
    parser.add_argument("--system-prompt", help="a system message put before every prompt")
    parser.add_argument("--seed", type=int, default=0, help="torch's seed before generating (recorded)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _add_demo_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file of flag values")
    parser.add_argument("--output", default="runs/demo", help="output directory")
    parser.add_argument("--compare", action="store_true", help="also train plain QLoRA and the replay baseline")
    parser.add_argument("--max-steps", type=int, help="optimizer steps per stage (default: sized for the machine)")
    parser.add_argument("--seeds", type=int, help="training seeds: every method trained and evaluated per seed, the "
                                                  "report adds means and 95%% intervals across them (default: 1 "
                                                  "on the CPU, 3 on a GPU)")
    parser.add_argument("--model", help="a local model directory instead of the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--cache-dir", help="where the converted model and built data are cached (default: "
                                            "$LORA_OGPSA_CACHE, else ~/.cache/lora_ogpsa)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output once the new demo is done")


# ---- parsing with --config ----

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line, filling unset flags from `--config FILE.yaml`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is None:
        return args
    subparser = _subparser(parser, args.command)
    values = _read_config(args.config, subparser)
    for action in subparser._actions:
        if action.dest in values:
            action.required = False  # given by the file
    subparser.set_defaults(**values)
    return parser.parse_args(argv)


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def _read_config(path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise InputError(f"--config {path}: file not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise InputError(f"--config {path}: invalid YAML ({str(error).splitlines()[0]})") from error
    if not isinstance(values, dict):
        raise InputError(f"--config {path}: must be a mapping of flag names to values, got {type(values).__name__}")
    values.pop("env", None) if isinstance(values.get("env"), dict) else None  # TRL's `env:` block
    keys = _config_keys(parser)
    unknown = sorted(set(values) - set(keys))
    if unknown:
        close = difflib.get_close_matches(unknown[0], keys, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"see `{parser.prog} --help`"
        raise InputError(f"--config {path}: unknown key '{unknown[0]}'; {hint}")
    translated: dict[str, Any] = {}
    switches = {action.dest for action in parser._actions if _is_switch(action)}
    texts = {action.dest for action in parser._actions if action.type in (str, Path) and action.nargs is None}
    for key, value in values.items():
        dest, negative = keys[key]
        if dest in texts and value is not None and not isinstance(value, str):
            raise InputError(f"--config {path}: key '{key}' must be a string (a path or a name), got "
                             f"{type(value).__name__} {value!r}")
        if dest in switches and not (isinstance(value, bool) or value is None):
            raise InputError(f"--config {path}: key '{key}' must be true or false (unquoted), got {value!r}")
        translated[dest] = (not value if isinstance(value, bool) else value) if negative else value
    return translated


def _is_switch(action: argparse.Action) -> bool:
    """A true/false flag: store_true/store_false, or a dataclass bool field (HfArgumentParser's string_to_bool)."""
    return isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction) or \
        getattr(action.type, "__name__", "") == "string_to_bool"


def _config_keys(parser: argparse.ArgumentParser) -> dict[str, tuple[str, bool]]:
    """Every YAML key a parser accepts: each long option without dashes (`batch_size`, `per_device_train_batch_size`,
    `no_quantize`) → (destination, whether the option stores the negation)."""
    keys = {}
    for action in parser._actions:
        if action.dest in ("help", "config", "version"):
            continue
        for option in action.option_strings:
            if option.startswith("--"):
                negative = isinstance(action, argparse._StoreFalseAction)
                keys.setdefault(option[2:].replace("-", "_"), (action.dest, negative))
    return keys


# ---- commands ----

def _training_settings(args: argparse.Namespace):
    from lora_ogpsa.train.settings import to_train_settings

    defaults = vars(_subparser(build_parser(), args.command).parse_args([]))  # before --config's values
    return to_train_settings(args.command, vars(args), defaults)


def _run_training(args: argparse.Namespace) -> None:
    from lora_ogpsa.train import run as train
    settings = _training_settings(args)
    runner = {"sft": train.run_sft, "dpo": train.run_dpo, "align": train.run_align}[args.command]
    output = runner(settings)
    from lora_ogpsa.signals import distributed
    if distributed.is_main():
        print(f"adapter written to {output}")


def _check_apart(args: argparse.Namespace, *inputs: str) -> None:
    from lora_ogpsa.utils.outputs import check_apart

    check_apart(args.output, {f"--{name}": getattr(args, name, None) for name in inputs})


def _run_export(args: argparse.Namespace) -> None:
    from lora_ogpsa.export.adapter import export_adapter

    _require(args, "adapter", "output")
    _check_apart(args, "adapter")
    output = export_adapter(Path(args.adapter), Path(args.output), include_subspace=not args.no_subspace,
                            overwrite=args.overwrite)
    print(f"adapter exported to {output}")


def _run_merge(args: argparse.Namespace) -> None:
    _require(args, "model", "adapter", "output")
    _check_apart(args, "model", "adapter")
    from lora_ogpsa.export.merge import merge_adapter

    report = merge_adapter(args.model, args.adapter, args.output, base=args.base, dtype=args.dtype,
                           audit=not args.no_audit)
    audit = ("" if report.max_logit_diff is None else
             f"; audit: max logit difference {report.max_logit_diff:.2e} (tolerance {report.tolerance:.2e})")
    print(f"merged {report.merged_tensors} tensors into {report.output_dir} ({report.dtype}, {report.base} base, "
          f"{report.shards} shard(s), {report.seconds:.1f} s){audit}")


def _run_eval(args: argparse.Namespace) -> None:
    _require(args, "model", "prompts", "output")
    _check_apart(args, "model", "prompts", "adapter")
    from lora_ogpsa.demo.splits import BUILTIN_SUITES
    from lora_ogpsa.eval.prompts import load_prompts
    from lora_ogpsa.eval.run import run_eval, samples_path

    result = run_eval(args.model, load_prompts(args.prompts, BUILTIN_SUITES), args.output, adapter_dir=args.adapter,
                      quantize=args.quantize, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      limit=args.limit, system_prompt=args.system_prompt, seed=args.seed, overwrite=args.overwrite)
    low, high = result["refusal_rate_ci"]
    print(f"{result['n']} prompts, refusal rate {result['refusal_rate']:.3f} (95% CI {low:.3f}-{high:.3f}); "
          f"written to {args.output} and {samples_path(Path(args.output))}")


def _run_demo(args: argparse.Namespace) -> None:
    from lora_ogpsa.demo.run import run_demo
    from lora_ogpsa.experiment.report import final_table, matched_table

    report = run_demo(output=Path(args.output), compare=args.compare, max_steps=args.max_steps, model=args.model,
                      cache_dir=args.cache_dir, overwrite=args.overwrite, seeds=args.seeds)
    print("\nFinal models\n\n" + final_table(report))
    if len(report["trajectories"]) > 1:
        print("\nAt matched safety (utility / over-refusal, interpolated along each method's checkpoints)\n\n"
              + matched_table(report))
    print(f"\nreport: {Path(args.output) / 'report.md'} ({report['timings_seconds']['total']:.0f} s)")


def _run_calibrate(args: argparse.Namespace) -> None:
    from lora_ogpsa.experiment.calibrate import calibrate
    from lora_ogpsa.experiment.suites import load_suites

    _require(args, "model", "adapter", "harmful", "benign", "target_refusal", "output_dir")
    suites = load_suites(vars(args), seed=args.split_seed, dev_share=args.dev_share, limit=args.limit)
    document = calibrate(args.model, args.adapter, suites, args.target_refusal, args.output_dir, grid=args.grid,
                         bisection_steps=args.bisection_steps, max_new_tokens=args.max_new_tokens,
                         batch_size=args.eval_batch_size, overwrite=args.overwrite,
                         evaluation_cache=args.evaluation_cache)
    test = document["test"]["calibrated"]
    print(f"λ = {document['lambda']:g} ({document['adapter']}); test: harmful refused "
          f"{test['harmful_refusal_rate']:.1%}, benign refused {test['over_refusal_rate']:.1%}, tax "
          f"{test['tax']:+.1f} points; written to {args.output_dir}")


def _run_compare(args: argparse.Namespace) -> None:
    from lora_ogpsa.experiment.compare import compare_from_arguments

    report = compare_from_arguments(vars(args))
    print(f"{report['verdict']}\nreport: {Path(args.output_dir) / 'report.md'}")


def _require(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name, None) is None:
            raise InputError(f"{args.command}: --{name.replace('_', '-')} is required")


_COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "sft": _run_training, "dpo": _run_training, "align": _run_training, "export": _run_export,
    "merge": _run_merge, "eval": _run_eval, "demo": _run_demo, "compare": _run_compare,
    "calibrate": _run_calibrate,
}


def _configure_logging(level: str) -> None:
    from lora_ogpsa.signals import distributed
    if not distributed.is_main() and level in ("DEBUG", "INFO"):
        level = "WARNING"  # several processes: one voice
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # bitsandbytes announces an optional CPU kernel package at import; transformers renames a flag in v6.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(gradient_checkpointing|is_gradient_checkpointing).*deprecated.*")


def _one_line(error: BaseException) -> str:
    """The first non-empty line of an error, without torch's advice to load untrusted pickles."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if "weights_only" not in line] or lines
    return lines[0] if lines else type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `lora-ogpsa`; returns the exit status."""
    args = None
    try:
        args = parse_args(argv)
        _configure_logging(args.console_log_level)
        _COMMANDS[args.command](args)
    except InputError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM under `lora_ogpsa.entry`: 130 / 143, one line
        status, message = interrupted(error)
        print(f"{PROG}: {message}", file=sys.stderr)
        return status
    except Exception as error:  # the last line of defence: one line, the traceback in the debug log
        logger.debug("failure", exc_info=True)
        if full := disk_full_line(error, getattr(args, "output", None) or getattr(args, "output_dir", None)):
            print(f"{PROG}: failed: {full}", file=sys.stderr)
            return 1
        print(f"{PROG}: failed: {type(error).__name__}: {_one_line(error)} (--log-level DEBUG shows the "
              "traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
