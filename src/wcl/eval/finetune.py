"""Semi-supervised evaluation: fine-tune the whole network on a fraction of the labels.

Protocol (SimCLR v1, appendix B.5, which WCL's semi-supervised numbers follow): the
pre-trained backbone plus a new Linear(C, classes) head (weight ~ N(0, 0.01), bias 0),
all of it trained (BatchNorm in training mode) with SGD + Nesterov momentum 0.9, no
weight decay, lr = 0.05 * batch / 256, batch 4096, only RandomResizedCrop + flip as
augmentation; 60 epochs for 1% of the labels, 30 for 10%. SimCLR does not say how the lr
decays; we decay it with a per-iteration cosine to 0, like the linear probe, because a
constant lr leaves the last epochs noisy on such small labelled sets. Test: centre crop.

The labelled subset is either the published list (one image file name per line, as in
the ImageNet 1% / 10% files, matched against the file names of an image folder) or a
class-balanced random draw: ``round(fraction * n_c)`` images (at least one) of each
class c, drawn with a generator seeded by (subset_seed, c), so the same seed always gives
the same subset and each class's draw does not depend on the others.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from wcl import dist
from wcl.config import ConfigError
from wcl.data import ImageFolderDataset, sample_seed
from wcl.eval.common import log_broken_files, open_run, start_run
from wcl.eval.config import FinetuneConfig
from wcl.eval.data import MapImages, dataset_targets, eval_transform, load_splits, train_transform
from wcl.eval.linear import linear_classifier
from wcl.eval.loop import epoch_loader, evaluate, evaluation_loader, fit
from wcl.eval.shards import local_batch, shard, train_sampler, wrap_ddp
from wcl.eval.supervised import SupervisedResults, supervised_recipe

__all__ = ["Classifier", "balanced_subset", "finetune", "subset_from_file"]


class Classifier(nn.Module):
    """Backbone + linear head, trained end to end: images (B, C, H, W) -> logits (B, K)."""

    def __init__(self, backbone: nn.Module, fc: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(True)
        self.fc = fc

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.backbone(x))


def balanced_subset(targets: Tensor, fraction: float, seed: int = 0) -> Tensor:
    """Sorted indices (int64) of ``round(fraction * n_c)`` (>= 1) random images per class.

    ``targets`` (N,) int64; unlabelled entries (-1) are never chosen. Class c's draw uses a
    generator seeded by (seed, c) only.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    chosen = []
    for c in torch.unique(targets[targets >= 0]).tolist():
        members = torch.nonzero(targets == c).flatten()
        count = max(1, round(fraction * len(members)))
        generator = torch.Generator().manual_seed(sample_seed(seed, c, -2) % 2**63)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.sort(torch.cat(chosen)).values if chosen else torch.empty(0, dtype=torch.int64)


def _file_names(dataset: Dataset) -> list[str]:
    if isinstance(dataset, Subset):
        names = _file_names(dataset.dataset)
        return [names[i] for i in dataset.indices]
    if isinstance(dataset, ImageFolderDataset):
        return [os.path.basename(path) for path, _ in dataset.samples]
    raise ValueError(
        "a subset file names image files, so the training set must be an image folder "
        "(data.dataset: folder)"
    )


def subset_from_file(dataset: Dataset, path: str | os.PathLike) -> Tensor:
    """Sorted indices of the images of ``dataset`` named in ``path``.

    ``path``: one image file name per line (``n01440764_10026.JPEG``; a leading folder is
    ignored, blank lines and ``#`` comments skipped), the format of the published ImageNet
    1% / 10% lists. Every name must match exactly one image file name of the folder.
    """
    lines = Path(path).read_text().splitlines()
    wanted = {os.path.basename(s.strip()) for s in lines if s.strip() and not s.startswith("#")}
    if not wanted:
        raise ValueError(f"subset file {path} names no images")
    where: dict[str, list[int]] = {}
    for index, name in enumerate(_file_names(dataset)):
        if name in wanted:
            where.setdefault(name, []).append(index)
    missing = sorted(wanted - where.keys())
    if missing:
        raise ValueError(
            f"{len(missing)} of the {len(wanted)} images in {path} are not in the training "
            f"folder, e.g. {missing[:3]}"
        )
    doubled = sorted(name for name, found in where.items() if len(found) > 1)
    if doubled:
        raise ValueError(f"file names in {path} match several images, e.g. {doubled[:3]}")
    return torch.tensor(sorted(i for found in where.values() for i in found), dtype=torch.int64)


def finetune(cfg: FinetuneConfig, resume: str | None = None) -> dict[str, Any]:
    """Fine-tune as ``cfg`` describes; returns what results.json holds.

    Writes to the run directory: config.yaml, subset.txt (the labelled training indices,
    one a line), last.pt (the whole network as ``backbone.*`` / ``fc.*``, optimiser,
    epoch, history; also readable by every command as a backbone checkpoint) and
    results.json (top-1/top-5 final and best, history).
    One process or several (torchrun / srun): ``finetune.batch_size`` is global, the whole
    network trains under DDP with BatchNorm synchronised over processes (statistics of the
    global batch, as one process would compute them), each process tests its share of the
    test set; rank 0 writes the files.
    """
    setup = open_run(cfg, "finetune", resume, trains=True)
    s, run, device = cfg.finetune, cfg.run, setup.device
    per_process = local_batch(s.batch_size, "finetune.batch_size")
    splits = load_splits(cfg.data, setup.channels)
    if s.subset_file:
        try:
            indices = subset_from_file(splits.train, s.subset_file)
        except ValueError as err:
            raise ConfigError(f"'finetune.subset_file': {err}") from err
        source = {"file": str(s.subset_file)}
    else:
        assert s.fraction is not None  # validated
        indices = balanced_subset(dataset_targets(splits.train), s.fraction, s.subset_seed)
        source = {"fraction": s.fraction, "seed": s.subset_seed}
    world = dist.world_size()
    if len(indices) < world:
        raise ConfigError(f"{len(indices)} labelled images cannot be shared by {world} processes")
    start_run(setup, cfg)
    log_broken_files(setup, splits)
    if dist.is_main():
        (setup.run_dir / "subset.txt").write_text("".join(f"{i}\n" for i in indices.tolist()))
    per_class = torch.bincount(dataset_targets(splits.train)[indices], minlength=splits.num_classes)

    labelled = MapImages(
        Subset(splits.train, indices.tolist()),
        train_transform(cfg.data, setup.channels),
        run.seed,
    )
    # Whole batches only: BatchNorm trains here, and a last batch of 1 would break it. The
    # sampler keeps W * floor(n / W) images, so that every process has as many batches.
    sampler = train_sampler(labelled, run.seed, drop_last=True)
    per_process = min(per_process, len(sampler))  # a batch above the subset: one step
    batch = per_process * world  # the global batch actually used, min(batch_size, n) for W=1
    recipe = supervised_recipe(
        s,
        setup,
        batch=batch,
        steps_per_epoch=len(sampler) // per_process,
        amp=setup.amp,
        progress=run.progress,
        desc="finetune",
    )
    torch.manual_seed(run.seed)  # the same initial head on every process
    fc = linear_classifier(setup.backbone.spec.feature_dim, splits.num_classes, s.init_std)
    # channels_last: the faster convolution layout on GPUs and, with oneDNN, on CPUs.
    layout = torch.channels_last
    model = Classifier(setup.backbone.module, fc)
    model = dist.sync_batchnorm(model, device).to(device, memory_format=layout)
    net = wrap_ddp(model)
    pin = device.type == "cuda"
    test_set = shard(MapImages(splits.test, eval_transform(cfg.data, setup.channels)))

    def test() -> dict[str, float]:
        loader = evaluation_loader(test_set, run.eval_batch_size, cfg.data.workers, pin)
        return evaluate(model, loader, device, setup.amp, run.progress)

    info = {
        "run_dir": str(setup.run_dir),
        "subset": {**source, "images": len(indices), "per_class": per_class.tolist()},
        "num_classes": splits.num_classes,
        "batch_size": batch,
        "processes": world,
        "peak_lr": recipe.peak_lr,
        "test_images": len(splits.test),
    }

    out = SupervisedResults(setup, cfg, "finetune", splits, info)
    history = fit(
        recipe,
        model=net,
        saved=model,
        batches_for=lambda epoch: epoch_loader(
            labelled, sampler, per_process, epoch, cfg.data.workers, True, pin
        ),
        test=test,
        state=setup.state,
        extra=out.checkpoint_extra(),
        report=out.report,
    )
    return out.finish(history)
