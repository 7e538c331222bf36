"""Each loss against its formula written out with loops in float64, and gradcheck."""

import math

import pytest
import torch
import torch.nn.functional as F

from wcl import losses
from wcl.graph import nearest_candidates, weak_labels
from wcl.losses import (
    instance_loss,
    small_crop_instance_loss,
    small_crop_knn_loss,
    small_crop_rows,
    supervised_contrastive_loss,
    weak_label_loss,
)


def unit_rows(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def nt_xent_by_hand(z1, z2, t):
    """NT-Xent as the paper writes it: 2N anchors, self removed, positive = other view, mean of -log p."""
    z = torch.cat([z1, z2]).tolist()
    n = len(z1)
    total = 0.0
    for a in range(2 * n):
        positive = a + n if a < n else a - n
        sims = {c: sum(x * y for x, y in zip(z[a], z[c], strict=True)) / t for c in range(2 * n)}
        denominator = sum(math.exp(s) for c, s in sims.items() if c != a)
        total += -math.log(math.exp(sims[positive]) / denominator)
    return total / (2 * n)


def supcon_by_hand(p, labels, t):
    """Mean over positives j != i (same label) of -log(exp(s_ij) / sum_{k != i} exp(s_ik))."""
    rows = p.tolist()
    n = len(rows)
    total, anchors = 0.0, 0
    for i in range(n):
        sims = [sum(x * y for x, y in zip(rows[i], rows[k], strict=True)) / t for k in range(n)]
        denominator = sum(math.exp(s) for k, s in enumerate(sims) if k != i)
        positives = [j for j in range(n) if j != i and labels[j] == labels[i]]
        if not positives:
            continue
        total += -sum(math.log(math.exp(sims[j]) / denominator) for j in positives) / len(positives)
        anchors += 1
    return total / anchors


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_instance_loss_formula(t):
    z1, z2 = unit_rows(12, 5, 0), unit_rows(12, 5, 1)
    assert instance_loss(z1, z2, t).item() == pytest.approx(nt_xent_by_hand(z1, z2, t), abs=1e-6)


def test_supervised_contrastive_formula_with_singletons():
    p = unit_rows(15, 4, 2)
    labels = torch.tensor([0, 0, 0, 3, 3, 5, 6, 6, 6, 6, 10, 10, 12, 12, 14])  # 5, 14 alone
    got = supervised_contrastive_loss(p, p, labels, 0.1)
    assert got.item() == pytest.approx(supcon_by_hand(p, labels.tolist(), 0.1), abs=1e-6)


def test_weak_label_loss_formula_with_swap():
    p1, p2 = unit_rows(20, 3, 3), unit_rows(20, 3, 4)
    labels1, labels2 = weak_labels(p1).tolist(), weak_labels(p2).tolist()
    assert labels1 != labels2  # otherwise the swap would go untested
    expected = (supcon_by_hand(p1, labels2, 0.1) + supcon_by_hand(p2, labels1, 0.1)) / 2
    assert weak_label_loss(p1, p2, 0.1).item() == pytest.approx(expected, abs=1e-6)
    unswapped = (supcon_by_hand(p1, labels1, 0.1) + supcon_by_hand(p2, labels2, 0.1)) / 2
    assert abs(unswapped - expected) > 1e-3


def test_gradcheck():
    z1 = unit_rows(6, 4, 5).requires_grad_()
    z2 = unit_rows(6, 4, 6).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: instance_loss(a, b, 0.2), (z1, z2))
    labels = torch.tensor([0, 0, 2, 2, 2, 5])
    assert torch.autograd.gradcheck(lambda a: supervised_contrastive_loss(a, a, labels, 0.2), (z1,))
    labels2 = torch.tensor([0, 1, 0, 1, 4, 4])
    assert torch.autograd.gradcheck(
        lambda a, b: weak_label_loss(a, b, 0.2, labels=(labels, labels2)), (z1, z2)
    )


def test_split_batch_equals_whole_batch():
    """Local anchors against global candidates, averaged over 'processes', equal one process."""
    z1, z2 = unit_rows(16, 8, 7), unit_rows(16, 8, 8)
    whole_inst = instance_loss(z1, z2)
    whole_graph = weak_label_loss(z1, z2)
    parts_inst, parts_graph = [], []
    for offset in (0, 4, 8, 12):
        s = slice(offset, offset + 4)
        parts_inst.append(instance_loss(z1[s], z2[s], z1_all=z1, z2_all=z2, offset=offset))
        parts_graph.append(weak_label_loss(z1[s], z2[s], p1_all=z1, p2_all=z2, offset=offset))
    assert torch.stack(parts_inst).mean().item() == pytest.approx(whole_inst.item(), abs=1e-12)
    assert torch.stack(parts_graph).mean().item() == pytest.approx(whole_graph.item(), abs=1e-12)


def test_stable_under_bf16_autocast():
    """Under bf16 autocast the losses compute in float32: from bf16 features they give what
    float32 arithmetic on the same (rounded) features gives, finite even at t = 0.02."""
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(64, 32, generator=g), dim=1)
    z1, z2 = z, F.normalize(z + 0.01 * torch.randn(64, 32, generator=g), dim=1)
    w = torch.randn(32, 32, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = z1 @ w, z2 @ w
        assert a.dtype == torch.bfloat16
        labels = (weak_labels(a), weak_labels(b))
        inst = instance_loss(a, b, 0.02)
        graph = weak_label_loss(a, b, 0.02, labels=labels)
    ref_inst = instance_loss(a.float(), b.float(), 0.02)
    ref_graph = weak_label_loss(a.float(), b.float(), 0.02, labels=labels)
    assert inst.dtype == graph.dtype == torch.float32
    assert torch.isfinite(inst) and torch.isfinite(graph)
    assert inst.item() == pytest.approx(ref_inst.item(), rel=1e-6)
    assert graph.item() == pytest.approx(ref_graph.item(), rel=1e-6)
    (inst + graph).backward()
    assert torch.isfinite(w.grad).all()


def test_losses_have_no_value_dependent_host_code():
    z1, z2 = torch.empty(32, 8, device="meta"), torch.empty(32, 8, device="meta")
    assert instance_loss(z1, z2).shape == ()
    assert weak_label_loss(z1, z2).shape == ()


def test_tight_clusters_reach_the_analytic_minimum():
    """16 near-identical rows per orthogonal cluster: components never cross clusters, and
    each anchor's 15 cluster mates (similarity 1) and 48 others (similarity 0) give
    -log p = log(15 + 48 exp(-1/t)) for every positive, whatever the partition inside."""
    centres = torch.eye(16, dtype=torch.float64)[:4]
    noise = 1e-4 * unit_rows(64, 16, 10)
    p = F.normalize(centres.repeat_interleave(16, 0) + noise, dim=1)
    assert (weak_labels(p) // 16 == torch.arange(64) // 16).all()
    expected = math.log(15 + 48 * math.exp(-10))
    assert weak_label_loss(p, p).item() == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("block", [1, 5, 1 << 24])
def test_log_denominators_in_row_blocks_match_plain_autograd(monkeypatch, block):
    """The memory-light log-sum-exp (row blocks, logits recomputed in backward) against
    logsumexp over the full masked logits with ordinary autograd: values and gradients
    for both inputs, local anchors against global candidates; and gradcheck."""
    monkeypatch.setattr(losses, "LOGIT_BLOCK_ELEMENTS", block * 12)  # `block` rows of 12
    anchors = unit_rows(5, 3, 11).requires_grad_()
    candidates = unit_rows(12, 3, 12).requires_grad_()
    self_col = torch.tensor([4, 5, 6, 7, 8])  # the anchors sit at rows 4..8 of the batch
    grad_out = torch.linspace(-1.0, 2.0, 5, dtype=torch.float64)

    got = losses._log_denominators(anchors, candidates, self_col, 0.3)
    got_grads = torch.autograd.grad(got, (anchors, candidates), grad_out)
    logits = anchors @ candidates.T / 0.3
    logits = logits.masked_fill(F.one_hot(self_col, 12).bool(), float("-inf"))
    want = torch.logsumexp(logits, dim=1)
    want_grads = torch.autograd.grad(want, (anchors, candidates), grad_out)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda a, c: losses._log_denominators(a, c, self_col, 0.3), (anchors, candidates)
    )


@pytest.mark.parametrize(
    "loss", ["supervised", "weak_label", "instance", "small_knn", "small_instance"]
)
def test_gradients_are_bitwise_reproducible_on_several_threads(loss):
    """Run-to-run identical gradients with many samples per label on 2+ CPU threads.
    Indexing a per-label tensor by each anchor's label (``t[labels]``) has a backward
    that accumulates the repeated rows in a thread-dependent order; it made the demo's
    WCL runs differ from the 4th step on. This fails with that form."""
    gen = torch.Generator().manual_seed(0)
    p = F.normalize(torch.randn(512, 64, generator=gen), dim=1)
    q = F.normalize(torch.randn(512, 64, generator=gen), dim=1)
    labels = torch.randint(0, 40, (512,), generator=gen)
    fns = {
        "supervised": lambda x: supervised_contrastive_loss(x, x, labels, 0.1),
        "weak_label": lambda x: weak_label_loss(x, q, 0.1),
        "instance": lambda x: instance_loss(x, q, 0.1),
        # Gradients into the candidates: they gather rows (own image, neighbours) per crop.
        "small_knn": lambda x: small_crop_knn_loss(q, (x, x.flip(0)), 128, 0.1, k=3),
        "small_instance": lambda x: small_crop_instance_loss(q, (x, x.flip(0)), 128, 0.1),
    }

    def grad() -> torch.Tensor:
        x = p.clone().requires_grad_()
        fns[loss](x).backward()
        return x.grad

    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        first = grad()
        assert all(torch.equal(first, grad()) for _ in range(10))
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- multi-crop


def dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def small_crop_losses_by_hand(small, views, b, t, offset, k):
    """Both multi-crop losses written out with loops: crop c of local image i is row
    c * b + i of ``small``; its image is row offset + i of each full-size view. Instance:
    -log p(own image). kNN: positives = own image + the k other rows most similar to the
    crop (found by sorting here), -mean log p over them. Means over crops and views."""
    small = small.tolist()
    inst = knn = 0.0
    for view in views:
        rows = view.tolist()
        for a, crop in enumerate(small):
            own = offset + a % b
            sims = [dot(crop, r) / t for r in rows]
            log_z = math.log(sum(math.exp(s) for s in sims))
            inst += log_z - sims[own]
            others = sorted((j for j in range(len(rows)) if j != own), key=lambda j: -sims[j])
            positives = [own, *others[:k]]
            knn += sum(log_z - sims[j] for j in positives) / len(positives)
    count = len(small) * len(views)
    return inst / count, knn / count


@pytest.mark.parametrize(("b", "offset", "k"), [(6, 0, 1), (3, 3, 2), (2, 4, 0)])
def test_small_crop_losses_formula(b, offset, k):
    """3 small crops of b local images against two full-size views of a global batch of 6,
    the local images at rows offset..offset+b."""
    small = unit_rows(3 * b, 5, 20)
    views = (unit_rows(6, 5, 21), unit_rows(6, 5, 22))
    inst_want, knn_want = small_crop_losses_by_hand(small, views, b, 0.2, offset, k)
    inst = small_crop_instance_loss(small, views, b, 0.2, offset)
    knn = small_crop_knn_loss(small, views, b, 0.2, offset, k)
    assert inst.item() == pytest.approx(inst_want, abs=1e-12)
    assert knn.item() == pytest.approx(knn_want, abs=1e-12)
    if k:  # the neighbours found beforehand (as the model does) give the same loss
        own = small_crop_rows(len(small), b, offset, small.device)
        near = [nearest_candidates(small, view, own, k) for view in views]
        assert small_crop_knn_loss(small, views, b, 0.2, offset, k, near).item() == knn.item()


def test_small_crop_losses_gradcheck_and_split_batch():
    """Gradients (crops and candidates) by gradcheck; local crops of 3 'processes' against
    the global views average to one process holding every crop."""
    small = unit_rows(6, 4, 23).requires_grad_()
    views = [unit_rows(3, 4, 24).requires_grad_(), unit_rows(3, 4, 25).requires_grad_()]
    assert torch.autograd.gradcheck(
        lambda s, a, c: small_crop_instance_loss(s, (a, c), 3, 0.3), (small, *views)
    )
    assert torch.autograd.gradcheck(
        lambda s, a, c: small_crop_knn_loss(s, (a, c), 3, 0.3, k=1), (small, *views)
    )
    crops = unit_rows(2 * 12, 6, 26).view(2, 12, 6)  # 2 crops of 12 images
    full = (unit_rows(12, 6, 27), unit_rows(12, 6, 28))
    for fn in (small_crop_instance_loss, lambda *a: small_crop_knn_loss(*a, k=2)):
        whole = fn(crops.flatten(0, 1), full, 12, 0.1, 0)
        parts = [fn(crops[:, o : o + 4].flatten(0, 1), full, 4, 0.1, o) for o in (0, 4, 8)]
        assert torch.stack(parts).mean().item() == pytest.approx(whole.item(), abs=1e-12)


def test_small_crop_losses_check_their_shapes():
    small, views = unit_rows(7, 4, 29), (unit_rows(6, 4, 30),)
    with pytest.raises(ValueError, match="7 small-crop rows are not a whole number of 3"):
        small_crop_instance_loss(small, views, 3)
    with pytest.raises(ValueError, match="k must be in"):
        small_crop_knn_loss(unit_rows(6, 4, 29), views, 3, k=6)
