"""Data loading (IDX, image folders, torchvision datasets) and contrastive augmentations."""

from wcl.data.augment import (
    ColourJitter,
    GaussianBlur,
    TwoViews,
    WithIndex,
    blur_kernel_size,
    eval_pipeline,
    strong_pipeline,
    weak_pipeline,
)
from wcl.data.batch_augment import (
    BatchAugment,
    batch_strong_pipeline,
    batch_weak_pipeline,
)
from wcl.data.check import BrokenFile, DataReport, SizeStats, check_data
from wcl.data.datasets import (
    DATASET_NAMES,
    DATASET_STATS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    TensorImageDataset,
    build_dataset,
    dataset_stats,
    load_fashion_mnist,
    load_torchvision_dataset,
    read_idx,
)
from wcl.data.decode import (
    BROKEN_REASONS,
    BrokenImageError,
    BrokenImageWarning,
    DecodedImage,
    decode_image,
    read_image,
)
from wcl.data.folder import (
    IMAGE_EXTENSIONS,
    ImageFolderDataset,
    NoReadableImageError,
    first_readable,
    read_skip_log,
    unwrap_image_folder,
)
from wcl.data.seeds import sample_seed, two_view_seeds

__all__ = [
    "WithIndex",
    "BROKEN_REASONS",
    "DATASET_NAMES",
    "DATASET_STATS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "IMAGE_EXTENSIONS",
    "BatchAugment",
    "ColourJitter",
    "GaussianBlur",
    "BrokenFile",
    "BrokenImageError",
    "BrokenImageWarning",
    "DataReport",
    "DecodedImage",
    "ImageFolderDataset",
    "NoReadableImageError",
    "SizeStats",
    "TensorImageDataset",
    "TwoViews",
    "batch_strong_pipeline",
    "batch_weak_pipeline",
    "blur_kernel_size",
    "build_dataset",
    "check_data",
    "dataset_stats",
    "decode_image",
    "eval_pipeline",
    "first_readable",
    "load_fashion_mnist",
    "load_torchvision_dataset",
    "read_idx",
    "read_image",
    "read_skip_log",
    "sample_seed",
    "strong_pipeline",
    "two_view_seeds",
    "unwrap_image_folder",
    "weak_pipeline",
]
