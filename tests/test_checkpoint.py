"""Tests for wcl.checkpoint: atomic saving, safe loading, error reporting and RNG capture."""

from __future__ import annotations

import errno
import os
import pathlib
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from wcl.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from wcl.optim import LARS, param_groups


class _TouchOnLoad:
    """Unpickling this runs ``Path(marker).touch()``: stands in for a malicious payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _training_state() -> dict[str, Any]:
    """Model + LARS state after two steps, so the optimiser has momentum buffers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))
    opt = LARS(param_groups(model, 1e-6), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(2, 3, 4, 4)).sum().backward()
        opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": 3,
        "step": 120,
        "config": {"lr": 0.075, "name": "wcl", "flags": [True, None], "shape": (1, 2)},
        "rng": rng_state(),
    }


def _assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Structural equality with torch.equal on tensors (and matching dtype/shape)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and a == b, where


def _tmp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".tmp-"))


def test_round_trip_equals_original(tmp_path: Path) -> None:
    state = _training_state()
    path = tmp_path / "last.pt"
    save_checkpoint(state, path)
    loaded = load_checkpoint(path)
    assert loaded["format"] == "wcl-checkpoint"
    assert loaded["format_version"] == FORMAT_VERSION
    _assert_same(state, {k: loaded[k] for k in state})
    assert _tmp_files(tmp_path) == []
    assert "format" not in state  # the caller's dict is not modified


def test_saved_file_loads_with_plain_weights_only_torch_load(tmp_path: Path) -> None:
    state = _training_state()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(state, str(path))
    plain = torch.load(path, weights_only=True)
    _assert_same(state["model"], plain["model"])
    _assert_same(state["optimizer"], plain["optimizer"])


def test_loaded_optimizer_state_resumes(tmp_path: Path) -> None:
    state = _training_state()
    save_checkpoint(state, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))
    model.load_state_dict(loaded["model"])
    opt = LARS(param_groups(model, 1e-6), lr=1.0)
    opt.load_state_dict(loaded["optimizer"])
    assert opt.param_groups[0]["lr"] == 0.1


def test_file_mode_follows_umask(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"x": 1}, path)
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="not found") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_directory_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        load_checkpoint(tmp_path)


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(_training_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("prefix", [b"", b"PK\x03\x04", b"\x80\x02"])
def test_random_bytes(tmp_path: Path, prefix: bytes) -> None:
    # Random bytes, alone or behind a zip / pickle header, trip the parsers in many different
    # places; every one of them must come out as a CheckpointError naming the file.
    rng = np.random.default_rng(len(prefix))
    path = tmp_path / "junk.pt"
    for size in [0, 1, 7, 64, 4096, *rng.integers(1, 2048, size=40).tolist()]:
        path.write_bytes(prefix + rng.bytes(size))
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value)


@pytest.mark.parametrize("encoding", ["zip", "legacy", "raw-pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, encoding: str) -> None:
    def write(marker: Path, path: Path) -> None:
        payload = {"format": "wcl-checkpoint", "format_version": 1, "x": _TouchOnLoad(marker)}
        if encoding == "raw-pickle":
            path.write_bytes(pickle.dumps(payload, protocol=2))
        else:
            torch.save(payload, path, _use_new_zipfile_serialization=encoding == "zip")

    # Sanity check that the payload is live: an unsafe load really creates its marker.
    live_marker, live_path = tmp_path / "live-marker", tmp_path / "live.pt"
    write(live_marker, live_path)
    if encoding == "raw-pickle":
        pickle.loads(live_path.read_bytes())
    else:
        torch.load(live_path, weights_only=False)
    assert live_marker.exists()

    marker, path = tmp_path / "marker", tmp_path / "evil.pt"
    write(marker, path)
    with pytest.raises(CheckpointError, match="refused") as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    assert "needs pickle code to load" in message and "weights_only" not in message
    assert "wcl never runs code from a file, so it was not loaded" in message
    assert "getattr" in message  # how pickle reaches Path.touch, named in the message
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_checkpoint(path, allow_foreign=True)
    assert not marker.exists()


def test_not_a_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.ones(2)], path)
    with pytest.raises(CheckpointError, match="not a dict"):
        load_checkpoint(path, allow_foreign=True)


def test_foreign_dict_needs_allow_foreign(tmp_path: Path) -> None:
    path = tmp_path / "release.pth"
    foreign = {"state_dict": {"module.encoder.conv1.weight": torch.randn(2, 3)}, "epoch": 200}
    torch.save(foreign, path)
    with pytest.raises(CheckpointError, match="not a wcl checkpoint") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "allow_foreign" in str(info.value)
    _assert_same(foreign, load_checkpoint(path, allow_foreign=True))


def test_newer_format_version(tmp_path: Path) -> None:
    path = tmp_path / "future.pt"
    torch.save({"format": "wcl-checkpoint", "format_version": FORMAT_VERSION + 1}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    assert f"format_version {FORMAT_VERSION + 1}" in message
    assert f"version {FORMAT_VERSION} " in message


def test_unsafe_value_is_rejected_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)
    before = path.read_bytes()
    with pytest.raises(TypeError, match=r"state\['metrics'\]\['acc'\].*numpy"):
        save_checkpoint({"metrics": {"acc": np.float64(0.5)}}, path)
    assert path.read_bytes() == before
    assert _tmp_files(tmp_path) == []


def _assert_failed_save_left_previous(
    tmp_path: Path, path: Path, before: bytes, err: pytest.ExceptionInfo[OSError]
) -> None:
    assert err.value.errno == errno.ENOSPC
    assert str(path) in str(err.value)
    assert "previous checkpoint" in str(err.value) and "intact" in str(err.value)
    assert path.read_bytes() == before
    assert _tmp_files(tmp_path) == []
    assert load_checkpoint(path)["epoch"] == 1


def test_enospc_at_fsync_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.arange(10)}, path)
    before = path.read_bytes()

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError) as err:
        save_checkpoint({"epoch": 2, "w": torch.zeros(1000)}, path)
    _assert_failed_save_left_previous(tmp_path, path, before, err)


def test_enospc_midway_through_write_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.arange(10)}, path)
    before = path.read_bytes()

    def partial_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(OSError) as err:
        save_checkpoint({"epoch": 2}, path)
    _assert_failed_save_left_previous(tmp_path, path, before, err)


def test_non_os_error_is_wrapped_and_cleaned_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)
    before = path.read_bytes()

    def broken_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"partial")
        raise pickle.PicklingError("cannot pickle")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="intact") as err:
        save_checkpoint({"epoch": 2}, path)
    assert str(path) in str(err.value)
    assert path.read_bytes() == before
    assert _tmp_files(tmp_path) == []


def test_interrupt_propagates_unchanged_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)
    before = path.read_bytes()

    def interrupted_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2}, path)
    assert path.read_bytes() == before
    assert _tmp_files(tmp_path) == []


def test_missing_directory_reports_path(tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "last.pt"
    with pytest.raises(OSError, match="no-such-dir") as err:
        save_checkpoint({"epoch": 1}, path)
    assert err.value.errno == errno.ENOENT


@pytest.mark.skipif(
    not os.path.exists("/dev/full") or not os.access("/dev/full", os.W_OK),
    reason="needs a writable /dev/full",
)
def test_real_full_device_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.arange(10)}, path)
    before = path.read_bytes()
    real_mkstemp = tempfile.mkstemp
    placeholders: list[str] = []

    def mkstemp_on_dev_full(*args: Any, **kwargs: Any) -> tuple[int, str]:
        # A real temp file keeps the name (and its clean-up) inside tmp_path, while every
        # byte written goes to /dev/full, which fails each write with ENOSPC.
        fd, name = real_mkstemp(*args, **kwargs)
        os.close(fd)
        placeholders.append(name)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_on_dev_full)
    with pytest.raises(OSError) as err:
        save_checkpoint({"epoch": 2, "w": torch.zeros(100_000)}, path)
    assert len(placeholders) == 1 and Path(placeholders[0]).parent == tmp_path
    _assert_failed_save_left_previous(tmp_path, path, before, err)


def test_rng_state_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    # Leave cached Gaussians behind so their part of the state is exercised too.
    random.gauss(0.0, 1.0)
    np.random.standard_normal()

    save_checkpoint({"rng": rng_state()}, tmp_path / "last.pt")

    def draw() -> tuple[list[float], np.ndarray, torch.Tensor, float, float]:
        return (
            [random.random() for _ in range(5)],
            np.random.rand(5),
            torch.rand(5),
            random.gauss(0.0, 1.0),
            float(np.random.standard_normal()),
        )

    first = draw()
    draw()  # move every generator on
    set_rng_state(load_checkpoint(tmp_path / "last.pt")["rng"])
    second = draw()
    assert first[0] == second[0]
    assert np.array_equal(first[1], second[1])
    assert torch.equal(first[2], second[2])
    assert first[3] == second[3] and first[4] == second[4]
    if torch.cuda.is_available():
        assert "cuda" in rng_state()


def test_rng_state_is_weights_only_safe(tmp_path: Path) -> None:
    path = tmp_path / "rng.pt"
    torch.save(rng_state(), path)
    state = torch.load(path, weights_only=True)
    set_rng_state(state)


def test_latest_checkpoint(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint({"epoch": 1}, tmp_path / "last.pt")
    assert latest_checkpoint(str(tmp_path)) == tmp_path / "last.pt"


def test_cuda_states_without_cuda_warn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    state = rng_state()
    assert "cuda" not in state
    state["cuda"] = [torch.get_rng_state()]
    with pytest.warns(UserWarning, match="CUDA is not available"):
        set_rng_state(state)
