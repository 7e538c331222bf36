"""GPU check: WCL training steps never synchronise with the host; images/s.

Run on a CUDA machine: ``python bench/gpu_sync_check.py [--batch 128] [--size 224]``.
Builds ResNet-50 WCL (release heads 4096/256), bf16 autocast + channels_last, takes a few
warm-up steps, then runs forward (weak labels and both losses included), backward and
the LARS step under ``torch.cuda.set_sync_debug_mode("error")``: any host
synchronisation raises. Prints one JSON line.
"""

import argparse
import json
import time

import torch

from wcl.backbones import build_backbone
from wcl.model import WCL
from wcl.optim import LARS, param_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda")
    backbone = build_backbone("resnet50")
    model = WCL(backbone, backbone.feature_dim, 4096, 256).to(
        device, memory_format=torch.channels_last
    )
    optimizer = LARS(param_groups(model, 1e-6), lr=0.1)
    x1 = torch.randn(args.batch, 3, args.size, args.size, device=device).to(
        memory_format=torch.channels_last
    )
    x2 = torch.randn_like(x1)

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x1, x2)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        return out["loss"].detach()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(args.steps):
            loss = step()
        synced = "none"
    except RuntimeError as err:
        synced = str(err).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(),
                "batch": args.batch,
                "size": args.size,
                "host_syncs": synced,
                "images_per_s": args.steps * args.batch / elapsed if synced == "none" else None,
                "loss": float(loss) if synced == "none" else None,
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            }
        )
    )


if __name__ == "__main__":
    main()
