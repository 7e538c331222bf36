"""Image folders: the image files found under a root, served as a dataset that skips broken ones.

Broken files are recorded per process (``ImageFolderDataset.skipped``) and in a shared JSON-lines
skip log (``read_skip_log``); ``first_readable`` is the pre-flight check before a long run.
"""

from __future__ import annotations

import json
import operator
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from wcl.data.decode import BrokenImageError, BrokenImageWarning, decode_image
from wcl.data.errors import DataError

__all__ = [
    "BROKEN",
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "NoReadableImageError",
    "collate_marking_broken",
    "collate_readable",
    "first_readable",
    "is_image_file",
    "read_skip_log",
    "split_dir",
    "unwrap_image_folder",
    "walk_files",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)


class NoReadableImageError(DataError, RuntimeError):
    """No file of an image folder could be decoded (or none of those tried).

    A :class:`~wcl.data.errors.DataError` (``wcl`` prints one line, exit 2), and still the
    RuntimeError it always was."""


def is_image_file(name: str) -> bool:
    """Whether a file name is a non-hidden image by its extension (IMAGE_EXTENSIONS)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def walk_files(directory: Path) -> Iterator[Path]:
    """Every non-hidden file under ``directory`` (recursive, hidden folders pruned), unsorted."""
    for dirpath, dirnames, filenames in os.walk(directory):
        # Pruning in place stops os.walk from descending into hidden folders (.git, .cache...).
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        yield from (Path(dirpath, f) for f in filenames if not f.startswith("."))


def _scan_images(directory: Path) -> list[Path]:
    """All image files under ``directory`` (recursive, hidden entries skipped), sorted by path."""
    found = [p for p in walk_files(directory) if is_image_file(p.name)]
    # Sorting on relative POSIX parts keeps the order independent of the OS and of os.walk.
    return sorted(found, key=lambda p: p.relative_to(directory).parts)


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

    Broken files (zero-byte, truncated, not an image, undecodable) do not stop training: with
    ``substitute`` (for pre-training) sample ``i`` is then served by the next readable sample
    ``i+1, i+2, ...`` (wrapping), image and target together, so substitution is
    deterministic. Without it (evaluation, embeddings: any output per image or accuracy)
    a broken sample is served as ``(None, target)``, which :func:`collate_readable` and
    :func:`collate_marking_broken` leave out of the batch. Each broken path is recorded in
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
        substitute: bool = True,
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
        self.empty_classes: list[str] = []  # class folders holding no image file
        if any(len(parts) == 1 for parts in relative):
            self.classes: list[str] = []
            targets = [-1] * len(paths)
        else:
            self.classes = sorted({parts[0] for parts in relative})
            self.empty_classes = sorted(
                d.name for d in self.root.iterdir()
                if d.is_dir() and not d.name.startswith(".") and d.name not in self.classes
            )  # fmt: skip
            if self.empty_classes:
                warnings.warn(
                    f"{self.root}: class folder(s) {self.empty_classes} hold no image file "
                    f"and are left out; the {len(self.classes)} classes are the other folders",
                    BrokenImageWarning,
                    stacklevel=2,
                )
            index = {name: k for k, name in enumerate(self.classes)}
            targets = [index[parts[0]] for parts in relative]
        self.samples: list[tuple[str, int]] = [
            (str(p), t) for p, t in zip(paths, targets, strict=True)
        ]
        self.targets = torch.tensor(targets, dtype=torch.int64)
        self.skip_log: str | os.PathLike[str] | None = skip_log
        self.substitute = substitute
        self.skipped: dict[str, str] = {}
        self.skip_count = 0
        self._warned = False
        self._log_failed = False

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int]:
        n = len(self.samples)
        index = operator.index(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        if not self.substitute:
            return self.try_decode(index), self.samples[index][1]
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
        if not self._warned and self.substitute:
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


# The target that collate_marking_broken gives a broken image's row.
BROKEN = -2


def collate_readable(batch: list[tuple[torch.Tensor | None, int]]) -> list[torch.Tensor]:
    """``default_collate`` of the samples whose image decoded (a broken one is
    ``(None, target)``, see ``ImageFolderDataset(substitute=False)``): (images, targets)
    of the readable ones only. Raises NoReadableImageError if none is."""
    kept = [sample for sample in batch if sample[0] is not None]
    if not kept:
        raise NoReadableImageError(
            f"none of the {len(batch)} images of a batch could be decoded; run "
            "`wcl check-data` on the folder for a report of every file"
        )
    return default_collate(kept)


def collate_marking_broken(
    batch: list[tuple[torch.Tensor | None, int]],
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(images of the readable samples, or None if there is none; targets (B,) int64 of
    every sample, ``BROKEN`` where the image did not decode): for callers that must know
    which rows of a batch are missing (one output row per image)."""
    images = [image for image, _ in batch if image is not None]
    targets = torch.tensor([BROKEN if image is None else int(t) for image, t in batch])
    return (default_collate(images) if images else None), targets


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
    # Probing serves nothing in a broken file's place: no "serving the next readable sample"
    # warning (that comes with the first real substitution, if any).
    substitute, folder.substitute = folder.substitute, False
    try:
        for k in indices:
            if folder.try_decode(k) is not None:
                return k
    finally:
        folder.substitute = substitute
    tried = {folder.samples[k][0]: folder.skipped.get(folder.samples[k][0], "?") for k in indices}
    sampled = "" if len(indices) == len(folder) else " (spread evenly over the data set)"
    raise NoReadableImageError(
        f"no readable image in {folder.root}: none of the {len(indices)} of {len(folder)} "
        f"image files tried{sampled} could be decoded ({_reason_counts(tried)}; e.g. "
        f"{folder.samples[indices[0]][0]}). Run `wcl check-data {folder.root}` for a report "
        "of every file."
    )


def split_dir(root: Path, train: bool) -> Path:
    """Pick ``root/train`` vs ``root/val`` (or ``root/test``) when ``root`` has that layout."""
    evaluation = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and evaluation is not None:
        return root / "train" if train else evaluation
    return root
