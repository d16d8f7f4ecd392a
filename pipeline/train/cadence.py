"""When the training loop logs, validates, checkpoints and ends: one component asked at each step
(torchtitan's ``should_*`` methods, big_vision's ``itstime``)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import TrainConfig


@dataclass(frozen=True)
class Cadence:
    """Every N steps, and at the last step; a stop requested for ``stop_at_step`` ends the run
    there, with a checkpoint."""

    total_steps: int
    log_every: int
    checkpoint_every: int
    eval_every: int | None = None
    stop_at_step: int | None = None

    @classmethod
    def of(cls, train: TrainConfig, total_steps: int) -> "Cadence":
        return cls(total_steps, train.log_every, train.checkpoint_every, train.eval_every, train.stop_at_step)

    def _due(self, step: int, every: int | None) -> bool:
        return bool(every) and (step % every == 0 or step == self.total_steps)

    def should_log(self, step: int) -> bool:
        return self._due(step, self.log_every)

    def should_validate(self, step: int) -> bool:
        return self._due(step, self.eval_every)

    def should_checkpoint(self, step: int) -> bool:
        return self._due(step, self.checkpoint_every) or step == self.stop_at_step

    def should_end(self, step: int) -> bool:
        return step >= self.total_steps or step == self.stop_at_step
