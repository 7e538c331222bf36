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

Multi-crop (``small_crops`` > 0) adds low-resolution views of each image, made in the
same place and the same way as the two full-size ones, with their own size and crop scale.

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
from wcl.data.seeds import view_seeds

__all__ = ["AUGMENT_MODES", "TrainingViews"]

AUGMENT_MODES = ("loader", "batch", "hybrid")


class TrainingViews:
    """Training data as two augmented views per image; see the module docstring.

    ``dataset`` is what the DataLoader should read; pass each loaded batch to
    :meth:`make`, which returns ``(x1, x2, targets, small)`` on the training device:
    float32 ``(B, C, size, size)`` views normalised with ``mean``/``std``, and with
    multi-crop (``small_crops`` V > 0) the V low-resolution views ``(V*B, C, small_size,
    small_size)``, view-major, crop scale ``small_scale`` (else ``small`` is None).
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
        small_crops: int = 0,
        small_size: int = 0,
        small_scale: tuple[float, float] = (0.05, 0.14),
    ) -> None:
        if mode not in AUGMENT_MODES:
            raise ValueError(f"augment mode must be one of {AUGMENT_MODES}, got {mode!r}")
        if small_crops and small_size <= 0:
            raise ValueError(f"small_crops={small_crops} needs small_size > 0, got {small_size}")
        self.mode, self.seed, self.epoch = mode, seed, 0
        self.small_crops = small_crops
        options = {"jitter": jitter, "blur_prob": blur_prob}
        per_image = mode == "loader"
        weak_fn = weak_pipeline if per_image else batch_weak_pipeline
        strong_fn = strong_pipeline if per_image else batch_strong_pipeline

        def pipelines(out: int, weak_low: float, strong_low: float, high: float) -> tuple:
            """(weak, strong): used during warm-up, then after it."""
            return (
                weak_fn(out, mean, std, min_scale=weak_low, max_scale=high, **options),
                strong_fn(out, mean, std, min_scale=strong_low, max_scale=high, **options),
            )

        def crops(out: int, weak_low: float, strong_low: float, high: float) -> tuple:
            return tuple(v2.RandomResizedCrop(out, scale=(low, high), antialias=True)
                         for low in (weak_low, strong_low))  # fmt: skip

        full_args = (size, weak_min_scale, strong_min_scale, 1.0)
        small_args = (small_size, small_scale[0], small_scale[0], small_scale[1])
        self.phases = pipelines(*full_args)
        self.small_phases = pipelines(*small_args) if small_crops else None
        # What the DataLoader workers run per image: everything (loader) or the crops (hybrid).
        self._loader_phases: tuple | None = None
        self._small_loader_phases: tuple | None = None
        if mode != "batch":
            make_in_workers = pipelines if mode == "loader" else crops
            self._loader_phases = make_in_workers(*full_args)
            if small_crops:
                self._small_loader_phases = make_in_workers(*small_args)
        self._two_views = None
        if self._loader_phases is not None:
            self._two_views = TwoViews(
                base,
                self._loader_phases[0],
                seed,
                small_transform=self._small_loader_phases and self._small_loader_phases[0],
                small_crops=small_crops,
            )
        self.dataset: Dataset = (
            self._two_views if mode == "loader" else WithIndex(self._two_views or base)
        )
        self.set_epoch(0, strong=False)

    @property
    def workers_may_persist(self) -> bool:
        """Whether DataLoader workers may be kept from one epoch to the next
        (``persistent_workers``): in ``batch`` mode they only read raw images, so nothing
        in them depends on the epoch; in the other modes :meth:`set_epoch` must reach the
        workers' copies of the dataset, which only new workers get."""
        return self.mode == "batch"

    def set_epoch(self, epoch: int, strong: bool) -> None:
        """Select the epoch (it seeds every view) and the pipeline: weak, or ``strong``."""
        self.epoch = epoch
        self.augment = self.phases[int(strong)]
        self.small_augment = self.small_phases and self.small_phases[int(strong)]
        if self._two_views is not None and self._loader_phases is not None:
            small = self._small_loader_phases and self._small_loader_phases[int(strong)]
            self._two_views.set_epoch(epoch, self._loader_phases[int(strong)], small)

    def to(self, device: torch.device) -> TrainingViews:
        """Move the batched pipelines (their normalisation constants) to ``device``."""
        if self.mode != "loader":
            # Module.to moves in place, so self.augment and self.small_augment follow.
            for pipeline in (*self.phases, *(self.small_phases or ())):
                pipeline.to(device)
        return self

    def make(
        self,
        loaded: Sequence[torch.Tensor],
        device: torch.device,
        memory_format: torch.memory_format = torch.preserve_format,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(x1, x2, targets, small)`` on ``device`` from one batch of ``dataset``."""
        small = None
        if self.mode == "loader":
            x1, x2, *small_part, targets = loaded
            if self.small_crops:
                small = small_part[0].transpose(0, 1).flatten(0, 1)  # (B, V, ...) -> view-major
        else:
            if self.mode == "batch":
                images, targets, indices = loaded
                first = second = images.to(device, non_blocking=True)
                small_sources = [first] * self.small_crops
            else:
                crops1, crops2, *small_part, targets, indices = loaded
                first = crops1.to(device, non_blocking=True)
                second = crops2.to(device, non_blocking=True)
                small_sources = (
                    list(small_part[0].to(device, non_blocking=True).unbind(1))
                    if self.small_crops
                    else []
                )
            seeds1, seeds2, *small_seeds = view_seeds(
                self.seed, self.epoch, indices, 2 + self.small_crops
            )
            crop = self.mode == "batch"
            x1, x2 = self.augment(first, seeds1, crop), self.augment(second, seeds2, crop)
            if self.small_crops:
                small = torch.cat(
                    [self.small_augment(source, seeds, crop)
                     for source, seeds in zip(small_sources, small_seeds, strict=True)]
                )  # fmt: skip
        x1 = x1.to(device, non_blocking=True, memory_format=memory_format)
        x2 = x2.to(device, non_blocking=True, memory_format=memory_format)
        if small is not None:
            small = small.to(device, non_blocking=True, memory_format=memory_format)
        return x1, x2, targets, small
