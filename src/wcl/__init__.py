"""WCL: Weakly Supervised Contrastive Learning (Zheng et al., ICCV 2021).

The idea lives in three files: ``graph`` (weak labels from the nearest-neighbour graph),
``losses`` (instance and weak-label losses) and ``model`` (backbone + two heads).
"""

from wcl.graph import weak_label_stats, weak_labels
from wcl.losses import instance_loss, supervised_contrastive_loss, weak_label_loss
from wcl.model import WCL, projection_head
from wcl.optim import LARS

__all__ = [
    "WCL",
    "LARS",
    "instance_loss",
    "projection_head",
    "supervised_contrastive_loss",
    "weak_label_loss",
    "weak_label_stats",
    "weak_labels",
]
__version__ = "0.1.0"
