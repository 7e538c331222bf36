"""Tests for wcl.data.batch_augment: each op against torchvision.transforms.v2.functional,
determinism and batch-composition independence, parameter distributions, real fixtures."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torchvision import transforms as v1
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from wcl.data import (
    DATASET_STATS,
    BatchAugment,
    batch_augment,
    batch_ops,
    batch_strong_pipeline,
    batch_weak_pipeline,
    blur_kernel_size,
    decode_image,
    load_fashion_mnist,
    sample_seed,
    strong_pipeline,
    two_view_seeds,
    weak_pipeline,
)
from wcl.data.augment import GaussianBlur
from wcl.data.batch_augment import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    colour_jitter,
    crop_params,
    hflip,
    random_grayscale,
    resized_crop,
)
from wcl.data.batch_ops import depthwise_gaussian_blur, shifted_gaussian_blur
from wcl.data.seeds import uniforms

FIXTURES = Path(__file__).parent / "fixtures"
FASHION_IDX = FIXTURES / "fashion-idx"
PHOTOS = FIXTURES / "photos"
FM_MEAN, FM_STD = DATASET_STATS["fashion_mnist"]
RGB_MEAN, RGB_STD = DATASET_STATS["imagenet"]

# Ops that torchvision computes with the same arithmetic agree to float32 rounding of values
# in [0, 1] after a handful of operations.
TIGHT = 1e-6
# Interpolation and the hue conversion reach the same values by a different sequence of
# float32 operations (roi_align's sample coordinates, the branch-free hexcone), which moves
# results by a few ulps of 1.
LOOSE = 1e-5


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tensors here are tiny; on a shared 2-core machine thread hand-offs cost more than they
    save, and single-threaded kernels give the same numbers on every run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rand_images(b: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Float images in [0, 1], ``(b, c, h, w)``, from their own generator."""
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def rand_uint8(b: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), generator=gen, dtype=torch.uint8)


def per_sample(fn, images: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """torchvision's per-image ``fn(image, value)`` over a batch."""
    return torch.stack([fn(img, float(v)) for img, v in zip(images, values, strict=True)])


def fashion_fixture() -> torch.Tensor:
    return load_fashion_mnist(root=FASHION_IDX).images  # (300, 1, 28, 28) uint8


def photo_fixture(side: int = 64) -> torch.Tensor:
    """The fixture photos centre-cropped to ``side`` pixels, uint8 ``(6, 3, side, side)``."""
    paths = sorted(p for p in PHOTOS.iterdir() if p.suffix in (".png", ".jpg"))
    return torch.stack([TF.center_crop(decode_image(p, channels=3), [side, side]) for p in paths])


# ------------------------------------------------------------------ ops against torchvision


@pytest.mark.parametrize("size", [20, 48])  # downscale and upscale of 24 x 32 images
def test_resized_crop_matches_torchvision_where_sampling_agrees(size: int) -> None:
    images = rand_images(6, 3, 24, 32)
    # Boxes touching all four edges, touching two, and strictly inside the image.
    crops = torch.tensor(
        [
            [0, 0, 24, 32],
            [0, 0, 24, 20],
            [0, 0, 12, 12],
            [12, 20, 12, 12],
            [3, 5, 9, 7],
            [5, 2, 17, 25],
        ]
    )
    ours = resized_crop(images, crops, size, antialias=False)
    assert ours.shape == (6, 3, size, size)
    for img, out, (top, left, h, w) in zip(images, ours, crops.tolist(), strict=True):
        ref = TF.resized_crop(img, top, left, h, w, [size, size], antialias=False)
        # Source coordinate (crop pixels) of each output pixel, as resize computes it.
        sy = (torch.arange(size) + 0.5) * h / size - 0.5
        sx = (torch.arange(size) + 0.5) * w / size - 0.5
        # roi_align samples the real image, so where a sample point lies within half a pixel
        # outside the crop's pixel centres it blends in the neighbouring pixel beyond the crop;
        # resize of the cropped image repeats the edge pixel. At an image edge both clamp.
        inside_y = ((sy >= 0) | (top == 0)) & ((sy <= h - 1) | (top + h == 24))
        inside_x = ((sx >= 0) | (left == 0)) & ((sx <= w - 1) | (left + w == 32))
        mask = inside_y[:, None] & inside_x[None, :]
        torch.testing.assert_close(out[:, mask], ref[:, mask], atol=LOOSE, rtol=0)
        if h >= size and w >= size:  # downscale: every sample point is inside the crop
            assert bool(mask.all())


def test_resized_crop_antialias_close_to_torchvision_on_photos() -> None:
    images = photo_fixture(64).float() / 255
    crops = torch.tensor([[0, 0, 64, 64], [8, 4, 48, 56], [10, 10, 40, 40]] * 2)
    ours = resized_crop(images, crops, 20, antialias=True)
    plain = resized_crop(images, crops, 20, antialias=False)
    ref = torch.stack(
        [
            TF.resized_crop(img, *box, [20, 20], antialias=True)
            for img, box in zip(images, crops.tolist(), strict=True)
        ]
    )
    # A box filter is not torchvision's triangle filter, but on real photos it lands much
    # closer to it than plain bilinear sampling does.
    err = (ours - ref).abs().mean().item()
    assert err < 0.02
    assert err < 0.6 * (plain - ref).abs().mean().item()


def test_flip_matches_torchvision() -> None:
    images = rand_images(4, 3, 8, 10)
    flags = torch.tensor([True, False, True, False])
    ref = torch.stack(
        [TF.horizontal_flip(x) if f else x for x, f in zip(images, flags, strict=True)]
    )
    assert torch.equal(hflip(images, flags), ref)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (adjust_brightness, TF.adjust_brightness),
        (adjust_contrast, TF.adjust_contrast),
        (adjust_saturation, TF.adjust_saturation),
    ],
)
def test_blend_ops_match_torchvision(ours, theirs, channels: int) -> None:
    images = rand_images(8, channels, 12, 10)
    factors = torch.linspace(0.0, 1.8, 8)  # includes 0 and > 1, where clamping matters
    torch.testing.assert_close(
        ours(images, factors), per_sample(theirs, images, factors), atol=TIGHT, rtol=0
    )


def test_hue_matches_torchvision() -> None:
    smooth = rand_images(8, 3, 16, 16)
    # Quarter steps: many grey pixels, ties for the largest channel and sector boundaries.
    steps = (rand_images(8, 3, 16, 16, seed=1) * 4).round() / 4
    shifts = torch.linspace(-0.5, 0.5, 8)
    for images in (smooth, steps):
        ours = adjust_hue(images, shifts)
        torch.testing.assert_close(
            ours, per_sample(TF.adjust_hue, images, shifts), atol=LOOSE, rtol=0
        )
    ones = rand_images(2, 1, 5, 5)
    assert torch.equal(adjust_hue(ones, torch.tensor([0.3, -0.2])), ones)


def test_grayscale_matches_torchvision() -> None:
    images = rand_images(4, 3, 9, 7)
    flags = torch.tensor([True, False, False, True])
    ref = torch.stack(
        [
            TF.rgb_to_grayscale(x, num_output_channels=3) if f else x
            for x, f in zip(images, flags, strict=True)
        ]
    )
    torch.testing.assert_close(random_grayscale(images, flags), ref, atol=TIGHT, rtol=0)


BLURS = [shifted_gaussian_blur, depthwise_gaussian_blur]  # the CPU one, the device one


def truncation_bound(blur, sigma: torch.Tensor, k: int) -> float:
    """How far the shifted blur may be from the full k-tap one on images in [0, 1]: the
    Gaussian weight beyond ceil(4 sigma) taps that it skips (written out here), per pass;
    two passes give (1 - (1 - d)^2) = 2d - d^2 at most. 0 for the full depthwise blur."""
    if blur is depthwise_gaussian_blur:
        return 0.0
    worst = 0.0
    for s in sigma.double().tolist():
        taps = [t - k // 2 for t in range(k)]
        weights = [math.exp(-0.5 * (t / s) ** 2) for t in taps]
        dropped = sum(w for t, w in zip(taps, weights, strict=True) if abs(t) > math.ceil(4 * s))
        worst = max(worst, dropped / sum(weights))
    return 2 * worst + worst**2


@pytest.mark.parametrize("blur", BLURS)
@pytest.mark.parametrize(
    ("channels", "size", "k"),
    [(1, 28, None), (3, 32, None), (3, 64, None), (3, 224, None), (1, 5, 9), (3, 2, 3)],
)
def test_blur_matches_torchvision(blur, channels: int, size: int, k: int | None) -> None:
    """Including kernels wider than the image (9 taps on 5 px) and 2 px images."""
    k = k or blur_kernel_size(size)
    images = rand_images(6, channels, size, size)
    sigma = torch.linspace(0.1, 2.0, 6)
    ref = torch.stack(
        [TF.gaussian_blur(x, [k, k], [float(s)]) for x, s in zip(images, sigma, strict=True)]
    )
    # k products summed in another order: float32 rounding grows with the kernel a little.
    atol = 2 * TIGHT + truncation_bound(blur, sigma, k)
    assert atol < 1e-4  # far below one uint8 step (3.9e-3)
    torch.testing.assert_close(blur(images, sigma, k), ref, atol=atol, rtol=0)


def test_shifted_blur_skips_only_the_far_tail() -> None:
    """The truncation is real (the 224 px case differs from the full blur by more than
    rounding) and bounded: the bound above is not loose by orders of magnitude."""
    images = rand_images(4, 3, 64, 64)
    sigma = torch.tensor([2.0, 2.0, 2.0, 2.0])
    full = depthwise_gaussian_blur(images, sigma, 23)
    diff = (shifted_gaussian_blur(images, sigma, 23) - full).abs().max().item()
    bound = truncation_bound(shifted_gaussian_blur, sigma, 23)
    assert 10 * TIGHT < diff <= bound + 2 * TIGHT and bound < 100 * diff


def test_shifted_blur_chunks_by_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """Samples are blurred a few at a time, each chunk with as many taps as its widest
    Gaussian needs: one sample per chunk against the whole batch in one."""
    images = rand_images(9, 3, 40, 40)
    sigma = torch.linspace(0.1, 2.0, 9)
    ref = depthwise_gaussian_blur(images, sigma, 23)
    whole = shifted_gaussian_blur(images, sigma, 23)
    monkeypatch.setattr(batch_ops, "_BLUR_CHUNK_ELEMENTS", images[0].numel())
    one_by_one = shifted_gaussian_blur(images, sigma, 23)
    atol = 2 * TIGHT + truncation_bound(shifted_gaussian_blur, sigma, 23)
    torch.testing.assert_close(whole, ref, atol=atol, rtol=0)
    torch.testing.assert_close(one_by_one, ref, atol=atol, rtol=0)
    # Alone, sigma 1.05 (row 4) takes 5 taps each side, not the batch's 8.
    assert not torch.equal(whole[4], one_by_one[4])


@pytest.mark.parametrize("blur", BLURS)
def test_blur_on_non_square_images(blur) -> None:
    images = rand_images(3, 3, 17, 40)
    sigma = torch.tensor([0.3, 1.0, 2.0])
    ref = torch.stack(
        [TF.gaussian_blur(x, [7, 7], [float(s)]) for x, s in zip(images, sigma, strict=True)]
    )
    torch.testing.assert_close(blur(images, sigma, 7), ref, atol=TIGHT, rtol=0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_per_image_blur_draws_sigma_like_torchvision(dtype: torch.dtype) -> None:
    """wcl's GaussianBlur transform against v2.GaussianBlur under the same global seed:
    same sigma draw, same pixels (uint8: off by at most one rounding step)."""
    image = (torch.rand(3, 48, 40) * 255).to(dtype)
    torch.manual_seed(5)
    ours = GaussianBlur(5)(image)
    torch.manual_seed(5)
    ref = v2.GaussianBlur(5, sigma=(0.1, 2.0))(image)
    assert ours.dtype == dtype
    atol = 1 if dtype == torch.uint8 else 1e-4  # float pixels here span 0-255
    torch.testing.assert_close(ours.float(), ref.float(), atol=atol, rtol=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_colour_jitter_applies_each_samples_own_order(channels: int) -> None:
    images = rand_images(24, channels, 10, 12)
    gen = torch.Generator().manual_seed(3)
    factors = torch.rand(24, 4, generator=gen) * 1.6 + 0.2
    factors[:, HUE] = torch.rand(24, generator=gen) - 0.5
    order = torch.stack([torch.randperm(4, generator=gen) for _ in range(24)])
    apply = torch.arange(24) % 5 != 0
    ops = {
        BRIGHTNESS: TF.adjust_brightness,
        CONTRAST: TF.adjust_contrast,
        SATURATION: TF.adjust_saturation,
        HUE: TF.adjust_hue,
    }
    refs = []
    for x, f, o, a in zip(images, factors, order.tolist(), apply, strict=True):
        for op in o if a else []:
            x = ops[op](x, float(f[op]))
        refs.append(x)
    ours = colour_jitter(images, factors, order, apply)
    torch.testing.assert_close(ours, torch.stack(refs), atol=LOOSE, rtol=0)


@pytest.mark.parametrize("build", [batch_weak_pipeline, batch_strong_pipeline])
@pytest.mark.parametrize("channels", [1, 3])
def test_apply_equals_the_torchvision_composition(build, channels: int) -> None:
    """Fixed parameters through the whole module against v2.functional ops on float images."""
    mean, std = (FM_MEAN, FM_STD) if channels == 1 else (RGB_MEAN, RGB_STD)
    aug = build(24, mean, std, antialias=False)
    images = rand_uint8(16, channels, 32, 32)
    params = aug.sample_params(torch.arange(16) + 100, 32, 32)
    # Crops that downscale (or touch every image edge) sample exactly as resize does.
    params["crop"] = torch.tensor([[0, 0, 32, 32], [4, 6, 26, 24], [0, 0, 24, 24], [8, 8, 24, 24]])
    params["crop"] = params["crop"].repeat(4, 1)
    params["jitter"][:4] = True  # make sure every path runs at least once
    params["blur"][:2] = True
    ours = aug.apply(images, params)

    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    keys = ["brightness", "contrast", "saturation", "hue"]
    k = blur_kernel_size(24)
    for b in range(16):
        x = images[b].float() / 255
        x = TF.resized_crop(x, *params["crop"][b].tolist(), [24, 24], antialias=False)
        if params["flip"][b]:
            x = TF.horizontal_flip(x)
        if params["jitter"][b]:
            for op in params["order"][b].tolist():
                x = ops[op](x, float(params[keys[op]][b]))
        if params["grayscale"][b]:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if params["blur"][b]:
            x = TF.gaussian_blur(x, [k, k], [float(params["sigma"][b])])
        ref = TF.normalize(x, list(mean), list(std))
        torch.testing.assert_close(ours[b], ref, atol=LOOSE / min(std), rtol=0)


# ------------------------------------------------------------------ determinism


def test_same_seeds_give_identical_output() -> None:
    aug = batch_strong_pipeline(32, RGB_MEAN, RGB_STD)
    images = rand_uint8(16, 3, 32, 32)
    seeds, _ = two_view_seeds(0, 0, range(16))
    assert torch.equal(aug(images, seeds), aug(images, seeds))
    assert not torch.equal(aug(images, seeds), aug(images, seeds + 1))


@pytest.mark.parametrize("channels", [1, 3])
def test_output_independent_of_batch_composition(channels: int) -> None:
    mean, std = (FM_MEAN, FM_STD) if channels == 1 else (RGB_MEAN, RGB_STD)
    aug = batch_strong_pipeline(28, mean, std)
    images = rand_uint8(64, channels, 28, 28, seed=5)
    seeds, _ = two_view_seeds(7, 2, range(64))
    full = aug(images, seeds)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    shuffled = aug(images[perm], seeds[perm])
    # Different batch shapes may pick different (but equally exact) conv kernels: allow
    # float32 rounding, nothing more.
    torch.testing.assert_close(shuffled, full[perm], atol=TIGHT, rtol=0)
    for i in (0, 17, 63):
        alone = aug(images[i : i + 1], seeds[i : i + 1])
        torch.testing.assert_close(alone[0], full[i], atol=TIGHT, rtol=0)


def test_cpu_chunks_do_not_change_the_views(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU BatchAugment works a few samples at a time: one sample per chunk against
    the whole batch in one gives the same views, up to the blur's skipped far tail."""
    aug = batch_strong_pipeline(64, RGB_MEAN, RGB_STD)
    images = rand_uint8(12, 3, 80, 72, seed=2)
    seeds, _ = two_view_seeds(3, 1, range(12))
    monkeypatch.setattr(batch_augment, "_CPU_CHUNK_ELEMENTS", 2**30)
    whole = aug(images, seeds)
    monkeypatch.setattr(batch_augment, "_CPU_CHUNK_ELEMENTS", 1)
    one_by_one = aug(images, seeds)
    sigma = aug.sample_params(seeds, 80, 72)["sigma"]
    bound = truncation_bound(shifted_gaussian_blur, sigma, aug.kernel_size)
    torch.testing.assert_close(one_by_one, whole, atol=(bound + 2 * TIGHT) / min(RGB_STD), rtol=0)


def test_empty_batch_gives_empty_views() -> None:
    aug = batch_strong_pipeline(32, RGB_MEAN, RGB_STD)
    views = aug(torch.zeros(0, 3, 40, 40, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
    assert views.shape == (0, 3, 32, 32) and views.dtype == torch.float32
    for blur in BLURS:
        assert blur(torch.zeros(0, 3, 8, 8), torch.zeros(0), 3).shape == (0, 3, 8, 8)


def test_params_depend_only_on_the_seed() -> None:
    aug = batch_weak_pipeline(32, RGB_MEAN, RGB_STD)
    seeds = torch.tensor([5, -3, 2**62, -(2**63), 0, 123456789])
    together = aug.sample_params(seeds, 40, 30)
    for i, seed in enumerate(seeds.tolist()):
        alone = aug.sample_params(torch.tensor([seed]), 40, 30)
        for key, value in together.items():
            assert torch.equal(alone[key][0], value[i]), key


def test_two_view_seeds() -> None:
    view1, view2 = two_view_seeds(3, 1, [4, 9, 4])
    assert view1.dtype == view2.dtype == torch.int64 and view1.shape == (3,)
    assert bool((view1 != view2).all())
    assert view1[0] == view1[2] and view2[0] == view2[2]  # a function of the index alone
    again1, again2 = two_view_seeds(3, 1, torch.tensor([9]))
    assert again1[0] == view1[1] and again2[0] == view2[1]
    other1, _ = two_view_seeds(3, 2, [4])
    assert other1[0] != view1[0]  # a new epoch, new augmentations
    # No two (seed, epoch, index, view) of a grid share a seed.
    grid = [torch.cat(two_view_seeds(s, e, range(1000))) for s in (0, 1, -1) for e in range(4)]
    assert len(set(torch.cat(grid).tolist())) == 3 * 4 * 2 * 1000


def splitmix64_outputs(seed: int, count: int) -> list[int]:
    """SplitMix64 written out with Python integers (Steele, Lea & Flood 2014)."""
    mask, state, out = 2**64 - 1, seed % 2**64, []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return out


def test_uniforms_are_splitmix64_per_seed() -> None:
    """Each row is the seed's own SplitMix64 stream (53 high bits over 2**53), whatever
    else is in the batch; and the values look uniform."""
    seeds = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63), 123456789])
    u = uniforms(seeds, 35)
    for row, seed in enumerate(seeds.tolist()):
        expected = [(z >> 11) / 2**53 for z in splitmix64_outputs(seed, 35)]
        assert u[row].tolist() == expected
    many = uniforms(two_view_seeds(0, 0, range(4000))[0], 35)
    assert many.min() >= 0 and many.max() < 1
    assert abs(many.mean().item() - 0.5) < 0.005
    # 595 column pairs, each correlation ~ N(0, 1/4000): all within 5 standard deviations.
    assert torch.corrcoef(many.T).fill_diagonal_(0).abs().max() < 5 / math.sqrt(4000)


# ------------------------------------------------------------------ distributions

N_SEEDS = 4000


def assert_rate(flags: torch.Tensor, p: float) -> None:
    """Binomial rate within 4 standard deviations."""
    n = flags.numel()
    assert abs(flags.float().mean().item() - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-12


def assert_same_mean(a: torch.Tensor, b: torch.Tensor) -> None:
    """Means of two independent samples within 4 standard errors of their difference."""
    a, b = a.double(), b.double()
    se = math.sqrt(a.var().item() / len(a) + b.var().item() / len(b))
    assert abs(a.mean().item() - b.mean().item()) <= 4 * se


@pytest.mark.parametrize(("height", "width", "min_scale"), [(28, 28, 0.08), (24, 40, 0.2)])
def test_crop_distribution_matches_random_resized_crop(
    height: int, width: int, min_scale: float
) -> None:
    aug = batch_strong_pipeline(16, FM_MEAN, FM_STD, min_scale=min_scale)
    crops = aug.sample_params(torch.arange(N_SEEDS), height, width)["crop"].double()
    top, left, h, w = crops.unbind(1)
    assert bool(((top >= 0) & (left >= 0) & (h >= 1) & (w >= 1)).all())
    assert bool(((top + h <= height) & (left + w <= width)).all())
    # Area in [min_scale, 1] of the image, up to the rounding of w and h to whole pixels.
    assert bool(((h + 0.5) * (w + 0.5) >= min_scale * height * width).all())
    assert bool((h * w <= height * width).all())

    torch.manual_seed(0)
    dummy = torch.empty(1, height, width)
    ref = torch.tensor(
        [
            v1.RandomResizedCrop.get_params(dummy, [min_scale, 1.0], [3 / 4, 4 / 3])
            for _ in range(N_SEEDS)
        ],
        dtype=torch.float64,
    )
    area, ref_area = h * w / (height * width), ref[:, 2] * ref[:, 3] / (height * width)
    assert_same_mean(area, ref_area)
    assert_same_mean(torch.log(w / h), torch.log(ref[:, 3] / ref[:, 2]))
    assert_same_mean(top + h / 2, ref[:, 0] + ref[:, 2] / 2)  # crop centres
    assert_same_mean(left + w / 2, ref[:, 1] + ref[:, 3] / 2)


def test_crop_fallback_is_torchvisions_central_crop() -> None:
    # Full area at the largest aspect ratio never fits a square or a wide image in 10 tries.
    u_fail = torch.ones(2, 10) - 1e-9
    half = torch.full((2,), 0.5)
    square = crop_params(u_fail, u_fail, half, half, 30, 30, (0.08, 1.0))
    assert square.tolist() == [[0, 0, 30, 30]] * 2
    wide = crop_params(u_fail, u_fail, half, half, 24, 40, (0.08, 1.0))
    assert wide.tolist() == [[0, 4, 24, 32]] * 2  # (top, left, h, w): h = 24, w = 24 * 4/3


@pytest.mark.parametrize(
    ("build", "strength", "blur_prob"),
    [(batch_weak_pipeline, (0.4, 0.1), 0.5), (batch_strong_pipeline, (0.8, 0.2), 0.3)],
)
def test_random_decisions_and_factor_ranges(build, strength, blur_prob: float) -> None:
    aug = build(32, RGB_MEAN, RGB_STD, blur_prob=blur_prob)
    p = aug.sample_params(torch.arange(N_SEEDS) * 7919 - 10**6, 32, 32)
    assert_rate(p["flip"], 0.5)
    assert_rate(p["jitter"], 0.8)
    assert_rate(p["grayscale"], 0.2)
    assert_rate(p["blur"], blur_prob)
    s, h = strength
    on = p["jitter"]
    for key in ("brightness", "contrast", "saturation"):
        values = p[key][on]
        assert values.min() >= 1 - s and values.max() <= 1 + s
        assert_same_mean(values, torch.rand(N_SEEDS) * 2 * s + 1 - s)
        assert bool((p[key][~on] == 1).all())
    assert p["hue"][on].abs().max() <= h and bool((p["hue"][~on] == 0).all())
    assert p["sigma"].min() >= 0.1 and p["sigma"].max() <= 2.0
    assert_same_mean(p["sigma"], torch.rand(N_SEEDS) * 1.9 + 0.1)
    order = p["order"]
    assert bool((order.sort(dim=1).values == torch.arange(4)).all())  # permutations
    for op in range(4):
        assert_rate(order[:, 0] == op, 0.25)
        assert_rate(order[:, 3] == op, 0.25)


def test_one_channel_has_only_brightness_and_contrast() -> None:
    aug = batch_strong_pipeline(28, FM_MEAN, FM_STD)
    p = aug.sample_params(torch.arange(500), 28, 28)
    assert not p["grayscale"].any()
    assert bool((p["saturation"] == 1).all() and (p["hue"] == 0).all())
    assert (p["brightness"] != 1).any() and (p["contrast"] != 1).any()


def test_disabled_jitter_and_blur() -> None:
    aug = batch_weak_pipeline(32, RGB_MEAN, RGB_STD, jitter=0.0, blur_prob=0.0)
    p = aug.sample_params(torch.arange(500), 32, 32)
    assert not p["jitter"].any() and not p["blur"].any()
    with pytest.raises(ValueError, match="jitter"):
        batch_weak_pipeline(32, RGB_MEAN, RGB_STD, jitter=-1.0)


# ------------------------------------------------------------------ outputs on real images


@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_dtype_and_normalisation(channels: int) -> None:
    mean, std = (FM_MEAN, FM_STD) if channels == 1 else (RGB_MEAN, RGB_STD)
    # Without jitter or blur a constant image stays constant: the output is its normalisation.
    plain = batch_weak_pipeline(20, mean, std, jitter=0.0, blur_prob=0.0)
    images = torch.full((5, channels, 28, 28), 200, dtype=torch.uint8)
    images[:, :, :, :] = torch.tensor([200, 30, 90][:channels], dtype=torch.uint8).view(-1, 1, 1)
    out = plain(images, torch.arange(5))
    assert out.dtype == torch.float32 and out.shape == (5, channels, 20, 20)
    expected = (images[0, :, 0, 0].double() / 255 - torch.tensor(mean)) / torch.tensor(std)
    if channels == 3:  # random greyscale mixes the channels of the greyed samples
        grey = plain.sample_params(torch.arange(5), 28, 28)["grayscale"]
        out = out[~grey]
    torch.testing.assert_close(
        out, expected.float().view(1, -1, 1, 1).expand_as(out), atol=1e-5, rtol=0
    )

    full = batch_strong_pipeline(20, mean, std)(rand_uint8(32, channels, 28, 28), torch.arange(32))
    low = (0 - torch.tensor(mean)) / torch.tensor(std)
    high = (1 - torch.tensor(mean)) / torch.tensor(std)
    assert bool(torch.isfinite(full).all())
    assert bool((full >= low.view(1, -1, 1, 1) - 1e-5).all())
    assert bool((full <= high.view(1, -1, 1, 1) + 1e-5).all())


def per_image_views(pipeline, images: torch.Tensor, repeats: int) -> torch.Tensor:
    """The per-image v2 pipeline, ``repeats`` draws per image, seeded like TwoViews."""
    views = []
    with torch.random.fork_rng(devices=[]):
        for r in range(repeats):
            for i, image in enumerate(images):
                torch.default_generator.manual_seed(sample_seed(1, r, i))
                views.append(pipeline(image))
    return torch.stack(views)


def batch_views(aug: BatchAugment, images: torch.Tensor, repeats: int) -> torch.Tensor:
    return torch.cat(
        [aug(images, two_view_seeds(2, r, range(len(images)))[0]) for r in range(repeats)]
    )


@pytest.mark.parametrize("strong", [False, True])
def test_fashion_fixture_matches_per_image_pipeline_statistics(strong: bool) -> None:
    images = fashion_fixture()[:100]
    per_image = (strong_pipeline if strong else weak_pipeline)(28, FM_MEAN, FM_STD)
    batched = (batch_strong_pipeline if strong else batch_weak_pipeline)(28, FM_MEAN, FM_STD)
    ours = batch_views(batched, images, 4)
    ref = per_image_views(per_image, images, 4)
    assert ours.shape == ref.shape == (400, 1, 28, 28) and ours.dtype == ref.dtype
    # Per-view mean (brightness, crop), spread (contrast, blur) and centre-of-mass offset
    # (crop position, flip) follow the same distributions.
    assert_same_mean(ours.mean(dim=(1, 2, 3)), ref.mean(dim=(1, 2, 3)))
    assert_same_mean(ours.std(dim=(1, 2, 3)), ref.std(dim=(1, 2, 3)))
    cols = torch.arange(28.0).view(1, 1, 1, 28)
    ink_ours, ink_ref = (
        ours - ours.amin(dim=(2, 3), keepdim=True),
        ref - ref.amin(dim=(2, 3), keepdim=True),
    )
    assert_same_mean(
        (ink_ours * cols).sum(dim=(1, 2, 3)) / ink_ours.sum(dim=(1, 2, 3)).clamp(min=1e-6),
        (ink_ref * cols).sum(dim=(1, 2, 3)) / ink_ref.sum(dim=(1, 2, 3)).clamp(min=1e-6),
    )


@pytest.mark.parametrize("size", [32, 48])
def test_photo_fixture_matches_per_image_pipeline_statistics(size: int) -> None:
    images = photo_fixture(64)
    batched = batch_strong_pipeline(size, RGB_MEAN, RGB_STD)
    ours = batch_views(batched, images, 40)
    ref = per_image_views(strong_pipeline(size, RGB_MEAN, RGB_STD), images, 40)
    assert ours.shape == ref.shape == (240, 3, size, size)
    assert bool(torch.isfinite(ours).all())
    assert_same_mean(ours.mean(dim=(1, 2, 3)), ref.mean(dim=(1, 2, 3)))
    assert_same_mean(ours.std(dim=(1, 2, 3)), ref.std(dim=(1, 2, 3)))
    # Colour spread between channels (saturation, greyscale, hue).
    assert_same_mean(ours.std(dim=1).mean(dim=(1, 2)), ref.std(dim=1).mean(dim=(1, 2)))


def test_rejects_bad_inputs() -> None:
    aug = batch_weak_pipeline(16, RGB_MEAN, RGB_STD)
    with pytest.raises(TypeError, match="uint8"):
        aug(torch.rand(2, 3, 16, 16), torch.arange(2))
    with pytest.raises(ValueError, match="channels"):
        aug(rand_uint8(2, 1, 16, 16), torch.arange(2))
    with pytest.raises(ValueError, match="seeds"):
        aug(rand_uint8(2, 3, 16, 16), torch.arange(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    aug = batch_strong_pipeline(32, RGB_MEAN, RGB_STD)
    images = rand_uint8(64, 3, 32, 32)
    seeds, _ = two_view_seeds(0, 0, range(64))
    cpu = aug(images, seeds)
    gpu = aug.to("cuda")(images.cuda(), seeds)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


def test_views_stay_float32_under_autocast(monkeypatch):
    """A caller's autocast (bf16 here) leaves the views exactly as without it. On a GPU the
    blur is convolutions, which autocast would run in bf16 and then fail to copy back
    into the float32 batch (found by the first bench/gpu.py run): the CPU stands in,
    with the GPU's blur."""
    from wcl.data import batch_augment
    from wcl.data.batch_ops import depthwise_gaussian_blur

    monkeypatch.setattr(batch_augment, "gaussian_blur", depthwise_gaussian_blur)
    aug = batch_strong_pipeline(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), blur_prob=1.0)
    images = torch.randint(0, 256, (6, 3, 40, 36), dtype=torch.uint8)
    seeds = torch.arange(6) + 11
    plain = aug(images, seeds)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = aug(images, seeds)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, plain)
