"""LARS optimiser, parameter grouping and learning-rate schedule for WCL pre-training.

WCL trains with SGD + momentum wrapped in LARS (layer-wise adaptive rate scaling), a
square-root batch-size scaling of the base learning rate, and a per-iteration schedule of
linear warm-up followed by cosine decay. Biases and normalisation-layer parameters are
excluded from both weight decay and the LARS adaptation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["LARS", "LARS_EXCLUDE", "NORM_LAYERS", "lr_at", "param_groups", "scaled_lr", "set_lr"]

# Every module whose parameters are affine scale/shift of a normalisation. _NormBase covers
# BatchNorm{1,2,3}d, their Lazy variants, SyncBatchNorm and InstanceNorm{1,2,3}d.
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose per-tensor update is rescaled by the LARS trust ratio.

    For each parameter ``w`` with gradient ``g`` in a group with ``lars=True``::

        g = g + weight_decay * w
        g = g * trust_coefficient * |w| / (|g| + eps)   if |w| > 0 and |g| > 0
        buf = g (first step) or momentum * buf + g;  w -= lr * buf

    where ``|.|`` is the L2 norm of the whole tensor. Groups with ``lars=False`` get plain
    momentum SGD: no weight decay and no adaptation, whatever their ``weight_decay`` says.
    The momentum rule matches ``torch.optim.SGD`` (dampening 0, no Nesterov), and the state
    key is the same (``momentum_buffer``).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        trust_coefficient: float = 1e-3,
        eps: float = 0.0,
    ) -> None:
        for name, value in (
            ("lr", lr),
            ("momentum", momentum),
            ("weight_decay", weight_decay),
            ("trust_coefficient", trust_coefficient),
            ("eps", eps),
        ):
            if value < 0.0:
                raise ValueError(f"LARS: {name} must be >= 0, got {value}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
            "lars": True,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Apply one update to every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                if group["lars"]:
                    update = _lars_update(
                        p, p.grad, group["weight_decay"], group["trust_coefficient"], group["eps"]
                    )
                else:
                    update = p.grad
                self._momentum_step(p, update, group["lr"], group["momentum"])
        return loss

    def _momentum_step(
        self, p: torch.Tensor, update: torch.Tensor, lr: float, momentum: float
    ) -> None:
        """SGD's momentum rule: buffer starts as the first update, then buf = m*buf + update."""
        if momentum != 0.0:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                # Clone: for lars=False groups ``update`` is p.grad itself, which the user owns.
                buf = torch.clone(update).detach()
                state["momentum_buffer"] = buf
            else:
                buf.mul_(momentum).add_(update)
            update = buf
        p.add_(update, alpha=-lr)


def _lars_update(
    p: torch.Tensor, grad: torch.Tensor, weight_decay: float, trust: float, eps: float
) -> torch.Tensor:
    """Weight-decayed, trust-ratio-scaled copy of ``grad`` (same shape as ``p``)."""
    # ``add`` (not ``add_``) so that p.grad stays what backward produced.
    update = grad.add(p, alpha=weight_decay) if weight_decay != 0.0 else grad.clone()
    w_norm = torch.linalg.vector_norm(p)
    g_norm = torch.linalg.vector_norm(update)
    # torch.where instead of a Python branch keeps the step free of host synchronisation;
    # the discarded inf/nan from a zero denominator never reaches the result.
    ratio = torch.where(
        (w_norm > 0) & (g_norm > 0),
        trust * w_norm / (g_norm + eps),
        torch.ones_like(w_norm),
    )
    return update.mul_(ratio)


def _is_excluded(module: nn.Module, local_name: str) -> bool:
    """True for biases and for every parameter owned by a normalisation layer."""
    return isinstance(module, NORM_LAYERS) or local_name == "bias"


LARS_EXCLUDE = ("type", "name")


def param_groups(
    model: nn.Module, weight_decay: float, exclude: str = "type"
) -> list[dict[str, Any]]:
    """Split trainable parameters into a LARS group and an excluded (no decay/adaptation) group.

    exclude "type": every parameter of a normalisation layer (chosen by module type, see
    ``NORM_LAYERS``) and every parameter registered under the attribute name ``bias``.
    exclude "name": the authors' rule, every parameter whose full name (as
    ``model.named_parameters()`` gives it) contains "bn" or "bias". On a torchvision ResNet
    it adapts and decays the weight of the BatchNorm at ``downsample.1``, and on WCL's
    heads the weights of their BatchNorms (``g.1``, ``g.4``, ...), as the release does.
    A parameter shared between modules appears once, and is excluded if any owner excludes
    it. Parameters with ``requires_grad=False`` are left out.
    """
    if exclude not in LARS_EXCLUDE:
        raise ValueError(f"exclude must be one of {LARS_EXCLUDE}, got {exclude!r}")
    if exclude == "name":
        excluded_ids = {
            id(p)
            for name, p in model.named_parameters(remove_duplicate=False)
            if "bn" in name or "bias" in name
        }
    else:
        excluded_ids = {
            id(p)
            for module in model.modules()
            for local_name, p in module.named_parameters(recurse=False)
            if _is_excluded(module, local_name)
        }
    adapted: list[nn.Parameter] = []
    excluded: list[nn.Parameter] = []
    # model.parameters() de-duplicates shared parameters and fixes a deterministic order.
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (excluded if id(p) in excluded_ids else adapted).append(p)
    return [
        {"params": adapted, "weight_decay": weight_decay, "lars": True},
        {"params": excluded, "weight_decay": 0.0, "lars": False},
    ]


def scaled_lr(base_lr: float, global_batch: int, rule: str) -> float:
    """Peak learning rate for a global batch size: 'sqrt' (WCL), 'linear' (per 256) or 'none'."""
    if global_batch <= 0:
        raise ValueError(f"global_batch must be positive, got {global_batch}")
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch)
    if rule == "linear":
        return base_lr * global_batch / 256
    if rule == "none":
        return base_lr
    raise ValueError(
        f"unknown learning-rate scaling rule {rule!r}; expected 'sqrt', 'linear' or 'none'"
    )


def lr_at(
    step: int, peak_lr: float, warmup_steps: int, total_steps: int, final_lr: float = 0.0
) -> float:
    """Learning rate at iteration ``step`` (0-based): linear warm-up from 0, then cosine decay.

    Warm-up gives ``peak * step / warmup_steps`` for ``step < warmup_steps``; the cosine runs
    from ``peak_lr`` at ``warmup_steps`` towards ``final_lr`` at ``total_steps``, and any
    ``step >= total_steps`` gets ``final_lr``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"need 0 <= warmup_steps <= total_steps, got warmup_steps={warmup_steps}, "
            f"total_steps={total_steps}"
        )
    if step >= total_steps:
        return final_lr
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group of ``optimizer``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
