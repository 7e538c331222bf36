"""Typed pre-training configuration: the sections as dataclasses, and their checks.

The files, presets and ``section.key=value`` overrides they come from are read by
:mod:`wcl.config_files`. Every unknown key and every bad value is an error naming the key,
raised before any work starts. Batch sizes are *global* (all processes together).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from wcl.config_files import (
    PRESET_DIR,
    ConfigError,
    apply_overrides,
    preset_names,
    preset_path,
    read_config,
)

# ConfigError, PRESET_DIR and the readers live in wcl.config_files; named here too, where
# callers have always found them.
__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "Config",
    "PRESET_DIR",
    "preset_names",
    "preset_path",
    "load_config",
    "config_from_dict",
    "sections_from_dict",
    "read_config",
    "apply_overrides",
    "config_changes",
    "flatten",
    "check_choices",
    "check_seeds",
    "small_crop_size",
    "AMP_CHOICES",
]

# Mixed precision (train.amp, the eval configs' run.amp, wcl embed --amp); auto is bf16 on
# GPUs that have it natively, fp16 (with loss scaling) on older ones, float32 on CPUs.
AMP_CHOICES = ("auto", "bf16", "fp16", "off")
T = TypeVar("T")


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"  # fashion_mnist | cifar10 | cifar100 | stl10 | folder
    root: str | None = None  # None: the dataset's default location
    download: bool = False  # opt-in torchvision download (needs internet)
    image_size: int = 28  # crop size in pixels
    channels: int = 1  # 1 = greyscale, 3 = RGB
    workers: int = 2  # DataLoader worker processes per training process
    # loader: per image in the workers | batch: whole batches on the device (same-size
    # images) | hybrid: crops per image in the workers, the rest batched on the device
    augment: str = "loader"
    subset: int | None = None  # use only the first N training images
    weak_min_scale: float = 0.2  # RandomResizedCrop lower scale, weak (warm-up) pipeline
    strong_min_scale: float = 0.08  # the same, strong pipeline
    jitter: float = 1.0  # multiplies the colour-jitter strengths
    blur_prob: float = 0.5  # Gaussian blur probability
    # Multi-crop: extra low-resolution crops per image (0: off, the published two views)
    small_crops: int = 0
    small_size: int | None = None  # their size in pixels (None: image_size * 96 / 224)
    small_min_scale: float = 0.05  # their RandomResizedCrop scale range (SwAV's)
    small_max_scale: float = 0.14


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    stem: str = "small"  # imagenet (7x7/2 + max-pool) | small (3x3/1, no max-pool)
    width: int = 64  # channels of the first stage (64 = torchvision)
    hidden_dim: int = 2048  # projection heads: paper 2048/128, release 4096/256
    out_dim: int = 128
    temperature: float = 0.1
    graph_weight: float = 1.0  # 0 = plain SimCLR
    graph_k: int = 1  # neighbours per node in the weak-label graph
    # exact: every candidate carries gradient (W processes = 1 process) | release: the
    # authors' gradient paths (other processes' instance candidates and every graph-loss
    # candidate without gradient)
    gather: str = "exact"
    sync_bn: bool = True  # SyncBatchNorm when several processes
    # One network pass over both views (BatchNorm over both) instead of one per view
    concat_views: bool = False
    small_k: int = 1  # multi-crop: nearest neighbours taken as a small crop's extra positives
    small_weight: float = 1.0  # multi-crop: weight of the small crops' losses


@dataclass
class OptimConfig:
    lr: float = 0.075  # base lr, scaled by lr_scaling
    lr_scaling: str = "sqrt"  # sqrt: lr*sqrt(batch) | linear: lr*batch/256 | none
    final_lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 1e-6
    trust_coefficient: float = 1e-3  # LARS
    warmup_epochs: float = 10.0  # linear warm-up, weak augmentation during it
    # Parameters LARS neither decays nor adapts: type (normalisation layers and biases) |
    # name (the release's rule: "bn" or "bias" in the parameter's name)
    lars_exclude: str = "type"


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 4096  # global batch, all processes together
    seed: int = 0
    out_dir: str = "runs/wcl"
    device: str = "auto"  # auto | cpu | cuda
    dist_backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    amp: str = "auto"  # auto (GPU: bf16, or fp16 before compute capability 8) | bf16 | fp16 | off
    channels_last: bool = True  # convolution layout, faster on GPUs and CPUs
    deterministic: bool = False  # torch's deterministic algorithms only (bitwise GPU reruns)
    checkpoint_every: int = 10  # epochs; a checkpoint is always written at the end
    checkpoint_every_steps: int | None = None  # also refresh last.pt every N steps
    nonfinite: str = "stop"  # NaN/Inf loss or gradient: stop (error) | skip (drop the step)
    log_every: int = 10  # steps between metric lines
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    knn_every: int = 0  # epochs between online kNN checks on the held-out split (0: off)
    knn_k: int = 200  # neighbours of the online kNN check
    knn_t: float = 0.07  # its temperature
    knn_bank: int | None = None  # training images in its memory bank (None: all)
    knn_queries: int | None = None  # held-out images it classifies (None: all)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CHOICES = {
    "data.dataset": ("fashion_mnist", "cifar10", "cifar100", "stl10", "folder"),
    "data.channels": (1, 3),
    # wcl.data.views.AUGMENT_MODES, written out: importing it would load torch (test_config).
    "data.augment": ("loader", "batch", "hybrid"),
    "model.backbone": ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101"),
    "model.stem": ("imagenet", "small", "small-s2"),
    "model.gather": ("exact", "release"),
    "optim.lr_scaling": ("sqrt", "linear", "none"),
    "optim.lars_exclude": ("type", "name"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.dist_backend": ("auto", "nccl", "gloo"),
    "train.amp": AMP_CHOICES,
    "train.nonfinite": ("stop", "skip"),
}
POSITIVE = [
    "data.image_size",
    "model.width",
    "model.hidden_dim",
    "model.out_dim",
    "model.temperature",
    "model.graph_k",
    "optim.lr",
    "train.epochs",
    "train.batch_size",
    "train.checkpoint_every",
    "train.checkpoint_every_steps",
    "train.log_every",
    "data.subset",
    "train.threads",
    "train.knn_k",
    "train.knn_t",
    "train.knn_bank",
    "train.knn_queries",
    "data.jitter",
    "data.small_size",
]
# Upper bounds that catch a slip (an extra zero) before it fails as out of memory while the
# model is built. Width: 16x torchvision's 64, where the widest published contrastive
# ResNets are 4x (SimCLR's ResNet-50 (4x), width 256) and a ResNet-50 of width 1024 holds
# 6.5e9 parameters. Heads: DINO's 65536-way output is the largest in common use; the
# release's heads are 4096/256.
AT_MOST = {"model.width": 1024, "model.hidden_dim": 65536, "model.out_dim": 65536}
NON_NEGATIVE = [
    "data.workers",
    "train.knn_every",
    "model.graph_weight",
    "optim.final_lr",
    "optim.momentum",
    "optim.weight_decay",
    "optim.trust_coefficient",
    "optim.warmup_epochs",
    "data.blur_prob",
    "data.small_crops",
    "model.small_k",
    "model.small_weight",
]
UNIT_INTERVAL = (
    "data.weak_min_scale",
    "data.strong_min_scale",
    "data.blur_prob",
    "optim.momentum",
    "data.small_min_scale",
    "data.small_max_scale",
)


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Value converted to the annotated type, or ConfigError naming the key."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
    ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(
            f"config key {key!r} must be {hint.__name__}, got {value!r} ({type(value).__name__})"
        )
    return value


# Keys (in any section) that name a file or folder: a leading ~ there is the user's home,
# as a shell would read it (which it does not inside --set data.root=~/...).
PATH_KEYS = ("root", "out_dir", "checkpoint", "subset_file")


def _did_you_mean(word: str, choices: Collection[str], prefix: str = "") -> str:
    """' (did you mean 'x'?)' for the closest of ``choices`` to a misspelt ``word``, or ''."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def sections_from_dict(cls: type[T], raw: dict[str, Any]) -> T:
    """An instance of ``cls`` (a dataclass of dataclass sections) from nested dicts.

    Unknown sections and keys, and values of the wrong type, are ConfigErrors naming
    the key. Range checks are the caller's (see :func:`validate`). A ``~`` that starts
    the value of a path key (``PATH_KEYS``) is expanded to the home folder; a data root is
    made absolute.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    cfg = cls()
    sections = {f.name: f for f in dataclasses.fields(cls)}
    for name, values in raw.items():
        if name not in sections:
            raise ConfigError(
                f"unknown config section {name!r}{_did_you_mean(name, sections)}; valid "
                f"sections: {list(sections)}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"config section {name!r} must be a mapping, got {values!r}")
        section = getattr(cfg, name)
        hints = typing.get_type_hints(type(section))
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(
                    f"unknown config key '{name}.{key}'{_did_you_mean(key, hints, name + '.')}; "
                    f"valid keys in {name!r}: {sorted(hints)}"
                )
            value = _check_type(f"{name}.{key}", value, hints[key])
            if key in PATH_KEYS and isinstance(value, str):
                value = os.path.expanduser(value)
                if key == "root":
                    # Saved in config.yaml and read again by later commands, which may
                    # run elsewhere: the evaluations take their data from it.
                    value = os.path.abspath(value)
            setattr(section, key, value)
    return cfg


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a pre-training Config from nested dicts."""
    cfg = sections_from_dict(Config, raw)
    validate(cfg)
    return cfg


def check_choices(flat: dict[str, Any], choices: dict[str, Collection[str]]) -> None:
    """ConfigError naming the first key of ``flat`` whose value is not among its choices."""
    for key, allowed in choices.items():
        if key in flat and flat[key] not in allowed:
            hint = _did_you_mean(flat[key], allowed) if isinstance(flat[key], str) else ""
            raise ConfigError(
                f"config key {key!r} must be one of {tuple(allowed)}, got {flat[key]!r}{hint}"
            )


# torch.manual_seed takes [-2**63, 2**64) but folds a negative seed onto 2**64 + seed (-1
# would repeat the run of 2**64 - 1), and the samplers seed with seed + epoch: [0, 2**63)
# keeps every seed its own run, an int64 wherever it is stored, with room for the epoch.
SEED_LIMIT = 2**63


def check_seeds(flat: dict[str, Any], keys: Collection[str]) -> None:
    """ConfigError naming the first of ``keys`` in ``flat`` that is no seed in [0, 2**63)."""
    for key in keys:
        if key in flat and not 0 <= flat[key] < SEED_LIMIT:
            raise ConfigError(f"config key {key!r} must be in [0, 2**63), got {flat[key]!r}")


def validate(cfg: Config) -> None:
    """Range and choice checks, and the combinations that cannot work."""
    flat = flatten(cfg.to_dict())
    check_choices(flat, CHOICES)
    check_seeds(flat, ["train.seed"])
    for key in POSITIVE:
        if flat[key] is not None and flat[key] <= 0:
            raise ConfigError(f"config key {key!r} must be > 0, got {flat[key]!r}")
    for key, limit in AT_MOST.items():
        if flat[key] > limit:
            raise ConfigError(f"config key {key!r} must be at most {limit}, got {flat[key]!r}")
    for key in NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {flat[key]!r}")
    for key in UNIT_INTERVAL:
        if not 0 <= flat[key] <= 1:
            raise ConfigError(f"config key {key!r} must be in [0, 1], got {flat[key]!r}")
    if cfg.train.batch_size < 2:
        raise ConfigError(f"'train.batch_size' must be at least 2, got {cfg.train.batch_size}")
    if cfg.model.graph_k >= cfg.train.batch_size:
        raise ConfigError(
            f"'model.graph_k' ({cfg.model.graph_k}) must be smaller than the global batch "
            f"'train.batch_size' ({cfg.train.batch_size})"
        )
    if cfg.data.small_crops:
        _validate_multicrop(cfg)
    if cfg.optim.warmup_epochs > cfg.train.epochs:
        raise ConfigError(
            f"'optim.warmup_epochs' ({cfg.optim.warmup_epochs}) exceeds 'train.epochs' "
            f"({cfg.train.epochs})"
        )
    min_size = 8 if cfg.model.stem.startswith("small") else 32
    if cfg.data.image_size < min_size:
        raise ConfigError(
            f"'data.image_size' {cfg.data.image_size} is too small for stem "
            f"{cfg.model.stem!r} (needs >= {min_size} px)"
        )
    native = {"fashion_mnist": 1, "cifar10": 3, "cifar100": 3, "stl10": 3}.get(cfg.data.dataset)
    if native is not None and cfg.data.channels != native:
        raise ConfigError(
            f"'data.channels' must be {native} for dataset {cfg.data.dataset!r}, "
            f"got {cfg.data.channels}"
        )
    if cfg.data.augment == "batch" and cfg.data.dataset in ("folder", "stl10"):
        raise ConfigError(
            f"'data.augment' batch needs same-size in-memory images; dataset "
            f"{cfg.data.dataset!r} needs 'loader' or 'hybrid'"
        )
    if cfg.data.dataset == "folder" and not cfg.data.root:
        raise ConfigError("'data.root' must name the image folder when 'data.dataset' is 'folder'")
    if cfg.data.root and not cfg.data.download and not Path(cfg.data.root).exists():
        raise ConfigError(f"'data.root' {cfg.data.root!r} does not exist")


def small_crop_size(data: DataConfig) -> int:
    """Side of the multi-crop small crops in pixels: ``data.small_size``, or by default
    the ratio of SwAV's 96 px crops to 224 px ones (at least 1)."""
    if data.small_size is not None:
        return data.small_size
    return max(1, round(data.image_size * 96 / 224))


def _validate_multicrop(cfg: Config) -> None:
    d = cfg.data
    if not 0 < d.small_min_scale <= d.small_max_scale:
        raise ConfigError(
            f"'data.small_min_scale' ({d.small_min_scale}) must be > 0 and at most "
            f"'data.small_max_scale' ({d.small_max_scale})"
        )
    size = small_crop_size(d)
    min_size = 8 if cfg.model.stem.startswith("small") else 32
    if size < min_size:
        raise ConfigError(
            f"multi-crop small crops of {size} px ('data.small_size', default "
            f"image_size * 96 / 224) are too small for stem {cfg.model.stem!r} "
            f"(needs >= {min_size} px)"
        )
    if cfg.model.graph_weight > 0 and cfg.model.small_k >= cfg.train.batch_size:
        raise ConfigError(
            f"'model.small_k' ({cfg.model.small_k}) must be smaller than the global batch "
            f"'train.batch_size' ({cfg.train.batch_size})"
        )


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    """``{"section.key": value}`` from nested section dicts (as ``Config.to_dict()`` gives)."""
    return {f"{s}.{k}": v for s, d in config.items() if isinstance(d, dict) for k, v in d.items()}


def config_changes(
    saved: dict[str, Any],
    now: dict[str, Any],
    may_change: Collection[str],
    defaults: dict[str, Any] | None = None,
) -> list[str]:
    """``"key: old -> new"`` for every dotted key outside ``may_change`` whose value differs
    between two nested configs (a resumed run against the run that wrote its checkpoint).
    With ``defaults`` (nested, as ``now``), a key missing from ``saved`` (added to the
    config since it was written) counts as its default there."""
    old, new = flatten(defaults or {}) | flatten(saved), flatten(now)
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(old.keys() | new.keys())
        if key not in may_change and old.get(key) != new.get(key)
    ]


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a pre-training preset or YAML file, apply overrides, validate."""
    return config_from_dict(read_config(path, overrides))
