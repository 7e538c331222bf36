"""Backbone features of a whole dataset, shared by the kNN, the fast linear probe and embed.

:func:`extract_features` is meant to be called during pre-training too (online kNN
monitoring): it takes any backbone module as it is, runs it in eval mode under
``torch.no_grad`` and puts back the mode it found.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from wcl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from wcl.data import BROKEN, NoReadableImageError, collate_marking_broken, unwrap_image_folder
from wcl.eval.data import MapImages
from wcl.precision import autocast

__all__ = [
    "cached_features",
    "extract_features",
    "file_identity",
    "load_cached_features",
    "readable_rows",
    "save_features",
]


def _module_device(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    dataset: Dataset,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    workers: int = 0,
    progress: bool = False,
    *,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
    desc: str = "features",
    keep_broken_rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every readable sample of ``dataset``, in dataset order.

    ``dataset`` yields ``(image, target)``; ``transform`` (e.g. a centre-crop pipeline from
    :func:`wcl.eval.data.eval_transform`) maps each image to the float tensor the backbone
    takes, or is None when the dataset already yields those. ``device`` is where batches are
    sent (default: the backbone's own device; the backbone is not moved). ``amp`` is an
    autocast dtype (e.g. ``torch.bfloat16`` on a GPU) or None.

    Returns ``(features, targets)``: float32 (N, C) and int64 (N,), both on the CPU, with C
    the backbone's output width. The features are not normalised. The backbone runs in eval
    mode (BatchNorm uses its running statistics) and gets its previous mode back afterwards.

    A sample whose image is None (a broken file of ``ImageFolderDataset(substitute=False)``)
    has no row; with ``keep_broken_rows`` it keeps its row, filled with NaN, and the target
    ``wcl.data.BROKEN`` (for callers that must know which rows are missing: drop them with
    :func:`readable_rows`).
    """
    device = torch.device(device) if device is not None else _module_device(backbone)
    data = MapImages(dataset, transform) if transform is not None else dataset
    loader = DataLoader(
        data,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        collate_fn=collate_marking_broken,
    )
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    was_training = backbone.training
    backbone.eval()
    feats: torch.Tensor | None = None
    targets = torch.empty(len(data), dtype=torch.int64)  # type: ignore[arg-type]
    start = 0
    try:
        for images, labels in tqdm(loader, desc=desc, disable=not progress, leave=False):
            rows = slice(start, start + len(labels))
            targets[rows] = labels
            start += len(labels)
            if images is None:  # every image of the batch is broken
                continue
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            with autocast(device, amp):
                out = backbone(images)
            out = out.float().cpu()
            if feats is None:
                feats = torch.full((len(data), out.shape[1]), float("nan"))  # type: ignore[arg-type]
            feats[rows][labels != BROKEN] = out
    finally:
        backbone.train(was_training)
    if feats is None:
        folder = unwrap_image_folder(data)
        where = f"{folder.root}, " if folder is not None else ""
        raise NoReadableImageError(
            f"{desc}: no readable image in {where}a data set of {len(data)}"  # type: ignore[arg-type]
        )
    return (feats, targets) if keep_broken_rows else readable_rows(feats, targets)


def readable_rows(feats: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows (features (N, C), targets (N,)) whose target is not ``wcl.data.BROKEN``."""
    keep = targets != BROKEN
    return (feats, targets) if bool(keep.all()) else (feats[keep], targets[keep])


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What identifies a file's content cheaply: absolute path, size, modification time."""
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def load_cached_features(
    path: str | os.PathLike | None, key: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (features, targets) saved in ``path`` with ``key``, or None (no file, another
    key, an unreadable file)."""
    if path is None or not Path(path).is_file():
        return None
    with contextlib.suppress(CheckpointError, KeyError):
        saved = load_checkpoint(path)
        if saved.get("kind") == "features" and saved.get("key") == key:
            return saved["features"], saved["targets"]
    return None


def save_features(
    path: str | os.PathLike, key: dict[str, Any], feats: torch.Tensor, targets: torch.Tensor
) -> None:
    """Write (features, targets) with their ``key`` for :func:`load_cached_features`."""
    save_checkpoint({"kind": "features", "key": key, "features": feats, "targets": targets}, path)


def cached_features(
    path: str | os.PathLike | None,
    key: dict[str, Any],
    compute: Callable[[], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``compute()``'s (features, targets), reused from ``path`` when it was saved with ``key``.

    ``key`` (plain values) names everything the features depend on (checkpoint identity,
    split, pipeline); a file with another key, or an unreadable one, is recomputed and
    overwritten. ``path`` None: always compute, save nothing.
    """
    cached = load_cached_features(path, key)
    if cached is not None:
        return cached
    feats, targets = compute()
    if path is not None:
        save_features(path, key, feats, targets)
    return feats, targets
