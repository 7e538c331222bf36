"""How the evaluation commands split their work over processes (torchrun / SLURM / one).

Training data: a :class:`~torch.utils.data.distributed.DistributedSampler` splits each
epoch's permutation (a function of (seed, epoch)) so that global batch k is the same set
of images for any number of processes W; each process takes ``batch / W`` of it and DDP
averages the gradients, which equals the gradient of the global batch's mean loss.

Evaluation and feature extraction: process r takes samples r, r + W, r + 2W, ... (no
padding, unlike DistributedSampler's), so every sample is counted exactly once; hit
counts are summed (:func:`wcl.dist.all_reduce_sum`) and features are gathered back into
dataset order. One process: every helper here is the identity.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from wcl import dist
from wcl.config import ConfigError

__all__ = [
    "gather_shards",
    "local_batch",
    "my_share",
    "sampled_batches",
    "shard",
    "train_sampler",
    "wrap_ddp",
]

# Rows gathered per collective call, in bytes: bounds the extra device memory of
# gathering a large feature bank (ImageNet: 10.5 GB) to a few hundred MB at a time.
_GATHER_BYTES = 1 << 28


def local_batch(global_batch: int, key: str) -> int:
    """This process's share of a global batch; ConfigError if it does not divide."""
    world = dist.world_size()
    if global_batch % world:
        raise ConfigError(
            f"'{key}' {global_batch} (global) is not divisible by the {world} processes"
        )
    return global_batch // world


def train_sampler(data: Sized, seed: int, drop_last: bool) -> DistributedSampler:
    """A shuffling DistributedSampler over ``data`` for this process.

    ``drop_last`` False pads the permutation with its first images to a multiple of W
    (as the release's linear protocol does); with W dividing the size there is no padding.
    True drops the tail instead, leaving W * floor(N / W) images.
    """
    return DistributedSampler(
        data,  # type: ignore[arg-type]
        num_replicas=dist.world_size(),
        rank=dist.rank(),
        shuffle=True,
        seed=seed,
        drop_last=drop_last,
    )


def sampled_batches(
    x: Tensor, y: Tensor, sampler: DistributedSampler, batch_size: int, epoch: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """This process's mini-batches of in-memory tensors (N, ...) / (N,) for ``epoch``.

    The sampler's indices for the epoch, ``batch_size`` at a time (the last batch may be
    shorter), gathered with one indexing operation per batch on the tensors' device.
    """
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler), dtype=torch.int64, device=x.device)
    for index in order.split(batch_size):
        yield x[index], y[index]


def my_share(n: int) -> range:
    """Indices r, r + W, ... of n samples: each sample goes to exactly one process."""
    return range(dist.rank(), n, dist.world_size())


def shard(data: Dataset) -> Dataset:
    """This process's samples of ``data`` (the whole dataset in one process)."""
    if dist.world_size() == 1:
        return data
    return Subset(data, my_share(len(data)))  # type: ignore[arg-type]


def gather_shards(local: Tensor, n: int, device: torch.device) -> Tensor:
    """The rows (n, ...) in dataset order from every process's :func:`my_share` rows.

    ``local``: this process's rows (len(my_share(n)), ...) on the CPU. Shards are padded
    to the first one's length ceil(n / W), all-gathered in blocks through ``device`` (the
    process group's: a GPU for NCCL), then interleaved: row i of shard r is sample
    r + i * W. Returns a CPU tensor.
    """
    world = dist.world_size()
    if world == 1:
        return local
    length = -(-n // world)
    rest = tuple(local.shape[1:])
    padded = local.new_zeros((length, *rest))
    padded[: len(local)] = local
    row_bytes = max(padded[:1].numel() * padded.element_size(), 1)
    block = max(1, _GATHER_BYTES // (world * row_bytes))
    parts = []
    for start in range(0, length, block):
        rows = dist.gather_no_grad(padded[start : start + block].to(device))
        parts.append(rows.view(world, -1, *rest).cpu())
    whole = torch.cat(parts, dim=1)  # (W, length, ...): shard r in row r
    return whole.transpose(0, 1).reshape(world * length, *rest)[:n]


def wrap_ddp(module: nn.Module) -> nn.Module:
    """``module`` under DistributedDataParallel when there are several processes.

    Train through the wrapper (it averages gradients); save and evaluate the module itself
    (evaluation passes differ in length between processes, and a wrapper with buffers
    would try to broadcast them on every forward).
    """
    return DistributedDataParallel(module) if dist.world_size() > 1 else module
