"""`model.gather: release` and the release presets follow the authors' code to the gradient.

The reference below is written out from the published method (docs/design.md, "The
authors' release"), densely and independently of wcl.losses / wcl.graph / wcl.optim: full
N x N similarity matrices with the own column cut out, SciPy's connected components of the
1-NN graph, a hand-written LARS step with the release's name rule and the warm-up written
as a formula. W processes are simulated in one: each process's loss uses its own anchors
and detaches what the release detaches; the network runs on the global batch, which is what
SyncBatchNorm gives; DDP's gradient is the mean over processes of the per-process losses'.
"""

import copy
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import release_worker  # noqa: E402
from test_dist import torchrun  # noqa: E402

PRESET = "imagenet-r50-100ep-release"
STEPS = 3
T = 0.1


# --- the dense reference ------------------------------------------------------------------


def scipy_labels(p: torch.Tensor) -> np.ndarray:
    """Weak labels: each row joined to its nearest other row (the diagonal pushed down by 2,
    as the release does), undirected, SciPy's connected components."""
    sim = (p @ p.T).numpy() - 2 * np.eye(len(p))
    n = len(p)
    graph = coo_matrix((np.ones(n), (np.arange(n), sim.argmax(1))), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def cross_entropy_without_own_column(logits, own_col, target_col):
    """Mean cross-entropy of rows of ``logits`` (a, M) with each row's own column cut out
    (the (a, M - 1) layout), the target given as a column of the full matrix."""
    a, m = logits.shape
    keep = torch.ones(a, m, dtype=torch.bool)
    keep[torch.arange(a), own_col] = False
    cut = logits[keep].view(a, m - 1)
    target = target_col - (target_col > own_col).long()
    return F.cross_entropy(cut, target)


def reference_loss(model, x1, x2, world: int, release: bool) -> dict[str, torch.Tensor]:
    """(1/W) sum over processes r of instance_r + graph_r, for W simulated processes.

    release: other processes' instance candidates and every graph candidate detached;
    otherwise nothing is detached (the exact, full-gradient problem).
    """
    h1, h2 = model.backbone(x1), model.backbone(x2)
    z1, z2 = F.normalize(model.g(h1), dim=1), F.normalize(model.g(h2), dim=1)
    p1, p2 = F.normalize(model.phi(h1), dim=1), F.normalize(model.phi(h2), dim=1)
    n = len(x1)
    b = n // world
    labels1 = torch.from_numpy(scipy_labels(p1.detach()))
    labels2 = torch.from_numpy(scipy_labels(p2.detach()))
    instance_total, graph_total = 0.0, 0.0
    for r in range(world):
        rows = torch.arange(r * b, (r + 1) * b)
        local = torch.zeros(n, dtype=torch.bool)
        local[rows] = True
        # Instance loss: 2b anchors against the 2N candidates [Z1; Z2].
        if release:
            c1 = torch.where(local[:, None], z1, z1.detach())
            c2 = torch.where(local[:, None], z2, z2.detach())
        else:
            c1, c2 = z1, z2
        anchors = torch.cat([z1[rows], z2[rows]])
        logits = anchors @ torch.cat([c1, c2]).T / T
        own = torch.cat([rows, rows + n])
        positive = torch.cat([rows + n, rows])
        instance_total = instance_total + cross_entropy_without_own_column(logits, own, positive)
        # Graph loss: each view's anchors against that view's candidates, labels swapped.
        graph = 0.0
        for p, swapped in ((p1, labels2), (p2, labels1)):
            cand = p.detach() if release else p
            logits = p[rows] @ cand.T / T
            keep = torch.ones(b, n, dtype=torch.bool)
            keep[torch.arange(b), rows] = False
            cut = logits[keep].view(b, n - 1)
            log_prob = cut - torch.logsumexp(cut, dim=1, keepdim=True)
            same = (swapped[rows][:, None] == swapped[None, :])[keep].view(b, n - 1)
            per_anchor = -(log_prob * same).sum(1) / same.sum(1)
            graph = graph + per_anchor.mean() / 2
        graph_total = graph_total + graph
    instance, graph = instance_total / world, graph_total / world
    return {"loss": instance + graph, "instance_loss": instance, "graph_loss": graph}


def reference_steps(model, steps: int, world: int) -> tuple[list[dict], dict, dict]:
    """``steps`` release optimiser steps by hand: losses, first gradients, final parameters.

    LARS as published: for a parameter whose name holds neither "bn" nor "bias",
    d = g + 1e-6 w, d *= 1e-3 |w| / |d|; others d = g; buf = d, then 0.9 buf + d;
    w -= lr buf. lr = 0.075 sqrt(16) * step / (10 epochs * 2 steps) during warm-up.
    """
    model = copy.deepcopy(model)
    named = dict(model.named_parameters())
    buffers: dict[str, torch.Tensor] = {}
    x1, x2 = release_worker.batches(steps)
    losses, first = [], {}
    for k in range(steps):
        lr = 0.075 * math.sqrt(16) * k / (10 * release_worker.STEPS_PER_EPOCH)
        out = reference_loss(model, x1[k], x2[k], world, release=True)
        grads = torch.autograd.grad(out["loss"], list(named.values()))
        if k == 0:
            first = {n: g.clone() for n, g in zip(named, grads, strict=True)}
        with torch.no_grad():
            for (name, w), g in zip(named.items(), grads, strict=True):
                d = g
                if "bn" not in name and "bias" not in name:
                    d = g + 1e-6 * w
                    w_norm, d_norm = w.norm(), d.norm()
                    if w_norm > 0 and d_norm > 0:
                        d = d * 1e-3 * w_norm / d_norm
                buffers[name] = d.clone() if name not in buffers else 0.9 * buffers[name] + d
                w -= lr * buffers[name]
        losses.append({key: v.detach() for key, v in out.items()})
    return losses, first, {n: p.detach().clone() for n, p in named.items()}


def initial_model(gather: str = "release"):
    cfg = release_worker.config(PRESET, gather)
    from wcl.train import build_model

    torch.manual_seed(cfg.train.seed)
    return build_model(cfg).double()


# --- the tests ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    """What W = 1 and W = 2 processes of the release must compute, by hand."""
    model = initial_model()
    return {world: reference_steps(model, STEPS, world) for world in (1, 2)}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    runs = {}
    for gather in ("release", "exact"):
        out = tmp_path_factory.mktemp(gather)
        torchrun(HERE / "release_worker.py", out, PRESET, gather, STEPS)
        runs[gather] = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return runs


def max_relative(got: dict, want: dict) -> float:
    """Largest |got - want| / max|want| over the tensors of two name -> tensor dicts.

    A bias just before a BatchNorm has a gradient of exactly 0 in exact arithmetic (the
    normalisation removes it), so rounding (1e-16 here) is all there is: max|want| is
    floored at 1e-6 of the largest |want| of all tensors, which compares such tensors at
    1e-12 of that (about 1e-11 absolute).
    """
    assert got.keys() == want.keys()
    floor = 1e-6 * max(float(w.abs().max()) for w in want.values())
    return max(
        float((got[k] - want[k]).abs().max() / want[k].abs().max().clamp(min=floor)) for k in want
    )


def assert_release_run_matches(run: dict, reference: tuple) -> None:
    ref_losses, ref_grads, ref_params = reference
    for got, want in zip(run["losses"], ref_losses, strict=True):
        for key in want:
            assert got[key].item() == pytest.approx(want[key].item(), rel=1e-9, abs=0), key
    assert max_relative(run["grads"], ref_grads) < 1e-6
    for name, want in ref_params.items():
        assert torch.allclose(run["params"][name], want, rtol=0, atol=1e-9), name


def test_release_step_equals_the_dense_reference_on_one_process(reference):
    run = release_worker.run(PRESET, "release", STEPS)
    assert_release_run_matches(run, reference[1])
    # The parameters moved (steps 1 and 2 have lr > 0), so 1e-9 is not vacuous.
    initial = dict(initial_model().named_parameters())
    moved = max(float((run["params"][n] - p.detach()).abs().max()) for n, p in initial.items())
    assert moved > 1e-4


def test_release_step_equals_the_dense_reference_on_two_processes(two_processes, reference):
    for rank in two_processes["release"]:
        assert_release_run_matches(rank, reference[2])


def test_release_and_exact_are_two_modes(two_processes, reference):
    """The same loss values, other gradients: exact is not the release's problem, at one
    process or two; and it is the full-gradient problem written out without detaching."""
    for world, runs in ((1, [release_worker.run(PRESET, "exact", 1)]), (2, two_processes["exact"])):
        ref_losses, ref_grads, _ = reference[world]
        model = initial_model("exact")
        x1, x2 = release_worker.batches(1)
        full = reference_loss(model, x1[0], x2[0], world, release=False)
        full_grads = torch.autograd.grad(full["loss"], list(model.parameters()))
        full_grads = dict(zip(dict(model.named_parameters()), full_grads, strict=True))
        for run in runs:
            assert run["losses"][0]["loss"].item() == pytest.approx(ref_losses[0]["loss"].item())
            assert max_relative(run["grads"], ref_grads) > 1e-3
            assert max_relative(run["grads"], full_grads) < 1e-6
            # The graph head's gradient is where the two problems part most.
            phi = {k: v for k, v in ref_grads.items() if k.startswith("phi.")}
            assert max_relative({k: run["grads"][k] for k in phi}, phi) > 1e-2


def test_release_preset_adapts_downsample_and_head_batchnorm_weights():
    """The release's name rule, against our default rule by module type."""
    from wcl.optim import param_groups

    model = initial_model()
    names = {id(p): n for n, p in model.named_parameters()}
    for exclude, adapted_bn in (("name", True), ("type", False)):
        adapted = {names[id(p)] for p in param_groups(model, 1e-6, exclude)[0]["params"]}
        for name in ("backbone.layer2.0.downsample.1.weight", "g.1.weight", "phi.4.weight"):
            assert (name in adapted) is adapted_bn, (exclude, name)
        assert "backbone.bn1.weight" not in adapted
        assert "backbone.layer1.0.bn1.weight" not in adapted
        assert "g.0.bias" not in adapted and "g.0.weight" in adapted


@pytest.mark.parametrize("gather", ["release", "exact"])
def test_multicrop_in_release_mode_trains_through_its_small_crops_only(gather):
    """Multi-crop (not in the release) uses the two-view losses' candidates: in release mode
    the small crops' kNN graph loss reaches the network through the small crops alone, and
    their instance loss through the local full-size views too; in exact mode both reach it
    through the full-size views."""
    model = initial_model(gather)
    x1, x2 = (x[0].requires_grad_() for x in release_worker.batches(1))
    small = torch.randn(2 * len(x1), 1, 8, 8, dtype=torch.float64)
    out = model(x1, x2, small=small)

    def through_views(loss):
        grads = torch.autograd.grad(loss, (x1, x2), retain_graph=True, allow_unused=True)
        return max(0.0 if g is None else float(g.abs().max()) for g in grads)

    assert through_views(out["small_instance_loss"]) > 1e-6
    if gather == "release":
        assert through_views(out["small_graph_loss"]) == 0.0
    else:
        assert through_views(out["small_graph_loss"]) > 1e-6


def test_pretraining_uses_the_weak_augmentation_during_warmup_only(tmp_path, monkeypatch):
    """The release's weak (MoCo v2) pipeline for the warm-up epochs, the strong one after."""
    from test_train import tiny_config

    from wcl.data.views import TrainingViews
    from wcl.train import pretrain

    phases = []
    set_epoch = TrainingViews.set_epoch

    def recording(self, epoch, strong):
        phases.append((epoch, strong))
        return set_epoch(self, epoch, strong=strong)

    monkeypatch.setattr(TrainingViews, "set_epoch", recording)
    pretrain(tiny_config(tmp_path / "run", "optim.warmup_epochs=2", "train.epochs=3"))
    assert phases[0] == (0, False)  # TrainingViews' constructor
    assert phases[1:] == [(0, False), (1, False), (2, True)]


def test_initialisation_is_the_releases():
    """torchvision's ResNet initialisation without zero-initialised last BatchNorms, and
    PyTorch's default Linear initialisation in the heads (|w| <= 1/sqrt(fan_in))."""
    model = initial_model()
    for name, module in model.backbone.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
    for head in (model.g, model.phi):
        for layer in head:
            if isinstance(layer, torch.nn.Linear):
                bound = 1 / math.sqrt(layer.in_features)
                assert float(layer.weight.detach().abs().max()) <= bound
                assert float(layer.weight.detach().abs().max()) > 0.9 * bound  # uniform, not shrunk
