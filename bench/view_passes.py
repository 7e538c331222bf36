"""One network pass per view (the default) against one pass over both views, per WCL step.

``python bench/view_passes.py`` times forward + backward of the whole WCL model (both
views, both losses) for the demo network (ResNet-10 width 32, 28 px, batch 256) and
ResNet-50 at 64 px (batch 32), channels_last, with ``model.concat_views`` off and on,
alternating the two over 2 rounds in one process, median of 6 steps each. Ratio =
per view / one pass (above 1: the single pass is faster). Writes
runs/bench/view_passes.json.
"""

import json
import statistics

import torch
from benchkit import median_seconds, save_results
from layout import NETS

from wcl.backbones import build_backbone
from wcl.model import WCL


def step_seconds(spec: tuple, concat: bool, steps: int = 6) -> float:
    arch, stem, channels, width, hidden, batch, size = spec
    torch.manual_seed(0)
    backbone = build_backbone(arch, stem, channels, width)
    model = WCL(backbone, backbone.feature_dim, hidden, 128, concat_views=concat)
    model = model.to(memory_format=torch.channels_last)
    x1 = torch.randn(batch, channels, size, size).to(memory_format=torch.channels_last)
    x2 = torch.randn_like(x1).to(memory_format=torch.channels_last)
    return median_seconds(lambda: model(x1, x2)["loss"].backward(), steps, warmup=2)


def main() -> None:
    rows = []
    for name, spec in NETS.items():
        found: dict[str, list[float]] = {"per_view": [], "one_pass": []}
        for _ in range(2):
            found["per_view"].append(step_seconds(spec, concat=False))
            found["one_pass"].append(step_seconds(spec, concat=True))
        row = {"net": name} | {k: statistics.median(v) for k, v in found.items()}
        row["ratio"] = row["per_view"] / row["one_pass"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| network | per view | one pass | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['net']} | {r['per_view'] * 1e3:.0f} ms | "
              f"{r['one_pass'] * 1e3:.0f} ms | {r['ratio']:.2f}x |")  # fmt: skip
    save_results("view_passes.json", rows)


if __name__ == "__main__":
    main()
