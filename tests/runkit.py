"""Helpers for the tests that compare whole training runs."""

from pathlib import Path

import torch

from wcl.checkpoint import load_checkpoint


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    """The model state of a run directory's last.pt."""
    return load_checkpoint(Path(run_dir) / "last.pt")["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    """Bit-identical state dicts (same keys, torch.equal on every tensor)."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
