"""Scan an image folder ahead of a long run: what will decode, what is broken and why.

``check_data(root)`` decodes every image file exactly as training does (``read_image``: full
decode, EXIF orientation, mode conversion) and returns a ``DataReport`` whose ``summary()``
is meant to be read before starting a week-long run and whose ``to_dict()`` is JSON-ready.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

from wcl.data.decode import UNREADABLE, BrokenImageError, read_image
from wcl.data.folder import ImageFolderDataset, is_image_file, split_dir, walk_files

__all__ = ["BrokenFile", "DataReport", "SizeStats", "check_data"]

# How many broken files / duplicate groups summary() spells out before "... and N more".
_LIST_LIMIT = 20

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BrokenFile:
    """A file that will not decode: ``reason`` is one of ``BROKEN_REASONS``."""

    path: str
    reason: str
    detail: str


@dataclass(frozen=True)
class SizeStats:
    """Minimum, median and maximum of a side length over the readable images, in pixels."""

    min: int
    median: float
    max: int

    @classmethod
    def of(cls, values: list[int]) -> SizeStats | None:
        if not values:
            return None
        array = np.asarray(values)
        return cls(int(array.min()), float(np.median(array)), int(array.max()))


@dataclass
class DataReport:
    """What ``check_data`` found under ``root``.

    Paths are as the dataset and the skip log spell them (``root`` joined with the relative
    path). ``classes`` / ``readable_per_class`` count image files / readable images per class
    folder (empty for an unlabelled folder). ``modes`` counts readable images by the PIL mode
    of their file; ``duplicates`` groups readable images with byte-identical content.
    """

    root: str
    channels: int
    files: int = 0
    ignored_files: int = 0
    readable: int = 0
    broken: list[BrokenFile] = field(default_factory=list)
    classes: dict[str, int] = field(default_factory=dict)
    empty_classes: list[str] = field(default_factory=list)  # class folders with no image
    readable_per_class: dict[str, int] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)
    exif_rotated: int = 0
    width: SizeStats | None = None
    height: SizeStats | None = None
    duplicates: list[list[str]] | None = None
    split_layout: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Every image file decodes (and there is at least one)."""
        return self.readable > 0 and not self.broken

    @property
    def usable(self) -> bool:
        """Training can start: at least one image decodes (broken ones would be skipped)."""
        return self.readable > 0

    @property
    def broken_by_reason(self) -> dict[str, int]:
        """Number of broken files per reason, most frequent first."""
        return dict(Counter(b.reason for b in self.broken).most_common())

    @property
    def converted(self) -> dict[str, int]:
        """Readable images per file mode other than the one training uses (RGB or L)."""
        target = "RGB" if self.channels == 3 else "L"
        return {mode: n for mode, n in self.modes.items() if mode != target}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, with the derived counts added."""
        out = asdict(self)
        out.update(
            ok=self.ok,
            usable=self.usable,
            broken_by_reason=self.broken_by_reason,
            converted=self.converted,
        )
        return out

    def summary(self) -> str:
        """Human-readable report, ending in a one-line verdict."""
        lines = [f"Data check of {self.root} (channels={self.channels}, {self.seconds:.1f} s)"]
        ignored = f", {self.ignored_files} other files ignored" if self.ignored_files else ""
        kind = f"{len(self.classes)} classes" if self.classes else "unlabelled"
        lines.append(f"  image files: {self.files} ({kind}{ignored})")
        if self.empty_classes:
            lines.append(f"  empty class folders (left out): {', '.join(self.empty_classes)}")
        lines.append(f"  readable:    {self.readable}")
        lines.append(f"  broken:      {len(self.broken)}")
        lines.extend(self._broken_lines())
        lines.extend(self._mode_lines())
        if self.width is not None and self.height is not None:
            w, h = self.width, self.height
            lines.append(
                f"  size (px):   width {w.min} / {w.median:g} / {w.max}, "
                f"height {h.min} / {h.median:g} / {h.max} (min / median / max)"
            )
        lines.extend(self._class_lines())
        lines.extend(self._duplicate_lines())
        if self.split_layout:
            lines.append(
                "  note: this folder has train/ and val/ (or test/) sub-folders, counted "
                "above as classes; training reads one split: check each split folder for "
                "its classes."
            )
        lines.append(self._verdict())
        return "\n".join(lines)

    def _relative(self, path: str) -> str:
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return path

    def _broken_lines(self) -> list[str]:
        if not self.broken:
            return []
        counts = ", ".join(f"{reason}: {n}" for reason, n in self.broken_by_reason.items())
        lines = [f"    by reason: {counts}"]
        for b in self.broken[:_LIST_LIMIT]:
            lines.append(f"    BROKEN {self._relative(b.path)}: {b.reason} ({b.detail})")
        if len(self.broken) > _LIST_LIMIT:
            lines.append(f"    ... and {len(self.broken) - _LIST_LIMIT} more (see the JSON)")
        return lines

    def _mode_lines(self) -> list[str]:
        if not self.modes:
            return []
        target = "RGB" if self.channels == 3 else "L"
        parts = [
            f"{mode} {n}" + ("" if mode == target else " (converted)")
            for mode, n in sorted(self.modes.items(), key=lambda kv: -kv[1])
        ]
        lines = [f"  modes:       {', '.join(parts)}"]
        if self.exif_rotated:
            lines.append(f"  EXIF-rotated: {self.exif_rotated} (turned upright when decoded)")
        return lines

    def _class_lines(self) -> list[str]:
        if not self.classes:
            return []
        readable = self.readable_per_class
        counts = sorted(readable.values())
        lines = [
            f"  per class:   {counts[0]} to {counts[-1]} readable images "
            f"(median {float(np.median(counts)):g})"
        ]
        width = max(len(name) for name in self.classes)
        for name, files in self.classes.items():
            bad = files - readable.get(name, 0)
            note = f"  ({bad} broken)" if bad else ""
            if readable.get(name, 0) == 0:
                note += "  NO READABLE IMAGE"
            lines.append(f"    {name:<{width}} {readable.get(name, 0):>7}{note}")
        return lines

    def _duplicate_lines(self) -> list[str]:
        if self.duplicates is None:
            return []
        if not self.duplicates:
            return ["  duplicates:  none (byte-identical content)"]
        extra = sum(len(group) - 1 for group in self.duplicates)
        lines = [
            f"  duplicates:  {len(self.duplicates)} groups of byte-identical images "
            f"({extra} redundant files)"
        ]
        for group in self.duplicates[:_LIST_LIMIT]:
            lines.append("    " + " = ".join(self._relative(p) for p in group))
        if len(self.duplicates) > _LIST_LIMIT:
            lines.append(f"    ... and {len(self.duplicates) - _LIST_LIMIT} more groups")
        return lines

    def _verdict(self) -> str:
        if not self.usable:
            return f"ERROR: no readable image in {self.root}; training would stop before it starts."
        if self.broken:
            return (
                f"WARNING: {len(self.broken)} broken files; training skips them, serving the "
                "next readable image in their place."
            )
        return "OK: every image file decodes."


@dataclass(frozen=True)
class _FileResult:
    """What checking one file found: either ``broken`` or the decoded facts."""

    path: str
    broken: BrokenFile | None = None
    mode: str = ""
    width: int = 0
    height: int = 0
    exif_rotated: bool = False
    digest: str | None = None


def _inspect(path: str, channels: int, digest: bool) -> _FileResult:
    """Read ``path`` once, decode it as training would and optionally hash its bytes."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return _FileResult(path, BrokenFile(path, UNREADABLE, f"{type(err).__name__}: {err}"))
    try:
        decoded = read_image(data, channels, name=path)
    except BrokenImageError as err:
        return _FileResult(path, BrokenFile(path, err.reason, err.detail))
    height, width = decoded.pixels.shape[:2]
    # blake2b is fast and, for 128 bits, collision-free in practice; content equality is all
    # that is needed, not security.
    key = hashlib.blake2b(data, digest_size=16).hexdigest() if digest else None
    return _FileResult(path, None, decoded.mode, width, height, decoded.exif_rotated, key)


def _ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads, in order, with a bounded number in flight.

    Threads suffice: Pillow's decoders, numpy and hashlib release the GIL on large buffers.
    The bound keeps memory flat on millions of files (``Executor.map`` submits all at once).
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    iterator = iter(items)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[R]] = deque()
        for item in iterator:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def check_data(
    root: str | os.PathLike[str],
    channels: int = 3,
    workers: int | None = None,
    progress: bool = True,
    duplicates: bool = True,
) -> DataReport:
    """Decode every image file under ``root`` as training would and report what was found.

    ``root`` is scanned like ``ImageFolderDataset`` (same files, same classes); ``channels``
    (1 or 3) is the conversion training will use. ``workers`` decoding threads (default: the
    CPU count, at most 8; 0 or 1 decodes inline). ``progress`` shows a tqdm bar on stderr.
    ``duplicates`` hashes file contents to group byte-identical readable images.
    Raises ``FileNotFoundError`` when ``root`` is missing or holds no image file at all.
    """
    start = time.perf_counter()
    dataset = ImageFolderDataset(root, channels)
    report = DataReport(root=str(dataset.root), channels=channels, files=len(dataset))
    report.ignored_files = sum(1 for p in walk_files(dataset.root) if not is_image_file(p.name))
    report.split_layout = split_dir(dataset.root, True) != dataset.root
    class_of = {path: target for path, target in dataset.samples}
    files_per_class = Counter(class_of.values())
    report.classes = {name: files_per_class[k] for k, name in enumerate(dataset.classes)}
    report.empty_classes = list(dataset.empty_classes)

    readable_per_class: Counter[int] = Counter()
    modes: Counter[str] = Counter()
    widths: list[int] = []
    heights: list[int] = []
    by_digest: defaultdict[str, list[str]] = defaultdict(list)
    n_workers = _default_workers() if workers is None else workers
    paths = [path for path, _ in dataset.samples]

    def inspect(path: str) -> _FileResult:
        return _inspect(path, channels, duplicates)

    with tqdm(total=len(paths), desc="check-data", unit="file", disable=not progress) as bar:
        for result in _ordered_map(inspect, paths, n_workers):
            bar.update(1)
            if result.broken is not None:
                report.broken.append(result.broken)
                bar.set_postfix(broken=len(report.broken), refresh=False)
                continue
            report.readable += 1
            readable_per_class[class_of[result.path]] += 1
            modes[result.mode] += 1
            report.exif_rotated += result.exif_rotated
            widths.append(result.width)
            heights.append(result.height)
            if result.digest is not None:
                by_digest[result.digest].append(result.path)

    report.readable_per_class = {
        name: readable_per_class[k] for k, name in enumerate(dataset.classes)
    }
    report.modes = dict(modes.most_common())
    report.width, report.height = SizeStats.of(widths), SizeStats.of(heights)
    if duplicates:
        groups = [sorted(group) for group in by_digest.values() if len(group) > 1]
        report.duplicates = sorted(groups)
    report.seconds = time.perf_counter() - start
    return report
