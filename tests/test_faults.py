"""Real faults during pre-training: signals, SIGKILL, NaN, broken checkpoints, full disk."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from runkit import assert_same_weights, final_weights

import wcl.checkpoint
from wcl import dist
from wcl.checkpoint import CheckpointError, load_checkpoint
from wcl.config import ConfigError, load_config
from wcl.model import WCL
from wcl.preemption import PREEMPTED_EXIT_CODE
from wcl.train import pretrain

FIXTURE = Path(__file__).parent / "fixtures" / "fashion-idx"
# 300 fixture images, global batch 60: 5 steps an epoch, 40 steps in all.
SETTINGS = [
    f"data.root={FIXTURE}",
    "data.workers=0",
    "data.augment=loader",
    "train.knn_every=0",
    "model.stem=small",
    "model.width=8",
    "model.hidden_dim=32",
    "model.out_dim=16",
    "train.epochs=8",
    "train.batch_size=60",
    "optim.warmup_epochs=1",
    "train.checkpoint_every=100",
    "train.log_every=1",
    "train.threads=1",
]


def config(out_dir, *extra):
    return load_config("fashion-mnist-demo", [*SETTINGS, f"train.out_dir={out_dir}", *extra])


def child(out_dir, *extra, resume=None):
    """`wcl pretrain` in a child process (a real process to signal and kill)."""
    cmd = [sys.executable, "-m", "wcl.cli", "pretrain", "--config", "fashion-mnist-demo"]
    for item in [*SETTINGS, f"train.out_dir={out_dir}", *extra]:
        cmd += ["--set", item]
    if resume:
        cmd += ["--resume", resume]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def wait_for_steps(run_dir, steps, proc, timeout=120):
    metrics = Path(run_dir) / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.02)
    raise TimeoutError(f"{metrics} did not reach {steps} lines")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "reference"
    proc = child(out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    return final_weights(out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_checkpoints_exits_75_and_resume_is_exact(uninterrupted, tmp_path, sig):
    run = tmp_path / "run"
    proc = child(run)
    wait_for_steps(run, 7, proc)  # part-way through epoch 2
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err.decode()[-2000:]
    assert signal.Signals(sig).name in err.decode()
    ckpt = load_checkpoint(run / "last.pt")
    lines = len((run / "metrics.jsonl").read_text().splitlines())
    assert ckpt["step"] == lines and ckpt["step"] < 40  # stopped right after its step
    assert (run / "preempted").read_text().split()[0] == signal.Signals(sig).name
    proc = child(run, resume="auto")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert not (run / "preempted").exists()
    assert_same_weights(final_weights(run), uninterrupted)


def test_sigkill_at_a_random_step_then_resume_is_exact(uninterrupted, tmp_path):
    run = tmp_path / "run"
    kill_after = random.randint(2, 35)
    print(f"SIGKILL after {kill_after} steps")  # shown when the test fails
    proc = child(run, "train.checkpoint_every_steps=1")
    wait_for_steps(run, kill_after, proc)
    proc.kill()  # SIGKILL: no handler runs; a checkpoint may be half-written
    proc.wait()
    ckpt = load_checkpoint(run / "last.pt")  # never corrupt: atomic rename
    assert 1 <= ckpt["step"] <= 40
    proc = child(run, "train.checkpoint_every_steps=1", resume="auto")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert not list(run.glob(".tmp-*"))
    assert_same_weights(final_weights(run), uninterrupted)


def inject_nan_at(monkeypatch, call):
    """WCL.forward returns a NaN loss on its ``call``-th call (1-based)."""
    original = WCL.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == call:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(WCL, "forward", forward)


def test_nan_loss_stops_with_step_and_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    inject_nan_at(monkeypatch, 8)
    run = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match=r"step 8 \(epoch 2\).*loss=nan.*lr="):
        pretrain(config(run, "train.checkpoint_every_steps=3"))
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_nan_loss_skipped_by_choice(tmp_path, monkeypatch):
    inject_nan_at(monkeypatch, 8)
    run = tmp_path / "skip"
    pretrain(config(run, "train.nonfinite=skip"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows][6:9] == [0, 1, 1]
    assert rows[-1]["step"] == 40
    assert all(
        torch.isfinite(v).all() for v in final_weights(run).values() if v.is_floating_point()
    )


def test_truncated_checkpoint_is_named(tmp_path):
    run = tmp_path / "trunc"
    pretrain(config(run, "train.epochs=1", "optim.warmup_epochs=0"))
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="last.pt"):
        pretrain(config(run, "train.epochs=1", "optim.warmup_epochs=0"), resume="auto")


def test_checkpoint_from_another_config_is_refused(tmp_path):
    run = tmp_path / "other"
    pretrain(config(run, "train.epochs=1", "optim.warmup_epochs=0"))
    with pytest.raises(CheckpointError, match=r"model.width: 8 -> 16"):
        pretrain(config(tmp_path / "b", "train.epochs=1", "optim.warmup_epochs=0",
                        "model.width=16"), resume=str(run / "last.pt"))  # fmt: skip
    # Settings that only say where and how often may change.
    pretrain(
        config(run, "train.epochs=1", "optim.warmup_epochs=0", "train.log_every=7"),
        resume="auto",
    )


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "full"
    real_fsync, saves = os.fsync, {"n": 0}

    def fsync(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name.startswith(".tmp-") and name.endswith(".pt"):  # a checkpoint being saved
            saves["n"] += 1
            if saves["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(wcl.checkpoint.os, "fsync", fsync)
    with pytest.raises(OSError, match="intact") as err:
        pretrain(config(run, "train.checkpoint_every_steps=4"))
    assert err.value.errno == errno.ENOSPC
    assert load_checkpoint(run / "last.pt")["step"] == 4
    assert not list(run.glob(".tmp-*"))


def test_resuming_weights_holding_nan_is_refused_naming_the_tensor(tmp_path):
    """A last.pt whose weights hold NaN (damaged, or saved by a diverged run) is not
    trained on: --resume refuses it in one line naming the tensor, and leaves it alone."""
    run = tmp_path / "nan"
    pretrain(config(run, "train.epochs=1"))
    state = load_checkpoint(run / "last.pt")
    state["model"]["g.0.weight"][0, 0] = float("nan")
    wcl.checkpoint.save_checkpoint(state, run / "last.pt")
    before = (run / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match=r"last.pt: tensor 'g.0.weight' holds NaN or Inf"):
        pretrain(config(run, "train.epochs=2"), resume="auto")
    assert (run / "last.pt").read_bytes() == before


def test_batch_not_divisible_by_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(
        dist, "init_distributed", lambda *a: dist.DistInfo(0, 7, 0, torch.device("cpu"))
    )
    with pytest.raises(ConfigError, match=r"'train.batch_size' 60 .* 7 processes"):
        pretrain(config(tmp_path / "x"))


def test_signal_to_one_of_two_processes_stops_both_with_a_checkpoint(tmp_path):
    """SLURM may signal the tasks one by one: every process must stop at the same step."""
    run = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "wcl.cli", "pretrain", "--config", "fashion-mnist-demo"]  # fmt: skip
    for item in [*SETTINGS, f"train.out_dir={run}"]:
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_steps(run, 6, proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    pids = sorted(int(p) for p in workers.stdout.split())
    assert len(pids) == 2
    os.kill(pids[-1], signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun reports its workers' exit status 75 as a failure
    assert "SIGUSR1 received" in err.decode()
    marker = (run / "preempted").read_text().split()
    ckpt = load_checkpoint(run / "last.pt")
    assert marker == ["SIGUSR1", str(ckpt["step"])] and 6 <= ckpt["step"] < 40


def _folder_with_broken_files(root, broken):
    source = Path(__file__).parent / "fixtures" / "fashion"
    for png in sorted(source.rglob("*.png"))[:120]:
        target = root / png.parent.name / png.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png.read_bytes())
    bad = []
    for i, kind in enumerate(broken):
        path = root / "Bag" / f"broken-{i}.png"
        good = next(source.rglob("*.png")).read_bytes()
        path.write_bytes(
            {"zero": b"", "text": b"not an image", "cut": good[: len(good) // 2]}[kind]
        )
        bad.append(str(path))
    return bad


def test_broken_images_are_skipped_and_listed(tmp_path):
    data = tmp_path / "images"
    bad = _folder_with_broken_files(data, ["zero", "text", "cut"])
    run = tmp_path / "run"
    cfg = config(run, "data.dataset=folder", f"data.root={data}", "train.epochs=1",
                 "optim.warmup_epochs=0")  # fmt: skip
    pretrain(cfg)
    listed = [json.loads(line)["path"] for line in (run / "skipped.jsonl").read_text().splitlines()]
    assert sorted(set(listed)) == sorted(bad)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_files"] == 3


def test_data_set_without_a_readable_image_fails_before_training(tmp_path):
    data = tmp_path / "bad"
    (data / "a").mkdir(parents=True)
    for i in range(5):
        (data / "a" / f"{i}.jpg").write_bytes(b"")
    cfg = config(tmp_path / "run", "data.dataset=folder", f"data.root={data}")
    with pytest.raises(RuntimeError, match=str(data)):
        pretrain(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
