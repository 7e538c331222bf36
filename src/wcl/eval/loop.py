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
from wcl.cadence import Cadence
from wcl.checkpoint import save_checkpoint
from wcl.data import collate_readable, sample_seed
from wcl.optim import lr_at, param_groups
from wcl.precision import autocast, grad_scaler
from wcl.steps import GuardedStep

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


@dataclass(frozen=True)
class Recipe:
    """How :func:`fit` trains: SGD (optionally Nesterov) with a per-iteration cosine from
    ``peak_lr`` to 0 over ``epochs * steps_per_epoch`` steps, where it runs, and when it
    tests and checkpoints.

    ``peak_lr`` is already scaled for the batch (:func:`wcl.optim.scaled_lr`);
    ``steps_per_epoch`` counts this process's batches (the same on every process).
    ``weight_decay`` applies to weights, never to biases or normalisation layers
    (:func:`wcl.optim.param_groups`). ``amp``: autocast dtype, None for float32.
    ``run_dir``: where ``last.pt`` is written, None for nowhere. ``desc`` names the
    progress bars and the per-epoch lines.
    """

    epochs: int
    steps_per_epoch: int
    peak_lr: float
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    eval_every: int = 1
    checkpoint_every: int = 1
    device: torch.device = torch.device("cpu")
    amp: torch.dtype | None = None
    run_dir: Path | None = None
    progress: bool = True
    desc: str = "train"

    def optimizer(self, module: nn.Module) -> torch.optim.SGD:
        """SGD over ``module``'s trainable parameters, at ``peak_lr``."""
        # Nesterov needs a momentum > 0 in torch; momentum 0 means plain SGD.
        return torch.optim.SGD(
            param_groups(module, self.weight_decay),
            lr=self.peak_lr,
            momentum=self.momentum,
            nesterov=self.nesterov and self.momentum > 0,
            weight_decay=self.weight_decay,
        )

    @property
    def cadence(self) -> Cadence:
        """When it tests and saves, as pre-training's loop says it (``wcl.cadence``)."""
        return Cadence(
            self.epochs,
            self.steps_per_epoch,
            save_every=self.checkpoint_every,
            evaluate_every=self.eval_every,
        )

    def tests_after(self, epoch: int) -> bool:
        """Whether the test pass runs after ``epoch`` (1-based; the last always)."""
        return self.cadence.evaluates_after(epoch)

    def saves_after(self, epoch: int) -> bool:
        """Whether ``last.pt`` is written after ``epoch`` (1-based; the last always)."""
        return self.run_dir is not None and self.cadence.keeps_after(epoch)


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
    # One collective for all four sums; float64 holds counts below 2**53 exactly.
    local = torch.cat([hits.double(), loss.double().view(1), hits.new_tensor([count]).double()])
    top1_sum, top5_sum, loss_sum, count_sum = dist.all_reduce_sum(local).tolist()
    top1_hits, top5_hits, images = int(top1_sum), int(top5_sum), int(count_sum)
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
    recipe: Recipe,
    *,
    model: nn.Module,
    saved: nn.Module,
    batches_for: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    test: Callable[[], dict[str, float]],
    state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    report: Callable[[list[dict[str, Any]], bool], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` (logits = model(x)) with cross-entropy as ``recipe`` says; returns
    the per-epoch history (one dict per epoch: loss, lr, step, seconds, test metrics).

    ``saved`` is the part that trains (the optimiser, :meth:`Recipe.optimizer`, takes its
    trainable parameters) and is written to ``last.pt`` as ``model`` (e.g. only the linear
    layer of a probe), with the optimiser, the float16 loss scaler, ``epoch``, ``step``,
    ``history`` and ``extra``. float16 ``amp`` scales the loss
    (:func:`wcl.precision.grad_scaler`): a step whose gradients overflow is skipped
    (:class:`wcl.steps.GuardedStep`, as in pre-training).
    ``batches_for(epoch)`` gives that epoch's training batches (images, int64 targets);
    ``test()`` the test metrics (:func:`evaluate`). ``state``: a loaded ``last.pt`` to
    continue from. ``report(history, done)`` is called after every test pass (e.g. to
    write results.json).

    Several processes: ``model`` is the DDP wrapper, ``saved`` the module inside it, and
    ``batches_for`` gives this process's share of each global batch (the same number of
    batches on every process). The epoch's loss is summed over processes; only rank 0
    writes ``last.pt`` and shows progress, every process can resume from it.
    """
    optimizer = recipe.optimizer(saved)
    scaler = grad_scaler(recipe.device, recipe.amp)
    epoch, step, history = _resume(state, saved, optimizer, scaler)
    # A float16 step that overflows is dropped with its BatchNorm statistics (wcl.steps).
    guard = GuardedStep(model, optimizer, scaler, skip_nonfinite=False)
    while epoch < recipe.epochs:
        row = _train_epoch(recipe, model, optimizer, guard, batches_for(epoch), epoch, step)
        epoch, step = row["epoch"], row["step"]
        tested = recipe.tests_after(epoch)
        if tested:
            # The test's loss and image count get a prefix: the row has the training loss.
            row |= {f"test_{k}" if k in ("loss", "images") else k: v for k, v in test().items()}
        history.append(row)
        if recipe.progress and dist.is_main():
            shown = f" top1 {row['top1']:.2f} top5 {row['top5']:.2f}" if tested else ""
            tqdm.write(f"{recipe.desc} epoch {epoch}: loss {row['loss']:.4f}{shown}")
        if recipe.saves_after(epoch) and dist.is_main():
            _save(recipe, saved, optimizer, scaler, history, extra)
        if tested and report is not None:
            report(history, epoch == recipe.epochs)
    return history


def _resume(
    state: dict[str, Any] | None,
    saved: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> tuple[int, int, list[dict[str, Any]]]:
    """(epochs done, steps done, history) of ``state``, whose weights, optimiser and loss
    scale are loaded; (0, 0, []) without one."""
    if state is None:
        return 0, 0, []
    saved.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]), int(state["step"]), list(state["history"])


def _train_epoch(
    recipe: Recipe,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    guard: GuardedStep,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    epoch: int,
    step: int,
) -> dict[str, Any]:
    """One pass over ``batches`` (epoch ``epoch``, 0-based, from global step ``step``).

    Returns the history row: {"epoch": 1-based, "step": steps done, "lr": the last
    step's, "loss": mean cross-entropy over every process's images, "seconds"}.
    FloatingPointError on every process when that loss is not finite.
    """
    device = recipe.device
    model.train()
    loss_sum = torch.zeros((), device=device)
    seen, tick = 0, time.perf_counter()
    bar = tqdm(
        batches,
        total=recipe.steps_per_epoch,
        desc=f"{recipe.desc} {epoch + 1}/{recipe.epochs}",
        disable=not (recipe.progress and dist.is_main()),
        leave=False,
    )
    total = recipe.epochs * recipe.steps_per_epoch
    lr = recipe.peak_lr
    for x, y in bar:
        lr = lr_at(step, recipe.peak_lr, 0, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        guard.begin()
        with autocast(device, recipe.amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        guard.finish(loss)
        loss_sum += loss.detach() * len(y)
        seen += len(y)
        step += 1
    # The same figure on every process, so that all of them raise (or not) below.
    local = torch.stack([loss_sum.double(), loss_sum.new_tensor(seen, dtype=torch.float64)])
    loss_total, seen_total = dist.all_reduce_sum(local).tolist()
    row = {
        "epoch": epoch + 1,
        "step": step,
        "lr": lr,
        "loss": loss_total / max(int(seen_total), 1),
        "seconds": time.perf_counter() - tick,
    }
    if not math.isfinite(row["loss"]):
        raise FloatingPointError(f"non-finite training loss in epoch {epoch + 1}: {row}")
    return row


def _save(
    recipe: Recipe,
    saved: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    history: list[dict[str, Any]],
    extra: dict[str, Any] | None,
) -> None:
    """Write ``recipe.run_dir/last.pt``: everything :func:`_resume` reads, and ``extra``."""
    assert recipe.run_dir is not None  # recipe.saves_after says so
    last = history[-1]
    save_checkpoint(
        {
            **(extra or {}),
            "model": saved.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": last["epoch"],
            "step": last["step"],
            "history": history,
        },
        recipe.run_dir / "last.pt",
    )
