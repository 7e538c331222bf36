"""Metrics records of a training loop: the steps since the last record, averaged over
processes in one host synchronisation and checked finite (``wcl.train`` writes them to
``metrics.jsonl`` through ``wcl.rundir.MetricsLog``).
"""

from __future__ import annotations

import math
import time

import torch

from wcl import dist

__all__ = ["MetricsWindow", "summarise"]


class MetricsWindow:
    """The steps since the last metrics record: their scalar metrics, left on the device
    until the record is made (one host synchronisation per record, not per step)."""

    def __init__(self, batch_size: int, keep_dropped: bool) -> None:
        self.batch_size = batch_size  # global: images per step
        # Under nonfinite=skip a dropped step's metrics are dropped too; otherwise a
        # non-finite loss reaches summarise, which stops the run.
        self.keep_dropped = keep_dropped
        self.restart()

    def restart(self) -> None:
        self.steps: list[dict] = []
        self.tick = time.perf_counter()

    def add(self, out: dict[str, torch.Tensor], lr: float, stepped: bool) -> None:
        if stepped or self.keep_dropped:
            self.steps.append({k: v.detach() for k, v in out.items() if v.dim() == 0} | {"lr": lr})

    def record(self, step: int, epoch: int, lr: float) -> dict:
        """The metrics record after ``step`` (NaN loss when every step was dropped)."""
        seconds = time.perf_counter() - self.tick
        if not self.steps:
            return {"step": step, "epoch": epoch, "lr": lr, "loss": math.nan}
        return summarise(self.steps, step, epoch, seconds, self.batch_size)


def summarise(window: list[dict], step: int, epoch: int, seconds: float, batch: int) -> dict:
    """One metrics record from the (non-empty) window of steps since the last record; raises
    on a non-finite loss.

    One host synchronisation per window, not per step.
    """
    keys = [k for k in window[0] if k != "lr"]
    per_step = torch.stack([torch.stack([w[k].float() for k in keys]) for w in window])
    per_step = dist.all_reduce_mean(per_step).tolist()
    for offset, values in enumerate(per_step):
        if not all(math.isfinite(v) for v in values):
            bad_step = step - len(window) + offset + 1
            found = ", ".join(f"{k}={v:.4g}" for k, v in zip(keys, values, strict=True))
            raise FloatingPointError(
                f"non-finite loss at step {bad_step} (epoch {epoch}): {found}, "
                f"lr={window[offset]['lr']:.4g}; the last checkpoint was not overwritten "
                "(set train.nonfinite=skip to drop such steps instead)"
            )
    record = {"step": step, "epoch": epoch, "lr": window[-1]["lr"]}
    record.update({k: sum(row[i] for row in per_step) / len(per_step) for i, k in enumerate(keys)})
    record["images_per_s"] = len(window) * batch / seconds
    return record
