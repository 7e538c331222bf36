"""Pre-emption: SLURM's SIGTERM / SIGUSR1 end a run cleanly, after a checkpoint.

:class:`PreemptionFlag` records the signal (taking over what ``wcl.early_signals`` caught
while the CLI was still importing), every process asks it after each step, and the loop
raises :class:`Preempted` once its checkpoint is written. The CLI turns that into exit
status :data:`PREEMPTED_EXIT_CODE`, which a requeueing job script tests for
(``scripts/slurm/pretrain.sbatch``).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from wcl import dist, early_signals

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "Preempted",
    "PreemptionFlag",
    "ignore_preemption_signals",
]

# EX_TEMPFAIL from sysexits.h: "try again later", what a requeueing job script tests for.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
    """Training stopped on a signal after writing ``checkpoint`` (None: stopped during
    start-up, before a step, with nothing new to save); resume with --resume auto."""

    def __init__(self, signal_name: str, checkpoint: Path | None, step: int) -> None:
        done = (
            f"stopped after step {step} and wrote {checkpoint}"
            if checkpoint is not None
            else f"stopped during start-up, before step {step + 1}, with nothing new to save"
        )
        super().__init__(
            f"{signal_name} received: {done}; continue with --resume auto "
            f"(exit status {PREEMPTED_EXIT_CODE})"
        )
        self.checkpoint = checkpoint


class PreemptionFlag:
    """Catches SIGTERM and SIGUSR1 (SLURM's warnings) while active; restores handlers after."""

    SIGNALS = early_signals.SIGNALS

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionFlag:
        if threading.current_thread() is threading.main_thread():
            # A signal caught while the CLI was still importing counts as received here.
            self.received, before = early_signals.take()
            for name in self.SIGNALS:
                number = getattr(signal, name)
                previous = signal.signal(number, self._handle)
                self._previous[number] = before.get(number, previous)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame: object) -> None:
        self.received = signal.Signals(number).name

    def should_stop(self) -> bool:
        """Whether any process got a signal; every process gets the same answer (and the
        signal's name in ``received``)."""
        number = getattr(signal, self.received) if self.received else 0
        number = dist.max_over_processes(int(number))
        if number:
            self.received = signal.Signals(number).name
        return bool(number)


def ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers leave the signals to the training process,
    which finishes its step and checkpoints (SIGUSR1 would otherwise kill a worker)."""
    for name in PreemptionFlag.SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
