"""The WCL model: one backbone, two projection heads, both losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wcl import dist
from wcl.graph import nearest_candidates, neighbour_precision, weak_label_stats, weak_labels
from wcl.losses import (
    instance_loss,
    small_crop_instance_loss,
    small_crop_knn_loss,
    small_crop_rows,
    weak_label_loss,
)

__all__ = ["WCL", "projection_head"]


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear (no BN on the output)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


class WCL(nn.Module):
    """Backbone f with heads g (instance discrimination) and phi (weak labels).

    ``forward(x1, x2, targets=None)`` takes the two augmented views (B, C, H, W) of the
    same B images and returns a dict of 0-d tensors: ``loss`` = instance_loss +
    graph_weight * graph_loss, ``instance_loss``, ``graph_loss``, and the weak-label
    statistics ``components`` (count over the global batch, mean of both views),
    ``component_size`` (mean members per component) and, when ``targets`` (B,) are given,
    ``precision`` (fraction of weak positive pairs that share a true class), and the weak
    labels themselves, ``labels1`` and ``labels2`` (N,) long over the global batch.
    graph_weight 0 is plain SimCLR (the ``phi`` head then gets no gradient).

    Multi-crop: ``small`` (V*B, C, h, w), V extra low-resolution crops of the same B
    images, view-major (rows [c*B, (c+1)*B) are crop c), go through the network in one
    pass and add ``small_weight * (small_instance_loss + graph_weight * small_graph_loss)``
    (``wcl.losses.small_crop_instance_loss`` and ``small_crop_knn_loss`` with
    ``small_k`` nearest neighbours as extra positives) to ``loss``; with ``targets``,
    ``small_precision`` is the fraction of those neighbours that share the crop's class
    (over this process's crops; the logged figure is the mean over processes).
    Nothing in forward synchronises with the host (k=1).

    ``gather_mode``: "exact" gathers every candidate with gradient, so W processes compute
    one process's update on the whole batch. "release" follows the authors' gradient
    paths at any W, one process included: the instance losses' candidates from other
    processes carry no gradient (local ones do), and no candidate of the graph losses
    carries any (their gradient reaches the network through the anchors only).

    ``concat_views``: one pass of backbone and heads over both views together (2B images)
    instead of one per view. BatchNorm then normalises over both views at once (as SimCLR's
    TensorFlow code does) rather than per view (SimCLR's PyTorch ports, the release and
    this default); in eval mode both give the same results.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        temperature: float = 0.1,
        graph_weight: float = 1.0,
        k: int = 1,
        gather_mode: str = "exact",
        small_k: int = 1,
        small_weight: float = 1.0,
        concat_views: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.g = projection_head(feature_dim, hidden_dim, out_dim)
        # SimCLR (weight 0) has no phi head, so every parameter gets a gradient (DDP needs it).
        self.phi = projection_head(feature_dim, hidden_dim, out_dim) if graph_weight > 0 else None
        self.temperature = temperature
        self.graph_weight = graph_weight
        self.k = k
        self.gather_mode = gather_mode
        self.small_k = small_k
        self.small_weight = small_weight
        self.concat_views = concat_views

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """L2-normalised (z, p) of one view: (B, out_dim) each; p is None without phi."""
        h = self.backbone(x)
        p = None if self.phi is None else F.normalize(self.phi(h), dim=1)
        return F.normalize(self.g(h), dim=1), p

    def _graph_candidates(self, p: torch.Tensor) -> torch.Tensor:
        """The global batch's ``phi`` features (N, d) that the graph loss contrasts with.

        exact: gathered with gradient (W processes = 1 process). release: gathered without
        any, the process's own rows included, so the graph loss (and multi-crop's kNN
        loss, which uses the same candidates) reaches the network through its anchors
        only, as in the authors' code (docs/design.md, "The authors' release").
        """
        if self.gather_mode == "release":
            return dist.gather_no_grad(p.detach())
        return dist.gather(p, self.gather_mode)[0]

    def forward(
        self,
        x1: torch.Tensor,
        x2: torch.Tensor,
        targets: torch.Tensor | None = None,
        small: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if self.concat_views:
            z, p = self.embed(torch.cat([x1, x2]))
            (z1, z2), (p1, p2) = z.chunk(2), (None, None) if p is None else p.chunk(2)
        else:  # BatchNorm statistics per view, as the release and SimCLR's PyTorch ports
            z1, p1 = self.embed(x1)
            z2, p2 = self.embed(x2)
        z1_all, offset = dist.gather(z1, self.gather_mode)
        z2_all, _ = dist.gather(z2, self.gather_mode)
        out = {
            "instance_loss": instance_loss(
                z1, z2, self.temperature, z1_all=z1_all, z2_all=z2_all, offset=offset
            )
        }
        if self.phi is not None:
            p1_all, p2_all = self._graph_candidates(p1), self._graph_candidates(p2)
            # Every process builds the same labels from the same gathered features.
            labels = (weak_labels(p1_all, self.k), weak_labels(p2_all, self.k))
            out["graph_loss"] = weak_label_loss(
                p1,
                p2,
                self.temperature,
                p1_all=p1_all,
                p2_all=p2_all,
                offset=offset,
                labels=labels,
            )
            out["labels1"], out["labels2"] = labels
            all_targets = None if targets is None else dist.gather_no_grad(targets)
            stats = [weak_label_stats(lab, all_targets) for lab in labels]
            out.update({key: (stats[0][key] + stats[1][key]) / 2 for key in stats[0]})
        else:
            out["graph_loss"] = torch.zeros((), device=x1.device)
        out["loss"] = out["instance_loss"] + self.graph_weight * out["graph_loss"]
        if small is not None:
            b = len(x1)
            zs, ps = self.embed(small)
            out["small_instance_loss"] = small_crop_instance_loss(
                zs, (z1_all, z2_all), b, self.temperature, offset
            )
            small_loss = out["small_instance_loss"]
            if self.phi is not None:
                own = small_crop_rows(len(ps), b, offset, ps.device)
                near = [nearest_candidates(ps, p_all, own, self.small_k)
                        for p_all in (p1_all, p2_all)] if self.small_k else None  # fmt: skip
                out["small_graph_loss"] = small_crop_knn_loss(
                    ps, (p1_all, p2_all), b, self.temperature, offset, self.small_k, near
                )
                small_loss = small_loss + self.graph_weight * out["small_graph_loss"]
                if near is not None and all_targets is not None:
                    out["small_precision"] = neighbour_precision(
                        torch.cat(near), own.repeat(len(near)), all_targets
                    )
            out["loss"] = out["loss"] + self.small_weight * small_loss
        return out
