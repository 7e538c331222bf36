"""How far wcl's Gaussian blur is from the release's PIL blur, in grey levels.

``python bench/pil_blur.py``: scikit-learn's two sample photos, resized to 224 px, blurred
by PIL's ``ImageFilter.GaussianBlur(radius=sigma)`` (what the release's pipeline calls)
and by ``wcl.data.batch_ops.gaussian_blur`` (our per-image and batched pipelines, kernel
``blur_kernel_size(224)`` = 23 taps), for sigma across the drawn range [0.1, 2]. Prints
the mean, 99th percentile and largest |PIL - ours| (0-255, after rounding to uint8, the
4-pixel border left out) next to the blur's own mean effect |PIL - original|.
"""

import numpy as np
import torch
from PIL import Image, ImageFilter
from sklearn.datasets import load_sample_images

from wcl.data.augment import blur_kernel_size
from wcl.data.batch_ops import gaussian_blur

SIZE = 224


def main() -> None:
    print("| photo | sigma | mean diff | 99th pct | max | blur's own mean effect |")
    print("|---|---|---|---|---|---|")
    names = ("china", "flower")
    for name, image in zip(names, load_sample_images().images, strict=True):
        pil = Image.fromarray(image).resize((SIZE, SIZE), Image.BILINEAR)
        original = np.asarray(pil).astype(np.float64)
        tensor = torch.from_numpy(original.copy()).permute(2, 0, 1)[None].float()
        for sigma in (0.1, 0.5, 1.0, 1.5, 2.0):
            theirs = np.asarray(pil.filter(ImageFilter.GaussianBlur(radius=sigma)))
            ours = gaussian_blur(tensor, torch.tensor([sigma]), blur_kernel_size(SIZE))[0]
            ours = ours.round().clamp(0, 255).permute(1, 2, 0).numpy()
            diff = np.abs(theirs.astype(np.float64) - ours)[4:-4, 4:-4]
            effect = np.abs(theirs - original).mean()
            print(
                f"| {name} | {sigma} | {diff.mean():.2f} | {np.percentile(diff, 99):.0f} "
                f"| {diff.max():.0f} | {effect:.2f} |"
            )


if __name__ == "__main__":
    main()
