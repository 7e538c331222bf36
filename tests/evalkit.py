"""Helpers for the evaluation and weights tests: tiny pre-trained-looking checkpoints."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import pytest
import torch

from wcl.backbones import build_backbone
from wcl.checkpoint import save_checkpoint
from wcl.config import load_config
from wcl.data import load_fashion_mnist
from wcl.eval.config import EvalData
from wcl.eval.data import eval_transform
from wcl.model import WCL

FIXTURES = Path(__file__).parent / "fixtures"
FASHION_IDX = FIXTURES / "fashion-idx"
FASHION_PNG = FIXTURES / "fashion"
PHOTOS = FIXTURES / "photos"


def calibrate_bn(backbone: torch.nn.Module, images: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to those of ``images`` (one batch).

    A freshly initialised backbone has running mean 0 / var 1, which make its eval-mode
    features nearly constant; real statistics give features a classifier can use.
    """
    for module in backbone.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one batch sets the statistics
    backbone.train()
    with torch.no_grad():
        backbone(images)
    for module in backbone.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.1


@contextlib.contextmanager
def float32():
    """torch's float32 default dtype inside, whatever an earlier test left set."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@functools.cache
@float32()
def _tiny_state(seed: int, in_channels: int) -> tuple[dict, dict]:
    torch.manual_seed(seed)
    backbone = build_backbone("resnet10", "small", in_channels, 8)
    if in_channels == 1:
        data = load_fashion_mnist(FASHION_IDX, train=True)
        transform = eval_transform(EvalData(dataset="fashion_mnist", image_size=28), 1)
        images = torch.stack([transform(data[i][0]) for i in range(len(data))])
    else:
        images = torch.randn(64, 3, 32, 32)
    calibrate_bn(backbone, images)
    model = WCL(backbone, backbone.feature_dim, hidden_dim=32, out_dim=16)
    cfg = load_config(
        "fashion-mnist-demo",
        [
            f"data.root={FASHION_IDX}",
            f"data.channels={in_channels}",
            "data.dataset=" + ("fashion_mnist" if in_channels == 1 else "folder"),
            "model.width=8",
            "model.stem=small",
            "data.augment=loader",
            "model.hidden_dim=32",
            "model.out_dim=16",
        ],
    )
    return model.state_dict(), cfg.to_dict()


def tiny_checkpoint(path: Path, seed: int = 0, in_channels: int = 1) -> Path:
    """A wcl pre-training checkpoint of a ResNet-10 (small stem, width 8), BN calibrated.

    Greyscale: calibrated on the 300 Fashion-MNIST fixture images; RGB: on random images.
    Built once per (seed, in_channels) and process, written anew to each ``path``.
    """
    state, config = _tiny_state(seed, in_channels)
    save_checkpoint({"kind": "pretrain", "model": state, "config": config, "epoch": 1}, path)
    return path


class Payload:
    """Pickles to ``open(marker, "w")``: loading it with plain pickle creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint-looking file whose unpickling (without weights_only) creates ``marker``."""
    torch.save({"model": {"conv1.weight": torch.zeros(8, 1, 3, 3)}, "x": Payload(marker)}, path)
    return path


@pytest.fixture(autouse=True)
def float32_default():
    """Run each test under :func:`float32` (module fixtures use the context themselves)."""
    with float32():
        yield
