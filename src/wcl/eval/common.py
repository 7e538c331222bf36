"""What every evaluation command does first: device, run directory, backbone, resume state."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from wcl.checkpoint import load_checkpoint
from wcl.config import ConfigError
from wcl.eval.config import EvalRun
from wcl.eval.data import Splits, eval_transform
from wcl.eval.features import cached_features, extract_features, file_identity
from wcl.weights import LoadedBackbone, load_backbone, write_json

__all__ = [
    "Setup",
    "amp_dtype",
    "open_run",
    "resolve_device",
    "split_features",
    "start_run",
    "write_results",
]

# Keys that may change between a run and its resumption (they do not change results).
_RESUMABLE_CHANGES = {
    "data.workers",
    "run.device",
    "run.threads",
    "run.out_dir",
    "run.progress",
    "run.eval_batch_size",
    "linear.eval_every",
    "linear.checkpoint_every",
    "finetune.eval_every",
    "finetune.checkpoint_every",
}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("'run.device' is cuda but no CUDA device is available")
    return torch.device(name)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 for ``bf16``, and for ``auto`` on a GPU; else None (float32)."""
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@dataclass
class Setup:
    """A prepared evaluation: where it runs and writes, the backbone, any state to resume."""

    run_dir: Path
    device: torch.device
    amp: torch.dtype | None
    backbone: LoadedBackbone
    channels: int
    state: dict[str, Any] | None  # a loaded last.pt when resuming


def _flat(cfg: dict[str, Any]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, d in cfg.items() for k, v in d.items()}


def _check_same_config(saved: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    old, new = _flat(saved), _flat(now)
    changed = sorted(k for k in new if k not in _RESUMABLE_CHANGES and old.get(k) != new[k])
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed[:5])
        raise ConfigError(f"cannot resume from {path}: its config differs ({diffs})")


def open_run(cfg: Any, command: str, resume: str | None, trains: bool) -> Setup:
    """Resolve device and run directory, load the backbone, read the state to resume.

    Nothing is written; :func:`start_run` creates the directory once the data is read.
    The default run directory is ``<checkpoint folder>/eval/<checkpoint name>/<command>``.
    Commands that train (``trains``) refuse a directory holding another run unless
    resuming; ``resume`` is "auto" (the directory's last.pt, if any) or a path.
    """
    run: EvalRun = cfg.run
    if run.threads:
        torch.set_num_threads(run.threads)
    device = resolve_device(run.device)
    checkpoint = Path(run.checkpoint)  # validated to exist
    default = checkpoint.parent / "eval" / checkpoint.stem / command
    run_dir = Path(run.out_dir) if run.out_dir else default
    state = None
    if resume is not None:
        path = run_dir / "last.pt" if resume == "auto" else Path(resume)
        if resume != "auto" or path.is_file():
            state = load_checkpoint(path)
            if state.get("kind") != command:
                raise ConfigError(f"{path} is a {state.get('kind')!r} checkpoint, not {command!r}")
            _check_same_config(state["config"], cfg.to_dict(), path)
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
    backbone = load_backbone(checkpoint)
    channels = cfg.data.channels or backbone.spec.in_channels
    if channels != backbone.spec.in_channels:
        raise ConfigError(
            f"'data.channels' is {channels} but the backbone in {checkpoint} takes "
            f"{backbone.spec.in_channels}-channel images"
        )
    return Setup(run_dir, device, amp_dtype(run.amp, device), backbone, channels, state)


def start_run(setup: Setup, cfg: Any) -> None:
    """Create the run directory and write config.yaml: call once the inputs are known good.

    Writing it only then means a failure while reading the data leaves no half-started run
    that a retry would have to --resume.
    """
    setup.run_dir.mkdir(parents=True, exist_ok=True)
    (setup.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def write_results(setup: Setup, cfg: Any, command: str, results: dict[str, Any]) -> Path:
    """Write ``run_dir/results.json``: the results plus what produced them."""
    path = setup.run_dir / "results.json"
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


def split_features(
    cfg: Any, setup: Setup, splits: Splits, cache: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(train features, targets), (test features, targets)] of the centre-cropped images.

    Features (N, C) float32 and targets (N,) int64, on the CPU. With ``cache`` they are
    kept in ``run_dir/features-{train,test}.pt`` and reused while the checkpoint file and
    the data settings are unchanged.
    """
    module = setup.backbone.module.to(setup.device)
    transform = eval_transform(cfg.data, setup.channels)
    identity = file_identity(cfg.run.checkpoint)
    out = []
    for name, dataset in (("train", splits.train), ("test", splits.test)):
        # Workers and progress bars do not change features; leave them out of the key.
        key = {"checkpoint": identity, "split": name, "data": asdict(cfg.data) | {"workers": 0}}
        path = setup.run_dir / f"features-{name}.pt" if cache else None

        def compute(dataset=dataset, name=name) -> tuple[torch.Tensor, torch.Tensor]:
            return extract_features(
                module,
                dataset,
                transform,
                cfg.run.eval_batch_size,
                setup.device,
                cfg.data.workers,
                cfg.run.progress,
                amp=setup.amp,
                channels_last=setup.device.type == "cuda",
                desc=f"{name} features",
            )

        out.append(cached_features(path, key, compute))
    return out
