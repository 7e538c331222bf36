"""WCL pre-training, read top to bottom: set up, (resume), epochs of steps, checkpoints.

The same function runs as one plain process or under torchrun/SLURM: ``wcl.dist`` reads
the environment, the config's batch is the global batch, and each process takes its
share. Only rank 0 writes files and draws the progress bar.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from wcl import dist
from wcl.backbones import build_backbone
from wcl.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from wcl.config import Config, ConfigError
from wcl.data import TwoViews, build_dataset, dataset_stats, strong_pipeline, weak_pipeline
from wcl.model import WCL
from wcl.optim import LARS, lr_at, param_groups, scaled_lr, set_lr

__all__ = ["build_model", "pretrain", "RunState"]


def build_model(cfg: Config) -> WCL:
    """The WCL module a config describes (on the CPU, freshly initialised)."""
    m = cfg.model
    backbone = build_backbone(m.backbone, m.stem, cfg.data.channels, m.width)
    return WCL(
        backbone,
        backbone.feature_dim,
        hidden_dim=m.hidden_dim,
        out_dim=m.out_dim,
        temperature=m.temperature,
        graph_weight=m.graph_weight,
        k=m.graph_k,
        gather_mode=m.gather,
    )


@dataclass
class RunState:
    """Where a run stands: the next epoch to train and the optimiser steps taken."""

    epoch: int = 0
    step: int = 0


def _training_data(cfg: Config):
    """The two-view training set and the (weak, strong) augmentation pipelines."""
    d = cfg.data
    dataset = build_dataset(d.dataset, d.root, train=True, download=d.download, channels=d.channels)
    labelled = len(getattr(dataset, "classes", [])) > 0
    if d.subset is not None:
        dataset = Subset(dataset, range(min(d.subset, len(dataset))))
    mean, std = dataset_stats(d.dataset, d.channels)
    weak = weak_pipeline(
        d.image_size, mean, std, min_scale=d.weak_min_scale, jitter=d.jitter, blur_prob=d.blur_prob
    )
    strong = strong_pipeline(
        d.image_size,
        mean,
        std,
        min_scale=d.strong_min_scale,
        jitter=d.jitter,
        blur_prob=d.blur_prob,
    )
    return TwoViews(dataset, weak, seed=cfg.train.seed), labelled, weak, strong


def _check_run_dir(run_dir: Path, cfg: Config, resuming: bool) -> None:
    """Refuse to mix a new run into a directory that holds another one."""
    saved = run_dir / "config.yaml"
    if resuming or not saved.exists():
        return
    raise ConfigError(
        f"'train.out_dir' {str(run_dir)!r} already holds a run (config.yaml); pass "
        "--resume auto to continue it, or choose another train.out_dir"
    )


def _resume_state(resume: str | None, run_dir: Path) -> dict | None:
    if resume is None:
        return None
    path = latest_checkpoint(run_dir) if resume == "auto" else Path(resume)
    return None if path is None else load_checkpoint(path)


def _autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    if cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


class _MetricsLog:
    """metrics.jsonl (and TensorBoard when installed) in the run directory, rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
        self.board = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.board = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # TensorBoard is optional
                pass

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, float):
                    self.board.add_scalar(f"pretrain/{key}", value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()


def _checkpoint(path: Path, model: WCL, optimizer, state: RunState, cfg: Config) -> None:
    save_checkpoint(
        {
            "kind": "pretrain",
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": state.epoch,
            "step": state.step,
            "world_size": dist.world_size(),
            "config": cfg.to_dict(),
            "rng": rng_state(),
        },
        path,
    )


def pretrain(cfg: Config, resume: str | None = None) -> Path:
    """Pre-train WCL as ``cfg`` says; returns the run directory.

    resume: None (fresh run), "auto" (the run directory's last.pt, if any) or a
    checkpoint path. Writes config.yaml, metrics.jsonl, last.pt and epoch-NNNN.pt.
    """
    info = dist.init_distributed(cfg.train.dist_backend, cfg.train.device)
    device, world = info.device, info.world_size
    if cfg.train.batch_size % world:
        raise ConfigError(
            f"'train.batch_size' {cfg.train.batch_size} (global) is not divisible by the "
            f"{world} processes"
        )
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(cfg.train.out_dir)
    _check_run_dir(run_dir, cfg, resume is not None)
    checkpoint = _resume_state(resume, run_dir)

    # Data: every process sees a disjoint 1/world of each global batch.
    views, labelled, weak, strong = _training_data(cfg)
    local_batch = cfg.train.batch_size // world
    sampler = DistributedSampler(
        views,
        num_replicas=world,
        rank=info.rank,
        shuffle=True,
        seed=cfg.train.seed,
        drop_last=True,
    )
    loader = DataLoader(
        views,
        batch_size=local_batch,
        sampler=sampler,
        num_workers=cfg.data.workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the training set has {len(views)} images, fewer than one global batch "
            f"'train.batch_size' = {cfg.train.batch_size}"
        )

    # Model and optimiser; the same seed on every process gives the same initial weights.
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    if cfg.model.sync_bn:
        model = dist.sync_batchnorm(model, device)
    channels_last = device.type == "cuda" and cfg.train.channels_last
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    model = model.to(device, memory_format=memory_format)
    net = DistributedDataParallel(model) if world > 1 else model
    optimizer = LARS(
        param_groups(model, cfg.optim.weight_decay),
        lr=0.0,
        momentum=cfg.optim.momentum,
        trust_coefficient=cfg.optim.trust_coefficient,
    )
    peak_lr = scaled_lr(cfg.optim.lr, cfg.train.batch_size, cfg.optim.lr_scaling)
    total_steps = cfg.train.epochs * steps_per_epoch
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
    autocast_dtype = _autocast_dtype(cfg, device)

    state = RunState()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = RunState(checkpoint["epoch"], checkpoint["step"])
        set_rng_state(checkpoint["rng"])

    main = dist.is_main()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    log = _MetricsLog(run_dir, main)

    for epoch in range(state.epoch, cfg.train.epochs):
        sampler.set_epoch(epoch)
        # The weak (MoCo v2) augmentation during warm-up, the strong (SimCLR) one after.
        views.set_epoch(epoch, weak if epoch < cfg.optim.warmup_epochs else strong)
        net.train()
        window: list[dict[str, torch.Tensor]] = []
        tick = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not main)
        for x1, x2, targets in bar:
            lr = lr_at(state.step, peak_lr, warmup_steps, total_steps, cfg.optim.final_lr)
            set_lr(optimizer, lr)
            x1 = x1.to(device, non_blocking=True, memory_format=memory_format)
            x2 = x2.to(device, non_blocking=True, memory_format=memory_format)
            targets = targets.to(device, non_blocking=True) if labelled else None
            with torch.autocast(
                device.type,
                dtype=autocast_dtype or torch.float32,
                enabled=autocast_dtype is not None,
            ):
                out = net(x1, x2, targets)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            state.step += 1
            window.append({k: v.detach() for k, v in out.items() if v.dim() == 0})

            if state.step % cfg.train.log_every == 0 or state.step % steps_per_epoch == 0:
                # One host synchronisation per logging window, not per step.
                means = {k: torch.stack([w[k] for w in window]).mean() for k in window[0]}
                values = torch.stack([dist.all_reduce_mean(v) for v in means.values()]).tolist()
                elapsed = time.perf_counter() - tick
                record = {"step": state.step, "epoch": epoch + 1, "lr": lr}
                record.update(dict(zip(means, values, strict=True)))
                record["images_per_s"] = len(window) * cfg.train.batch_size / elapsed
                if not all(math.isfinite(v) for v in values):
                    raise FloatingPointError(f"non-finite loss at step {state.step}: {record}")
                log.write(record)
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}",
                    lr=f"{lr:.3g}",
                    img_s=f"{record['images_per_s']:.0f}",
                )
                window, tick = [], time.perf_counter()

        state.epoch = epoch + 1
        if main and (
            state.epoch % cfg.train.checkpoint_every == 0 or state.epoch == cfg.train.epochs
        ):
            _checkpoint(run_dir / "last.pt", model, optimizer, state, cfg)
            keep = run_dir / f"epoch-{state.epoch:04d}.pt"
            keep.unlink(missing_ok=True)
            os.link(run_dir / "last.pt", keep)  # a second name, not a second write
        dist.barrier()

    log.close()
    return run_dir
