"""Batched image operations for :class:`~wcl.data.batch_augment.BatchAugment`.

Each works on a float batch ``(B, C, H, W)`` in [0, 1] with per-sample parameters as
``(B,)`` tensors, and matches the torchvision v2 functional of the same name applied to
each sample (tests/test_batch_augment.py checks each against it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

__all__ = [
    "BRIGHTNESS",
    "CONTRAST",
    "HUE",
    "SATURATION",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "colour_jitter",
    "depthwise_gaussian_blur",
    "gaussian_blur",
    "hflip",
    "random_grayscale",
    "resized_crop",
    "rgb_to_grayscale",
    "shifted_gaussian_blur",
]

# torchvision's rgb_to_grayscale weights (ITU-R 601 luma, with R rounded to 0.2989 as there).
_LUMA = (0.2989, 0.587, 0.114)

# Jitter op ids, also the column order of the factors.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` values as ``(B, 1, 1, 1)`` in ``like``'s dtype and device, for broadcasting."""
    return values.to(device=like.device, dtype=like.dtype).view(-1, 1, 1, 1)


def resized_crop(
    images: torch.Tensor, crops: torch.Tensor, size: int, antialias: bool = True
) -> torch.Tensor:
    """Crop ``crops`` ``(B, 4)`` = (top, left, h, w) pixels from float ``images`` ``(B, C, H, W)``
    and resize each to ``(size, size)`` bilinearly, all in one ``roi_align`` call.

    With ``aligned=True`` and one sample per output pixel, roi_align samples exactly where
    ``resize(..., antialias=False)`` does (half-pixel centres). ``antialias=True`` lets
    roi_align average ``ceil(crop / size)`` samples per axis instead, which only changes
    downscaled crops (see the module docstring).
    """
    crops = crops.to(device=images.device, dtype=images.dtype)
    top, left, h, w = crops.unbind(dim=1)
    index = torch.arange(len(crops), device=images.device, dtype=images.dtype)
    # Box corners on pixel edges: the crop covers pixels left..left+w-1, i.e. [left, left+w).
    boxes = torch.stack([index, left, top, left + w, top + h], dim=1)
    return roi_align(
        images,
        boxes,
        output_size=(size, size),
        spatial_scale=1.0,
        sampling_ratio=0 if antialias else 1,
        aligned=True,
    )


def hflip(images: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the samples whose bool ``flags`` ``(B,)`` are set."""
    mask = flags.to(images.device).view(-1, 1, 1, 1)
    return torch.where(mask, images.flip(-1), images)


def rgb_to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma ``(B, 1, H, W)`` of RGB ``images`` (ITU-R 601 weights); 1 channel is returned as is."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(images: torch.Tensor, factor: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``clamp(factor * images + (1 - factor) * other, 0, 1)`` with per-sample ``factor``."""
    f = _per_sample(factor, images)
    return (f * images + (1 - f) * other).clamp_(0, 1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale by ``factor`` ``(B,)`` (>= 0), clamped: v2's adjust_brightness per sample."""
    return (images * _per_sample(factor, images)).clamp_(0, 1)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma by ``factor`` ``(B,)``: v2's adjust_contrast per sample."""
    mean = rgb_to_grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, factor, mean)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the per-pixel luma by ``factor`` ``(B,)``: v2's adjust_saturation per sample.

    A no-op on one channel, like torchvision (and PIL).
    """
    if images.shape[1] == 1:
        return images
    return _blend(images, factor, rgb_to_grayscale(images))


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` ``(B,)`` turns (in [-0.5, 0.5]): v2's adjust_hue per sample.

    The RGB -> HSV -> RGB round trip, without materialising HSV: a hue shift keeps value
    v = max(R, G, B) and chroma c = v - min(R, G, B), so each output channel is
    ``v - c * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 * hue') mod 6`` (n = 5, 3, 1 for
    R, G, B), the branch-free form of the hexcone. ``6 * hue`` is the usual sector value,
    e.g. ``(G - B) / c`` where R is largest. A no-op on one channel, like torchvision.
    """
    if images.shape[1] == 1:
        return images
    value, largest = images.max(dim=1, keepdim=True)
    chroma = value - images.amin(dim=1, keepdim=True)
    # (G - B, B - R, R - G): the numerator of the sector value for each largest channel.
    diff = images.roll(-1, dims=1).sub_(images.roll(1, dims=1))
    # Grey pixels (chroma 0) have diff 0; dividing them by 1 instead keeps NaN out.
    sector = diff.gather(1, largest).div_(chroma + (chroma == 0)).add_(2 * largest)
    # n = 5, 3, 1, made on the device rather than copied there.
    offsets = 5.0 - 2.0 * torch.arange(3, dtype=images.dtype, device=images.device)
    k = (sector + (6 * _per_sample(shift, images) + offsets.view(1, 3, 1, 1))).remainder_(6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    # In place where possible: fewer large allocations is most of the speed on a CPU.
    return ramp.mul_(chroma).neg_().add_(value).clamp_(0.0, 1.0)


def _jitter_steps(
    factors: torch.Tensor, order: torch.Tensor, apply: torch.Tensor, rgb: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-step blend coefficients ``(4, 3, B)`` (factor, luma weight, mean-luma weight) and
    per-step rows that take the hue op, from CPU parameters (see :func:`colour_jitter`)."""
    coefs, hue_rows = [], []
    for step in range(4):
        op = torch.where(apply, order[:, step], -1)
        if not rgb:  # saturation and hue are no-ops on one channel
            op = torch.where((op == SATURATION) | (op == HUE), -1, op)
        blended = (op >= 0) & (op != HUE)
        f = torch.where(blended, factors.gather(1, op.clamp(min=0)[:, None])[:, 0], 1.0)
        coefs.append(torch.stack([f, (op == SATURATION) * (1 - f), (op == CONTRAST) * (1 - f)]))
        hue_rows.append(torch.nonzero(op == HUE).flatten())
    return torch.stack(coefs).float(), hue_rows


def colour_jitter(
    images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, apply: torch.Tensor
) -> torch.Tensor:
    """ColorJitter per sample: the four ops in each sample's own ``order``.

    ``factors`` ``(B, 4)``: brightness, contrast, saturation factors and hue shift (columns
    BRIGHTNESS..HUE); ``order`` int64 ``(B, 4)``: op ids in application order; ``apply``
    bool ``(B,)``: samples left untouched where False. All three are read on the CPU (they
    decide which samples go through the hue op, and reading them there costs no device sync).

    Each of the four steps is one batched blend ``clamp(f * x + w_l * luma + w_m * mean_luma)``
    with per-sample coefficients: brightness is ``(f, 0, 0)``, saturation ``(f, 1 - f, 0)``,
    contrast ``(f, 0, 1 - f)``, and a sample whose op at this step is hue (or that is not
    jittered) gets ``(1, 0, 0)``, the identity. Hue then runs on just its samples.
    """
    factors, order, apply = factors.cpu(), order.cpu(), apply.cpu()
    coefs, hue_rows = _jitter_steps(factors, order, apply, images.shape[1] == 3)
    blended = (coefs[:, 0] != 1).any(dim=1).tolist()
    # One copy each to the device: coefficients, hue rows and their shifts.
    coefs = coefs.to(images.device, non_blocking=True)
    counts = [len(r) for r in hue_rows]
    all_rows = torch.cat(hue_rows)
    shifts = factors[all_rows, HUE].to(images.device, non_blocking=True)
    rows_dev = all_rows.to(images.device, non_blocking=True)
    x = images
    start = 0
    for step in range(4):
        if blended[step]:
            f, w_luma, w_mean = (_per_sample(c, x) for c in coefs[step])
            luma = rgb_to_grayscale(x)
            mean = luma.mean(dim=(1, 2, 3), keepdim=True)
            # The reference is one channel; only the final fused multiply-add is full size.
            ref = w_luma * luma + w_mean * mean
            x = torch.addcmul(ref, f, x).clamp_(0, 1)
        if counts[step]:
            rows = rows_dev[start : start + counts[step]]
            hued = adjust_hue(x[rows], shifts[start : start + counts[step]])
            # In place once x is ours: a full copy per step costs more than the hue on a CPU.
            x = x.index_copy(0, rows, hued) if x is images else x.index_copy_(0, rows, hued)
            start += counts[step]
    return x


def random_grayscale(images: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Replace the flagged samples (bool ``(B,)``) by their luma on all channels."""
    if images.shape[1] == 1:
        return images
    mask = flags.to(images.device).view(-1, 1, 1, 1)
    return torch.where(mask, rgb_to_grayscale(images).expand_as(images), images)


# Gaussian taps beyond 4 sigma weigh under 6.4e-5 in all; the CPU blur leaves them out.
_BLUR_SIGMAS_KEPT = 4.0
# Samples per CPU blur call: about 2 MiB of float32, which stays in cache between taps.
_BLUR_CHUNK_ELEMENTS = 2**19


def _gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Normalised 1-D Gaussian taps ``(B, kernel_size)`` for per-sample ``sigma`` (pixels)."""
    taps = torch.arange(kernel_size, dtype=sigma.dtype, device=sigma.device)
    taps = taps - (kernel_size - 1) / 2
    weights = torch.exp(-0.5 * (taps / sigma[:, None]) ** 2)
    return weights / weights.sum(dim=1, keepdim=True)


def _blur_along(images: torch.Tensor, taps: torch.Tensor, dim: int) -> torch.Tensor:
    """Reflect-padded 1-D blur of ``images`` (B, C, H, W) along ``dim`` (-1 or -2) with
    per-sample ``taps`` (B, 2r + 1): a weighted sum of 2r + 1 shifted views."""
    radius, n = taps.shape[1] // 2, images.shape[dim]
    pad = [radius, radius, 0, 0] if dim == -1 else [0, 0, radius, radius]
    padded = F.pad(images, pad, mode="reflect")
    weights = taps.view(-1, 1, 1, 1, taps.shape[1])
    out = padded.narrow(dim, 0, n) * weights[..., 0]
    for i in range(1, taps.shape[1]):
        out.addcmul_(padded.narrow(dim, i, n), weights[..., i])
    return out


def shifted_gaussian_blur(
    images: torch.Tensor, sigma: torch.Tensor, kernel_size: int
) -> torch.Tensor:
    """:func:`gaussian_blur` as sums of shifted copies over the taps within 4 sigma (the
    rest weigh under 6.4e-5 together, so no pixel moves by more than that times the range),
    a few samples at a time so they stay in cache. Reads ``sigma`` on the host: for CPUs."""
    if images.shape[0] == 0:
        return images.clone()
    half = kernel_size // 2
    sigma = sigma.cpu()
    kernels = _gaussian_kernels(sigma.to(images.dtype), kernel_size).to(images.device)
    per_call = max(1, _BLUR_CHUNK_ELEMENTS // max(1, images[0].numel()))
    chunks = []
    for start in range(0, images.shape[0], per_call):
        rows = slice(start, start + per_call)
        # The chunk's widest Gaussian sets how many taps it needs.
        radius = min(half, math.ceil(_BLUR_SIGMAS_KEPT * float(sigma[rows].max())))
        taps = kernels[rows, half - radius : half + radius + 1]
        chunks.append(_blur_along(_blur_along(images[rows], taps, -1), taps, -2))
    return torch.cat(chunks) if len(chunks) > 1 else chunks[0]


def depthwise_gaussian_blur(
    images: torch.Tensor, sigma: torch.Tensor, kernel_size: int
) -> torch.Tensor:
    """:func:`gaussian_blur` as two depthwise 1-D convolutions (one group per sample and
    channel) over all ``kernel_size`` taps; no host synchronisation: for GPUs."""
    b, c, height, width = images.shape
    if b == 0:
        return images.clone()
    kernels = _gaussian_kernels(sigma.to(images.device, images.dtype), kernel_size)
    kernels = kernels.repeat_interleave(c, dim=0)  # (B*C, k): one kernel per group
    pad = kernel_size // 2
    x = F.pad(images.reshape(1, b * c, height, width), [pad] * 4, mode="reflect")
    x = F.conv2d(x, kernels.view(b * c, 1, 1, kernel_size), groups=b * c)
    x = F.conv2d(x, kernels.view(b * c, 1, kernel_size, 1), groups=b * c)
    return x.view(b, c, height, width)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur each sample of ``images`` ``(B, C, H, W)`` with its own ``sigma`` ``(B,)``
    (pixels) and ``kernel_size`` taps: v2's gaussian_blur per sample (reflect padding).

    The 2-D Gaussian is separable, so it is two 1-D passes: on the CPU
    :func:`shifted_gaussian_blur` (several times faster there, ``bench/blur.py``), elsewhere
    :func:`depthwise_gaussian_blur`.
    """
    if images.device.type == "cpu":
        return shifted_gaussian_blur(images, sigma, kernel_size)
    return depthwise_gaussian_blur(images, sigma, kernel_size)
