"""When the basis is recomputed: before the first step, after it, then every `refresh_every` steps."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RefreshSchedule:
    """The refresh steps, with N = optimizer steps done.

    N = 0 and N = 1 always (every lora_A has a zero reference gradient until lora_B moves), then every multiple
    of `every` (0: none). A refresh due after a run's last step is skipped: no update follows it.
    """

    every: int

    def is_due(self, step: int) -> bool:
        """Whether the basis in force after `step` steps must be a fresh one."""
        return step <= 1 or (self.every > 0 and step % self.every == 0)

    def runs_after(self, step: int, max_steps: int) -> bool:
        """Whether to refresh at the end of `step` (not after the last one: no update would use it)."""
        return self.is_due(step) and step < max_steps
