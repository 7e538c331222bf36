"""Pre-training's loader: this process's share of every global batch, epoch by epoch.

Every process reads a disjoint 1/world of each global batch (:class:`ResumableSampler`),
an epoch can start part-way (exact mid-epoch resume), and the DataLoader worker processes
are stopped when the loader is closed, however the run ends.
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from wcl import preemption

__all__ = ["EpochLoader", "ResumableSampler"]


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way, for exact mid-epoch resume."""

    skip = 0  # samples of this process to leave out at the start of the current epoch

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return self.num_samples - self.skip


class EpochLoader:
    """Batches of ``batch_size`` samples (this process's share) from ``dataset``, shuffled
    by (``seed``, epoch), the last partial batch dropped; a context manager that stops the
    workers on leaving.

    ``persistent``: keep the ``workers`` processes from one epoch to the next (only where
    nothing in them depends on the epoch). Workers ignore the pre-emption signals, which
    the training process handles (``wcl.preemption.ignore_preemption_signals``).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        workers: int = 0,
        pin_memory: bool = False,
        persistent: bool = False,
    ) -> None:
        self.batch_size = batch_size
        self.sampler = ResumableSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self._loader: DataLoader | None = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=workers,
            pin_memory=pin_memory,
            drop_last=True,
            # Looked up here, not at import: tests stand in for it.
            worker_init_fn=preemption.ignore_preemption_signals,
            persistent_workers=persistent and workers > 0,
        )
        self._running: Iterator[Any] | None = None
        self._workers = workers
        self.steps_per_epoch = len(self.sampler) // batch_size

    def epoch(self, epoch: int, done: int = 0) -> Iterator[Any]:
        """(0-based) ``epoch``'s batches, leaving out the first ``done`` (taken before a
        resume). Set the dataset's own epoch state before iterating: workers that do not
        persist copy the dataset when the iteration starts."""
        if self._loader is None:
            raise RuntimeError("the loader is closed")
        self.sampler.set_epoch(epoch)
        self.sampler.skip = done * self.batch_size
        self._running = self._batches(self._loader)
        return self._running

    @staticmethod
    def _batches(loader: DataLoader) -> Iterator[Any]:
        yield from loader

    def close(self) -> None:
        """Stop the workers: DataLoader has no public call for it, but its iterator stops
        them when it is freed. This object holds the only references to the loader (and
        so to the iterator persistent workers keep) and to the epoch under way, so
        dropping them frees both; the collection then catches any reference cycle, which
        would otherwise keep them until interpreter exit, when torch no longer stops
        workers and multiprocessing waits forever for workers that ignore its SIGTERM
        (seen on torch 2.4)."""
        if self._running is not None:
            self._running.close()  # GeneratorExit in _batches: its iterator reference goes
        self._running = self._loader = None
        if self._workers:
            gc.collect()

    def __enter__(self) -> EpochLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
