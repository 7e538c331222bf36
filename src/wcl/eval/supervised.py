"""What the linear probe and fine-tuning share around :func:`wcl.eval.loop.fit`.

Both build their :class:`~wcl.eval.loop.Recipe` from the same settings fields (``linear``
and ``finetune`` sections), put the same metadata in ``last.pt``, and write the same
results.json: the final and best evaluated epochs, whether the run is complete, what the
command adds (batch, peak lr, image counts...), the images skipped as unreadable and,
once training ends, the per-epoch history.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from wcl.eval.common import Setup, finish_run, skipped_images, write_results
from wcl.eval.config import FinetuneConfig, FinetuneSettings, LinearConfig, LinearSettings
from wcl.eval.data import Splits
from wcl.eval.features import file_identity
from wcl.eval.loop import Recipe, summarise
from wcl.optim import scaled_lr

__all__ = ["SupervisedResults", "supervised_recipe"]


def supervised_recipe(
    s: LinearSettings | FinetuneSettings,
    setup: Setup,
    *,
    batch: int,
    steps_per_epoch: int,
    amp: torch.dtype | None,
    progress: bool,
    desc: str,
) -> Recipe:
    """The recipe ``s`` describes for a global batch of ``batch`` images (the lr scaled by
    ``s.lr_scaling``), run on ``setup``'s device and checkpointed in its run directory."""
    return Recipe(
        epochs=s.epochs,
        steps_per_epoch=steps_per_epoch,
        peak_lr=scaled_lr(s.lr, batch, s.lr_scaling),
        momentum=s.momentum,
        nesterov=s.nesterov,
        weight_decay=s.weight_decay,
        eval_every=s.eval_every,
        checkpoint_every=s.checkpoint_every,
        device=setup.device,
        amp=amp,
        run_dir=setup.run_dir,
        progress=progress,
        desc=desc,
    )


@dataclass
class SupervisedResults:
    """results.json of a linear-probe or fine-tuning run, and its ``last.pt`` metadata.

    ``info``: what the command adds to the results. ``rows``: the feature rows trained
    and tested on (``train_rows``, ``test_rows``) where features stand in for images, so
    that the skipped-image counts are exact (:func:`wcl.eval.common.skipped_images`).
    """

    setup: Setup
    cfg: LinearConfig | FinetuneConfig
    command: str
    splits: Splits
    info: dict[str, Any]
    rows: dict[str, int] = field(default_factory=dict)

    def checkpoint_extra(self) -> dict[str, Any]:
        """What ``last.pt`` carries besides the training state, for resuming and export."""
        return {
            "kind": self.command,
            "config": self.cfg.to_dict(),
            "backbone": self.setup.backbone.spec.to_dict(),
            "pretrained": file_identity(self.cfg.run.checkpoint),
            "num_classes": self.splits.num_classes,
        }

    def report(self, history: list[dict[str, Any]], done: bool) -> None:
        """Write results.json as it stands after a test pass (``done``: the last epoch's)."""
        write_results(self.setup, self.cfg, self.command, self._summary(history, done))

    def finish(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """Write the final results.json (with the history), release the run directory, and
        return what was written."""
        results = {**self._summary(history, True), "history": history}
        write_results(self.setup, self.cfg, self.command, results)
        finish_run(self.setup)
        return results

    def _summary(self, history: list[dict[str, Any]], done: bool) -> dict[str, Any]:
        skipped = skipped_images(self.setup, self.splits, history, **self.rows)
        return {**summarise(history), "complete": done, **self.info, "skipped_images": skipped}
