"""The files of a run and of each checkpoint while a trainer runs: `metrics.jsonl`, the run config and the
model card, so that a checkpoint directory is a complete adapter directory."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from lora_ogpsa.export.card import write_model_card
from lora_ogpsa.utils.files import (
    CARD_FILE,
    COMPLETE_MARKER,
    METRICS_FILE,
    RUN_CONFIG,
    checkpoint_dir,
    read_jsonl,
    write_json,
)


class StageFilesCallback(TrainerCallback):
    """Writes `metrics.jsonl` (one JSON object per log) and, in every checkpoint, the run config, the metrics
    so far and the model card: a checkpoint directory is a complete adapter directory."""

    def __init__(self, directory: str | Path, run_config: dict, *, stage: str, subspace_fn=lambda: None) -> None:
        self.path = Path(directory) / METRICS_FILE
        self.run_config = run_config
        self.stage = stage
        self.subspace_fn = subspace_fn

    def on_train_begin(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        kept = [line for line in _read_lines(self.path) if json.loads(line).get("step", 0) <= state.global_step]
        self.path.write_text("".join(kept))  # a resumed run drops what the interrupted one logged after its checkpoint

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and args.should_save:
            with self.path.open("a") as handle:
                handle.write(json.dumps({"stage": self.stage, "step": state.global_step, **logs}) + "\n")

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        checkpoint = checkpoint_dir(args.output_dir, state.global_step)
        (checkpoint / self.path.name).write_text("".join(_read_lines(self.path)))
        write_json(checkpoint / RUN_CONFIG, {**self.run_config, "step": state.global_step})
        write_model_card(checkpoint / CARD_FILE, run_config=self.run_config, subspace=self.subspace_fn(),
                         metrics=read_jsonl(self.path))
        # Last: the trainer's files and OGPSA's subspace (its callback runs first) are all written by now.
        write_json(checkpoint / COMPLETE_MARKER, {"step": state.global_step,
                                                  "files": sorted(p.name for p in checkpoint.iterdir())})


def _read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True) if path.is_file() else []
