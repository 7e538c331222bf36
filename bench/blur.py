"""Gaussian blur kernels: wcl's two blurs against torchvision's.

``python bench/blur.py [--threads 1]`` times, per image, one RGB image at a time (the
per-image pipeline's case) and whole batches (the batched pipeline's case), at 32 and
224 px: (a) ``torchvision.transforms.v2.functional.gaussian_blur`` (a k x k convolution),
looped over images with their own sigma; (b) two depthwise 1-D convolutions with
per-sample kernels (``wcl.data.batch_ops.depthwise_gaussian_blur``, wcl's blur on a GPU);
(c) shifted sums over the taps within 4 sigma, a few samples at a time
(``wcl.data.batch_ops.shifted_gaussian_blur``, wcl's blur on a CPU, per image and
batched). Kernel size as the pipelines use (10% of the side), sigma spread over [0.1, 2].
Prints median ms per image and ratios against (a); writes runs/bench/blur.json.
"""

import argparse
import json

import torch
from benchkit import median_seconds, save_results
from torchvision.transforms.v2 import functional as TF

from wcl.data import blur_kernel_size
from wcl.data.batch_ops import depthwise_gaussian_blur, shifted_gaussian_blur


def torchvision_blur(images: torch.Tensor, sigma: torch.Tensor, k: int) -> torch.Tensor:
    return torch.stack(
        [TF.gaussian_blur(x, [k, k], [float(s)]) for x, s in zip(images, sigma, strict=True)]
    )


def per_image_ms(
    fn, images: torch.Tensor, sigma: torch.Tensor, k: int, batch: int, reps: int
) -> float:
    """Median ms per image over ``reps`` passes, ``batch`` images a call."""

    def one_pass() -> None:
        for start in range(0, len(images), batch):
            fn(images[start : start + batch], sigma[start : start + batch], k)

    return median_seconds(one_pass, reps) / len(images) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for size, batch, count in ((32, 1, 256), (32, 256, 256), (224, 1, 16), (224, 16, 16)):
        # The same images and sigmas one at a time (per-image pipeline) or batched.
        images = torch.rand(count, 3, size, size)
        sigma = torch.linspace(0.1, 2.0, count)
        k = blur_kernel_size(size)
        ref = torchvision_blur(images, sigma, k)
        row = {"size": size, "batch": batch, "kernel": k}
        for name, fn in (("torchvision", torchvision_blur), ("depthwise", depthwise_gaussian_blur),
                         ("shifted", shifted_gaussian_blur)):  # fmt: skip
            # shifted: the skipped taps weigh < 6.4e-5 (tests/test_batch_augment.py)
            torch.testing.assert_close(fn(images, sigma, k), ref, atol=1.3e-4, rtol=0)
            row[name] = per_image_ms(fn, images, sigma, k, batch, args.reps)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        "\n| images | kernel | (a) torchvision | (b) depthwise | (c) shifted | (a)/(b) | (a)/(c) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} x {r['size']} px | {r['kernel']} | {r['torchvision']:.3f} ms | "
            f"{r['depthwise']:.3f} ms | {r['shifted']:.3f} ms | "
            f"{r['torchvision'] / r['depthwise']:.1f}x | {r['torchvision'] / r['shifted']:.1f}x |"
        )
    save_results("blur.json", rows)


if __name__ == "__main__":
    main()
