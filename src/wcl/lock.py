"""An exclusive lock on a run directory, for as long as one run writes to it.

Two runs started on one ``train.out_dir`` (or one eval ``run.out_dir``) would interleave
their files; a second ``--resume auto`` would clean up the first one's in-flight
temporary checkpoint. The lock is ``fcntl.flock`` on ``RUN_DIR/.lock``: the kernel
releases it when its holder exits, however it exits (``kill -9`` included), so a lock
left by a dead process is simply taken over. The file holds the holder's host, pid and
start time, which the refusal names. Only the holder removes leftover temporary files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from wcl import dist
from wcl.config_files import ConfigError

__all__ = ["LOCK_NAME", "RunDirLocked", "RunLock", "lock_on_rank0", "run_dir_lock"]

LOCK_NAME = ".lock"


class RunDirLocked(ConfigError):
    """Another live process holds the run directory."""


class RunLock:
    """``RUN_DIR/.lock`` held with ``flock`` from :meth:`acquire` until :meth:`release`
    (or the process's end)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, command: str = "") -> RunLock:
        """Take the lock, or raise RunDirLocked naming its holder. Creates the directory."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirLocked(
                f"run directory {str(self.run_dir)!r} is in use by {self.holder()}; wait for "
                "it to finish, or choose another output directory"
            ) from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "command": command or
                  " ".join(sys.argv[:2]), "since": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        for stale in self.run_dir.glob(".tmp-*"):  # an interrupted save's; ours to clean now
            stale.unlink(missing_ok=True)
        return self

    def holder(self) -> str:
        """Who holds the lock, as its file says ("another process" if it cannot say)."""
        try:
            info = json.loads(self.path.read_text())
            return (
                f"{info['command']!r} (pid {info['pid']} on {info['host']}, since {info['since']})"
            )
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.release()


def lock_on_rank0(run_dir: str | os.PathLike, command: str) -> RunLock | None:
    """Rank 0, which writes the run directory, takes its lock (returned; None elsewhere);
    when it cannot, every process raises, so none is left waiting at a collective."""
    lock, refusal = None, None
    if dist.is_main():
        try:
            lock = RunLock(run_dir).acquire(command)
        except RunDirLocked as err:
            refusal = err
    if dist.max_over_processes(int(refusal is not None)):
        raise refusal or RunDirLocked(f"run directory {str(run_dir)!r} is in use (rank 0)")
    return lock


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike, command: str) -> Iterator[None]:
    """:func:`lock_on_rank0` for the block."""
    lock = lock_on_rank0(run_dir, command)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
