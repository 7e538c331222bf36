"""The run directory and the run's life: metrics, checkpoints, resume checks, pre-emption.

Everything the training loop needs that is not training itself: so ``train.py`` reads as
the loop alone.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import signal
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from wcl import dist, early_signals
from wcl.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
)
from wcl.config import Config, ConfigError, config_changes

__all__ = [
    "BufferSnapshot",
    "PREEMPTED_EXIT_CODE",
    "Preempted",
    "PreemptionFlag",
    "MetricsLog",
    "ResumableSampler",
    "RunState",
    "amp_dtype",
    "check_run_dir",
    "cpu_has_native_bf16",
    "cpu_has_native_fp16",
    "deterministic_algorithms",
    "find_resume_checkpoint",
    "grad_scaler",
    "ignore_preemption_signals",
    "keep_epoch_copy",
    "load_model_state",
    "save_run_checkpoint",
    "workers_stopped_after",
]

# EX_TEMPFAIL from sysexits.h: "try again later", what a requeueing job script tests for.
PREEMPTED_EXIT_CODE = 75

# Settings a resumed run may change; every other key must match the checkpoint's config.
MAY_CHANGE_ON_RESUME = {
    "data.root", "data.workers", "data.download", "train.out_dir", "train.device",
    "train.dist_backend", "train.checkpoint_every", "train.checkpoint_every_steps",
    "train.log_every", "train.threads", "train.knn_every", "train.knn_k", "train.knn_t",
    "train.knn_bank", "train.knn_queries", "train.deterministic",
}  # fmt: skip


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo; None where that file does not exist."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None


def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU does bf16 arithmetic natively (x86 AVX512-BF16 or AMX, Arm BF16),
    read from /proc/cpuinfo; None where that file does not exist (not Linux)."""
    flags = _cpu_flags()
    return None if flags is None else bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_has_native_fp16() -> bool | None:
    """Whether this CPU does float16 arithmetic natively (x86 AVX512-FP16 or AMX-FP16, Arm
    FP16), read from /proc/cpuinfo; None where that file does not exist (not Linux)."""
    flags = _cpu_flags()
    return None if flags is None else bool(flags & {"avx512_fp16", "amx_fp16", "asimdhp"})


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for an ``amp`` setting (``wcl.config.AMP_CHOICES``), None for float32.

    ``auto``: on a GPU, bfloat16 where it has native bf16 (compute capability 8 and up:
    A100, H100, RTX 30xx on) and float16 on older ones (V100, T4), whose bf16 PyTorch
    emulates; float32 on CPUs. Asking a CPU that would only emulate bf16 / fp16 for it
    warns (slower than float32 there). float16 needs loss scaling: :func:`grad_scaler`.
    """
    if amp == "auto":
        if device.type != "cuda":
            return None
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if dtype is not None and device.type == "cpu":
        # Looked up at call time, so that tests can stand in for the CPU.
        native = cpu_has_native_bf16 if dtype is torch.bfloat16 else cpu_has_native_fp16
        if native() is False:
            warnings.warn(
                f"amp={amp} on a CPU without native {amp} arithmetic: PyTorch emulates it, "
                "so expect it to be slower than float32 (amp=off)",
                stacklevel=2,
            )
    return dtype


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Dynamic loss scaling for float16 autocast, whose small gradients would underflow
    without it: steps whose scaled gradients overflow are skipped and the scale halved.
    For bfloat16 and float32 a disabled scaler, which passes everything through unchanged,
    so one step code serves every ``amp`` setting."""
    return torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Inside, when ``enabled``: torch's deterministic algorithms only (an op without one
    raises) and no cuDNN autotuning; the previous settings come back after. cuBLAS needs
    ``CUBLAS_WORKSPACE_CONFIG`` before its first call, so it is set here unless it is set."""
    if not enabled:
        yield
        return
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]


@dataclass
class RunState:
    """Where a run stands: the epoch in progress (or next) and the optimiser steps taken."""

    epoch: int = 0
    step: int = 0


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


@contextlib.contextmanager
def workers_stopped_after(loader: DataLoader) -> Iterator[None]:
    """Stop ``loader``'s persistent workers when the block ends, however it ends.

    They ignore SIGTERM (:func:`ignore_preemption_signals`), and multiprocessing's exit
    handler stops leftover daemon processes with SIGTERM before joining them: a worker
    still alive then would hold the interpreter's exit forever. torch 2.4 keeps them alive
    after the loader goes out of scope (seen: a finished run that never exited).
    DataLoader has no public call for this, hence its iterator's own shutdown.
    """
    try:
        yield
    finally:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            loader._iterator = None
            iterator._shutdown_workers()


def ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers leave the signals to the training process,
    which finishes its step and checkpoints (SIGUSR1 would otherwise kill a worker)."""
    for name in PreemptionFlag.SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way, for exact mid-epoch resume."""

    skip = 0  # samples of this process to leave out at the start of the current epoch

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return self.num_samples - self.skip


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
        tmp = path.with_name(".tmp-" + path.name)
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


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
    bad = [name for name, p in model.state_dict().items() if p.is_floating_point()
           and not torch.isfinite(p).all()]  # fmt: skip
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


class BufferSnapshot:
    """The model's buffers (BatchNorm running statistics) as they were before a step, to
    put back when the step is dropped: a skipped step then leaves the whole model state
    as it was, not only the parameters (a forward pass over a batch with NaN or Inf would
    otherwise leave them in the running statistics)."""

    def __init__(self, model: nn.Module) -> None:
        self.saved = [b.detach().clone() for b in model.buffers()]
        self.model = model

    def restore(self) -> None:
        with torch.no_grad():
            for buffer, saved in zip(self.model.buffers(), self.saved, strict=True):
                buffer.copy_(saved)


def keep_epoch_copy(run_dir: Path, epoch: int) -> None:
    """epoch-NNNN.pt as a second name of last.pt (a hard link, not a second write)."""
    keep = run_dir / f"epoch-{epoch:04d}.pt"
    keep.unlink(missing_ok=True)
    try:
        os.link(run_dir / "last.pt", keep)
    except OSError:  # file systems without hard links
        shutil.copyfile(run_dir / "last.pt", keep)
