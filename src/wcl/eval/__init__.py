"""Evaluation of pre-trained backbones: linear probe, weighted kNN, fine-tuning, embeddings.

For online monitoring during pre-training, :func:`knn_monitor` (or its two parts,
:func:`extract_features` and :func:`knn_accuracy`) takes a backbone module and datasets::

    from wcl.data import build_dataset, dataset_stats, eval_pipeline
    from wcl.eval import knn_monitor
    transform = eval_pipeline(size, *dataset_stats(name, channels))
    acc = knn_monitor(model.backbone, train_set, test_set, transform, k=200, t=0.07)
    # {"top1": %, "top5": %}; the backbone's train/eval mode is restored
"""

from wcl.eval.config import (
    FinetuneConfig,
    KnnConfig,
    LinearConfig,
    eval_presets,
    load_eval_config,
)
from wcl.eval.data import MapImages, eval_transform, load_splits, train_transform
from wcl.eval.embed import embed_images
from wcl.eval.features import cached_features, extract_features
from wcl.eval.finetune import balanced_subset, finetune, subset_from_file
from wcl.eval.knn import knn_accuracies, knn_accuracy, knn_eval, knn_monitor, knn_predict
from wcl.eval.linear import LinearProbe, linear_classifier, linear_eval, train_linear_on_features

__all__ = [
    "FinetuneConfig",
    "KnnConfig",
    "LinearConfig",
    "LinearProbe",
    "MapImages",
    "balanced_subset",
    "cached_features",
    "embed_images",
    "eval_presets",
    "extract_features",
    "finetune",
    "knn_accuracies",
    "knn_accuracy",
    "knn_eval",
    "knn_monitor",
    "knn_predict",
    "linear_classifier",
    "linear_eval",
    "load_eval_config",
    "load_splits",
    "subset_from_file",
    "eval_transform",
    "train_linear_on_features",
    "train_transform",
]
