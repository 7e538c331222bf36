"""Per-sample seeds: every random draw of a view is a pure function of (seed, epoch, index).

The per-image pipelines (:class:`~wcl.data.augment.TwoViews`) seed torch's generator per
sample with :func:`sample_seed`; the batched ones (:class:`~wcl.data.batch_augment.BatchAugment`)
take each view's seed from :func:`view_seeds` and draw its parameters with
:func:`uniforms`, SplitMix64 vectorised over the batch in NumPy (it runs on the host every
step). Either way a sample's views do not depend on its batch, its position, the worker
count, the number of processes or resumption.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["sample_seed", "two_view_seeds", "uniforms", "view_seeds"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 64-bit seed that is a pure function of (seed, epoch, index)."""
    # SeedSequence hashes its entropy, so neighbouring (epoch, index) pairs give unrelated
    # streams; the modulo makes negative seeds valid entropy.
    entropy = [seed % 2**64, epoch % 2**64, index % 2**64]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays: a bijection that mixes every input bit."""
    x = x.copy()
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # odd: k * golden differs for every k mod 2**64


def _hash64(*parts: np.ndarray | int) -> np.ndarray:
    """Well-mixed uint64 hash of the given uint64 parts (arrays broadcast), one SplitMix64
    finaliser per part."""
    state = np.uint64(0x6A09E667F3BCC909)
    with np.errstate(over="ignore"):
        for part in parts:
            state = _splitmix64(np.asarray(state ^ np.asarray(part, dtype=np.uint64)) + _GOLDEN)
    return state


def view_seeds(
    seed: int, epoch: int, indices: torch.Tensor | Sequence[int], count: int
) -> list[torch.Tensor]:
    """Per-sample seeds of views 1..count, each int64 ``(B,)``, for dataset ``indices``.

    Each is a pure function of ``(seed, epoch, index, view)``: a hash of the first three
    plus ``view`` times an odd constant, mixed by a bijection, so the views of a sample
    always differ. Vectorised (no per-sample Python), since it runs on the host every
    training step. Seeds are 64-bit patterns stored as (possibly negative) int64.
    """
    index = torch.as_tensor(indices, dtype=torch.int64).cpu().numpy().astype(np.uint64)
    base = _hash64(seed % 2**64, epoch % 2**64, index)
    with np.errstate(over="ignore"):
        views = [_splitmix64(base + np.uint64(v) * _GOLDEN) for v in range(1, count + 1)]
    return [torch.from_numpy(v.view(np.int64).copy()) for v in views]


def two_view_seeds(
    seed: int, epoch: int, indices: torch.Tensor | Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample seeds of view 1 and view 2: the first two of :func:`view_seeds`."""
    view1, view2 = view_seeds(seed, epoch, indices, 2)
    return view1, view2


def uniforms(seeds: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` float64 uniforms in [0, 1) per seed, ``(B, count)``; row b depends on seeds[b] only.

    Column k is output k + 1 of SplitMix64 started at the seed (its state advances by the
    golden gamma; each output is the finaliser of the state), 53 bits each: vectorised
    over the batch, where a torch.Generator reseeded per row cost 5 us a sample.
    """
    state = seeds.cpu().numpy().astype(np.int64).view(np.uint64)[:, None]
    steps = np.arange(1, count + 1, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        bits = _splitmix64(state + steps * _GOLDEN)
    return torch.from_numpy((bits >> np.uint64(11)).astype(np.float64) * 2.0**-53)
