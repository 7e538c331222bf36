"""Host cost of the batched augmentation's randomness, per training step.

``python bench/batch_params.py`` times, for per-process batches of 256, 512 and 1024, the
host work ``BatchAugment`` needs each step before any device kernel: the two views' seeds
(``two_view_seeds``) and both views' parameters (``sample_params``). Ours (vectorised
SplitMix64 in NumPy) against the per-sample way it replaced (commit 9ace0d4), written
out here as the baseline (a NumPy ``SeedSequence`` per index, a ``torch.Generator``
reseeded per sample). This runs on the host every step, so on a GPU it must stay well under the
step time or the device waits. Writes runs/bench/batch_params.json.
"""

import json

import numpy as np
import torch
from benchkit import median_seconds, save_results

import wcl.data.batch_augment as module
from wcl.data import batch_strong_pipeline, sample_seed, two_view_seeds
from wcl.data.seeds import _splitmix64


def per_sample_seeds(seed: int, epoch: int, indices: list[int]) -> tuple[torch.Tensor, ...]:
    base = np.array([sample_seed(seed, epoch, i) for i in indices], dtype=np.uint64)
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        views = [_splitmix64(base + np.uint64(v) * golden) for v in (1, 2)]
    return tuple(torch.from_numpy(v.view(np.int64).copy()) for v in views)


def per_sample_uniforms(seeds: torch.Tensor, count: int) -> torch.Tensor:
    out = torch.empty(len(seeds), count, dtype=torch.float64)
    gen = torch.Generator()
    for row, seed in enumerate(seeds.tolist()):
        gen.manual_seed(seed & (2**64 - 1))
        torch.rand(count, generator=gen, dtype=torch.float64, out=out[row])
    return out


def median_ms(fn, reps: int = 20) -> float:
    return median_seconds(fn, reps) * 1e3


def main() -> None:
    aug = batch_strong_pipeline(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    rows = []
    for batch in (256, 512, 1024):
        indices = torch.randperm(50_000)[:batch].tolist()

        def ours(indices=indices):
            for seeds in two_view_seeds(0, 3, indices):
                aug.sample_params(seeds, 32, 32)

        def baseline(indices=indices):

            ours_uniforms = module.uniforms
            module.uniforms = per_sample_uniforms  # the old per-sample draw
            try:
                for seeds in per_sample_seeds(0, 3, indices):
                    aug.sample_params(seeds, 32, 32)
            finally:
                module.uniforms = ours_uniforms

        row = {"batch": batch, "baseline_ms": median_ms(baseline), "ours_ms": median_ms(ours)}
        row["ratio"] = row["baseline_ms"] / row["ours_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| batch | per-sample (before) | vectorised (now) | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['baseline_ms']:.2f} ms | {r['ours_ms']:.2f} ms | {r['ratio']:.1f}x |"
        )
    save_results("batch_params.json", rows)


if __name__ == "__main__":
    main()
