"""Typed settings of the evaluations (linear probe, kNN, fine-tuning) and their presets.

Same conventions as pre-training (:mod:`wcl.config`): YAML files with sections, a
``base:`` chain, ``section.key=value`` overrides read as YAML, and every unknown key or
bad value a :class:`~wcl.config.ConfigError` naming the key, raised before any work.
Eval presets live in ``wcl/configs/eval`` so the pre-training preset list stays clean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from wcl.config import (
    CHANNELS,
    DATASETS,
    amp_key,
    device_key,
    dist_backend_key,
    download_key,
    flatten,
    seed_key,
    threads_key,
    workers_key,
)
from wcl.config_files import PRESET_DIR, ConfigError, preset_names, preset_path, read_config
from wcl.config_schema import (
    DISTINCT_COUNTS,
    SEED,
    check_keys,
    key,
    sections_from_dict,
)

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


@dataclass
class EvalData:
    # What to evaluate on. null: as the checkpoint was pre-trained (its config), resolved
    # by wcl.eval.common.open_run before any data is read.
    dataset: str | None = key(
        None, help="data set to evaluate on (null: the pre-training one)", choices=(None, *DATASETS)
    )
    root: str | None = key(
        None,
        help="data folder (null: the pre-training root, or the data set's default place)",
        path="absolute",
    )
    download: bool = download_key()
    channels: int | None = key(
        None, help="input channels (null: the backbone's)", choices=(None, *CHANNELS)
    )
    image_size: int | None = key(
        None, help="crop side in pixels, train and test (null: the pre-training one)", bounds="> 0"
    )
    resize: int | None = key(
        None,
        help="test: short side before the centre crop (null: 256/224 of image_size for the "
        "ImageNet stem, else image_size)",
        bounds="> 0",
    )
    stats: str | None = key(
        None,
        help="whose mean/std normalise (null: the pre-training data set's)",
        choices=(None, "fashion_mnist", "cifar10", "cifar100", "stl10", "imagenet"),
    )
    min_scale: float = key(0.08, help="train RandomResizedCrop lower scale", bounds="in [0, 1]")
    flip: bool = key(True, help="train horizontal flip")
    workers: int = workers_key()
    train_subset: int | None = key(
        None, help="only the first N training images (quick runs)", bounds="> 0"
    )
    test_subset: int | None = key(None, help="only the first N test images", bounds="> 0")


@dataclass
class EvalRun:
    checkpoint: str | None = key(
        None, help="pre-trained weights (any file wcl can read)", path="home"
    )
    out_dir: str | None = key(
        None,
        help="run directory (null: eval/NAME/COMMAND in the checkpoint's folder)",
        path="home",
        resume_ok=True,
    )
    device: str = device_key()
    dist_backend: str = dist_backend_key()
    amp: str = amp_key()
    seed: int = seed_key()
    threads: int | None = threads_key()
    eval_batch_size: int = key(
        256, help="batch of test passes and feature extraction", bounds="> 0", resume_ok=True
    )
    progress: bool = key(True, help="tqdm progress bars", resume_ok=True)


# Keys the linear probe and fine-tuning share: one declaration each.
_lr_scaling = partial(
    key, "linear", help="linear: lr * batch / 256; none: lr", choices=("linear", "none")
)
_momentum = partial(key, 0.9, help="SGD momentum", bounds="in [0, 1]")
_nesterov = partial(key, True, help="Nesterov momentum")
_init_std = partial(key, 0.01, help="classifier weight ~ N(0, init_std), bias 0", bounds=">= 0")
_eval_every = partial(
    key, 1, help="epochs between test passes (the last epoch always)", bounds="> 0", resume_ok=True
)
_checkpoint_every = partial(
    key,
    1,
    help="epochs between last.pt writes (the last epoch always)",
    bounds="> 0",
    resume_ok=True,
)
_batch_size = partial(key, 4096, help="global batch, all processes together", bounds="> 0")


@dataclass
class LinearSettings:
    mode: str = key(
        "protocol",
        help="protocol: the release's; fast: cached centre-crop features, no augmentation",
        choices=("protocol", "fast"),
    )
    epochs: int = key(80, help="training epochs", bounds="> 0")
    batch_size: int = _batch_size()
    lr: float = key(0.2, help="base learning rate, scaled by lr_scaling", bounds="> 0")
    lr_scaling: str = _lr_scaling()
    momentum: float = _momentum()
    nesterov: bool = _nesterov()
    weight_decay: float = key(0.0, help="weight decay (of the weight only)", bounds=">= 0")
    init_std: float = _init_std()
    eval_every: int = _eval_every()
    checkpoint_every: int = _checkpoint_every()
    cache_features: bool = key(True, help="fast mode: keep features-*.pt in the run directory")


@dataclass
class KnnSettings:
    k: list = key(
        help="neighbour counts, one result each",
        bounds=DISTINCT_COUNTS,
        factory=lambda: [200, 20],
    )
    temperature: float = key(0.07, help="vote weight exp(similarity / temperature)", bounds="> 0")
    chunk: int = key(
        1024, help="queries per similarity block (memory: chunk x train images)", bounds="> 0"
    )
    cache_features: bool = key(True, help="keep features-*.pt in the run directory")


@dataclass
class FinetuneSettings:
    fraction: float | None = key(
        0.01, help="labelled fraction per class (ignored with subset_file)", bounds="in (0, 1]"
    )
    subset_file: str | None = key(
        None, help="labelled image file names, one a line (the ImageNet 1%/10% lists)", path="home"
    )
    subset_seed: int = key(0, help="seeds the choice of the labelled images", bounds=SEED)
    epochs: int = key(60, help="training epochs", bounds="> 0")
    batch_size: int = _batch_size()
    lr: float = key(
        0.05, help="base learning rate, scaled by lr_scaling (SimCLR: 0.05)", bounds="> 0"
    )
    lr_scaling: str = _lr_scaling()
    momentum: float = _momentum()
    nesterov: bool = _nesterov()
    weight_decay: float = key(
        0.0, help="weight decay (biases and normalisation layers never decay)", bounds=">= 0"
    )
    init_std: float = _init_std()
    eval_every: int = _eval_every()
    checkpoint_every: int = _checkpoint_every()


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


def _validate(flat: dict[str, Any], cls: type) -> None:
    check_keys(flat, cls)
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
    _validate(flat, KINDS[kind])
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
