"""Semi-supervised fine-tuning: the labelled subset and a short real run."""

import contextlib
import json

import pytest
import torch
from evalkit import (
    FASHION_IDX,
    FASHION_PNG,
    float32_default,  # noqa: F401 (autouse: float32 default dtype)
    tiny_checkpoint,
)

from wcl.cli import main
from wcl.data import ImageFolderDataset, load_fashion_mnist
from wcl.eval.finetune import balanced_subset, subset_from_file
from wcl.weights import load_backbone


@pytest.fixture(scope="module")
def targets():
    return load_fashion_mnist(FASHION_IDX, train=True).targets  # 30 images in each of 10


def test_balanced_subset_is_class_balanced_and_seeded(targets):
    chosen = balanced_subset(targets, 0.1, seed=0)
    assert torch.equal(torch.bincount(targets[chosen], minlength=10), torch.full((10,), 3))
    assert len(set(chosen.tolist())) == 30 and torch.equal(chosen, chosen.sort().values)
    assert torch.equal(chosen, balanced_subset(targets, 0.1, seed=0))
    assert not torch.equal(chosen, balanced_subset(targets, 0.1, seed=1))
    # At least one image per class, however small the fraction.
    assert torch.equal(torch.bincount(targets[balanced_subset(targets, 0.001)]), torch.ones(10))
    assert len(balanced_subset(targets, 1.0)) == 300


def test_balanced_subset_skips_unlabelled_and_uneven_classes():
    targets = torch.tensor([-1] * 50 + [0] * 40 + [1] * 20 + [2] * 10)
    chosen = balanced_subset(targets, 0.25, seed=3)
    assert (targets[chosen] >= 0).all()
    assert torch.bincount(targets[chosen]).tolist() == [10, 5, 2]  # round(0.25 * n_c)
    with pytest.raises(ValueError, match="fraction"):
        balanced_subset(targets, 0.0)


def test_subset_file_is_honoured(tmp_path):
    dataset = ImageFolderDataset(FASHION_PNG, channels=1)
    picked = [3, 77, 201]
    names = [dataset.samples[i][0].rsplit("/", 1)[-1] for i in picked]  # e.g. "023.png"
    listing = tmp_path / "subset.txt"
    # Published lists hold bare file names; a folder, blanks and comments are tolerated.
    listing.write_text(f"# labelled images\n\n{names[2]}\n{names[0]}\nsome/folder/{names[1]}\n")
    assert subset_from_file(dataset, listing).tolist() == picked
    listing.write_text("no-such-image.JPEG\n" + names[0] + "\n")
    with pytest.raises(ValueError, match="not in the training folder"):
        subset_from_file(dataset, listing)


def test_finetune_run_with_a_subset_file(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "pre.pt")
    dataset = ImageFolderDataset(FASHION_PNG, channels=1)
    listing = tmp_path / "labelled.txt"
    picked = list(range(0, 300, 15))  # 20 images, 2 of each class
    listing.write_text("".join(dataset.samples[i][0].rsplit("/", 1)[-1] + "\n" for i in picked))
    out = tmp_path / "ft"
    argv = ["finetune", "--config", "finetune-small", "--checkpoint", str(ckpt)]
    for item in (
        "data.dataset=folder",
        f"data.root={FASHION_PNG}",
        "data.workers=0",
        "finetune.epochs=2",
        "finetune.batch_size=8",
        f"finetune.subset_file={listing}",
        "run.progress=false",
        f"run.out_dir={out}",
    ):
        argv += ["--set", item]
    assert main(argv) == 0
    assert "labelled images: 20" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["subset"]["images"] == 20 and results["subset"]["per_class"] == [2] * 10
    assert results["final"]["epoch"] == 2 and results["complete"] is True
    assert (out / "subset.txt").read_text().split() == [str(i) for i in picked]
    # The whole network trained: the fine-tuned backbone differs from the pre-trained one,
    # and the run's last.pt serves as a backbone checkpoint for every other command.
    tuned = load_backbone(out / "last.pt").module.state_dict()
    start = load_backbone(ckpt).module.state_dict()
    assert not torch.equal(tuned["conv1.weight"], start["conv1.weight"])
    assert main(argv + ["--resume", "auto"]) == 0


def test_finetune_needs_a_fraction_or_a_list(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "pre.pt")
    argv = ["finetune", "--config", "finetune-small", "--checkpoint", str(ckpt)]
    assert main(argv + ["--set", "finetune.fraction=null"]) == 2
    assert "finetune.fraction" in capsys.readouterr().err
    assert main(argv + ["--set", "finetune.fraction=1.5"]) == 2
    assert main(argv + ["--set", "finetune.subset_file=/no/such/list.txt"]) == 2
    assert "finetune.subset_file" in capsys.readouterr().err


def test_fit_scales_float16_losses_and_resumes_with_the_scale(tmp_path):
    """The eval training loop (probe and fine-tuning) under float16 autocast: the loss is
    scaled, an overflowing step skipped, the scaler's state saved in last.pt, so a resumed
    run ends where an uninterrupted one does; and the updates are unscaled (within float16
    rounding of float32's)."""
    from wcl.checkpoint import load_checkpoint
    from wcl.eval.loop import Recipe, evaluate, fit, tensor_batches

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    y = torch.randint(0, 4, (64,))
    start = torch.nn.Linear(16, 4).state_dict()

    class Stop(Exception):
        pass

    def train(amp, run_dir, state=None, stop_after=None, gain=30.0) -> torch.nn.Linear:
        """gain 30: large inputs, whose first gradients overflow float16 at scale 65536."""
        model = torch.nn.Linear(16, 4)
        model.load_state_dict(start)
        run_dir.mkdir(exist_ok=True)
        recipe = Recipe(
            epochs=3, steps_per_epoch=4, peak_lr=0.01, amp=amp, run_dir=run_dir, progress=False
        )

        def report(history, done):
            if len(history) == stop_after:
                raise Stop

        with contextlib.suppress(Stop):
            fit(recipe, model=model, saved=model,
                batches_for=lambda epoch: tensor_batches(x * gain, y, 16, 0, epoch),
                test=lambda: evaluate(model, [(x * gain, y)], cpu, amp),
                state=state, report=report)  # fmt: skip
        return model

    whole = train(torch.float16, tmp_path / "whole")
    assert load_checkpoint(tmp_path / "whole" / "last.pt")["scaler"]["scale"] < 65536
    train(torch.float16, tmp_path / "part", stop_after=1)
    state = load_checkpoint(tmp_path / "part" / "last.pt")
    assert state["epoch"] == 1 and state["scaler"]["scale"] < 65536
    resumed = train(torch.float16, tmp_path / "part", state=state)
    assert torch.equal(resumed.weight, whole.weight) and torch.equal(resumed.bias, whole.bias)
    # Inputs of unit size: no overflow, so every step counts, as in float32.
    ours, reference = (
        train(torch.float16, tmp_path / "small", gain=1.0),
        train(None, tmp_path / "fp32", gain=1.0),
    )
    assert load_checkpoint(tmp_path / "small" / "last.pt")["scaler"]["scale"] == 65536
    for name in ("weight", "bias"):
        want = getattr(reference, name) - start[name]
        got = getattr(ours, name) - start[name]
        assert (got - want).norm() / want.norm() < 0.05, name
