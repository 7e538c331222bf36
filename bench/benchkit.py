"""Plumbing shared by the bench scripts: where results go, and runs in a fresh process."""

import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path("runs/bench")


def save_results(name: str, data: object) -> Path:
    """Write ``data`` as JSON to runs/bench/``name`` and return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(data, indent=2))
    return path


def run_fresh(script: str, *args: str) -> dict:
    """Run ``script`` with ``args`` in a new Python process (so that its peak memory is its
    own) and return the JSON object it printed on its last line."""
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])
