"""WCL optimiser steps in float64 with a preset's settings, as one process or under torchrun.

``python -m torch.distributed.run --nproc_per_node=W tests/release_worker.py OUT PRESET
GATHER STEPS`` saves each rank's results to OUT/rank{r}.pt; tests call :func:`run` for one
process. The model, optimiser and learning-rate schedule come from the preset through
``wcl.train.build_model`` / ``build_optimizer`` / ``lr_schedule``, as ``wcl pretrain``
builds them; only the network is shrunk (ResNet-10 of width 8, heads 32/16, 16 px grey)
and the global batch is 16 random images, each process taking the contiguous slice
rank*b : (rank+1)*b.
"""

import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from wcl import dist
from wcl.config import Config, load_config
from wcl.optim import set_lr
from wcl.train import build_model, build_optimizer, lr_schedule

GLOBAL_BATCH = 16
STEPS_PER_EPOCH = 2
SIZE = 16


def config(preset: str, gather: str) -> Config:
    small = [
        f"data.root={Path(__file__).parent}",
        "data.channels=1",
        f"data.image_size={SIZE}",
        "model.backbone=resnet10",
        "model.stem=small",
        "model.width=8",
        "model.hidden_dim=32",
        "model.out_dim=16",
        f"model.gather={gather}",
        f"train.batch_size={GLOBAL_BATCH}",
    ]
    return load_config(preset, small)


def batches(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(steps, 16, 1, 16, 16) float64 first and second views of the global batches; the
    first k steps' batches are the same for any ``steps`` >= k."""
    data = torch.Generator().manual_seed(1)
    shape = (2, GLOBAL_BATCH, 1, SIZE, SIZE)
    pairs = [torch.randn(shape, generator=data, dtype=torch.float64) for _ in range(steps)]
    x1 = torch.stack([p[0] for p in pairs]) if pairs else torch.empty(0, *shape[1:])
    x2 = x1 + 0.3 * torch.stack([p[1] for p in pairs]) if pairs else x1
    return x1, x2


def run(preset: str, gather: str, steps: int) -> dict:
    """Losses of every step (mean over processes), the first step's gradients (as DDP
    leaves them: the mean over processes) and the parameters after ``steps`` steps."""
    cfg = config(preset, gather)
    info = dist.init_distributed("gloo", "cpu")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg).double()
    net = model
    if info.world_size > 1:
        model = dist.sync_batchnorm(model, info.device)
        net = DistributedDataParallel(model)
    optimizer = build_optimizer(cfg, model)
    schedule = lr_schedule(cfg, STEPS_PER_EPOCH)
    x1, x2 = batches(steps)
    b = GLOBAL_BATCH // info.world_size
    mine = slice(info.rank * b, (info.rank + 1) * b)
    losses, first_grads = [], {}
    for k in range(steps):
        set_lr(optimizer, schedule(k))
        out = net(x1[k, mine], x2[k, mine])
        optimizer.zero_grad()
        out["loss"].backward()
        if k == 0:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        keys = ("loss", "instance_loss", "graph_loss")
        losses.append({key: dist.all_reduce_mean(out[key].detach()) for key in keys})
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"losses": losses, "grads": first_grads, "params": params}


if __name__ == "__main__":
    out_dir, preset_name, gather_mode, num_steps = sys.argv[1:5]
    result = run(preset_name, gather_mode, int(num_steps))
    torch.save(result, f"{out_dir}/rank{dist.rank()}.pt")
    dist.shutdown()
