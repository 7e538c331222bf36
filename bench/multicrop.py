"""What multi-crop costs: a training step with V small crops against the two-view step.

``python bench/multicrop.py`` times ``wcl.WCL``'s whole step (forward, backward, LARS) on
the CPU with the two full-size views alone (the baseline, V = 0) and with V extra small
crops at ``96 / 224`` of the full size (``data.small_crops`` with its default size), each
(model, V) in its own process so that the peak resident memory is its own, alternating
over three rounds (median round kept). Prints a markdown table of step time and peak
memory as ratios to the two-view step of the same model. Models: the demo preset
(ResNet-10 width 32, 28 px greyscale, batch 256; small crops 12 px) and ResNet-50 at 64 px
RGB (batch 64; small crops 27 px). Writes runs/bench/multicrop.json.
"""

import argparse
import json
import resource

import torch
from benchkit import median_of_fresh_runs, median_seconds, save_results
from train_step import MODELS, build

CROPS = {"demo": (0, 2, 6), "resnet50-64px": (0, 2, 6)}


def run_one(model_name: str, small_crops: int, steps: int) -> dict:
    spec = MODELS[model_name]
    model, optimizer = build(model_name)
    b, c, size = spec["batch"], spec["channels"], spec["size"]
    small_size = round(size * 96 / 224)
    x1, x2 = torch.randn(b, c, size, size), torch.randn(b, c, size, size)
    small = torch.randn(small_crops * b, c, small_size, small_size) if small_crops else None

    def step() -> None:
        loss = model(x1, x2, small=small)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = median_seconds(step, steps, warmup=2)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"model": model_name, "small_crops": small_crops, "small_size": small_size,
            "step_s": seconds, "peak_rss_mib": peak_kib / 1024}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", nargs="+", choices=list(CROPS), default=list(CROPS))
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "V"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.steps)))
        return
    rows = []
    for model_name in args.models:
        crops = CROPS[model_name]
        medians = median_of_fresh_runs(
            __file__,
            [["--steps", str(args.steps), "--one", model_name, str(v)] for v in crops],
            args.rounds,
            "step_s",
        )
        median = dict(zip(crops, medians, strict=True))
        base = median[0]
        for row in median.values():
            row["time_ratio"] = row["step_s"] / base["step_s"]
            row["memory_ratio"] = row["peak_rss_mib"] / base["peak_rss_mib"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| model | small crops | step | x two views | peak RSS | x two views |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        crops = f"{r['small_crops']} x {r['small_size']} px" if r["small_crops"] else "none"
        print(
            f"| {r['model']} | {crops} | {r['step_s'] * 1e3:.0f} ms | {r['time_ratio']:.2f}x | "
            f"{r['peak_rss_mib']:.0f} MiB | {r['memory_ratio']:.2f}x |"
        )
    save_results("multicrop.json", {"rows": rows})


if __name__ == "__main__":
    main()
