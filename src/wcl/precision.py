"""How a run computes: the autocast dtype, float16 loss scaling, float32 regions, determinism.

One rule for every loop (pre-training, evaluation, feature extraction, embed):
:func:`amp_dtype` turns an ``amp`` setting into a dtype, :func:`autocast` runs a block in
it, :func:`float32_region` keeps a block in float32 whatever autocast surrounds it (the
losses, the batched augmentations, a linear probe's classifier) and :func:`grad_scaler`
gives the loss scaling float16 needs.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = [
    "amp_dtype",
    "autocast",
    "cpu_has_native_bf16",
    "cpu_has_native_fp16",
    "deterministic_algorithms",
    "float32_region",
    "grad_scaler",
]


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


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``; a no-op when ``dtype`` is None (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def float32_region(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device`` inside, whatever the caller runs under; a no-op on device
    types without autocast. For arithmetic that must stay float32: the losses' log-sum-exp,
    the batched augmentations, a probe's classifier."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


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
