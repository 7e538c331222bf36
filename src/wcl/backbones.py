"""Backbones: torchvision ResNets without ``fc``, with a small-image stem and width option."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["BACKBONES", "STEMS", "GlobalAvgPool", "build_backbone", "feature_dim"]

# name -> (block, blocks per stage); the torchvision definitions, plus a shallow ResNet-10.
BACKBONES = {
    "resnet10": (BasicBlock, [1, 1, 1, 1]),
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
}
STEMS = ("imagenet", "small", "small-s2")


class GlobalAvgPool(nn.Module):
    """(B, C, H, W) -> (B, C, 1, 1), the mean over H and W: torchvision's
    ``AdaptiveAvgPool2d(1)``, except on CUDA under torch's deterministic mode
    (``train.deterministic``), where adaptive pooling's backward has no deterministic
    kernel and raises; there it is a plain mean (the same up to rounding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and torch.are_deterministic_algorithms_enabled():
            return x.mean(dim=(2, 3), keepdim=True)
        return F.adaptive_avg_pool2d(x, 1)


def _rebuild_stages(net: ResNet, block: type[nn.Module], layers: list[int], width: int) -> None:
    """Replace the stem conv and the four stages by ones of base ``width`` channels."""
    net.inplanes = width
    net.bn1 = nn.BatchNorm2d(width)
    net.layer1 = net._make_layer(block, width, layers[0])
    net.layer2 = net._make_layer(block, width * 2, layers[1], stride=2)
    net.layer3 = net._make_layer(block, width * 4, layers[2], stride=2)
    net.layer4 = net._make_layer(block, width * 8, layers[3], stride=2)


def build_backbone(
    name: str, stem: str = "imagenet", in_channels: int = 3, width: int = 64
) -> nn.Module:
    """A torchvision ResNet whose forward gives pooled features (B, C).

    stem "imagenet": 7x7 stride-2 conv + max-pool (224 px input). stem "small": 3x3
    stride-1 conv and no max-pool, for 28-32 px images (CIFAR, Fashion-MNIST); "small-s2":
    the same with stride 2, four times cheaper, for CPU budgets.
    ``in_channels`` = 1 takes greyscale input directly; ``width`` is the first stage's
    channel count (64 in every torchvision ResNet; smaller is faster on a CPU).
    C = ``backbone.feature_dim`` = 8 * width * block expansion (512 for ResNet-18,
    2048 for ResNet-50). Parameter names are torchvision's, so with the defaults the
    state dict loads into ``torchvision.models.<name>()`` (``fc`` aside).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose one of {list(STEMS)}")
    block, layers = BACKBONES[name]
    net = ResNet(block, layers)
    if width != 64:
        _rebuild_stages(net, block, layers, width)
    if stem in ("small", "small-s2"):
        stride = 2 if stem == "small-s2" else 1
        net.conv1 = nn.Conv2d(
            in_channels, width, kernel_size=3, stride=stride, padding=1, bias=False
        )
        net.maxpool = nn.Identity()
    else:
        net.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
    # torchvision's initialisation, for the modules replaced above.
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    net.avgpool = GlobalAvgPool()
    net.feature_dim = width * 8 * block.expansion
    net.fc = nn.Identity()
    return net


def feature_dim(backbone: nn.Module) -> int:
    """Width of the pooled features a backbone from :func:`build_backbone` returns."""
    return int(backbone.feature_dim)
