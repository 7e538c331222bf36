"""Hostile input: every bad config value, data file or checkpoint ends with one clear line
on stderr naming the file, key or value, and the documented exit status (2: a bad config
or input, 1: a file wcl cannot use), never a traceback, and before work is wasted."""

from pathlib import Path

import pytest
import torch
from evalkit import (
    FASHION_IDX,
    PHOTOS,
    float32_default,  # noqa: F401 (autouse: float32 default dtype)
    tiny_checkpoint,
)

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
    """Run ``wcl argv``; assert its exit status and that stderr is one ``wcl: ...`` line."""
    assert main([str(a) for a in argv]) == status
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("wcl: "), err
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
