"""Image decoding: one file (a path or its bytes) to upright uint8 pixels, or a BrokenImageError.

Every failure is classified into one of ``BROKEN_REASONS``, the categories the skip log and
``wcl check-data`` report.
"""

from __future__ import annotations

import io
import os
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "BROKEN_REASONS",
    "BrokenImageError",
    "BrokenImageWarning",
    "DecodedImage",
    "decode_image",
    "read_image",
]

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
    when every value lies in 0..65535 (Pillow < 10.3 opens 16-bit PNGs as ``I``) and stretches
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
    # A system error on the file itself (missing, no permission, a symlink loop, EIO), as
    # check-data names it; Pillow's format errors carry no errno.
    if isinstance(err, OSError) and err.errno is not None or size is None:
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
