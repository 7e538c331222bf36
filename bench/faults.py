"""Fault injection: what a cluster and a careless user do to a run, and what is left after.

    python bench/faults.py [--kills 10] [--out runs/faults] [--skip-disk-full]

Runs real ``wcl`` processes on the committed Fashion-MNIST fixture (tiny network, a
checkpoint every step so that many kills land inside a save) and prints a table:
- kill -9 at a random moment, then ``--resume auto`` to the end: the final weights
  against an uninterrupted run's (bitwise), and whether ``last.pt`` always loaded;
- two runs started on one run directory: the second is refused, the first finishes;
- SIGTERM during start-up (before the first step): exit 75 and a ``preempted`` file;
- disk full: the run directory on a 3 MiB tmpfs (needs root and mount; else reported
  as not run): one line naming the file, exit 1, the previous checkpoint intact;
- the bad-input corpus: each input must give exit status 1 or 2 and exactly one line
  on stderr, "wcl: ...", with no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "fashion-idx"
WCL = [sys.executable, "-c", "import sys; from wcl.cli import main; sys.exit(main())"]
TINY = [f"data.root={FIXTURE}", "data.workers=0", "data.augment=loader", "model.width=8",
        "model.hidden_dim=32", "model.out_dim=16", "train.epochs=3", "train.batch_size=64",
        "train.knn_every=0", "optim.warmup_epochs=1", "train.log_every=1"]  # fmt: skip


def pretrain_argv(out: Path, *extra: str) -> list[str]:
    argv = [*WCL, "pretrain", "--config", "fashion-mnist-demo"]
    for key in (*TINY, f"train.out_dir={out}", *extra):
        argv += ["--set", key]
    return argv


def run(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "last.pt", weights_only=True)["model"]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def kill_trials(base: Path, count: int, rng: random.Random) -> dict:
    reference = base / "reference"
    done = run(pretrain_argv(reference, "train.checkpoint_every_steps=1"))
    assert done.returncode == 0, done.stderr[-2000:]
    started = time.perf_counter()
    run(pretrain_argv(base / "timing", "train.checkpoint_every_steps=1"))
    seconds = time.perf_counter() - started
    want = weights(reference)
    equal = loadable = in_save = 0
    for trial in range(count):
        out = base / f"kill-{trial}"
        proc = subprocess.Popen(pretrain_argv(out, "train.checkpoint_every_steps=1"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        if trial % 2:  # at a random moment
            time.sleep(rng.uniform(0.3, 0.9) * seconds)
        else:  # inside a save: as soon as a temporary checkpoint exists, after a random delay
            time.sleep(rng.uniform(0.2, 0.8) * seconds)
            while proc.poll() is None and not list(out.glob(".tmp-*")):
                time.sleep(0.0005)
        saving = bool(list(out.glob(".tmp-*")))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        in_save += saving
        if (out / "last.pt").exists():
            try:
                torch.load(out / "last.pt", weights_only=True)
                loadable += 1
            except Exception:  # a corrupt checkpoint: counted as not loadable
                pass
        else:
            loadable += 1  # killed before the first save: nothing to lose
        resumed = run(pretrain_argv(out, "train.checkpoint_every_steps=1") + ["--resume", "auto"])
        equal += resumed.returncode == 0 and same(weights(out), want)
    return {"trials": count, "killed during a save": in_save, "last.pt loadable": loadable,
            "resumed bitwise equal": equal}  # fmt: skip


def two_runs(base: Path) -> dict:
    out = base / "shared"
    first = subprocess.Popen(pretrain_argv(out), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(2.0)
    second = run(pretrain_argv(out) + ["--resume", "auto"])
    first.wait()
    refused = second.returncode == 2 and "is in use by" in second.stderr
    return {
        "trials": 1,
        "second refused": int(refused),
        "first finished": int(first.returncode == 0),
    }


def start_up_signal(base: Path) -> dict:
    out = base / "startup"
    proc = subprocess.Popen(pretrain_argv(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    time.sleep(1.0)  # importing torch, reading the data, building the model
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    marked = (out / "preempted").exists()
    return {"trials": 1, "exit 75": int(proc.returncode == 75), "preempted file": int(marked),
            "message": err.strip().splitlines()[-1] if err.strip() else ""}  # fmt: skip


def disk_full(base: Path) -> dict:
    """A tmpfs of 1.6 checkpoints: the first save fits, the next one (the new file is
    written beside the old one, then renamed over it) does not."""
    sizing = base / "sizing"
    extra = ("model.width=32", "model.hidden_dim=512", "train.checkpoint_every=1")
    run(pretrain_argv(sizing, *extra, "train.epochs=1", "optim.warmup_epochs=0"))
    size = int(1.6 * (sizing / "last.pt").stat().st_size)
    mount = Path(tempfile.mkdtemp(prefix="wcl-full-"))
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if made.returncode != 0:
        return {"trials": 0, "not run": made.stderr.strip()[:80]}
    try:
        out = mount / "run"
        done = run(pretrain_argv(out, *extra, "train.epochs=6"))
        lines = [x for x in done.stderr.strip().splitlines() if x.startswith("wcl:")]
        previous_ok = False
        if (out / "last.pt").exists():
            try:
                torch.load(out / "last.pt", weights_only=True)
                previous_ok = True
            except Exception:
                pass
        return {"trials": 1, "exit 1": int(done.returncode == 1),
                "one line naming the file": int(len(lines) == 1 and str(out) in lines[0]),
                "says no space": int("no space left" in done.stderr.lower()),
                "no traceback": int("Traceback" not in done.stderr),
                "previous last.pt intact": int(previous_ok),
                "message": lines[-1][:160] if lines else done.stderr[-160:]}  # fmt: skip
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
        shutil.rmtree(mount, ignore_errors=True)


def bad_inputs(base: Path) -> list[tuple[str, list[str]]]:
    """(name, argv): inputs a careless user gives; each must be one clean line."""
    corpus = base / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    (corpus / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (corpus / "not-a-mapping.yaml").write_text("- just\n- a list\n")
    (corpus / "bad-base.yaml").write_text("base: nowhere.yaml\n")
    (corpus / "pickle.pt").write_bytes(b"\x80\x04cposix\nsystem\n(S'echo pwned'\ntR.")
    (corpus / "empty.pt").write_bytes(b"")
    (corpus / "text.pt").write_text("not a checkpoint")
    broken = corpus / "idx"
    shutil.copytree(FIXTURE, broken, dirs_exist_ok=True)
    for f in broken.iterdir():
        if f.name.startswith("train-images"):
            f.write_bytes(f.read_bytes()[:1000])
    empty_folder = corpus / "empty-folder"
    empty_folder.mkdir(exist_ok=True)
    all_broken = corpus / "all-broken"
    all_broken.mkdir(exist_ok=True)
    for i in range(3):
        (all_broken / f"{i}.png").write_bytes(b"\x89PNG not really")
    pre = [*WCL, "pretrain", "--config", "fashion-mnist-demo", "--set", f"data.root={FIXTURE}",
           "--set", f"train.out_dir={base / 'never'}"]  # fmt: skip
    ckpt = [*WCL, "knn-eval", "--config", "knn-small", "--checkpoint"]
    return [
        ("typo in a key", [*pre, "--set", "train.epoch=3"]),
        ("typo in a section", [*pre, "--set", "trian.epochs=3"]),
        ("bad value", [*pre, "--set", "train.batch_size=-1"]),
        ("bad choice", [*pre, "--set", "model.gather=relase"]),
        ("wrong type", [*pre, "--set", "train.epochs=three"]),
        ("misspelt preset", [*WCL, "pretrain", "--config", "fashion-mnist-dem"]),
        ("missing config file", [*WCL, "pretrain", "--config", str(corpus / "nope.yaml")]),
        ("binary YAML", [*WCL, "pretrain", "--config", str(corpus / "binary.yaml")]),
        ("YAML not a mapping", [*WCL, "pretrain", "--config", str(corpus / "not-a-mapping.yaml")]),
        ("base names no file", [*WCL, "pretrain", "--config", str(corpus / "bad-base.yaml")]),
        ("missing data root", [*pre, "--set", f"data.root={corpus / 'nowhere'}"]),
        ("truncated IDX", [*pre, "--set", f"data.root={broken}"]),
        (
            "folder without images",
            [*pre, "--set", "data.dataset=folder", "--set", f"data.root={empty_folder}"],
        ),
        (
            "folder of broken files",
            [*pre, "--set", "data.dataset=folder", "--set", f"data.root={all_broken}"],
        ),
        ("seed beyond 64 bits", [*pre, "--set", f"train.seed={2**70}"]),
        ("cuda without a GPU", [*pre, "--set", "train.device=cuda"]),
        ("huge width", [*pre, "--set", "model.width=100000"]),
        ("batch above the data", [*pre, "--set", "train.batch_size=100000"]),
        ("pickle checkpoint", [*ckpt, str(corpus / "pickle.pt")]),
        ("empty checkpoint", [*ckpt, str(corpus / "empty.pt")]),
        ("text checkpoint", [*ckpt, str(corpus / "text.pt")]),
        ("missing checkpoint", [*ckpt, str(corpus / "nope.pt")]),
        ("report of no run", [*WCL, "report", str(corpus)]),
        ("check-data of no folder", [*WCL, "check-data", str(corpus / "nowhere")]),
    ]


def corpus_trials(base: Path) -> dict:
    clean, failures = 0, []
    cases = bad_inputs(base)
    for name, argv in cases:
        done = run(argv, timeout=300)
        lines = [x for x in done.stderr.strip().splitlines() if x.strip()]
        ok = (done.returncode in (1, 2) and "Traceback" not in done.stderr
              and len([x for x in lines if x.startswith("wcl:")]) == 1)  # fmt: skip
        clean += ok
        if not ok:
            failures.append(f"{name} (exit {done.returncode}: {lines[-1][:100] if lines else ''})")
    return {"inputs": len(cases), "handled cleanly": clean, "not clean": failures}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--out", default="runs/faults")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-disk-full", action="store_true")
    args = parser.parse_args()
    base = Path(args.out).resolve()
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    rng = random.Random(args.seed)
    results = {
        "kill -9, then --resume auto": kill_trials(base, args.kills, rng),
        "two runs on one directory": two_runs(base),
        "SIGTERM during start-up": start_up_signal(base),
        "disk full": {"trials": 0, "not run": "--skip-disk-full"}
        if args.skip_disk_full
        else disk_full(base),
        "bad-input corpus": corpus_trials(base),
    }
    print("| fault | result |\n|---|---|")
    for name, found in results.items():
        cells = ", ".join(f"{k}: {v}" for k, v in found.items() if k != "message")
        print(f"| {name} | {cells} |")
    for name, found in results.items():
        if found.get("message"):
            print(f"{name}: {found['message']}")
    (base / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
