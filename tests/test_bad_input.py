"""Hostile input: every bad config value, data file or checkpoint ends with one clear line
on stderr naming the file, key or value, and the documented exit status (2: a bad config
or input, 1: a file wcl cannot use), never a traceback, and before work is wasted."""

import gzip
import os
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from evalkit import (
    FASHION_IDX,
    PHOTOS,
    float32_default,  # noqa: F401 (autouse: float32 default dtype)
    tiny_checkpoint,
)

import wcl.train
from wcl import dist
from wcl.cli import main
from wcl.config import ConfigError

# A small pre-training run (ResNet-10 of width 8 on the 300 fixture images): the cases
# below fail before its first step, or it takes seconds.
SMALL = [
    "data.workers=0",
    "model.backbone=resnet10",
    "model.stem=small",
    "model.width=8",
    "model.hidden_dim=32",
    "model.out_dim=16",
    "train.epochs=1",
    "train.batch_size=64",
    "optim.warmup_epochs=0",
    "train.knn_every=0",
]


def pretrain_argv(out: Path, *overrides: str, config: str | Path = "fashion-mnist-demo") -> list:
    """``wcl pretrain`` of the small run into ``out``, with more ``--set`` overrides."""
    argv = ["pretrain", "--config", config]
    for item in (*SMALL, f"train.out_dir={out}", *overrides):
        argv += ["--set", item]
    return argv


def eval_argv(command: str, config: str, checkpoint: Path, out: Path, *overrides: str) -> list:
    """An evaluation command line writing to ``out``, with ``--set`` overrides."""
    argv = [command, "--config", config, "--checkpoint", checkpoint]
    for item in ("data.workers=0", "run.progress=false", f"run.out_dir={out}", *overrides):
        argv += ["--set", item]
    return argv


def one_line_error(capsys: pytest.CaptureFixture, argv: list, status: int) -> str:
    """Run ``wcl argv``; assert its exit status and that stderr is one ``wcl: ...`` line
    (a warning would be printed there too, so none may be raised)."""
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        assert main([str(a) for a in argv]) == status
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("wcl: "), err
    assert not raised, [str(w.message) for w in raised]
    return lines[0]


# 1. train.device / run.device = cuda without a GPU


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without CUDA devices, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_cuda_without_a_gpu_is_a_config_error(tmp_path, capsys, no_gpu):
    run = tmp_path / "run"
    argv = pretrain_argv(run, f"data.root={FASHION_IDX}", "train.device=cuda")
    line = one_line_error(capsys, argv, 2)
    assert "'train.device' is cuda but no CUDA device is available" in line
    assert not run.exists()  # nothing written
    ckpt = tiny_checkpoint(tmp_path / "pre.pt")
    argv = eval_argv("knn-eval", "knn-small", ckpt, tmp_path / "k", "run.device=cuda")
    assert "'run.device' is cuda" in one_line_error(capsys, argv, 2)
    argv = ["embed", "--checkpoint", ckpt, "--images", PHOTOS, "--out", tmp_path / "e"]
    assert "'--device' is cuda" in one_line_error(capsys, [*argv, "--device", "cuda"], 2)
    with pytest.raises(ConfigError, match="no CUDA device"):
        dist.init_distributed("auto", "cuda")  # the library call, too


# 2. Broken Fashion-MNIST IDX files

IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"


def _header(type_code: int, *dims: int) -> bytes:
    return bytes([0, 0, type_code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)


def _images(root: Path) -> bytes:
    return (root / IMAGES).read_bytes()


def _labels(root: Path) -> bytes:
    return (root / LABELS).read_bytes()


def _gzip_bad_crc(root: Path) -> None:
    packed = bytearray(gzip.compress(_images(root)))
    packed[-8] ^= 0xFF  # the CRC-32 of the trailer
    (root / IMAGES).unlink()
    (root / f"{IMAGES}.gz").write_bytes(bytes(packed))


def _gzip_truncated(root: Path) -> None:
    packed = gzip.compress(_images(root))
    (root / IMAGES).unlink()
    (root / f"{IMAGES}.gz").write_bytes(packed[: len(packed) // 2])


def _fewer_images(root: Path) -> None:
    # A consistent images file of 299 images beside the 300 labels.
    (root / IMAGES).write_bytes(_header(0x08, 299, 28, 28) + _images(root)[16 : 16 + 299 * 784])


def _label_out_of_range(root: Path) -> None:
    raw = bytearray(_labels(root))
    raw[8 + 5] = 12
    (root / LABELS).write_bytes(bytes(raw))


# (damage, the file the error must name, what it must say)
IDX_DAMAGE = {
    "truncated": (lambda r: (r / IMAGES).write_bytes(_images(r)[:1000]), IMAGES, "truncated"),
    "empty": (lambda r: (r / IMAGES).write_bytes(b""), IMAGES, "empty file"),
    "wrong-magic": (
        lambda r: (r / IMAGES).write_bytes(b"\x01\x02" + _images(r)[2:]),
        IMAGES,
        "bad IDX magic",
    ),
    "unknown-type": (
        lambda r: (r / IMAGES).write_bytes(b"\x00\x00\x07" + _images(r)[3:]),
        IMAGES,
        "unknown IDX element type 0x07",
    ),
    "images-1-dim": (
        lambda r: (r / IMAGES).write_bytes(_header(0x08, 300 * 784) + _images(r)[16:]),
        IMAGES,
        "3 dimensions",
    ),
    "labels-3-dims": (
        lambda r: (r / LABELS).write_bytes(_header(0x08, 300, 1, 1) + _labels(r)[8:]),
        LABELS,
        "1 dimension",
    ),
    "header-says-more": (
        lambda r: (r / IMAGES).write_bytes(_header(0x08, 301, 28, 28) + _images(r)[16:]),
        IMAGES,
        "shape (301, 28, 28) needs",
    ),
    "header-says-less": (
        lambda r: (r / IMAGES).write_bytes(_header(0x08, 300, 27, 28) + _images(r)[16:]),
        IMAGES,
        "trailing bytes",
    ),
    "counts-differ": (_fewer_images, LABELS, "300 labels for 299 images"),
    "label-out-of-range": (_label_out_of_range, LABELS, "outside 0..9, the first 12 (image 5)"),
    "gzip-bad-crc": (_gzip_bad_crc, f"{IMAGES}.gz", "corrupt or truncated gzip"),
    "gzip-truncated": (_gzip_truncated, f"{IMAGES}.gz", "corrupt or truncated gzip"),
    "not-gzip": (
        lambda r: (r / IMAGES).rename(r / f"{IMAGES}.gz"),
        f"{IMAGES}.gz",
        "not gzip-compressed",
    ),
}


@pytest.mark.parametrize("damage", list(IDX_DAMAGE))
def test_broken_idx_files_are_one_line_naming_the_file(tmp_path, capsys, damage):
    root = tmp_path / "fashion"
    shutil.copytree(FASHION_IDX, root)
    spoil, name, says = IDX_DAMAGE[damage]
    spoil(root)
    line = one_line_error(capsys, pretrain_argv(tmp_path / "run", f"data.root={root}"), 2)
    assert line.startswith("wcl: data error: ") and str(root / name) in line and says in line
    assert not (tmp_path / "run" / "last.pt").exists()


# 3. An image folder whose every file is broken


def _broken_folder(root: Path) -> Path:
    """root/{train,val}/{a,b}/ holding files that are no images."""
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(3):
                (root / split / label / f"{i}.png").write_bytes(b"no image here " * 8)
    return root


def test_a_folder_of_broken_files_is_one_line_everywhere(tmp_path, capsys):
    root = _broken_folder(tmp_path / "images")
    folder = ["data.dataset=folder", f"data.root={root}"]
    argv = pretrain_argv(
        tmp_path / "run", *folder, "data.channels=3", "data.augment=loader",
        "data.image_size=16", "train.batch_size=4",
    )  # fmt: skip
    line = one_line_error(capsys, argv, 2)
    assert line.startswith("wcl: data error: no readable image in ") and str(root / "train") in line
    ckpt = tiny_checkpoint(tmp_path / "rgb.pt", in_channels=3)
    for argv in (
        eval_argv("knn-eval", "knn-small", ckpt, tmp_path / "k", *folder, "knn.k=2"),
        [*eval_argv("linear-eval", "linear-small", ckpt, tmp_path / "l", *folder), "--fast"],
        eval_argv("linear-eval", "linear-small", ckpt, tmp_path / "p", *folder),
        eval_argv("finetune", "finetune-small", ckpt, tmp_path / "f", *folder),
        ["embed", "--checkpoint", ckpt, "--images", root, "--out", tmp_path / "e"],
    ):
        line = one_line_error(capsys, argv, 2)
        assert "no readable image in" in line and str(root) in line, argv
    assert not (tmp_path / "e.npy").exists()


def test_an_error_from_a_loader_worker_is_one_line(tmp_path, capsys, monkeypatch):
    """A DataLoader worker's error comes back with the worker's traceback as its message
    (torch re-raises it so); the CLI prints only the error."""
    from torch._utils import ExceptionWrapper

    from wcl.data import NoReadableImageError

    def pretrain(cfg, resume=None):
        try:
            raise NoReadableImageError("none of the 4 images of a batch could be decoded")
        except NoReadableImageError:
            ExceptionWrapper(where="in DataLoader worker process 0").reraise()

    monkeypatch.setattr(wcl.train, "pretrain", pretrain)
    line = one_line_error(capsys, pretrain_argv(tmp_path / "run", f"data.root={FASHION_IDX}"), 2)
    assert line == "wcl: data error: none of the 4 images of a batch could be decoded"


# 4. Seeds torch cannot take (or would fold onto another seed)


@pytest.mark.parametrize("seed", [2**70, 2**63, -1])
def test_seeds_outside_0_to_2_63_are_config_errors(tmp_path, capsys, seed):
    argv = pretrain_argv(tmp_path / "run", f"data.root={FASHION_IDX}", f"train.seed={seed}")
    line = one_line_error(capsys, argv, 2)
    assert f"config key 'train.seed' must be in [0, 2**63), got {seed}" in line
    assert not (tmp_path / "run").exists()
    ckpt = tiny_checkpoint(tmp_path / "pre.pt")
    for command, config, key in (
        ("knn-eval", "knn-small", "run.seed"),
        ("finetune", "finetune-small", "run.seed"),
        ("finetune", "finetune-small", "finetune.subset_seed"),
    ):
        argv = eval_argv(command, config, ckpt, tmp_path / "e", f"{key}={seed}")
        assert f"'{key}' must be in [0, 2**63), got {seed}" in one_line_error(capsys, argv, 2)


# 5. A binary file (or broken YAML) as --config

NOT_TEXT = {
    "random-bytes": np.random.default_rng(0).bytes(512),
    "png": (PHOTOS / "astronaut.png").read_bytes()[:4096],
    "nul-bytes": b"data:\n  root: x\x00\x00\x00\n",
}


@pytest.mark.parametrize("kind", list(NOT_TEXT))
def test_a_binary_config_file_is_one_line(tmp_path, capsys, kind):
    path = tmp_path / "config.yaml"
    path.write_bytes(NOT_TEXT[kind])
    line = one_line_error(capsys, ["pretrain", "--config", path], 2)
    assert f"config file '{path}' is not a text YAML file" in line
    ckpt = tiny_checkpoint(tmp_path / "pre.pt")
    line = one_line_error(capsys, ["knn-eval", "--config", path, "--checkpoint", ckpt], 2)
    assert f"config file '{path}' is not a text YAML file" in line


def test_broken_yaml_is_one_line_with_its_place(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text("data:\n  root: [1, 2\ntrain:\n  epochs: 1\n")
    line = one_line_error(capsys, ["pretrain", "--config", path], 2)
    assert f"config file '{path}' is not valid YAML: line " in line
    line = one_line_error(
        capsys, ["pretrain", "--config", path.with_name("x"), "--set", "a.b=[1"], 2
    )
    assert "not found" in line  # the file comes first
    line = one_line_error(capsys, pretrain_argv(tmp_path / "r", "train.epochs=[1"), 2)
    assert "override 'train.epochs=[1': value is not valid YAML: line 1" in line


# 6. Models too large to build, and running out of memory anyway


@pytest.mark.parametrize(
    ("key", "value"),
    [("model.width", 100_000), ("model.hidden_dim", 10**7), ("model.out_dim", 10**6)],
)
def test_absurd_model_sizes_are_config_errors(tmp_path, capsys, key, value):
    argv = pretrain_argv(tmp_path / "run", f"data.root={FASHION_IDX}", f"{key}={value}")
    line = one_line_error(capsys, argv, 2)
    assert f"config key '{key}' must be at most" in line and str(value) in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["cpu", "cuda"])
def test_out_of_memory_is_one_line_with_what_to_lower(tmp_path, capsys, monkeypatch, where):
    def build_model(cfg):
        if where == "cpu":  # a real allocation failure: 2**60 bytes
            torch.empty(2**60, dtype=torch.uint8)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB.")

    monkeypatch.setattr(wcl.train, "build_model", build_model)
    argv = pretrain_argv(tmp_path / "run", f"data.root={FASHION_IDX}")
    line = one_line_error(capsys, argv, 1)
    assert line.startswith("wcl: out of memory (")
    assert line.endswith("lower train.batch_size or model.width")
    assert ("can't allocate memory" if where == "cpu" else "Tried to allocate 64.00 GiB") in line


# 7. Weights of the wrong shape


def _backbone_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    from wcl.weights import load_backbone

    return {k: v.contiguous() for k, v in load_backbone(checkpoint).module.state_dict().items()}


@pytest.mark.parametrize(
    ("key", "shape"), [("conv1.weight", (16, 1, 3, 3)), ("layer1.0.conv1.weight", (8, 8, 5, 5))]
)
def test_a_layer_of_the_wrong_shape_is_a_checkpoint_error(tmp_path, capsys, key, shape):
    from safetensors.torch import save_file

    tensors = _backbone_tensors(tiny_checkpoint(tmp_path / "pre.pt"))
    tensors[key] = torch.zeros(shape)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad)
    for argv in (
        eval_argv("finetune", "finetune-small", bad, tmp_path / "f", f"data.root={FASHION_IDX}"),
        ["export", bad, tmp_path / "out"],
    ):
        line = one_line_error(capsys, argv, 1)
        assert str(bad) in line and key in line and "shape" in line, argv
    assert not (tmp_path / "out").exists()


# 8. Files that need pickle code to load


class SystemCall:
    """Pickles to ``os.system(command)``: any pickle load runs the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _write_pickle_payload(path: Path, marker: Path, how: str) -> None:
    payload = {
        "model": {"conv1.weight": torch.zeros(8, 1, 3, 3)},
        "x": SystemCall(f"touch {marker}"),
    }
    if how.startswith("raw-pickle-"):
        path.write_bytes(pickle.dumps(SystemCall(f"touch {marker}"), protocol=int(how[-1])))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=how == "torch-zip")


@pytest.mark.parametrize(
    "how", ["raw-pickle-2", "raw-pickle-4", "raw-pickle-5", "torch-zip", "torch-legacy"]
)
def test_pickle_code_is_refused_without_advice_to_run_it(tmp_path, capsys, how):
    marker, path = tmp_path / "marker", tmp_path / "evil.pt"
    _write_pickle_payload(path, marker, how)
    for argv in (
        ["export", path, tmp_path / "out"],
        eval_argv("knn-eval", "knn-small", path, tmp_path / "k", f"data.root={FASHION_IDX}"),
    ):
        line = one_line_error(capsys, argv, 1)
        assert f"checkpoint {path} refused: it needs pickle code to load" in line
        assert "(posix.system)" in line or "(nt.system)" in line
        assert "wcl never runs code from a file" in line
        assert "weights_only" not in line
    assert not marker.exists()
    # Positive control: the payload is live.
    if how.startswith("raw-pickle-"):
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_pickle_torch_cannot_parse_gets_no_advice_either(tmp_path, capsys):
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"epoch": 3}, protocol=4))  # no code, but no torch file
    line = one_line_error(capsys, ["export", path, tmp_path / "out"], 1)
    assert str(path) in line and "weights_only" not in line


# 9. Weights holding NaN or Inf


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, capsys, value):
    state = torch.load(tiny_checkpoint(tmp_path / "pre.pt"), weights_only=True)
    key = "backbone.layer2.0.bn1.running_var"
    state["model"][key][3] = value
    bad = tmp_path / "diverged.pt"
    torch.save(state, bad)
    small_knn = [
        f"data.root={FASHION_IDX}",
        "knn.k=5",
        "data.train_subset=64",
        "data.test_subset=16",
    ]
    for argv in (
        ["export", bad, tmp_path / "out"],
        ["embed", "--checkpoint", bad, "--images", PHOTOS, "--out", tmp_path / "e"],
        eval_argv("knn-eval", "knn-small", bad, tmp_path / "k", *small_knn),
    ):
        line = one_line_error(capsys, argv, 1)
        assert str(bad) in line and "'layer2.0.bn1.running_var'" in line and "NaN or Inf" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "k").exists()
