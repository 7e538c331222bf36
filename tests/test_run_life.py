"""What clusters and careless users do to a run: two runs on one directory, signals during
start-up, a non-finite forward pass, a full disk, a torn metrics file, odd folders."""

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import FIXTURE, tiny_config

import wcl.steps
import wcl.train
from wcl.checkpoint import load_checkpoint, save_checkpoint
from wcl.cli import main
from wcl.data import ImageFolderDataset, check_data
from wcl.data.views import TrainingViews
from wcl.lock import LOCK_NAME, RunDirLocked, RunLock
from wcl.rundir import MetricsLog
from wcl.train import pretrain

HOLD = (
    "import sys, time; from wcl.lock import RunLock; "
    "lock = RunLock(sys.argv[1]).acquire('the first run'); print('held', flush=True); "
    "time.sleep(600)"
)


def _hold(run_dir: Path) -> subprocess.Popen:
    """Another process holding ``run_dir``'s lock, until killed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    return holder


def _cli_pretrain(out: Path, *extra: str) -> list[str]:
    argv = ["pretrain", "--config", "fashion-mnist-demo"]
    keys = [f"data.root={FIXTURE}", "data.workers=0", "data.augment=loader", "model.width=8",
            "model.hidden_dim=32", "model.out_dim=16", "train.epochs=2", "train.batch_size=64",
            "train.knn_every=0", "optim.warmup_epochs=1", f"train.out_dir={out}", *extra]  # fmt: skip
    for key in keys:
        argv += ["--set", key]
    return argv


def test_a_second_run_on_a_held_directory_is_refused_and_touches_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = _hold(run_dir)
    try:
        in_flight = run_dir / ".tmp-abc.pt"  # the first run's checkpoint being written
        in_flight.write_bytes(b"half a checkpoint")
        for resume in ([], ["--resume", "auto"]):
            assert main(_cli_pretrain(run_dir) + resume) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1
            assert f"is in use by 'the first run' (pid {holder.pid} on " in err
        assert in_flight.exists() and not (run_dir / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died (kill -9): its lock is taken over and its leftovers cleaned.
    assert main(_cli_pretrain(run_dir)) == 0
    assert not in_flight.exists() and (run_dir / "last.pt").is_file()
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
    # And released when the run ended: another process can take it at once.
    RunLock(run_dir).acquire("next").release()


def test_evaluation_run_directories_are_locked_too(tmp_path, capsys):
    assert main(_cli_pretrain(tmp_path / "run")) == 0
    out = tmp_path / "knn"
    holder = _hold(out)
    argv = ["knn-eval", "--config", "knn-small", "--checkpoint", str(tmp_path / "run" / "last.pt"),
            "--set", f"run.out_dir={out}", "--set", "knn.k=[5]", "--set", "data.workers=0"]  # fmt: skip
    try:
        assert main(argv) == 2
        assert "is in use by 'the first run'" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert main(argv) == 0


def test_a_signal_during_start_up_leaves_a_preempted_file(tmp_path, monkeypatch, capsys):
    """SIGTERM before the first step (here: while the data is read) ends the run with exit
    status 75 and a `preempted` file, which the sbatch recipe tests to requeue."""
    reading = wcl.train.training_data

    def signalled_while_reading(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return reading(*args, **kwargs)

    monkeypatch.setattr(wcl.train, "training_data", signalled_while_reading)
    out = tmp_path / "run"
    assert main(_cli_pretrain(out)) == 75
    assert "stopped during start-up, before step 1" in capsys.readouterr().err
    assert (out / "preempted").read_text() == "SIGTERM 0\n"
    assert not (out / "last.pt").exists()
    monkeypatch.setattr(wcl.train, "training_data", reading)
    assert main(_cli_pretrain(out) + ["--resume", "auto"]) == 0
    assert not (out / "preempted").exists()


def test_a_skipped_step_leaves_the_whole_model_state_as_it_was(tmp_path, monkeypatch):
    """A batch holding NaN makes a non-finite forward pass: under train.nonfinite=skip the
    update is dropped and so are the BatchNorm statistics that pass computed."""
    make = TrainingViews.make
    calls = {"n": 0}
    states = {}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        x1, x2, targets, small = make(self, *args, **kwargs)
        if calls["n"] == 3:
            model = states["model"]
            states["before"] = {k: v.clone() for k, v in model.state_dict().items()}
            x1 = x1.clone()
            x1[0, 0, 0, 0] = float("nan")
        return x1, x2, targets, small

    build = wcl.train.build_model

    def keep_model(cfg):
        states["model"] = build(cfg)
        return states["model"]

    monkeypatch.setattr(TrainingViews, "make", poisoned)
    monkeypatch.setattr(wcl.train, "build_model", keep_model)
    step = wcl.steps.BufferSnapshot.restore

    def after_restore(self):
        step(self)
        after = states["model"].state_dict()
        assert all(torch.equal(after[k], v) for k, v in states["before"].items())
        states["restored"] = True

    monkeypatch.setattr(wcl.steps.BufferSnapshot, "restore", after_restore)
    out = tmp_path / "run"
    pretrain(tiny_config(out, "train.nonfinite=skip", "train.log_every=1"))
    assert states.get("restored")
    weights = load_checkpoint(out / "last.pt")["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_steps"] == 1


def test_metrics_after_a_resume_have_each_step_once(tmp_path):
    out = tmp_path / "run"
    pretrain(tiny_config(out, "train.log_every=1"))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    # As if killed after the epoch-1 checkpoint, mid-way through writing a line.
    epoch_one = load_checkpoint(out / "epoch-0001.pt")
    (out / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 9, "lo')
    pretrain(tiny_config(out, "train.log_every=1"), resume=str(out / "epoch-0001.pt"))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 3 * (epoch_one["step"])


def test_metrics_lines_are_json_even_for_nan(tmp_path):
    log = MetricsLog(tmp_path, True)
    log.write({"step": 1, "loss": math.nan, "lr": math.inf, "epoch": 1})
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {
        "step": 1, "loss": None, "lr": None, "epoch": 1
    }  # fmt: skip


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    path = tmp_path / "last.pt"
    save_checkpoint({"kind": "pretrain", "step": 1}, path)

    def full(obj, f, *args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as err:  # torch's zip writer reports it so
            raise RuntimeError(
                "[enforce fail at inline_container.cc] unexpected pos 7 vs 5"
            ) from err

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(
        OSError, match=r"could not write checkpoint .*last\.pt: no space left"
    ) as err:
        save_checkpoint({"kind": "pretrain", "step": 2}, path)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1  # the previous one, intact
    assert not list(tmp_path.glob(".tmp-*"))

    log = MetricsLog(tmp_path, True)
    log.file.close()
    log.file = open("/dev/full", "w")  # every write: ENOSPC  # noqa: SIM115
    with pytest.raises(OSError, match=r"cannot append to .*metrics\.jsonl: No space left"):
        log.write({"step": 1, "loss": 1.0})
    log.close()


def test_an_empty_class_folder_is_said_and_symlink_loops_are_unreadable(tmp_path, capsys):
    source = Path(__file__).parent / "fixtures" / "fashion"
    for name in ("Bag", "Coat"):
        (tmp_path / name).mkdir()
        for f in sorted((source / name).glob("*.png"))[:3]:
            (tmp_path / name / f.name).write_bytes(f.read_bytes())
    (tmp_path / "Empty").mkdir()
    (tmp_path / "Bag" / "loop.png").symlink_to(tmp_path / "Bag" / "loop.png")
    with pytest.warns(UserWarning, match=r"class folder\(s\) \['Empty'\] hold no image"):
        dataset = ImageFolderDataset(tmp_path, channels=1, substitute=False)
    assert dataset.classes == ["Bag", "Coat"]
    loop = next(i for i, (p, _) in enumerate(dataset.samples) if p.endswith("loop.png"))
    assert dataset[loop][0] is None and set(dataset.skipped.values()) == {"unreadable"}
    report = check_data(tmp_path, channels=1, progress=False)
    assert [b.reason for b in report.broken] == ["unreadable"]
    assert "empty class folders (left out): Empty" in report.summary()


def test_the_lock_of_a_live_process_is_not_taken(tmp_path):
    holder = _hold(tmp_path)
    try:
        with pytest.raises(RunDirLocked, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire("second")
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.05)
    RunLock(tmp_path).acquire("third").release()


def test_a_signal_while_the_cli_still_imports_leaves_a_preempted_file(tmp_path):
    """SIGTERM a second into `wcl pretrain` (torch still loading, or the data): exit 75 and
    a `preempted` file, which the sbatch recipe tests to requeue."""
    out = tmp_path / "run"
    code = "import sys; from wcl.cli import main; sys.exit(main())"
    argv = [sys.executable, "-c", code, *_cli_pretrain(out)]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    assert (out / "preempted").read_text().startswith("SIGTERM ")
    assert "continue with --resume auto" in err.strip().splitlines()[-1]
