"""The evaluation commands under torchrun (two gloo processes) against one plain process.

The global batches are the same sets of images for any number of processes
(DistributedSampler splits one permutation of (seed, epoch)), every augmentation is a
function of (seed, epoch, index), DDP averages equal-sized shares of each batch and
BatchNorm statistics are synchronised, so two processes compute what one does: only the
order of float32 sums differs (two half-batch means averaged instead of one mean, two
shares of a feature pass instead of one). Measured: final weights within 1.5e-8 (fast
mode), 8e-8 (protocol) and 5e-7 (fine-tuning), epoch losses within 1e-7 (relative),
features bit-identical. The tolerances below (1e-5) are 20-700x that, yet far below what
a real difference (another batch, a missed gradient, unsynchronised BatchNorm) gives, and
each test checks that training moved the weights by over 100x the tolerance. The learning
rates are kept moderate on purpose: fine-tuning all of a tiny network on batches of 10 at
a large lr amplifies float32 rounding (there, one process with 1 or 2 threads already
differs by 3e-4 after 3 steps), which says nothing about distribution. The test shares
are uneven (101 images: 51 and 50), so exactly-once counting of the test set is covered.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from evalkit import (
    FASHION_IDX,
    float32_default,  # noqa: F401 (autouse: float32 default dtype)
    tiny_checkpoint,
)

import wcl.eval.loop
from wcl import dist
from wcl.checkpoint import load_checkpoint
from wcl.cli import main
from wcl.config import ConfigError
from wcl.eval.linear import linear_classifier
from wcl.eval.shards import local_batch
from wcl.weights import load_backbone

WEIGHT_ATOL = 1e-5
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("pre") / "pre.pt")


def argv(command, config, checkpoint, out, *sets):
    """A command line on the fixture: 101 test images, no workers or progress bars."""
    common = [f"data.root={FASHION_IDX}", "data.workers=0", "data.test_subset=101"]
    common += ["run.progress=false", "run.eval_batch_size=32", f"run.out_dir={out}"]
    items = [x for s in common + list(sets) for x in ("--set", s)]
    return [command, "--config", config, "--checkpoint", str(checkpoint), *items]


def torchrun(args, nproc=2):
    """``python -m torch.distributed.run --standalone`` of ``wcl.cli args``; its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"  # two processes on a small machine: no oversubscription
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", "-m", "wcl.cli", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def results(out):
    return json.loads((out / "results.json").read_text())


def initial_weights(checkpoint, finetune: bool) -> dict[str, torch.Tensor]:
    """The trained weights before training: the seeded classifier (and the backbone)."""
    torch.manual_seed(0)  # run.seed
    fc = linear_classifier(64, 10).state_dict()
    if not finetune:
        return fc
    backbone = load_backbone(checkpoint).module.state_dict()
    return {f"backbone.{k}": v for k, v in backbone.items()} | {f"fc.{k}": v for k, v in fc.items()}


def assert_same_run(one, two, epochs, start):
    """Same scores, losses and final weights from the run directories ``one`` and ``two``;
    ``start``: the weights before training, to check that training moved them."""
    a, b = results(one), results(two)
    assert (a["processes"], b["processes"], b["complete"]) == (1, 2, True)
    # Identical weights up to rounding give identical predictions on these 101 images.
    assert a["final"] == b["final"] and a["best"] == b["best"]
    assert [r["epoch"] for r in b["history"]] == list(range(1, epochs + 1))
    for row_a, row_b in zip(a["history"], b["history"], strict=True):
        assert row_b["step"] == row_a["step"]
        assert row_b["loss"] == pytest.approx(row_a["loss"], rel=LOSS_RTOL)
        assert row_b["test_loss"] == pytest.approx(row_a["test_loss"], rel=LOSS_RTOL)
    wa, wb = load_checkpoint(one / "last.pt")["model"], load_checkpoint(two / "last.pt")["model"]
    assert wa.keys() == wb.keys() == start.keys()
    moved = max((wa[k] - v).abs().max().item() for k, v in start.items() if v.is_floating_point())
    assert moved > 100 * WEIGHT_ATOL
    for key, value in wa.items():
        if value.is_floating_point():
            torch.testing.assert_close(wb[key], value, atol=WEIGHT_ATOL, rtol=0, msg=key)
        else:
            assert torch.equal(wb[key], value), key


def test_fast_mode_two_processes_match_one_and_resume_one(checkpoint, tmp_path, monkeypatch):
    def fast(out, *extra):
        sets = ("linear.epochs=2", "linear.batch_size=64")
        return argv("linear-eval", "linear-small", checkpoint, out, *sets) + ["--fast", *extra]

    one, two = tmp_path / "one", tmp_path / "two"
    assert main(fast(one)) == 0
    printed = torchrun(fast(two))
    assert printed.count("final: top-1") == 1  # rank 0 alone prints (and writes)
    assert_same_run(one, two, 2, initial_weights(checkpoint, False))
    # Gathered shares of the feature pass come back whole and in dataset order.
    for split in ("train", "test"):
        fa = load_checkpoint(one / f"features-{split}.pt")
        fb = load_checkpoint(two / f"features-{split}.pt")
        assert torch.equal(fa["targets"], fb["targets"])
        torch.testing.assert_close(fb["features"], fa["features"], atol=1e-5, rtol=1e-5)

    # One process stops after epoch 1; two processes resume it (each reads last.pt and
    # the cached features).
    real_save = wcl.eval.loop.save_checkpoint

    def save_then_crash(state, path):
        real_save(state, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(wcl.eval.loop, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        main(fast(tmp_path / "resumed"))
    monkeypatch.setattr(wcl.eval.loop, "save_checkpoint", real_save)
    torchrun(fast(tmp_path / "resumed", "--resume", "auto"))
    resumed, whole = results(tmp_path / "resumed"), results(one)
    assert resumed["final"] == whole["final"]
    assert resumed["history"][1]["loss"] == pytest.approx(
        whole["history"][1]["loss"], rel=LOSS_RTOL
    )


def test_protocol_mode_two_processes_match_one(checkpoint, tmp_path):
    # lr 4 (peak 0.5): enough for 4 steps to move the classifier well past the tolerance.
    sets = ["linear.epochs=1", "linear.batch_size=32", "data.train_subset=128", "linear.lr=4"]
    lin = ("linear-eval", "linear-small", checkpoint)
    assert main(argv(*lin, tmp_path / "one", *sets)) == 0
    torchrun(argv(*lin, tmp_path / "two", *sets))
    assert_same_run(tmp_path / "one", tmp_path / "two", 1, initial_weights(checkpoint, False))


def test_finetune_two_processes_match_one(checkpoint, tmp_path):
    """The whole network trains, BatchNorm included: synchronised statistics of the global
    batch (10 images, 5 a process) make the two runs agree."""
    sets = ["finetune.epochs=1", "finetune.fraction=0.1", "finetune.batch_size=10"]
    sets += ["finetune.lr=0.5"]  # peak 0.02: the weights move by 2e-3, 5000x the difference
    fin = ("finetune", "finetune-small", checkpoint)
    assert main(argv(*fin, tmp_path / "one", *sets)) == 0
    torchrun(argv(*fin, tmp_path / "two", *sets))
    assert_same_run(tmp_path / "one", tmp_path / "two", 1, initial_weights(checkpoint, True))
    assert results(tmp_path / "two")["subset"]["images"] == 30
    subsets = [(tmp_path / d / "subset.txt").read_text() for d in ("one", "two")]
    assert subsets[0] == subsets[1]


def test_knn_two_processes_match_one(checkpoint, tmp_path):
    knn = ("knn-eval", "knn-small", checkpoint)
    assert main(argv(*knn, tmp_path / "one", "knn.k=[20, 5]")) == 0
    torchrun(argv(*knn, tmp_path / "two", "knn.k=[20, 5]"))
    a, b = results(tmp_path / "one"), results(tmp_path / "two")
    assert (a["k20"], a["k5"]) == (b["k20"], b["k5"])


def test_global_batch_must_divide(monkeypatch):
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    assert local_batch(96, "linear.batch_size") == 32
    with pytest.raises(ConfigError, match=r"'finetune.batch_size' 64 .* 3 processes"):
        local_batch(64, "finetune.batch_size")
