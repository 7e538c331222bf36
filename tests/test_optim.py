"""Tests for wcl.optim: LARS against hand-computed steps, grouping, schedule and scaling."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn

from wcl.optim import LARS, lr_at, param_groups, scaled_lr, set_lr

LR, MOMENTUM, WD, TRUST = 0.5, 0.9, 1e-2, 1e-3


def _manual_lars_step(
    w: torch.Tensor, g: torch.Tensor, buf: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LARS step written out in plain arithmetic (float64); returns (new w, new buffer)."""
    d = g + WD * w
    w_norm = torch.sqrt((w * w).sum())
    d_norm = torch.sqrt((d * d).sum())
    if w_norm > 0 and d_norm > 0:
        d = d * (TRUST * w_norm / d_norm)
    buf = d.clone() if buf is None else MOMENTUM * buf + d
    return w - LR * buf, buf


def _lars(params: list[nn.Parameter] | list[dict], **overrides: float) -> LARS:
    kwargs = {"lr": LR, "momentum": MOMENTUM, "weight_decay": WD, "trust_coefficient": TRUST}
    kwargs.update(overrides)
    return LARS(params, **kwargs)


def test_two_lars_steps_match_hand_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    grads = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    p = nn.Parameter(w0.clone())
    opt = _lars([p])

    expected_w, buf = w0, None
    for g in grads:
        p.grad = g.clone()
        grad_before = p.grad.clone()
        opt.step()
        expected_w, buf = _manual_lars_step(expected_w, g, buf)
        torch.testing.assert_close(p.detach(), expected_w, rtol=1e-12, atol=1e-14)
        # p.grad must stay what backward produced, for inspection/clipping by the user.
        assert torch.equal(p.grad, grad_before)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf, rtol=1e-12, atol=1e-14)


def test_first_step_numbers_written_out() -> None:
    # w = [3, 4] (|w| = 5), g = [0, 1], wd = 0: |g| = 1, ratio = 1e-3 * 5 / 1 = 5e-3,
    # buf = [0, 5e-3], w' = [3, 4 - 0.5 * 5e-3] = [3, 3.9975].
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    p.grad = torch.tensor([0.0, 1.0], dtype=torch.float64)
    _lars([p], weight_decay=0.0).step()
    torch.testing.assert_close(p.detach(), torch.tensor([3.0, 3.9975], dtype=torch.float64))


def test_eps_enters_the_denominator() -> None:
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    p.grad = torch.tensor([0.0, 1.0], dtype=torch.float64)
    _lars([p], weight_decay=0.0, eps=1.0).step()
    # ratio = 1e-3 * 5 / (1 + 1) = 2.5e-3
    torch.testing.assert_close(
        p.detach(), torch.tensor([3.0, 4.0 - 0.5 * 2.5e-3], dtype=torch.float64)
    )


def test_excluded_group_is_plain_momentum_sgd() -> None:
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(5, generator=gen, dtype=torch.float64)
    grads = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(3)]
    p_lars, p_sgd = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    # The group's weight_decay must be ignored when lars=False.
    lars = _lars([{"params": [p_lars], "lars": False, "weight_decay": 0.1}])
    sgd = torch.optim.SGD([p_sgd], lr=LR, momentum=MOMENTUM, weight_decay=0.0)
    for g in grads:
        p_lars.grad, p_sgd.grad = g.clone(), g.clone()
        lars.step()
        sgd.step()
        torch.testing.assert_close(p_lars.detach(), p_sgd.detach(), rtol=0, atol=0)
    assert torch.equal(p_lars.grad, grads[-1])


def test_zero_weight_falls_back_to_ratio_one() -> None:
    p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    p.grad = g.clone()
    _lars([p]).step()
    # wd * 0 = 0 and |w| = 0, so the update is the raw gradient.
    torch.testing.assert_close(p.detach(), -LR * g)


def test_zero_grad_falls_back_to_ratio_one() -> None:
    w0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    p = nn.Parameter(w0.clone())
    p.grad = torch.zeros(2, dtype=torch.float64)
    opt = _lars([p], weight_decay=0.0)
    opt.step()
    torch.testing.assert_close(p.detach(), w0)
    assert torch.equal(opt.state[p]["momentum_buffer"], torch.zeros(2, dtype=torch.float64))


def test_zero_grad_with_weight_decay_is_adapted() -> None:
    # g = 0 but wd * w != 0, so |d| > 0 and the trust ratio applies to the decay term alone.
    w0 = torch.tensor([3.0, 4.0], dtype=torch.float64)
    p = nn.Parameter(w0.clone())
    p.grad = torch.zeros(2, dtype=torch.float64)
    _lars([p]).step()
    # d = wd * w, |d| = wd * 5, ratio = 1e-3 * 5 / (wd * 5) => d * ratio = 1e-3 * w
    torch.testing.assert_close(p.detach(), w0 - LR * 1e-3 * w0)


def test_step_without_grad_leaves_param_and_state_alone() -> None:
    p = nn.Parameter(torch.ones(2))
    opt = _lars([p])
    opt.step()
    assert torch.equal(p.detach(), torch.ones(2))
    assert len(opt.state) == 0


def test_closure_loss_is_returned_and_gradients_computed() -> None:
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = _lars([p])

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(5.0)
    assert not torch.equal(p.detach(), torch.tensor([1.0, 2.0]))


def test_state_dict_round_trip_gives_identical_steps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = LARS(param_groups(model, WD), lr=LR)
    data = torch.randn(8, 6)

    def train_step(m: nn.Module, o: torch.optim.Optimizer) -> None:
        o.zero_grad()
        m(data).square().mean().backward()
        o.step()

    for _ in range(2):
        train_step(model, opt)

    clone = copy.deepcopy(model)
    restored = LARS(param_groups(clone, WD), lr=123.0)
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert restored.param_groups[0]["lr"] == LR
    assert [g["lars"] for g in restored.param_groups] == [True, False]

    for _ in range(3):
        train_step(model, opt)
        train_step(clone, restored)
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)


def test_weights_only_state_dict() -> None:
    import io

    p = nn.Parameter(torch.ones(3))
    opt = _lars([p])
    p.grad = torch.ones(3)
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert torch.equal(loaded["state"][0]["momentum_buffer"], opt.state[p]["momentum_buffer"])


def test_default_hyperparameters() -> None:
    opt = LARS([nn.Parameter(torch.ones(1))], lr=0.1)
    group = opt.param_groups[0]
    assert group["momentum"] == 0.9
    assert group["weight_decay"] == 1e-6
    assert group["trust_coefficient"] == 1e-3
    assert group["eps"] == 0.0
    assert group["lars"] is True
    with pytest.raises(ValueError, match="lr"):
        LARS([nn.Parameter(torch.ones(1))], lr=-1.0)


def test_zero_momentum_keeps_no_buffer() -> None:
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    p.grad = torch.tensor([0.0, 1.0], dtype=torch.float64)
    opt = _lars([p], momentum=0.0, weight_decay=0.0)
    opt.step()
    opt.step()
    assert "momentum_buffer" not in opt.state[p]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_param_groups_on_torchvision_resnet(arch: str) -> None:
    model = getattr(torchvision.models, arch)(weights=None)
    adapted_group, excluded_group = param_groups(model, 1e-6)
    assert adapted_group["lars"] is True and adapted_group["weight_decay"] == 1e-6
    assert excluded_group["lars"] is False and excluded_group["weight_decay"] == 0.0

    adapted = {id(p) for p in adapted_group["params"]}
    excluded = {id(p) for p in excluded_group["params"]}
    assert len(adapted) == len(adapted_group["params"])
    assert len(excluded) == len(excluded_group["params"])
    assert not adapted & excluded
    all_params = list(model.parameters())
    assert len(adapted) + len(excluded) == len(all_params)

    names = dict(model.named_parameters())
    n_bn = 0
    for module_name, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            if isinstance(module, nn.BatchNorm2d):
                n_bn += 1
                assert id(p) in excluded, f"{module_name}.{local}"
            elif local == "bias":
                assert id(p) in excluded, f"{module_name}.{local}"
            else:
                assert isinstance(module, nn.Conv2d | nn.Linear)
                assert id(p) in adapted, f"{module_name}.{local}"
    # The BatchNorm of the downsample branches, which the name-based selection missed.
    for block in ("layer2.0", "layer3.0", "layer4.0"):
        assert id(names[f"{block}.downsample.1.weight"]) in excluded
        assert id(names[f"{block}.downsample.1.bias"]) in excluded
        assert id(names[f"{block}.downsample.0.weight"]) in adapted
    assert id(names["fc.weight"]) in adapted and id(names["fc.bias"]) in excluded
    # Every excluded parameter is either a BN weight/bias or fc.bias (the only conv/linear bias).
    assert len(excluded) == n_bn + 1
    LARS(param_groups(model, 1e-6), lr=0.1)  # accepted as-is by the optimiser


def test_param_groups_other_norms_shared_and_frozen() -> None:
    shared = nn.Linear(4, 4)
    frozen = nn.Linear(4, 4)
    for p in frozen.parameters():
        p.requires_grad_(False)
    model = nn.Sequential(
        shared,
        nn.LayerNorm(4),
        nn.GroupNorm(2, 4),
        nn.InstanceNorm1d(4, affine=True),
        shared,  # the same module twice: its parameters must be listed once
        frozen,
        nn.Conv1d(4, 4, 1, bias=False),
    )
    adapted, excluded = (g["params"] for g in param_groups(model, 0.1))
    assert {id(p) for p in adapted} == {id(shared.weight), id(model[6].weight)}
    expected_excluded = [shared.bias, *model[1].parameters(), *model[2].parameters()]
    expected_excluded += list(model[3].parameters())
    assert {id(p) for p in excluded} == {id(p) for p in expected_excluded}
    assert len(adapted) + len(excluded) == 2 + 7


def test_param_groups_excludes_a_tied_parameter_if_any_owner_excludes_it() -> None:
    linear, norm = nn.Linear(3, 3, bias=False), nn.LayerNorm(3)
    norm.weight = nn.Parameter(torch.ones(3))
    linear.weight = nn.Parameter(torch.ones(3, 3))
    model = nn.Sequential(linear, norm)
    norm.bias = linear.weight  # contrived tie between an adapted and an excluded slot
    adapted, excluded = (g["params"] for g in param_groups(model, 0.1))
    assert adapted == []
    assert {id(p) for p in excluded} == {id(linear.weight), id(norm.weight)}


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),
        (50, 2.4),  # mid warm-up: 4.8 * 50 / 100
        (100, 4.8),  # end of warm-up: peak
        (550, 2.4),  # middle of the cosine: (4.8 - 0) * 0.5 * (1 + cos(pi/2))
        (999, 4.8 * 0.5 * (1 + math.cos(math.pi * 899 / 900))),  # last step
        (1000, 0.0),
        (5000, 0.0),
    ],
)
def test_lr_at_known_points(step: int, expected: float) -> None:
    assert lr_at(step, 4.8, 100, 1000) == pytest.approx(expected, abs=1e-12)


def test_lr_at_final_lr_and_no_warmup() -> None:
    assert lr_at(0, 1.0, 0, 10, final_lr=0.1) == pytest.approx(1.0)
    assert lr_at(5, 1.0, 0, 10, final_lr=0.1) == pytest.approx(0.55)
    assert lr_at(10, 1.0, 0, 10, final_lr=0.1) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 0, 10, final_lr=0.1) > 0.1
    with pytest.raises(ValueError):
        lr_at(0, 1.0, 20, 10)


def test_lr_at_is_monotone_after_warmup() -> None:
    values = [lr_at(s, 2.0, 10, 200) for s in range(201)]
    assert all(a <= b for a, b in zip(values[:10], values[1:11], strict=True))
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))


def test_scaled_lr() -> None:
    assert scaled_lr(0.075, 4096, "sqrt") == pytest.approx(4.8)
    assert scaled_lr(0.1, 512, "linear") == pytest.approx(0.2)
    assert scaled_lr(0.3, 4096, "none") == 0.3
    with pytest.raises(ValueError, match="cubic"):
        scaled_lr(0.1, 256, "cubic")


def test_set_lr_sets_every_group() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    opt = LARS(param_groups(model, 1e-6), lr=0.1)
    set_lr(opt, 0.7)
    assert [g["lr"] for g in opt.param_groups] == [0.7, 0.7]


def test_step_under_no_grad_and_float32() -> None:
    p = nn.Parameter(torch.tensor([3.0, 4.0]))
    p.grad = torch.tensor([0.0, 1.0])
    opt = _lars([p], weight_decay=0.0)
    with torch.no_grad():
        opt.step()
    assert p.dtype == torch.float32
    torch.testing.assert_close(p.detach(), torch.tensor([3.0, 3.9975]))
