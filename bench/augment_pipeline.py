"""Data pipeline throughput: two-view images/s of the weak and strong augmentations.

``python bench/augment_pipeline.py [--quick] [--images N] [--reps R] [--out PATH]``

Three ways to make the two augmented views of every image, on the same uint8 images:

(a) ``pil-v1``: the release's pipeline, PIL + torchvision.transforms (v1), per image in a
    DataLoader with 0, 1 and 2 workers: ToPILImage, RandomResizedCrop, RandomApply(ColorJitter,
    p=0.8), RandomGrayscale(0.2), RandomApply(GaussianBlur, p=blur), horizontal flip, ToTensor,
    Normalize, in the release's order; the blur is MoCo v2's PIL ``ImageFilter.GaussianBlur``
    (radius = sigma), the fast one, not v1's tensor convolution. On greyscale images it runs the same ops (PIL makes
    saturation, hue and greyscale no-ops on mode "L", but they still cost a little).
(b) ``v2-per-image``: wcl's per-image v2 pipelines through ``TwoViews``, same workers.
(c) ``batch``: :class:`wcl.data.BatchAugment` in the main process on whole batches of 256,
    seeds (``two_view_seeds``) included. ``batch, loader`` reads uint8 images and indices
    through a DataLoader (0 workers) as a trainer would; ``batch, aug only`` slices the
    uint8 tensor directly.

Data: Fashion-MNIST (28 px greyscale, from ``wcl.data.load_fashion_mnist``), "photos32":
CIFAR-like 32 px RGB tiles cut from the test fixture photos, and "photos224": scikit-learn's
two 640 x 427 sample photos (cycled, an eighth as many images, batches of 32) augmented to
224 px as for ImageNet; the batched path needs equal-sized images, so it skips photos224.
All three get (d) ``hybrid`` (``data.augment=hybrid``, what image folders of any size can
use: the crop per image in the workers, the rest batched): "workers' part" is what the
DataLoader must deliver when a GPU does the rest, "all on the CPU" adds the batched rest
in the main process on this CPU (a CPU-only machine's case). "images/s" counts source images,
each turned into two views. Each figure is the median of ``--reps`` timed passes over the
images; workers are persistent and warmed up by one untimed pass, so start-up is excluded.
The main process uses ``--threads`` torch threads (default 1: on a small shared machine
intra-op threads mostly contend; DataLoader workers always use 1). Ratios are against (a)
with 0 workers in the same run. Results: a markdown table on stdout and a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as v1
from torchvision.transforms.v2 import functional as TF

from wcl.data import (
    BatchAugment,
    TwoViews,
    batch_strong_pipeline,
    batch_weak_pipeline,
    dataset_stats,
    decode_image,
    load_fashion_mnist,
    strong_pipeline,
    two_view_seeds,
    weak_pipeline,
)
from wcl.data.views import TrainingViews

BATCH = 256
PHOTOS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "photos"
WORKERS = (0, 1, 2)


class Images(Dataset):
    """uint8 ``(N, C, H, W)`` images as ``(image, index)`` samples."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], index


class PilTwoViews(Dataset):
    """Two views per image from a PIL pipeline: ``(view1, view2, index)``."""

    def __init__(self, images: torch.Tensor, transform: Callable) -> None:
        self.images = images
        self.transform = transform
        self.to_pil = v1.ToPILImage()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image = self.to_pil(self.images[index])  # once per image, as a PIL dataset would load
        return self.transform(image), self.transform(image), index


class PilGaussianBlur:
    """MoCo v2's blur, which its descendants' PIL pipelines use: PIL's ImageFilter with
    radius = sigma ~ U(0.1, 2.0). Several times faster than v1.GaussianBlur, which converts
    a PIL image to a tensor and convolves with a k x k kernel."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


def release_pipeline(size: int, mean, std, strong: bool, blur_prob: float = 0.5) -> v1.Compose:
    """The release's PIL + v1 augmentation (MoCo v2 weak / SimCLR strong) at ``size`` pixels."""
    crop = v1.RandomResizedCrop(size, scale=(0.08 if strong else 0.2, 1.0))
    strengths = (0.8, 0.8, 0.8, 0.2) if strong else (0.4, 0.4, 0.4, 0.1)
    jitter = v1.RandomApply([v1.ColorJitter(*strengths)], p=0.8)
    blur = v1.RandomApply([PilGaussianBlur()], p=blur_prob)
    flip = v1.RandomHorizontalFlip()
    ops = [crop, flip, jitter, v1.RandomGrayscale(0.2), blur]
    if not strong:
        ops = [crop, jitter, v1.RandomGrayscale(0.2), blur, flip]
    return v1.Compose([*ops, v1.ToTensor(), v1.Normalize(mean, std)])


def fashion_images(count: int) -> torch.Tensor:
    return load_fashion_mnist().images[:count]


def photo_tiles(count: int, side: int = 32, stride: int = 8) -> torch.Tensor:
    """``count`` CIFAR-like ``side``-px RGB tiles of the fixture photos (cycled), uint8."""
    tiles = []
    for path in sorted(p for p in PHOTOS.iterdir() if p.suffix in (".png", ".jpg")):
        photo = decode_image(path, channels=3)
        _, height, width = photo.shape
        for top in range(0, height - side + 1, stride):
            for left in range(0, width - side + 1, stride):
                tiles.append(TF.crop(photo, top, left, side, side))
    return torch.stack([tiles[i % len(tiles)] for i in range(count)])


def full_photos(count: int) -> list[torch.Tensor]:
    """``count`` uint8 (3, 427, 640) photos: scikit-learn's two sample images, cycled."""
    from sklearn.datasets import load_sample_images

    photos = [
        torch.from_numpy(p.copy()).permute(2, 0, 1).contiguous()
        for p in load_sample_images().images
    ]
    return [photos[i % len(photos)] for i in range(count)]


def time_passes(run_pass: Callable[[], int], reps: int, warm_up: bool) -> list[float]:
    """Images/s of ``reps`` timed calls of ``run_pass`` (returns images done)."""
    if warm_up:
        run_pass()
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        done = run_pass()
        rates.append(done / (time.perf_counter() - start))
    return rates


def loader_pass(dataset: Dataset, workers: int, batch: int = BATCH) -> Callable[[], int]:
    loader = DataLoader(
        dataset,
        batch_size=batch,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers else None,
    )

    def run() -> int:
        done = 0
        for batch in loader:
            done += len(batch[-1])
        return done

    return run


def hybrid_pass(views: TrainingViews, workers: int, batch: int, whole: bool) -> Callable[[], int]:
    """data.augment=hybrid: per-image crops in the workers; with ``whole``, the batched rest
    of the pipeline too (here on the CPU), else only what the workers must deliver."""
    loader = DataLoader(views.dataset, batch_size=batch, num_workers=workers,
                        persistent_workers=workers > 0, prefetch_factor=2 if workers else None)  # fmt: skip

    def run() -> int:
        done = 0
        for loaded in loader:
            if whole:
                views.make(loaded, torch.device("cpu"))
            done += len(loaded[-1])
        return done

    return run


def batch_loader_pass(images: torch.Tensor, aug: BatchAugment) -> Callable[[], int]:
    """uint8 images + indices through a DataLoader (main process), then two batched views."""
    loader = DataLoader(Images(images), batch_size=BATCH, num_workers=0)
    epoch = [0]

    def run() -> int:
        done = 0
        for batch, indices in loader:
            seeds1, seeds2 = two_view_seeds(0, epoch[0], indices)
            aug(batch, seeds1), aug(batch, seeds2)
            done += len(batch)
        epoch[0] += 1
        return done

    return run


def batch_only_pass(images: torch.Tensor, aug: BatchAugment) -> Callable[[], int]:
    """Two batched views of consecutive slices of the uint8 tensor, seeds included."""
    epoch = [0]

    def run() -> int:
        for start in range(0, len(images), BATCH):
            indices = range(start, min(start + BATCH, len(images)))
            seeds1, seeds2 = two_view_seeds(0, epoch[0], indices)
            batch = images[start : start + BATCH]
            aug(batch, seeds1), aug(batch, seeds2)
        epoch[0] += 1
        return len(images)

    return run


def measure(
    name: str, images: torch.Tensor | list[torch.Tensor], stats_name: str, reps: int,
    size: int | None = None, batch: int = BATCH,
) -> dict[str, dict]:  # fmt: skip
    """All methods on one data set, weak and strong: {column: {row: [images/s per rep]}}.
    ``images``: a uint8 (N, C, H, W) tensor, or a list of (C, H, W) of any sizes (then no
    batched path); ``size``: output side (default: the images' own)."""
    size = size or images[0].shape[-1]
    mean, std = dataset_stats(stats_name, images[0].shape[0])
    results: dict[str, dict] = {}
    for strong in (False, True):
        column = f"{name} {'strong' if strong else 'weak'}"
        per_image = (strong_pipeline if strong else weak_pipeline)(size, mean, std)
        batched = (batch_strong_pipeline if strong else batch_weak_pipeline)(size, mean, std)
        pil = PilTwoViews(images, release_pipeline(size, mean, std, strong))
        v2_views = TwoViews(Images(images), per_image, seed=0)
        rows: dict[str, list[float]] = {}
        for workers in WORKERS:
            rows[f"(a) pil-v1, {workers} workers"] = time_passes(
                loader_pass(pil, workers, batch), reps, warm_up=workers > 0
            )
        for workers in WORKERS:
            rows[f"(b) v2-per-image, {workers} workers"] = time_passes(
                loader_pass(v2_views, workers, batch), reps, warm_up=workers > 0
            )
        if isinstance(images, torch.Tensor):
            rows["(c) batch, loader"] = time_passes(batch_loader_pass(images, batched), reps, True)
            rows["(c) batch, aug only"] = time_passes(batch_only_pass(images, batched), reps, True)
        low = 0.08 if strong else 0.2
        hybrid = TrainingViews(Images(images), "hybrid", size, mean, std, weak_min_scale=low,
                               strong_min_scale=low, jitter=1.0, blur_prob=0.5, seed=0)  # fmt: skip
        for workers in WORKERS:
            rows[f"(d) hybrid, workers' part, {workers} workers"] = time_passes(
                hybrid_pass(hybrid, workers, batch, whole=False), reps, warm_up=workers > 0
            )
        for workers in (0, 2):
            rows[f"(d) hybrid, all on the CPU, {workers} workers"] = time_passes(
                hybrid_pass(hybrid, workers, batch, whole=True), reps, warm_up=workers > 0
            )
        results[column] = rows
        best = {k: round(statistics.median(v)) for k, v in rows.items()}
        print(f"  {column}: {best}", flush=True)
    return results


def markdown(results: dict[str, dict]) -> str:
    columns = list(results)
    rows = list(dict.fromkeys(row for column in results.values() for row in column))
    lines = [
        "| method | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for row in rows:
        cells = []
        for column in columns:
            if row not in results[column]:
                cells.append("n/a")
                continue
            base = statistics.median(results[column]["(a) pil-v1, 0 workers"])
            value = statistics.median(results[column][row])
            cells.append(f"{value:,.0f} ({value / base:.1f}x)")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and reps (~20 s)")
    parser.add_argument("--images", type=int, help="images per data set (default 1536; quick 384)")
    parser.add_argument("--reps", type=int, help="timed passes per figure (default 3; quick 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, main process")
    parser.add_argument("--skip-224", action="store_true", help="leave out photos224")
    parser.add_argument("--out", type=Path, help="JSON path (default runs/bench/...)")
    args = parser.parse_args()
    count = args.images or (384 if args.quick else 1536)
    reps = args.reps or (2 if args.quick else 3)
    out = args.out or Path("runs/bench") / (
        "augment_pipeline-quick.json" if args.quick else "augment_pipeline.json"
    )
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"{count} images per data set, {reps} reps, batch {BATCH}, load average {load}")

    start = time.perf_counter()
    results = measure("fashion-mnist", fashion_images(count), "fashion_mnist", reps)
    results |= measure("photos32", photo_tiles(count), "cifar10", reps)
    if not args.skip_224:
        results |= measure(
            "photos224", full_photos(count // 8), "imagenet", reps, size=224, batch=32
        )
    seconds = time.perf_counter() - start

    table = markdown(results)
    print(f"\nTwo-view images/s (median of {reps}); ratio vs (a) with 0 workers:\n")
    print(table)
    record = {
        "images": count,
        "reps": reps,
        "batch_size": BATCH,
        "main_threads": args.threads,
        "load_average_before": load,
        "load_average_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "seconds": round(seconds, 1),
        "images_per_s": results,
        "median_images_per_s": {
            c: {r: statistics.median(v) for r, v in rows.items()} for c, rows in results.items()
        },
        "table": table,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{seconds:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
