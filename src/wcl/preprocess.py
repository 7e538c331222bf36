"""What a backbone expects of an image: channels, resize, centre crop and normalisation.

One description serves ``wcl embed``, the evaluation commands' test pipeline and the
``backbone.json`` that ``wcl export`` writes, so that the three agree: a plain
torchvision (or any) pipeline built from the JSON alone gives ``wcl embed``'s input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import v2

from wcl.data import dataset_stats, stats_name
from wcl.data.augment import ToChannels
from wcl.weights import BackboneSpec

__all__ = ["Preprocessing", "default_resize", "input_size", "preprocessing"]


def input_size(spec: BackboneSpec, config: dict[str, Any] | None) -> int:
    """Image side (pixels) the backbone was trained on: the config's, else 224 / 32 by stem."""
    size = ((config or {}).get("data") or {}).get("image_size")
    if isinstance(size, int) and size > 0:
        return size
    return 224 if spec.stem == "imagenet" else 32


def default_resize(crop: int, stem: str) -> int:
    """Short side before the centre crop: 256/224 of it for the ImageNet stem (Resize(256)
    + CenterCrop(224), the release's test pipeline), the crop itself otherwise."""
    return round(crop * 256 / 224) if stem == "imagenet" else crop


@dataclass(frozen=True)
class Preprocessing:
    """uint8 image (C, H, W) -> the float32 (channels, crop, crop) tensor a backbone takes."""

    channels: int  # 1: RGB to luma (ITU-R BT.601); 3: grey repeated
    resize: int  # short side (pixels), bilinear with antialiasing
    crop: int  # side (pixels) of the centre crop
    stats: str  # the data set whose mean / std normalise (the pre-training one)
    mean: tuple[float, ...]  # per channel, for pixels scaled to [0, 1]
    std: tuple[float, ...]

    def transform(self) -> v2.Compose:
        return v2.Compose(
            [
                ToChannels(self.channels),
                v2.Resize(self.resize, antialias=True),
                v2.CenterCrop(self.crop),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(self.mean), list(self.std)),
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        """The steps in order, each with what a pipeline outside wcl needs to redo it."""
        conversion = "RGB to luma (ITU-R BT.601)" if self.channels == 1 else "grey repeated"
        return {
            "steps": ["channels", "resize", "center_crop", "scale", "normalize"],
            "channels": {"count": self.channels, "conversion": conversion},
            "resize": {"short_side": self.resize, "interpolation": "bilinear", "antialias": True},
            "center_crop": self.crop,
            "scale": "uint8 / 255 to [0, 1] float32",
            "normalize": {"dataset": self.stats, "mean": list(self.mean), "std": list(self.std)},
        }


def preprocessing(
    spec: BackboneSpec,
    config: dict[str, Any] | None,
    crop: int | None = None,
    resize: int | None = None,
) -> Preprocessing:
    """A backbone's preprocessing from its spec and pre-training config (nested dicts, or
    None): its training image size as the crop, :func:`default_resize`, the pre-training
    data set's statistics (ImageNet's when unknown). ``crop`` / ``resize`` override."""
    data = (config or {}).get("data") or {}
    crop = crop or input_size(spec, config)
    if resize is None:
        resize = data.get("resize") if crop == input_size(spec, config) else None
    resize = resize or default_resize(crop, spec.stem)
    stats = stats_name(data.get("dataset"))
    mean, std = dataset_stats(stats, spec.in_channels)
    return Preprocessing(spec.in_channels, resize, crop, stats, tuple(mean), tuple(std))
