"""Export a backbone: plain torchvision state dict, safetensors, JSON sidecar, optional ONNX.

``OUT_DIR/backbone.pt`` holds only tensors keyed like torchvision's ResNets, so for a
standard backbone (ResNet-18/34/50/101, ImageNet stem, 3 channels, width 64)
``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` reports only
``fc.weight`` / ``fc.bias`` missing. Other backbones (small stem, other widths, ResNet-10,
greyscale input) load into ``wcl.backbones.build_backbone(**spec)``; ``backbone.json``
says which, and how images must be prepared.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path

import torch
from torch.torch_version import TorchVersion

from wcl.atomic import atomic_write, write_json
from wcl.preprocess import input_size, preprocessing
from wcl.weights import BackboneSpec, load_backbone

__all__ = ["OnnxUnavailableError", "export_backbone", "input_size"]


class OnnxUnavailableError(RuntimeError):
    """ONNX export was asked for but ``onnx`` / ``onnxscript`` are missing, or torch or
    onnxscript is older than the exporter needs (``ONNX_MIN_TORCH``, ``ONNX_MIN_ONNXSCRIPT``)."""


def _sidecar(spec: BackboneSpec, config: dict | None, source: Path, files: dict) -> dict:
    args = f"{spec.name!r}, stem={spec.stem!r}, in_channels={spec.in_channels}, width={spec.width}"
    rebuild = {"wcl": f"wcl.backbones.build_backbone({args})"}
    if spec.torchvision_compatible:
        rebuild["torchvision"] = (
            f"torchvision.models.{spec.name}(); load_state_dict(sd, strict=False) "
            "(only fc.weight and fc.bias are missing; set fc = torch.nn.Identity() for features)"
        )
    prep = preprocessing(spec, config)
    return {
        "format": "wcl-backbone",
        "backbone": spec.to_dict(),
        "torchvision_compatible": spec.torchvision_compatible,
        "rebuild": rebuild,
        "input": {
            "shape": ["batch", spec.in_channels, prep.crop, prep.crop],
            "normalisation": {
                "dataset": prep.stats,
                "mean": list(prep.mean),
                "std": list(prep.std),
                "pixel_scale": "[0, 1]",
            },  # fmt: skip
            # What `wcl embed` does to an image file's pixels (uint8, C x H x W) first.
            "preprocessing": prep.to_dict(),
        },
        "output": {"shape": ["batch", spec.feature_dim], "what": "global-average-pooled features"},
        "source": str(source),
        "files": files,
    }


# The oldest releases whose exporter writes our backbones with a dynamic batch (torch 2.5
# fails on the flatten, 2.6 and onnxscript < 0.7 on later passes; seen in a compat run).
ONNX_MIN_TORCH = "2.7"
ONNX_MIN_ONNXSCRIPT = "0.7"


def _require_onnx() -> None:
    # torch's ONNX exporter (dynamo=True) needs both packages, at releases that work.
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise OnnxUnavailableError(
            f"ONNX export needs the {' and '.join(missing)} package(s): "
            "pip install onnx 'onnxscript>=0.7' (or pip install 'wcl[onnx]')"
        )
    found = {"torch": torch.__version__, "onnxscript": importlib.metadata.version("onnxscript")}
    needed = {"torch": ONNX_MIN_TORCH, "onnxscript": ONNX_MIN_ONNXSCRIPT}
    # TorchVersion compares release numbers (2.11 > 2.7), local tags (+cu130) included.
    old = [
        f"{name}>={needed[name]} (found {version})"
        for name, version in found.items()
        if TorchVersion(version) < needed[name]
    ]
    if old:
        raise OnnxUnavailableError(
            f"ONNX export needs {' and '.join(old)}; the other exports work on this install"
        )


def _export_onnx(module: torch.nn.Module, spec: BackboneSpec, size: int, path: Path) -> None:
    example = torch.zeros(2, spec.in_channels, size, size)
    batch = torch.export.Dim("batch")
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        torch.onnx.export(
            module,
            (example,),
            str(tmp),
            input_names=["images"],
            output_names=["features"],
            dynamic_shapes=({0: batch},),  # by position: releases disagree on what dict keys name
            dynamo=True,
            external_data=False,
            verbose=False,
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_backbone(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    onnx: bool = False,
    name: str = "backbone",
) -> dict[str, Path]:
    """Write the backbone of ``checkpoint`` (any source :func:`load_backbone` reads).

    Files in ``out_dir``: ``{name}.pt`` (plain state dict, ``torch.save``),
    ``{name}.safetensors`` (same tensors; the spec in its metadata), ``{name}.json``
    (sidecar: architecture, rebuild recipe, input size and normalisation) and, with
    ``onnx``, ``{name}.onnx`` (input ``images`` (B, C, H, W) float32 with a dynamic batch,
    output ``features`` (B, feature_dim); H = W = the training image size). Returns
    {"pt" | "safetensors" | "json" | "onnx": path}. Raises OnnxUnavailableError, before
    anything is written, when ONNX is asked for without the packages (or too old ones).
    """
    if onnx:
        _require_onnx()  # before anything is read or written
    loaded = load_backbone(checkpoint)
    spec, module = loaded.spec, loaded.module.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"pt": out / f"{name}.pt", "safetensors": out / f"{name}.safetensors"}
    if onnx:
        paths["onnx"] = out / f"{name}.onnx"
    else:  # an earlier export's ONNX file would no longer match the weights and the JSON
        (out / f"{name}.onnx").unlink(missing_ok=True)
    paths["json"] = out / f"{name}.json"

    # Detached contiguous copies: safetensors refuses views and shared storage.
    state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    atomic_write(paths["pt"], lambda f: torch.save(state, f))

    from safetensors.torch import save

    blob = save(state, metadata={"wcl_backbone": json.dumps(spec.to_dict())})
    atomic_write(paths["safetensors"], lambda f: f.write(blob))

    if onnx:
        _export_onnx(module, spec, input_size(spec, loaded.config), paths["onnx"])
    files = {kind: path.name for kind, path in paths.items() if kind != "json"}
    write_json(paths["json"], _sidecar(spec, loaded.config, Path(checkpoint), files))
    return paths
