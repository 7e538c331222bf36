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
from collections.abc import Callable

import torch
from benchkit import median_seconds, save_results

from wcl.backbones import build_backbone
from wcl.model import WCL

NETS = {
    "demo (ResNet-10 w32, 28 px, batch 256)": ("resnet10", "small-s2", 1, 32, 512, 256, 28),
    "ResNet-50, 64 px, batch 32": ("resnet50", "imagenet", 3, 64, 1024, 32, 64),
}


def step_seconds(
    spec: tuple,
    layout: torch.memory_format = torch.channels_last,
    concat_views: bool = False,
    steps: int = 6,
) -> float:
    """Median seconds of forward + backward of the whole WCL model on random views."""
    arch, stem, channels, width, hidden, batch, size = spec
    torch.manual_seed(0)
    backbone = build_backbone(arch, stem, channels, width)
    model = WCL(backbone, backbone.feature_dim, hidden, 128, concat_views=concat_views)
    model = model.to(memory_format=layout)
    x1 = torch.randn(batch, channels, size, size).to(memory_format=layout)
    x2 = torch.randn_like(x1).to(memory_format=layout)
    return median_seconds(lambda: model(x1, x2)["loss"].backward(), steps, warmup=2)


def compare_steps(variants: dict[str, Callable[[tuple], float]], out_name: str) -> list[dict]:
    """For every network, the step time of two variants (name -> measure(spec)),
    alternated over 2 rounds; rows with each median and ratio = first / second, printed
    as JSON lines and a markdown table, saved to runs/bench/``out_name``."""
    (first, measure_first), (second, measure_second) = variants.items()
    rows = []
    for name, spec in NETS.items():
        found: dict[str, list[float]] = {first: [], second: []}
        for _ in range(2):
            found[first].append(measure_first(spec))
            found[second].append(measure_second(spec))
        row = {"net": name} | {k: statistics.median(v) for k, v in found.items()}
        row["ratio"] = row[first] / row[second]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n| network | {first.replace('_', ' ')} | {second.replace('_', ' ')} | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['net']} | {r[first] * 1e3:.0f} ms | "
              f"{r[second] * 1e3:.0f} ms | {r['ratio']:.2f}x |")  # fmt: skip
    save_results(out_name, rows)
    return rows


def main() -> None:
    compare_steps(
        {"contiguous": lambda spec: step_seconds(spec, torch.contiguous_format),
         "channels_last": lambda spec: step_seconds(spec, torch.channels_last)},
        "layout.json",
    )  # fmt: skip


if __name__ == "__main__":
    main()
