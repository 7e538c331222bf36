"""Augmentation pipelines (torchvision.transforms.v2) and a deterministic two-view wrapper.

Pipelines take uint8 tensors ``(C, H, W)`` and return float32 ``(C, size, size)`` normalised
with the given mean/std; ``C = len(mean)`` must be 1 or 3.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

__all__ = [
    "GaussianBlur",
    "WithIndex",
    "TwoViews",
    "blur_kernel_size",
    "matrix_gaussian_blur",
    "eval_pipeline",
    "sample_seed",
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


def _colour_ops(
    channels: int,
    jitter: float,
    strengths: tuple[float, float, float, float],
) -> list[v2.Transform]:
    """Random colour jitter (p=0.8) and, for RGB only, random greyscale (p=0.2)."""
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    b, c, s, h = (x * jitter for x in strengths)
    ops: list[v2.Transform] = []
    if jitter > 0:
        # Saturation and hue do nothing on one channel; dropping them keeps the op cheap.
        cj = v2.ColorJitter(b, c) if channels == 1 else v2.ColorJitter(b, c, s, min(h, 0.5))
        ops.append(v2.RandomApply([cj], p=_JITTER_PROB))
    if channels == 3:
        ops.append(v2.RandomGrayscale(p=_GRAYSCALE_PROB))
    return ops


def _reflect_blur_matrices(sigma: torch.Tensor, kernel_size: int, n: int) -> torch.Tensor:
    """(B, n, n) matrices M with M @ v = v blurred along its n entries with a Gaussian of
    per-sample ``sigma`` (B,) pixels, ``kernel_size`` taps and reflect padding."""
    taps = torch.arange(kernel_size, dtype=sigma.dtype, device=sigma.device)
    weights = torch.exp(-0.5 * ((taps - (kernel_size - 1) / 2) / sigma[:, None]) ** 2)
    weights = weights / weights.sum(dim=1, keepdim=True)  # (B, k)
    rows = torch.arange(n, device=sigma.device)[:, None]
    source = rows + torch.arange(kernel_size, device=sigma.device) - kernel_size // 2  # (n, k)
    if n > 1:  # reflect at both edges, "dcb|abcd|cba": period 2 (n - 1)
        source = source.remainder(2 * (n - 1))
        source = torch.where(source >= n, 2 * (n - 1) - source, source)
    else:
        source = torch.zeros_like(source)
    b = sigma.shape[0]
    matrices = torch.zeros(b, n, n, dtype=sigma.dtype, device=sigma.device)
    return matrices.scatter_add_(
        2, source.expand(b, n, kernel_size), weights[:, None, :].expand(b, n, kernel_size)
    )


def matrix_gaussian_blur(
    images: torch.Tensor, sigma: torch.Tensor, kernel_size: int
) -> torch.Tensor:
    """Blur float ``images`` (B, C, H, W), each with its own ``sigma`` (B,) (pixels):
    torchvision's gaussian_blur (reflect padding, ``kernel_size`` taps) per sample.

    The Gaussian is separable and each 1-D pass with its reflect padding is a banded
    n x n matrix, so the blur is two matrix products. For one image on the CPU that is
    several times faster than torchvision's k x k convolution or two depthwise 1-D
    convolutions; for whole batches the depthwise form (``BatchAugment``'s) is faster
    (``bench/blur.py``, BENCHMARKS.md).
    """
    _, _, height, width = images.shape
    sigma = sigma.to(images.device, images.dtype)
    across = _reflect_blur_matrices(sigma, kernel_size, width)[:, None]  # (B, 1, W, W)
    down = (
        across if height == width else _reflect_blur_matrices(sigma, kernel_size, height)[:, None]
    )
    return down @ (images @ across.transpose(-1, -2))


class GaussianBlur(torch.nn.Module):
    """Per-image Gaussian blur of a uint8 (C, H, W) tensor, sigma ~ U(sigma range) drawn
    from torch's global generator as ``v2.GaussianBlur`` draws it; the same result up to
    float rounding, by :func:`matrix_gaussian_blur`'s products instead of a convolution."""

    def __init__(self, kernel_size: int, sigma: tuple[float, float] = _BLUR_SIGMA) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.sigma = sigma

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        sigma = torch.empty(1).uniform_(*self.sigma)
        blurred = matrix_gaussian_blur(image[None].float(), sigma, self.kernel_size)[0]
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
) -> v2.Compose:
    """MoCo v2 augmentation: crop (scale min_scale..1), jitter 0.4/0.4/0.4/0.1, grey, blur, flip.

    ``jitter`` multiplies the colour-jitter strengths (0 disables jitter).
    """
    channels = _check_stats(mean, std)
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True),
            *_colour_ops(channels, jitter, WEAK_JITTER),
            *_blur_ops(size, blur_prob),
            v2.RandomHorizontalFlip(),
            *_to_normalised_float(mean, std),
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
) -> v2.Compose:
    """SimCLR augmentation: crop (scale min_scale..1), flip, jitter 0.8/0.8/0.8/0.2, grey, blur.

    ``jitter`` multiplies the colour-jitter strengths (0 disables jitter).
    """
    channels = _check_stats(mean, std)
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            *_colour_ops(channels, jitter, STRONG_JITTER),
            *_blur_ops(size, blur_prob),
            *_to_normalised_float(mean, std),
        ]
    )


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


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 64-bit seed that is a pure function of (seed, epoch, index)."""
    # SeedSequence hashes its entropy, so neighbouring (epoch, index) pairs give unrelated
    # streams; the modulo makes negative seeds valid entropy.
    entropy = [seed % 2**64, epoch % 2**64, index % 2**64]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


class TwoViews(Dataset):
    """Wrap a ``(uint8 image, target)`` dataset to return ``(view1, view2, target)``.

    Both views come from ``transform`` with different random draws. The randomness of sample
    ``i`` depends only on ``(seed, epoch, i)``, so results do not depend on worker count,
    sampling order or resumption, and the caller's global RNG state is left untouched.
    ``set_epoch`` must reach the copy of this object that workers use: with
    ``persistent_workers=True`` the workers keep the epoch they were created with.
    """

    def __init__(self, base: Dataset, transform: Transform, seed: int = 0) -> None:
        self.base = base
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int, transform: Transform | None = None) -> None:
        """Select the epoch (and optionally swap the pipeline, e.g. for a strength schedule)."""
        self.epoch = epoch
        if transform is not None:
            self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
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
        return view1, view2, target


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
