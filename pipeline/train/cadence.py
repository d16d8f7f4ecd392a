"""When the training loop logs, validates, checkpoints and ends: one component asked at each step
(torchtitan's ``should_*`` methods, big_vision's ``itstime``), and one that tells whether the
ranks agreed to stop (a signal, or more non-finite losses than allowed)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pipeline.config import TrainConfig
from pipeline.train import signals
from pipeline.train.distributed import StepAgreement

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    pass


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


class StopAgreement:
    """After each step, whether to stop, as every rank agreed one step late (:class:`StepAgreement`:
    the hot loop never waits on the device): a preemption signal on any rank stops them all. A
    non-finite loss on any rank skips that step's update (DeepSpeed's overflow check); past
    ``max_bad_steps`` of them, :class:`NonFiniteLoss` ends the run before it saves."""

    def __init__(self, device: torch.device, max_bad_steps: int):
        self.agreement, self.max_bad_steps, self.bad_steps = StepAgreement(device), max_bad_steps, 0

    def post(self, step: int, nonfinite: torch.Tensor) -> bool:
        """Post ``step``'s flags; whether the previous step's agreement says to stop."""
        previous = self.agreement.collect()
        self.agreement.post(step, signals.received() is not None, nonfinite)
        return self._act_on(previous)

    def settle(self) -> bool:
        """Read the agreement on the step just posted (before a checkpoint or at the end), so a
        checkpoint never holds a step past the allowed non-finite ones."""
        return self._act_on(self.agreement.collect())

    def _act_on(self, agreed: tuple[int, bool, bool] | None) -> bool:
        if agreed is None:
            return False
        step, stop, nonfinite = agreed
        if nonfinite:
            self.bad_steps += 1
            if self.bad_steps > self.max_bad_steps:
                raise NonFiniteLoss(f"non-finite loss at step {step} (on at least one rank); the last checkpoint is "
                                    f"intact. train.max_bad_steps={self.max_bad_steps} allows skipping some")
            log.warning("non-finite loss at step %d: its update was skipped (%d of %d allowed)", step,
                        self.bad_steps, self.max_bad_steps)
        return stop
