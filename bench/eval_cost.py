"""Evaluation cost: the release's 80-epoch linear protocol against cached features, and kNN.

``python bench/eval_cost.py CHECKPOINT [--config-suffix small]`` times, through the real
``wcl`` commands on Fashion-MNIST (60,000 / 10,000 images):

- the release protocol (a frozen-backbone pass over augmented images every epoch): one
  and two epochs, so that per-epoch cost and fixed cost separate; 80 epochs extrapolated;
- fast mode: features extracted once, 80 epochs of the linear layer on cached features;
- weighted kNN (k = 200 and 20) from extracted features.

Prints a markdown table with each time and the ratio protocol / fast, and writes
runs/bench/eval_cost.json.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("runs/bench/eval_cost")


def timed(*args: str) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "wcl.cli", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"wcl {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("--config-suffix", default="small")
    args = parser.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    linear = ["linear-eval", "--config", f"linear-{args.config_suffix}", "--checkpoint",
              args.checkpoint, "--set", "run.progress=false"]  # fmt: skip
    one = timed(*linear, "--set", "linear.epochs=1", "--set", f"run.out_dir={OUT}/p1")
    two = timed(*linear, "--set", "linear.epochs=2", "--set", f"run.out_dir={OUT}/p2")
    per_epoch = two - one
    protocol_80 = one + 79 * per_epoch
    fast = timed(*linear, "--fast", "--set", "linear.epochs=80", "--set", f"run.out_dir={OUT}/f")
    knn = timed("knn-eval", "--config", f"knn-{args.config_suffix}", "--checkpoint",
                args.checkpoint, "--set", "run.progress=false", "--set", f"run.out_dir={OUT}/k")  # fmt: skip
    fast_results = json.loads((OUT / "f" / "results.json").read_text())
    row = {"protocol_1_epoch_s": one, "protocol_per_epoch_s": per_epoch,
           "protocol_80_epochs_s_estimated": protocol_80, "fast_80_epochs_s": fast,
           "knn_s": knn, "ratio_protocol_over_fast": protocol_80 / fast,
           "fast_final": fast_results.get("final")}  # fmt: skip
    print(json.dumps(row))
    print("\n| what | time | ratio to fast |")
    print("|---|---|---|")
    print(
        f"| release protocol, 80 epochs (1 + 79 x {per_epoch:.0f} s) | {protocol_80:.0f} s | "
        f"{protocol_80 / fast:.1f}x |"
    )
    print(f"| fast: features once + 80 epochs on the cache | {fast:.0f} s | 1.0x |")
    print(f"| weighted kNN (k = 200, 20) | {knn:.0f} s | {knn / fast:.2f}x |")
    (OUT.parent / "eval_cost.json").write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
