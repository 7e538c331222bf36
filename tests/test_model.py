"""The WCL module and its backbones."""

import pytest
import torch
import torch.nn.functional as F
import torchvision

from wcl.backbones import build_backbone
from wcl.graph import weak_label_stats, weak_labels
from wcl.losses import (
    instance_loss,
    small_crop_instance_loss,
    small_crop_knn_loss,
    weak_label_loss,
)
from wcl.model import WCL
from wcl.precision import deterministic_algorithms


def tiny_wcl(**kwargs) -> WCL:
    torch.manual_seed(0)
    backbone = build_backbone("resnet10", stem="small", in_channels=1, width=8)
    return WCL(backbone, backbone.feature_dim, hidden_dim=32, out_dim=16, **kwargs)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_backbone_is_torchvision_resnet(name):
    ours = build_backbone(name)
    reference = getattr(torchvision.models, name)()
    state = ours.state_dict()
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert unexpected == [] and sorted(missing) == ["fc.bias", "fc.weight"]
    reference.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    ours.eval(), reference.eval()
    with torch.no_grad():
        assert torch.allclose(ours(x), reference(x), atol=1e-6)
    assert ours(x).shape == (2, ours.feature_dim) == (2, 512 if name == "resnet18" else 2048)


def test_small_stem_width_and_greyscale():
    net = build_backbone("resnet18", stem="small", in_channels=1, width=16)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    assert net.feature_dim == 128
    out = net(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 128)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg11")


def test_forward_composes_the_published_losses():
    model = tiny_wcl(temperature=0.2, graph_weight=0.5)
    x1, x2 = torch.randn(12, 1, 28, 28), torch.randn(12, 1, 28, 28)
    targets = torch.randint(0, 3, (12,))
    torch.manual_seed(1)
    out = model(x1, x2, targets)
    model.train()
    z1, p1 = model.embed(x1)
    z2, p2 = model.embed(x2)
    assert torch.allclose(out["instance_loss"], instance_loss(z1, z2, 0.2), atol=1e-6)
    assert torch.allclose(out["graph_loss"], weak_label_loss(p1, p2, 0.2), atol=1e-6)
    assert torch.allclose(out["loss"], out["instance_loss"] + 0.5 * out["graph_loss"])
    stats = [weak_label_stats(weak_labels(p), targets) for p in (p1, p2)]
    for key in ("components", "component_size", "precision"):
        assert out[key].item() == pytest.approx((stats[0][key] + stats[1][key]).item() / 2)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_simclr_baseline_has_no_phi_head():
    model = tiny_wcl(graph_weight=0.0)
    assert model.phi is None
    out = model(torch.randn(8, 1, 28, 28), torch.randn(8, 1, 28, 28))
    assert out["graph_loss"].item() == 0.0
    assert torch.equal(out["loss"], out["instance_loss"])
    assert "components" not in out


def test_two_forward_passes_keep_batchnorm_statistics_per_view():
    """BN sees each view alone: a view's features don't depend on the other view."""
    model = tiny_wcl()
    x1 = torch.randn(8, 1, 28, 28)
    z_a, _ = model.embed(x1)
    z_b, _ = model.embed(torch.cat([x1, 5 + torch.randn(8, 1, 28, 28)]))
    assert torch.allclose(F.normalize(z_a), z_a)
    assert not torch.allclose(z_a, z_b[:8], atol=1e-3)  # a joint pass would change them


@pytest.mark.parametrize("graph_weight", [1.0, 0.0])
def test_concat_views_is_one_pass_over_both_views(graph_weight):
    """model.concat_views: in eval mode (BatchNorm on running statistics) exactly the
    per-view model's losses and labels; in train mode BatchNorm normalises over both views
    at once, so the embeddings are those of the per-view model's embed() of the 2B images,
    and its running statistics are updated once, from all 2B."""
    x1, x2 = torch.randn(2, 12, 1, 28, 28, dtype=torch.float64)
    one = tiny_wcl(graph_weight=graph_weight, concat_views=True).double().eval()
    per_view = tiny_wcl(graph_weight=graph_weight).double().eval()
    a, b = one(x1, x2), per_view(x1, x2)
    for key in ("loss", "instance_loss", "graph_loss"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-12)
    if graph_weight:
        assert torch.equal(a["labels1"], b["labels1"]) and torch.equal(a["labels2"], b["labels2"])
    one.train()
    per_view.train()
    z1, z2 = per_view.embed(torch.cat([x1, x2]))[0].chunk(2)
    torch.testing.assert_close(one(x1, x2)["instance_loss"], instance_loss(z1, z2, 0.1))
    bn = (one.backbone.bn1, per_view.backbone.bn1)
    torch.testing.assert_close(bn[0].running_mean, bn[1].running_mean)
    assert int(bn[0].num_batches_tracked) == 1  # one pass; per view would count 2
    assert not torch.allclose(one(x1, x2)["loss"], per_view(x1, x2)["loss"])


def test_forward_has_no_value_dependent_host_code():
    model = tiny_wcl().to("meta")
    x = torch.empty(16, 1, 28, 28, device="meta")
    out = model(x, x, torch.empty(16, dtype=torch.long, device="meta"))
    assert out["loss"].shape == ()


@pytest.mark.parametrize("graph_weight", [0.5, 0.0])
def test_forward_adds_the_small_crop_losses(graph_weight):
    """Multi-crop: the small crops go through the network in one pass and add
    small_weight * (instance + graph_weight * kNN) terms against the full-size views."""
    model = tiny_wcl(temperature=0.2, graph_weight=graph_weight, small_k=2, small_weight=0.7)
    x1, x2 = torch.randn(6, 1, 28, 28), torch.randn(6, 1, 28, 28)
    small = torch.randn(3 * 6, 1, 12, 12)
    targets = torch.tensor([0, 1, 0, 1, 2, -1])  # -1: unknown class
    out = model(x1, x2, targets, small=small)
    base = model(x1, x2, targets)
    z1, p1 = model.embed(x1)
    z2, p2 = model.embed(x2)
    zs, ps = model.embed(small)
    small_inst = small_crop_instance_loss(zs, (z1, z2), 6, 0.2)
    assert torch.allclose(out["small_instance_loss"], small_inst, atol=1e-6)
    want = base["loss"] + 0.7 * small_inst
    if graph_weight:
        small_knn = small_crop_knn_loss(ps, (p1, p2), 6, 0.2, k=2)
        assert torch.allclose(out["small_graph_loss"], small_knn, atol=1e-6)
        want = want + 0.7 * graph_weight * small_knn
        # small_precision by hand: each crop's 2 nearest other rows in each view, the pairs
        # where both classes are known, the fraction that agree.
        agree = known = 0
        for view in (p1, p2):
            for row, crop in enumerate(ps.detach()):
                own = row % 6
                sims = (view.detach() @ crop).tolist()
                others = sorted((j for j in range(6) if j != own), key=lambda j: -sims[j])
                for j in others[:2]:
                    if targets[own] >= 0 and targets[j] >= 0:
                        known += 1
                        agree += int(targets[own] == targets[j])
        assert out["small_precision"].item() == pytest.approx(agree / known)
    else:
        assert "small_graph_loss" not in out and "small_precision" not in out
    assert torch.allclose(out["loss"], want, atol=1e-6)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_global_pool_is_torchvisions_on_the_cpu_in_both_modes():
    """The backbone's pooling is AdaptiveAvgPool2d(1) to the bit on the CPU, with and
    without deterministic mode (the plain-mean branch is for CUDA only)."""
    pool = build_backbone("resnet10").avgpool
    x = torch.randn(4, 8, 5, 7)
    for deterministic in (False, True):
        with deterministic_algorithms(deterministic):
            assert torch.equal(pool(x), torch.nn.AdaptiveAvgPool2d(1)(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_backbone_trains_under_deterministic_mode_on_cuda():
    """CUDA's adaptive-pooling backward raises under deterministic mode; the backbone's
    pooling takes a plain mean there, equal to it up to rounding."""
    net = build_backbone("resnet10", stem="small", width=8).cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with deterministic_algorithms(True):
        out = net(x)
        out.sum().backward()
    with torch.no_grad():
        reference = net(x)
    torch.testing.assert_close(out.detach(), reference, atol=1e-5, rtol=1e-5)
