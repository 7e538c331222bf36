"""Embeddings of a folder of images: backbone features saved as a NumPy array + a path list."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wcl.atomic import atomic_write
from wcl.data import BROKEN, ImageFolderDataset, first_readable, read_skip_log
from wcl.eval.common import resolve_device
from wcl.eval.features import extract_features
from wcl.precision import amp_dtype
from wcl.preprocess import preprocessing
from wcl.weights import load_backbone

__all__ = ["EmbedResult", "embed_images", "embedding_paths", "skipped_path"]


@dataclass
class EmbedResult:
    array: Path  # (N, C) float32 .npy
    paths: Path  # N lines, the image files in row order
    count: int
    dim: int
    skipped: dict[str, str]  # {path: reason} of the files that did not decode (no row)
    skipped_list: Path | None  # X.skipped.jsonl listing them, None when there are none


def embedding_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """(``X.npy``, ``X.txt``) for ``--out X`` or ``--out X.npy``."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".npy" else out
    return stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".txt")


def skipped_path(out: str | os.PathLike) -> Path:
    """``X.skipped.jsonl`` beside ``X.npy``: one JSON line {"path", "reason", "detail"} per
    image file that did not decode and so has no row."""
    array, _ = embedding_paths(out)
    return array.with_name(array.stem + ".skipped.jsonl")


def embed_images(
    checkpoint: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    normalize: bool = False,
    batch_size: int = 256,
    device: str = "auto",
    workers: int = 0,
    image_size: int | None = None,
    resize: int | None = None,
    amp: str = "auto",
    progress: bool = True,
) -> EmbedResult:
    """Backbone features of every image under ``images`` (recursive, sorted by path).

    Each image is resized (short side to ``resize``) and centre-cropped to ``image_size``
    (defaults: the pre-training image size, and 256/224 of it for the ImageNet stem, so
    Resize(256) + CenterCrop(224); no extra resize for the small-image stem), then
    normalised with the pre-training dataset's statistics. ``normalize`` L2-normalises the
    rows; ``amp`` "auto" runs the backbone in bfloat16 on a GPU (float16 on GPUs older than
    compute capability 8; "off": float32, see :func:`wcl.precision.amp_dtype`). Writes ``out``
    (.npy, float32 (N, C)) and the image paths, one a line, beside it.

    A file that does not decode gets no row (never another image's vector): it is listed
    with its reason in ``X.skipped.jsonl`` (see :func:`skipped_path`; a list left by an
    earlier run is removed). Path lines are the file names' bytes, so a name that is not
    UTF-8 comes out as it is on disk.
    """
    dev = resolve_device(device, "--device")  # before anything is read
    loaded = load_backbone(checkpoint)
    spec = loaded.spec
    transform = preprocessing(spec, loaded.config, image_size, resize).transform()
    array_path, list_path = embedding_paths(out)
    array_path.parent.mkdir(parents=True, exist_ok=True)
    log = skipped_path(out)
    log.unlink(missing_ok=True)
    dataset = ImageFolderDataset(images, channels=spec.in_channels, skip_log=log, substitute=False)
    first_readable(dataset)  # a folder of broken files: NoReadableImageError naming it
    module = loaded.module.to(dev)
    feats, targets = extract_features(
        module,
        dataset,
        transform,
        batch_size,
        dev,
        workers,
        progress,
        amp=amp_dtype(amp, dev),
        desc="embed",
        keep_broken_rows=True,
    )
    readable = (targets != BROKEN).tolist()
    feats = feats[torch.tensor(readable)]
    if normalize:
        feats = F.normalize(feats, dim=1)
    atomic_write(array_path, lambda f: np.save(f, feats.numpy()))
    kept = [path for (path, _), ok in zip(dataset.samples, readable, strict=True) if ok]
    lines = b"".join(os.fsencode(path) + b"\n" for path in kept)
    atomic_write(list_path, lambda f: f.write(lines))
    reasons = read_skip_log(log)
    skipped = {
        p: reasons.get(p, "broken")
        for (p, _), ok in zip(dataset.samples, readable, strict=True)
        if not ok
    }
    return EmbedResult(
        array_path, list_path, feats.shape[0], feats.shape[1], skipped, log if skipped else None
    )
