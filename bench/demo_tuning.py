"""Demo-preset tuning on Fashion-MNIST: pre-train one variant, then measure it as the demo does.

``python bench/demo_tuning.py NAME [--set key=value ...]`` pre-trains the fashion-mnist-demo
preset with the overrides into runs/tuning/NAME, then appends one JSON line to
runs/tuning/results.jsonl: wall time, throughput, and kNN (k=200 and k=20) and linear-probe
top-1 on the 10,000 test images, with the full 60,000 training images as the bank. The
figures in BENCHMARKS.md ("Demo tuning") come from these lines.
"""

import argparse
import json
import time
from pathlib import Path

from wcl.config import load_config
from wcl.data import build_dataset, dataset_stats, eval_pipeline
from wcl.demo import backbone_or_random, evaluate_features
from wcl.eval import extract_features
from wcl.train import pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    out = Path("runs/tuning") / args.name
    cfg = load_config("fashion-mnist-demo", [*args.set, f"train.out_dir={out}"])
    start = time.perf_counter()
    pretrain(cfg, resume="auto")
    seconds = time.perf_counter() - start
    d = cfg.data
    train_set = build_dataset(d.dataset, d.root, train=True, channels=d.channels)
    test_set = build_dataset(d.dataset, d.root, train=False, channels=d.channels)
    transform = eval_pipeline(d.image_size, *dataset_stats(d.dataset, d.channels))
    net = backbone_or_random(cfg, out / "last.pt")
    train = extract_features(net, train_set, transform, batch_size=512)
    test = extract_features(net, test_set, transform, batch_size=512)
    scores = evaluate_features(train, test, 10, cfg.train.seed)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    speed = [r["images_per_s"] for r in rows if "images_per_s" in r]
    record = {"name": args.name, "overrides": args.set, "pretrain_s": round(seconds, 1),
              "images_per_s": round(sorted(speed)[len(speed) // 2], 1), **scores}  # fmt: skip
    with open("runs/tuning/results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
