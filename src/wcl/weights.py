"""Backbone weights in and out: load one from any checkpoint, convert the release, export.

Every file is read with ``torch.load(weights_only=True)`` (through
:func:`wcl.checkpoint.load_checkpoint`) or with safetensors, so opening weights never runs
code: a file holding a pickled object is refused with :class:`CheckpointError`.

Sources :func:`load_backbone` understands, told apart by their keys:

- wcl checkpoints (pre-training, ``wcl convert`` output, fine-tuning): ``model`` holds
  ``backbone.<torchvision key>`` entries;
- the authors' release (``wcl-100.pth`` ...) and its linear-eval files: ``model`` holds
  ``module.net.<torchvision key>``;
- exported or third-party plain state dicts (``.pt`` / ``.pth`` / ``.safetensors``) with
  torchvision ResNet keys (an ``fc`` classifier is ignored).

The architecture is read off the weights themselves (:func:`infer_spec`), so no side file
is needed to rebuild a network; ``wcl export`` still writes one for people and other tools.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wcl.backbones import BACKBONES, STEMS, build_backbone
from wcl.checkpoint import CheckpointError, check_finite, load_checkpoint

__all__ = [
    "BackboneSpec",
    "LoadedBackbone",
    "backbone_state",
    "check_finite",
    "infer_spec",
    "load_backbone",
    "read_weights",
]

# torchvision's ResNets; any other spec needs wcl.backbones.build_backbone to rebuild.
TORCHVISION_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101")
# Prefixes, outermost first, under which checkpoints we know keep the backbone.
_PREFIXES = ("module.", "backbone.", "net.", "encoder.")


@dataclass(frozen=True)
class BackboneSpec:
    """Everything :func:`wcl.backbones.build_backbone` needs to rebuild a backbone."""

    name: str
    stem: str
    in_channels: int
    width: int

    def build(self) -> nn.Module:
        """A freshly initialised backbone of this shape (pooled features, no ``fc``)."""
        return build_backbone(self.name, self.stem, self.in_channels, self.width)

    @property
    def feature_dim(self) -> int:
        """Width C of the pooled features (B, C)."""
        block, _ = BACKBONES[self.name]
        return self.width * 8 * block.expansion

    @property
    def torchvision_compatible(self) -> bool:
        """True when ``torchvision.models.<name>()`` has exactly this layout (``fc`` aside)."""
        return (
            self.name in TORCHVISION_NAMES
            and self.stem == "imagenet"
            and self.in_channels == 3
            and self.width == 64
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "feature_dim": self.feature_dim}


@dataclass
class LoadedBackbone:
    """A backbone with its weights, the spec it was built from and where they came from.

    ``config`` is the pre-training config (nested dicts) when the checkpoint carries one,
    else None; evaluation uses it for defaults such as the image size.
    """

    module: nn.Module
    spec: BackboneSpec
    source: str  # wcl | release | state_dict
    config: dict[str, Any] | None = None


def _layer_counts(state: Mapping[str, torch.Tensor]) -> list[int]:
    counts = []
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        counts.append(max(blocks) + 1 if blocks else 0)
    return counts


def infer_spec(state: Mapping[str, torch.Tensor]) -> BackboneSpec:
    """The backbone a torchvision-keyed ResNet state dict belongs to, read from its shapes.

    ``conv1.weight`` (width, in_channels, k, k) gives width, input channels and the stem
    (k = 7: ImageNet stem, k = 3: the small-image stem); ``layer1.0.conv3`` tells bottleneck
    from basic blocks; the block indices per stage give the depth. Raises ValueError when the
    keys fit none of :data:`wcl.backbones.BACKBONES`.
    """
    conv1 = state.get("conv1.weight")
    if conv1 is None or conv1.ndim != 4:
        raise ValueError("not a ResNet state dict: no 4-d 'conv1.weight'")
    width, in_channels, kernel = int(conv1.shape[0]), int(conv1.shape[1]), int(conv1.shape[2])
    stems = {7: "imagenet", 3: "small"}
    if kernel not in stems:
        raise ValueError(f"'conv1.weight' has a {kernel}x{kernel} kernel; expected 7x7 or 3x3")
    bottleneck = "layer1.0.conv3.weight" in state
    counts = _layer_counts(state)
    for name, (block, layers) in BACKBONES.items():
        if list(layers) == counts and (block.expansion == 4) == bottleneck:
            return BackboneSpec(name, stems[kernel], in_channels, width)
    kind = "bottleneck" if bottleneck else "basic"
    raise ValueError(f"no known ResNet has {kind} blocks {counts} per stage")


def _strip(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _find_resnet(state: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    """The torchvision-keyed sub-dict of ``state`` (prefixes peeled off), or None."""
    if "conv1.weight" in state:
        return {k: v for k, v in state.items() if not k.startswith("fc.")}
    for prefix in _PREFIXES:
        inner = _strip(state, prefix)
        if inner and (found := _find_resnet(inner)) is not None:
            return found
    return None


def backbone_state(obj: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """The backbone's torchvision-keyed state dict inside a loaded checkpoint, and its kind.

    Kind: ``wcl`` (a wcl checkpoint), ``release`` (``model`` with ``module.net.`` keys, as
    the authors save) or ``state_dict`` (a plain state dict). Raises CheckpointError when no
    ResNet weights are found.
    """
    for key in ("model", "state_dict"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and (found := _find_resnet(inner)) is not None:
            wcl = obj.get("format") == "wcl-checkpoint"
            return found, "wcl" if wcl else ("release" if key == "model" else "state_dict")
    found = _find_resnet(obj)
    if found is not None:
        return found, "state_dict"
    keys = sorted(str(k) for k in obj)[:8]
    raise CheckpointError(
        f"no ResNet backbone weights found (top-level keys: {keys}); expected a wcl "
        "checkpoint, a release checkpoint or a torchvision ResNet state dict"
    )


def read_weights(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint or weights file as a dict, loaded without running any code.

    ``.safetensors`` files go through safetensors; everything else through
    ``torch.load(weights_only=True)``, which refuses pickled objects (CheckpointError).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    return load_checkpoint(path, allow_foreign=True)


def load_backbone(path: str | os.PathLike, strict: bool = True) -> LoadedBackbone:
    """Build the backbone stored in ``path`` (any source listed in this module) on the CPU.

    The module is returned in train mode, as ``nn.Module`` construction leaves it; callers
    that evaluate call ``.eval()``. With ``strict`` every backbone key must match. Tensors
    of the wrong shape, or holding NaN or Inf, are a CheckpointError naming the file and key.
    """
    obj = read_weights(path)
    state, source = backbone_state(obj)
    try:
        spec = infer_spec(state)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from err
    config = obj.get("config") if isinstance(obj.get("config"), dict) else _sidecar_config(path)
    # The weights cannot tell a stride-1 from a stride-2 small stem; the config can.
    stem = ((config or {}).get("model") or {}).get("stem")
    if stem in STEMS and (stem == "imagenet") == (spec.stem == "imagenet"):
        spec = replace(spec, stem=stem)
    module = spec.build()
    _check_shapes(path, state, module.state_dict(), spec)
    check_finite(path, state)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path}: backbone weights do not fit a {spec.name} ({spec.stem} stem, width "
            f"{spec.width}): missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return LoadedBackbone(module, spec, source, config)


def _check_shapes(
    path: str | os.PathLike,
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    spec: BackboneSpec,
) -> None:
    """CheckpointError naming the tensors of ``state`` whose shapes do not fit the backbone
    ``spec`` read off ``conv1.weight`` (load_state_dict would stop with a RuntimeError
    listing all of them)."""
    wrong = [
        f"{key!r} {tuple(tensor.shape)} where {tuple(expected[key].shape)} fits"
        for key, tensor in state.items()
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape)
    ]
    if wrong:
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise CheckpointError(
            f"{path}: backbone weights do not fit together: a {spec.name} ({spec.stem} stem, "
            f"width {spec.width}, as 'conv1.weight' {tuple(state['conv1.weight'].shape)} "
            f"says) needs other shapes for {len(wrong)} tensor{'s' if len(wrong) > 1 else ''}: "
            f"{', '.join(wrong[:3])}{more}"
        )


def _sidecar_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The input settings ``wcl export`` recorded beside an exported file, as config dicts."""
    sidecar = Path(path).with_suffix(".json")
    try:
        info = json.loads(sidecar.read_text())
        normalisation = info["input"]["normalisation"]
        size = int(info["input"]["shape"][-1])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    if info.get("format") != "wcl-backbone":
        return None
    stem = (info.get("backbone") or {}).get("stem")
    resize = ((info["input"].get("preprocessing") or {}).get("resize") or {}).get("short_side")
    data = {"image_size": size, "dataset": normalisation.get("dataset"), "resize": resize}
    return {"data": data, "model": {"stem": stem}}
