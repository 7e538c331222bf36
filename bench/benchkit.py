"""Plumbing shared by the bench scripts: timing, where results go, runs in a fresh process."""

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path("runs/bench")


def median_seconds(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``reps`` calls of ``fn``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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


def median_of_fresh_runs(script: str, variants: list[list[str]], rounds: int, key: str) -> list:
    """For each argument list in ``variants``, the run (a :func:`run_fresh` result) with the
    median ``key`` over ``rounds`` rounds. The variants alternate within a round, so that
    drift in the machine's load falls on all of them alike."""
    runs: list[list[dict]] = [[] for _ in variants]
    for _ in range(rounds):
        for found, args in zip(runs, variants, strict=True):
            found.append(run_fresh(script, *args))
    return [sorted(found, key=lambda r: r[key])[len(found) // 2] for found in runs]
