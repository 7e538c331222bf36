"""Linear evaluation: fast mode against scikit-learn, the release protocol end to end, resume."""

import json

import numpy as np
import pytest
import torch
from evalkit import (
    FASHION_IDX,
    PHOTOS,
    float32_default,  # noqa: F401 (autouse: float32 default dtype)
    tiny_checkpoint,
)
from sklearn.linear_model import LogisticRegression

import wcl.eval.loop
from wcl.checkpoint import load_checkpoint, save_checkpoint
from wcl.cli import main
from wcl.config import ConfigError
from wcl.eval.common import resolve_data
from wcl.eval.config import load_eval_config
from wcl.eval.linear import LinearProbe, linear_classifier, linear_eval
from wcl.weights import BackboneSpec, LoadedBackbone, load_backbone


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("pre") / "pre.pt")


def small(checkpoint, out_dir, *extra):
    """linear-small on the 300-image fixture, no worker processes or progress bars."""
    return [
        "--config",
        "linear-small",
        "--checkpoint",
        str(checkpoint),
        "--set",
        f"data.root={FASHION_IDX}",
        "--set",
        "data.workers=0",
        "--set",
        "run.progress=false",
        "--set",
        f"run.out_dir={out_dir}",
        *extra,
    ]


def test_fast_mode_matches_scikit_learn(checkpoint, tmp_path, capsys):
    """Fast mode and sklearn solve the same L2-regularised logistic regression.

    sklearn minimises C * sum_i CE_i + |W|^2 / 2 (intercept not penalised); divided by C*N
    that is mean CE + wd/2 |W|^2 with wd = 1 / (C*N), which is what SGD's weight decay on
    the weight (not the bias) minimises. The objective is strongly convex, so both reach
    the same unique minimiser up to optimisation error: weights within 5% (relative) and
    at most 3 of 300 predictions different. (Without weight decay the problem has no
    finite minimiser on separable features and two solvers need not agree.)
    """
    c, n = 0.1, 300
    out = tmp_path / "fast"
    argv = ["linear-eval", *small(checkpoint, out), "--fast"]
    argv += ["--set", f"linear.weight_decay={1 / (c * n)}", "--set", "linear.epochs=100"]
    argv += ["--set", "linear.batch_size=50", "--set", "linear.lr=1.0"]
    assert main(argv) == 0
    assert "final: top-1" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "fast" and results["complete"] is True

    train = load_checkpoint(out / "features-train.pt")
    test = load_checkpoint(out / "features-test.pt")
    x, y = train["features"].numpy(), train["targets"].numpy()
    sk = LogisticRegression(C=c, max_iter=10_000, tol=1e-10).fit(x, y)
    fc = linear_classifier(64, 10)
    fc.load_state_dict(load_checkpoint(out / "last.pt")["model"])
    with torch.no_grad():
        ours = fc(test["features"]).argmax(1).numpy()
    theirs = sk.predict(test["features"].numpy())
    assert (ours != theirs).sum() <= 3
    # Softmax weights are defined up to a per-feature shift across classes: centre them.
    w_ours = fc.weight.detach().numpy()
    w_ours = w_ours - w_ours.mean(0)
    w_sk = sk.coef_ - sk.coef_.mean(0)
    assert np.linalg.norm(w_ours - w_sk) / np.linalg.norm(w_sk) < 0.05
    sk_top1 = 100 * sk.score(test["features"].numpy(), test["targets"].numpy())
    assert results["final"]["top1"] == pytest.approx(sk_top1, abs=1.0)


def test_protocol_run_writes_results_and_resumes_exactly(checkpoint, tmp_path, monkeypatch):
    overrides = ["linear.epochs=2", "linear.batch_size=64", "data.workers=0"]
    overrides += ["run.progress=false", f"data.root={FASHION_IDX}"]
    overrides += [f"run.checkpoint={checkpoint}"]
    whole = load_eval_config(
        "linear", "linear-small", overrides + [f"run.out_dir={tmp_path / 'a'}"]
    )
    results = linear_eval(whole)
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    for which in ("final", "best"):
        assert set(saved[which]) == {"epoch", "top1", "top5"}
        assert 0 <= saved[which]["top1"] <= saved[which]["top5"] <= 100
    assert saved["final"]["epoch"] == 2 and saved["mode"] == "protocol"
    assert [row["epoch"] for row in saved["history"]] == [1, 2]
    assert saved["peak_lr"] == pytest.approx(0.2 * 64 / 256)
    assert results["final"] == saved["final"]

    # A crash right after epoch 1's checkpoint, then --resume auto.
    crashed = load_eval_config(
        "linear", "linear-small", overrides + [f"run.out_dir={tmp_path / 'b'}"]
    )
    real_save = wcl.eval.loop.save_checkpoint

    def save_then_crash(state, path):
        real_save(state, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(wcl.eval.loop, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        linear_eval(crashed)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    monkeypatch.setattr(wcl.eval.loop, "save_checkpoint", real_save)
    with pytest.raises(ConfigError, match="--resume auto"):
        linear_eval(crashed)  # the run directory holds a run: not without --resume
    resumed = linear_eval(crashed, resume="auto")
    a = load_checkpoint(tmp_path / "a" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "last.pt")
    assert b["epoch"] == 2 and b["step"] == a["step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    # The resumed run's record equals the uninterrupted one's, wall-clock time aside.
    assert resumed["final"] == results["final"] and resumed["best"] == results["best"]

    def timeless(history):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history]

    assert timeless(resumed["history"]) == timeless(results["history"])


def test_cli_protocol_run_and_resume(tmp_path, capsys):
    checkpoint = tiny_checkpoint(tmp_path / "pre.pt")
    out = tmp_path / "cli"
    argv = ["linear-eval", *small(checkpoint, out, "--set", "linear.epochs=1")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "final: top-1" in printed and "best: top-1" in printed
    assert json.loads((out / "results.json").read_text())["complete"] is True
    assert main(argv) == 2  # refuses to mix a new run into the directory
    assert "--resume auto" in capsys.readouterr().err
    assert main(argv + ["--resume", "auto"]) == 0  # already complete: nothing to train
    assert main(argv + ["--resume", "auto", "--set", "linear.lr=0.5"]) == 2
    assert "linear.lr" in capsys.readouterr().err
    # A last.pt written before a config key existed resumes while the run keeps its default.
    state = load_checkpoint(out / "last.pt")
    del state["config"]["linear"]["init_std"]
    save_checkpoint(state, out / "last.pt")
    assert main(argv + ["--resume", "auto"]) == 0
    assert main(argv + ["--resume", "auto", "--set", "linear.init_std=0.1"]) == 2
    assert "linear.init_std: 0.01 -> 0.1" in capsys.readouterr().err
    tiny_checkpoint(checkpoint, seed=1)  # the pre-trained weights change under the run
    assert main(argv + ["--resume", "auto"]) == 2
    assert "has changed" in capsys.readouterr().err


def test_probe_keeps_the_backbone_frozen_in_eval_mode(checkpoint):
    backbone = load_backbone(checkpoint).module
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    fc = linear_classifier(64, 10)
    probe = LinearProbe(backbone, fc).train()
    assert not backbone.training and probe.fc.training
    optimizer = torch.optim.SGD(probe.fc.parameters(), lr=0.1)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    torch.nn.functional.cross_entropy(probe(x), y).backward()
    optimizer.step()
    assert all(p.grad is None for p in backbone.parameters())
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, before[key]), key  # BN running statistics included


def test_classifier_init_is_the_releases():
    torch.manual_seed(0)
    fc = linear_classifier(2048, 1000)
    assert fc.weight.std().item() == pytest.approx(0.01, rel=0.01)
    assert fc.weight.mean().abs().item() < 1e-4
    assert torch.equal(fc.bias, torch.zeros(1000))


def test_imagenet_preset_is_the_release_protocol(checkpoint, tmp_path):
    cfg = load_eval_config(
        "linear",
        "linear-imagenet",
        [f"run.checkpoint={checkpoint}", f"data.root={tmp_path}"],
    )
    d, s = cfg.data, cfg.linear
    assert (d.image_size, d.resize, d.min_scale, d.flip) == (None, None, 0.08, True)
    # The data comes from the checkpoint: a 224 px ResNet-50 (the release's) is tested on
    # Resize(256) + CenterCrop(224) of its pre-training folder, normalised as pre-trained.
    spec = BackboneSpec("resnet50", "imagenet", 3, 64)
    release = LoadedBackbone(None, spec, "release", {"data": {"dataset": "folder",
                             "root": "/nowhere", "image_size": 224}})  # fmt: skip
    d = resolve_data(d, release, checkpoint)
    assert (d.dataset, d.root, d.image_size, d.resize, d.stats) == (
        "folder",
        str(tmp_path),
        224,
        256,
        "imagenet",
    )
    assert (s.epochs, s.batch_size, s.lr, s.lr_scaling) == (80, 4096, 0.2, "linear")
    assert (s.momentum, s.nesterov, s.weight_decay, s.init_std) == (0.9, True, 0.0, 0.01)


def test_config_errors_are_raised_before_work(checkpoint, tmp_path, capsys):
    out = tmp_path / "never"
    for overrides, key in (
        (["linear.epochs=0"], "linear.epochs"),
        (["linear.mode=slow"], "linear.mode"),
        (["linear.momentum=2"], "linear.momentum"),
        (["linear.nope=1"], "linear.nope"),
        (["run.checkpoint=/does/not/exist"], "run.checkpoint"),
        # Found while reading the data: still before the run directory is made.
        (["data.dataset=folder", f"data.root={PHOTOS}"], "unlabelled"),
    ):
        sets = [arg for item in overrides for arg in ("--set", item)]
        assert main(["linear-eval", *small(checkpoint, out, *sets)]) == 2
        assert key in capsys.readouterr().err
    assert not out.exists()
