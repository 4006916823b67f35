"""`lora-ogpsa` (also `python -m lora_ogpsa`): sft, dpo, align, export, merge, eval, demo.

Every flag can also come from `--config FILE.yaml` (flag names with `-` → `_`); flags given on the command
line override the file. Exit status: 0 success, 2 bad input (one line on stderr naming the file, row and
field), 1 any other failure, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lora_ogpsa.errors import InputError

logger = logging.getLogger("lora_ogpsa")

PROG = "lora-ogpsa"
_TRAINING_REQUIRED = {"sft": ("model", "data", "output"), "dpo": ("model", "data", "output"),
                      "align": ("model", "sft_data", "dpo_data", "output")}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (and exit 2), like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    """The full command-line parser (one subparser per command)."""
    parser = _Parser(prog=PROG, description="Safety alignment with LoRA/QLoRA and OGPSA (orthogonal gradient "
                                             "projection): safer without the alignment tax.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, help_text in (("sft", "supervised fine-tuning on safety data"),
                            ("dpo", "DPO on preference pairs (fresh adapter, or continue --adapter)"),
                            ("align", "SFT, then DPO on the same adapter (DPO reference = base + SFT adapter)")):
        _add_training_flags(commands.add_parser(name, help=help_text, description=help_text), name)
    _add_export_flags(commands.add_parser("export", help="re-export a checkpoint as a clean standalone adapter"))
    _add_merge_flags(commands.add_parser("merge", help="merge an adapter into the base model"))
    _add_eval_flags(commands.add_parser("eval", help="generate on a prompt set and measure refusals"))
    _add_demo_flags(commands.add_parser("demo", help="the main job: align SmolLM2-135M-Instruct end to end"))
    return parser


def _add_training_flags(parser: argparse.ArgumentParser, command: str) -> None:
    from lora_ogpsa.config import OGPSAConfig, TrainSettings

    defaults, ogpsa = TrainSettings(model=Path("."), output=Path(".")), OGPSAConfig()
    add = parser.add_argument
    add("--config", type=Path, help="YAML file of flag values (keys: flag names with - → _)")
    add("--model", help="local Hugging Face model directory of the base model")
    if command == "align":
        add("--sft-data", help="SFT rows (JSONL: messages, or prompt/completion)")
        add("--dpo-data", help="preference rows (JSONL: prompt, chosen, rejected)")
    else:
        add("--data", help="SFT rows (JSONL: messages, or prompt/completion)" if command == "sft"
            else "preference rows (JSONL: prompt, chosen, rejected)")
    if command == "dpo":
        add("--adapter", help="continue this adapter (DPO reference model = base + this adapter, frozen)")
    add("--reference", help="reference (general-capability) rows whose loss the updates must not move")
    add("--output", help="output directory")
    for flag, kind in (("max_steps", int), ("save_steps", int), ("batch_size", int),
                       ("gradient_accumulation_steps", int), ("learning_rate", float), ("seed", int),
                       ("max_length", int), ("lora_r", int), ("lora_alpha", float), ("lora_dropout", float)):
        add(f"--{flag.replace('_', '-')}", type=kind, default=getattr(defaults, flag),
            help=f"(default: {getattr(defaults, flag)})")
    if command in ("dpo", "align"):
        add("--beta", type=float, default=defaults.beta, help=f"DPO beta (default: {defaults.beta})")
    if command == "align":
        add("--dpo-learning-rate", type=float, help="DPO stage learning rate (default: --learning-rate)")
        add("--dpo-max-steps", type=int, help="DPO stage steps (default: --max-steps)")
        add("--dpo-batch-size", type=int, help="DPO stage pairs per micro-batch (default: --batch-size)")
        add("--dpo-save-steps", type=int, help="DPO stage checkpoint interval (default: --save-steps)")
    add("--project", choices=["update", "grad", "none"], default=ogpsa.project,
        help="update: project the applied change (default); grad: project the gradient; none: plain LoRA")
    for flag, kind in (("max_directions", int), ("energy", float), ("refresh_every", int),
                       ("reference_examples", int), ("reference_batch_size", int), ("opening_tokens", int),
                       ("later_token_weight", float)):
        add(f"--{flag.replace('_', '-')}", type=kind, default=getattr(ogpsa, flag),
            help=f"(default: {getattr(ogpsa, flag)})")
    add("--one-sided", action="store_true",
        help="update mode: keep the parts of the update that lower the reference loss, remove those that raise it")
    add("--no-quantize", action="store_true", help="full-precision base instead of 4-bit NF4")
    add("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
        help="(default: on with CUDA, off on the CPU)")
    add("--resume", action="store_true", help="continue from the last checkpoint in --output")
    add("--overwrite", action="store_true", help="replace an existing --output once the new run has finished")
    add("--ddp-timeout", type=int, default=defaults.ddp_timeout,
        help=f"several processes: seconds a rank waits for the others before the run fails "
             f"(default: {defaults.ddp_timeout})")


def _add_export_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file of flag values")
    parser.add_argument("--adapter", help="a training output or checkpoint-N directory")
    parser.add_argument("--output", help="where the standalone adapter goes")
    parser.add_argument("--no-subspace", action="store_true", help="leave out ogpsa_subspace.safetensors")
    parser.add_argument("--overwrite", action="store_true")


def _add_merge_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file of flag values")
    parser.add_argument("--model", help="base model directory")
    parser.add_argument("--adapter", help="adapter directory")
    parser.add_argument("--output", help="directory for the merged model")
    parser.add_argument("--base", choices=["original", "dequantized"], default="original",
                        help="original: add the delta to the full-precision weights; dequantized: to dequant(NF4(W))")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--no-audit", action="store_true",
                        help="skip comparing the merged model with base + adapter (it loads a full model)")


def _add_eval_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file of flag values")
    parser.add_argument("--model", help="model directory (a base, or a merged model)")
    parser.add_argument("--adapter", help="adapter directory to apply on top of --model")
    parser.add_argument("--prompts", help="a .txt (one prompt per line) or .jsonl (`prompt` field) file, or a "
                                          "built-in suite: harmbench, benign, utility, donotanswer-heldout")
    parser.add_argument("--output", help="JSON file for the results")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quantize", action="store_true", help="load the base in 4-bit NF4")


def _add_demo_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file of flag values")
    parser.add_argument("--output", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--compare", action="store_true", help="also train plain QLoRA and the replay baseline")
    parser.add_argument("--max-steps", type=int, help="optimizer steps per stage (default: sized for the machine)")
    parser.add_argument("--model", help="a local model directory instead of the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--cache-dir", help="where the converted model and built data are cached")
    parser.add_argument("--overwrite", action="store_true")


# ---- parsing with --config ----

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line, filling unset flags from `--config FILE.yaml`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is None:
        return args
    subparser = _subparser(parser, args.command)
    values = _read_config(args.config, subparser)
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
    known = {action.dest for action in parser._actions if action.dest not in ("help", "config")}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"--config {path}: unknown key '{unknown[0]}'; known keys: {', '.join(sorted(known))}")
    return values


# ---- commands ----

def _training_settings(args: argparse.Namespace):
    from lora_ogpsa.config import OGPSAConfig, TrainSettings

    for name in _TRAINING_REQUIRED[args.command]:
        if getattr(args, name, None) is None:
            raise InputError(f"{args.command}: --{name.replace('_', '-')} is required (flag or --config key "
                             f"'{name}')")
    try:
        ogpsa = OGPSAConfig(max_directions=args.max_directions, energy=args.energy, refresh_every=args.refresh_every,
                            reference_examples=args.reference_examples, project=args.project,
                            reference_batch_size=args.reference_batch_size, opening_tokens=args.opening_tokens,
                            later_token_weight=args.later_token_weight, one_sided=args.one_sided)
    except ValueError as error:
        raise InputError(str(error).replace("`", "--", 1).replace("`", "", 1).replace("_", "-")) from error
    fields = ("model", "output", "reference", "data", "sft_data", "dpo_data", "adapter", "max_steps", "save_steps",
              "batch_size", "gradient_accumulation_steps", "learning_rate", "dpo_learning_rate", "dpo_max_steps",
              "dpo_batch_size", "dpo_save_steps",
              "beta", "seed", "max_length", "lora_r", "lora_alpha", "lora_dropout", "gradient_checkpointing",
              "resume", "overwrite", "ddp_timeout")
    values = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    return TrainSettings(**values, quantize=not args.no_quantize, ogpsa=ogpsa)


def _run_training(args: argparse.Namespace) -> None:
    from lora_ogpsa import train

    settings = _training_settings(args)
    runner = {"sft": train.run_sft, "dpo": train.run_dpo, "align": train.run_align}[args.command]
    output = runner(settings)
    from lora_ogpsa import distributed

    if distributed.is_main():
        print(f"adapter written to {output}")


def _run_export(args: argparse.Namespace) -> None:
    from lora_ogpsa.export import export_adapter

    _require(args, "adapter", "output")
    output = export_adapter(Path(args.adapter), Path(args.output), include_subspace=not args.no_subspace,
                            overwrite=args.overwrite)
    print(f"adapter exported to {output}")


def _run_merge(args: argparse.Namespace) -> None:
    _require(args, "model", "adapter", "output")
    from lora_ogpsa.merge import merge_adapter

    report = merge_adapter(args.model, args.adapter, args.output, base=args.base, dtype=args.dtype,
                           audit=not args.no_audit)
    audit = ("" if report.max_logit_diff is None else
             f"; audit: max logit difference {report.max_logit_diff:.2e} (tolerance {report.tolerance:.2e})")
    print(f"merged {report.merged_tensors} tensors into {report.output_dir} ({report.dtype}, {report.base} base, "
          f"{report.shards} shard(s), {report.seconds:.1f} s){audit}")


def _run_eval(args: argparse.Namespace) -> None:
    _require(args, "model", "prompts", "output")
    from lora_ogpsa.evaluate import run_eval

    result = run_eval(args.model, args.prompts, args.output, adapter_dir=args.adapter, quantize=args.quantize,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    print(f"{result['n']} prompts, refusal rate {result['refusal_rate']:.3f}; written to {args.output}")


def _run_demo(args: argparse.Namespace) -> None:
    from lora_ogpsa.demo import run_demo
    from lora_ogpsa.report import final_table, matched_table

    report = run_demo(output=Path(args.output), compare=args.compare, max_steps=args.max_steps, model=args.model,
                      cache_dir=args.cache_dir, overwrite=args.overwrite)
    print("\nFinal models\n\n" + final_table(report))
    if len(report["trajectories"]) > 1:
        print("\nAt matched safety (utility / over-refusal, interpolated along each method's checkpoints)\n\n"
              + matched_table(report))
    print(f"\nreport: {Path(args.output) / 'report.md'} ({report['timings_seconds']['total']:.0f} s)")


def _require(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name, None) is None:
            raise InputError(f"{args.command}: --{name.replace('_', '-')} is required")


_COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "sft": _run_training, "dpo": _run_training, "align": _run_training, "export": _run_export,
    "merge": _run_merge, "eval": _run_eval, "demo": _run_demo,
}


def _configure_logging(level: str) -> None:
    from lora_ogpsa import distributed

    if not distributed.is_main() and level in ("DEBUG", "INFO"):
        level = "WARNING"  # several processes: one voice
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # bitsandbytes announces an optional CPU kernel package at import; transformers renames a flag in v6.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(gradient_checkpointing|is_gradient_checkpointing).*deprecated.*")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `lora-ogpsa`; returns the exit status."""
    try:
        args = parse_args(argv)
        _configure_logging(args.log_level)
        _COMMANDS[args.command](args)
    except InputError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (a training run keeps its checkpoints in OUTPUT.partial; rerun with --resume)",
              file=sys.stderr)
        return 130
    except Exception as error:  # the last line of defence: one line, the traceback in the debug log
        logger.debug("failure", exc_info=True)
        print(f"{PROG}: failed: {type(error).__name__}: {error} (--log-level DEBUG shows the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
