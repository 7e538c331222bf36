"""Convert the authors' release checkpoints (``wcl-100.pth`` ...) into wcl checkpoints.

Release layout (docs/design.md, "The authors' release"): a dict with ``model`` (the state dict of the
DDP-wrapped model), ``optimizer`` and ``epoch``. Inside ``model``:

====================================  =========================================
release key                           wcl key
====================================  =========================================
``module.net.<torchvision key>``      ``backbone.<torchvision key>``
``module.head1.linear1.*``            ``g.0.*``   (Linear 2048 -> H)
``module.head1.bn1.*``                ``g.1.*``   (BatchNorm1d H)
``module.head1.linear2.*``            ``g.3.*``   (Linear H -> H)
``module.head1.bn2.*``                ``g.4.*``   (BatchNorm1d H)
``module.head1.linear3.*``            ``g.6.*``   (Linear H -> D)
``module.head2.<same layers>``        ``phi.<same indices>``
====================================  =========================================

``head1`` is the instance-discrimination head (the release feeds it to the NT-Xent loss),
so it becomes ``g``; ``head2`` builds the weak-label graph and its loss, so it becomes
``phi``. The layer names are not relied on: a head's layers are taken in the order the
state dict lists them (registration order, which is forward order for these heads),
recognised as Linear (2-d ``weight``) or BatchNorm (``running_mean``), checked to be
Linear, BN, Linear, BN, Linear with chaining shapes, and placed on the Sequential indices
of :func:`wcl.model.projection_head` (ReLUs have no parameters). H and D are read from
the shapes (release 4096/256, paper 2048/128).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from wcl.checkpoint import CheckpointError, save_checkpoint
from wcl.config import Config, sections_from_dict
from wcl.config_files import read_config
from wcl.model import WCL
from wcl.weights import backbone_state, check_finite, infer_spec, read_weights

__all__ = ["HEAD_MAP", "convert_release", "convert_release_state"]

HEAD_MAP = {"head1": "g", "head2": "phi"}
# Sequential indices of Linear, BN, Linear, BN, Linear in wcl.model.projection_head.
_OUR_LAYERS = (("linear", 0), ("bn", 1), ("linear", 3), ("bn", 4), ("linear", 6))
_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _layers(state: dict[str, torch.Tensor], prefix: str) -> list[tuple[str, dict]]:
    """The parameterised layers under ``prefix``, in state-dict order: [(name, {param: t})]."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith(prefix):
            module, _, param = key[len(prefix) :].rpartition(".")
            layers.setdefault(module, {})[param] = value
    return list(layers.items())


def _kind(params: dict[str, torch.Tensor]) -> str:
    if "running_mean" in params:
        return "bn"
    weight = params.get("weight")
    return "linear" if weight is not None and weight.ndim == 2 else "other"


def _map_head(state: dict[str, torch.Tensor], prefix: str, ours: str, in_dim: int) -> dict:
    """``ours.<index>.<param>`` tensors for the release head under ``prefix``."""
    layers = _layers(state, prefix)
    kinds = [_kind(p) for _, p in layers]
    if kinds != [kind for kind, _ in _OUR_LAYERS]:
        found = ", ".join(f"{n}={k}" for (n, _), k in zip(layers, kinds, strict=True))
        raise CheckpointError(
            f"release head {prefix!r} is not Linear-BN-Linear-BN-Linear (found: {found})"
        )
    out: dict[str, torch.Tensor] = {}
    width = in_dim
    for (name, params), (kind, index) in zip(layers, _OUR_LAYERS, strict=True):
        if kind == "linear":
            weight = params["weight"]
            if weight.shape[1] != width:
                raise CheckpointError(
                    f"release layer {prefix}{name} takes {weight.shape[1]} inputs, the layer "
                    f"before gives {width}"
                )
            width = weight.shape[0]
            # A Linear without bias equals one with a zero bias.
            bias = params.get("bias", torch.zeros(width, dtype=weight.dtype))
            out.update({f"{ours}.{index}.weight": weight, f"{ours}.{index}.bias": bias})
        else:
            if params["running_mean"].shape[0] != width:
                raise CheckpointError(f"release layer {prefix}{name} has the wrong width")
            defaults = {
                "weight": torch.ones(width),
                "bias": torch.zeros(width),
                "num_batches_tracked": torch.tensor(0, dtype=torch.long),
            }
            for key in _BN_KEYS:
                out[f"{ours}.{index}.{key}"] = params.get(key, defaults.get(key))
    return out


def convert_release_state(release: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """(WCL state dict, pre-training config dict) for a loaded release checkpoint.

    The config is the ``imagenet-r50-100ep`` preset with the backbone and head sizes read
    from the weights and no data root. Raises CheckpointError naming what does not fit.
    """
    backbone, _ = backbone_state(release)
    try:
        spec = infer_spec(backbone)
    except ValueError as err:
        raise CheckpointError(f"release backbone: {err}") from err
    model = release.get("model", release)
    if not isinstance(model, dict):
        raise CheckpointError("release checkpoint has no 'model' state dict")
    prefix = "module." if any(k.startswith("module.") for k in model) else ""
    model = {k[len(prefix) :]: v for k, v in model.items() if k.startswith(prefix)}
    state = {f"backbone.{k}": v for k, v in backbone.items()}
    for theirs, ours in HEAD_MAP.items():
        if not any(k.startswith(f"{theirs}.") for k in model):
            raise CheckpointError(f"release checkpoint has no '{prefix}{theirs}.*' weights")
        state.update(_map_head(model, f"{theirs}.", ours, spec.feature_dim))
    hidden, out = state["g.0.weight"].shape[0], state["g.6.weight"].shape[0]
    if (state["phi.0.weight"].shape[0], state["phi.6.weight"].shape[0]) != (hidden, out):
        raise CheckpointError("release heads head1 and head2 have different sizes")

    raw = read_config("imagenet-r50-100ep")
    raw["data"]["root"] = None
    raw["model"].update(
        backbone=spec.name,
        stem=spec.stem,
        width=spec.width,
        hidden_dim=int(hidden),
        out_dim=int(out),
    )
    raw["data"]["channels"] = spec.in_channels
    config = sections_from_dict(Config, raw)
    return state, config.to_dict()


def convert_release(src: str | os.PathLike, dst: str | os.PathLike) -> dict[str, Any]:
    """Convert the release checkpoint ``src`` into the wcl checkpoint ``dst``; returns a summary.

    ``src`` is read with ``torch.load(weights_only=True)``: a file that needs pickled
    objects is refused (CheckpointError), never executed. The converted state dict is
    loaded strictly into a :class:`wcl.WCL` of the inferred shape before anything is
    written, so a written file always loads. The release's optimizer state is dropped
    (it belongs to the release's parameter order and LARS, not to ours).
    """
    release = read_weights(src)
    state, config = convert_release_state(release)
    check_finite(src, state, "tensor")
    m = config["model"]
    backbone = infer_spec({k[9:]: v for k, v in state.items() if k.startswith("backbone.")})
    model = WCL(backbone.build(), backbone.feature_dim, m["hidden_dim"], m["out_dim"])
    model.load_state_dict(state, strict=True)  # proves the layout before writing
    epoch = release.get("epoch")
    save_checkpoint(
        {
            "kind": "converted",
            "model": model.state_dict(),
            "config": config,
            "backbone": backbone.to_dict(),
            "source": {
                "file": Path(src).name,
                "layout": "wcl release (module.net / module.head1 / module.head2)",
                "release_epoch": epoch if isinstance(epoch, int) else None,
                "head_map": dict(HEAD_MAP),
            },
        },
        dst,
    )
    return {
        "backbone": backbone.to_dict(),
        "hidden_dim": m["hidden_dim"],
        "out_dim": m["out_dim"],
        "release_epoch": epoch if isinstance(epoch, int) else None,
        "tensors": len(state),
    }
