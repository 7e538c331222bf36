"""Tests for wcl.data on committed real-image fixtures (see tests/fixtures/make_fixture.py)."""

from __future__ import annotations

import gzip
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import v2

from wcl.data import (
    DATASET_NAMES,
    DATASET_STATS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    ImageFolderDataset,
    TensorImageDataset,
    TwoViews,
    blur_kernel_size,
    build_dataset,
    dataset_stats,
    eval_pipeline,
    load_fashion_mnist,
    load_torchvision_dataset,
    read_idx,
    sample_seed,
    strong_pipeline,
    weak_pipeline,
)
from wcl.data.augment import ColourJitter, GaussianBlur

FIXTURES = Path(__file__).parent / "fixtures"
FASHION_PNG = FIXTURES / "fashion"
FASHION_IDX = FIXTURES / "fashion-idx"
PHOTOS = FIXTURES / "photos"
DEBIAN = Path(FASHION_MNIST_DIR)
needs_debian = pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian dataset-fashion-mnist is not installed",
)
FM_MEAN, FM_STD = DATASET_STATS["fashion_mnist"]
IMNET_MEAN, IMNET_STD = DATASET_STATS["imagenet"]


def folder_name(class_name: str) -> str:
    return class_name.replace("/", "_").replace(" ", "_")


def fashion_pngs() -> list[Path]:
    return sorted(FASHION_PNG.glob("*/*.png"))


# --------------------------------------------------------------------------- IDX


def test_idx_matches_png_pixels_and_labels() -> None:
    images = read_idx(FASHION_IDX / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_IDX / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (300, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (300,) and labels.dtype == np.uint8
    pngs = fashion_pngs()
    assert len(pngs) == 300
    for png in pngs:
        position = int(png.stem)
        np.testing.assert_array_equal(images[position], np.asarray(Image.open(png)))
        assert folder_name(FASHION_MNIST_CLASSES[labels[position]]) == png.parent.name
    assert np.bincount(labels, minlength=10).tolist() == [30] * 10


def test_gz_and_plain_idx_agree(tmp_path: Path) -> None:
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        gz = read_idx(FASHION_IDX / f"t10k-{kind}.gz")
        plain = read_idx(FASHION_IDX / f"train-{kind}")
        np.testing.assert_array_equal(gz, plain)
        # Gzip must also be recognised by its magic bytes when the name lacks ".gz".
        renamed = tmp_path / f"renamed-{kind}"
        shutil.copy(FASHION_IDX / f"t10k-{kind}.gz", renamed)
        np.testing.assert_array_equal(read_idx(renamed), plain)


def test_read_idx_other_dtypes_are_native_endian(tmp_path: Path) -> None:
    values = np.arange(-6, 6, dtype=">i4").reshape(3, 4)
    path = tmp_path / "ints.idx"
    path.write_bytes(bytes([0, 0, 0x0C, 2]) + (3).to_bytes(4, "big") + (4).to_bytes(4, "big"))
    with path.open("ab") as f:
        f.write(values.tobytes())
    out = read_idx(path)
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, values)
    out[0, 0] = 7  # must be writable (not a view of an immutable buffer)


def _corruptions(raw: bytes) -> dict[str, bytes]:
    return {
        "truncated-payload": raw[:-10],
        "truncated-header": raw[:6],
        "trailing-bytes": raw + b"\x00",
        "bad-magic": b"\x01" + raw[1:],
        "bad-type": raw[:2] + b"\x42" + raw[3:],
        "empty": b"",
    }


@pytest.mark.parametrize("case", list(_corruptions(b"x" * 16)))
def test_malformed_idx_raises_value_error_naming_file(tmp_path: Path, case: str) -> None:
    raw = (FASHION_IDX / "train-labels-idx1-ubyte").read_bytes()
    path = tmp_path / f"{case}-labels-idx1-ubyte"
    path.write_bytes(_corruptions(raw)[case])
    with pytest.raises(ValueError, match=path.name):
        read_idx(path)


def test_truncated_gzip_idx_raises_value_error_naming_file(tmp_path: Path) -> None:
    raw = (FASHION_IDX / "t10k-images-idx3-ubyte.gz").read_bytes()
    cut = tmp_path / "cut-images-idx3-ubyte.gz"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=cut.name):
        read_idx(cut)
    # A complete gzip stream whose IDX content is short is caught by the size check instead.
    short = tmp_path / "short-images-idx3-ubyte.gz"
    short.write_bytes(gzip.compress(gzip.decompress(raw)[:-1]))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(short)


# --------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("train", [True, False])  # plain files vs .gz files
def test_load_fashion_mnist_fixture(train: bool) -> None:
    ds = load_fashion_mnist(FASHION_IDX, train=train)
    assert isinstance(ds, TensorImageDataset)
    assert ds.images.shape == (300, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.targets.dtype == torch.int64 and ds.targets.bincount().tolist() == [30] * 10
    assert ds.classes == FASHION_MNIST_CLASSES and len(ds) == 300
    image, target = ds[5]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8 and isinstance(target, int)
    png = next(p for p in fashion_pngs() if int(p.stem) == 5)
    np.testing.assert_array_equal(image[0].numpy(), np.asarray(Image.open(png)))


def test_load_fashion_mnist_torchvision_layout(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in FASHION_IDX.glob("t10k-*.gz"):
        shutil.copy(f, raw / f.name)
    ds = load_fashion_mnist(tmp_path, train=False)
    assert ds.images.shape == (300, 1, 28, 28)


@needs_debian
def test_load_fashion_mnist_debian() -> None:
    train = load_fashion_mnist()
    test = load_fashion_mnist(train=False)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28) and test.images.dtype == torch.uint8
    for ds in (train, test):
        assert ds.targets.min() == 0 and ds.targets.max() == 9
        assert ds.targets.bincount().tolist() == [len(ds) // 10] * 10
    # The fixture is a subset of the real test set.
    indices = [int(x) for x in (FASHION_IDX / "t10k-indices.txt").read_text().split()]
    fixture = load_fashion_mnist(FASHION_IDX, train=False)
    assert torch.equal(test.images[indices], fixture.images)
    assert torch.equal(test.targets[indices], fixture.targets)
    # The hard-coded normalisation stats come from the real training set.
    pixels = train.images.double() / 255
    assert pixels.mean().item() == pytest.approx(FM_MEAN[0], abs=5e-5)
    assert pixels.std(unbiased=False).item() == pytest.approx(FM_STD[0], abs=5e-5)


def test_load_fashion_mnist_missing_names_dir_and_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_fashion_mnist(tmp_path / "nowhere")
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message
    assert "train-images-idx3-ubyte" in message
    assert "apt-get install dataset-fashion-mnist" in message and "data.download" in message

    shutil.copy(FASHION_IDX / "t10k-images-idx3-ubyte.gz", tmp_path)
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_fashion_mnist(tmp_path, train=False)


def test_load_fashion_mnist_rejects_mismatched_counts(tmp_path: Path) -> None:
    shutil.copy(FASHION_IDX / "train-images-idx3-ubyte", tmp_path)
    labels = read_idx(FASHION_IDX / "train-labels-idx1-ubyte")[:-1]
    header = bytes([0, 0, 0x08, 1]) + len(labels).to_bytes(4, "big")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(header + labels.tobytes())
    with pytest.raises(ValueError, match="labels"):
        load_fashion_mnist(tmp_path)


# --------------------------------------------------------------------------- image folders


def test_image_folder_class_mode_greyscale() -> None:
    ds = ImageFolderDataset(FASHION_PNG, channels=1)
    assert len(ds) == 300
    assert ds.classes == sorted(folder_name(c) for c in FASHION_MNIST_CLASSES)
    assert ds.targets.bincount().tolist() == [30] * 10
    for (path, target), k in zip(ds.samples, range(len(ds)), strict=True):
        assert ds.classes[target] == Path(path).parent.name
        if k % 37 == 0:
            image, t = ds[k]
            assert t == target and image.shape == (1, 28, 28) and image.dtype == torch.uint8
            np.testing.assert_array_equal(image[0].numpy(), np.asarray(Image.open(path)))
    assert [p for p, _ in ds.samples] == sorted(p for p, _ in ds.samples)


def test_image_folder_rgb_from_greyscale_pngs() -> None:
    ds = ImageFolderDataset(FASHION_PNG, channels=3)
    image, _ = ds[0]
    assert image.shape == (3, 28, 28) and image.dtype == torch.uint8
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_flat_photos(channels: int) -> None:
    ds = ImageFolderDataset(PHOTOS, channels=channels)
    assert len(ds) == 6 and ds.classes == []
    assert ds.targets.tolist() == [-1] * 6
    names = [Path(p).name for p, _ in ds.samples]
    assert names == sorted(names)
    for k in range(len(ds)):
        image, target = ds[k]
        assert target == -1 and image.dtype == torch.uint8
        assert image.shape[0] == channels and max(image.shape[1:]) == 96
    if channels == 3:
        astronaut = ds[names.index("astronaut.png")][0]
        assert not torch.equal(astronaut[0], astronaut[2])  # real colour survived decoding


def _png(path: Path, value: int = 128, size: tuple[int, int] = (8, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)


def test_image_folder_scanning_rules(tmp_path: Path) -> None:
    _png(tmp_path / "b" / "deep" / "x.PNG")
    _png(tmp_path / "a" / "y.JpG")
    _png(tmp_path / "a" / ".hidden.png")
    _png(tmp_path / ".git" / "z.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["a", "b"]
    assert [(Path(p).name, t) for p, t in ds.samples] == [("y.JpG", 0), ("x.PNG", 1)]
    assert ds[1][0].shape == (3, 6, 8)

    _png(tmp_path / "root.bmp")  # an image directly in root makes the folder unlabelled
    flat = ImageFolderDataset(tmp_path)
    assert flat.classes == [] and len(flat) == 3 and flat.targets.tolist() == [-1] * 3


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "only.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ImageFolderDataset(tmp_path)
    with pytest.raises(ValueError, match="channels"):
        ImageFolderDataset(PHOTOS, channels=2)


# --------------------------------------------------------------------------- build_dataset


def test_build_dataset_dispatch(tmp_path: Path) -> None:
    fm = build_dataset("fashion_mnist", str(FASHION_IDX), train=False)
    assert isinstance(fm, TensorImageDataset) and len(fm) == 300
    folder = build_dataset("folder", str(PHOTOS), channels=1)
    assert isinstance(folder, ImageFolderDataset) and folder[0][0].shape[0] == 1

    _png(tmp_path / "train" / "cat" / "1.png")
    _png(tmp_path / "train" / "dog" / "2.png")
    _png(tmp_path / "val" / "cat" / "3.png")
    train = build_dataset("folder", str(tmp_path), train=True)
    val = build_dataset("folder", str(tmp_path), train=False)
    assert train.classes == ["cat", "dog"] and len(train) == 2
    assert val.classes == ["cat"] and Path(val.samples[0][0]).name == "3.png"
    shutil.move(tmp_path / "val", tmp_path / "test")
    assert Path(build_dataset("folder", str(tmp_path), train=False).samples[0][0]).name == "3.png"


def test_build_dataset_folder_without_split_uses_root(tmp_path: Path) -> None:
    _png(tmp_path / "train" / "1.png")  # a class called "train", but no val/test beside it
    _png(tmp_path / "other" / "2.png")
    assert build_dataset("folder", str(tmp_path), train=False).classes == ["other", "train"]


def test_build_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        build_dataset("imagenet-22k", None)
    for name in ("fashion_mnist", "cifar10", "cifar100", "stl10", "folder"):
        assert name in str(err.value)
    assert set(DATASET_NAMES) == {"fashion_mnist", "cifar10", "cifar100", "stl10", "folder"}
    with pytest.raises(ValueError, match="root"):
        build_dataset("cifar10", None)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        build_dataset("cifar10", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        build_dataset("stl10", str(tmp_path), train=False)


class _FakeCifar:
    """Stands in for torchvision.datasets.CIFAR10: NHWC uint8 data and list targets."""

    def __init__(self, root: str, train: bool, download: bool) -> None:
        rng = np.random.default_rng(0)
        self.data = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
        self.targets = [3, 1, 4, 1, 5]
        self.classes = [f"c{k}" for k in range(10)]


class _FakeSTL:
    """Stands in for torchvision.datasets.STL10: NCHW uint8 data, -1 for unlabelled."""

    def __init__(self, root: str, split: str, download: bool) -> None:
        self.split = split
        self.data = np.zeros((4, 3, 96, 96), dtype=np.uint8)
        self.labels = np.array([0, 9, -1, -1] if split == "train+unlabeled" else [2, 2, 2, 2])
        self.classes = [f"s{k}" for k in range(10)]


def test_load_torchvision_dataset_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _FakeCifar)
    monkeypatch.setattr(torchvision.datasets, "STL10", _FakeSTL)
    cifar = load_torchvision_dataset("cifar10", "/unused")
    assert cifar.images.shape == (5, 3, 32, 32) and cifar.images.dtype == torch.uint8
    fake = _FakeCifar("", True, False)
    assert torch.equal(cifar.images[2].permute(1, 2, 0), torch.from_numpy(fake.data[2]))
    assert cifar.targets.tolist() == [3, 1, 4, 1, 5] and cifar.classes[0] == "c0"
    stl = load_torchvision_dataset("stl10", "/unused", train=True)
    assert stl.images.shape == (4, 3, 96, 96) and stl.targets.tolist() == [0, 9, -1, -1]
    assert load_torchvision_dataset("stl10", "/unused", train=False).targets.tolist() == [2] * 4


def test_dataset_stats() -> None:
    assert set(DATASET_STATS) >= {"fashion_mnist", "cifar10", "cifar100", "stl10", "imagenet"}
    for mean, std in DATASET_STATS.values():
        assert len(mean) == len(std) and all(0 < v < 1 for v in (*mean, *std))
    assert dataset_stats("folder") == DATASET_STATS["imagenet"]
    assert dataset_stats("fashion_mnist", 3) == (FM_MEAN * 3, FM_STD * 3)
    mean1, std1 = dataset_stats("cifar10", 1)
    assert len(mean1) == 1 and 0.44 < mean1[0] < 0.5 and len(std1) == 1


# --------------------------------------------------------------------------- pipelines


def _find(pipeline: v2.Compose, kind: type) -> list:
    """All transforms of ``kind`` in a Compose, looking inside RandomApply."""
    found = []
    for t in pipeline.transforms:
        inner = t.transforms if isinstance(t, v2.RandomApply) else [t]
        found.extend(x for x in inner if isinstance(x, kind))
    return found


BUILDERS = {"weak": weak_pipeline, "strong": strong_pipeline, "eval": eval_pipeline}


@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize(
    "channels,size,in_hw", [(1, 28, (28, 28)), (3, 32, (40, 50)), (3, 224, (256, 300))]
)
def test_pipeline_shapes(kind: str, channels: int, size: int, in_hw: tuple[int, int]) -> None:
    mean, std = (FM_MEAN, FM_STD) if channels == 1 else (IMNET_MEAN, IMNET_STD)
    pipe = BUILDERS[kind](size, mean, std)
    x = torch.randint(0, 256, (channels, *in_hw), dtype=torch.uint8)
    y = pipe(x)
    assert y.shape == (channels, size, size) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    lo = (0 - torch.tensor(mean)) / torch.tensor(std)
    hi = (1 - torch.tensor(mean)) / torch.tensor(std)
    per_channel = y.flatten(1)
    assert (per_channel.min(1).values >= lo - 1e-4).all()
    assert (per_channel.max(1).values <= hi + 1e-4).all()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", ["weak", "strong"])
def test_pipeline_normalises_constant_image(kind: str, channels: int) -> None:
    # Crop, flip, blur and greyscale leave a uniform grey image unchanged, so with jitter off
    # undoing the normalisation must give back the pixel value. v2's uint8 greyscale truncates
    # (200 -> 199), hence the one-level tolerance.
    mean, std = (FM_MEAN, FM_STD) if channels == 1 else (IMNET_MEAN, IMNET_STD)
    pipe = BUILDERS[kind](28, mean, std, jitter=0.0)
    for seed in range(5):
        torch.manual_seed(seed)
        y = pipe(torch.full((channels, 36, 30), 200, dtype=torch.uint8))
        assert y.shape == (channels, 28, 28)
        pixels = y * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
        torch.testing.assert_close(pixels, torch.full_like(y, 200 / 255), atol=1.01 / 255, rtol=0)


def test_eval_pipeline_is_deterministic_resize_and_centre_crop() -> None:
    x = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    y = eval_pipeline(28, FM_MEAN, FM_STD)(x)
    torch.testing.assert_close(y * FM_STD[0] + FM_MEAN[0], x.float() / 255)
    pipe = eval_pipeline(64, IMNET_MEAN, IMNET_STD, resize=73)
    assert [type(t) for t in pipe.transforms[:2]] == [v2.Resize, v2.CenterCrop]
    assert pipe.transforms[0].size == [73]
    img = torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8)
    assert torch.equal(pipe(img), pipe(img)) and pipe(img).shape == (3, 64, 64)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    "strengths", [(0.4, 0.4, 0.4, 0.1), (0.8, 0.8, 0.8, 0.2), (1.5, 0, 0, 0.5)]
)
def test_colour_jitter_draws_and_acts_like_torchvision(
    channels: int, strengths: tuple[float, float, float, float]
) -> None:
    """wcl's ColourJitter against v2.ColorJitter on float images under the same global
    seed: the same order and factors drawn, the same pixels (up to float rounding)."""
    images = torch.rand(12, channels, 20, 24)
    for seed, image in enumerate(images):
        torch.manual_seed(seed)
        ours = ColourJitter(*strengths)(image)
        after_ours = torch.rand(1)
        torch.manual_seed(seed)
        ref = v2.ColorJitter(*(s if s > 0 else None for s in strengths))(image)
        assert torch.equal(torch.rand(1), after_ours)  # same number of draws
        torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)


def test_colour_jitter_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="float"):
        ColourJitter(0.4)(torch.zeros(3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="brightness"):
        ColourJitter(-0.1)
    with pytest.raises(ValueError, match="hue"):
        ColourJitter(0.4, 0.4, 0.4, 0.6)


def _torchvision_reference(kind: str, size: int, mean, std) -> v2.Compose:
    """The training pipeline written with torchvision's own ColorJitter and GaussianBlur."""
    b, c, s, h = (0.4, 0.4, 0.4, 0.1) if kind == "weak" else (0.8, 0.8, 0.8, 0.2)
    crop = v2.RandomResizedCrop(size, scale=(0.2 if kind == "weak" else 0.08, 1.0))
    colour = [
        v2.RandomApply([v2.ColorJitter(b, c, s, h)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size), (0.1, 2.0))], p=0.5),
    ]
    to_float = v2.ToDtype(torch.float32, scale=True)
    flip = v2.RandomHorizontalFlip()
    ops = [crop, to_float, *colour, flip] if kind == "weak" else [crop, flip, to_float, *colour]
    return v2.Compose([*ops, v2.Normalize(list(mean), list(std))])


@pytest.mark.parametrize("kind", ["weak", "strong"])
def test_training_pipelines_equal_torchvision_composition(kind: str) -> None:
    """Our pipelines against the same recipe built from torchvision's transforms only,
    under the same seeds: same draws, pixels within float rounding and the blur's skipped
    far tail (taps beyond 4 sigma)."""
    ours = BUILDERS[kind](32, IMNET_MEAN, IMNET_STD)
    ref = _torchvision_reference(kind, 32, IMNET_MEAN, IMNET_STD)
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    for seed in range(30):
        torch.manual_seed(seed)
        a = ours(image)
        torch.manual_seed(seed)
        b = ref(image)
        # 1e-4 of the [0, 1] range, divided by the smallest std after normalising.
        torch.testing.assert_close(a, b, atol=1e-4 / min(IMNET_STD), rtol=0)


def test_weak_and_strong_differ_in_crop_scale_and_jitter() -> None:
    weak = weak_pipeline(32, IMNET_MEAN, IMNET_STD)
    strong = strong_pipeline(32, IMNET_MEAN, IMNET_STD)
    (weak_crop,) = _find(weak, v2.RandomResizedCrop)
    (strong_crop,) = _find(strong, v2.RandomResizedCrop)
    assert tuple(weak_crop.scale) == (0.2, 1.0) and tuple(strong_crop.scale) == (0.08, 1.0)
    (wj,) = _find(weak, ColourJitter)
    (sj,) = _find(strong, ColourJitter)
    assert wj.brightness == pytest.approx((0.6, 1.4)) and wj.hue == pytest.approx((-0.1, 0.1))
    assert sj.saturation == pytest.approx((0.2, 1.8)) and sj.hue == pytest.approx((-0.2, 0.2))
    for pipe in (weak, strong):
        jitter_apply = next(t for t in pipe.transforms if isinstance(t, v2.RandomApply))
        assert jitter_apply.p == 0.8
        (grey,) = _find(pipe, v2.RandomGrayscale)
        assert grey.p == 0.2
        (blur,) = _find(pipe, GaussianBlur)
        assert blur.kernel_size == 3 and tuple(blur.sigma) == (0.1, 2.0)
        assert len(_find(pipe, v2.RandomHorizontalFlip)) == 1
    # jitter scales the strengths; min_scale and blur_prob are tunable.
    tuned = weak_pipeline(28, FM_MEAN, FM_STD, min_scale=0.5, jitter=0.5, blur_prob=0.0)
    (tj,) = _find(tuned, ColourJitter)
    assert tj.brightness == pytest.approx((0.8, 1.2)) and tj.contrast == pytest.approx((0.8, 1.2))
    assert tuple(_find(tuned, v2.RandomResizedCrop)[0].scale) == (0.5, 1.0)
    assert _find(tuned, GaussianBlur) == []


def test_greyscale_pipelines_drop_colour_only_ops() -> None:
    for builder in (weak_pipeline, strong_pipeline):
        pipe = builder(28, FM_MEAN, FM_STD)
        (cj,) = _find(pipe, ColourJitter)
        assert cj.saturation is None and cj.hue is None and cj.brightness is not None
        assert _find(pipe, v2.RandomGrayscale) == []
    with pytest.raises(ValueError):
        weak_pipeline(28, (0.5, 0.5), (0.2, 0.2))


def test_blur_kernel_size() -> None:
    assert [blur_kernel_size(s) for s in (8, 28, 32, 96, 224)] == [3, 3, 3, 11, 23]
    assert all(blur_kernel_size(s) % 2 == 1 for s in range(1, 300))


def test_pipeline_is_random() -> None:
    pipe = strong_pipeline(28, FM_MEAN, FM_STD)
    x = load_fashion_mnist(FASHION_IDX, train=False).images[0]
    outs = [pipe(x) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


# --------------------------------------------------------------------------- TwoViews


def _fixture_views(seed: int = 0) -> TwoViews:
    base = load_fashion_mnist(FASHION_IDX, train=False)
    return TwoViews(base, weak_pipeline(28, FM_MEAN, FM_STD), seed=seed)


def _same_image_views(seed: int = 0) -> TwoViews:
    # Identical images make any difference between samples come from the augmentation alone.
    image = load_fashion_mnist(FASHION_IDX, train=False).images[:1]
    base = TensorImageDataset(image.repeat(8, 1, 1, 1), torch.zeros(8, dtype=torch.int64))
    return TwoViews(base, strong_pipeline(28, FM_MEAN, FM_STD), seed=seed)


def test_two_views_pure_function_of_seed_epoch_index() -> None:
    a, b = _same_image_views(seed=7), _same_image_views(seed=7)
    a.set_epoch(3)
    b.set_epoch(3)
    v1, v2_, target = a[5]
    assert target == 0 and v1.shape == (1, 28, 28) and v1.dtype == torch.float32
    w1, w2, _ = b[5]
    assert torch.equal(v1, w1) and torch.equal(v2_, w2)
    assert not torch.equal(v1, v2_)  # the two views are different draws
    assert not torch.equal(v1, a[4][0])  # different index
    assert torch.equal(a[-3][0], v1)  # negative index is the same sample
    b.set_epoch(4)
    assert not torch.equal(v1, b[5][0])  # different epoch
    other_seed = _same_image_views(seed=8)
    other_seed.set_epoch(3)
    assert not torch.equal(v1, other_seed[5][0])  # different seed
    with pytest.raises(IndexError):
        a[8]


def test_two_views_set_epoch_swaps_transform() -> None:
    views = _fixture_views()
    views.set_epoch(2, transform=eval_pipeline(28, FM_MEAN, FM_STD))
    v1, v2_, _ = views[0]
    assert views.epoch == 2 and torch.equal(v1, v2_)
    views.set_epoch(3)  # keeps the swapped-in pipeline
    assert torch.equal(views[0][0], v1)


def test_two_views_leaves_global_rng_untouched() -> None:
    views = _fixture_views()
    torch.manual_seed(1234)
    random.seed(1)
    np.random.seed(1)
    state = torch.get_rng_state()
    py_state, np_state = random.getstate(), np.random.get_state()
    for i in (0, 17, 299):
        views[i]
    assert torch.equal(torch.get_rng_state(), state) and torch.initial_seed() == 1234
    assert random.getstate() == py_state
    assert np.array_equal(np.random.get_state()[1], np_state[1])


def test_two_views_independent_of_call_order_and_resume() -> None:
    views = _fixture_views(seed=3)
    views.set_epoch(1)
    forward = [views[i][0] for i in range(10)]
    torch.manual_seed(999)  # a different global state must not matter either
    backward = [views[i][0] for i in reversed(range(10))][::-1]
    resumed = _fixture_views(seed=3)
    resumed.set_epoch(1)
    tail = [resumed[i][0] for i in range(6, 10)]
    for a, b in zip(forward, backward, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(forward[6:], tail, strict=True):
        assert torch.equal(a, b)


def _collect(views: TwoViews, order: list[int], workers: int) -> dict[int, torch.Tensor]:
    loader = DataLoader(Subset(views, order), batch_size=8, num_workers=workers, shuffle=False)
    batches = [torch.cat([v1, v2_], dim=1) for v1, v2_, _ in loader]
    stacked = torch.cat(batches)
    return {i: stacked[k] for k, i in enumerate(order)}


def test_two_views_same_with_workers_and_shuffling() -> None:
    views = _fixture_views(seed=11)
    views.set_epoch(5)
    n = 48
    sequential = _collect(views, list(range(n)), workers=0)
    shuffled_order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = _collect(views, shuffled_order, workers=2)
    for i in range(n):
        assert torch.equal(sequential[i], shuffled[i])
    assert not torch.equal(sequential[0], sequential[1])


def test_sample_seed_is_well_mixed() -> None:
    seeds = {sample_seed(0, e, i) for e in range(4) for i in range(250)}
    assert len(seeds) == 1000
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3) != sample_seed(1, 3, 2)
    assert 0 <= sample_seed(-1, 0, 0) < 2**64
