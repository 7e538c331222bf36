"""The study of bench/study.py on one GPU, every (arm, seed) at once, inside a time budget.

    mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/
    PYTHONPATH=src python3 bench/study_gpu.py --budget-s 480        # on the GPU machine
    python bench/study_gpu.py --dry-run                             # rehearsal on the CPU

Made for a lent GPU (one call of the device tool, with ``carry: ["data/fashion-mnist"]``,
an ignored folder holding Fashion-MNIST's four IDX files, about 30 MB). It starts one
``bench/study.py run`` process per (arm, seed) on the GPU at the same time (the demo
network is small, so one process alone would leave most of the GPU idle), with the study's
arms, preset and measurements, ``--epochs`` epochs and a checkpoint every ``--every``.
``--reserve-s`` before the budget ends each process gets SIGTERM: it writes ``last.pt``,
measures the epoch checkpoints it has and exits 75; at the budget the rest is killed.
Run directories go to ``runs/study-gpu`` (kept on a warm machine, so a second call
resumes); result lines to ``$OUT/study-gpu.jsonl`` (merged from one file per process),
the summary table to ``$OUT/study-gpu.md`` and the figure beside it. Only the standard
library here; bench/study.py needs torch, torchvision, PyYAML, tqdm and SciPy, which the
GPU machine's image has.

``--dry-run`` runs the same on the CPU with 512 training images, one epoch, batch 64 and
500 measured images per split, so that a mistake costs a test here
(tests/test_bench_scripts.py), not device time.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARMS = ("simclr", "exact", "release")
DRY_RUN = ["data.subset=512", "train.batch_size=64", "train.device=cpu"]


def _lane(arm: str, seed: int, args: argparse.Namespace, out: Path) -> list[str]:
    """The bench/study.py command line of one (arm, seed)."""
    overrides = [f"data.root={args.data}", "data.workers=0", *args.set]
    overrides += DRY_RUN if args.dry_run else ["train.device=cuda"]
    command = [sys.executable, str(HERE / "study.py"), "run", "--arms", arm,
               "--seeds", str(seed), "--epochs", str(args.epochs), "--every", str(args.every),
               "--threads", str(args.threads), "--out", str(args.runs),
               "--results", str(out / f"study-gpu-{arm}-{seed}.jsonl"), "--set", *overrides]  # fmt: skip
    if args.dry_run:
        command += ["--eval-subset", "500"]
    return command


def _wait(lanes: dict, budget_s: float, reserve_s: float) -> dict:
    """Wait for every lane; SIGTERM at budget - reserve, SIGKILL at the budget."""
    start = time.monotonic()
    termed = False
    while any(p.poll() is None for p in lanes.values()):
        elapsed = time.monotonic() - start
        if elapsed > budget_s:
            for p in lanes.values():
                p.kill()
        elif elapsed > budget_s - reserve_s and not termed:
            for p in lanes.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            termed = True
        time.sleep(1)
    return {name: p.returncode for name, p in lanes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=480)
    parser.add_argument("--reserve-s", type=float, default=120,
                        help="seconds before the budget to stop training and measure")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per process")
    parser.add_argument("--data", default="data/fashion-mnist")
    parser.add_argument("--runs", default="runs/study-gpu")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if args.dry_run:
        args.epochs, args.every, args.threads = 1, 1, 1
        if not Path(args.data).is_dir():
            args.data = "/usr/share/datasets/fashion-mnist"
    if not any(Path(args.data).glob("train-images-idx3-ubyte*")):
        sys.exit(f"bench/study_gpu.py: no Fashion-MNIST IDX files in {args.data} (see --help)")
    out = Path(os.environ.get("OUT", "runs/bench"))
    out.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"PYTHONPATH": str(HERE.parent / "src"), "PYTHONUNBUFFERED": "1"}
    lanes = {}
    for arm in args.arms:
        for seed in args.seeds:
            log = (out / f"study-gpu-{arm}-{seed}.log").open("a")
            lanes[(arm, seed)] = subprocess.Popen(
                _lane(arm, seed, args, out), stdout=log, stderr=subprocess.STDOUT, env=env
            )
    codes = _wait(lanes, args.budget_s, args.reserve_s)
    for (arm, seed), code in sorted(codes.items()):
        print(f"{arm} seed {seed}: exit {code}")
    merged = out / "study-gpu.jsonl"
    merged.write_text("".join(p.read_text() for p in sorted(out.glob("study-gpu-*-*.jsonl"))))
    summary = subprocess.run(
        [sys.executable, str(HERE / "study.py"), "summary", "--out", str(args.runs),
         "--results", str(merged)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    (out / "study-gpu.md").write_text(summary.stdout + summary.stderr)
    print(summary.stdout + summary.stderr)
    sys.exit(0 if all(c in (0, 75) for c in codes.values()) and summary.returncode == 0 else 1)


if __name__ == "__main__":
    main()
