"""Real short pre-training runs on the committed Fashion-MNIST fixture."""

import json
import math
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from runkit import assert_same_weights, final_weights

from wcl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from wcl.cli import main
from wcl.config import ConfigError, load_config
from wcl.model import WCL
from wcl.train import pretrain

FIXTURE = Path(__file__).parent / "fixtures" / "fashion-idx"


def tiny_config(out_dir, *extra):
    return load_config(
        "fashion-mnist-demo",
        [
            f"data.root={FIXTURE}",
            "data.workers=0",
            "model.backbone=resnet10",
            "data.augment=loader",
            "train.knn_every=0",
            "model.stem=small",
            "model.width=8",
            "model.hidden_dim=32",
            "model.out_dim=16",
            "train.epochs=3",
            "train.batch_size=64",
            "train.checkpoint_every=1",
            "train.log_every=2",
            "optim.warmup_epochs=1",
            f"train.out_dir={out_dir}",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    pretrain(tiny_config(out))
    return out


def test_run_writes_config_metrics_and_checkpoints(full_run):
    saved = yaml.safe_load((full_run / "config.yaml").read_text())
    assert saved["train"]["batch_size"] == 64 and saved["data"]["root"] == str(FIXTURE)
    rows = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines()]
    # 300 images // 64 = 4 steps an epoch; a line every 2 steps.
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    for key in (
        "loss",
        "instance_loss",
        "graph_loss",
        "lr",
        "components",
        "component_size",
        "precision",
        "images_per_s",
    ):
        assert all(key in r for r in rows), key
    assert rows[0]["lr"] == pytest.approx(0.075 * 8 * 1 / 4)  # warm-up: step 1 of 4
    assert all(2 <= r["component_size"] <= 64 and 0 <= r["precision"] <= 1 for r in rows)
    for epoch in (1, 2, 3):
        ckpt = load_checkpoint(full_run / f"epoch-{epoch:04d}.pt")
        assert (ckpt["epoch"], ckpt["step"]) == (epoch, 4 * epoch)
    assert_same_weights(
        final_weights(full_run), load_checkpoint(full_run / "epoch-0003.pt")["model"]
    )


def test_resume_from_a_checkpoint_is_exact(full_run, tmp_path):
    resumed = tmp_path / "resumed"
    pretrain(tiny_config(resumed), resume=str(full_run / "epoch-0001.pt"))
    assert_same_weights(final_weights(resumed), final_weights(full_run))
    ours = load_checkpoint(resumed / "last.pt")
    theirs = load_checkpoint(full_run / "last.pt")
    assert ours["step"] == theirs["step"] == 12
    for index, buffers in theirs["optimizer"]["state"].items():
        assert torch.equal(
            ours["optimizer"]["state"][index]["momentum_buffer"], buffers["momentum_buffer"]
        )


def test_resume_auto_continues_the_run_directory(full_run, tmp_path):
    run = tmp_path / "auto"
    run.mkdir()
    shutil.copy(full_run / "config.yaml", run / "config.yaml")
    shutil.copy(full_run / "epoch-0002.pt", run / "last.pt")
    with pytest.raises(ConfigError, match="already holds a run"):
        pretrain(tiny_config(run))
    pretrain(tiny_config(run), resume="auto")
    assert_same_weights(final_weights(run), final_weights(full_run))


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_data_loader_workers_do_not_change_the_result(full_run, tmp_path, start_method):
    """Augmentation randomness is a function of (seed, epoch, index) alone, and workers
    started by forkserver (Python 3.14's default on Linux, which pickles what the workers
    get) give the same result as forked ones."""
    run = tmp_path / "workers"
    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method(start_method, force=True)
    try:
        pretrain(tiny_config(run, "data.workers=2"))
    finally:
        multiprocessing.set_start_method(before, force=True)
    assert_same_weights(final_weights(run), final_weights(full_run))


@pytest.mark.parametrize("mode", ["batch", "loader"])
def test_batch_mode_keeps_its_workers_across_epochs(tmp_path, monkeypatch, mode):
    """data.augment=batch: the workers only read raw images, so the same 2 workers serve
    all 3 epochs (persistent_workers) and are stopped when the run ends, and the weights
    are those of a run without workers; in the other modes the dataset carries the
    epoch, so each epoch starts new workers (6 starts)."""
    import time

    from wcl import preemption

    starts = tmp_path / "starts"
    starts.mkdir()

    def counting_init(worker_id: int) -> None:
        (starts / f"{os.getpid()}-{worker_id}-{time.monotonic_ns()}").touch()

    monkeypatch.setattr(preemption, "ignore_preemption_signals", counting_init)
    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("fork", force=True)  # the closure above is not picklable
    try:
        pretrain(tiny_config(tmp_path / "workers", f"data.augment={mode}", "data.workers=2"))
    finally:
        multiprocessing.set_start_method(before, force=True)
    assert len(list(starts.iterdir())) == (2 if mode == "batch" else 6)
    # Stopped when the run ends: workers ignore SIGTERM, so one left alive would hold the
    # interpreter's exit (multiprocessing terminates, then joins, daemon children).
    assert multiprocessing.active_children() == []
    pretrain(tiny_config(tmp_path / "none", f"data.augment={mode}", "data.workers=0"))
    assert_same_weights(final_weights(tmp_path / "workers"), final_weights(tmp_path / "none"))


@pytest.mark.parametrize("mode", ["loader", "batch", "hybrid"])
def test_multicrop_trains_and_resumes_exactly(full_run, tmp_path, mode):
    """data.small_crops=2 (12 px, the default 28 * 96 / 224): the small crops' losses are
    logged, a resumed run ends where an uninterrupted one does, and the run differs from
    the two-view one."""
    settings = (f"data.augment={mode}", "data.small_crops=2", "model.small_k=2")
    first = tmp_path / "first"
    pretrain(tiny_config(first, *settings))
    rows = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    for key in ("small_instance_loss", "small_graph_loss"):
        assert all(math.isfinite(r[key]) for r in rows if "loss" in r), key
    assert all(0 <= r["small_precision"] <= 1 for r in rows if "loss" in r)
    resumed = tmp_path / "resumed"
    pretrain(tiny_config(resumed, *settings), resume=str(first / "epoch-0001.pt"))
    assert_same_weights(final_weights(resumed), final_weights(first))
    if mode == "loader":
        ours, two_views = final_weights(first), final_weights(full_run)
        assert not torch.equal(ours["backbone.conv1.weight"], two_views["backbone.conv1.weight"])


def test_checkpoints_from_before_a_config_key_existed_resume(full_run, tmp_path):
    """A checkpoint whose saved config lacks keys added later (here the multi-crop ones)
    resumes when the run uses their defaults, and is refused when it does not."""
    old = load_checkpoint(full_run / "epoch-0001.pt")
    for section, key in (("data", "small_crops"), ("data", "small_size"), ("model", "small_k")):
        del old["config"][section][key]
    save_checkpoint(old, tmp_path / "old.pt")
    resumed = tmp_path / "resumed"
    pretrain(tiny_config(resumed), resume=str(tmp_path / "old.pt"))
    assert_same_weights(final_weights(resumed), final_weights(full_run))
    with pytest.raises(CheckpointError, match="data.small_crops: 0 -> 2"):
        pretrain(tiny_config(tmp_path / "x", "data.small_crops=2"), resume=str(tmp_path / "old.pt"))


def test_deterministic_switch_trains_and_restores_the_setting(full_run, tmp_path, monkeypatch):
    """train.deterministic: every step (here with multi-crop, so every op of ours) runs with
    torch's deterministic algorithms only, an op without one would raise; the setting is
    restored after. On the CPU our runs are bitwise reproducible already, so the switch
    leaves the result as it was."""
    seen = []
    forward = WCL.forward

    def spy(self, *args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(WCL, "forward", spy)
    assert not torch.are_deterministic_algorithms_enabled()
    settings = ("data.small_crops=2", "train.epochs=2")
    pretrain(tiny_config(tmp_path / "on", "train.deterministic=true", *settings))
    assert seen and all(seen)
    assert not torch.are_deterministic_algorithms_enabled()
    seen.clear()
    pretrain(tiny_config(tmp_path / "off", *settings))
    assert seen and not any(seen)
    assert_same_weights(final_weights(tmp_path / "on"), final_weights(tmp_path / "off"))


def test_simclr_baseline_and_cli(tmp_path, capsys):
    run = tmp_path / "simclr"
    args = ["pretrain", "--config", "fashion-mnist-demo"]
    overrides = [
        f"data.root={FIXTURE}",
        "data.workers=0",
        "model.width=8",
        "model.hidden_dim=32",
        "train.epochs=1",
        "optim.warmup_epochs=0",
        "train.batch_size=100",
        "model.graph_weight=0",
        "train.knn_every=0",
        f"train.out_dir={run}",
    ]
    assert main(args + [x for o in overrides for x in ("--set", o)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["graph_loss"] == 0 and r["loss"] == r["instance_loss"] for r in rows)
    assert "phi.0.weight" not in final_weights(run)
    assert main(args + ["--set", "optim.lr=-1"]) == 2
    assert "optim.lr" in capsys.readouterr().err


def test_batch_larger_than_data_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        pretrain(tiny_config(tmp_path / "big", "train.batch_size=512"))


@pytest.mark.parametrize("mode", ["batch", "hybrid"])
def test_batched_augmentation_trains_and_resumes_exactly(full_run, tmp_path, mode):
    """data.augment=batch / hybrid: a resumed run ends where an uninterrupted one does,
    and it is a different (valid) run from the per-image pipeline's."""
    first = tmp_path / mode
    pretrain(tiny_config(first, f"data.augment={mode}"))
    resumed = tmp_path / f"{mode}-resumed"
    pretrain(tiny_config(resumed, f"data.augment={mode}"), resume=str(first / "epoch-0001.pt"))
    assert_same_weights(final_weights(resumed), final_weights(first))
    ours, loader = final_weights(first), final_weights(full_run)
    assert not torch.equal(ours["backbone.conv1.weight"], loader["backbone.conv1.weight"])
    rows = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    with pytest.raises(CheckpointError, match="data.augment"):
        pretrain(tiny_config(tmp_path / "x"), resume=str(first / "epoch-0001.pt"))


def test_bf16_autocast_on_the_cpu_trains_and_resumes_exactly(full_run, tmp_path):
    """train.amp=bf16 on a CPU (the opt-in for CPUs with native bf16): the network runs
    in bf16 (weights differ from the float32 run's), losses stay finite, resume is exact."""
    first = tmp_path / "bf16"
    pretrain(tiny_config(first, "train.amp=bf16"))
    resumed = tmp_path / "bf16-resumed"
    pretrain(tiny_config(resumed, "train.amp=bf16"), resume=str(first / "epoch-0001.pt"))
    assert_same_weights(final_weights(resumed), final_weights(first))
    ours, fp32 = final_weights(first), final_weights(full_run)
    assert not torch.equal(ours["backbone.conv1.weight"], fp32["backbone.conv1.weight"])
    assert all(v.dtype != torch.bfloat16 for v in ours.values())  # weights stay float32
    rows = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)


EMULATED_FP16 = "ignore:amp=fp16 on a CPU without native fp16"


@pytest.mark.filterwarnings(EMULATED_FP16)
def test_fp16_loss_scaling_skips_overflows_and_resumes_exactly(tmp_path):
    """train.amp=fp16 (for GPUs without native bf16): a step whose scaled gradients overflow
    is skipped and the scale halved, so with no growth yet (2000 good steps) every record
    has loss_scale = 65536 / 2**skipped_steps; the scaler's state is in the checkpoint,
    so a resume is exact (one that restarted the scale at 65536 would skip again)."""
    first = tmp_path / "fp16"
    pretrain(tiny_config(first, "train.amp=fp16", "train.log_every=1"))
    rows = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[0]["skipped_steps"] == 1  # 65536 times these gradients overflows float16
    assert all(r["loss_scale"] == 65536 / 2 ** r["skipped_steps"] for r in rows)
    assert rows[-1]["skipped_steps"] < 12 and all(math.isfinite(r["loss"]) for r in rows)
    epoch1 = load_checkpoint(first / "epoch-0001.pt")
    assert epoch1["scaler"]["scale"] == rows[3]["loss_scale"]
    resumed = tmp_path / "fp16-resumed"
    pretrain(
        tiny_config(resumed, "train.amp=fp16", "train.log_every=1"),
        resume=str(first / "epoch-0001.pt"),
    )
    assert_same_weights(final_weights(resumed), final_weights(first))
    assert all(v.dtype == torch.float32 for v in final_weights(first).values()
               if v.is_floating_point())  # fmt: skip


@pytest.mark.filterwarnings(EMULATED_FP16)
def test_fp16_updates_are_unscaled_and_follow_float32(tmp_path, monkeypatch):
    """Two float16 steps at loss scales 1 and 1024 (no overflow) move the weights as two
    float32 steps do, up to float16 rounding (measured: 6% for biases and normalisation
    parameters, 23% for the LARS-adapted weights, bf16 17% / 41%); an update taken from
    the scaled gradients would move the former 1024 times as far."""
    from wcl import train

    def run(name: str, amp: str, scale: float = 1.0) -> dict[str, torch.Tensor]:
        monkeypatch.setattr(train, "grad_scaler", lambda device, dtype: torch.amp.GradScaler(
            device.type, init_scale=scale, enabled=dtype is torch.float16))  # fmt: skip
        cfg = tiny_config(tmp_path / name, f"train.amp={amp}", "train.epochs=1",
                          "train.batch_size=150", "optim.warmup_epochs=0")  # fmt: skip
        pretrain(cfg)
        return final_weights(tmp_path / name)

    torch.manual_seed(0)  # pretrain's own seed: the initial weights
    start = train.build_model(tiny_config(tmp_path / "init")).state_dict()
    reference = run("fp32", "off")

    def moved(weights: dict, dims) -> torch.Tensor:
        return torch.cat([(weights[k] - start[k]).flatten() for k in weights
                          if "running" not in k and weights[k].is_floating_point()
                          and dims(weights[k].dim())])  # fmt: skip

    for scale in (1.0, 1024.0):
        ours = run(f"fp16-{scale:g}", "fp16", scale)
        for dims, bound in ((lambda d: d == 1, 0.15), (lambda d: d > 1, 0.4)):
            want = moved(reference, dims)
            assert (moved(ours, dims) - want).norm() / want.norm() < bound, (scale, bound)


def test_tensorboard_gets_the_metrics(full_run):
    """With tensorboard installed (the test extra), every metrics.jsonl scalar is logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(full_run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"pretrain/loss", "pretrain/graph_loss", "pretrain/lr", "pretrain/precision"} <= tags
    steps = [e.step for e in events.Scalars("pretrain/loss")]
    rows = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [r["step"] for r in rows if "loss" in r]


def test_hybrid_augmentation_trains_on_a_folder_of_mixed_sizes(tmp_path):
    """Photos of two sizes (96 x 96 and 96 x 64) in one flat folder: data.augment=batch is
    refused for it, hybrid crops each image in the loader and trains; the late batch holds
    the 32 px views the graph saw."""
    photos = Path(__file__).parent / "fixtures" / "photos"
    settings = ["data.dataset=folder", f"data.root={photos}", "data.channels=3",
                "data.image_size=32", "train.batch_size=6", "train.epochs=2"]  # fmt: skip
    with pytest.raises(ConfigError, match="'loader' or 'hybrid'"):
        tiny_config(tmp_path / "batch", *settings, "data.augment=batch")
    run = tmp_path / "hybrid"
    pretrain(tiny_config(run, *settings, "data.augment=hybrid"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and all(
        math.isfinite(r["loss"]) for r in rows if "loss" in r
    )
    assert torch.load(run / "late_batch.pt")["images"].shape == (6, 3, 32, 32)


def write_cifar10(root: Path, per_batch: int) -> None:
    """A small CIFAR-10 in torchvision's on-disk format (pickled batches of flat CHW rows)."""
    import pickle

    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        batch = {
            "data": rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8),
            "labels": rng.integers(0, 10, per_batch).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": [f"class{k}" for k in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))


def test_cifar10_preset_trains_with_batched_augmentation(tmp_path, monkeypatch):
    """The shipped cifar10-r18 preset (batched augmentation), shrunk, through torchvision's
    own CIFAR-10 reader (its md5 checks off: the files are ours)."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: True)
    write_cifar10(tmp_path / "cifar", per_batch=8)
    run = tmp_path / "run"
    cfg = load_config(
        "cifar10-r18",
        [f"data.root={tmp_path / 'cifar'}", "data.workers=0", "model.width=8",
         "model.hidden_dim=32", "model.out_dim=16", "train.epochs=2", "optim.warmup_epochs=1",
         "train.batch_size=20", "train.log_every=1",
         "train.knn_every=0", f"train.out_dir={run}"],
    )  # fmt: skip
    assert cfg.data.augment == "batch"
    pretrain(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    # 40 images, batch 20, two epochs: the weak pipeline, then the strong one.
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert torch.load(run / "late_batch.pt")["images"].shape == (20, 3, 32, 32)


def test_demo_sized_runs_are_bitwise_reproducible(tmp_path):
    """The demo's model and batch (256) for 4 steps, twice: identical weights. At these
    sizes multi-threaded CPU kernels split the work, which the tiny runs above never do."""
    runs = []
    for name in ("a", "b"):
        cfg = load_config(
            "fashion-mnist-demo",
            [f"data.root={FIXTURE}", "data.workers=0", "train.epochs=4", "train.knn_every=0",
             "optim.warmup_epochs=1", f"train.out_dir={tmp_path / name}"],
        )  # fmt: skip
        pretrain(cfg)
        runs.append(final_weights(tmp_path / name))
    assert_same_weights(*runs)


def test_amp_dtype_and_the_emulated_bf16_warning(monkeypatch):
    """One rule for training and evaluation: bf16 / fp16 when asked; auto is bf16 on GPUs
    of compute capability 8 and up, fp16 on older ones (V100: 7.0, T4: 7.5), float32 on
    CPUs; asking a CPU without native bf16 / fp16 for it warns (PyTorch would emulate it,
    slower than float32)."""
    import warnings

    from wcl import precision

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for capability, dtype in (((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                              ((7, 5), torch.float16), ((7, 0), torch.float16)):  # fmt: skip
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=capability: c)
        assert precision.amp_dtype("auto", gpu) is dtype
        assert precision.amp_dtype("bf16", gpu) is torch.bfloat16
        assert precision.amp_dtype("fp16", gpu) is torch.float16
        assert precision.amp_dtype("off", gpu) is None
    assert precision.amp_dtype("auto", cpu) is None
    assert precision.grad_scaler(cpu, torch.float16).is_enabled()
    assert not precision.grad_scaler(cpu, torch.bfloat16).is_enabled()
    assert not precision.grad_scaler(cpu, None).is_enabled()
    monkeypatch.setattr(precision, "cpu_has_native_fp16", lambda: False)
    with pytest.warns(UserWarning, match="without native fp16"):
        assert precision.amp_dtype("fp16", cpu) is torch.float16
    monkeypatch.setattr(precision, "cpu_has_native_fp16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.amp_dtype("fp16", cpu) is torch.float16
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="without native bf16"):
        assert precision.amp_dtype("bf16", cpu) is torch.bfloat16
    for native in (True, None):  # has it, or cannot tell (not Linux): no warning
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda native=native: native)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert precision.amp_dtype("bf16", cpu) is torch.bfloat16
    monkeypatch.undo()
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else None
    expected = None if flags is None else bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags))
    assert precision.cpu_has_native_bf16() is expected
    expected = None if flags is None else bool({"avx512_fp16", "amx_fp16", "asimdhp"} & set(flags))
    assert precision.cpu_has_native_fp16() is expected
