"""Bench scripts that reach into the library (swapping a module attribute for the old way)
break silently when the library moves; running them here makes that a test failure."""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "bench"


def test_batch_params_runs_against_the_current_library(tmp_path):
    env = os.environ | {"PYTHONPATH": str(BENCH.parent / "src")}
    subprocess.run([sys.executable, str(BENCH / "batch_params.py")], cwd=tmp_path, env=env,
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    rows = json.loads((tmp_path / "runs" / "bench" / "batch_params.json").read_text())
    assert [r["batch"] for r in rows] == [256, 512, 1024]
    assert all(r["baseline_ms"] > 0 and r["ours_ms"] > 0 for r in rows)
