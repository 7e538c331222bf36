"""Does WCL beat SimCLR here? Three arms on one budget, several seeds, evaluated on the way.

    python bench/study.py run [--arms simclr exact release] [--seeds 0 1] [--epochs 30]
    python bench/study.py summary          # table (markdown) and figure from the results

Results are keyed by study (the name of ``--out``), arm, seed and epoch; a variant study
(other ``--set`` overrides) takes its own ``--out``.

``run`` pre-trains the fashion-mnist-demo preset's network on all 60,000 Fashion-MNIST
training images, once per (arm, seed), for ``--epochs`` epochs on one schedule (warm-up
and cosine over the whole run), keeping a checkpoint every ``--every`` epochs. Arms:
``simclr`` (graph weight 0), ``exact`` (WCL, full gradient) and ``release`` (WCL with the
authors' gradient paths, ``model.gather: release``). Each checkpoint is then measured on
the 10,000 test images as the demo measures (weighted kNN k = 200 and 20 with T = 0.07,
linear probe on cached standardised features), and one JSON line per (arm, seed, epoch)
is appended to ``--results`` with the weak-label precision of that epoch and the commit.

Everything resumes: a pre-training continues from its ``last.pt``, and a measured
(arm, seed, epoch) is not measured again, so the same command picks up where a killed
run stopped. Arms run seed by seed (every arm of seed 0 first), so a partial study is
balanced. ``--threads 1`` leaves a core free on a 2-core machine. A pre-training stopped
by SIGTERM/SIGUSR1 (``wcl.preemption.Preempted``) still has its epoch checkpoints measured, then
the script exits with status 75; bench/study_gpu.py relies on that to end inside a budget.
``--eval-subset N`` measures on the first N training and test images only (rehearsals).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from wcl.config import Config, load_config
from wcl.data import build_dataset, dataset_stats, eval_pipeline
from wcl.demo import backbone_or_random, evaluate_features
from wcl.eval import extract_features
from wcl.preemption import Preempted
from wcl.train import pretrain

ARMS = {
    "simclr": ["model.graph_weight=0"],
    "exact": ["model.gather=exact"],
    "release": ["model.gather=release"],
}
RESULTS = Path("bench/results/study-fashion-mnist.jsonl")
METRICS = ("knn_top1", "knn20_top1", "linear_top1")


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def _config(arm: str, seed: int, args: argparse.Namespace) -> Config:
    out = Path(args.out) / f"{arm}-seed{seed}"
    overrides = [
        *ARMS[arm],
        f"train.seed={seed}",
        f"train.epochs={args.epochs}",
        f"train.out_dir={out}",
        f"train.checkpoint_every={args.every}",
        "train.knn_every=0",  # measured offline below, on the full test split
        "train.log_every=50",
        *args.set,
    ]
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    return load_config(args.preset, overrides)


def _rows(path: Path, study: str | None = None) -> list[dict]:
    """The result lines of ``path`` (of one study, if named)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if study is None or r["study"] == study]


def _epoch_stats(run_dir: Path, epoch: int) -> dict[str, float]:
    """Mean weak-label statistics and losses over the metric lines of one epoch."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("epoch") == epoch and "loss" in r]
    keys = ("loss", "instance_loss", "graph_loss", "precision", "components", "images_per_s")
    return {k: statistics.fmean(r[k] for r in rows) for k in keys if rows and k in rows[0]}


def _measured_sets(cfg: Config, eval_subset: int | None) -> tuple:
    """The training and test splits the checkpoints are measured on (the first
    ``eval_subset`` images of each, if given) and the number of classes."""
    d = cfg.data
    train, test = (
        build_dataset(d.dataset, d.root, train=split, channels=d.channels)
        for split in (True, False)
    )
    num_classes = len(train.classes)
    if eval_subset:
        train, test = (Subset(s, range(min(eval_subset, len(s)))) for s in (train, test))
    return train, test, num_classes


def run(args: argparse.Namespace) -> None:
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    commit = _commit()
    for seed in args.seeds:
        for arm in args.arms:
            cfg = _config(arm, seed, args)
            run_dir = Path(cfg.train.out_dir)
            tick = time.perf_counter()
            try:
                pretrain(cfg, resume="auto")
            except Preempted as stop:  # measure what exists, then stop (status 75)
                print(f"{arm} seed {seed}: {stop}", flush=True)
                _measure(args, arm, seed, cfg, run_dir, results, commit)
                sys.exit(75)
            print(f"{arm} seed {seed}: pre-trained in {time.perf_counter() - tick:.0f} s")
            _measure(args, arm, seed, cfg, run_dir, results, commit)


def _measure(
    args: argparse.Namespace,
    arm: str,
    seed: int,
    cfg: Config,
    run_dir: Path,
    results: Path,
    commit: str,
):
    """One result line per epoch checkpoint of ``run_dir`` not measured yet."""
    d = cfg.data
    train_set, test_set, num_classes = _measured_sets(cfg, args.eval_subset)
    transform = eval_pipeline(d.image_size, *dataset_stats(d.dataset, d.channels))
    device = "cuda" if cfg.train.device == "cuda" else "cpu"
    study = Path(args.out).name
    done = {(r["arm"], r["seed"], r["epoch"]) for r in _rows(results, study)}
    for ckpt in sorted(run_dir.glob("epoch-*.pt")):
        epoch = int(ckpt.stem.split("-")[1])
        if (arm, seed, epoch) in done:
            continue
        net = backbone_or_random(cfg, ckpt)
        train = extract_features(net, train_set, transform, 512, device)
        test = extract_features(net, test_set, transform, 512, device)
        train, test = [(f.cpu(), t.cpu()) for f, t in (train, test)]
        scores = evaluate_features(train, test, num_classes, seed)
        row = {
            "study": study,
            "arm": arm,
            "seed": seed,
            "epoch": epoch,
            "epochs": cfg.train.epochs,
        }
        row |= {k: round(scores[k], 2) for k in METRICS}
        row |= {f"train_{k}": round(v, 4) for k, v in _epoch_stats(run_dir, epoch).items()}
        row |= {"preset": args.preset, "overrides": args.set, "commit": commit,
                "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}  # fmt: skip
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def _table(rows: list[dict]) -> tuple[str, dict]:
    """Markdown table of mean ± sd over seeds per (arm, epoch), and the grouped values."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["epoch"]), []).append(r)
    lines = [
        "| arm | epoch | seeds | kNN k=200 | kNN k=20 | linear | weak-label precision |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.2f}"
        return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"

    for (arm, epoch), found in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        precision = [r["train_precision"] for r in found if "train_precision" in r]
        lines.append(
            f"| {arm} | {epoch} | {len(found)} | "
            + " | ".join(cell([r[m] for r in found]) for m in METRICS)
            + f" | {cell(precision) if precision else '-'} |"
        )
    return "\n".join(lines), groups


def _differences(groups: dict, a: str, b: str) -> list[str]:
    """a - b per epoch and metric, paired by seed: mean, and the per-seed values."""
    out = []
    for (arm, epoch), found in sorted(groups.items(), key=lambda kv: kv[0][1]):
        if arm != a or (b, epoch) not in groups:
            continue
        other = {r["seed"]: r for r in groups[(b, epoch)]}
        pairs = [(r, other[r["seed"]]) for r in found if r["seed"] in other]
        if not pairs:
            continue
        parts = []
        for m in METRICS:
            diffs = [x[m] - y[m] for x, y in pairs]
            parts.append(
                f"{m} {statistics.fmean(diffs):+.2f} ({', '.join(f'{d:+.2f}' for d in diffs)})"
            )
        out.append(f"- {a} - {b}, epoch {epoch}, {len(pairs)} seed(s): " + "; ".join(parts))
    return out


def summary(args: argparse.Namespace) -> None:
    rows = _rows(Path(args.results), Path(args.out).name)
    table, groups = _table(rows)
    print(table + "\n")
    for a, b in (("exact", "simclr"), ("release", "simclr"), ("exact", "release")):
        print("\n".join(_differences(groups, a, b)))
    _figure(groups, Path(args.results).with_name(f"{Path(args.out).name}-fashion-mnist.png"))


def _figure(groups: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.4))
    titles = {"knn_top1": "kNN k=200", "knn20_top1": "kNN k=20", "linear_top1": "linear probe"}
    for ax, metric in zip(axes, METRICS, strict=True):
        for arm in ARMS:
            epochs = sorted(e for a, e in groups if a == arm)
            if not epochs:
                continue
            values = [[r[metric] for r in groups[(arm, e)]] for e in epochs]
            mean = [statistics.fmean(v) for v in values]
            ax.plot(epochs, mean, marker="o", label=arm)
            ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
        ax.set_title(f"{titles[metric]} (test top-1, %)")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Fashion-MNIST, demo network: mean over seeds, band = min-max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("command", choices=("run", "summary"))
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--every", type=int, default=6, help="epochs between measured checkpoints")
    parser.add_argument("--preset", default="fashion-mnist-demo")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides for every arm")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/study")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--eval-subset", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    run(args) if args.command == "run" else summary(args)


if __name__ == "__main__":
    main()
