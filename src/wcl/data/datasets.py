"""Datasets held as uint8 CxHxW tensors: IDX files and torchvision datasets, built by name.

Nothing here knows about models or augmentations; every dataset returns
``(uint8 tensor of shape (C, H, W), int target)`` with target ``-1`` for unlabelled samples.
Image folders live in ``wcl.data.folder`` and decoding in ``wcl.data.decode``.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from wcl.data.errors import DataError
from wcl.data.folder import ImageFolderDataset, split_dir

__all__ = [
    "DATASET_NAMES",
    "DATASET_STATS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "TensorImageDataset",
    "build_dataset",
    "dataset_stats",
    "stats_name",
    "load_fashion_mnist",
    "load_torchvision_dataset",
    "read_idx",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

Stats = tuple[tuple[float, ...], tuple[float, ...]]

# Per-channel mean/std of pixel values in [0, 1] over each training set.
DATASET_STATS: dict[str, Stats] = {
    # Measured here: all 60000 x 28 x 28 pixels of train-images-idx3-ubyte.gz, divided by 255,
    # numpy float64 mean and population std (ddof=0), rounded to 4 decimals.
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

# ITU-R BT.601 luma weights, the same ones PIL uses for RGB -> L.
_LUMA = (0.299, 0.587, 0.114)

# IDX type byte -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}

_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a native-endian array of its declared shape.

    Gzip is detected from a ``.gz`` suffix or the gzip magic bytes. Raises
    :class:`~wcl.data.errors.DataError` (a ValueError) naming the file when it is empty, not
    gzip though named ``.gz``, a corrupt gzip stream, or when the header is malformed or the
    payload is truncated or too long.
    """
    path = Path(path)
    raw = path.read_bytes()
    if not raw:
        raise DataError(f"{path}: empty file (0 bytes), not an IDX file")
    if path.suffix == ".gz" and raw[:2] != _GZIP_MAGIC:
        raise DataError(
            f"{path}: named .gz but not gzip-compressed (starts with {raw[:4].hex()}, gzip "
            f"with {_GZIP_MAGIC.hex()})"
        )
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path}: corrupt or truncated gzip data ({err})") from err

    if len(raw) < 4:
        raise DataError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: bad IDX magic {raw[:4].hex()} (must start with 0000)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        known = ", ".join(f"0x{code:02x}" for code in _IDX_DTYPES)
        raise DataError(f"{path}: unknown IDX element type 0x{type_code:02x} (known: {known})")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} < {header_len} bytes)")

    shape = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    # Python ints: four header dimensions of up to 2**32 each overflow int64.
    expected = header_len + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(
            f"{path}: IDX payload {kind}: header shape {shape} needs {expected} bytes, the "
            f"data has {len(raw)}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
    # astype copies, giving a writable native-endian array independent of `raw`.
    return data.astype(dtype.newbyteorder("="))


class TensorImageDataset(Dataset):
    """In-memory images ``(N, C, H, W)`` uint8 and targets ``(N,)`` int64 (-1 = unlabelled)."""

    def __init__(
        self,
        images: torch.Tensor | np.ndarray,
        targets: torch.Tensor | np.ndarray | Sequence[int],
        classes: Sequence[str] = (),
    ) -> None:
        images = torch.as_tensor(images)
        targets = torch.as_tensor(targets, dtype=torch.int64)
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        if targets.shape != (images.shape[0],):
            raise ValueError(
                f"targets must have shape ({images.shape[0]},), got {tuple(targets.shape)}"
            )
        self.images = images
        self.targets = targets
        self.classes: list[str] = list(classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])


def _find_file(directories: Sequence[Path], base: str) -> Path | None:
    """First existing ``base`` or ``base.gz`` in ``directories`` (plain preferred)."""
    for directory in directories:
        for name in (base, base + ".gz"):
            candidate = directory / name
            if candidate.is_file():
                return candidate
    return None


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None, train: bool = True, download: bool = False
) -> TensorImageDataset:
    """Fashion-MNIST from IDX files: images ``(N, 1, 28, 28)`` uint8, targets 0..9.

    A damaged file (see :func:`read_idx`), images that are not ``(N, H, W)`` bytes, labels
    that are not ``(N,)`` integers in 0..9 or counts that differ raise
    :class:`~wcl.data.errors.DataError` naming the file.

    Looks in ``root`` (default ``/usr/share/datasets/fashion-mnist``) and in
    ``root/FashionMNIST/raw`` (torchvision's layout), accepting plain or ``.gz`` files.
    With ``download=True`` and the files missing, torchvision downloads them into ``root``.
    """
    root = Path(root if root is not None else FASHION_MNIST_DIR)
    prefix = "train" if train else "t10k"
    bases = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    directories = [root, root / "FashionMNIST" / "raw"]

    found = [_find_file(directories, base) for base in bases]
    if None in found and download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=train, download=True)
        found = [_find_file(directories, base) for base in bases]
    for base, path in zip(bases, found, strict=True):
        if path is None:
            raise FileNotFoundError(
                f"Fashion-MNIST file {base}[.gz] not found in {root} (nor in "
                f"{root / 'FashionMNIST' / 'raw'}). Install it with "
                "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu, files go to "
                f"{FASHION_MNIST_DIR}), or set `data.download: true` to fetch it with torchvision."
            )
    images_path, labels_path = found
    assert images_path is not None and labels_path is not None

    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(
            f"{images_path}: images need 3 dimensions (N, H, W); the IDX header declares "
            f"{images.ndim}: {images.shape}"
        )
    if images.dtype != np.uint8:
        raise DataError(
            f"{images_path}: images must be unsigned bytes (type 0x08), not {images.dtype}"
        )
    if labels.ndim != 1:
        raise DataError(
            f"{labels_path}: labels need 1 dimension (N,); the IDX header declares "
            f"{labels.ndim}: {labels.shape}"
        )
    if labels.dtype.kind not in "iu":
        raise DataError(f"{labels_path}: labels must be integers, not {labels.dtype}")
    if len(labels) != len(images):
        raise DataError(
            f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}"
        )
    outside = np.flatnonzero((labels < 0) | (labels >= len(FASHION_MNIST_CLASSES)))
    if outside.size:
        first = int(outside[0])
        raise DataError(
            f"{labels_path}: {outside.size} of {len(labels)} labels are outside "
            f"0..{len(FASHION_MNIST_CLASSES) - 1}, the first {int(labels[first])} (image {first})"
        )
    return TensorImageDataset(
        torch.from_numpy(images).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        FASHION_MNIST_CLASSES,
    )


def load_torchvision_dataset(
    name: str, root: str | os.PathLike[str], train: bool = True, download: bool = False
) -> TensorImageDataset:
    """CIFAR-10/100 or STL-10 read through torchvision into memory as uint8 ``(N, 3, H, W)``.

    Splits: CIFAR uses torchvision's ``train`` flag. STL-10 uses ``"train+unlabeled"`` (5000
    labelled + 100000 unlabelled images, the latter with target -1) when ``train`` is true
    and ``"test"`` otherwise. Downloading is opt-in; a missing dataset raises
    ``FileNotFoundError`` naming ``root``.
    """
    from torchvision import datasets as tvd

    root = str(root)
    try:
        if name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            ds = cls(root, train=train, download=download)
            # CIFAR keeps NHWC numpy arrays.
            images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2)
            targets = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
        elif name == "stl10":
            split = "train+unlabeled" if train else "test"
            ds = tvd.STL10(root, split=split, download=download)
            # STL-10 is already NCHW; torchvision labels the unlabelled part -1.
            images = torch.from_numpy(np.ascontiguousarray(ds.data))
            targets = torch.as_tensor(np.asarray(ds.labels), dtype=torch.int64)
        else:
            raise ValueError(
                f"unknown torchvision dataset {name!r}; valid: cifar10, cifar100, stl10"
            )
    except RuntimeError as err:
        # torchvision reports a missing/corrupt dataset as a bare RuntimeError.
        if download:
            raise
        raise FileNotFoundError(
            f"{name} not found (or corrupt) under {root}: {err}. "
            "Set `data.download: true` to fetch it with torchvision."
        ) from err
    return TensorImageDataset(images.contiguous(), targets, list(ds.classes))


def _need_root(name: str, root: str | None) -> str:
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root directory (data.root)")
    return root


_BUILDERS: dict[str, Callable[[str | None, bool, bool, int], Dataset]] = {
    "fashion_mnist": lambda root, train, download, channels: load_fashion_mnist(
        root, train, download
    ),
    "cifar10": lambda root, train, download, channels: load_torchvision_dataset(
        "cifar10", _need_root("cifar10", root), train, download
    ),
    "cifar100": lambda root, train, download, channels: load_torchvision_dataset(
        "cifar100", _need_root("cifar100", root), train, download
    ),
    "stl10": lambda root, train, download, channels: load_torchvision_dataset(
        "stl10", _need_root("stl10", root), train, download
    ),
    "folder": lambda root, train, download, channels: ImageFolderDataset(
        split_dir(Path(_need_root("folder", root)), train), channels
    ),
}
# No other dataset can hold a broken file.
_SUBSTITUTING = {"folder"}

DATASET_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_dataset(
    name: str,
    root: str | None,
    train: bool = True,
    download: bool = False,
    channels: int = 3,
    substitute: bool = True,
) -> Dataset:
    """Build a dataset by name: fashion_mnist, cifar10, cifar100, stl10 or folder.

    ``substitute`` False (evaluation, embeddings): a folder's broken files are served as
    ``(None, target)`` instead of being replaced by the next readable image (see
    :class:`~wcl.data.folder.ImageFolderDataset`).

    ``root=None`` is only valid for fashion_mnist (Debian's install directory).
    ``channels`` applies to ``folder`` only; the built-in datasets keep their native channel
    count (fashion_mnist 1, the others 3). For ``folder``: if ``root`` contains a ``train/``
    sub-directory and a ``val/`` or ``test/`` one, ``train=True`` reads ``root/train`` and
    ``train=False`` reads ``root/val`` (``root/test`` when there is no ``val/``); otherwise
    both read ``root`` itself. ``download`` is ignored for ``folder``.
    """
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    dataset = builder(root, train, download, channels)
    if name in _SUBSTITUTING:
        dataset.substitute = substitute
    return dataset


def stats_name(dataset: str | None) -> str:
    """The DATASET_STATS entry that normalises ``dataset``: its own, else ImageNet's
    (image folders, unknown names)."""
    return dataset if dataset in DATASET_STATS else "imagenet"


def dataset_stats(name: str, channels: int | None = None) -> Stats:
    """Normalisation (mean, std) in [0, 1] units for a dataset name.

    ``folder`` and unknown names fall back to ImageNet statistics. When ``channels`` differs
    from the stored count, 3 -> 1 uses luma-weighted averages (an approximation) and
    1 -> 3 repeats the single value.
    """
    mean, std = DATASET_STATS.get(name, DATASET_STATS["imagenet"])
    if channels is None or channels == len(mean):
        return mean, std
    if channels == 1 and len(mean) == 3:
        return (
            (round(sum(w * m for w, m in zip(_LUMA, mean, strict=True)), 4),),
            (round(sum(w * s for w, s in zip(_LUMA, std, strict=True)), 4),),
        )
    if channels == 3 and len(mean) == 1:
        return mean * 3, std * 3
    raise ValueError(f"cannot adapt {len(mean)}-channel stats of {name!r} to {channels} channels")
