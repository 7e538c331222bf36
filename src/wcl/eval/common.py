"""What every evaluation command does first: device, run directory, backbone, resume state.

Every command runs as one plain process or as several under torchrun / SLURM srun:
:func:`open_run` joins the process group (``wcl.dist``); only rank 0 creates the run
directory and writes files in it (:func:`start_run`, :func:`write_results`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import Dataset

from wcl import dist
from wcl.atomic import write_json, write_text
from wcl.checkpoint import load_checkpoint
from wcl.config import ConfigError, config_changes
from wcl.config_schema import resume_ok_keys
from wcl.data import read_skip_log, stats_name, unwrap_image_folder
from wcl.eval.config import EvalData, EvalRun
from wcl.eval.data import Splits, eval_transform
from wcl.eval.features import (
    extract_features,
    file_identity,
    load_cached_features,
    readable_rows,
    save_features,
)
from wcl.eval.shards import gather_shards, shard
from wcl.lock import RunLock, lock_on_rank0
from wcl.precision import amp_dtype
from wcl.preprocess import input_size, preprocessing
from wcl.weights import LoadedBackbone, load_backbone

__all__ = [
    "SKIP_LOG",
    "Setup",
    "open_run",
    "resolve_data",
    "resolve_device",
    "describe_data",
    "finish_run",
    "gathered_features",
    "log_broken_files",
    "skipped_images",
    "sharded_features",
    "split_features",
    "start_run",
    "write_results",
]


def resolve_device(name: str, key: str = "run.device") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is a ConfigError
    naming ``key`` (:func:`wcl.dist.resolve_device`, which pre-training uses too)."""
    return dist.resolve_device(name, key)


@dataclass
class Setup:
    """A prepared evaluation: where it runs and writes, the backbone, any state to resume."""

    run_dir: Path
    device: torch.device
    amp: torch.dtype | None
    backbone: LoadedBackbone
    channels: int
    state: dict[str, Any] | None  # a loaded last.pt when resuming
    lock: RunLock | None = None  # rank 0's hold on run_dir, from start_run to finish_run


def _check_same_config(saved: dict[str, Any], cfg: Any, path: Path) -> None:
    # Keys missing from the saved config (added to wcl after it was written) count as
    # their defaults, so an upgrade alone does not stop a resume.
    # The keys declared resume_ok (wcl/eval/config.py) may differ: they do not change results.
    may_change = resume_ok_keys(type(cfg))
    changed = config_changes(saved, cfg.to_dict(), may_change, type(cfg)().to_dict())
    if changed:
        diffs = ", ".join(changed[:5])
        raise ConfigError(f"cannot resume from {path}: its config differs ({diffs})")


def open_run(cfg: Any, command: str, resume: str | None, trains: bool) -> Setup:
    """Resolve device and run directory, load the backbone, read the state to resume.

    Joins the process group when started by torchrun / srun (``run.dist_backend``); the
    device is then this process's GPU (LOCAL_RANK). Nothing is written; :func:`start_run`
    creates the directory once the data is read.
    The default run directory is ``<checkpoint folder>/eval/<checkpoint name>/<command>``.
    Commands that train (``trains``) refuse a directory holding another run unless
    resuming; ``resume`` is "auto" (the directory's last.pt, if any) or a path.
    """
    run: EvalRun = cfg.run
    if run.threads:
        torch.set_num_threads(run.threads)
    device = dist.init_distributed(run.dist_backend, resolve_device(run.device).type).device
    checkpoint = Path(run.checkpoint)  # validated to exist
    default = checkpoint.parent / "eval" / checkpoint.stem / command
    run_dir = Path(run.out_dir) if run.out_dir else default
    backbone = load_backbone(checkpoint)
    cfg.data = resolve_data(cfg.data, backbone, checkpoint)  # before any config comparison
    if dist.is_main():
        print(f"{command}: {describe_data(cfg.data, backbone)}", flush=True)
    state = None
    if resume is not None:
        path = run_dir / "last.pt" if resume == "auto" else Path(resume)
        if resume != "auto" or path.is_file():
            state = load_checkpoint(path)
            if state.get("kind") != command:
                raise ConfigError(f"{path} is a {state.get('kind')!r} checkpoint, not {command!r}")
            _check_same_config(state["config"], cfg, path)
            if state.get("pretrained") != file_identity(checkpoint):
                raise ConfigError(
                    f"cannot resume from {path}: the pre-trained checkpoint {checkpoint} has "
                    "changed since that run started"
                )
    elif trains and (run_dir / "config.yaml").exists():
        raise ConfigError(
            f"run directory {str(run_dir)!r} already holds a run (config.yaml); pass "
            "--resume auto to continue it, or set run.out_dir to another folder"
        )
    return Setup(run_dir, device, amp_dtype(run.amp, device), backbone, cfg.data.channels, state)


def resolve_data(d: EvalData, loaded: LoadedBackbone, checkpoint: Path) -> EvalData:
    """``d`` with every unset data key taken from the checkpoint's pre-training config:
    data set and root (together), image size, the test resize, channels and the
    normalisation statistics. ConfigError when a key is needed and the checkpoint cannot
    say (no config), or contradicts the backbone (channels); a warning on stderr when the
    image size differs from the pre-training one."""
    pre = (loaded.config or {}).get("data") or {}
    spec = loaded.spec
    if d.dataset is None:
        if not pre.get("dataset"):
            raise ConfigError(
                f"'data.dataset' is not set and {checkpoint} carries no pre-training config "
                "to take it from: set data.dataset (and data.root)"
            )
        dataset, root = pre["dataset"], d.root if d.root is not None else pre.get("root")
        if dataset == "folder" and not root:
            raise ConfigError(f"{checkpoint} was pre-trained on a folder: set data.root")
        if root and not d.download and not Path(root).exists():
            raise ConfigError(
                f"'data.root' {root!r} (from {checkpoint}'s pre-training config) does not "
                "exist here: set data.root"
            )
    else:
        dataset, root = d.dataset, d.root
    channels = d.channels or spec.in_channels
    if channels != spec.in_channels:
        raise ConfigError(
            f"'data.channels' is {channels} but the backbone in {checkpoint} takes "
            f"{spec.in_channels}-channel images"
        )
    trained = input_size(spec, loaded.config)
    if d.image_size is not None and d.image_size != trained and loaded.config is not None:
        print(
            f"wcl: warning: 'data.image_size' {d.image_size} differs from the {trained} px "
            f"the backbone in {checkpoint} was pre-trained at",
            file=sys.stderr,
        )
    # Crop and resize as wcl embed and backbone.json have them (an exported backbone's
    # JSON may carry its resize).
    prep = preprocessing(spec, loaded.config, d.image_size, d.resize)
    return replace(
        d,
        dataset=dataset,
        root=root,
        channels=channels,
        image_size=prep.crop,
        resize=prep.resize,
        stats=d.stats or stats_name(pre.get("dataset") or dataset),
    )


def describe_data(d: EvalData, loaded: LoadedBackbone) -> str:
    """One line: what a resolved EvalData evaluates on, and where its settings came from."""
    pre = (loaded.config or {}).get("data") or {}
    where = f" ({d.root})" if d.root else ""
    origin = (
        "as pre-trained"
        if pre.get("dataset") == d.dataset
        and input_size(loaded.spec, loaded.config) == d.image_size
        else f"pre-trained on {pre.get('dataset', 'unknown data')}"
    )
    return (
        f"evaluating on {d.dataset}{where}, {d.channels} channel(s), resize {d.resize} + "
        f"centre crop {d.image_size} px, {d.stats} normalisation ({origin})"
    )


def start_run(setup: Setup, cfg: Any) -> None:
    """Create the run directory and write config.yaml: call once the inputs are known good.

    Writing it only then means a failure while reading the data leaves no half-started run
    that a retry would have to --resume. Rank 0 writes, after every process has passed
    :func:`open_run`'s "directory already holds a run" check.
    """
    dist.barrier()
    # One run at a time writes the directory (wcl.lock), until finish_run.
    setup.lock = lock_on_rank0(setup.run_dir, f"wcl {setup.run_dir.name}")
    if dist.is_main():
        write_text(setup.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def finish_run(setup: Setup) -> None:
    """Wait until rank 0 has written the results (nobody exits before), then let go of the
    run directory."""
    dist.barrier()
    if setup.lock is not None:
        setup.lock.release()
        setup.lock = None


def write_results(setup: Setup, cfg: Any, command: str, results: dict[str, Any]) -> Path:
    """Write ``run_dir/results.json``: the results plus what produced them (rank 0 only)."""
    path = setup.run_dir / "results.json"
    if not dist.is_main():
        return path
    checkpoint = cfg.run.checkpoint
    write_json(
        path,
        {
            "command": command,
            **results,
            "checkpoint": file_identity(checkpoint) if os.path.exists(checkpoint) else checkpoint,
            "backbone": setup.backbone.spec.to_dict(),
            "config": cfg.to_dict(),
        },
    )
    return path


def gathered_features(
    backbone: torch.nn.Module,
    dataset: Dataset,
    transform: Any,
    batch_size: int,
    device: torch.device,
    workers: int = 0,
    progress: bool = False,
    *,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`wcl.eval.features.extract_features` split over processes: (N, C) float32
    features and (N,) int64 targets of every readable image of ``dataset`` (broken files
    have no row), on the CPU, on every process.

    Each process extracts its share (samples r, r + W, ...) and the shares are gathered, so
    every process ends with all N rows in dataset order; every process must call this.
    """
    n, world = len(dataset), dist.world_size()  # type: ignore[arg-type]
    if n < world:
        raise ConfigError(f"{desc}: {n} images cannot be shared by {world} processes")
    feats, targets = extract_features(
        backbone, shard(dataset), transform, batch_size, device, workers, progress,
        amp=amp, channels_last=channels_last, desc=desc, keep_broken_rows=True,
    )  # fmt: skip
    # Broken files keep their rows until the shares are interleaved back into order.
    return readable_rows(gather_shards(feats, n, device), gather_shards(targets, n, device))


def sharded_features(
    cfg: Any, setup: Setup, dataset: Dataset, desc: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre-crop features (N, C) float32 and targets (N,) int64 of ``dataset``, on the CPU,
    on every process (:func:`gathered_features` with the eval config's settings)."""
    return gathered_features(
        setup.backbone.module.to(setup.device),
        dataset,
        eval_transform(cfg.data, setup.channels),
        cfg.run.eval_batch_size,
        setup.device,
        cfg.data.workers,
        cfg.run.progress and dist.is_main(),
        amp=setup.amp,
        channels_last=True,  # faster on GPUs and, with oneDNN, on CPUs
        desc=desc,
    )


def split_features(
    cfg: Any, setup: Setup, splits: Splits, cache: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(train features, targets), (test features, targets)] of the centre-cropped images.

    Features (N, C) float32 and targets (N,) int64, on the CPU, on every process (see
    :func:`sharded_features`). With ``cache`` they are kept in
    ``run_dir/features-{train,test}.pt`` (written by rank 0) and reused while the
    checkpoint file and the data settings are unchanged.
    """
    identity = file_identity(cfg.run.checkpoint)
    out = []
    for name, dataset in (("train", splits.train), ("test", splits.test)):
        # Workers and progress bars do not change features; leave them out of the key.
        key = {"checkpoint": identity, "split": name, "data": asdict(cfg.data) | {"workers": 0}}
        path = setup.run_dir / f"features-{name}.pt" if cache else None
        found = load_cached_features(path, key)
        # Extraction is collective: if any process lacks the file (a node without the
        # shared folder, say), all of them extract.
        if dist.max_over_processes(int(found is None)):
            found = sharded_features(cfg, setup, dataset, f"{name} features")
            if path is not None and dist.is_main():
                save_features(path, key, *found)
        out.append(found)
    return out


SKIP_LOG = "skipped.jsonl"  # in the run directory: one JSON line per broken file


def log_broken_files(setup: Setup, splits: Splits) -> None:
    """Have both splits' image folders list every file that fails to decode (path, reason)
    in ``run_dir/skipped.jsonl``; rank 0's, which writes the run directory."""
    if not dist.is_main():
        return
    for data in (splits.train, splits.test):
        folder = unwrap_image_folder(data)
        if folder is not None:
            folder.skip_log = setup.run_dir / SKIP_LOG


def skipped_images(
    setup: Setup,
    splits: Splits,
    history: list[dict[str, Any]] | None = None,
    train_rows: int | None = None,
    test_rows: int | None = None,
) -> dict[str, Any]:
    """How many images of each split were left out because they did not decode, and the
    file that lists them: {"train": n, "test": m, "list": "skipped.jsonl"}.

    Exact where the number used is known: ``*_rows`` (feature rows), or the last test pass
    of ``history`` (its ``test_images``); otherwise (augmented training passes) the
    files of the split that the skip log holds.
    """
    if history and history[-1].get("test_images") is not None and test_rows is None:
        test_rows = history[-1]["test_images"]
    logged = read_skip_log(setup.run_dir / SKIP_LOG)
    counts: dict[str, Any] = {}
    for name, data, used in (
        ("train", splits.train, train_rows),
        ("test", splits.test, test_rows),
    ):
        if used is not None:
            counts[name] = len(data) - used  # type: ignore[arg-type]
        else:
            folder = unwrap_image_folder(data)
            paths = {path for path, _ in folder.samples} if folder is not None else set()
            counts[name] = len(paths & logged.keys())
    return counts | {"list": SKIP_LOG}
