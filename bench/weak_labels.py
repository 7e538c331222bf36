"""Weak-label step: ours against the release's method, on the CPU (or CUDA if asked).

The release's way: nearest neighbour with ``topk`` on the similarity matrix, copy the
indices to the host, SciPy sparse ``connected_components``, then a dense N x N float mask
(label_i == label_j) back on the device for the loss. Ours: ``wcl.graph`` on the device
(argmax + pointer jumping), and the loss uses the label vector, so no mask is built.

``python bench/weak_labels.py [--sizes 256 1024 4096 16384] [--dim 256] [--repeats 5]``
prints a markdown table of medians and ratios (release / ours) for the labelling alone
(from the similarity matrix) and with the shared similarity product, and writes
runs/bench/weak_labels.json.
"""

import argparse
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from benchkit import save_results
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from wcl.graph import components_of_functional_graph, row_argmax, weak_labels


def similarity(p: torch.Tensor) -> torch.Tensor:
    sim = p @ p.T
    sim.fill_diagonal_(float("-inf"))
    return sim


def release_labels(sim: torch.Tensor) -> torch.Tensor:
    """topk -> host -> SciPy components -> dense float mask on the device: (N, N)."""
    n = sim.shape[0]
    nn_idx = sim.topk(1, dim=1).indices[:, 0].cpu().numpy()
    graph = csr_matrix((np.ones(n), (np.arange(n), nn_idx)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    labels = torch.from_numpy(labels).to(sim.device)
    return (labels[:, None] == labels[None, :]).float()


def our_labels(sim: torch.Tensor) -> torch.Tensor:
    """argmax -> pointer jumping on the device: (N,) label vector."""
    return components_of_functional_graph(row_argmax(sim))


def timed(fn, *args, repeats: int, device: torch.device, min_seconds: float = 0.5) -> float:
    """Median seconds per call over ``repeats`` calls, or more until ``min_seconds`` pass."""
    times = []
    while len(times) < repeats + 1 or sum(times[1:]) < min_seconds:  # call 1 warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for n in args.sizes:
        p = F.normalize(torch.randn(n, args.dim, device=device), dim=1)
        sim = similarity(p)
        same = our_labels(sim)
        mask = release_labels(sim)
        assert torch.equal(mask.bool(), same[:, None] == same[None, :])  # same partition
        row = {"n": n, "dim": args.dim}
        row["release_label_s"] = timed(release_labels, sim, repeats=args.repeats, device=device)
        row["ours_label_s"] = timed(our_labels, sim, repeats=args.repeats, device=device)
        row["release_full_s"] = timed(lambda q: release_labels(similarity(q)), p,
                                      repeats=args.repeats, device=device)  # fmt: skip
        row["ours_full_s"] = timed(weak_labels, p, repeats=args.repeats, device=device)
        row["label_ratio"] = row["release_label_s"] / row["ours_label_s"]
        row["full_ratio"] = row["release_full_s"] / row["ours_full_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| N | labelling: release | ours | ratio | with similarity: release | ours | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n']} | {r['release_label_s'] * 1e3:.3f} ms | {r['ours_label_s'] * 1e3:.3f} ms "
            f"| {r['label_ratio']:.1f}x | {r['release_full_s'] * 1e3:.1f} ms "
            f"| {r['ours_full_s'] * 1e3:.1f} ms | {r['full_ratio']:.2f}x |"
        )
    save_results("weak_labels.json", {"device": str(device), "rows": rows})


if __name__ == "__main__":
    main()
