"""Datasets held as uint8 CxHxW tensors: IDX files, image folders and torchvision datasets.

Nothing here knows about models or augmentations; every dataset returns
``(uint8 tensor of shape (C, H, W), int target)`` with target ``-1`` for unlabelled samples.
"""

from __future__ import annotations

import gzip
import io
import json
import operator
import os
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = [
    "BROKEN_REASONS",
    "DATASET_NAMES",
    "DATASET_STATS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "IMAGE_EXTENSIONS",
    "BrokenImageError",
    "BrokenImageWarning",
    "DecodedImage",
    "ImageFolderDataset",
    "NoReadableImageError",
    "TensorImageDataset",
    "build_dataset",
    "dataset_stats",
    "decode_image",
    "first_readable",
    "load_fashion_mnist",
    "load_torchvision_dataset",
    "read_idx",
    "read_image",
    "read_skip_log",
    "unwrap_image_folder",
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

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)

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

    Gzip is detected from a ``.gz`` suffix or the gzip magic bytes. Raises ``ValueError``
    naming the file when the header is malformed or the payload is truncated or too long.
    """
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz" or raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({err})") from err

    if len(raw) < 4:
        raise ValueError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: bad IDX magic {raw[:4].hex()} (must start with 0000)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{type_code:02x}")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} < {header_len} bytes)")

    shape = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = header_len + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: IDX payload {kind}: shape {shape} needs {expected} bytes, file has {len(raw)}"
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


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk_files(directory: Path) -> Iterator[Path]:
    """Every non-hidden file under ``directory`` (recursive, hidden folders pruned), unsorted."""
    for dirpath, dirnames, filenames in os.walk(directory):
        # Pruning in place stops os.walk from descending into hidden folders (.git, .cache...).
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        yield from (Path(dirpath, f) for f in filenames if not f.startswith("."))


def _scan_images(directory: Path) -> list[Path]:
    """All image files under ``directory`` (recursive, hidden entries skipped), sorted by path."""
    found = [p for p in _walk_files(directory) if _is_image_file(p.name)]
    # Sorting on relative POSIX parts keeps the order independent of the OS and of os.walk.
    return sorted(found, key=lambda p: p.relative_to(directory).parts)


# --------------------------------------------------------------------------- decoding

# Categories of broken files, the ``reason`` of BrokenImageError, the skip log and check-data.
ZERO_BYTE = "zero-byte"
NOT_AN_IMAGE = "not an image"
TRUNCATED = "truncated"
CORRUPT = "corrupt"
UNSUPPORTED_MODE = "unsupported mode"
TOO_LARGE = "too large"
UNREADABLE = "unreadable"
BROKEN_REASONS: tuple[str, ...] = (
    ZERO_BYTE,
    NOT_AN_IMAGE,
    TRUNCATED,
    CORRUPT,
    UNSUPPORTED_MODE,
    TOO_LARGE,
    UNREADABLE,
)

_ORIENTATION = 0x0112  # EXIF tag: how the stored pixels must be turned to stand upright
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
# Transparent pixels are composited onto white: a viewer on a white page shows them so, and
# dropping alpha instead would expose whatever colour the encoder left under transparent
# pixels, which is arbitrary (often black, sometimes noise).
_BACKGROUND = (255, 255, 255, 255)


class BrokenImageError(ValueError):
    """An image file that cannot be decoded.

    ``reason`` is one of ``BROKEN_REASONS`` (``"truncated"``, ``"zero-byte"``...) and
    ``detail`` the underlying error message.
    """

    def __init__(self, path: str, reason: str, detail: str) -> None:
        # Keeping the constructor arguments as ``args`` lets the error pickle across processes.
        super().__init__(path, reason, detail)
        self.path = path
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.path}: {self.reason} ({self.detail})"


class BrokenImageWarning(UserWarning):
    """Emitted (once per dataset and process) when a broken image file is first skipped."""


class NoReadableImageError(RuntimeError):
    """No file of an image folder could be decoded (or none of those tried)."""


class DecodedImage(NamedTuple):
    """A decoded image: ``pixels`` uint8 ``(H, W, channels)`` upright, with its file's PIL mode."""

    pixels: np.ndarray
    mode: str
    exif_rotated: bool


def _quantise_16bit(values: np.ndarray) -> np.ndarray:
    """Map 0..65535 to 0..255 by rounding ``v / 257`` (65535 = 255 * 257, so 257k -> k)."""
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _stretch(values: np.ndarray) -> np.ndarray:
    """Linearly map ``min..max`` to 0..255; a constant image keeps its value, clipped."""
    lo, hi = float(values.min()), float(values.max())
    if hi == lo:
        return np.full(values.shape, np.clip(round(lo), 0, 255), dtype=np.uint8)
    return np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """Greyscale 16-bit (``I;16*``), 32-bit int (``I``) or float (``F``) -> uint8 ``(H, W)``.

    Values are rescaled, never clipped: ``I;16*`` maps 0..65535 to 0..255; ``I`` does the same
    when every value lies in 0..65535 (Pillow < 10 decodes 16-bit PNGs as ``I``) and stretches
    min..max to 0..255 otherwise; ``F`` maps 0..1 to 0..255 when every value lies in [0, 1] and
    stretches min..max otherwise, with NaN and infinities read as 0.
    """
    values = np.asarray(img)
    if values.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    if img.mode.startswith("I;16"):
        return _quantise_16bit(values)
    if img.mode == "I":
        if values.min() >= 0 and values.max() <= 65535:
            return _quantise_16bit(values)
        return _stretch(values.astype(np.float64))
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if values.min() >= 0.0 and values.max() <= 1.0:
        return np.rint(values * 255.0).astype(np.uint8)
    return _stretch(values)


def _to_uint8(img: Image.Image, channels: int) -> np.ndarray:
    """A loaded PIL image of any mode -> uint8 ``(H, W, channels)`` (RGB or PIL "L" luma)."""
    if img.mode in _HIGH_DEPTH_MODES:
        grey = _high_depth_to_uint8(img)[:, :, None]
        return grey if channels == 1 else np.repeat(grey, 3, axis=2)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        # Through RGBA so palette/tRNS transparency is honoured, then onto the background.
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, _BACKGROUND), rgba).convert("RGB")
    target = "RGB" if channels == 3 else "L"
    if target == "L" and img.mode not in ("1", "L", "P", "RGB"):
        # Pillow has no direct route to L from every mode (CMYK, YCbCr, LAB...); RGB has one.
        img = img.convert("RGB")
    array = np.asarray(img.convert(target) if img.mode != target else img, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def _upright(img: Image.Image) -> tuple[Image.Image, bool]:
    """Apply the EXIF orientation so pixels stand as a viewer shows them; (image, rotated?)."""
    try:
        orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception:
        # Corrupt EXIF must not condemn good pixels: fall back to the stored orientation.
        return img, False
    if orientation not in range(2, 9):
        return img, False
    return ImageOps.exif_transpose(img), True


def _file_size(source: str | os.PathLike[str] | bytes) -> int | None:
    if isinstance(source, bytes):
        return len(source)
    try:
        return os.stat(source).st_size
    except OSError:
        return None


def _classify(err: Exception, size: int | None, converting: bool) -> str:
    """The BROKEN_REASONS category of a decoding failure."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return UNREADABLE
    if size == 0:
        return ZERO_BYTE
    if isinstance(err, UnidentifiedImageError):
        return NOT_AN_IMAGE
    if isinstance(err, Image.DecompressionBombError):
        return TOO_LARGE
    if converting:
        return UNSUPPORTED_MODE
    if isinstance(err, EOFError) or "truncated" in str(err).lower():
        return TRUNCATED
    return CORRUPT


def read_image(
    source: str | os.PathLike[str] | bytes, channels: int = 3, *, name: str | None = None
) -> DecodedImage:
    """Fully decode an image file (path or its bytes) to upright uint8 ``(H, W, channels)``.

    Odd modes are converted (see ``ImageFolderDataset``). The whole file is decoded, so a
    truncated file fails here rather than later; Pillow's ``LOAD_TRUNCATED_IMAGES`` is left
    alone (and should stay off: it would feed half-grey images to training). Raises
    ``BrokenImageError`` naming ``name`` (default: the path) and the reason on any failure.
    """
    name = name if name is not None else ("<bytes>" if isinstance(source, bytes) else str(source))
    converting = False
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(fp) as img:
            img.load()
            mode = img.mode
            upright, rotated = _upright(img)
            converting = True
            pixels = _to_uint8(upright, channels)
    except Exception as err:
        # Pillow's plugins signal malformed input with a zoo of types (OSError, SyntaxError,
        # ValueError, struct.error, EOFError, IndexError...): any of them condemns this file
        # only. A systematic bug still surfaces: NoReadableImageError carries the reasons.
        reason = _classify(err, _file_size(source), converting)
        raise BrokenImageError(name, reason, f"{type(err).__name__}: {err}") from err
    return DecodedImage(pixels, mode, rotated)


def decode_image(path: str | os.PathLike[str], channels: int = 3) -> torch.Tensor:
    """Decode an image file to a uint8 tensor ``(channels, H, W)``; see ``read_image``."""
    pixels = read_image(path, channels).pixels
    # np.array copies into a writable C-contiguous buffer (np.asarray(img) is read-only).
    return torch.from_numpy(np.array(pixels.transpose(2, 0, 1), order="C"))


# --------------------------------------------------------------------------- skip record


def _append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append ``line`` with one O_APPEND write, so lines from several processes never mix."""
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_skip_log(path: str | os.PathLike[str]) -> dict[str, str]:
    """Skipped files recorded in a skip log: ``{path: reason}``, first record of each path.

    The log is JSON lines ``{"path", "reason", "detail"}`` written by every process that
    decodes (DataLoader workers included); a path appears once per process that met it, hence
    the de-duplication. A missing log means nothing was skipped; unparsable lines (a process
    killed mid-write) are ignored.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    found: dict[str, str] = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
            found.setdefault(str(record["path"]), str(record["reason"]))
        except (ValueError, KeyError, TypeError):
            continue
    return found


class ImageFolderDataset(Dataset):
    """Images found recursively under ``root``, decoded lazily to uint8 ``(channels, H, W)``.

    Labelled mode: when no image lies directly in ``root``, each top-level sub-folder holding
    at least one image (at any depth) is a class; targets are 0..C-1 in sorted folder-name
    order. Unlabelled mode: when any image lies directly in ``root``, every target is -1 and
    ``classes`` is empty. ``channels`` is 3 (RGB) or 1 (greyscale, PIL "L" luma).

    Decoding: EXIF orientation is applied (pixels come out upright); palette, CMYK, 1-bit and
    other 8-bit modes are converted by Pillow; transparency (RGBA, LA, palette or tRNS) is
    composited onto white; 16-bit, 32-bit int and float greyscale are rescaled to 0..255
    (see ``_high_depth_to_uint8``), never clipped.

    Broken files (zero-byte, truncated, not an image, undecodable) do not stop training: sample
    ``i`` is then served by the next readable sample ``i+1, i+2, ...`` (wrapping), image and
    target together, so substitution is deterministic. Each broken path is recorded in
    ``skipped`` (``{path: reason}``, this process only) and, when ``skip_log`` is set, appended
    as a JSON line to that file, which DataLoader workers share (read it with
    ``read_skip_log``). ``skip_count`` counts samples served by substitution in this process.
    The first skip warns (``BrokenImageWarning``) once per dataset and process. When no file
    decodes, ``NoReadableImageError`` names ``root``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        channels: int = 3,
        skip_log: str | os.PathLike[str] | None = None,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.root = Path(root)
        self.channels = channels
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.root} does not exist or is not a directory"
            )
        paths = _scan_images(self.root)
        if not paths:
            exts = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise FileNotFoundError(f"no image files ({exts}) found under {self.root}")

        relative = [p.relative_to(self.root).parts for p in paths]
        if any(len(parts) == 1 for parts in relative):
            self.classes: list[str] = []
            targets = [-1] * len(paths)
        else:
            self.classes = sorted({parts[0] for parts in relative})
            index = {name: k for k, name in enumerate(self.classes)}
            targets = [index[parts[0]] for parts in relative]
        self.samples: list[tuple[str, int]] = [
            (str(p), t) for p, t in zip(paths, targets, strict=True)
        ]
        self.targets = torch.tensor(targets, dtype=torch.int64)
        self.skip_log: str | os.PathLike[str] | None = skip_log
        self.skipped: dict[str, str] = {}
        self.skip_count = 0
        self._warned = False
        self._log_failed = False

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.samples)
        index = operator.index(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        for step in range(n):
            k = (index + step) % n
            image = self.try_decode(k)
            if image is not None:
                if step:
                    self.skip_count += 1
                return image, self.samples[k][1]
        raise NoReadableImageError(
            f"no readable image in {self.root}: all {n} image files failed to decode "
            f"({_reason_counts(self.skipped)}). Run `wcl check-data {self.root}` for a "
            "report of every file."
        )

    def try_decode(self, index: int) -> torch.Tensor | None:
        """Sample ``index``'s image ``(channels, H, W)`` uint8, or None (recorded) if broken.

        A file already found broken in this process is not decoded again.
        """
        path = self.samples[index][0]
        if path in self.skipped:
            return None
        try:
            return decode_image(path, self.channels)
        except BrokenImageError as err:
            self._record_broken(err)
            return None

    def _record_broken(self, err: BrokenImageError) -> None:
        self.skipped[err.path] = err.reason
        if self.skip_log is not None:
            line = json.dumps({"path": err.path, "reason": err.reason, "detail": err.detail})
            try:
                _append_line(self.skip_log, line)
            except OSError as log_err:
                if not self._log_failed:
                    self._log_failed = True
                    warnings.warn(
                        f"cannot append to skip log {self.skip_log}: {log_err}",
                        BrokenImageWarning,
                        stacklevel=3,
                    )
        if not self._warned:
            self._warned = True
            where = f" and appended to {self.skip_log}" if self.skip_log is not None else ""
            warnings.warn(
                f"skipping broken image {err} and serving the next readable sample instead. "
                f"Later skips in this process are not warned about; they are recorded in "
                f"the dataset's `skipped`{where}. `wcl check-data {self.root}` lists all "
                "broken files.",
                BrokenImageWarning,
                stacklevel=3,
            )


def _reason_counts(skipped: dict[str, str]) -> str:
    """``"truncated: 3, zero-byte: 1"``: how many recorded files fall in each category."""
    counts = Counter(skipped.values())
    return ", ".join(f"{reason}: {count}" for reason, count in counts.most_common())


def unwrap_image_folder(dataset: object) -> ImageFolderDataset | None:
    """The ImageFolderDataset inside wrappers (``TwoViews.base``, ``Subset.dataset``), or None."""
    for _ in range(32):  # wrappers do not nest deeper; the bound guards against cycles
        if isinstance(dataset, ImageFolderDataset):
            return dataset
        # No `or` between the two: a wrapped dataset of length 0 is falsy.
        inner = getattr(dataset, "base", None)
        if inner is None:
            inner = getattr(dataset, "dataset", None)
        if inner is None:
            return None
        dataset = inner
    return None


def _spread(n: int, limit: int | None) -> list[int]:
    """Up to ``limit`` indices of ``range(n)`` spread evenly, first and last included, in order."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    return sorted({round(x) for x in np.linspace(0, n - 1, limit)})


def first_readable(
    dataset: Dataset | str | os.PathLike[str], limit: int | None = 32, channels: int = 3
) -> int:
    """Index of the first readable sample; a pre-flight check before a long run.

    ``dataset``: an ImageFolderDataset (possibly wrapped, e.g. in TwoViews or Subset) or a
    folder path (read with ``channels``). Up to ``limit`` samples spread evenly over the data
    set are decoded in index order (``None``: every sample), so one broken class folder at the
    start does not hide a healthy rest; broken ones met are recorded as in ``__getitem__``.
    Returns the index (into the image folder) of the first that decodes. Raises
    ``NoReadableImageError`` naming the folder, the number tried and the failure reasons
    when none does. Datasets that are not image folders are held in memory: any non-empty
    one passes (index 0).
    """
    if isinstance(dataset, (str, os.PathLike)):
        folder: ImageFolderDataset | None = ImageFolderDataset(dataset, channels)
    else:
        folder = unwrap_image_folder(dataset)
    if folder is None:
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise NoReadableImageError("the training data set is empty")
        return 0
    indices = _spread(len(folder), limit)
    for k in indices:
        if folder.try_decode(k) is not None:
            return k
    tried = {folder.samples[k][0]: folder.skipped.get(folder.samples[k][0], "?") for k in indices}
    sampled = "" if len(indices) == len(folder) else " (spread evenly over the data set)"
    raise NoReadableImageError(
        f"no readable image in {folder.root}: none of the {len(indices)} of {len(folder)} "
        f"image files tried{sampled} could be decoded ({_reason_counts(tried)}; e.g. "
        f"{folder.samples[indices[0]][0]}). Run `wcl check-data {folder.root}` for a report "
        "of every file."
    )


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
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 (N, H, W) images, got {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(
            f"{labels_path}: {labels.shape[0] if labels.ndim else 0} labels for "
            f"{images.shape[0]} images in {images_path}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES)):
        raise ValueError(f"{labels_path}: labels outside 0..{len(FASHION_MNIST_CLASSES) - 1}")
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


def _split_dir(root: Path, train: bool) -> Path:
    """Pick ``root/train`` vs ``root/val`` (or ``root/test``) when ``root`` has that layout."""
    evaluation = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and evaluation is not None:
        return root / "train" if train else evaluation
    return root


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
        _split_dir(Path(_need_root("folder", root)), train), channels
    ),
}

DATASET_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_dataset(
    name: str,
    root: str | None,
    train: bool = True,
    download: bool = False,
    channels: int = 3,
) -> Dataset:
    """Build a dataset by name: fashion_mnist, cifar10, cifar100, stl10 or folder.

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
    return builder(root, train, download, channels)


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
