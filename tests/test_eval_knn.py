"""Weighted kNN against a brute-force loop; feature extraction; the knn-eval command."""

import json
import math

import pytest
import torch
from evalkit import (
    FASHION_IDX,
    float32_default,  # noqa: F401 (autouse: float32 default dtype)
    tiny_checkpoint,
)
from torch.utils.data import Subset

from wcl.checkpoint import load_checkpoint
from wcl.cli import main
from wcl.data import dataset_stats, eval_pipeline, load_fashion_mnist
from wcl.eval.config import EvalData
from wcl.eval.data import eval_transform
from wcl.eval.features import extract_features
from wcl.eval.knn import knn_accuracies, knn_accuracy, knn_monitor, knn_predict
from wcl.weights import load_backbone


def brute_force(train, labels, queries, k, t, num_classes):
    """Per query: classes by score (best first) and how many got a vote; float64 loops."""
    preds, voted = [], []
    for q in queries.double():
        q = q / math.sqrt(sum(float(v) ** 2 for v in q))
        sims = []
        for j, x in enumerate(train.double()):
            x = x / math.sqrt(sum(float(v) ** 2 for v in x))
            sims.append((sum(float(a) * float(b) for a, b in zip(q, x, strict=True)), j))
        sims.sort(key=lambda s: -s[0])
        scores = [0.0] * num_classes
        for sim, j in sims[:k]:
            scores[int(labels[j])] += math.exp(sim / t)
        preds.append(sorted(range(num_classes), key=lambda c: -scores[c])[: min(5, num_classes)])
        voted.append(sum(s > 0 for s in scores))
    return torch.tensor(preds), voted


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(103, 8, generator=g)
    labels = torch.randint(0, 7, (103,), generator=g)
    queries = torch.randn(37, 8, generator=g)
    return train, labels, queries


@pytest.mark.parametrize("k", [1, 10, 103])
@pytest.mark.parametrize("chunk", [1, 7, 36, 1000])
def test_predictions_equal_brute_force(data, k, chunk):
    train, labels, queries = data
    expected, voted = brute_force(train, labels, queries, k, 0.07, 7)
    got = knn_predict(train, labels, queries, ks=[k], t=0.07, num_classes=7, chunk=chunk)[k]
    assert got.shape == (37, 5)
    for row_got, row_expected, m in zip(got, expected, voted, strict=True):
        # Classes without a vote all score 0, so only the voted ranks have an order.
        m = min(m, 5)
        assert torch.equal(row_got[:m], row_expected[:m])


def test_accuracy_equals_brute_force_counts(data):
    train, labels, queries = data
    truth = torch.randint(0, 7, (37,), generator=torch.Generator().manual_seed(1))
    for k in (20, 60):
        expected, voted = brute_force(train, labels, queries, k, 0.1, 7)
        assert min(voted) >= 5  # every top-5 rank is decided by votes
        acc = knn_accuracy(train, labels, queries, truth, k=k, t=0.1, num_classes=7, chunk=10)
        hits = expected == truth[:, None]
        assert acc["top1"] == pytest.approx(100 * hits[:, 0].float().mean().item())
        assert acc["top5"] == pytest.approx(100 * hits.any(1).float().mean().item())


def test_several_k_in_one_pass_equal_single_runs(data):
    train, labels, queries = data
    truth = torch.arange(37) % 7
    both = knn_accuracies(train, labels, queries, truth, ks=(50, 3), t=0.07, chunk=8)
    for k in (50, 3):
        assert both[k] == knn_accuracy(train, labels, queries, truth, k=k, t=0.07, chunk=5)


def test_bad_k_and_labels_are_errors(data):
    train, labels, queries = data
    with pytest.raises(ValueError, match="k must be"):
        knn_accuracy(train, labels, queries, labels[:37], k=104)
    with pytest.raises(ValueError, match="labels"):
        knn_accuracy(train, labels - 1, queries, labels[:37], k=3, num_classes=7)


def test_extract_features_keeps_order_and_mode(tmp_path):
    backbone = load_backbone(tiny_checkpoint(tmp_path / "pre.pt")).module
    backbone.train()
    data = load_fashion_mnist(FASHION_IDX, train=True)
    transform = eval_transform(EvalData(dataset="fashion_mnist", image_size=28), 1)
    feats, targets = extract_features(backbone, data, transform, batch_size=64)
    assert backbone.training  # the mode it had is back
    assert feats.shape == (300, 64) and feats.dtype == torch.float32
    assert torch.equal(targets, data.targets)
    backbone.eval()
    with torch.no_grad():
        direct = backbone(torch.stack([transform(data[i][0]) for i in range(300)]))
    torch.testing.assert_close(feats, direct)


def test_knn_eval_command_matches_library(tmp_path, capsys):
    # A folder name YAML would cut at " #" (a comment): --checkpoint takes it as written.
    (tmp_path / "pre #1").mkdir()
    ckpt = tiny_checkpoint(tmp_path / "pre #1" / "pre.pt")
    out = tmp_path / "knn"
    argv = ["knn-eval", "--config", "knn-small", "--checkpoint", str(ckpt)]
    argv += ["--set", f"data.root={FASHION_IDX}", "--set", f"run.out_dir={out}"]
    argv += ["--set", "data.workers=0", "--set", "run.progress=false"]
    assert main(argv) == 0
    assert "k200: top-1" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"k200", "k20", "temperature", "checkpoint", "config"}
    train = load_checkpoint(out / "features-train.pt")
    test = load_checkpoint(out / "features-test.pt")
    expected = knn_accuracies(
        train["features"], train["targets"], test["features"], test["targets"], (200, 20), 0.07
    )
    assert results["k200"] == pytest.approx(expected[200])
    assert results["k20"] == pytest.approx(expected[20])
    # Better than chance (10%) on calibrated random features; the same images are the bank,
    # so k=20 finds each query itself among its neighbours.
    assert results["k20"]["top1"] > 30
    # A second run reuses the cached features and gives the same numbers.
    assert main(argv + ["--set", "knn.k=20"]) == 0
    assert json.loads((out / "results.json").read_text())["k20"] == results["k20"]


def test_knn_config_errors_name_the_key(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "pre.pt")
    base = ["knn-eval", "--config", "knn-small", "--checkpoint", str(ckpt)]
    base += ["--set", f"run.out_dir={tmp_path / 'k'}", "--set", f"data.root={FASHION_IDX}"]
    for override, key in (
        ("knn.k=[0]", "knn.k"),
        ("knn.temperature=0", "knn.temperature"),
        ("knn.kk=3", "knn.kk"),
        ("data.image_size=abc", "data.image_size"),
        ("knn.k=[20, 500]", "knn.k"),  # more neighbours than the 300 training images
    ):
        assert main(base + ["--set", override]) == 2
        assert key in capsys.readouterr().err
    assert not (tmp_path / "k").exists()  # refused before any work


def test_knn_monitor_for_pre_training(tmp_path):
    """The one call pre-training makes: a live backbone in train mode and two datasets."""
    backbone = load_backbone(tiny_checkpoint(tmp_path / "pre.pt")).module.train()
    data = load_fashion_mnist(FASHION_IDX, train=True)
    transform = eval_pipeline(28, *dataset_stats("fashion_mnist", 1))
    train, test = Subset(data, range(0, 300, 2)), Subset(data, range(1, 300, 2))
    acc = knn_monitor(backbone, train, test, transform, k=20, t=0.07, batch_size=64)
    assert backbone.training
    bank = extract_features(backbone, train, transform, batch_size=100)
    queries = extract_features(backbone, test, transform, batch_size=100)
    assert acc == knn_accuracy(*bank, *queries, k=20, t=0.07)
    assert 10 < acc["top1"] <= acc["top5"] <= 100
