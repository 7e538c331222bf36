"""Labelled train/test splits and the evaluation pipelines (augmented train, centre-crop test).

Datasets yield ``(uint8 (C, H, W), target)`` as everywhere in wcl; the pipelines here turn
that into float32 ``(channels, size, size)`` normalised with the dataset's statistics.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2

from wcl.config import ConfigError
from wcl.data import build_dataset, dataset_stats, sample_seed
from wcl.data.augment import ToChannels
from wcl.data.folder import first_readable, split_dir, unwrap_image_folder
from wcl.eval.config import EvalData

__all__ = [
    "MapImages",
    "Splits",
    "ToChannels",
    "dataset_targets",
    "load_splits",
    "eval_transform",
    "train_transform",
]

Transform = Callable[[torch.Tensor], torch.Tensor]


def _tail(d: EvalData, channels: int) -> list[v2.Transform]:
    mean, std = dataset_stats(d.stats or d.dataset or "imagenet", channels)
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def train_transform(d: EvalData, channels: int) -> v2.Compose:
    """RandomResizedCrop(image_size, scale (min_scale, 1)) + horizontal flip (if ``flip``)."""
    flip = [v2.RandomHorizontalFlip()] if d.flip else []
    crop = v2.RandomResizedCrop(d.image_size, scale=(d.min_scale, 1.0), antialias=True)
    return v2.Compose([ToChannels(channels), crop, *flip, *_tail(d, channels)])


def eval_transform(d: EvalData, channels: int) -> v2.Compose:
    """Resize the short side to ``resize`` (default ``image_size``), centre-crop ``image_size``.

    ImageNet presets: Resize(256) + CenterCrop(224), the release's test pipeline.
    """
    resize = d.resize if d.resize is not None else d.image_size
    return v2.Compose(
        [
            ToChannels(channels),
            v2.Resize(resize, antialias=True),
            v2.CenterCrop(d.image_size),
            *_tail(d, channels),
        ]
    )


class MapImages(Dataset):
    """``(image, target)`` -> ``(transform(image), target)``.

    With a ``seed`` the randomness of sample ``i`` is a function of (seed, epoch, i) only
    (see :func:`wcl.data.sample_seed`), so a resumed run sees the same augmentations as an
    uninterrupted one, whatever the number of workers; ``set_epoch`` selects the epoch.
    """

    def __init__(self, base: Dataset, transform: Transform, seed: int | None = None) -> None:
        self.base = base
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int]:
        image, target = self.base[index]
        if image is None:  # a broken file (ImageFolderDataset(substitute=False)) stays None
            return image, target
        if self.seed is None:
            return self.transform(image), target
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
            return self.transform(image), target


@dataclass
class Splits:
    """Labelled train and test sets (uint8 images) and the class count."""

    train: Dataset
    test: Dataset
    num_classes: int
    classes: list[str]


def _targets(dataset: Dataset) -> torch.Tensor:
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]
    return torch.as_tensor(targets, dtype=torch.int64)


def dataset_targets(dataset: Dataset) -> torch.Tensor:
    """Targets (N,) int64 of a dataset or a Subset of one, without decoding images."""
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(dataset.indices)]
    return _targets(dataset)


def load_splits(d: EvalData, channels: int) -> Splits:
    """The train and test splits ``d`` names; raises ConfigError if either is unlabelled,
    NoReadableImageError if an image folder has no file that decodes (of those tried).

    ``channels`` is what image folders are decoded to; built-in datasets keep their own
    (the pipelines convert with :class:`ToChannels`).
    """
    if (
        d.dataset == "folder"
        and d.root
        and split_dir(Path(d.root), True) == split_dir(Path(d.root), False)
    ):
        print(
            f"wcl: warning: {d.root} has no train/ and val/ (or test/) sub-folders, so the "
            "test split is the training split: accuracies are on images the classifier or "
            "the kNN bank has seen",
            file=sys.stderr,
        )
    # Broken files are left out of both splits (collate_readable), never replaced.
    train, test = (
        build_dataset(d.dataset, d.root, split, d.download, channels, substitute=False)
        for split in (True, False)
    )
    for split in (train, test):
        if unwrap_image_folder(split) is not None:
            # A folder whose files all fail to decode: one error naming it, before any work.
            first_readable(split)
    classes = list(getattr(train, "classes", []))
    if d.train_subset is not None:
        train = Subset(train, range(min(d.train_subset, len(train))))  # type: ignore[arg-type]
    if d.test_subset is not None:
        test = Subset(test, range(min(d.test_subset, len(test))))  # type: ignore[arg-type]
    train_targets, test_targets = dataset_targets(train), dataset_targets(test)
    for name, targets in (("train", train_targets), ("test", test_targets)):
        if len(targets) == 0 or int(targets.min()) < 0:
            raise ConfigError(
                f"the {name} split of {d.dataset!r} ({d.root}) has unlabelled images; "
                "evaluation needs class labels (an image folder with class sub-folders)"
            )
    num_classes = max(len(classes), int(train_targets.max()) + 1, int(test_targets.max()) + 1)
    return Splits(train, test, num_classes, classes)
