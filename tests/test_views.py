"""Where the two views are made (data.augment loader / batch / hybrid), and that the
hybrid split (crops in the workers, the rest on the device) is the batched pipeline."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as v1
from torchvision.transforms.v2 import functional as TF

from wcl.data import batch_weak_pipeline, sample_seed, strong_pipeline
from wcl.data.seeds import two_view_seeds, view_seeds
from wcl.data.views import TrainingViews

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
RATIO = [3 / 4, 4 / 3]


class Images(Dataset):
    """uint8 images of any sizes with targets ``index % 3``."""

    def __init__(self, images: list[torch.Tensor]) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], index % 3


def random_images(count: int, sizes: list[tuple[int, int]], channels: int = 3) -> list:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randint(0, 256, (channels, *sizes[i % len(sizes)]), generator=gen, dtype=torch.uint8)
        for i in range(count)
    ]


def views(base: Dataset, mode: str, size: int, min_scale: float = 0.3, **kw) -> TrainingViews:
    options = {"jitter": 1.0, "blur_prob": 0.5, "seed": 7} | kw
    return TrainingViews(base, mode, size, MEAN, STD, weak_min_scale=min_scale,
                         strong_min_scale=min_scale, **options)  # fmt: skip


def first_batch(v: TrainingViews, workers: int = 0, batch: int = 8):
    loaded = next(iter(DataLoader(v.dataset, batch_size=batch, num_workers=workers)))
    return v.make(loaded, torch.device("cpu"))


@pytest.mark.parametrize("strong", [False, True])
def test_hybrid_equals_batch_when_the_crop_is_the_whole_image(strong: bool) -> None:
    """With crop scale 1 on square images both crop steps return the image itself, so
    hybrid (v2 crop per image, then the batched rest) and batch (all on the batch) must
    give the same views: flip, jitter, greyscale and blur come from the same seeds."""
    base = Images(random_images(16, [(24, 24)]))
    hybrid, batch = views(base, "hybrid", 24, 1.0), views(base, "batch", 24, 1.0)
    for v in (hybrid, batch):
        v.set_epoch(3, strong=strong)
    h1, h2, h_targets, _ = first_batch(hybrid, batch=16)
    b1, b2, b_targets, _ = first_batch(batch, batch=16)
    torch.testing.assert_close(h1, b1, atol=1e-5, rtol=0)
    torch.testing.assert_close(h2, b2, atol=1e-5, rtol=0)
    assert torch.equal(h_targets, b_targets)
    assert not torch.allclose(h1, h2)  # the two views differ


def test_hybrid_crops_are_the_per_image_crops_then_the_batched_rest() -> None:
    """Images of different sizes: the loader yields uint8 crops at the output size, and
    make() applies BatchAugment's remaining steps to exactly those crops."""
    base = Images(random_images(6, [(40, 64), (50, 30), (33, 33)]))
    v = views(base, "hybrid", 20)
    v.set_epoch(1, strong=True)
    loaded = next(iter(DataLoader(v.dataset, batch_size=6)))
    crops1, crops2, targets, indices = loaded
    assert crops1.dtype == torch.uint8 and crops1.shape == (6, 3, 20, 20)
    assert indices.tolist() == list(range(6)) and targets.tolist() == [0, 1, 2, 0, 1, 2]
    x1, x2, _, _ = v.make(loaded, torch.device("cpu"))
    seeds1, seeds2 = two_view_seeds(7, 1, indices)
    aug = v.phases[1]
    torch.testing.assert_close(x1, aug.apply(crops1, aug.sample_params(seeds1, 20, 20), False))
    torch.testing.assert_close(x2, aug.apply(crops2, aug.sample_params(seeds2, 20, 20), False))
    # A crop of each source image: scaled down (mean brightness kept within rounding).
    for crop, index in zip(crops1, indices, strict=True):
        assert abs(crop.float().mean() - base.images[index].float().mean()) < 40


@pytest.mark.parametrize("mode", ["loader", "batch", "hybrid"])
def test_views_depend_only_on_seed_epoch_index(mode: str) -> None:
    """Same batch with 0 or 2 workers; another epoch, another augmentation."""
    base = Images(random_images(12, [(28, 28)]))
    v = views(base, mode, 28)
    v.set_epoch(2, strong=False)
    a1, a2, _, _ = first_batch(v, workers=0)
    b1, b2, _, _ = first_batch(v, workers=2)
    torch.testing.assert_close(a1, b1, atol=0, rtol=0)
    torch.testing.assert_close(a2, b2, atol=0, rtol=0)
    v.set_epoch(3, strong=False)
    c1, _, _, _ = first_batch(v, workers=0)
    assert not torch.equal(a1, c1)


def test_weak_and_strong_phases_use_their_own_crop_scale() -> None:
    """Warm-up crops (scale >= 0.9) keep most of the image; strong ones (0.05) zoom in."""
    image = torch.zeros(1, 64, 64, dtype=torch.uint8)
    image[:, :, 32:] = 255  # left half black, right half white
    base = Images([image] * 64)
    v = TrainingViews(base, "hybrid", 16, (0.5,), (0.5,), weak_min_scale=0.9,
                      strong_min_scale=0.05, jitter=0.0, blur_prob=0.0, seed=0)  # fmt: skip

    def mixed_fraction(strong: bool) -> float:
        v.set_epoch(0, strong=strong)
        crops = next(iter(DataLoader(v.dataset, batch_size=64)))[0].float()
        # A crop holding both halves has a column mean strictly between black and white.
        spans = (crops.amin(dim=(1, 2, 3)) < 128) & (crops.amax(dim=(1, 2, 3)) > 128)
        return spans.float().mean().item()

    assert mixed_fraction(strong=False) == 1.0  # a 90%-area crop always spans the middle
    assert mixed_fraction(strong=True) < 0.9


def test_bad_mode_and_uncropped_images_are_refused() -> None:
    base = Images(random_images(2, [(8, 8)]))
    with pytest.raises(ValueError, match="augment mode"):
        views(base, "gpu", 8)
    v = views(base, "hybrid", 8)
    with pytest.raises(ValueError, match="crop=False needs 8 x 8"):
        v.phases[0](torch.zeros(2, 3, 9, 9, dtype=torch.uint8), torch.tensor([1, 2]), False)


def test_hybrid_crop_matches_v2_resized_crop() -> None:
    """The worker-side crop is torchvision's RandomResizedCrop (antialiased), as the
    per-image pipeline's: replaying its draw under the same seed gives the same pixels."""
    base = Images(random_images(3, [(45, 70)]))
    v = views(base, "hybrid", 16)
    v.set_epoch(4, strong=False)
    crop1 = v.dataset[2][0]
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(sample_seed(7, 4, 2))
        top, left, h, w = v1.RandomResizedCrop.get_params(base.images[2], [0.3, 1.0], RATIO)
    expected = TF.resized_crop(base.images[2], top, left, h, w, [16, 16], antialias=True)
    assert torch.equal(crop1, expected)


# --------------------------------------------------------------------------- multi-crop


def multicrop(base: Dataset, mode: str, size: int = 20, **kw) -> TrainingViews:
    return views(base, mode, size, small_crops=3, small_size=8, small_scale=(0.1, 0.3), **kw)


@pytest.mark.parametrize("mode", ["loader", "batch", "hybrid"])
def test_small_crops_leave_the_two_views_unchanged(mode: str) -> None:
    """Multi-crop adds (V*B, C, small, small) views, view-major, without changing the two
    full-size ones; each is a pure function of (seed, epoch, index) like them."""
    base = Images(random_images(6, [(24, 24)]))
    plain, multi = views(base, mode, 20), multicrop(base, mode)
    for v in (plain, multi):
        v.set_epoch(2, strong=True)
    p1, p2, p_targets, none = first_batch(plain, batch=6)
    m1, m2, m_targets, small = first_batch(multi, batch=6)
    assert none is None and small.shape == (3 * 6, 3, 8, 8) and small.dtype == torch.float32
    for a, b in ((p1, m1), (p2, m2), (p_targets, m_targets)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    crops = small.view(3, 6, 3, 8, 8)
    assert not torch.equal(crops[0], crops[1]) and not torch.equal(crops[1], crops[2])
    _, _, _, again = first_batch(multi, workers=2, batch=6)
    torch.testing.assert_close(small, again, atol=0, rtol=0)
    multi.set_epoch(3, strong=True)
    assert not torch.equal(small, first_batch(multi, batch=6)[3])


def test_batched_small_crops_are_views_3_and_on() -> None:
    """data.augment=batch: small crop c of each image is the batched pipeline at the small
    size and scale, under view_seeds' view 3 + c."""
    base = Images(random_images(6, [(24, 24)]))
    v = multicrop(base, "batch")
    v.set_epoch(1, strong=False)
    small = first_batch(v, batch=6)[3].view(3, 6, 3, 8, 8)
    reference = batch_weak_pipeline(8, MEAN, STD, min_scale=0.1, max_scale=0.3, blur_prob=0.5)
    images = torch.stack([base[i][0] for i in range(6)])
    seeds = view_seeds(7, 1, range(6), 5)
    for c in range(3):
        torch.testing.assert_close(small[c], reference(images, seeds[2 + c]), atol=0, rtol=0)


def test_per_image_small_crops_follow_the_two_views() -> None:
    """data.augment=loader: each image's small crops are the small per-image pipeline's
    next draws from the generator that made its two views."""
    base = Images(random_images(2, [(24, 24)]))
    v = multicrop(base, "loader")
    v.set_epoch(5, strong=True)
    small = first_batch(v, batch=2)[3].view(3, 2, 3, 8, 8)
    full = strong_pipeline(20, MEAN, STD, min_scale=0.3)
    tiny = strong_pipeline(8, MEAN, STD, min_scale=0.1, max_scale=0.3)
    for i in range(2):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(7, 5, i))
            full(base[i][0]), full(base[i][0])
            want = [tiny(base[i][0]) for _ in range(3)]
        for c in range(3):
            torch.testing.assert_close(small[c, i], want[c], atol=0, rtol=0)


def test_small_crops_use_their_own_scale() -> None:
    """Small crops (scale 0.05-0.1) of a half-black, half-white image rarely span both
    halves; 90%-area full-size crops always do."""
    image = torch.zeros(1, 64, 64, dtype=torch.uint8)
    image[:, :, 32:] = 255
    v = TrainingViews(Images([image] * 64), "hybrid", 16, (0.5,), (0.5,), weak_min_scale=0.9,
                      strong_min_scale=0.9, jitter=0.0, blur_prob=0.0, seed=0, small_crops=2,
                      small_size=8, small_scale=(0.05, 0.1))  # fmt: skip
    crops1, _, small, _, _ = next(iter(DataLoader(v.dataset, batch_size=64)))
    assert small.shape == (64, 2, 1, 8, 8)

    def spans(x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, x.dim()))
        return ((x.amin(dim=dims) < 128) & (x.amax(dim=dims) > 128)).float().mean()

    assert spans(crops1) == 1.0
    assert spans(small.flatten(0, 1)) < 0.5
