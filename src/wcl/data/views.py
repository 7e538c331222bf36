"""The two augmented views of each training image, made where ``data.augment`` says.

- ``loader``: the per-image v2 pipelines run in the DataLoader workers (:class:`TwoViews`);
  batches arrive as ``(view1, view2, target)``.
- ``batch``: the workers hand over raw uint8 images (:class:`WithIndex`) and
  :class:`BatchAugment` makes both views of the whole batch on the training device. Needs
  images of one size (Fashion-MNIST, CIFAR).
- ``hybrid``: the workers make each view's random resized crop per image (uint8, from a
  source of any size, as an image folder has), and the rest of the pipeline (flip, colour
  jitter, greyscale, blur, normalisation) runs batched on the training device. Meant for
  image folders at 224 px with a GPU: the workers keep only decoding and cropping.

In every mode each image's views depend only on (seed, epoch, index). The two phases of
pre-training use the weak (MoCo v2) pipeline during warm-up and the strong (SimCLR) one
after; :meth:`TrainingViews.set_epoch` switches between them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from wcl.data.augment import TwoViews, WithIndex, strong_pipeline, weak_pipeline
from wcl.data.batch_augment import batch_strong_pipeline, batch_weak_pipeline
from wcl.data.seeds import two_view_seeds

__all__ = ["AUGMENT_MODES", "TrainingViews"]

AUGMENT_MODES = ("loader", "batch", "hybrid")


class TrainingViews:
    """Training data as two augmented views per image; see the module docstring.

    ``dataset`` is what the DataLoader should read; pass each loaded batch to
    :meth:`make`, which returns ``(x1, x2, targets)`` on the training device, float32
    ``(B, C, size, size)`` normalised with ``mean``/``std``.
    """

    def __init__(
        self,
        base: Dataset,
        mode: str,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        weak_min_scale: float,
        strong_min_scale: float,
        jitter: float,
        blur_prob: float,
        seed: int,
    ) -> None:
        if mode not in AUGMENT_MODES:
            raise ValueError(f"augment mode must be one of {AUGMENT_MODES}, got {mode!r}")
        self.mode, self.seed, self.epoch = mode, seed, 0
        options = {"jitter": jitter, "blur_prob": blur_prob}
        per_image = mode == "loader"
        weak_fn = weak_pipeline if per_image else batch_weak_pipeline
        strong_fn = strong_pipeline if per_image else batch_strong_pipeline
        # (weak, strong): used during warm-up, then after it.
        self.phases = (
            weak_fn(size, mean, std, min_scale=weak_min_scale, **options),
            strong_fn(size, mean, std, min_scale=strong_min_scale, **options),
        )
        self.augment = self.phases[0]
        self._loader_phases: tuple | None = None
        if mode == "loader":
            self._loader_phases = self.phases
        elif mode == "hybrid":
            self._loader_phases = tuple(
                v2.RandomResizedCrop(size, scale=(low, 1.0), antialias=True)
                for low in (weak_min_scale, strong_min_scale)
            )
        self._two_views = (
            TwoViews(base, self._loader_phases[0], seed) if self._loader_phases else None
        )
        self.dataset: Dataset = (
            self._two_views if mode == "loader" else WithIndex(self._two_views or base)
        )

    def set_epoch(self, epoch: int, strong: bool) -> None:
        """Select the epoch (it seeds every view) and the pipeline: weak, or ``strong``."""
        self.epoch = epoch
        self.augment = self.phases[int(strong)]
        if self._two_views is not None and self._loader_phases is not None:
            self._two_views.set_epoch(epoch, self._loader_phases[int(strong)])

    def to(self, device: torch.device) -> TrainingViews:
        """Move the batched pipelines (their normalisation constants) to ``device``."""
        if self.mode != "loader":
            self.phases = tuple(p.to(device) for p in self.phases)
            self.augment = self.phases[0]
        return self

    def make(
        self,
        loaded: Sequence[torch.Tensor],
        device: torch.device,
        memory_format: torch.memory_format = torch.preserve_format,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x1, x2, targets)`` on ``device`` from one batch of ``dataset``."""
        if self.mode == "loader":
            x1, x2, targets = loaded
        else:
            if self.mode == "batch":
                images, targets, indices = loaded
                first = second = images.to(device, non_blocking=True)
            else:
                crops1, crops2, targets, indices = loaded
                first = crops1.to(device, non_blocking=True)
                second = crops2.to(device, non_blocking=True)
            seeds1, seeds2 = two_view_seeds(self.seed, self.epoch, indices)
            crop = self.mode == "batch"
            x1, x2 = self.augment(first, seeds1, crop), self.augment(second, seeds2, crop)
        x1 = x1.to(device, non_blocking=True, memory_format=memory_format)
        x2 = x2.to(device, non_blocking=True, memory_format=memory_format)
        return x1, x2, targets
