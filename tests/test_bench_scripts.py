"""Bench scripts that reach into the library (swapping a module attribute for the old way)
break silently when the library moves; running them here makes that a test failure."""

import json
import os
import subprocess
import sys
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
