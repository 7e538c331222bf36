"""Data loading (IDX, image folders, torchvision datasets) and contrastive augmentations."""

from wcl.data.augment import (
    TwoViews,
    blur_kernel_size,
    eval_pipeline,
    sample_seed,
    strong_pipeline,
    weak_pipeline,
)
from wcl.data.datasets import (
    DATASET_NAMES,
    DATASET_STATS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    IMAGE_EXTENSIONS,
    ImageFolderDataset,
    TensorImageDataset,
    build_dataset,
    dataset_stats,
    load_fashion_mnist,
    load_torchvision_dataset,
    read_idx,
)

__all__ = [
    "DATASET_NAMES",
    "DATASET_STATS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "TensorImageDataset",
    "TwoViews",
    "blur_kernel_size",
    "build_dataset",
    "dataset_stats",
    "eval_pipeline",
    "load_fashion_mnist",
    "load_torchvision_dataset",
    "read_idx",
    "sample_seed",
    "strong_pipeline",
    "weak_pipeline",
]
