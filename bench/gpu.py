"""GPU checks and figures, in one prepared run (one H200: about 5 minutes).

``python bench/gpu.py [--quick]`` needs CUDA. It prints one JSON line per measurement and
writes them to $OUT/gpu.jsonl (or runs/bench/gpu.jsonl):

1. host synchronisations: WCL ResNet-50 training steps (weak labels, both losses, backward,
   LARS) under ``torch.cuda.set_sync_debug_mode("error")``: any sync raises;
2. WCL ResNet-50, 224 px, bf16 autocast + channels_last: images/s against a plain
   supervised ResNet-50 step (cross-entropy) on the same batch, the ratio of step times
   WCL / supervised, and against a supervised step on 2 x batch images (WCL's backbone
   sees two views, so that ratio is the cost of the heads, the graph and the losses);
3. the same with ``torch.compile`` on the backbone;
4. peak GPU memory at per-GPU batch 128 and 256;
5. epoch time of CIFAR-size WCL ResNet-18 (small stem, 32 px, batch 512) with the 50,000
   images held on the GPU as uint8 and augmented there with ``BatchAugment``;
6. ``data.augment=hybrid`` at 224 px: the device's share (flip, jitter, greyscale, blur,
   normalisation of two views of 128 crops) against the WCL step on the same batch;
7. the whole step, ours against the release's way (bench/train_step.py's: weak labels
   through the host and SciPy, a dense mask), at batch 128;
8. the batched blur on the device at 224 px: the depthwise convolutions BatchAugment uses
   there against the shifted sums it uses on CPUs (which read sigma on the host);
9. multi-crop: the WCL step with 6 extra 96 px crops (``data.small_crops=6``) against the
   two-view step, and host synchronisations in it (as in 1);
10. bitwise reruns: two runs of 3 WCL steps from the same seed, with torch's default
   algorithms and with ``train.deterministic`` (``wcl.precision.deterministic_algorithms``):
   whether each pair ends with identical parameters, and the step-time cost of the switch;
11. ``train.amp=fp16`` (what ``auto`` picks on GPUs without native bf16): the WCL step with
   float16 autocast and loss scaling against the bf16 step, the loss scale it settles at
   and whether the parameters stay finite;
12. ``model.concat_views``: the WCL step with one network pass over both views against one
   pass per view (the default), same batch.
``--quick`` runs only 1 and 2 at batch 128. ``--dry-run`` runs every part on the CPU with
a tiny network, batch and image size, to catch mistakes before spending device time
(tests/test_bench_gpu.py runs it).
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from train_step import release_forward

from wcl.backbones import build_backbone
from wcl.data import batch_strong_pipeline, blur_kernel_size, two_view_seeds
from wcl.data.batch_ops import depthwise_gaussian_blur, shifted_gaussian_blur
from wcl.model import WCL
from wcl.optim import LARS, param_groups
from wcl.precision import deterministic_algorithms, grad_scaler

RESULTS: list[dict] = []
OUT_FILE = Path(os.environ.get("OUT", "runs/bench")) / "gpu.jsonl"
FULL = {"device": "cuda", "arch": "resnet50", "size": 224, "dim": 2048, "hidden": 4096,
        "cifar_images": 50_000, "cifar_batch": 512, "steps": 20, "warmup": 5}  # fmt: skip
DRY = {"device": "cpu", "arch": "resnet10", "size": 32, "dim": 512, "hidden": 64,
       "cifar_images": 64, "cifar_batch": 16, "steps": 1, "warmup": 1}  # fmt: skip


def report(**record) -> None:
    """Print and append one record to gpu.jsonl at once, so a run stopped by its time
    limit still leaves every figure it reached."""
    RESULTS.append(record)
    print(json.dumps(record), flush=True)
    with OUT_FILE.open("a") as out:
        out.write(json.dumps(record) + "\n")


def attempt(check, *args, **kwargs) -> None:
    """Run one check; a failure is recorded and the run goes on to the next check."""
    try:
        check(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - one broken check must not cost the others
        report(check=check.__name__, error=f"{type(err).__name__}: {err}"[:500])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def wcl_step_fn(
    s: dict,
    batch: int,
    compile_backbone: bool = False,
    release: bool = False,
    small_crops: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    concat_views: bool = False,
):
    """One WCL training step; ``release``: the release's way (labels through the host and
    SciPy, a dense mask, ``release`` gather), as bench/train_step.py defines it;
    ``small_crops``: multi-crop with that many crops of 96/224 the size per image;
    ``dtype``: the autocast dtype (float16 with wcl's loss scaling, as train.amp=fp16);
    ``concat_views``: one network pass over both views (model.concat_views)."""
    device = torch.device(s["device"])
    backbone = build_backbone(s["arch"])
    model = WCL(backbone, s["dim"], s["hidden"], 256, concat_views=concat_views,
                gather_mode="release" if release else "exact")  # fmt: skip
    model = model.to(device, memory_format=torch.channels_last)
    if compile_backbone:
        model.backbone = torch.compile(model.backbone)
    optimizer = LARS(param_groups(model, 1e-6), lr=0.1)
    x1 = torch.randn(batch, 3, s["size"], s["size"], device=device)
    x1 = x1.to(memory_format=torch.channels_last)
    x2 = torch.randn_like(x1)
    small = None
    if small_crops:
        side = round(s["size"] * 96 / 224)
        small = torch.randn(small_crops * batch, 3, side, side, device=device)
        small = small.to(memory_format=torch.channels_last)

    scaler = grad_scaler(device, dtype)  # passes through unless float16

    def step():
        with torch.autocast(device.type, dtype=dtype):
            out = release_forward(model, x1, x2) if release else model(x1, x2, small=small)
            loss = out if release else out["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    step.model = model  # for checks that compare the parameters after some steps
    step.scaler = scaler
    return step


def supervised_step_fn(s: dict, batch: int):
    device = torch.device(s["device"])
    model = torch.nn.Sequential(build_backbone(s["arch"]), torch.nn.Linear(s["dim"], 1000))
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, s["size"], s["size"], device=device)
    x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def seconds_per_call(fn, s: dict) -> float:
    device = torch.device(s["device"])
    for _ in range(s["warmup"]):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(s["steps"]):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / s["steps"]


def syncs_in(step, s: dict) -> str:
    """ "none", or the first host synchronisation that 5 calls of ``step`` make (CUDA only)."""
    for _ in range(3):
        step()
    if s["device"] != "cuda":  # the sync debug mode exists for CUDA only
        return "not checked on cpu"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            step()
        return "none"
    except RuntimeError as err:
        return str(err).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def check_syncs(s: dict, batch: int) -> None:
    report(check="host_syncs_in_wcl_step", batch=batch, syncs=syncs_in(wcl_step_fn(s, batch), s))


def multicrop_cost(s: dict, batch: int, small_crops: int = 6) -> None:
    """The multi-crop step against the two-view step on the same batch, and its syncs."""
    two_views = seconds_per_call(wcl_step_fn(s, batch), s)
    step = wcl_step_fn(s, batch, small_crops=small_crops)
    multicrop = seconds_per_call(step, s)
    report(check="multicrop_cost_r50", batch=batch, small_crops=small_crops,
           small_size=round(s["size"] * 96 / 224), two_view_s=two_views,
           multicrop_s=multicrop, cost_ratio=multicrop / two_views,
           syncs=syncs_in(step, s))  # fmt: skip


def peak_gib(s: dict) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if s["device"] == "cuda" else float("nan")


def throughput(s: dict, batch: int, compile_backbone: bool) -> None:
    if s["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    wcl = seconds_per_call(wcl_step_fn(s, batch, compile_backbone), s)
    wcl_peak = peak_gib(s)
    sup = seconds_per_call(supervised_step_fn(s, batch), s)
    # WCL's backbone sees 2 x batch crops a step: the supervised step on as many crops is
    # the like-for-like baseline for the heads, graph and losses' cost.
    sup_views = seconds_per_call(supervised_step_fn(s, 2 * batch), s)
    report(check="wcl_vs_supervised_r50_224", batch=batch, compile=compile_backbone,
           wcl_images_per_s=batch / wcl, supervised_images_per_s=batch / sup,
           cost_ratio=wcl / sup, cost_ratio_same_crops=wcl / sup_views,
           wcl_peak_gib=wcl_peak)  # fmt: skip


def ours_vs_release(s: dict, batch: int) -> None:
    """Whole step, ours against the release's way, on the device (where the release's host
    round trip for the labels stalls the GPU every step)."""
    ours = seconds_per_call(wcl_step_fn(s, batch), s)
    release = seconds_per_call(wcl_step_fn(s, batch, release=True), s)
    report(check="wcl_step_ours_vs_release", batch=batch, ours_s=ours, release_s=release,
           speedup=release / ours)  # fmt: skip


def cifar_epoch(s: dict) -> None:
    device = torch.device(s["device"])
    count, batch = s["cifar_images"], s["cifar_batch"]
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, device=device)
    augment = batch_strong_pipeline(32, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)).to(device)
    backbone = build_backbone("resnet18" if s["device"] == "cuda" else s["arch"], "small")
    model = WCL(backbone, backbone.feature_dim, 2048, 128).to(
        device, memory_format=torch.channels_last
    )
    optimizer = LARS(param_groups(model, 1e-6), lr=0.1)
    synchronize(device)
    start = time.perf_counter()
    order = torch.randperm(count)
    for i in range(count // batch):
        idx = order[i * batch : (i + 1) * batch]
        s1, s2 = two_view_seeds(0, 0, idx)
        x = images[idx.to(device)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(augment(x, s1), augment(x, s2))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(device)
    report(check="cifar_resnet18_epoch_data_on_gpu", images=count, batch=batch,
           epoch_s=time.perf_counter() - start)  # fmt: skip


def hybrid_device_share(s: dict, batch: int) -> None:
    """The device's part of data.augment=hybrid (crops arrive made) against a WCL step."""
    device = torch.device(s["device"])
    size = s["size"]
    augment = batch_strong_pipeline(size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    augment = augment.to(device)
    crops = torch.randint(0, 256, (2, batch, 3, size, size), dtype=torch.uint8, device=device)
    seeds1, seeds2 = two_view_seeds(0, 0, range(batch))

    def views():
        augment(crops[0], seeds1, False), augment(crops[1], seeds2, False)

    aug = seconds_per_call(views, s)
    step = seconds_per_call(wcl_step_fn(s, batch), s)
    report(check="hybrid_device_share_224", batch=batch, augment_s=aug, step_s=step,
           augment_over_step=aug / step)  # fmt: skip


def blur_kernels(s: dict, batch: int) -> None:
    """Depthwise-convolution blur against shifted sums, on the device, same images."""
    device = torch.device(s["device"])
    size = s["size"]
    k = blur_kernel_size(size)
    images = torch.rand(batch, 3, size, size, device=device)
    sigma = torch.linspace(0.1, 2.0, batch)
    depthwise = depthwise_gaussian_blur(images, sigma, k)
    shifted = shifted_gaussian_blur(images, sigma, k)
    max_diff = (depthwise - shifted).abs().max().item()
    depthwise_s = seconds_per_call(lambda: depthwise_gaussian_blur(images, sigma, k), s)
    shifted_s = seconds_per_call(lambda: shifted_gaussian_blur(images, sigma, k), s)
    report(check="blur_kernels", batch=batch, size=size, depthwise_s=depthwise_s,
           shifted_s=shifted_s, depthwise_over_shifted=depthwise_s / shifted_s,
           max_diff=max_diff)  # fmt: skip


def bitwise_reruns(s: dict, batch: int, steps: int = 3) -> None:
    """Two runs from the same seed: identical parameters after ``steps`` steps or not,
    with the default algorithms and with only deterministic ones."""
    found = {}
    for deterministic in (False, True):
        with deterministic_algorithms(deterministic):
            states = []
            for _ in range(2):
                torch.manual_seed(0)
                step = wcl_step_fn(s, batch)
                for _ in range(steps):
                    step()
                states.append({k: v.clone() for k, v in step.model.state_dict().items()})
            mode = "deterministic" if deterministic else "default"
            found[f"{mode}_equal"] = all(torch.equal(states[0][k], states[1][k]) for k in states[0])
            found[f"{mode}_step_s"] = seconds_per_call(step, s)
    found["deterministic_cost"] = found["deterministic_step_s"] / found["default_step_s"]
    report(check="bitwise_reruns_r50", batch=batch, steps=steps, **found)


def fp16_cost(s: dict, batch: int) -> None:
    """The float16 step with loss scaling against the bf16 step, on the same batch."""
    bf16 = seconds_per_call(wcl_step_fn(s, batch), s)
    step = wcl_step_fn(s, batch, dtype=torch.float16)
    fp16 = seconds_per_call(step, s)
    finite = all(bool(p.isfinite().all()) for p in step.model.parameters())
    report(check="fp16_vs_bf16_r50", batch=batch, bf16_step_s=bf16, fp16_step_s=fp16,
           cost_ratio=fp16 / bf16, loss_scale=step.scaler.get_scale(),
           parameters_finite=finite)  # fmt: skip


def view_passes(s: dict, batch: int) -> None:
    """One network pass over both views against one pass per view, same batch."""
    per_view = seconds_per_call(wcl_step_fn(s, batch), s)
    one_pass = seconds_per_call(wcl_step_fn(s, batch, concat_views=True), s)
    report(check="view_passes_r50", batch=batch, per_view_step_s=per_view,
           one_pass_step_s=one_pass, speedup=per_view / one_pass)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="tiny, on the CPU")
    args = parser.parse_args()
    s = DRY if args.dry_run else FULL
    batches = (4, 8) if args.dry_run else (128, 256)
    name = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name()
    OUT_FILE.parent.mkdir(parents=True, exist_ok=True)
    OUT_FILE.write_text("")
    report(device=name, torch=torch.__version__)
    attempt(check_syncs, s, batches[0])
    attempt(throughput, s, batches[0], compile_backbone=False)
    if not args.quick:
        attempt(throughput, s, batches[1], compile_backbone=False)
        attempt(ours_vs_release, s, batches[0])
        attempt(cifar_epoch, s)
        attempt(hybrid_device_share, s, batches[0])
        attempt(blur_kernels, s, batches[0])
        attempt(multicrop_cost, s, batches[0])
        attempt(bitwise_reruns, s, batches[0])
        attempt(fp16_cost, s, batches[0])
        attempt(view_passes, s, batches[0])
        if not args.dry_run:  # compiling on the CPU takes minutes and tells nothing here
            # Last: compilation is the slowest and likeliest part to fail on a new machine.
            attempt(throughput, s, batches[0], compile_backbone=True)


if __name__ == "__main__":
    main()
