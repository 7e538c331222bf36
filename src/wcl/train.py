"""WCL pre-training, read top to bottom: set up, (resume), epochs of steps, checkpoints.

The same function runs as one plain process or under torchrun/SLURM: ``wcl.dist`` reads
the environment, the config's batch is the global batch, and each process takes its
share. Only rank 0 writes files and draws the progress bar. The run directory's
bookkeeping (metrics, checkpoints, resume checks, signals) lives in ``wcl.run``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from wcl import dist
from wcl.backbones import build_backbone
from wcl.checkpoint import set_rng_state
from wcl.config import Config, ConfigError, small_crop_size
from wcl.data import (
    build_dataset,
    dataset_stats,
    eval_pipeline,
    first_readable,
    read_skip_log,
    unwrap_image_folder,
)
from wcl.data.views import TrainingViews
from wcl.lock import run_dir_lock
from wcl.model import WCL
from wcl.optim import LARS, lr_at, param_groups, scaled_lr, set_lr
from wcl.run import (
    BufferSnapshot,
    MetricsLog,
    Preempted,
    PreemptionFlag,
    ResumableSampler,
    RunState,
    amp_dtype,
    check_run_dir,
    deterministic_algorithms,
    find_resume_checkpoint,
    grad_scaler,
    ignore_preemption_signals,
    keep_epoch_copy,
    load_model_state,
    save_run_checkpoint,
    workers_stopped_after,
)

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


def _training_data(cfg: Config, run_dir: Path) -> tuple[TrainingViews, list[str]]:
    """The training set as two augmented views per image, plus ``data.small_crops``
    low-resolution ones (made where ``data.augment`` says: see ``wcl.data.views``), and its
    class names ([] if unlabelled).

    Unreadable images in a folder data set are replaced by the next readable one and
    listed in ``run_dir/skipped.jsonl``; a data set with no readable image is an error
    here, before any training.
    """
    d = cfg.data
    dataset = build_dataset(d.dataset, d.root, train=True, download=d.download, channels=d.channels)
    folder = unwrap_image_folder(dataset)
    if folder is not None:
        folder.skip_log = run_dir / "skipped.jsonl"  # before any DataLoader worker copies it
    first_readable(dataset)
    classes = list(getattr(dataset, "classes", []))
    if d.subset is not None:
        dataset = Subset(dataset, range(min(d.subset, len(dataset))))
    mean, std = dataset_stats(d.dataset, d.channels)
    views = TrainingViews(
        dataset, d.augment, d.image_size, mean, std, weak_min_scale=d.weak_min_scale,
        strong_min_scale=d.strong_min_scale, jitter=d.jitter, blur_prob=d.blur_prob,
        seed=cfg.train.seed, small_crops=d.small_crops, small_size=small_crop_size(d),
        small_scale=(d.small_min_scale, d.small_max_scale),
    )  # fmt: skip
    return views, classes


def _knn_monitor(cfg: Config, amp: torch.dtype | None):
    """A function backbone -> {"knn_top1", "knn_top5"} on the held-out split, or None.

    Weighted kNN (``wcl.eval.knn_monitor``) of centre-cropped held-out images against a
    bank of training images, both without augmentation. Collective: every process calls
    it and does 1/W of the work.
    """
    d = cfg.data
    if not cfg.train.knn_every:
        return None
    from wcl.eval import knn_monitor

    # An accuracy counts no substitute: broken files are left out (see gathered_features).
    bank, queries = (
        build_dataset(d.dataset, d.root, split, d.download, d.channels, substitute=False)
        for split in (True, False)
    )
    if cfg.train.knn_bank:
        bank = Subset(bank, range(min(cfg.train.knn_bank, len(bank))))
    if cfg.train.knn_queries:
        queries = Subset(queries, range(min(cfg.train.knn_queries, len(queries))))
    transform = eval_pipeline(d.image_size, *dataset_stats(d.dataset, d.channels))
    k = min(cfg.train.knn_k, len(bank))

    def monitor(backbone: torch.nn.Module) -> dict[str, float]:
        acc = knn_monitor(
            backbone, bank, queries, transform, k=k, t=cfg.train.knn_t, batch_size=512,
            workers=d.workers, amp=amp,
        )  # fmt: skip
        return {"knn_top1": acc["top1"], "knn_top5": acc["top5"]}

    return monitor


def _save_late_batch(path: Path, x: torch.Tensor, out: dict, targets, cfg: Config, classes):
    """The last batch's first views (uint8, as the graph saw them) with their weak labels,
    for the report's component grids."""
    mean, std = (torch.tensor(v, device=x.device).view(1, -1, 1, 1)
                 for v in dataset_stats(cfg.data.dataset, cfg.data.channels))  # fmt: skip
    images = ((x.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    batch = {"images": images.contiguous(), "labels": out["labels1"][: len(x)].cpu()}
    if targets is not None:
        batch["targets"] = targets.cpu()
    batch["classes"] = classes
    torch.save(batch, path)


def _gradients_finite(model: torch.nn.Module) -> bool:
    """One host synchronisation; used only with train.nonfinite = skip."""
    flags = [p.grad.isfinite().all() for p in model.parameters() if p.grad is not None]
    return bool(torch.stack(flags).all())


def _summarise(window: list[dict], step: int, epoch: int, seconds: float, batch: int) -> dict:
    """One metrics record from the (non-empty) window of steps since the last record; raises
    on a non-finite loss.

    One host synchronisation per window, not per step.
    """
    keys = [k for k in window[0] if k != "lr"]
    per_step = torch.stack([torch.stack([w[k].float() for k in keys]) for w in window])
    per_step = dist.all_reduce_mean(per_step).tolist()
    for offset, values in enumerate(per_step):
        if not all(math.isfinite(v) for v in values):
            bad_step = step - len(window) + offset + 1
            found = ", ".join(f"{k}={v:.4g}" for k, v in zip(keys, values, strict=True))
            raise FloatingPointError(
                f"non-finite loss at step {bad_step} (epoch {epoch}): {found}, "
                f"lr={window[offset]['lr']:.4g}; the last checkpoint was not overwritten "
                "(set train.nonfinite=skip to drop such steps instead)"
            )
    record = {"step": step, "epoch": epoch, "lr": window[-1]["lr"]}
    record.update({k: sum(row[i] for row in per_step) / len(per_step) for i, k in enumerate(keys)})
    record["images_per_s"] = len(window) * batch / seconds
    return record


def _mark_preempted(run_dir: Path, main: bool, preemption: PreemptionFlag, step: int) -> None:
    """The ``preempted`` file (signal and step) that a job script tests to requeue."""
    if main:
        (run_dir / "preempted").write_text(f"{preemption.received} {step}\n")


def pretrain(cfg: Config, resume: str | None = None) -> Path:
    """Pre-train WCL as ``cfg`` says; returns the run directory.

    resume: None (fresh run), "auto" (the run directory's last.pt, if any) or a
    checkpoint path. Writes config.yaml, metrics.jsonl, last.pt and epoch-NNNN.pt.
    Raises :class:`wcl.run.Preempted` after checkpointing on SIGTERM / SIGUSR1 (or, during
    start-up, before the first step), and :class:`wcl.lock.RunDirLocked` when another
    live run holds the run directory.
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
    device, world = info.device, info.world_size
    check_run_dir(run_dir, resuming=resume is not None)
    checkpoint = find_resume_checkpoint(resume, run_dir, cfg)
    dist.barrier()  # every process has checked the directory before rank 0 writes to it

    # Data: every process sees a disjoint 1/world of each global batch.
    views, classes = _training_data(cfg, run_dir)
    views.to(device)
    labelled = bool(classes)
    local_batch = cfg.train.batch_size // world
    sampler = ResumableSampler(
        views.dataset, num_replicas=world, rank=info.rank, shuffle=True, seed=cfg.train.seed,
        drop_last=True,
    )  # fmt: skip
    loader = DataLoader(
        views.dataset,
        batch_size=local_batch,
        sampler=sampler,
        num_workers=cfg.data.workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        worker_init_fn=ignore_preemption_signals,
        # Workers that outlive the epoch save their start-up every epoch (seconds each
        # under forkserver, Python 3.14's default): bench/worker_startup.py.
        persistent_workers=cfg.data.workers > 0 and views.workers_may_persist,
    )
    steps_per_epoch = len(sampler) // local_batch
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the training set has {len(views.dataset)} images, fewer than one global batch "
            f"'train.batch_size' = {cfg.train.batch_size}"
        )

    # Model and optimiser; the same seed on every process gives the same initial weights.
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    if cfg.model.sync_bn:
        model = dist.sync_batchnorm(model, device)
    # channels_last: the faster convolution layout on GPUs (tensor cores) and, with oneDNN,
    # on CPUs too (about 10% a step for the demo net and ResNet-50: BENCHMARKS.md).
    memory_format = torch.channels_last if cfg.train.channels_last else torch.preserve_format
    model = model.to(device, memory_format=memory_format)
    net = DistributedDataParallel(model) if world > 1 else model
    optimizer = build_optimizer(cfg, model)
    schedule = lr_schedule(cfg, steps_per_epoch)
    total_steps = cfg.train.epochs * steps_per_epoch
    autocast_dtype = amp_dtype(cfg.train.amp, device)
    scaler = grad_scaler(device, autocast_dtype)  # passes through unless float16

    state = RunState()
    if checkpoint is not None:
        load_model_state(model, checkpoint)
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler"):  # absent from older checkpoints and non-fp16 runs
            scaler.load_state_dict(checkpoint["scaler"])
        state = RunState(checkpoint["epoch"], checkpoint["step"])
        set_rng_state(checkpoint["rng"])

    main = dist.is_main()
    if main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (run_dir / "preempted").unlink(missing_ok=True)
    log = MetricsLog(run_dir, main, state.step)
    monitor = _knn_monitor(cfg, autocast_dtype) if labelled else None

    def save(epoch_copy: bool = False) -> None:
        if main:
            save_run_checkpoint(run_dir / "last.pt", model, optimizer, scaler, state, cfg)
            if epoch_copy:
                keep_epoch_copy(run_dir, state.epoch)
        dist.barrier()  # nobody exits before the checkpoint is complete

    skipped, batch = 0, cfg.train.batch_size
    count_skipped = cfg.train.nonfinite == "skip" or scaler.is_enabled()
    scale = scaler.get_scale()  # the float16 loss scale (1.0 when off)
    if preemption.should_stop():  # a signal during start-up: stop before the first step
        _mark_preempted(run_dir, main, preemption, state.step)
        log.close()
        raise Preempted(preemption.received or "signal", None, state.step)
    with deterministic_algorithms(cfg.train.deterministic), workers_stopped_after(loader):
        for epoch in range(state.epoch, cfg.train.epochs):
            state.epoch = epoch
            sampler.set_epoch(epoch)
            # Non-zero only when resuming part-way through this epoch.
            sampler.skip = (state.step - epoch * steps_per_epoch) * local_batch
            # The weak (MoCo v2) augmentation during warm-up, the strong (SimCLR) one after.
            views.set_epoch(epoch, strong=epoch >= cfg.optim.warmup_epochs)
            net.train()
            window: list[dict] = []
            tick = time.perf_counter()
            bar = tqdm(
                loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not main,
                initial=state.step - epoch * steps_per_epoch, total=steps_per_epoch,
            )  # fmt: skip
            for loaded in bar:
                lr = schedule(state.step)
                set_lr(optimizer, lr)
                x1, x2, targets, small = views.make(loaded, device, memory_format)
                targets = targets.to(device, non_blocking=True) if labelled else None
                before = BufferSnapshot(model) if count_skipped else None
                with torch.autocast(
                    device.type,
                    dtype=autocast_dtype or torch.float32,
                    enabled=autocast_dtype is not None,
                ):
                    out = net(x1, x2, targets, small)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(out["loss"]).backward()
                if scaler.is_enabled():
                    # float16: the scaler skips a step whose scaled gradients overflow and
                    # halves the scale, which it lowers on no other occasion. (Its step
                    # reads the overflow flag on the host anyway: one sync more per step.)
                    scaler.step(optimizer)
                    scaler.update()
                    new_scale = scaler.get_scale()
                    stepped, scale = new_scale >= scale, new_scale
                elif cfg.train.nonfinite == "skip" and not _gradients_finite(model):
                    stepped = False
                else:
                    optimizer.step()
                    stepped = True
                skipped += not stepped
                if not stepped and before is not None:
                    before.restore()  # the forward pass's BatchNorm statistics go too
                # Under nonfinite=skip a dropped step's metrics are dropped too; otherwise
                # a non-finite loss reaches _summarise, which stops the run.
                if stepped or cfg.train.nonfinite != "skip":
                    metrics = {k: v.detach() for k, v in out.items() if v.dim() == 0}
                    window.append(metrics | {"lr": lr})
                state.step += 1
                if state.step == total_steps and main and "labels1" in out:
                    _save_late_batch(run_dir / "late_batch.pt", x1, out, targets, cfg, classes)

                stop = preemption.should_stop()
                every = cfg.train.checkpoint_every_steps
                save_now = stop or bool(every and state.step % every == 0)
                end_of_epoch = state.step % steps_per_epoch == 0
                if save_now or end_of_epoch or state.step % cfg.train.log_every == 0:
                    seconds = time.perf_counter() - tick
                    record = {"step": state.step, "epoch": epoch + 1, "lr": lr, "loss": math.nan}
                    if window:
                        record = _summarise(window, state.step, epoch + 1, seconds, batch)
                    if count_skipped:
                        record["skipped_steps"] = skipped
                    if scaler.is_enabled():
                        record["loss_scale"] = scale
                    log.write(record)
                    img_s = record.get("images_per_s", 0.0)
                    bar.set_postfix(
                        loss=f"{record['loss']:.3f}", lr=f"{lr:.3g}", img_s=f"{img_s:.0f}"
                    )
                    window, tick = [], time.perf_counter()
                if save_now and not end_of_epoch:
                    save()
                if stop:
                    if end_of_epoch:
                        state.epoch = epoch + 1
                        save()
                    _mark_preempted(run_dir, main, preemption, state.step)
                    log.close()
                    raise Preempted(
                        preemption.received or "signal", run_dir / "last.pt", state.step
                    )

            state.epoch = epoch + 1
            skipped_files = read_skip_log(run_dir / "skipped.jsonl")
            if main and skipped_files:
                log.write({"step": state.step, "epoch": state.epoch,
                           "skipped_files": len(skipped_files)})  # fmt: skip
            knn_due = state.epoch % max(cfg.train.knn_every, 1) == 0
            if monitor is not None and (knn_due or state.epoch == cfg.train.epochs):
                # Every process takes its share; log.write does nothing off rank 0.
                record = {"step": state.step, "epoch": state.epoch} | monitor(model.backbone)
                log.write(record)
            if state.epoch % cfg.train.checkpoint_every == 0 or state.epoch == cfg.train.epochs:
                save(epoch_copy=True)
            elif cfg.train.checkpoint_every_steps:
                save()

    log.close()
    return run_dir
