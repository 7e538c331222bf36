"""What pre-training reads and keeps of its data: the training set as augmented views,
the held-out data of the online kNN monitor, and the last batch for the report.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Subset

from wcl.atomic import atomic_write
from wcl.config import Config, small_crop_size
from wcl.data import (
    build_dataset,
    dataset_stats,
    eval_pipeline,
    first_readable,
    unwrap_image_folder,
)
from wcl.data.views import TrainingViews

__all__ = ["online_knn", "save_late_batch", "training_data"]


def training_data(cfg: Config, run_dir: Path) -> tuple[TrainingViews, list[str]]:
    """The training set as two augmented views per image, plus ``data.small_crops``
    low-resolution ones (made where ``data.augment`` says: see ``wcl.data.views``), and its
    class names ([] if unlabelled).

    Unreadable images in a folder data set are replaced by the next readable one and
    listed in ``run_dir/skipped.jsonl``; a data set with no readable image is an error
    here, before any training.
    """
    d = cfg.data
    dataset = build_dataset(d.dataset, d.root, train=True, download=d.download, channels=d.channels)
    folder = unwrap_image_folder(dataset)
    if folder is not None:
        folder.skip_log = run_dir / "skipped.jsonl"  # before any DataLoader worker copies it
    first_readable(dataset)
    classes = list(getattr(dataset, "classes", []))
    if d.subset is not None:
        dataset = Subset(dataset, range(min(d.subset, len(dataset))))
    mean, std = dataset_stats(d.dataset, d.channels)
    views = TrainingViews(
        dataset, d.augment, d.image_size, mean, std, weak_min_scale=d.weak_min_scale,
        strong_min_scale=d.strong_min_scale, jitter=d.jitter, blur_prob=d.blur_prob,
        seed=cfg.train.seed, small_crops=d.small_crops, small_size=small_crop_size(d),
        small_scale=(d.small_min_scale, d.small_max_scale),
    )  # fmt: skip
    return views, classes


def online_knn(
    cfg: Config, amp: torch.dtype | None
) -> Callable[[torch.nn.Module], dict[str, float]] | None:
    """A function backbone -> {"knn_top1", "knn_top5"} on the held-out split, or None.

    Weighted kNN (``wcl.eval.knn_monitor``) of centre-cropped held-out images against a
    bank of training images, both without augmentation. Collective: every process calls
    it and does 1/W of the work.
    """
    d = cfg.data
    if not cfg.train.knn_every:
        return None
    from wcl.eval import knn_monitor

    # An accuracy counts no substitute: broken files are left out (see gathered_features).
    bank, queries = (
        build_dataset(d.dataset, d.root, split, d.download, d.channels, substitute=False)
        for split in (True, False)
    )
    if cfg.train.knn_bank:
        bank = Subset(bank, range(min(cfg.train.knn_bank, len(bank))))
    if cfg.train.knn_queries:
        queries = Subset(queries, range(min(cfg.train.knn_queries, len(queries))))
    transform = eval_pipeline(d.image_size, *dataset_stats(d.dataset, d.channels))
    k = min(cfg.train.knn_k, len(bank))

    def monitor(backbone: torch.nn.Module) -> dict[str, float]:
        acc = knn_monitor(
            backbone, bank, queries, transform, k=k, t=cfg.train.knn_t, batch_size=512,
            workers=d.workers, amp=amp,
        )  # fmt: skip
        return {"knn_top1": acc["top1"], "knn_top5": acc["top5"]}

    return monitor


def save_late_batch(
    path: Path,
    x: torch.Tensor,
    out: dict[str, torch.Tensor],
    targets: torch.Tensor | None,
    cfg: Config,
    classes: list[str],
) -> None:
    """The last batch's first views (uint8, as the graph saw them) with their weak labels,
    for the report's component grids."""
    mean, std = (torch.tensor(v, device=x.device).view(1, -1, 1, 1)
                 for v in dataset_stats(cfg.data.dataset, cfg.data.channels))  # fmt: skip
    images = ((x.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    batch = {"images": images.contiguous(), "labels": out["labels1"][: len(x)].cpu()}
    if targets is not None:
        batch["targets"] = targets.cpu()
    batch["classes"] = classes
    atomic_write(path, lambda f: torch.save(batch, f))
