"""One optimiser step under the non-finite policy, for any training loop.

A step whose gradients are not finite is not taken. Under float16 loss scaling the
``GradScaler`` skips it itself (:class:`LossScale` tells when it did); with
``skip_nonfinite`` (``train.nonfinite=skip``) :func:`gradients_finite` decides; otherwise
every step is taken and a non-finite loss is the caller's to report (pre-training stops
the run: ``wcl.train``). A skipped step leaves the whole model as it was: the BatchNorm
running statistics its forward pass moved are put back (:class:`BufferSnapshot`).

Nothing here knows about configs or run directories::

    guard = GuardedStep(model, optimizer, scaler, skip_nonfinite=True)
    guard.begin()
    loss = loss_fn(model(x), y)
    stepped = guard.finish(loss)  # False: dropped, model and optimiser state unchanged
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["BufferSnapshot", "GuardedStep", "LossScale", "gradients_finite"]


def gradients_finite(params: Iterable[torch.Tensor]) -> bool:
    """Whether every gradient of ``params`` is finite (parameters without one are left
    out). One host synchronisation."""
    flags = [p.grad.isfinite().all() for p in params if p.grad is not None]
    return bool(torch.stack(flags).all())


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


class LossScale:
    """Steps through an enabled float16 ``GradScaler``, telling which steps it skipped.

    The scaler records an overflow only in private state (its per-optimiser
    ``found_inf_per_device``). Publicly, ``update()`` multiplies the scale by
    ``backoff_factor`` (< 1) after a skipped step and lowers it on no other occasion, so a
    step was taken exactly when the scale did not go down. The other public routes do not
    tell: ``scaler.step`` returns what the optimiser's step returns (None either way), and
    checking the unscaled gradients after ``unscale_`` would repeat the scaler's own check.
    (``scaler.step`` reads the overflow flag on the host anyway; reading the scale adds one
    synchronisation a step.)
    """

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler
        self.value = scaler.get_scale()  # the current loss scale (a float)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """``scaler.step`` and ``scaler.update``; whether the optimiser step was taken."""
        self.scaler.step(optimizer)
        self.scaler.update()
        new = self.scaler.get_scale()
        stepped, self.value = new >= self.value, new
        return stepped


class GuardedStep:
    """Takes optimiser steps under the non-finite policy and counts the ones it drops.

    ``scaler``: the loop's ``GradScaler`` (``wcl.precision.grad_scaler``; disabled unless
    float16). Call :meth:`begin` before each forward pass and :meth:`finish` with its loss.
    Build it after loading the optimiser's and the scaler's state (it reads the scale).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        skip_nonfinite: bool,
    ) -> None:
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.skip_nonfinite = skip_nonfinite
        self.loss_scale = LossScale(scaler) if scaler.is_enabled() else None
        self.skipped = 0  # steps dropped since this object was made
        self._before: BufferSnapshot | None = None

    @property
    def may_skip(self) -> bool:
        """Whether a step can be dropped (float16 loss scaling or ``skip_nonfinite``)."""
        return self.skip_nonfinite or self.loss_scale is not None

    def begin(self) -> None:
        """Before the forward pass: keep the buffers a dropped step must put back."""
        self._before = BufferSnapshot(self.model) if self.may_skip else None

    def finish(self, loss: torch.Tensor) -> bool:
        """Backward from the scalar ``loss`` and step; whether the step was taken."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.loss_scale is not None:
            stepped = self.loss_scale.step(self.optimizer)
        elif self.skip_nonfinite and not gradients_finite(self.model.parameters()):
            stepped = False
        else:
            self.optimizer.step()
            stepped = True
        self.skipped += not stepped
        if not stepped and self._before is not None:
            self._before.restore()  # the forward pass's BatchNorm statistics go too
        self._before = None
        return stepped

    def counters(self) -> dict[str, int | float]:
        """For a metrics record: ``skipped_steps`` (when steps may be dropped) and
        ``loss_scale`` (under float16)."""
        found: dict[str, int | float] = {}
        if self.may_skip:
            found["skipped_steps"] = self.skipped
        if self.loss_scale is not None:
            found["loss_scale"] = self.loss_scale.value
        return found
