"""The supervised training loop shared by the linear probe (both modes) and fine-tuning.

SGD (optionally Nesterov) with a per-iteration cosine schedule from the peak lr to 0,
cross-entropy, a test pass every ``eval_every`` epochs (and after the last), and a
resumable ``last.pt`` (trained weights, optimiser, epoch, step, history). The data order
of epoch e is a function of (seed, e), and :class:`wcl.eval.data.MapImages` makes each
augmentation a function of (seed, e, index), so a resumed run repeats exactly what an
uninterrupted one would have done.

Several processes (see :mod:`wcl.eval.shards`): each trains on its share of every global
batch through a DDP wrapper, evaluates its share of the test set, and the losses and hit
counts are summed over processes; only rank 0 writes ``last.pt`` and draws progress bars.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from wcl import dist
from wcl.checkpoint import save_checkpoint
from wcl.data import collate_readable, sample_seed
from wcl.eval.shards import sum_over_processes
from wcl.optim import lr_at
from wcl.precision import autocast, grad_scaler

__all__ = [
    "Recipe",
    "epoch_generator",
    "epoch_loader",
    "evaluate",
    "evaluation_loader",
    "fit",
    "summarise",
    "tensor_batches",
    "topk_hits",
]


@dataclass
class Recipe:
    """How to train: epochs, peak lr (already batch-scaled), SGD settings, cadence."""

    epochs: int
    peak_lr: float
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    eval_every: int = 1
    checkpoint_every: int = 1

    def optimizer(self, params: Iterable) -> torch.optim.SGD:
        # Nesterov needs a momentum > 0 in torch; momentum 0 means plain SGD.
        return torch.optim.SGD(
            params,
            lr=self.peak_lr,
            momentum=self.momentum,
            nesterov=self.nesterov and self.momentum > 0,
            weight_decay=self.weight_decay,
        )


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator seeded by a pure function of (seed, epoch)."""
    return torch.Generator().manual_seed(sample_seed(seed, epoch, -1) % 2**63)


def tensor_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, epoch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled mini-batches of in-memory tensors (N, ...) / (N,), order from (seed, epoch).

    Whole-batch indexing, on the tensors' device: far faster than a DataLoader over a
    TensorDataset, which indexes and stacks one row at a time.
    """
    order = torch.randperm(len(x), generator=epoch_generator(seed, epoch)).to(x.device)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        yield x[index], y[index]


def epoch_loader(
    dataset: Dataset,
    sampler: DistributedSampler,
    batch_size: int,
    epoch: int,
    workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """This process's loader for ``epoch``: order from (sampler seed, epoch) only.

    ``batch_size`` is the per-process batch; the sampler and a dataset with ``set_epoch``
    (augmentations) are set to ``epoch``.
    """
    sampler.set_epoch(epoch)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        collate_fn=collate_readable,  # a broken file is left out of its batch
    )


def evaluation_loader(
    dataset: Dataset, batch_size: int, workers: int, pin_memory: bool
) -> DataLoader:
    """The test pass's loader, in dataset order; a broken file is left out of its batch
    (and so out of the accuracy's denominator: :func:`evaluate` counts what it sees)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=pin_memory,
        collate_fn=collate_readable,
    )


def topk_hits(logits: torch.Tensor, targets: torch.Tensor, top: int = 5) -> torch.Tensor:
    """(top-1 hits, top-``top`` hits) of a batch: int64 (2,). ``top`` is capped at the classes."""
    top = min(top, logits.shape[1])
    pred = logits.topk(top, dim=1).indices
    hit = pred == targets[:, None]
    return torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    amp: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """{"top1": %, "top5": %, "loss": mean cross-entropy, "images": how many were scored}
    of ``model`` (eval mode) on ``batches``.

    With several processes ``batches`` is this process's share of the test set (each
    sample in exactly one share) and every process must call this: hits, losses and counts
    are summed over processes, so all get the whole test set's figures. Pass the module
    itself, not a DDP wrapper (shares may differ in length by one batch).
    """
    was_training = model.training
    model.eval()
    hits = torch.zeros(2, dtype=torch.int64, device=device)
    loss = torch.zeros((), device=device)
    count = 0
    show = progress and dist.is_main()
    try:
        for x, y in tqdm(batches, desc="test", disable=not show, leave=False):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, amp):
                logits = model(x).float()
            hits += topk_hits(logits, y)
            loss += F.cross_entropy(logits, y, reduction="sum")
            count += len(y)
    finally:
        model.train(was_training)
    # One collective for all four sums; float64 keeps the counts exact.
    local = torch.cat([hits.double(), loss.double().view(1), hits.new_tensor([count]).double()])
    top1_hits, top5_hits, loss_sum, total = sum_over_processes(local).tolist()
    # Counts are whole numbers; the mean-times-W round trip may leave 1e-13 of dust.
    top1_hits, top5_hits, images = round(top1_hits), round(top5_hits), round(total)
    total = max(images, 1)
    return {
        "top1": 100.0 * top1_hits / total,
        "top5": 100.0 * top5_hits / total,
        "loss": loss_sum / total,
        "images": images,
    }


def summarise(history: list[dict[str, Any]]) -> dict[str, Any]:
    """{"final": last evaluated epoch, "best": the evaluated epoch with the best top-1}."""
    rows = [r for r in history if "top1" in r]
    if not rows:
        return {}
    pick = ("epoch", "top1", "top5")
    best = max(rows, key=lambda r: r["top1"])  # first of equals: the earliest epoch
    return {"final": {k: rows[-1][k] for k in pick}, "best": {k: best[k] for k in pick}}


def fit(
    model: nn.Module,
    saved: nn.Module,
    recipe: Recipe,
    optimizer: torch.optim.Optimizer,
    batches_for: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    steps_per_epoch: int,
    test: Callable[[], dict[str, float]],
    run_dir: Path | None,
    device: torch.device,
    *,
    amp: torch.dtype | None = None,
    state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    report: Callable[[list[dict[str, Any]], bool], None] | None = None,
    progress: bool = True,
    desc: str = "train",
) -> list[dict[str, Any]]:
    """Train ``model`` (logits = model(x)) with cross-entropy; returns the per-epoch history.

    ``saved`` is the part written to ``run_dir/last.pt`` as ``model`` (e.g. only the linear
    layer of a probe), with the optimiser, the float16 loss scaler, ``epoch``, ``step``,
    ``history`` and ``extra`` (``run_dir`` None: nothing is written). ``amp`` float16
    scales the loss (:func:`wcl.run.grad_scaler`): a step whose gradients overflow is
    skipped.
    ``batches_for(epoch)`` gives that epoch's training batches; ``test()`` the test
    metrics. ``state``: a loaded ``last.pt`` to continue from. ``report(history, done)``
    is called after every test pass (e.g. to write results.json).

    Several processes: ``model`` is the DDP wrapper, ``saved`` the module inside it, and
    ``batches_for`` gives this process's share of each global batch (the same number of
    batches on every process). The epoch's loss is summed over processes; only rank 0
    writes ``last.pt`` and shows progress, every process can resume from it.
    """
    main = dist.is_main()
    progress = progress and main
    history: list[dict[str, Any]] = []
    epoch = step = 0
    scaler = grad_scaler(device, amp)
    if state is not None:
        saved.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        epoch, step, history = int(state["epoch"]), int(state["step"]), list(state["history"])
    total = recipe.epochs * steps_per_epoch
    while epoch < recipe.epochs:
        model.train()
        loss_sum = torch.zeros((), device=device)
        seen, tick = 0, time.perf_counter()
        bar = tqdm(
            batches_for(epoch),
            total=steps_per_epoch,
            desc=f"{desc} {epoch + 1}/{recipe.epochs}",
            disable=not progress,
            leave=False,
        )
        lr = recipe.peak_lr
        for x, y in bar:
            lr = lr_at(step, recipe.peak_lr, 0, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, amp):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach() * len(y)
            seen += len(y)
            step += 1
        epoch += 1
        # The same figure on every process, so that all of them raise (or not) below.
        local = torch.stack([loss_sum.double(), loss_sum.new_tensor(seen, dtype=torch.float64)])
        loss_total, seen_total = sum_over_processes(local).tolist()
        row: dict[str, Any] = {
            "epoch": epoch,
            "step": step,
            "lr": lr,
            "loss": loss_total / max(round(seen_total), 1),
            "seconds": time.perf_counter() - tick,
        }
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"non-finite training loss in epoch {epoch}: {row}")
        evaluated = epoch % recipe.eval_every == 0 or epoch == recipe.epochs
        if evaluated:
            row.update(
                {f"test_{k}" if k in ("loss", "images") else k: v for k, v in test().items()}
            )
        history.append(row)
        if progress:
            shown = f" top1 {row['top1']:.2f} top5 {row['top5']:.2f}" if evaluated else ""
            tqdm.write(f"{desc} epoch {epoch}: loss {row['loss']:.4f}{shown}")
        due = epoch % recipe.checkpoint_every == 0 or epoch == recipe.epochs
        if run_dir is not None and due and main:
            save_checkpoint(
                {
                    **(extra or {}),
                    "model": saved.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch,
                    "step": step,
                    "history": history,
                },
                run_dir / "last.pt",
            )
        if evaluated and report is not None:
            report(history, epoch == recipe.epochs)
    return history
