"""Linear evaluation: a linear classifier on the frozen backbone's features.

``protocol`` mode is the release's protocol (docs/design.md; the preset
``src/wcl/configs/eval/linear-imagenet.yaml``): the backbone is frozen and in eval mode
(BatchNorm uses its running statistics); one Linear(C, classes) with weight ~ N(0, 0.01)
and bias 0; SGD with Nesterov momentum 0.9, no weight decay, lr = 0.2 * batch / 256,
cosine decay to 0 per iteration, 80 epochs; every training image is freshly augmented
(RandomResizedCrop + flip) and passes through the backbone every epoch; the test images
get Resize(256) + CenterCrop(224). Top-1 and top-5 of the final epoch and of the best one
are reported (the release reports the best top-1).

``fast`` mode is NOT the paper's protocol: the features of the centre-cropped training
images are extracted once and the same classifier, optimiser and schedule are trained on
them. Without augmentation it usually lands within a point or two of the protocol on
small data, in a fraction of the time; use it to compare checkpoints, not to quote.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from wcl import dist
from wcl.eval.common import log_broken_files, open_run, split_features, start_run
from wcl.eval.config import LinearConfig
from wcl.eval.data import MapImages, eval_transform, load_splits, train_transform
from wcl.eval.loop import Recipe, epoch_loader, evaluate, evaluation_loader, fit, tensor_batches
from wcl.eval.shards import (
    local_batch,
    my_share,
    sampled_batches,
    shard,
    train_sampler,
    wrap_ddp,
)
from wcl.eval.supervised import SupervisedResults, supervised_recipe
from wcl.optim import scaled_lr
from wcl.precision import float32_region

__all__ = ["LinearProbe", "linear_classifier", "linear_eval", "train_linear_on_features"]


def linear_classifier(in_dim: int, num_classes: int, init_std: float = 0.01) -> nn.Linear:
    """Linear(in_dim, num_classes), weight ~ N(0, init_std), bias 0 (the release's init)."""
    fc = nn.Linear(in_dim, num_classes)
    nn.init.normal_(fc.weight, mean=0.0, std=init_std)
    nn.init.zeros_(fc.bias)
    return fc


class LinearProbe(nn.Module):
    """Frozen backbone (always in eval mode, no gradients) followed by a trainable ``fc``.

    ``fc``: the Linear(C, classes), or a DDP wrapper of it. ``forward(x)``: images
    (B, C, H, W) -> logits (B, classes), float32 (the classifier runs outside autocast).
    """

    def __init__(self, backbone: nn.Module, fc: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.fc = fc

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.backbone.eval()  # frozen means running BN statistics too, as in the release
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.backbone(x)
        with float32_region(x.device):
            return self.fc(feats.float())


def train_linear_on_features(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = 80,
    batch_size: int = 256,
    lr: float = 0.2,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    init_std: float = 0.01,
    seed: int = 0,
) -> nn.Linear:
    """A linear classifier trained on cached features, exactly as fast mode trains it.

    ``train_feats`` (N, C) float, ``train_labels`` (N,) int64; ``lr`` is the base lr,
    scaled by batch / 256; cosine per iteration; ``weight_decay`` applies to the weight, not
    the bias. Deterministic for a given ``seed``.
    Returns the trained Linear(C, num_classes) on the features' device.
    """
    torch.manual_seed(seed)
    fc = linear_classifier(train_feats.shape[1], num_classes, init_std).to(train_feats.device)
    recipe = Recipe(
        epochs=epochs,
        steps_per_epoch=math.ceil(len(train_feats) / batch_size),
        peak_lr=scaled_lr(lr, batch_size, "linear"),
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
        eval_every=epochs,
        checkpoint_every=epochs,
        device=train_feats.device,
        progress=False,
    )
    fit(
        recipe,
        model=fc,
        saved=fc,
        batches_for=lambda epoch: tensor_batches(
            train_feats, train_labels, batch_size, seed, epoch
        ),
        test=lambda: {},
    )
    return fc


def linear_eval(cfg: LinearConfig, resume: str | None = None) -> dict[str, Any]:
    """Run the linear evaluation ``cfg`` describes; returns what results.json holds.

    Writes to the run directory: config.yaml, last.pt (classifier, optimiser, epoch,
    history; ``resume`` "auto" or a path continues from one), results.json (top-1/top-5
    final and best, per-epoch history) and, in fast mode, features-train/test.pt.
    One process or several (torchrun / srun): ``linear.batch_size`` is global, each process
    trains the classifier (under DDP) on its share of every batch and tests its share of
    the test set; rank 0 writes the files.
    """
    command = "linear-eval" if cfg.linear.mode == "protocol" else "linear-eval-fast"
    setup = open_run(cfg, command, resume, trains=True)
    s, run, device = cfg.linear, cfg.run, setup.device
    per_process = local_batch(s.batch_size, "linear.batch_size")
    splits = load_splits(cfg.data, setup.channels)
    start_run(setup, cfg)
    log_broken_files(setup, splits)
    batch = min(s.batch_size, len(splits.train))
    torch.manual_seed(run.seed)  # the same initial classifier on every process
    fc = linear_classifier(setup.backbone.spec.feature_dim, splits.num_classes, s.init_std)
    fc = fc.to(device)
    head = wrap_ddp(fc)
    pin = device.type == "cuda"
    # Partial last batches are kept (drop_last False), as in the release; a batch at least
    # the training set's size becomes one step over the whole set.
    sampler = train_sampler(range(len(splits.train)), run.seed, drop_last=False)
    per_process = min(per_process, len(sampler))
    steps = math.ceil(len(sampler) / per_process)

    if s.mode == "fast":
        feats = split_features(cfg, setup, splits, s.cache_features)
        (train_x, train_y), (test_x, test_y) = ((f.to(device), t.to(device)) for f, t in feats)
        rows = {"train_rows": len(train_y), "test_rows": len(test_y)}
        # Broken files have no feature row: the sampler covers the readable ones.
        sampler = train_sampler(range(len(train_y)), run.seed, drop_last=False)
        per_process = min(per_process, len(sampler))
        steps = math.ceil(len(sampler) / per_process)
        model: nn.Module = head
        amp = None

        def batches_for(epoch: int) -> Iterable[tuple[Tensor, Tensor]]:
            return sampled_batches(train_x, train_y, sampler, per_process, epoch)

        mine = torch.tensor(my_share(len(test_x)), dtype=torch.int64, device=device)
        test_x, test_y = test_x[mine], test_y[mine]  # this process's share of the test set

        def test() -> dict[str, float]:
            size = run.eval_batch_size
            batches = zip(test_x.split(size), test_y.split(size), strict=True)
            return evaluate(fc, batches, device)
    else:
        rows = {}
        # channels_last: the faster convolution layout on GPUs and, with oneDNN, on CPUs.
        layout = torch.channels_last
        backbone = setup.backbone.module.to(device, memory_format=layout)
        model = LinearProbe(backbone, head)  # trains through DDP
        probe = LinearProbe(backbone, fc)  # the same weights, tested without the wrapper
        amp = setup.amp
        augmented = MapImages(splits.train, train_transform(cfg.data, setup.channels), run.seed)
        test_set = shard(MapImages(splits.test, eval_transform(cfg.data, setup.channels)))

        def batches_for(epoch: int) -> Iterable[tuple[Tensor, Tensor]]:
            return epoch_loader(
                augmented, sampler, per_process, epoch, cfg.data.workers, False, pin
            )

        def test() -> dict[str, float]:
            loader = evaluation_loader(test_set, run.eval_batch_size, cfg.data.workers, pin)
            return evaluate(probe, loader, device, amp, run.progress)

    recipe = supervised_recipe(
        s, setup, batch=batch, steps_per_epoch=steps, amp=amp, progress=run.progress, desc="linear"
    )
    info = {
        "run_dir": str(setup.run_dir),
        "mode": s.mode,
        "num_classes": splits.num_classes,
        "batch_size": batch,
        "processes": dist.world_size(),
        "peak_lr": recipe.peak_lr,
        "train_images": len(splits.train),
        "test_images": len(splits.test),
    }
    out = SupervisedResults(setup, cfg, command, splits, info, rows)
    history = fit(
        recipe,
        model=model,
        saved=fc,
        batches_for=batches_for,
        test=test,
        state=setup.state,
        extra=out.checkpoint_extra(),
        report=out.report,
    )
    return out.finish(history)
