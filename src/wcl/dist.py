"""Every call that talks to other processes lives here.

One plain process needs no process group: every helper then works on the local tensor
alone. Under ``torchrun`` (or SLURM ``srun``) the process group is created from the
environment with ``torch.distributed``; nothing here launches processes or moves bytes
itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass

import torch
import torch.distributed as tdist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from wcl.config_files import ConfigError

__all__ = [
    "DistInfo",
    "first_host",
    "init_distributed",
    "resolve_device",
    "is_distributed",
    "world_size",
    "rank",
    "is_main",
    "gather",
    "gather_no_grad",
    "all_reduce_mean",
    "all_reduce_sum",
    "max_over_processes",
    "sync_batchnorm",
    "barrier",
    "shutdown",
]

GATHER_MODES = ("exact", "release")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list ("gpu[07-09,12],cpu1" -> "gpu07").

    ``scontrol show hostnames`` is the authority where it exists; the fallback parses the
    common ``prefix[a-b,c]`` form so that a missing scontrol is no obstacle.
    """
    try:
        shown = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        ).stdout.split()
        if shown:
            return shown[0]
    except (OSError, subprocess.CalledProcessError):
        pass
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    return prefix if ranges is None else prefix + ranges.split(",")[0].split("-")[0]


def _slurm_to_torchrun_env() -> None:
    """Map an ``srun`` task's SLURM variables to the ones ``init_process_group`` reads."""
    env = os.environ
    env.setdefault("RANK", env["SLURM_PROCID"])
    env.setdefault("WORLD_SIZE", env["SLURM_NTASKS"])
    env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    if "MASTER_ADDR" not in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        env["MASTER_ADDR"] = first_host(nodes)
    # A port derived from the job id keeps two jobs on one node apart.
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def resolve_device(name: str, key: str = "device") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is a ConfigError
    naming the setting ``key`` it came from (``train.device``, ``run.device``, ...)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # device_count() as well: a GPU process takes device LOCAL_RANK modulo the count.
    if name == "cuda" and not (torch.cuda.is_available() and torch.cuda.device_count() > 0):
        raise ConfigError(f"{key!r} is cuda but no CUDA device is available; set it to auto or cpu")
    return torch.device(name)


def init_distributed(backend: str = "auto", device: str = "auto") -> DistInfo:
    """Join the process group described by the environment, or run as one process.

    ``torchrun`` sets RANK/WORLD_SIZE/LOCAL_RANK; an ``srun`` task with SLURM_NTASKS > 1
    is mapped to those. backend "auto" picks NCCL on CUDA and gloo on CPU. ``device``
    is auto, cpu or cuda; callers check a configured one first with :func:`resolve_device`
    (so that its error names their config key).
    """
    env = os.environ
    if "WORLD_SIZE" not in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        _slurm_to_torchrun_env()
    world = int(env.get("WORLD_SIZE", "1"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if world > 1 and not tdist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        tdist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank(), world_size(), local_rank, dev)


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def gather(x: torch.Tensor, mode: str = "exact") -> tuple[torch.Tensor, int]:
    """Concatenate ``x`` (b, ...) from every process along dim 0: ((W*b, ...), offset).

    ``offset`` = rank * b is where this process's rows sit. mode "exact": the all-gather
    carries gradient (backward sums every process's gradient for each slice), so W
    processes compute the same update as one process with the whole batch. mode
    "release": the other processes' rows carry no gradient, as in the authors' code.
    """
    if mode not in GATHER_MODES:
        raise ValueError(f"gather mode must be one of {GATHER_MODES}, got {mode!r}")
    if not is_distributed():
        return x, 0
    offset = rank() * x.shape[0]
    if mode == "exact":
        return torch.cat(dist_fn.all_gather(x)), offset
    parts = [torch.empty_like(x) for _ in range(world_size())]
    tdist.all_gather(parts, x.detach().contiguous())
    parts[rank()] = x
    return torch.cat(parts), offset


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 without gradient (labels, statistics)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    tdist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over processes, in its dtype (a copy; the input is untouched)."""
    if not is_distributed():
        return x
    y = x.detach().clone()
    tdist.all_reduce(y, op=tdist.ReduceOp.SUM)
    return y


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over processes (a copy; the input is untouched)."""
    if not is_distributed():
        return x
    return all_reduce_sum(x) / world_size()


_control: list = []  # the gloo group for host-side flags, created on first use


def max_over_processes(value: int) -> int:
    """The largest of an integer held by each process, on every process (host-side flags
    such as a pre-emption signal's number).

    Runs over a gloo group on CPU tensors, so with NCCL it costs no GPU synchronisation.
    """
    if not is_distributed():
        return value
    if not _control:
        gloo = tdist.get_backend() == "gloo"
        _control.append(None if gloo else tdist.new_group(backend="gloo"))
    box = torch.tensor([value], dtype=torch.long)
    tdist.all_reduce(box, op=tdist.ReduceOp.MAX, group=_control[0])
    return int(box.item())


class _CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the global batch, for CPU (gloo) runs.

    PyTorch's SyncBatchNorm runs on GPUs only. This one takes the global mean, then the
    global biased variance (two passes, for accuracy), each through a gradient-carrying
    ``all_reduce``, so W processes normalise, update running statistics and back-propagate
    exactly as one process holding the whole batch. Parameter and buffer names are those
    of BatchNorm, so state dicts are interchangeable.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.full((1,), x.numel() / x.shape[1], dtype=x.dtype, device=x.device)
        totals = dist_fn.all_reduce(torch.cat([x.sum(dims), count]))
        n = totals[-1]
        mean = totals[:-1] / n
        centred = x - mean.view(shape)
        var = dist_fn.all_reduce(centred.square().sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = self.momentum
                if factor is None:  # cumulative moving average, as BatchNorm does it
                    factor = 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * n / (n - 1), factor)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with every BatchNorm synchronised over all processes.

    On GPUs: PyTorch's SyncBatchNorm. On the CPU, where PyTorch has none, the gloo-capable
    :class:`_CPUSyncBatchNorm`. One process: ``model`` unchanged.
    """
    if not is_distributed():
        return model
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_to_cpu_sync(model)


def _convert_to_cpu_sync(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, (nn.SyncBatchNorm, _CPUSyncBatchNorm)
    ):
        # The original's dtype and device: a float64 model stays float64.
        like = [*module.parameters(), *module.buffers()]
        factory = {"dtype": like[0].dtype, "device": like[0].device} if like else {}
        synced = _CPUSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats, **factory,
        )  # fmt: skip
        synced.load_state_dict(module.state_dict())
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, _convert_to_cpu_sync(child))
    return module


def barrier() -> None:
    if is_distributed():
        tdist.barrier()


def shutdown() -> None:
    """Leave the process group (every process, after the last collective)."""
    if tdist.is_available() and tdist.is_initialized():
        if _GLOO_DESTRUCTOR_HOLDS_GIL:  # gloo groups: the default one on CPUs, or _control
            # torch < 2.8 destroys a gloo group holding the GIL while it joins the group's
            # worker threads, and a worker may still need the GIL to free the tensors of the
            # last collective: a deadlock (pytorch/pytorch#154976; caught with py-spy on torch
            # 2.5, where 2 of 4 runs of tests/test_eval_dist.py hung without this pause and 0
            # of 8 with it). Letting go of the GIL for a moment lets the workers finish.
            time.sleep(_GLOO_DRAIN_SECONDS)
        tdist.destroy_process_group()
    _control.clear()


_GLOO_DESTRUCTOR_HOLDS_GIL = torch.__version__ < "2.8"
_GLOO_DRAIN_SECONDS = 0.2
