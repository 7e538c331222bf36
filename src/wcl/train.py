"""WCL pre-training, read top to bottom: set up, (resume), epochs of steps, checkpoints.

The same function runs as one plain process or under torchrun/SLURM: ``wcl.dist`` reads
the environment, the config's batch is the global batch, and each process takes its
share. Only rank 0 writes files and draws the progress bar. What the loop uses lives in
modules of its own: the loader (``wcl.loader``), one guarded optimiser step and the
non-finite policy (``wcl.steps``), when to log, save and evaluate (``wcl.cadence``), the
run directory (``wcl.rundir``), signals (``wcl.preemption``) and autocast and loss
scaling (``wcl.precision``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from wcl import dist
from wcl.backbones import build_backbone
from wcl.cadence import Cadence
from wcl.checkpoint import set_rng_state
from wcl.config import Config, ConfigError
from wcl.data import read_skip_log
from wcl.data.views import TrainingViews
from wcl.loader import EpochLoader
from wcl.lock import run_dir_lock
from wcl.model import WCL
from wcl.optim import LARS, lr_at, param_groups, scaled_lr, set_lr
from wcl.precision import amp_dtype, autocast, deterministic_algorithms, grad_scaler
from wcl.preemption import Preempted, PreemptionFlag
from wcl.pretrain_data import online_knn, save_late_batch, training_data
from wcl.records import MetricsWindow
from wcl.rundir import (
    RunState,
    RunWriter,
    check_run_dir,
    find_resume_checkpoint,
    load_model_state,
)
from wcl.steps import GuardedStep

__all__ = ["build_model", "build_optimizer", "lr_schedule", "pretrain"]


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
        small_k=m.small_k,
        small_weight=m.small_weight,
        concat_views=m.concat_views,
    )


def build_optimizer(cfg: Config, model: torch.nn.Module) -> LARS:
    """LARS over ``model``'s parameters as ``cfg.optim`` says; its lr is set every step."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, o.lars_exclude)
    return LARS(groups, lr=0.0, momentum=o.momentum, trust_coefficient=o.trust_coefficient)


def lr_schedule(cfg: Config, steps_per_epoch: int) -> Callable[[int], float]:
    """step -> learning rate: the scaled peak, linear warm-up from 0, cosine to final_lr."""
    o = cfg.optim
    peak = scaled_lr(o.lr, cfg.train.batch_size, o.lr_scaling)
    total = cfg.train.epochs * steps_per_epoch
    warmup = round(o.warmup_epochs * steps_per_epoch)
    return lambda step: lr_at(step, peak, warmup, total, o.final_lr)


def pretrain(cfg: Config, resume: str | None = None) -> Path:
    """Pre-train WCL as ``cfg`` says; returns the run directory.

    resume: None (fresh run), "auto" (the run directory's last.pt, if any) or a
    checkpoint path. Writes config.yaml, metrics.jsonl, last.pt and epoch-NNNN.pt.
    Raises :class:`wcl.preemption.Preempted` after checkpointing on SIGTERM / SIGUSR1 (or,
    during start-up, before the first step), and :class:`wcl.lock.RunDirLocked` when
    another live run holds the run directory.
    """
    device_type = dist.resolve_device(cfg.train.device, "train.device").type
    info = dist.init_distributed(cfg.train.dist_backend, device_type)
    if cfg.train.batch_size % info.world_size:
        raise ConfigError(
            f"'train.batch_size' {cfg.train.batch_size} (global) is not divisible by the "
            f"{info.world_size} processes"
        )
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(cfg.train.out_dir)
    # From here on a signal (SLURM's pre-emption warning), start-up included, ends the run
    # with a `preempted` file; one run at a time writes the directory.
    with PreemptionFlag() as preemption, run_dir_lock(run_dir, "wcl pretrain"):
        return _pretrain(cfg, resume, info, run_dir, preemption)


def _pretrain(
    cfg: Config, resume: str | None, info: dist.DistInfo, run_dir: Path, preemption: PreemptionFlag
) -> Path:
    check_run_dir(run_dir, resuming=resume is not None)
    checkpoint = find_resume_checkpoint(resume, run_dir, cfg)
    dist.barrier()  # every process has checked the directory before rank 0 writes to it

    device, memory_format = info.device, _memory_format(cfg)
    views, classes = training_data(cfg, run_dir)
    views.to(device)
    loader = _loader(cfg, views, info)
    cadence = _cadence(cfg, loader.steps_per_epoch)
    model, net = _network(cfg, info, memory_format)
    optimizer = build_optimizer(cfg, model)
    schedule = lr_schedule(cfg, cadence.steps_per_epoch)
    amp = amp_dtype(cfg.train.amp, device)
    scaler = grad_scaler(device, amp)  # passes through unless float16
    state = _resume(checkpoint, model, optimizer, scaler)
    guard = GuardedStep(model, optimizer, scaler, skip_nonfinite=cfg.train.nonfinite == "skip")
    run = RunWriter(run_dir, cfg, state, model, optimizer, scaler)
    monitor = online_knn(cfg, amp) if classes else None
    window = MetricsWindow(cfg.train.batch_size, keep_dropped=cfg.train.nonfinite != "skip")
    if preemption.should_stop():  # a signal during start-up: stop before the first step
        raise run.preempted(preemption.received, saved=False)

    with deterministic_algorithms(cfg.train.deterministic), loader:
        for epoch in range(state.epoch, cfg.train.epochs):
            state.epoch = epoch
            # The weak (MoCo v2) augmentation during warm-up, the strong (SimCLR) one after.
            views.set_epoch(epoch, strong=epoch >= cfg.optim.warmup_epochs)
            net.train()
            window.restart()
            done = cadence.steps_into(epoch, state.step)  # > 0: resumed part-way through
            bar = tqdm(
                loader.epoch(epoch, done), desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                disable=not run.main, initial=done, total=cadence.steps_per_epoch,
            )  # fmt: skip
            for loaded in bar:
                lr = schedule(state.step)
                set_lr(optimizer, lr)
                x1, x2, targets, small = views.make(loaded, device, memory_format)
                targets = targets.to(device, non_blocking=True) if classes else None
                out, stepped = _train_step(net, (x1, x2, targets, small), guard, amp)
                window.add(out, lr, stepped)
                state.step += 1
                if cadence.is_last(state.step) and run.main and "labels1" in out:
                    save_late_batch(run_dir / "late_batch.pt", x1, out, targets, cfg, classes)

                stop = preemption.should_stop()
                if stop or cadence.logs_after_step(state.step):
                    record = window.record(state.step, epoch + 1, lr) | guard.counters()
                    run.log.write(record)
                    _show(bar, record, lr)
                    window.restart()
                end_of_epoch = cadence.ends_epoch(state.step)
                if (stop or cadence.saves_after_step(state.step)) and not end_of_epoch:
                    run.save()
                if stop:
                    raise _stopped(run, preemption, end_of_epoch)

            state.epoch = epoch + 1
            _after_epoch(run, cadence, monitor, model)
    run.close()
    return run_dir


def _memory_format(cfg: Config) -> torch.memory_format:
    # channels_last: the faster convolution layout on GPUs (tensor cores) and, with oneDNN,
    # on CPUs too (about 10% a step for the demo net and ResNet-50: BENCHMARKS.md).
    return torch.channels_last if cfg.train.channels_last else torch.preserve_format


def _loader(cfg: Config, views: TrainingViews, info: dist.DistInfo) -> EpochLoader:
    """Every process's share of each global batch: a disjoint 1/world of it."""
    loader = EpochLoader(
        views.dataset, cfg.train.batch_size // info.world_size, info.rank, info.world_size,
        cfg.train.seed, workers=cfg.data.workers, pin_memory=info.device.type == "cuda",
        # Workers that outlive the epoch save their start-up every epoch (seconds each
        # under forkserver, Python 3.14's default): bench/worker_startup.py.
        persistent=views.workers_may_persist,
    )  # fmt: skip
    if loader.steps_per_epoch == 0:
        raise ConfigError(
            f"the training set has {len(views.dataset)} images, fewer than one global batch "
            f"'train.batch_size' = {cfg.train.batch_size}"
        )
    return loader


def _cadence(cfg: Config, steps_per_epoch: int) -> Cadence:
    """When pre-training logs (``train.log_every``), saves (``train.checkpoint_every``,
    ``train.checkpoint_every_steps``) and runs the kNN monitor (``train.knn_every``)."""
    t = cfg.train
    return Cadence(
        t.epochs, steps_per_epoch, log_every=t.log_every,
        save_every_steps=t.checkpoint_every_steps or 0, save_every=t.checkpoint_every,
        evaluate_every=t.knn_every,
    )  # fmt: skip


def _network(
    cfg: Config, info: dist.DistInfo, memory_format: torch.memory_format
) -> tuple[WCL, nn.Module]:
    """The model on this process's device, and what the loop calls (a DDP wrapper with
    several processes). Seeded: every process starts from the same weights."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    if cfg.model.sync_bn:
        model = dist.sync_batchnorm(model, info.device)
    model = model.to(info.device, memory_format=memory_format)
    return model, DistributedDataParallel(model) if info.world_size > 1 else model


def _resume(
    checkpoint: dict | None, model: nn.Module, optimizer: LARS, scaler: torch.amp.GradScaler
) -> RunState:
    """Load ``checkpoint`` (None: a fresh run) into the run's objects and the random
    generators; where the run stands."""
    if checkpoint is None:
        return RunState()
    load_model_state(model, checkpoint)
    optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint.get("scaler"):  # absent from older checkpoints and non-fp16 runs
        scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"])
    return RunState(checkpoint["epoch"], checkpoint["step"])


def _train_step(
    net: nn.Module, batch: tuple, guard: GuardedStep, amp: torch.dtype | None
) -> tuple[dict[str, torch.Tensor], bool]:
    """One step on ``batch`` = (x1, x2, targets, small): the forward pass under autocast,
    then the guarded update; (the model's outputs, whether the update was taken)."""
    x1, x2, targets, small = batch
    guard.begin()
    with autocast(x1.device, amp):
        out = net(x1, x2, targets, small)
    return out, guard.finish(out["loss"])


def _show(bar: tqdm, record: dict, lr: float) -> None:
    img_s = record.get("images_per_s", 0.0)
    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.3g}", img_s=f"{img_s:.0f}")


def _stopped(run: RunWriter, preemption: PreemptionFlag, end_of_epoch: bool) -> Preempted:
    """Pre-emption after a step: the exception to raise once ``last.pt`` holds it (saved
    already mid-epoch; an epoch it completed is saved here, as finished)."""
    if end_of_epoch:
        run.state.epoch += 1
        run.save()
    return run.preempted(preemption.received, saved=True)


def _after_epoch(run: RunWriter, cadence: Cadence, monitor: Callable | None, model: WCL) -> None:
    """After ``run.state.epoch`` finished epochs: the count of unreadable images so far,
    the kNN monitor and the checkpoints, as due."""
    state = run.state
    skipped_files = read_skip_log(run.run_dir / "skipped.jsonl")
    if run.main and skipped_files:
        run.log.write({"step": state.step, "epoch": state.epoch,
                       "skipped_files": len(skipped_files)})  # fmt: skip
    if monitor is not None and cadence.evaluates_after(state.epoch):
        # Every process takes its share; log.write does nothing off rank 0.
        run.log.write({"step": state.step, "epoch": state.epoch} | monitor(model.backbone))
    if cadence.keeps_after(state.epoch):
        run.save(keep=True)
    elif cadence.save_every_steps:
        run.save()
