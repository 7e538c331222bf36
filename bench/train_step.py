"""Whole training step on the CPU: ours against a release-style path, time and peak memory.

Release-style: float32, weak labels on the host (``topk`` -> copy to host -> SciPy
``connected_components``), a dense N x N float positive mask for the supervised contrastive
loss, NT-Xent as plain cross-entropy over the full logits, and the ``release`` gather mode. Ours: ``wcl.WCL`` as shipped (labels on the device,
the loss from a label vector), in float32 and, as a third path, under bfloat16 autocast
(``train.amp=bf16``; fast only on CPUs with native bf16 arithmetic, AVX512-BF16 or AMX, and
the table says whether this one has it). Same backbone, heads, data and optimiser (LARS).

``python bench/train_step.py`` runs each (model, path) pair in its own process, so that the
peak resident memory (ru_maxrss) of each is its own, alternating the paths over three
rounds (median round kept), and prints a markdown table with
ratios release / each path. Models: the demo preset (ResNet-10 width 32, 28 px greyscale, batch
256) and ResNet-50 at 64 px RGB (batch 64). Writes runs/bench/train_step.json.
"""

import argparse
import json
import resource

import numpy as np
import torch
import torch.nn.functional as F
from benchkit import median_of_fresh_runs, median_seconds, save_results
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from wcl.backbones import build_backbone
from wcl.model import WCL
from wcl.optim import LARS, param_groups
from wcl.precision import cpu_has_native_bf16

MODELS = {
    "demo": {"backbone": "resnet10", "stem": "small-s2", "width": 32, "channels": 1, "size": 28,
             "batch": 256, "hidden": 512, "out": 128},
    "demo-b2048": {"backbone": "resnet10", "stem": "small-s2", "width": 32, "channels": 1,
                   "size": 28, "batch": 2048, "hidden": 512, "out": 128},
    "resnet50-64px": {"backbone": "resnet50", "stem": "imagenet", "width": 64, "channels": 3,
                      "size": 64, "batch": 64, "hidden": 4096, "out": 256},
}  # fmt: skip


def host_weak_labels(p: torch.Tensor, k: int = 1) -> torch.Tensor:
    """The release's labelling: nearest neighbour on the device, components on the host."""
    with torch.no_grad():
        sim = p @ p.T
        sim.fill_diagonal_(float("-inf"))
        nn_idx = sim.topk(1, dim=1).indices[:, 0].cpu().numpy()
        n = len(nn_idx)
        graph = csr_matrix((np.ones(n), (np.arange(n), nn_idx)), shape=(n, n))
        _, labels = connected_components(graph, directed=False)
    return torch.from_numpy(labels).to(p.device)


def mask_supcon(anchors: torch.Tensor, labels: torch.Tensor, t: float) -> torch.Tensor:
    """Supervised contrast with a dense N x N float positive mask (the release's way)."""
    n = anchors.shape[0]
    logits = anchors @ anchors.T / t
    eye = torch.eye(n, device=anchors.device)
    mask = (labels[:, None] == labels[None, :]).float() - eye
    logits = logits - 1e9 * eye
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return (-(mask * log_prob).sum(1) / mask.sum(1).clamp(min=1)).mean()


def plain_instance_loss(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """NT-Xent as the release computes it: the full 2N x 2N logits, self masked, then
    cross-entropy (which keeps the whole log-softmax for backward)."""
    z = torch.cat([z1, z2]).float()
    n = len(z1)
    logits = z @ z.T / t
    logits = logits - 1e9 * torch.eye(2 * n, device=z.device)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def release_forward(model: WCL, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    z1, p1 = model.embed(x1)
    z2, p2 = model.embed(x2)
    inst = plain_instance_loss(z1, z2, model.temperature)
    labels1, labels2 = host_weak_labels(p1), host_weak_labels(p2)
    graph = (
        mask_supcon(p1, labels2, model.temperature) + mask_supcon(p2, labels1, model.temperature)
    ) / 2
    return inst + graph


PATHS = ("release", "ours", "ours-bf16")


def build(model_name: str, gather_mode: str = "exact") -> tuple[WCL, LARS]:
    """A freshly seeded WCL of ``MODELS[model_name]`` and its LARS optimiser."""
    spec = MODELS[model_name]
    torch.manual_seed(0)
    backbone = build_backbone(spec["backbone"], spec["stem"], spec["channels"], spec["width"])
    model = WCL(backbone, backbone.feature_dim, spec["hidden"], spec["out"],
                gather_mode=gather_mode)  # fmt: skip
    return model, LARS(param_groups(model, 1e-6), lr=0.1)


def run_one(model_name: str, path: str, steps: int) -> dict:
    spec = MODELS[model_name]
    model, optimizer = build(model_name, "release" if path == "release" else "exact")
    x1 = torch.randn(spec["batch"], spec["channels"], spec["size"], spec["size"])
    x2 = torch.randn_like(x1)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=path == "ours-bf16"):
            loss = release_forward(model, x1, x2) if path == "release" else model(x1, x2)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = median_seconds(step, steps, warmup=2)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"model": model_name, "path": path, "step_s": seconds,
            "peak_rss_mib": peak_kib / 1024}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, args.steps)))
        return
    rows = []
    for model_name in args.models:
        medians = median_of_fresh_runs(
            __file__,
            [["--steps", str(args.steps), "--one", model_name, path] for path in PATHS],
            args.rounds,
            "step_s",
        )
        pair = dict(zip(PATHS, medians, strict=True))
        release = pair["release"]
        row = {"model": model_name, **pair}
        for path in PATHS[1:]:
            row[f"{path}_time_ratio"] = release["step_s"] / pair[path]["step_s"]
            row[f"{path}_memory_ratio"] = release["peak_rss_mib"] / pair[path]["peak_rss_mib"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nnative bf16 on this CPU: {cpu_has_native_bf16()}")
    print("\n| model | path | step | ratio | peak RSS | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for path in PATHS:
            time_ratio = r.get(f"{path}_time_ratio", 1.0)
            memory_ratio = r.get(f"{path}_memory_ratio", 1.0)
            print(
                f"| {r['model']} | {path} | {r[path]['step_s'] * 1e3:.0f} ms | "
                f"{time_ratio:.2f}x | {r[path]['peak_rss_mib']:.0f} MiB | {memory_ratio:.2f}x |"
            )
    save_results("train_step.json", {"native_bf16": cpu_has_native_bf16(), "rows": rows})


if __name__ == "__main__":
    main()
