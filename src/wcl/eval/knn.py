"""Weighted k-nearest-neighbour classification of backbone features (InstDisc, Wu et al. 2018).

Features are L2-normalised; a query's k most cosine-similar training features vote for
their classes with weight ``exp(similarity / T)``; the class scores rank the predictions
(top-1, top-5). Similarities are computed for ``chunk`` queries at a time against the whole
bank, so the memory beyond the bank itself is ``chunk x N`` similarities: with 1.28M
ImageNet features (2048-d: 10.5 GB in float32, half that in bfloat16) and chunk 256 that
is 1.3 GB more, which fits one GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from wcl import dist
from wcl.config import ConfigError
from wcl.eval.common import (
    finish_run,
    gathered_features,
    log_broken_files,
    open_run,
    skipped_images,
    split_features,
    start_run,
    write_results,
)
from wcl.eval.config import KnnConfig
from wcl.eval.data import load_splits
from wcl.eval.features import extract_features
from wcl.eval.shards import my_share, shard

__all__ = ["knn_accuracies", "knn_accuracy", "knn_eval", "knn_monitor", "knn_predict"]


def _check(train_labels: torch.Tensor, num_classes: int, k: int, n: int) -> None:
    if train_labels.ndim != 1 or len(train_labels) != n:
        raise ValueError(f"train_labels must have shape ({n},), got {tuple(train_labels.shape)}")
    if n and (int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes):
        raise ValueError(f"train labels must lie in 0..{num_classes - 1}")
    if not 0 < k <= n:
        raise ValueError(f"k must be in 1..{n} (the training features), got {k}")


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    ks: Sequence[int] = (200,),
    t: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
    normalized: bool = False,
) -> dict[int, torch.Tensor]:
    """{k: classes ranked by weighted-kNN score, best first} for every k in ``ks``: each
    (Q, min(5, num_classes)) int64 on the CPU, from one similarity pass.

    The bank (``train_feats`` (N, D), ``train_labels`` (N,) int64 in 0..num_classes-1;
    ``num_classes`` None: the largest label + 1) stays where it is; ``chunk`` queries of
    ``query_feats`` (Q, D) at a time are moved to its device. ``normalized``: the features
    are unit rows already (no normalised copy of the bank).
    """
    num_classes = num_classes or int(train_labels.max()) + 1
    n = train_feats.shape[0]
    for k in ks:
        _check(train_labels, num_classes, k, n)
    if chunk <= 0:
        raise ValueError(f"chunk must be > 0, got {chunk}")
    device = train_feats.device
    bank = train_feats if normalized else F.normalize(train_feats, dim=1)
    labels = train_labels.to(device)
    top = min(5, num_classes)
    ranked = {k: torch.empty(len(query_feats), top, dtype=torch.int64) for k in ks}
    for start in range(0, len(query_feats), chunk):
        q = query_feats[start : start + chunk].to(device, bank.dtype)
        if not normalized:
            q = F.normalize(q, dim=1)
        # One top-k (the largest k) serves every k: the top-20 are the first 20 of the top-200.
        sims, index = (q @ bank.T).topk(max(ks), dim=1)  # sorted, most similar first
        weights = (sims.float() / t).exp()
        votes = labels[index]
        for k, out in ranked.items():
            scores = torch.zeros(len(q), num_classes, device=device)
            scores.scatter_add_(1, votes[:, :k], weights[:, :k])
            out[start : start + len(q)] = scores.topk(top, dim=1).indices.cpu()
    return ranked


def _accuracies(
    ranked: dict[int, torch.Tensor],
    labels: torch.Tensor,
    device: torch.device | None = None,
) -> dict[int, dict[str, float]]:
    """{k: {"top1": %, "top5": %}} of :func:`knn_predict`'s ranked classes against the
    true ``labels`` (Q,): the true class ranked first, or among the ranked (top 5).

    ``device`` (the process group's: a GPU for NCCL) when each process holds a share of
    the queries: hits and query counts are then summed over processes, so every process
    must call this and all get the whole set's figures. None: these queries alone.
    """
    labels = labels.cpu()
    counts = [len(labels)]
    for pred in ranked.values():
        hit = pred == labels[:, None]
        counts += [int(hit[:, 0].sum()), int(hit.any(dim=1).sum())]
    totals = torch.tensor(counts, dtype=torch.int64)
    if device is not None:  # one collective for every count
        totals = dist.all_reduce_sum(totals.to(device)).cpu()
    n = max(int(totals[0]), 1)
    return {
        k: {"top1": 100.0 * int(totals[1 + 2 * i]) / n, "top5": 100.0 * int(totals[2 + 2 * i]) / n}
        for i, k in enumerate(ranked)
    }


def knn_accuracies(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = (200, 20),
    t: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
    normalized: bool = False,
) -> dict[int, dict[str, float]]:
    """{k: {"top1": %, "top5": %}} for several k from one similarity pass.

    Shapes as :func:`knn_predict`'s, with ``test_labels`` (Q,) int64; ``num_classes``
    None: the largest label of either set + 1. top5 is "the true class is among the 5
    best-scored" (all classes when fewer than 5).
    """
    num_classes = num_classes or max(int(train_labels.max()), int(test_labels.max())) + 1
    ranked = knn_predict(
        train_feats, train_labels, test_feats, ks, t, num_classes, chunk, normalized
    )
    return _accuracies(ranked, test_labels)


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 200,
    t: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> dict[str, float]:
    """Weighted-kNN accuracy of ``test_feats`` against the bank ``train_feats``.

    Shapes: train (N, D) with labels (N,), test (Q, D) with labels (Q,); any device (the
    work happens on the bank's). Returns {"top1": %, "top5": %}. For online monitoring:
    ``knn_accuracy(*extract_features(backbone, train_set, tf), *extract_features(backbone,
    test_set, tf), k=200, t=0.07, num_classes=10)``.
    """
    return knn_accuracies(
        train_feats, train_labels, test_feats, test_labels, [k], t, num_classes, chunk
    )[k]


def knn_monitor(
    backbone: nn.Module,
    train_set: Dataset,
    test_set: Dataset,
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
    *,
    k: int = 200,
    t: float = 0.07,
    batch_size: int = 256,
    workers: int = 0,
    amp: torch.dtype | None = None,
    chunk: int = 1024,
) -> dict[str, float]:
    """kNN accuracy of a live backbone, for monitoring during pre-training.

    Extracts eval-mode features of both labelled datasets (``(uint8 image, target)``
    samples; ``transform`` e.g. :func:`wcl.data.eval_pipeline`) on the backbone's device,
    puts the backbone's mode back, and returns {"top1": %, "top5": %}. Cost: one forward
    pass over both sets; pass a ``Subset`` of the training set to make it cheaper.

    Several processes: every process must call this, and the work is split W ways (each
    extracts its share of both sets, the bank's shares are gathered, each classifies its
    share of the queries, the hits are summed), so all get the same figures, as fast as W
    processes go and with no process left waiting at a collective while one works alone.
    """
    device = next(backbone.parameters()).device
    n_queries, world = len(test_set), dist.world_size()  # type: ignore[arg-type]
    if n_queries < world:  # before any work: a process without queries would strand the rest
        raise ConfigError(f"knn test: {n_queries} images cannot be shared by {world} processes")
    feats, labels = gathered_features(
        backbone, train_set, transform, batch_size, device, workers, amp=amp, desc="knn bank"
    )
    test_feats, test_labels = extract_features(
        backbone, shard(test_set), transform, batch_size, device, workers, amp=amp,
        desc="knn test",
    )  # fmt: skip
    # The same class count on every process, whatever labels its share of queries holds.
    top = max(int(labels.max()), int(test_labels.max()) if len(test_labels) else 0)
    num_classes = dist.max_over_processes(top) + 1
    ranked = knn_predict(feats.to(device), labels, test_feats, [k], t, num_classes, chunk)
    # Broken files have no row: the denominator is the queries scored, over all processes.
    return _accuracies(ranked, test_labels, device)[k]


def knn_eval(cfg: KnnConfig) -> dict[str, Any]:
    """Run the kNN evaluation ``cfg`` describes; returns what results.json holds.

    Features of the centre-cropped train and test images (cached in the run directory as
    features-train/test.pt unless ``knn.cache_features`` is off), then one similarity pass
    for every k in ``knn.k``. Results: {"k200": {"top1", "top5"}, ...} plus the settings.
    Several processes (torchrun / srun): each extracts a share of both splits and the
    shares are gathered, so every process holds the whole bank; each then classifies its
    share of the test images and the hit counts are summed. Rank 0 writes the files.
    """
    setup = open_run(cfg, "knn-eval", resume=None, trains=False)
    splits = load_splits(cfg.data, setup.channels)
    if max(cfg.knn.k) > len(splits.train):
        raise ConfigError(
            f"'knn.k' {cfg.knn.k} asks for more neighbours than the {len(splits.train)} "
            "training images"
        )
    start_run(setup, cfg)
    log_broken_files(setup, splits)
    (train_x, train_y), (test_x, test_y) = split_features(
        cfg, setup, splits, cfg.knn.cache_features
    )
    # The bank goes to the device once; queries follow chunk by chunk.
    bank = F.normalize(train_x.to(setup.device), dim=1)
    mine = torch.tensor(my_share(len(test_y)), dtype=torch.int64)
    ranked = knn_predict(
        bank,
        train_y,
        F.normalize(test_x[mine], dim=1),
        cfg.knn.k,
        cfg.knn.temperature,
        splits.num_classes,
        cfg.knn.chunk,
        normalized=True,
    )
    # Each process scored its share of the queries; the hits are summed over processes.
    accuracies = _accuracies(ranked, test_y[mine], setup.device)
    results: dict[str, Any] = {f"k{k}": acc for k, acc in accuracies.items()}
    results |= {
        "run_dir": str(setup.run_dir),
        "temperature": cfg.knn.temperature,
        "num_classes": splits.num_classes,
        "train_images": len(train_y),
        "test_images": len(test_y),
        "skipped_images": skipped_images(
            setup, splits, train_rows=len(train_y), test_rows=len(test_y)
        ),
    }
    write_results(setup, cfg, "knn-eval", results)
    finish_run(setup)
    return results
