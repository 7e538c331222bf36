"""WCL's two losses: instance discrimination (NT-Xent) and the swapped weak-label loss,
and their multi-crop counterparts for the extra low-resolution crops.

Both take the *local* anchors of this process and, optionally, the *global* candidates
gathered from every process (``wcl.dist.gather``), with ``offset`` the row where this
process's samples start in the global batch. Without the optional arguments they are the
single-process losses. Both compute in float32 with autocast off and use log-sum-exp, so
they are stable when the network runs under bf16 autocast.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from wcl.graph import nearest_candidates, weak_labels
from wcl.precision import float32_region

__all__ = [
    "instance_loss",
    "supervised_contrastive_loss",
    "weak_label_loss",
    "small_crop_instance_loss",
    "small_crop_knn_loss",
    "small_crop_rows",
]


def _float32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Half-precision inputs up to float32; float32/float64 stay as they are."""
    return [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]


# At most this many logits (64 MiB in float32) exist at once in the log-sum-exp below.
LOGIT_BLOCK_ELEMENTS = 1 << 24


def _logits_block(
    scaled: torch.Tensor, candidates: torch.Tensor, self_col: torch.Tensor | None, start: int
) -> torch.Tensor:
    """Rows [start, start + len(scaled)) of scaled anchors @ candidates.T, with each row's
    own column (``self_col``; None: no such column) at -inf."""
    logits = scaled @ candidates.T
    if self_col is None:
        return logits
    # A fill kernel, not torch.tensor(...): a host-to-device copy would synchronise on CUDA.
    minus_inf = torch.full((), float("-inf"), dtype=logits.dtype, device=logits.device)
    rows = torch.arange(len(scaled), device=scaled.device)
    return logits.index_put_((rows, self_col[start : start + len(scaled)]), minus_inf)


class _LogSumExpWithoutSelf(torch.autograd.Function):
    """log sum_{j != self_i} exp(a_i . c_j / t) for every anchor row i: (a,).

    Neither pass keeps the a x c logits: forward takes them a row block at a time, and
    backward recomputes each block and turns it into softmax weights in place. Memory is
    one block (at most LOGIT_BLOCK_ELEMENTS) instead of the whole matrix kept by plain
    autograd for backward, for one more matrix product.
    """

    @staticmethod
    def forward(ctx, anchors, candidates, self_col, temperature):
        scaled = anchors / temperature
        rows = max(1, LOGIT_BLOCK_ELEMENTS // max(1, candidates.shape[0]))
        starts = range(0, len(scaled), rows)
        parts = [
            torch.logsumexp(_logits_block(scaled[i : i + rows], candidates, self_col, i), 1)
            for i in starts
        ]
        lse = parts[0] if len(parts) == 1 else torch.cat(parts)
        ctx.save_for_backward(scaled, candidates, self_col, lse)
        ctx.temperature, ctx.rows = temperature, rows
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        scaled, candidates, self_col, lse = ctx.saved_tensors
        grad_scaled, grad_candidates = [], None
        for i in range(0, len(scaled), ctx.rows):
            block = slice(i, i + ctx.rows)
            # d lse_i / d logit_ij = softmax_ij: weights for both matrix products.
            weights = _logits_block(scaled[block], candidates, self_col, i)
            weights.sub_(lse[block, None]).exp_().mul_(grad_lse[block, None])
            grad_scaled.append(weights @ candidates)
            part = weights.T @ scaled[block]
            grad_candidates = part if grad_candidates is None else grad_candidates.add_(part)
        grad_scaled = grad_scaled[0] if len(grad_scaled) == 1 else torch.cat(grad_scaled)
        return grad_scaled / ctx.temperature, grad_candidates, None, None


def _log_denominators(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    self_col: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """log sum_{j != self_col[i]} exp(anchors_i . candidates_j / temperature): (a,), with
    gradients, in O(block) extra memory (see _LogSumExpWithoutSelf). ``self_col`` None:
    every candidate counts (anchors that are not themselves candidates)."""
    return _LogSumExpWithoutSelf.apply(anchors, candidates, self_col, temperature)


def instance_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.1,
    *,
    z1_all: torch.Tensor | None = None,
    z2_all: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """NT-Xent over two views, mean over the 2b local anchors.

    z1, z2: (b, d) L2-normalised embeddings of the two views of the same b images.
    z1_all, z2_all: (N, d) the same for the global batch (defaults: z1, z2), holding
    z1/z2 at rows [offset, offset + b). Each anchor's positive is the other view of its
    image; every other of the 2N candidates but itself is a negative.
    """
    z1_all = z1 if z1_all is None else z1_all
    z2_all = z2 if z2_all is None else z2_all
    b, n = z1.shape[0], z1_all.shape[0]
    with float32_region(z1.device):
        z1, z2, z1_all, z2_all = _float32(z1, z2, z1_all, z2_all)
        local = torch.arange(b, device=z1.device) + offset
        self_col = torch.cat([local, local + n])
        positive_col = torch.cat([local + n, local])
        anchors, candidates = torch.cat([z1, z2]), torch.cat([z1_all, z2_all])
        # -log softmax at the positive: log-denominator minus the positive's logit.
        positive_logit = (anchors * candidates[positive_col]).sum(dim=1) / temperature
        return (
            _log_denominators(anchors, candidates, self_col, temperature) - positive_logit
        ).mean()


def supervised_contrastive_loss(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.1,
    offset: int = 0,
) -> torch.Tensor:
    """Supervised contrast, mean-log-probability-over-positives form, self excluded.

    anchors: (b, d), candidates: (N, d) with the anchors at rows [offset, offset + b);
    labels: (N,) long component ids in [0, N) of the candidates. For anchor i:
    loss_i = -mean_{j != i, labels_j = labels_i} (s_ij - logsumexp_{k != i} s_ik),
    s = anchors @ candidates.T / temperature. Anchors without a positive are left out.

    The positives' mean is taken through per-label sums of candidate vectors
    (sum_j s_ij = a_i . sum_j c_j / t), so no N x N label mask is ever built.
    """
    b, n = anchors.shape[0], candidates.shape[0]
    with float32_region(anchors.device):
        anchors, candidates = _float32(anchors, candidates)
        own = torch.arange(b, device=anchors.device) + offset
        log_denominator = _log_denominators(anchors, candidates, own, temperature)  # (b,)

        label_sum = torch.zeros_like(candidates).index_add(0, labels, candidates)
        ones = torch.ones(n, dtype=candidates.dtype, device=labels.device)
        label_count = torch.zeros_like(ones).index_add(0, labels, ones)
        anchor_labels = labels[own]
        # index_select, not label_sum[anchor_labels]: indexing's backward accumulates
        # repeated rows with index_put_, whose order (so float rounding) varies from run
        # to run on multi-threaded CPUs; index_select's (index_add_) does not.
        positives_sum = label_sum.index_select(0, anchor_labels) - candidates[own]
        num_positives = label_count[anchor_labels] - 1
        positive_logit_sum = (anchors * positives_sum).sum(dim=1) / temperature
        has_positive = num_positives > 0
        mean_log_prob = positive_logit_sum / num_positives.clamp(min=1) - log_denominator
        per_anchor = torch.where(has_positive, -mean_log_prob, torch.zeros_like(mean_log_prob))
        return per_anchor.sum() / has_positive.sum().clamp(min=1)


def weak_label_loss(
    p1: torch.Tensor,
    p2: torch.Tensor,
    temperature: float = 0.1,
    *,
    p1_all: torch.Tensor | None = None,
    p2_all: torch.Tensor | None = None,
    offset: int = 0,
    k: int = 1,
    labels: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """WCL's graph loss: weak labels from each view, used swapped on the other view.

    p1, p2: (b, d) L2-normalised ``phi``-head embeddings of the two views; p1_all, p2_all:
    (N, d) global batch (defaults: p1, p2). Labels L1 = weak_labels(p1_all), L2 from
    p2_all (or ``labels`` = (L1, L2) if already computed). Returns
    (supcon(view 1 with L2) + supcon(view 2 with L1)) / 2; contrast stays within a view.
    """
    p1_all = p1 if p1_all is None else p1_all
    p2_all = p2 if p2_all is None else p2_all
    if labels is None:
        labels = (weak_labels(p1_all, k), weak_labels(p2_all, k))
    labels1, labels2 = labels
    loss1 = supervised_contrastive_loss(p1, p1_all, labels2, temperature, offset)
    loss2 = supervised_contrastive_loss(p2, p2_all, labels1, temperature, offset)
    return (loss1 + loss2) / 2


# Multi-crop. The small crops of a batch arrive view-major: rows [c*b, (c+1)*b) of the
# (V*b, d) embeddings are crop c of the b local images. A small crop is never a candidate:
# it contrasts against the global batch's full-size views only, so V crops add V*b*N
# logits per view instead of growing the N x N problem to (2 + V)N x (2 + V)N.


def small_crop_rows(num_small: int, b: int, offset: int, device: torch.device) -> torch.Tensor:
    """Global row of the own image of each of ``num_small`` = V*b small crops of b local
    images (view-major) whose full-size views sit at rows [offset, offset + b): (V*b,) long."""
    if b == 0 or num_small % b:
        raise ValueError(f"{num_small} small-crop rows are not a whole number of {b}-image views")
    return (torch.arange(b, device=device) + offset).repeat(num_small // b)


def small_crop_instance_loss(
    z_small: torch.Tensor,
    candidates: Sequence[torch.Tensor],
    b: int,
    temperature: float = 0.1,
    offset: int = 0,
) -> torch.Tensor:
    """Instance discrimination of the small crops against each full-size view.

    z_small: (V*b, d) L2-normalised ``g``-head embeddings of V small crops of the b local
    images, view-major. candidates: the full-size views' global embeddings, each (N, d)
    with the local images at rows [offset, offset + b). For crop c of image i and each
    candidate set Z: -log softmax_j(z_ci . Z_j / t) at j = image i (one positive, N - 1
    negatives). Mean over the V*b crops and the candidate sets.
    """
    # The kNN loss with no neighbours: the own image is the only positive.
    return small_crop_knn_loss(z_small, candidates, b, temperature, offset, k=0)


def small_crop_knn_loss(
    p_small: torch.Tensor,
    candidates: Sequence[torch.Tensor],
    b: int,
    temperature: float = 0.1,
    offset: int = 0,
    k: int = 1,
    neighbours: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Weak-label loss of the small crops, positives chosen by kNN.

    p_small: (V*b, d) L2-normalised ``phi``-head embeddings of V small crops of the b local
    images, view-major; candidates: the full-size views' global ``phi`` embeddings, each
    (N, d), the local images at rows [offset, offset + b). For crop c of image i and each
    candidate set P, the positives are image i itself and the k other rows of P nearest
    to the crop (dot product, no gradient; k=0: image i alone):
    loss_ci = -mean_{j in positives} (s_cij - logsumexp_m s_cim), s = p_ci . P / t.
    Mean over the V*b crops and the candidate sets. ``neighbours``: those k rows if already
    found, one (V*b, k) long tensor per candidate set (``wcl.graph.nearest_candidates``).
    """
    with float32_region(p_small.device):
        (p_small,) = _float32(p_small)
        own = small_crop_rows(len(p_small), b, offset, p_small.device)
        terms = []
        for v, p_all in enumerate(_float32(*candidates)):
            positives = own[:, None]
            if k:
                near = (
                    nearest_candidates(p_small, p_all, own, k)
                    if neighbours is None
                    else neighbours[v]
                )
                positives = torch.cat([positives, near], 1)
            # index_select (backward: index_add_), not p_all[positives]: see
            # supervised_contrastive_loss on reproducible gradients.
            positive_sum = p_all.index_select(0, positives.flatten()).view(*positives.shape, -1)
            positive_logit = (p_small * positive_sum.sum(dim=1)).sum(dim=1) / temperature
            log_denominator = _log_denominators(p_small, p_all, None, temperature)
            terms.append(log_denominator - positive_logit / (k + 1))
        return torch.stack(terms).mean()
