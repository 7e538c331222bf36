"""The training loop's pieces on their own: the guarded step (wcl.steps), the cadence
(wcl.cadence) and the loader's worker shutdown (wcl.loader)."""

from __future__ import annotations

import multiprocessing
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from wcl.cadence import Cadence
from wcl.loader import EpochLoader
from wcl.precision import grad_scaler
from wcl.steps import GuardedStep, gradients_finite


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _take(guard: GuardedStep, model: nn.Module, x: torch.Tensor) -> bool:
    guard.begin()
    return guard.finish(model(x).square().mean())


def test_a_non_finite_step_is_dropped_with_its_batchnorm_statistics():
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = grad_scaler(torch.device("cpu"), None)
    guard = GuardedStep(model, optimizer, scaler, skip_nonfinite=True)
    before = _state(model)
    bad = torch.randn(6, 4)
    bad[0, 0] = float("nan")
    assert not _take(guard, model, bad)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert _take(guard, model, torch.randn(6, 4))
    assert not torch.equal(model.state_dict()["0.weight"], before["0.weight"])
    assert guard.counters() == {"skipped_steps": 1}
    assert gradients_finite(model.parameters())


def test_without_skip_every_step_is_taken_and_nothing_is_counted():
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GuardedStep(model, optimizer, grad_scaler(torch.device("cpu"), None), False)
    bad = torch.randn(6, 4)
    bad[0, 0] = float("inf")
    assert _take(guard, model, bad)
    assert not guard.may_skip and guard.counters() == {}


def test_float16_overflow_is_a_skipped_step_and_halves_the_scale():
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a CPU without native float16
        scaler = grad_scaler(torch.device("cpu"), torch.float16)
    guard = GuardedStep(model, optimizer, scaler, skip_nonfinite=False)
    scale = guard.loss_scale.value
    before = _state(model)
    assert not _take(guard, model, torch.full((6, 4), 1e30))  # the gradients overflow
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert guard.counters() == {"skipped_steps": 1, "loss_scale": scale / 2}
    assert _take(guard, model, torch.randn(6, 4))
    assert guard.counters() == {"skipped_steps": 1, "loss_scale": scale / 2}


def test_cadence_of_a_pretraining_run():
    """3 epochs of 4 steps: a record every 3 steps, at epoch ends and at the step saves
    (every 6 steps); epoch-NNNN.pt after epochs 2 and 3; kNN after epochs 2 and 3."""
    c = Cadence(3, 4, log_every=3, save_every_steps=6, save_every=2, evaluate_every=2)
    steps = range(1, c.total_steps + 1)
    assert [s for s in steps if c.logs_after_step(s)] == [3, 4, 6, 8, 9, 12]
    assert [s for s in steps if c.saves_after_step(s)] == [6, 12]
    assert [s for s in steps if c.ends_epoch(s)] == [4, 8, 12]
    assert [s for s in steps if c.is_last(s)] == [12]
    assert [e for e in (1, 2, 3) if c.keeps_after(e)] == [2, 3]
    assert [e for e in (1, 2, 3) if c.evaluates_after(e)] == [2, 3]
    assert not any(Cadence(3, 4).evaluates_after(e) for e in (1, 2, 3))
    assert c.steps_into(epoch=1, step=6) == 2


@pytest.mark.parametrize("persistent", [True, False])
def test_the_loader_stops_its_workers_when_closed_mid_epoch(persistent):
    data = TensorDataset(torch.arange(64.0))
    with EpochLoader(data, 4, 0, 1, seed=0, workers=2, persistent=persistent) as loader:
        batches = loader.epoch(0)
        next(batches)
        assert len(multiprocessing.active_children()) == 2
    assert multiprocessing.active_children() == []
    with pytest.raises(RuntimeError, match="closed"):
        loader.epoch(1)
