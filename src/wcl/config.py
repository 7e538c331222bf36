"""Typed pre-training configuration: the sections as dataclasses, and their checks.

The files, presets and ``section.key=value`` overrides they come from are read by
:mod:`wcl.config_files`. Every unknown key and every bad value is an error naming the key,
raised before any work starts. Batch sizes are *global* (all processes together).
Each key is declared once, with :func:`wcl.config_schema.key` (help, allowed values, range,
whether it may change on resume); the checks and :mod:`wcl.config_docs` read it there.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from wcl.config_files import (
    PRESET_DIR,
    ConfigError,
    apply_overrides,
    preset_names,
    preset_path,
    read_config,
)
from wcl.config_schema import (
    SEED,
    check_choices,
    check_keys,
    check_seeds,
    choices_of,
    key,
    resume_ok_keys,
    sections_from_dict,
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
    "MAY_CHANGE_ON_RESUME",
]

# Mixed precision (train.amp, the eval configs' run.amp, wcl embed --amp); auto is bf16 on
# GPUs that have it natively, fp16 (with loss scaling) on older ones, float32 on CPUs.
AMP_CHOICES = ("auto", "bf16", "fp16", "off")
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "stl10", "folder")
DEVICES = ("auto", "cpu", "cuda")
DIST_BACKENDS = ("auto", "nccl", "gloo")
CHANNELS = (1, 3)

# Keys whose meaning the eval configs (wcl/eval/config.py) share: declared once, here.
amp_key = partial(
    key,
    "auto",
    help="mixed precision: auto is bf16 on GPUs with native bf16, fp16 (loss-scaled) on "
    "older GPUs, float32 on CPUs",
    choices=AMP_CHOICES,
)
device_key = partial(
    key,
    "auto",
    help="where to run (auto: a GPU when there is one)",
    choices=DEVICES,
    resume_ok=True,
)
dist_backend_key = partial(
    key,
    "auto",
    help="several processes: the process-group backend (auto: nccl on GPUs, gloo on CPUs)",
    choices=DIST_BACKENDS,
    resume_ok=True,
)
threads_key = partial(
    key, None, help="torch intra-op threads (null: torch's default)", bounds="> 0", resume_ok=True
)
workers_key = partial(
    key, 2, help="DataLoader worker processes per process", bounds=">= 0", resume_ok=True
)
download_key = partial(key, False, help="opt-in torchvision download (needs internet)")
seed_key = partial(
    key, 0, help="seeds the data order, augmentations and initialisation", bounds=SEED
)


@dataclass
class DataConfig:
    dataset: str = key(
        "fashion_mnist",
        help="training images: a torchvision data set or an image folder",
        choices=DATASETS,
    )
    root: str | None = key(
        None,
        help="data folder (null: the data set's default place)",
        path="absolute",
        resume_ok=True,
    )
    download: bool = download_key(resume_ok=True)
    image_size: int = key(28, help="crop size in pixels", bounds="> 0")
    channels: int = key(1, help="1: greyscale, 3: RGB", choices=CHANNELS)
    workers: int = workers_key()
    # wcl.data.views.AUGMENT_MODES, written out: importing it would load torch (test_config).
    augment: str = key(
        "loader",
        help="where the views are made: loader (per image in the workers), batch (whole batches "
        "on the device), hybrid (crops in the workers, the rest on the device)",
        choices=("loader", "batch", "hybrid"),
    )
    subset: int | None = key(None, help="use only the first N training images", bounds="> 0")
    weak_min_scale: float = key(
        0.2, help="RandomResizedCrop lower scale, weak (warm-up) pipeline", bounds="in [0, 1]"
    )
    strong_min_scale: float = key(
        0.08, help="RandomResizedCrop lower scale, strong pipeline", bounds="in [0, 1]"
    )
    jitter: float = key(1.0, help="multiplies the colour-jitter strengths", bounds="> 0")
    # Both ranges: a negative value is refused as ">= 0", one above 1 as "in [0, 1]".
    blur_prob: float = key(0.5, help="Gaussian blur probability", bounds=(">= 0", "in [0, 1]"))
    small_crops: int = key(
        0, help="multi-crop: extra low-resolution crops per image (0: off)", bounds=">= 0"
    )
    small_size: int | None = key(
        None, help="multi-crop: their size in pixels (null: image_size * 96 / 224)", bounds="> 0"
    )
    small_min_scale: float = key(
        0.05, help="multi-crop: their RandomResizedCrop lower scale (SwAV's)", bounds="in [0, 1]"
    )
    small_max_scale: float = key(
        0.14, help="multi-crop: their RandomResizedCrop upper scale (SwAV's)", bounds="in [0, 1]"
    )


# Upper bounds that catch a slip (an extra zero) before it fails as out of memory while the
# model is built. Width: 16x torchvision's 64, where the widest published contrastive
# ResNets are 4x (SimCLR's ResNet-50 (4x), width 256) and a ResNet-50 of width 1024 holds
# 6.5e9 parameters. Heads: DINO's 65536-way output is the largest in common use; the
# release's heads are 4096/256.
@dataclass
class ModelConfig:
    backbone: str = key(
        "resnet18",
        help="the torchvision ResNet",
        choices=("resnet10", "resnet18", "resnet34", "resnet50", "resnet101"),
    )
    stem: str = key(
        "small",
        help="imagenet: 7x7/2 conv and max-pool; small: 3x3/1, no max-pool; small-s2: 3x3/2",
        choices=("imagenet", "small", "small-s2"),
    )
    width: int = key(
        64, help="channels of the first stage (64: torchvision)", bounds="> 0", at_most=1024
    )
    hidden_dim: int = key(
        2048,
        help="projection heads' hidden width (paper 2048, release 4096)",
        bounds="> 0",
        at_most=65536,
    )
    out_dim: int = key(
        128,
        help="projection heads' output width (paper 128, release 256)",
        bounds="> 0",
        at_most=65536,
    )
    temperature: float = key(0.1, help="temperature of the contrastive softmax", bounds="> 0")
    graph_weight: float = key(1.0, help="weight of the graph loss (0: plain SimCLR)", bounds=">= 0")
    graph_k: int = key(1, help="neighbours per node in the weak-label graph", bounds="> 0")
    gather: str = key(
        "exact",
        help="exact: every candidate carries gradient; release: the authors' gradient paths",
        choices=("exact", "release"),
    )
    sync_bn: bool = key(True, help="SyncBatchNorm when several processes")
    concat_views: bool = key(
        False, help="one network pass over both views (BatchNorm over both), not one per view"
    )
    small_k: int = key(
        1,
        help="multi-crop: nearest neighbours taken as a small crop's extra positives",
        bounds=">= 0",
    )
    small_weight: float = key(
        1.0, help="multi-crop: weight of the small crops' losses", bounds=">= 0"
    )


@dataclass
class OptimConfig:
    lr: float = key(0.075, help="base learning rate, scaled by lr_scaling", bounds="> 0")
    lr_scaling: str = key(
        "sqrt",
        help="sqrt: lr * sqrt(batch); linear: lr * batch / 256; none: lr",
        choices=("sqrt", "linear", "none"),
    )
    final_lr: float = key(0.0, help="learning rate the cosine decay ends at", bounds=">= 0")
    momentum: float = key(0.9, help="LARS momentum", bounds=(">= 0", "in [0, 1]"))
    weight_decay: float = key(1e-6, help="weight decay", bounds=">= 0")
    trust_coefficient: float = key(1e-3, help="LARS trust coefficient", bounds=">= 0")
    warmup_epochs: float = key(
        10.0, help="linear warm-up epochs, with the weak augmentation", bounds=">= 0"
    )
    lars_exclude: str = key(
        "type",
        help="parameters LARS neither decays nor adapts: type (normalisation layers and "
        "biases), name (the release's rule: bn or bias in the name)",
        choices=("type", "name"),
    )


@dataclass
class TrainConfig:
    epochs: int = key(100, help="training epochs", bounds="> 0")
    batch_size: int = key(4096, help="global batch, all processes together", bounds="> 0")
    seed: int = seed_key()
    out_dir: str = key("runs/wcl", help="run directory", path="home", resume_ok=True)
    device: str = device_key()
    dist_backend: str = dist_backend_key()
    amp: str = amp_key()
    channels_last: bool = key(
        True, help="channels_last convolution layout (faster on GPUs and CPUs)"
    )
    deterministic: bool = key(
        False, help="torch's deterministic algorithms only (bitwise GPU reruns)", resume_ok=True
    )
    checkpoint_every: int = key(
        10,
        help="epochs between checkpoints (one is always written at the end)",
        bounds="> 0",
        resume_ok=True,
    )
    checkpoint_every_steps: int | None = key(
        None, help="also refresh last.pt every N steps", bounds="> 0", resume_ok=True
    )
    nonfinite: str = key(
        "stop",
        help="a NaN/Inf loss or gradient: stop (an error) or skip (drop the step)",
        choices=("stop", "skip"),
    )
    log_every: int = key(10, help="steps between metric lines", bounds="> 0", resume_ok=True)
    threads: int | None = threads_key()
    knn_every: int = key(
        0,
        help="epochs between online kNN checks on the held-out split (0: off)",
        bounds=">= 0",
        resume_ok=True,
    )
    knn_k: int = key(200, help="neighbours of the online kNN check", bounds="> 0", resume_ok=True)
    knn_t: float = key(
        0.07, help="temperature of the online kNN check", bounds="> 0", resume_ok=True
    )
    knn_bank: int | None = key(
        None,
        help="online kNN: training images in the bank (null: all)",
        bounds="> 0",
        resume_ok=True,
    )
    knn_queries: int | None = key(
        None,
        help="online kNN: held-out images classified (null: all)",
        bounds="> 0",
        resume_ok=True,
    )


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Derived from the declarations above: each key's allowed values, and the keys a resumed
# run may change (they do not change its results; the rest must match the config saved
# in its checkpoint).
CHOICES = choices_of(Config)
MAY_CHANGE_ON_RESUME = resume_ok_keys(Config)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a pre-training Config from nested dicts."""
    cfg = sections_from_dict(Config, raw)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Range and choice checks, and the combinations that cannot work."""
    check_keys(flatten(cfg.to_dict()), Config)
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
