"""WCL: Weakly Supervised Contrastive Learning (Zheng et al., ICCV 2021).

The idea lives in three files: ``graph`` (weak labels from the nearest-neighbour graph),
``losses`` (instance and weak-label losses) and ``model`` (backbone + two heads).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wcl.graph import weak_label_stats, weak_labels
    from wcl.losses import (
        instance_loss,
        small_crop_instance_loss,
        small_crop_knn_loss,
        supervised_contrastive_loss,
        weak_label_loss,
    )
    from wcl.model import WCL, projection_head
    from wcl.optim import LARS

# Loaded on first use (PEP 562), so that `import wcl.config` and `wcl --help` do not pay
# for importing torch.
_HOMES = {
    "WCL": "wcl.model",
    "projection_head": "wcl.model",
    "LARS": "wcl.optim",
    "instance_loss": "wcl.losses",
    "small_crop_instance_loss": "wcl.losses",
    "small_crop_knn_loss": "wcl.losses",
    "supervised_contrastive_loss": "wcl.losses",
    "weak_label_loss": "wcl.losses",
    "weak_label_stats": "wcl.graph",
    "weak_labels": "wcl.graph",
}
__all__ = [
    "LARS",
    "WCL",
    "instance_loss",
    "projection_head",
    "small_crop_instance_loss",
    "small_crop_knn_loss",
    "supervised_contrastive_loss",
    "weak_label_loss",
    "weak_label_stats",
    "weak_labels",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'wcl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
