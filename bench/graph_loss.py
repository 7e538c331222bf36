"""Weak labels + graph loss, forward and backward: ours against the release's way.

Release-style: labels through the host (``topk`` -> SciPy), then the supervised contrastive
loss with a dense N x N float positive mask. Ours: ``wcl.losses.weak_label_loss`` (labels on
the device, per-label sums instead of a mask). Both views, swapped labels, one process
holding the whole batch of N rows (d = 128, the projection size).

``python bench/graph_loss.py [--sizes 256 1024 4096 16384]`` runs each (N, path) in a fresh
process and reports the median time of forward + backward and the peak resident memory
the computation adds over its inputs (ru_maxrss minus the resident size just before), with
ratios release / ours. Writes runs/bench/graph_loss.json.
"""

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from benchkit import run_fresh, save_results  # noqa: E402
from train_step import host_weak_labels, mask_supcon  # noqa: E402

from wcl.losses import weak_label_loss  # noqa: E402


def release_graph_loss(p1: torch.Tensor, p2: torch.Tensor, t: float) -> torch.Tensor:
    labels1, labels2 = host_weak_labels(p1), host_weak_labels(p2)
    return (mask_supcon(p1, labels2, t) + mask_supcon(p2, labels1, t)) / 2


def resident_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def run_one(n: int, path: str, dim: int, repeats: int) -> dict:
    torch.manual_seed(0)
    p1 = F.normalize(torch.randn(n, dim), dim=1).requires_grad_()
    p2 = F.normalize(torch.randn(n, dim), dim=1).requires_grad_()
    loss_fn = release_graph_loss if path == "release" else weak_label_loss
    before = resident_mib()
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        loss_fn(p1, p2, 0.1).backward()
        times.append(time.perf_counter() - start)
        p1.grad = p2.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"n": n, "path": path, "step_s": statistics.median(times[1:]),
            "extra_mib": peak - before}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one", nargs=2, metavar=("N", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(int(args.one[0]), args.one[1], args.dim, args.repeats)))
        return
    rows = []
    for n in args.sizes:
        found = {}
        for path in ("release", "ours"):
            found[path] = run_fresh(__file__, "--dim", str(args.dim), "--repeats",
                                    str(args.repeats), "--one", str(n), path)  # fmt: skip
        row = {"n": n, "release": found["release"], "ours": found["ours"],
               "time_ratio": found["release"]["step_s"] / found["ours"]["step_s"],
               "memory_ratio": found["release"]["extra_mib"] / found["ours"]["extra_mib"]}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| N | time: release | ours | ratio | added memory: release | ours | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rel, ours = r["release"], r["ours"]
        print(
            f"| {r['n']} | {rel['step_s'] * 1e3:.1f} ms | {ours['step_s'] * 1e3:.1f} ms | "
            f"{r['time_ratio']:.2f}x | {rel['extra_mib']:.0f} MiB | {ours['extra_mib']:.0f} MiB "
            f"| {r['memory_ratio']:.1f}x |"
        )
    save_results("graph_loss.json", rows)


if __name__ == "__main__":
    main()
