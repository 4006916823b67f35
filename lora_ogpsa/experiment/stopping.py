"""Training to matched safety (`compare --until_refusal`): a run stops at the first checkpoint whose harmful
refusal on the dev split reaches a target, `max_steps` being the cap. Methods that learn to refuse at different
speeds then all have a curve through the target level (or the record says the run stopped at the cap), and none
trains far past it.

The stop does not change the run up to it: the learning-rate schedule spans `max_steps` whether or not the run
stops, and every random state the dev evaluation could touch is put back, so a stopped run's checkpoints are the
capped run's (tests/test_stopping.py checks the weights)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

STOP_FILE = "until_refusal.json"
"""Written beside a run trained to a target: the target, the step it stopped at (None: the cap) and every dev
reading."""


@dataclasses.dataclass(frozen=True)
class RefusalTarget:
    """Stop at `rate` harmful refusal, read by `evaluator` (an `eval.cached.Evaluator` of the dev split's harmful
    suite alone)."""

    rate: float
    evaluator: Any

    @classmethod
    def on_dev(cls, rate: float, model: Path, dev, max_new_tokens: int, batch_size: int, cache: Path) -> RefusalTarget:
        """`rate`, read on the dev split's harmful suite alone (`dev`: that split's `EvalSuites`), evaluations
        cached in `cache`."""
        from lora_ogpsa.eval.cached import Evaluator

        harmful = dataclasses.replace(dev, benign=[], benign_kinds=[], benign_answers=[], utility=[])
        return cls(rate, Evaluator(model, harmful, max_new_tokens, batch_size, cache))

    @property
    def key(self) -> str:
        """What a run trained to this target adds to its fingerprint (the rate and the dev suite's content)."""
        return f"until_refusal={self.rate!r} dev={self.evaluator.suites_key}"


class StopAtRefusal(TrainerCallback):
    """At every checkpoint: evaluate it on the dev harmful suite; at or above the target, stop training."""

    def __init__(self, target: RefusalTarget, name: str) -> None:
        self.target, self.name = target, name
        self.readings: list[dict[str, Any]] = []
        self.stopped_at: int | None = None

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:  # pragma: no cover - compare trains in one process
            return control
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        with _random_states_kept():
            metrics = self.target.evaluator.evaluate(checkpoint, f"{self.name} step {state.global_step} (dev)")
        rate = metrics["harmful_refusal_rate"]
        self.readings.append({"step": state.global_step, "dev_harmful_refusal_rate": rate})
        if rate >= self.target.rate:
            self.stopped_at = state.global_step
            control.should_training_stop = True
            logger.info("%s: dev harmful refusal %.0f%% at step %d reaches the target %.0f%%: training stops",
                        self.name, 100 * rate, state.global_step, 100 * self.target.rate)
        return control

    def record(self, max_steps: int) -> dict[str, Any]:
        return {"target": self.target.rate, "split": "dev", "max_steps": max_steps, "stopped_at": self.stopped_at,
                "readings": self.readings}


@contextlib.contextmanager
def _random_states_kept():
    """Put back every random state (torch's, CUDA's, Python's, NumPy's) on exit."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    cpu, python, numpy = torch.random.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(python)
        np.random.set_state(numpy)


def stop_summary(stops: dict[str, dict[str, Any]]) -> list[str]:
    """Report lines: per run, the step it stopped at and its dev reading there, or `cap` and its highest."""
    lines = []
    for name, record in stops.items():
        rates = [reading["dev_harmful_refusal_rate"] for reading in record["readings"]]
        where = f"step {record['stopped_at']}" if record["stopped_at"] is not None else \
            f"cap ({record['max_steps']} steps)"
        lines.append(f"| {name} | {where} | " + (f"{max(rates):.0%}" if rates else "–") + " |")
    return lines
