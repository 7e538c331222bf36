"""Typed settings of the evaluations (linear probe, kNN, fine-tuning) and their presets.

Same conventions as pre-training (:mod:`wcl.config`): YAML files with sections, a
``base:`` chain, ``section.key=value`` overrides read as YAML, and every unknown key or
bad value a :class:`~wcl.config.ConfigError` naming the key, raised before any work.
Eval presets live in ``wcl/configs/eval`` so the pre-training preset list stays clean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from wcl.config import AMP_CHOICES, check_choices, check_seeds, flatten, sections_from_dict
from wcl.config_files import PRESET_DIR, ConfigError, preset_names, preset_path, read_config

__all__ = [
    "EVAL_PRESET_DIR",
    "EvalData",
    "EvalRun",
    "FinetuneConfig",
    "FinetuneSettings",
    "KnnConfig",
    "KnnSettings",
    "LinearConfig",
    "LinearSettings",
    "eval_presets",
    "load_eval_config",
]

EVAL_PRESET_DIR = PRESET_DIR / "eval"
T = TypeVar("T")


@dataclass
class EvalData:
    # What to evaluate on. None: as the checkpoint was pre-trained (its config), resolved
    # by wcl.eval.common.open_run before any data is read.
    dataset: str | None = None  # fashion_mnist | cifar10 | cifar100 | stl10 | folder
    root: str | None = None  # None: the pre-training root (or the dataset's default place)
    download: bool = False  # opt-in torchvision download (needs internet)
    channels: int | None = None  # None: the backbone's input channels
    image_size: int | None = None  # crop side in pixels (train and test); None: pre-training's
    resize: int | None = None  # test: short side before the centre crop (None: 256/224 of
    # image_size for the ImageNet stem, else image_size)
    stats: str | None = None  # whose mean/std normalise; None: the pre-training data set's
    min_scale: float = 0.08  # train RandomResizedCrop lower scale
    flip: bool = True  # train horizontal flip
    workers: int = 2  # DataLoader worker processes
    train_subset: int | None = None  # only the first N training images (quick runs)
    test_subset: int | None = None  # only the first N test images


@dataclass
class EvalRun:
    checkpoint: str | None = None  # pre-trained weights (any file wcl can read)
    out_dir: str | None = None  # None: <checkpoint folder>/eval/<checkpoint name>/<command>
    device: str = "auto"  # auto | cpu | cuda
    dist_backend: str = "auto"  # several processes: auto (nccl on GPU, gloo on CPU) | nccl | gloo
    amp: str = "auto"  # auto (GPU: bf16, or fp16 before compute capability 8) | bf16 | fp16 | off
    seed: int = 0
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    eval_batch_size: int = 256  # batch for test passes and feature extraction
    progress: bool = True  # tqdm progress bars


@dataclass
class LinearSettings:
    mode: str = "protocol"  # protocol (the release's) | fast (cached centre-crop features)
    epochs: int = 80
    batch_size: int = 4096
    lr: float = 0.2  # base lr, scaled by lr_scaling
    lr_scaling: str = "linear"  # linear: lr*batch/256 | none
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    init_std: float = 0.01  # classifier weight ~ N(0, init_std), bias 0
    eval_every: int = 1  # epochs between test passes (the last epoch always)
    checkpoint_every: int = 1  # epochs between last.pt writes (the last epoch always)
    cache_features: bool = True  # fast mode: keep features-*.pt in the run directory


@dataclass
class KnnSettings:
    k: list = field(default_factory=lambda: [200, 20])  # neighbour counts, one result each
    temperature: float = 0.07  # vote weight exp(similarity / temperature)
    chunk: int = 1024  # queries per similarity block (memory: chunk x train images)
    cache_features: bool = True  # keep features-*.pt in the run directory


@dataclass
class FinetuneSettings:
    fraction: float | None = 0.01  # labelled fraction per class (ignored with subset_file)
    subset_file: str | None = None  # file names, one a line (the ImageNet 1%/10% lists)
    subset_seed: int = 0  # seeds the choice of the labelled images
    epochs: int = 60
    batch_size: int = 4096
    lr: float = 0.05  # base lr, scaled by lr_scaling (SimCLR: 0.05 * batch / 256)
    lr_scaling: str = "linear"  # linear: lr*batch/256 | none
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0  # biases and normalisation layers never decay
    init_std: float = 0.01
    eval_every: int = 1
    checkpoint_every: int = 1


@dataclass
class LinearConfig:
    data: EvalData = field(default_factory=EvalData)
    linear: LinearSettings = field(default_factory=LinearSettings)
    run: EvalRun = field(default_factory=EvalRun)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class KnnConfig:
    data: EvalData = field(default_factory=EvalData)
    knn: KnnSettings = field(default_factory=KnnSettings)
    run: EvalRun = field(default_factory=EvalRun)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FinetuneConfig:
    data: EvalData = field(default_factory=EvalData)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    run: EvalRun = field(default_factory=EvalRun)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


KINDS: dict[str, type] = {"linear": LinearConfig, "knn": KnnConfig, "finetune": FinetuneConfig}

_CHOICES = {
    "data.dataset": (None, "fashion_mnist", "cifar10", "cifar100", "stl10", "folder"),
    "data.stats": (None, "fashion_mnist", "cifar10", "cifar100", "stl10", "imagenet"),
    "data.channels": (None, 1, 3),
    "run.device": ("auto", "cpu", "cuda"),
    "run.dist_backend": ("auto", "nccl", "gloo"),
    "run.amp": AMP_CHOICES,
    "linear.mode": ("protocol", "fast"),
    "linear.lr_scaling": ("linear", "none"),
    "finetune.lr_scaling": ("linear", "none"),
}
_POSITIVE = [
    "data.image_size",
    "data.resize",
    "data.train_subset",
    "data.test_subset",
    "run.threads",
    "run.eval_batch_size",
    "linear.epochs",
    "linear.batch_size",
    "linear.lr",
    "linear.eval_every",
    "linear.checkpoint_every",
    "knn.temperature",
    "knn.chunk",
    "finetune.epochs",
    "finetune.batch_size",
    "finetune.lr",
    "finetune.eval_every",
    "finetune.checkpoint_every",
]
_NON_NEGATIVE = [
    "data.workers",
    "linear.weight_decay",
    "linear.init_std",
    "finetune.weight_decay",
    "finetune.init_std",
]
_UNIT = ["data.min_scale", "linear.momentum", "finetune.momentum"]


def _validate(flat: dict[str, Any]) -> None:
    def check(key: str, ok: bool, need: str) -> None:
        if key in flat and flat[key] is not None and not ok:
            raise ConfigError(f"config key {key!r} must be {need}, got {flat[key]!r}")

    check_choices(flat, _CHOICES)
    check_seeds(flat, ["run.seed", "finetune.subset_seed"])
    for key in _POSITIVE:
        check(key, flat.get(key) is None or flat[key] > 0, "> 0")
    for key in _NON_NEGATIVE:
        check(key, flat.get(key) is None or flat[key] >= 0, ">= 0")
    for key in _UNIT:
        check(key, flat.get(key) is None or 0 <= flat[key] <= 1, "in [0, 1]")
    ks = flat.get("knn.k")
    if ks is not None and (
        not ks or not all(type(k) is int and k > 0 for k in ks) or len(set(ks)) != len(ks)
    ):
        raise ConfigError(f"config key 'knn.k' must be a list of distinct ints > 0, got {ks!r}")
    if flat.get("finetune.fraction") is not None:
        check("finetune.fraction", 0 < flat["finetune.fraction"] <= 1, "in (0, 1]")
    if "finetune.fraction" in flat and not (
        flat["finetune.fraction"] or flat["finetune.subset_file"]
    ):
        raise ConfigError("set 'finetune.fraction' or 'finetune.subset_file'")
    subset_file = flat.get("finetune.subset_file")
    if subset_file and not Path(subset_file).is_file():
        raise ConfigError(f"'finetune.subset_file' {subset_file!r} does not exist")
    if flat["data.dataset"] == "folder" and not flat["data.root"]:
        raise ConfigError("'data.root' must name the image folder when 'data.dataset' is 'folder'")
    root = flat["data.root"]
    if root and not flat["data.download"] and not Path(root).exists():
        raise ConfigError(f"'data.root' {root!r} does not exist")
    checkpoint = flat["run.checkpoint"]
    if not checkpoint:
        raise ConfigError("'run.checkpoint' is not set: pass --checkpoint or set it in the config")
    if not Path(checkpoint).is_file():
        raise ConfigError(f"'run.checkpoint' {checkpoint!r} is not a file")


def config_from_dict(kind: str, raw: dict[str, Any]) -> Any:
    """Build and validate the ``kind`` ("linear", "knn", "finetune") config from nested dicts."""
    if kind not in KINDS:
        raise ValueError(f"unknown evaluation kind {kind!r}; choose one of {sorted(KINDS)}")
    knn = raw.get("knn")
    if isinstance(knn, dict) and type(knn.get("k")) is int:
        raw = {**raw, "knn": {**knn, "k": [knn["k"]]}}  # `--set knn.k=20` means [20]
    cfg = sections_from_dict(KINDS[kind], raw)
    flat = flatten(cfg.to_dict())
    _validate(flat)
    return cfg


def eval_presets(kind: str | None = None) -> list[str]:
    """Names of the shipped eval presets (``linear-*``, ``knn-*``, ``finetune-*``)."""
    return preset_names(EVAL_PRESET_DIR, kind)


def eval_preset_path(name_or_path: str | Path, kind: str) -> Path:
    """A YAML file path, or the name of a preset shipped in ``wcl/configs/eval``."""
    return preset_path(name_or_path, EVAL_PRESET_DIR, kind)


def load_eval_config(kind: str, path: str | Path, overrides: list[str] | None = None) -> Any:
    """Read an eval preset or YAML file, apply ``section.key=value`` overrides, validate."""
    return config_from_dict(kind, read_config(eval_preset_path(path, kind), overrides))
