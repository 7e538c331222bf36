"""K WCL optimiser steps on a fixed global batch, as one process or under torchrun.

``python -m torch.distributed.run --nproc_per_node=W tests/dist_worker.py OUT MODE STEPS``
saves each rank's results to OUT/rank{r}.pt; tests call :func:`run` for one process.
MODE is a gather mode, ``+small`` added for multi-crop (3 small crops per image) or
``+concat`` for one network pass over both views (``model.concat_views``).
Each process takes the contiguous slice rank*b : (rank+1)*b of every global batch, so
the global batch has the same row order for any W.
"""

import sys

import torch
from torch.nn.parallel import DistributedDataParallel

from wcl import dist
from wcl.backbones import build_backbone
from wcl.model import WCL
from wcl.optim import LARS, param_groups

GLOBAL_BATCH = 16


def run(mode: str, steps: int) -> dict:
    """float64 throughout, so that rounding cannot hide (or fake) a real difference."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _run(mode, steps)
    finally:
        torch.set_default_dtype(previous)


def _run(mode: str, steps: int) -> dict:
    info = dist.init_distributed("gloo", "cpu")
    gather_mode, _, extra = mode.partition("+")
    torch.manual_seed(0)
    backbone = build_backbone("resnet10", stem="small", in_channels=1, width=8)
    model = WCL(
        backbone, backbone.feature_dim, hidden_dim=32, out_dim=16, gather_mode=gather_mode,
        small_k=2, concat_views=extra == "concat",
    )  # fmt: skip
    net = model
    if info.world_size > 1:
        model = dist.sync_batchnorm(model, info.device)
        net = DistributedDataParallel(model)
    optimizer = LARS(param_groups(model, 1e-6), lr=1.0, momentum=0.9)
    data = torch.Generator().manual_seed(1)
    x1 = torch.randn(steps, GLOBAL_BATCH, 1, 28, 28, generator=data)
    x2 = x1 + 0.3 * torch.randn(steps, GLOBAL_BATCH, 1, 28, 28, generator=data)
    targets = torch.randint(0, 4, (GLOBAL_BATCH,), generator=data)
    small = torch.randn(steps, 3, GLOBAL_BATCH, 1, 12, 12, generator=data)
    b = GLOBAL_BATCH // info.world_size
    mine = slice(info.rank * b, (info.rank + 1) * b)
    history = []
    for k in range(steps):
        crops = small[k, :, mine].flatten(0, 1) if extra == "small" else None
        out = net(x1[k, mine], x2[k, mine], targets[mine], crops)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        record = {key: dist.all_reduce_mean(v.detach()) for key, v in out.items() if v.dim() == 0}
        record.update(labels1=out["labels1"], labels2=out["labels2"])
        history.append(record)
    return {
        "history": history,
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


if __name__ == "__main__":
    out_dir, gather_mode, num_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    result = run(gather_mode, num_steps)
    torch.save(result, f"{out_dir}/rank{dist.rank()}.pt")
    dist.shutdown()
