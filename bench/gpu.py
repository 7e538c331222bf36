"""GPU checks and figures, in one prepared run (one H200: about 5 minutes).

``python bench/gpu.py [--quick]`` needs CUDA. It prints one JSON line per measurement and
writes them to $OUT/gpu.jsonl (or runs/bench/gpu.jsonl):

1. host synchronisations: WCL ResNet-50 training steps (weak labels, both losses, backward,
   LARS) under ``torch.cuda.set_sync_debug_mode("error")``: any sync raises;
2. WCL ResNet-50, 224 px, bf16 autocast + channels_last: images/s against a plain
   supervised ResNet-50 step (cross-entropy) on the same batch, the ratio WCL / supervised
   (WCL runs the backbone on two views, so 2.0 would be "no extra cost");
3. the same with ``torch.compile`` on the backbone;
4. peak GPU memory at per-GPU batch 128 and 256;
5. epoch time of CIFAR-size WCL ResNet-18 (small stem, 32 px, batch 512) with the 50,000
   images held on the GPU as uint8 and augmented there with ``BatchAugment``.
``--quick`` runs only 1 and 2 at batch 128.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from wcl.backbones import build_backbone
from wcl.data import batch_strong_pipeline, two_view_seeds
from wcl.model import WCL
from wcl.optim import LARS, param_groups

RESULTS: list[dict] = []


def report(**record) -> None:
    RESULTS.append(record)
    print(json.dumps(record), flush=True)


def wcl_step_fn(batch: int, size: int = 224, compile_backbone: bool = False):
    device = torch.device("cuda")
    backbone = build_backbone("resnet50")
    model = WCL(backbone, backbone.feature_dim, 4096, 256).to(
        device, memory_format=torch.channels_last
    )
    if compile_backbone:
        model.backbone = torch.compile(model.backbone)
    optimizer = LARS(param_groups(model, 1e-6), lr=0.1)
    x1 = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    x2 = torch.randn_like(x1)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x1, x2)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def supervised_step_fn(batch: int, size: int = 224):
    device = torch.device("cuda")
    net = build_backbone("resnet50")
    fc = torch.nn.Linear(2048, 1000)
    model = torch.nn.Sequential(net, fc).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def images_per_s(step, batch: int, steps: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def check_syncs(batch: int) -> None:
    step = wcl_step_fn(batch)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            step()
        found = "none"
    except RuntimeError as err:
        found = str(err).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    report(check="host_syncs_in_wcl_step", batch=batch, syncs=found)


def throughput(batch: int, compile_backbone: bool) -> None:
    torch.cuda.reset_peak_memory_stats()
    wcl = images_per_s(wcl_step_fn(batch, compile_backbone=compile_backbone), batch)
    wcl_peak = torch.cuda.max_memory_allocated() / 2**30
    sup = images_per_s(supervised_step_fn(batch), batch)
    report(check="wcl_vs_supervised_r50_224", batch=batch, compile=compile_backbone,
           wcl_images_per_s=wcl, supervised_images_per_s=sup, cost_ratio=sup / wcl,
           wcl_peak_gib=wcl_peak)  # fmt: skip


def cifar_epoch() -> None:
    device = torch.device("cuda")
    images = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8, device=device)
    augment = batch_strong_pipeline(32, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)).to(device)
    backbone = build_backbone("resnet18", "small")
    model = WCL(backbone, 512, 2048, 128).to(device, memory_format=torch.channels_last)
    optimizer = LARS(param_groups(model, 1e-6), lr=0.1)
    batch = 512
    torch.cuda.synchronize()
    start = time.perf_counter()
    order = torch.randperm(50_000)
    for i in range(50_000 // batch):
        idx = order[i * batch : (i + 1) * batch]
        s1, s2 = two_view_seeds(0, 0, idx)
        x = images[idx.to(device)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(augment(x, s1), augment(x, s2))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    torch.cuda.synchronize()
    report(check="cifar_resnet18_epoch_data_on_gpu", batch=batch,
           epoch_s=time.perf_counter() - start)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    report(device=torch.cuda.get_device_name(), torch=torch.__version__)
    check_syncs(128)
    throughput(128, compile_backbone=False)
    if not args.quick:
        throughput(256, compile_backbone=False)
        throughput(128, compile_backbone=True)
        cifar_epoch()
    out = Path(os.environ.get("OUT", "runs/bench"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RESULTS))


if __name__ == "__main__":
    main()
