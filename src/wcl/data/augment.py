"""Augmentation pipelines (torchvision.transforms.v2) and a deterministic two-view wrapper.

Pipelines take uint8 tensors ``(C, H, W)`` and return float32 ``(C, size, size)`` normalised
with the given mean/std; ``C = len(mean)`` must be 1 or 3. The training pipelines crop the
uint8 image (torch's fast uint8 resize) and do the colour ops and the blur in float, with no
rounding between them, as :class:`~wcl.data.batch_augment.BatchAugment` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from wcl.data.batch_ops import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
)
from wcl.data.seeds import sample_seed

__all__ = [
    "ColourJitter",
    "GaussianBlur",
    "ToChannels",
    "WithIndex",
    "TwoViews",
    "blur_kernel_size",
    "eval_pipeline",
    "strong_pipeline",
    "weak_pipeline",
]

Transform = Callable[[torch.Tensor], torch.Tensor]

_BLUR_SIGMA = (0.1, 2.0)
_JITTER_PROB = 0.8
_GRAYSCALE_PROB = 0.2


def blur_kernel_size(size: int) -> int:
    """Odd Gaussian-blur kernel of about 10% of the image side ``size`` (pixels), at least 3."""
    k = max(3, round(0.1 * size))
    return k if k % 2 == 1 else k + 1


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> int:
    if len(mean) != len(std) or len(mean) not in (1, 3):
        raise ValueError(f"mean/std must both have 1 or 3 entries, got {len(mean)}/{len(std)}")
    return len(mean)


class ColourJitter(torch.nn.Module):
    """``v2.ColorJitter`` for one float image (C, H, W) in [0, 1]: the same draws from
    torch's global generator (a random order of the four ops, then a factor for each one
    that is on) and the same ops, by :mod:`wcl.data.batch_ops`' kernels. Its hue rotation
    skips torchvision's full HSV round trip, about twice as fast (``bench/augment_pipeline.py``).

    ``brightness``, ``contrast``, ``saturation``: factors ~ U(max(0, 1 - v), 1 + v);
    ``hue``: shift ~ U(-v, v) turns, v <= 0.5; 0 turns an op off.
    """

    def __init__(
        self, brightness: float = 0, contrast: float = 0, saturation: float = 0, hue: float = 0
    ) -> None:
        super().__init__()
        for name, value in (("brightness", brightness), ("contrast", contrast),
                            ("saturation", saturation), ("hue", hue)):  # fmt: skip
            if value < 0:
                raise ValueError(f"ColourJitter {name} must be >= 0, got {value}")
        if hue > 0.5:
            raise ValueError(f"ColourJitter hue must be <= 0.5 turns, got {hue}")

        def factors(v: float) -> tuple[float, float] | None:
            return (max(0.0, 1.0 - v), 1.0 + v) if v > 0 else None

        self.brightness = factors(brightness)
        self.contrast = factors(contrast)
        self.saturation = factors(saturation)
        self.hue = (-hue, hue) if hue > 0 else None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if not image.is_floating_point():
            raise TypeError(f"ColourJitter takes float images in [0, 1], got {image.dtype}")
        order = torch.randperm(4).tolist()
        ranges = (self.brightness, self.contrast, self.saturation, self.hue)
        draws = [None if r is None else torch.empty(1).uniform_(*r) for r in ranges]
        ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        x = image[None]
        for op in order:  # op ids 0-3 as v2's: brightness, contrast, saturation, hue
            if draws[op] is not None:
                x = ops[op](x, draws[op])
        return x[0]

    def extra_repr(self) -> str:
        return (
            f"brightness={self.brightness}, contrast={self.contrast}, "
            f"saturation={self.saturation}, hue={self.hue}"
        )


def _colour_ops(
    channels: int,
    jitter: float,
    strengths: tuple[float, float, float, float],
) -> list[Transform]:
    """Random colour jitter (p=0.8) and, for RGB only, random greyscale (p=0.2)."""
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    b, c, s, h = (x * jitter for x in strengths)
    ops: list[Transform] = []
    if jitter > 0:
        # Saturation and hue do nothing on one channel; dropping them keeps the op cheap.
        cj = ColourJitter(b, c) if channels == 1 else ColourJitter(b, c, s, min(h, 0.5))
        ops.append(v2.RandomApply([cj], p=_JITTER_PROB))
    if channels == 3:
        ops.append(v2.RandomGrayscale(p=_GRAYSCALE_PROB))
    return ops


class GaussianBlur(torch.nn.Module):
    """Per-image Gaussian blur of a (C, H, W) tensor (uint8 or float), sigma ~ U(sigma range)
    drawn from torch's global generator as ``v2.GaussianBlur`` draws it; the same pixels
    within 6.4e-5 of their range, by :func:`wcl.data.batch_ops.gaussian_blur`'s shifted sums
    instead of a k x k convolution (several times faster, ``bench/blur.py``)."""

    def __init__(self, kernel_size: int, sigma: tuple[float, float] = _BLUR_SIGMA) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.sigma = sigma

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        sigma = torch.empty(1).uniform_(*self.sigma)
        blurred = gaussian_blur(image[None].float(), sigma, self.kernel_size)[0]
        if image.is_floating_point():
            return blurred.to(image.dtype)
        return blurred.round_().clamp_(0, 255).to(image.dtype)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, sigma={self.sigma}"


def _blur_ops(size: int, blur_prob: float) -> list[Transform]:
    if blur_prob <= 0:
        return []
    return [v2.RandomApply([GaussianBlur(blur_kernel_size(size))], p=blur_prob)]


# Colour-jitter strengths (brightness, contrast, saturation, hue) of the two recipes.
WEAK_JITTER = (0.4, 0.4, 0.4, 0.1)  # MoCo v2
STRONG_JITTER = (0.8, 0.8, 0.8, 0.2)  # SimCLR


def _to_normalised_float(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def weak_pipeline(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    min_scale: float = 0.2,
    jitter: float = 1.0,
    blur_prob: float = 0.5,
    max_scale: float = 1.0,
) -> v2.Compose:
    """MoCo v2 augmentation: crop (scale min_scale..max_scale), jitter 0.4/0.4/0.4/0.1, grey,
    blur, flip.

    ``jitter`` multiplies the colour-jitter strengths (0 disables jitter).
    """
    channels = _check_stats(mean, std)
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(min_scale, max_scale), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            *_colour_ops(channels, jitter, WEAK_JITTER),
            *_blur_ops(size, blur_prob),
            v2.RandomHorizontalFlip(),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def strong_pipeline(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    min_scale: float = 0.08,
    jitter: float = 1.0,
    blur_prob: float = 0.5,
    max_scale: float = 1.0,
) -> v2.Compose:
    """SimCLR augmentation: crop (scale min_scale..max_scale), flip, jitter 0.8/0.8/0.8/0.2,
    grey, blur.

    ``jitter`` multiplies the colour-jitter strengths (0 disables jitter).
    """
    channels = _check_stats(mean, std)
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(min_scale, max_scale), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            *_colour_ops(channels, jitter, STRONG_JITTER),
            *_blur_ops(size, blur_prob),
            v2.Normalize(list(mean), list(std)),
        ]
    )


class ToChannels(torch.nn.Module):
    """uint8 (C, H, W) -> (channels, H, W): grey repeated to RGB, RGB to luma (BT.601)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        have = image.shape[-3]
        if have == self.channels:
            return image
        if self.channels == 3 and have == 1:
            return image.expand(*image.shape[:-3], 3, *image.shape[-2:])
        if self.channels == 1 and have == 3:
            return v2.functional.rgb_to_grayscale(image)
        raise ValueError(f"cannot turn a {have}-channel image into {self.channels} channels")


def eval_pipeline(
    size: int, mean: Sequence[float], std: Sequence[float], resize: int | None = None
) -> v2.Compose:
    """Deterministic: resize the short side to ``resize`` (default ``size``), centre-crop ``size``."""
    _check_stats(mean, std)
    return v2.Compose(
        [
            v2.Resize(resize if resize is not None else size, antialias=True),
            v2.CenterCrop(size),
            *_to_normalised_float(mean, std),
        ]
    )


class TwoViews(Dataset):
    """Wrap a ``(uint8 image, target)`` dataset to return ``(view1, view2, target)``.

    Both views come from ``transform`` with different random draws. With ``small_crops``
    V > 0 (multi-crop) it returns ``(view1, view2, small, target)``, ``small`` the V views
    of ``small_transform`` stacked ``(V, C, h, w)``, drawn after the two views (which stay
    the same as without them). The randomness of sample ``i`` depends only on
    ``(seed, epoch, i)``, so results do not depend on worker count, sampling order or
    resumption, and the caller's global RNG state is left untouched.
    ``set_epoch`` must reach the copy of this object that workers use: with
    ``persistent_workers=True`` the workers keep the epoch they were created with.
    """

    def __init__(
        self,
        base: Dataset,
        transform: Transform,
        seed: int = 0,
        *,
        small_transform: Transform | None = None,
        small_crops: int = 0,
    ) -> None:
        if small_crops and small_transform is None:
            raise ValueError(f"small_crops={small_crops} needs a small_transform")
        self.base = base
        self.transform = transform
        self.small_transform = small_transform
        self.small_crops = small_crops
        self.seed = seed
        self.epoch = 0

    def set_epoch(
        self,
        epoch: int,
        transform: Transform | None = None,
        small_transform: Transform | None = None,
    ) -> None:
        """Select the epoch (and optionally swap the pipelines, e.g. for a strength schedule)."""
        self.epoch = epoch
        if transform is not None:
            self.transform = transform
        if small_transform is not None:
            self.small_transform = small_transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        image, target = self.base[index]
        with torch.random.fork_rng(devices=[]):
            # Seeding only the CPU generator: torch.manual_seed would also reseed CUDA,
            # which fork_rng(devices=[]) does not restore.
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
            view1 = self.transform(image)
            view2 = self.transform(image)
            if not self.small_crops:
                return view1, view2, target
            small = [self.small_transform(image) for _ in range(self.small_crops)]  # type: ignore[misc]
        return view1, view2, torch.stack(small), target


class WithIndex(Dataset):
    """Samples with their index appended, e.g. ``(image, target)`` -> ``(image, target,
    index)``: raw uint8 samples for batched augmentation on the training device, which
    seeds each sample by its index."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple:
        return (*self.base[index], index)
