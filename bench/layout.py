"""Convolution memory layout on the CPU: channels_last against the default, per WCL step.

``python bench/layout.py`` times forward + backward of the whole WCL model (both views,
both losses) for the demo network (ResNet-10 width 32, 28 px, batch 256) and ResNet-50 at
64 px (batch 32), in the default (contiguous) layout and in channels_last, alternating the
two over 2 rounds in one process, median of 6 steps each. Ratio = contiguous /
channels_last (above 1: channels_last faster). ``train.channels_last`` (default on) picks
the layout for pre-training. Writes runs/bench/layout.json.
"""

import json
import statistics

import torch
from benchkit import median_seconds, save_results

from wcl.backbones import build_backbone
from wcl.model import WCL

NETS = {
    "demo (ResNet-10 w32, 28 px, batch 256)": ("resnet10", "small-s2", 1, 32, 512, 256, 28),
    "ResNet-50, 64 px, batch 32": ("resnet50", "imagenet", 3, 64, 1024, 32, 64),
}


def step_seconds(spec: tuple, layout: torch.memory_format, steps: int = 6) -> float:
    arch, stem, channels, width, hidden, batch, size = spec
    torch.manual_seed(0)
    backbone = build_backbone(arch, stem, channels, width)
    model = WCL(backbone, backbone.feature_dim, hidden, 128).to(memory_format=layout)
    x1 = torch.randn(batch, channels, size, size).to(memory_format=layout)
    x2 = torch.randn_like(x1).to(memory_format=layout)
    return median_seconds(lambda: model(x1, x2)["loss"].backward(), steps, warmup=2)


def main() -> None:
    rows = []
    for name, spec in NETS.items():
        found: dict[str, list[float]] = {"contiguous": [], "channels_last": []}
        for _ in range(2):
            found["contiguous"].append(step_seconds(spec, torch.contiguous_format))
            found["channels_last"].append(step_seconds(spec, torch.channels_last))
        row = {"net": name} | {k: statistics.median(v) for k, v in found.items()}
        row["ratio"] = row["contiguous"] / row["channels_last"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| network | contiguous | channels_last | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['net']} | {r['contiguous'] * 1e3:.0f} ms | "
              f"{r['channels_last'] * 1e3:.0f} ms | {r['ratio']:.2f}x |")  # fmt: skip
    save_results("layout.json", rows)


if __name__ == "__main__":
    main()
