"""A pre-training run directory: what a run writes there and what resuming checks.

``config.yaml`` (the settings), ``metrics.jsonl`` (:class:`MetricsLog`), ``last.pt`` and
its kept copies ``epoch-NNNN.pt`` (:func:`save_run_checkpoint`, :func:`keep_epoch_copy`),
``preempted`` (signal and step, for the requeueing job script
``scripts/slurm/pretrain.sbatch``) and ``skipped.jsonl`` (unreadable images, written by
the data set). :class:`RunWriter` is the training loop's handle on all of them;
:func:`find_resume_checkpoint` says whether a checkpoint may be continued with a config.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from wcl import dist
from wcl.atomic import write_text
from wcl.checkpoint import (
    CheckpointError,
    check_finite,
    latest_checkpoint,
    load_checkpoint,
    nonfinite_tensors,
    rng_state,
    save_checkpoint,
)
from wcl.config import MAY_CHANGE_ON_RESUME, Config, ConfigError, config_changes
from wcl.preemption import Preempted

__all__ = [
    "MAY_CHANGE_ON_RESUME",
    "MetricsLog",
    "RunState",
    "RunWriter",
    "check_run_dir",
    "find_resume_checkpoint",
    "keep_epoch_copy",
    "load_model_state",
    "mark_preempted",
    "save_run_checkpoint",
]


@dataclass
class RunState:
    """Where a run stands: the epoch in progress (or next) and the optimiser steps taken."""

    epoch: int = 0
    step: int = 0


class MetricsLog:
    """metrics.jsonl (and TensorBoard when installed) in the run directory, rank 0 only.

    Opening it for a run at ``step`` drops the records after that step (written after the
    checkpoint a resumed run starts from: the resumed run writes them again) and a last
    line cut short by a killed process. Values that are not finite are written as null, so
    every line is JSON.
    """

    def __init__(self, run_dir: Path, enabled: bool, step: int = 0) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.file = None
        self.board = None
        if not enabled:
            return
        _keep_records_up_to(self.path, step)
        self.file = open(self.path, "a")  # noqa: SIM115
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # TensorBoard is optional
            pass

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                  for k, v in record.items()}  # fmt: skip
        try:
            self.file.write(json.dumps(record, allow_nan=False) + "\n")
            self.file.flush()
        except OSError as err:
            self._close_board()
            raise OSError(err.errno, f"cannot append to {self.path}: {err.strerror}") from None
        if self.board is not None:
            try:
                for key, value in record.items():
                    if key not in ("step", "epoch") and isinstance(value, float):
                        self.board.add_scalar(f"pretrain/{key}", value, record["step"])
            except (OSError, RuntimeError) as err:  # its writer thread's error, e.g. ENOSPC
                self._close_board()
                warnings.warn(f"TensorBoard logging stopped: {err}", stacklevel=2)

    def _close_board(self) -> None:
        board, self.board = self.board, None
        if board is not None:
            with contextlib.suppress(Exception):
                board.close()

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):  # a full disk: the error was already raised
                self.file.close()
        self._close_board()


def _keep_records_up_to(path: Path, step: int) -> None:
    """Rewrite ``path`` (if any) with its whole JSON lines whose step is at most ``step``."""
    if not path.exists():
        return
    kept, dropped = [], False
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            keep = int(record.get("step", 0)) <= step
        except (ValueError, TypeError, AttributeError):
            keep = False
        if keep:
            kept.append(line)
        dropped = dropped or not keep
    if dropped:
        write_text(path, "".join(line + "\n" for line in kept))


def check_run_dir(run_dir: Path, resuming: bool) -> None:
    """Refuse to mix a new run into a directory that holds another one."""
    if not resuming and (run_dir / "config.yaml").exists():
        raise ConfigError(
            f"'train.out_dir' {str(run_dir)!r} already holds a run (config.yaml); pass "
            "--resume auto to continue it, or choose another train.out_dir"
        )


def find_resume_checkpoint(resume: str | None, run_dir: Path, cfg: Config) -> dict | None:
    """The checkpoint to resume from (None: start fresh), checked against ``cfg``.

    (Leftover temporary files of an interrupted save are removed by the run directory's
    lock holder, ``wcl.lock.RunLock``: never by a process that may not own them.)
    """
    if resume is None:
        return None
    path = latest_checkpoint(run_dir) if resume == "auto" else Path(resume)
    if path is None:
        return None
    checkpoint = load_checkpoint(path)
    if checkpoint.get("kind") != "pretrain" or "config" not in checkpoint:
        raise CheckpointError(f"{path} is not a wcl pre-training checkpoint")
    check_finite(path, checkpoint["model"], "tensor")  # a damaged or diverged save
    changed = config_changes(
        checkpoint["config"], cfg.to_dict(), MAY_CHANGE_ON_RESUME, Config().to_dict()
    )
    if changed:
        details = ", ".join(changed)
        raise CheckpointError(
            f"{path} was written by a run with another config ({details}); resume it with "
            "the same settings, or start a new run in another train.out_dir"
        )
    checkpoint["path"] = str(path)
    return checkpoint


def load_model_state(model: nn.Module, checkpoint: dict) -> None:
    """Load a checkpoint's weights, naming the file when they don't fit the model."""
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        raise CheckpointError(
            f"{checkpoint.get('path', 'checkpoint')} does not fit this model: {err}"
        ) from err


def save_run_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    state: RunState,
    cfg: Config,
) -> None:
    """Write the run's checkpoint atomically; never one holding non-finite weights."""
    bad = nonfinite_tensors(model.state_dict())
    if bad:
        raise FloatingPointError(
            f"not writing {path}: non-finite values in {bad[:5]}; the previous checkpoint is kept"
        )
    save_checkpoint(
        {
            "kind": "pretrain",
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),  # {} unless float16 loss scaling is on
            "epoch": state.epoch,
            "step": state.step,
            "world_size": dist.world_size(),
            "config": cfg.to_dict(),
            "rng": rng_state(),
        },
        path,
    )


def keep_epoch_copy(run_dir: Path, epoch: int) -> None:
    """epoch-NNNN.pt as a second name of last.pt (a hard link, not a second write)."""
    keep = run_dir / f"epoch-{epoch:04d}.pt"
    keep.unlink(missing_ok=True)
    try:
        os.link(run_dir / "last.pt", keep)
    except OSError:  # file systems without hard links
        shutil.copyfile(run_dir / "last.pt", keep)


def mark_preempted(run_dir: Path, signal_name: str, step: int) -> None:
    """The ``preempted`` file (signal and step) that a job script tests to requeue."""
    (run_dir / "preempted").write_text(f"{signal_name} {step}\n")


class RunWriter:
    """The training loop's handle on its run directory; every process makes one and calls
    every method (collective), rank 0 alone writes.

    Making it writes ``config.yaml``, removes an earlier run's ``preempted`` file and opens
    the metrics log (dropping records after ``state.step``). ``state`` is the loop's own
    object: :meth:`save` writes it as it stands.
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: Config,
        state: RunState,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
    ) -> None:
        self.run_dir, self.cfg, self.state = run_dir, cfg, state
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.main = dist.is_main()
        if self.main:
            write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            (run_dir / "preempted").unlink(missing_ok=True)
        self.log = MetricsLog(run_dir, self.main, state.step)

    def save(self, keep: bool = False) -> None:
        """Write ``last.pt`` (and, with ``keep``, ``epoch-NNNN.pt``); every process waits
        for it, so that none exits before the checkpoint is complete."""
        if self.main:
            last = self.run_dir / "last.pt"
            save_run_checkpoint(last, self.model, self.optimizer, self.scaler, self.state, self.cfg)
            if keep:
                keep_epoch_copy(self.run_dir, self.state.epoch)
        dist.barrier()

    def preempted(self, signal_name: str | None, saved: bool) -> Preempted:
        """Mark the run pre-empted at ``state.step`` and close the log; the exception to
        raise (``saved``: ``last.pt`` holds this step, else nothing new was saved)."""
        if self.main:
            mark_preempted(self.run_dir, signal_name or "signal", self.state.step)
        self.close()
        checkpoint = self.run_dir / "last.pt" if saved else None
        return Preempted(signal_name or "signal", checkpoint, self.state.step)

    def close(self) -> None:
        self.log.close()
