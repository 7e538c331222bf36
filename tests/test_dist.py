"""Two gloo processes against one process: same losses, labels and parameter updates."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wcl import dist
from wcl.checkpoint import load_checkpoint

HERE = Path(__file__).parent
FIXTURE = HERE / "fixtures" / "fashion-idx"
sys.path.insert(0, str(HERE))
import dist_worker  # noqa: E402

STEPS = 3


def torchrun(*args, nproc=2, env=None):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
    ]
    result = subprocess.run(
        cmd + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    runs = {}
    for mode in ("exact", "release", "exact+small", "exact+concat"):
        out = tmp_path_factory.mktemp(mode.replace("+", "-"))
        torchrun(HERE / "dist_worker.py", out, mode, STEPS)
        runs[mode] = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return runs


@pytest.mark.parametrize("mode", ["exact", "release", "exact+small", "exact+concat"])
def test_losses_and_weak_labels_match_one_process(two_process_runs, mode):
    single = dist_worker.run(mode, STEPS)
    ranks = two_process_runs[mode]
    # Only the first step starts from the same weights in both modes.
    steps = range(STEPS) if mode.startswith("exact") else range(1)
    keys = ["loss", "instance_loss", "graph_loss", "components", "precision"]
    if mode.endswith("small"):
        keys += ["small_instance_loss", "small_graph_loss", "small_precision"]
    for k in steps:
        ref = single["history"][k]
        for rank in ranks:
            got = rank["history"][k]
            for key in keys:
                # small_precision is a float32 ratio per process, averaged over processes.
                tol = 1e-6 if key == "small_precision" else 1e-9
                assert got[key].item() == pytest.approx(ref[key].item(), abs=tol), (k, key)
            # Every process holds the labels of the whole global batch, the same as one process.
            assert torch.equal(got["labels1"], ref["labels1"])
            assert torch.equal(got["labels2"], ref["labels2"])


@pytest.mark.parametrize("mode", ["exact", "exact+small", "exact+concat"])
def test_exact_mode_gives_the_same_parameter_updates(two_process_runs, mode):
    single = dist_worker.run(mode, STEPS)["params"]
    initial = dist_worker.run(mode, 0)["params"]
    for rank in two_process_runs[mode]:
        moved = 0
        for key, ref in single.items():
            got = rank["params"][key]
            if ref.is_floating_point():
                assert torch.allclose(got, ref, atol=1e-9, rtol=0), key
                moved += int(not torch.allclose(ref, initial[key]))
            else:
                assert torch.equal(got, ref), key
        assert moved > 10  # the comparison is over real updates


def test_release_mode_gradient_differs(two_process_runs):
    """The authors' no-grad gather is not the single-process gradient: it shows up in the
    parameters after a step, which is why `exact` is the default."""
    exact = two_process_runs["exact"][0]["params"]
    release = two_process_runs["release"][0]["params"]
    assert any(
        not torch.allclose(exact[k], release[k], atol=1e-6)
        for k in exact
        if exact[k].is_floating_point()
    )


def test_torchrun_pretrain_then_one_process_resume(tmp_path):
    """Two processes pre-train (with the online kNN monitor, which they share), one
    process continues; the monitor's figures are those of one process on the same weights."""
    two = tmp_path / "two"
    common = [
        f"data.root={FIXTURE}", "data.workers=0", "model.width=8", "model.hidden_dim=32",
        "model.out_dim=16", "train.knn_every=1", "data.augment=loader", "train.epochs=2",
        "train.batch_size=64", "optim.warmup_epochs=1", "train.checkpoint_every=1",
        "train.log_every=2",
    ]  # fmt: skip
    args = ["-m", "wcl.cli", "pretrain", "--config", "fashion-mnist-demo"]
    sets = [x for o in common + [f"train.out_dir={two}"] for x in ("--set", o)]
    torchrun(*args, *sets)
    ckpt = load_checkpoint(two / "last.pt")
    assert (ckpt["world_size"], ckpt["epoch"], ckpt["step"]) == (2, 2, 8)
    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6, 8]  # rank 0 alone writes
    knn_rows = [r for r in rows if "knn_top1" in r]
    assert [r["epoch"] for r in knn_rows] == [1, 2]
    from wcl.config import load_config
    from wcl.pretrain_data import online_knn
    from wcl.train import build_model

    cfg = load_config("fashion-mnist-demo", common + [f"train.out_dir={tmp_path / 'x'}"])
    monitor = online_knn(cfg, None)
    for row in knn_rows:
        model = build_model(cfg)
        model.load_state_dict(load_checkpoint(two / f"epoch-{row['epoch']:04d}.pt")["model"])
        assert monitor(model.backbone) == {k: row[k] for k in ("knn_top1", "knn_top5")}

    # Continue epoch 2 of the 2-process run in one plain process.
    one = tmp_path / "one"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    sets_one = [x for o in common + [f"train.out_dir={one}"] for x in ("--set", o)]
    result = subprocess.run(
        [sys.executable, *args, *sets_one, "--resume", str(two / "epoch-0001.pt")],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = load_checkpoint(one / "last.pt")
    assert resumed["world_size"] == 1 and resumed["step"] == 8
    # The resumed run follows the 2-process one to within 1% of how far each tensor moved in
    # epoch 2: float32 sums in another order differ (by 1e-5 to 3e-4 here, depending on the
    # torch release), while a resume that lost state or data order is off by the whole move.
    start = load_checkpoint(two / "epoch-0001.pt")["model"]
    for key, value in ckpt["model"].items():
        if value.is_floating_point():
            moved = float((value - start[key]).norm())
            off = float((resumed["model"][key] - value).norm())
            assert off <= 0.01 * moved + 1e-6, (key, off, moved)


def test_slurm_environment_is_mapped(monkeypatch):
    env = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-09,12]",
        "SLURM_JOB_ID": "123456",
        "PATH": "",  # no scontrol: the fallback parser reads the node list
    }
    monkeypatch.setattr(os, "environ", env)
    dist._slurm_to_torchrun_env()
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "8", "1")
    assert env["MASTER_ADDR"] == "gpu07"
    assert env["MASTER_PORT"] == str(20000 + 123456 % 20000)


def test_srun_style_launch_trains(tmp_path):
    """Two processes that know only SLURM's variables (as `srun` starts them) form a group."""
    out = tmp_path / "slurm"
    procs = []
    for rank in (0, 1):
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLURM", "RANK", "WORLD", "LOCAL_RANK", "MASTER"))
        }
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                   SLURM_JOB_NODELIST="127.0.0.1", SLURM_JOB_ID=str(os.getpid()))  # fmt: skip
        procs.append(subprocess.Popen(
            [sys.executable, HERE / "dist_worker.py", out, "exact", "1"], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        ))  # fmt: skip
    out.mkdir()
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-3000:]
    a, b = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(a["history"][0]["labels1"], b["history"][0]["labels1"])


@pytest.mark.parametrize("holds_gil", [True, False])
def test_shutdown_lets_gloo_workers_finish_on_old_torch(monkeypatch, holds_gil):
    """On torch < 2.8 the group is left only after a GIL-free pause (see wcl.dist.shutdown);
    on later releases at once. Either way the group is gone afterwards."""
    import torch.distributed as tdist

    from wcl import dist

    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    tdist.barrier()  # a collective just before, as at the end of every command
    calls = []
    monkeypatch.setattr(dist, "_GLOO_DESTRUCTOR_HOLDS_GIL", holds_gil)
    monkeypatch.setattr(dist.time, "sleep", lambda s: calls.append(("sleep", s)))
    real_destroy = tdist.destroy_process_group
    monkeypatch.setattr(
        tdist, "destroy_process_group", lambda: (calls.append(("destroy",)), real_destroy())
    )
    dist.shutdown()
    assert not tdist.is_initialized()
    pause = [("sleep", dist._GLOO_DRAIN_SECONDS)] if holds_gil else []
    assert calls == [*pause, ("destroy",)]
