"""Bench scripts that reach into the library (swapping a module attribute for the old way)
break silently when the library moves; running them here makes that a test failure."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).parent.parent / "bench"


def run_bench(tmp_path, script: str, *args: str) -> str:
    env = os.environ | {"PYTHONPATH": str(BENCH.parent / "src")}
    done = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=tmp_path, env=env,
                          check=True, capture_output=True, text=True, timeout=300)  # fmt: skip
    return done.stdout


def test_batch_params_runs_against_the_current_library(tmp_path):
    run_bench(tmp_path, "batch_params.py")
    rows = json.loads((tmp_path / "runs" / "bench" / "batch_params.json").read_text())
    assert [r["batch"] for r in rows] == [256, 512, 1024]
    assert all(r["baseline_ms"] > 0 and r["ours_ms"] > 0 for r in rows)


def test_train_step_and_multicrop_benches_run(tmp_path):
    """One round of one step each: the scripts still drive the current WCL (multi-crop
    included) and report ratios against their baselines."""
    run_bench(tmp_path, "train_step.py", "--models", "demo", "--rounds", "1", "--steps", "1")
    rows = json.loads((tmp_path / "runs" / "bench" / "train_step.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["demo"] and rows[0]["ours_time_ratio"] > 0
    run_bench(tmp_path, "multicrop.py", "--models", "demo", "--rounds", "1", "--steps", "1")
    rows = json.loads((tmp_path / "runs" / "bench" / "multicrop.json").read_text())["rows"]
    assert [(r["small_crops"], r["small_size"]) for r in rows] == [(0, 12), (2, 12), (6, 12)]
    assert rows[0]["time_ratio"] == 1.0 and all(r["time_ratio"] > 0 for r in rows)


def test_gpu_study_rehearsal_measures_every_arm(tmp_path):
    """bench/study_gpu.py --dry-run: every (arm, seed) lane runs bench/study.py at once and
    ends with one measured line per arm, merged, and the summary table of all three."""
    env = os.environ | {"OUT": str(tmp_path / "out")}
    done = subprocess.run([sys.executable, str(BENCH / "study_gpu.py"), "--dry-run", "--seeds", "0",
                           "--runs", str(tmp_path / "study-gpu")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "study-gpu.jsonl").open()]
    assert sorted((r["arm"], r["seed"], r["epoch"], r["study"]) for r in rows) == [
        (arm, 0, 1, "study-gpu") for arm in ("exact", "release", "simclr")
    ]
    assert all(0 < r[m] <= 100 for r in rows for m in ("knn_top1", "knn20_top1", "linear_top1"))
    table = (tmp_path / "out" / "study-gpu.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines() if "| 1 | 1 |" in line] == [
        "exact",
        "release",
        "simclr",
    ]


def test_study_measures_what_it_has_when_stopped(tmp_path):
    """SIGTERM during pre-training: bench/study.py measures the epoch checkpoints already
    written, keeps last.pt, and exits 75 (what bench/study_gpu.py's budget relies on)."""
    env = os.environ | {"PYTHONPATH": str(BENCH.parent / "src")}
    run_dir = tmp_path / "stopped" / "exact-seed0"
    proc = subprocess.Popen([sys.executable, str(BENCH / "study.py"), "run", "--arms", "exact",
                             "--seeds", "0", "--epochs", "200", "--every", "1", "--threads", "1",
                             "--out", str(tmp_path / "stopped"), "--eval-subset", "300",
                             "--results", str(tmp_path / "r.jsonl"), "--set", "data.subset=256",
                             "train.batch_size=64", "train.device=cpu", "data.workers=0"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (run_dir / "epoch-0001.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, output
    epochs = sorted(int(p.stem.split("-")[1]) for p in run_dir.glob("epoch-*.pt"))
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").open()]
    assert 1 <= len(epochs) < 200 and [r["epoch"] for r in rows] == epochs
    assert (run_dir / "last.pt").exists()
