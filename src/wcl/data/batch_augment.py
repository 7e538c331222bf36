"""Batched contrastive augmentation: whole uint8 batches on any device, one call per view.

:class:`BatchAugment` reproduces the per-image pipelines of :mod:`wcl.data.augment`
(:func:`~wcl.data.augment.weak_pipeline` and :func:`~wcl.data.augment.strong_pipeline`) in
distribution, but works on a whole batch ``(B, C, H, W)`` at once, so the cost per image is
a few tensor operations rather than a dozen Python calls. It pays off most for small images
(Fashion-MNIST, CIFAR), where the per-image pipeline is all interpreter overhead.

Randomness. Each sample carries its own 64-bit seed. Its parameters are drawn on the CPU
as a fixed-length vector of uniforms from SplitMix64 started at that seed alone
(:func:`wcl.data.seeds.uniforms`), so a sample's augmentation never depends on the batch it
is in, its position, the batch size or the number of processes sharing the batch.
:func:`~wcl.data.seeds.two_view_seeds` derives the two views' seeds from ``(seed, epoch,
index)``.
The draws are not the same numbers as the per-image pipeline's (that one consumes torch's
global generator op by op), only the same distributions.

Order of operations: crop + resize, flip, colour jitter (random order of its four ops per
sample, like ``ColorJitter``), random greyscale, Gaussian blur, normalisation. The weak
pipeline flips last and the strong one right after the crop; a horizontal flip commutes with
every other op here (per-pixel or whole-image colour maps, a symmetric blur kernel with
symmetric reflect padding), so one order serves both.

Known (small) differences from the per-image pipeline:

- The per-image pipeline crops on uint8 tensors and rounds the resized crop to integers;
  here the crop is resized in float32 (a difference of at most about 1/255). After the
  crop both stay float32 in [0, 1].
- Crop + resize uses ``torchvision.ops.roi_align`` (bilinear, ``aligned=True``), i.e. the same
  sample points as ``resize(..., antialias=False)``. Two differences: (1) output pixels whose
  sample point falls less than half a source pixel inside the crop edge interpolate with the
  real neighbouring pixel outside the crop, where resize of the cropped image replicates the
  edge pixel (crops touching the image border are identical); (2) on downscaling, instead of
  torchvision's antialias (triangle) filter, ``antialias=True`` averages
  ``ceil(crop / size) ** 2`` bilinear samples per output pixel (roi_align's adaptive sampling),
  a box filter of the same width. For Fashion-MNIST and CIFAR at native size every crop is
  an upscale, where both paths are plain bilinear.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from wcl.data.augment import (
    _BLUR_SIGMA,
    _GRAYSCALE_PROB,
    _JITTER_PROB,
    STRONG_JITTER,
    WEAK_JITTER,
    _check_stats,
    blur_kernel_size,
)
from wcl.data.batch_ops import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    colour_jitter,
    gaussian_blur,
    hflip,
    random_grayscale,
    resized_crop,
    rgb_to_grayscale,
)
from wcl.data.seeds import uniforms
from wcl.precision import float32_region

__all__ = [
    "BatchAugment",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "batch_strong_pipeline",
    "batch_weak_pipeline",
    "colour_jitter",
    "crop_params",
    "gaussian_blur",
    "hflip",
    "random_grayscale",
    "resized_crop",
    "rgb_to_grayscale",
]

_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_CROP_TRIES = 10

# Slots in each sample's vector of uniforms. Fixed positions, so a parameter's draw does not
# move when the pipeline's options change (e.g. with blur_prob=0 the blur slots are drawn and
# ignored).
_U_AREA = slice(0, _CROP_TRIES)
_U_RATIO = slice(_CROP_TRIES, 2 * _CROP_TRIES)
_U_TOP, _U_LEFT = 2 * _CROP_TRIES, 2 * _CROP_TRIES + 1
_U_FLIP = 22
_U_JITTER = 23
_U_FACTORS = slice(24, 28)
_U_ORDER = slice(28, 32)
_U_GRAY = 32
_U_BLUR = 33
_U_SIGMA = 34
_N_UNIFORMS = 35

# Floats per CPU chunk of BatchAugment (4 MiB): 6 samples at 224 px, whole batches of
# CIFAR or Fashion-MNIST images (bench/augment_pipeline.py).
_CPU_CHUNK_ELEMENTS = 2**20

# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def _between(
    u: torch.Tensor, low: float | torch.Tensor, high: float | torch.Tensor
) -> torch.Tensor:
    """Uniforms ``u`` in [0, 1) mapped affinely onto [low, high)."""
    return low + u * (high - low)


def crop_params(
    u_area: torch.Tensor,
    u_ratio: torch.Tensor,
    u_top: torch.Tensor,
    u_left: torch.Tensor,
    height: int,
    width: int,
    scale: tuple[float, float],
) -> torch.Tensor:
    """RandomResizedCrop's box rule, batched: int64 ``(B, 4)`` rows ``(top, left, h, w)`` (pixels).

    ``u_area``/``u_ratio``: ``(B, tries)`` uniforms for each try's area fraction (in
    ``scale``) and log aspect ratio (in [log 3/4, log 4/3]); the first try whose rounded box
    fits is used, placed by ``u_top``/``u_left`` ``(B,)``. If no try fits, the central crop
    of the largest box with an aspect ratio within bounds, as torchvision does.
    """
    area = _between(u_area, *scale) * (height * width)
    ratio = torch.exp(_between(u_ratio, math.log(_RATIO[0]), math.log(_RATIO[1])))
    # torch.round rounds half to even, like Python's round() in torchvision.
    w = torch.round(torch.sqrt(area * ratio))
    h = torch.round(torch.sqrt(area / ratio))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first fitting try (0 if none)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    found = fits.any(dim=1)

    in_ratio = width / height
    if in_ratio < _RATIO[0]:
        fallback_w, fallback_h = width, round(width / _RATIO[0])
    elif in_ratio > _RATIO[1]:
        fallback_w, fallback_h = round(height * _RATIO[1]), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(found, w, float(fallback_w))
    h = torch.where(found, h, float(fallback_h))
    # A uniform integer in [0, n) as floor(u * n); min() guards against u * n rounding to n.
    top = torch.minimum(torch.floor(u_top * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u_left * (width - w + 1)), width - w)
    top = torch.where(found, top, torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(width - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=1).to(torch.int64)


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------


class BatchAugment(torch.nn.Module):
    """One random view of every image in a uint8 batch, normalised; see the module docstring.

    ``forward(images, seeds)``: uint8 ``(B, C, H, W)`` on any device and int64 seeds ``(B,)``
    (e.g. from :func:`~wcl.data.seeds.two_view_seeds`) to float32 ``(B, C, size, size)`` on the same device.
    Build it with :func:`batch_weak_pipeline` or :func:`batch_strong_pipeline`.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        scale: tuple[float, float],
        strengths: tuple[float, float, float, float],
        blur_prob: float,
        antialias: bool = True,
    ) -> None:
        """``strengths``: ColorJitter's (brightness, contrast, saturation, hue); all 0 = no
        jitter. ``scale``: crop area fraction range. ``blur_prob``: 0 = no blur."""
        super().__init__()
        self.channels = _check_stats(mean, std)
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < low <= high <= 1, got {scale}")
        if min(strengths) < 0 or strengths[HUE] > 0.5:
            raise ValueError(f"jitter strengths must be >= 0 (hue <= 0.5), got {strengths}")
        self.size = size
        self.scale = scale
        self.strengths = strengths
        self.jitter = any(s > 0 for s in strengths)
        self.blur_prob = blur_prob
        self.kernel_size = blur_kernel_size(size)
        self.antialias = antialias
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, channels={self.channels}, scale={self.scale}, "
            f"strengths={self.strengths}, blur_prob={self.blur_prob}, "
            f"kernel_size={self.kernel_size}, antialias={self.antialias}"
        )

    def sample_params(
        self, seeds: torch.Tensor, height: int, width: int
    ) -> dict[str, torch.Tensor]:
        """Random parameters for images of ``height`` x ``width`` pixels, on the CPU.

        Row b depends only on ``seeds[b]``. Keys (all ``(B,)`` unless noted): ``crop``
        int64 ``(B, 4)`` (top, left, h, w) pixels; ``flip`` bool; ``jitter`` bool (p=0.8;
        always False without jitter); ``brightness``, ``contrast``, ``saturation`` factors and
        ``hue`` shift, float32 (1, 1, 1, 0 where not jittered; saturation and hue neutral on
        one channel); ``order`` int64 ``(B, 4)``, the jitter ops' application order (a
        uniformly random permutation of BRIGHTNESS..HUE); ``grayscale`` bool (p=0.2, never on
        one channel); ``blur`` bool (p=blur_prob); ``sigma`` float32 in [0.1, 2.0] pixels.
        """
        seeds = torch.as_tensor(seeds, dtype=torch.int64).cpu()
        if seeds.dim() != 1:
            raise ValueError(f"seeds must have shape (B,), got {tuple(seeds.shape)}")
        u = uniforms(seeds, _N_UNIFORMS)
        crop = crop_params(
            u[:, _U_AREA], u[:, _U_RATIO], u[:, _U_TOP], u[:, _U_LEFT], height, width, self.scale
        )
        jitter = (u[:, _U_JITTER] < _JITTER_PROB) & self.jitter
        lows = [max(0.0, 1.0 - s) for s in self.strengths[:3]] + [-self.strengths[HUE]]
        highs = [1.0 + s for s in self.strengths[:3]] + [self.strengths[HUE]]
        factors = _between(
            u[:, _U_FACTORS], torch.tensor(lows, dtype=u.dtype), torch.tensor(highs, dtype=u.dtype)
        )
        neutral = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=u.dtype)
        if self.channels == 1:
            factors[:, SATURATION:] = neutral[SATURATION:]
        factors = torch.where(jitter[:, None], factors, neutral).float()
        return {
            "crop": crop,
            "flip": u[:, _U_FLIP] < 0.5,
            "jitter": jitter,
            "brightness": factors[:, BRIGHTNESS],
            "contrast": factors[:, CONTRAST],
            "saturation": factors[:, SATURATION],
            "hue": factors[:, HUE],
            # Sorting i.i.d. uniforms gives a uniformly random permutation, like randperm.
            "order": u[:, _U_ORDER].argsort(dim=1),
            "grayscale": (u[:, _U_GRAY] < _GRAYSCALE_PROB) & (self.channels == 3),
            "blur": u[:, _U_BLUR] < self.blur_prob,
            "sigma": _between(u[:, _U_SIGMA], *_BLUR_SIGMA).float(),
        }

    def apply(
        self, images: torch.Tensor, params: dict[str, torch.Tensor], crop: bool = True
    ) -> torch.Tensor:
        """Augment uint8 ``images`` ``(B, C, H, W)`` with given ``params`` (see sample_params).
        ``crop=False``: the images are crops already made at ``size`` (``params["crop"]``
        is ignored); everything after the crop is applied."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError(
                f"expected uint8 (B, C, H, W) images, got {images.dtype} {images.shape}"
            )
        if images.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {images.shape[1]}")
        device = images.device
        p = {k: v.cpu() for k, v in params.items()}
        # Per-sample numbers go to the device in one copy; which rows take the blur is read
        # on the CPU, so nothing here waits for the device.
        packed = torch.cat(
            [p["crop"].float(), p["flip"][:, None].float(), p["grayscale"][:, None].float()], 1
        ).to(device, non_blocking=True)
        x = images.float().div_(255)
        if crop:
            x = resized_crop(x, packed[:, :4], self.size, self.antialias)
        x = hflip(x, packed[:, 4] > 0.5)
        if self.jitter:
            keys = ("brightness", "contrast", "saturation", "hue")
            factors = torch.stack([p[k] for k in keys], dim=1)
            x = colour_jitter(x, factors, p["order"], p["jitter"])
        if self.channels == 3:
            x = random_grayscale(x, packed[:, 5] > 0.5)
        rows = torch.nonzero(p["blur"]).flatten()
        if len(rows):
            sigma = p["sigma"][rows].to(device, non_blocking=True)
            rows = rows.to(device, non_blocking=True)
            x.index_copy_(0, rows, gaussian_blur(x[rows], sigma, self.kernel_size))
        return (x - self.mean.to(device)) / self.std.to(device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, seeds: torch.Tensor, crop: bool = True) -> torch.Tensor:
        """One view of each of ``images`` (uint8 ``(B, C, H, W)``) for int64 ``seeds`` ``(B,)``.

        ``crop=False`` takes crops already made at ``size`` x ``size`` (e.g. per image in the
        DataLoader workers, ``data.augment=hybrid``) and applies the rest of the pipeline.
        """
        if len(seeds) != len(images):
            raise ValueError(f"{len(seeds)} seeds for {len(images)} images")
        if not crop and tuple(images.shape[-2:]) != (self.size, self.size):
            raise ValueError(
                f"crop=False needs {self.size} x {self.size} crops, got {tuple(images.shape[-2:])}"
            )
        params = self.sample_params(seeds, images.shape[-2], images.shape[-1])
        # float32 views whatever autocast the caller runs under: autocast would turn the
        # blur's convolutions (on GPUs) into bf16 / fp16 and mix dtypes within a batch.
        with float32_region(images.device):
            if images.device.type != "cpu" or len(images) == 0:
                return self.apply(images, params, crop)
            # On a CPU, a few samples at a time keep the float intermediates in cache.
            per_sample = images.shape[1] * max(images[0, 0].numel(), self.size**2)
            step = max(1, _CPU_CHUNK_ELEMENTS // per_sample)
            return torch.cat(
                [
                    self.apply(
                        images[i : i + step], {k: v[i : i + step] for k, v in params.items()}, crop
                    )
                    for i in range(0, len(images), step)
                ]
            )


def _strengths(base: tuple[float, float, float, float], jitter: float) -> tuple[float, ...]:
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    b, c, s, h = (x * jitter for x in base)
    return (b, c, s, min(h, 0.5))


def _batch_pipeline(size, mean, std, min_scale, max_scale, jitter, blur_prob, antialias, base):
    return BatchAugment(
        size,
        mean,
        std,
        scale=(min_scale, max_scale),
        strengths=_strengths(base, jitter),  # type: ignore[arg-type]
        blur_prob=blur_prob,
        antialias=antialias,
    )


def batch_weak_pipeline(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    min_scale: float = 0.2,
    jitter: float = 1.0,
    blur_prob: float = 0.5,
    antialias: bool = True,
    max_scale: float = 1.0,
) -> BatchAugment:
    """Batched :func:`~wcl.data.augment.weak_pipeline` (MoCo v2): same parameters and meaning."""
    return _batch_pipeline(
        size, mean, std, min_scale, max_scale, jitter, blur_prob, antialias, WEAK_JITTER
    )


def batch_strong_pipeline(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    min_scale: float = 0.08,
    jitter: float = 1.0,
    blur_prob: float = 0.5,
    antialias: bool = True,
    max_scale: float = 1.0,
) -> BatchAugment:
    """Batched :func:`~wcl.data.augment.strong_pipeline` (SimCLR): same parameters and meaning."""
    return _batch_pipeline(
        size, mean, std, min_scale, max_scale, jitter, blur_prob, antialias, STRONG_JITTER
    )
