"""When a training loop logs, saves and evaluates: one small value, no side effects.

Steps count the optimiser steps taken since the run began, asked after the step (1: after
the first); epochs count finished epochs (1: after the first). Pre-training builds one
from ``train.*`` (``wcl.train``); any loop that takes ``steps_per_epoch`` steps an epoch
can use it (the evaluation loop's ``eval_every`` / ``checkpoint_every`` are
``evaluate_every`` / ``save_every``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Cadence"]


@dataclass(frozen=True)
class Cadence:
    """The schedule of a run of ``epochs`` epochs of ``steps_per_epoch`` steps.

    An interval of 0 means never, beyond what is always done: a metrics record at every
    epoch end and every save, a checkpoint (and an evaluation, when ``evaluate_every`` is
    not 0) after the last epoch.
    """

    epochs: int
    steps_per_epoch: int
    log_every: int = 0  # steps between metrics records
    save_every_steps: int = 0  # steps between saves of the resumable checkpoint
    save_every: int = 1  # epochs between checkpoints that are kept
    evaluate_every: int = 0  # epochs between evaluations

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def steps_into(self, epoch: int, step: int) -> int:
        """Steps of (0-based) ``epoch`` already taken when the run stands at ``step``:
        non-zero only for a run resumed part-way through that epoch."""
        return step - epoch * self.steps_per_epoch

    def ends_epoch(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0

    def is_last(self, step: int) -> bool:
        return step == self.total_steps

    def saves_after_step(self, step: int) -> bool:
        """A save of the resumable checkpoint is due (every ``save_every_steps``)."""
        return bool(self.save_every_steps and step % self.save_every_steps == 0)

    def logs_after_step(self, step: int) -> bool:
        """A metrics record is due: every ``log_every`` steps, at epoch ends and saves."""
        every = bool(self.log_every and step % self.log_every == 0)
        return every or self.ends_epoch(step) or self.saves_after_step(step)

    def evaluates_after(self, epoch: int) -> bool:
        """An evaluation is due after ``epoch`` finished epochs."""
        if not self.evaluate_every:
            return False
        return epoch % self.evaluate_every == 0 or epoch == self.epochs

    def keeps_after(self, epoch: int) -> bool:
        """A checkpoint to keep is due after ``epoch`` finished epochs (every ``save_every``
        and after the last)."""
        return epoch % self.save_every == 0 or epoch == self.epochs
