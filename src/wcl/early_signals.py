"""Pre-emption signals that arrive before training is ready to act on them.

Importing torch and reading the data take seconds, during which SLURM's SIGTERM or
SIGUSR1 would kill a process with no `preempted` file left for the job script. The CLI
calls :func:`catch_early` first thing (this module imports nothing heavy); the training
loop's ``wcl.preemption.PreemptionFlag`` then takes over what was received with :func:`take`.
"""

from __future__ import annotations

import signal
from typing import Any

__all__ = ["SIGNALS", "catch_early", "take"]

SIGNALS = ("SIGTERM", "SIGUSR1")
_received: list[str] = []
_previous: dict[int, Any] = {}


def _record(number: int, frame: object) -> None:
    _received.append(signal.Signals(number).name)


def catch_early() -> None:
    """Record SIGTERM / SIGUSR1 from now on, instead of dying of them, until :func:`take`."""
    for name in SIGNALS:
        number = getattr(signal, name)
        _previous.setdefault(number, signal.signal(number, _record))


def take() -> tuple[str | None, dict[int, Any]]:
    """(the first signal received so far, or None; the handlers in place before
    :func:`catch_early`). The early handlers are put back to those: the caller installs
    its own and restores these when it is done."""
    received = _received[0] if _received else None
    previous = dict(_previous)
    for number, handler in previous.items():
        signal.signal(number, handler)
    _received.clear()
    _previous.clear()
    return received, previous
