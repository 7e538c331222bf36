"""The report of one real pre-training run: its numbers, integer epoch ticks, torn lines."""

import json
import shutil
from pathlib import Path

import matplotlib
import pytest
import yaml
from test_train import FIXTURE
from test_train import tiny_config as train_tiny_config

from wcl.cli import main
from wcl.report import read_metrics, write_report
from wcl.train import pretrain

matplotlib.use("Agg")


def tiny_config(out_dir, *extra):
    """test_train's tiny run for 2 epochs, with metric lines at steps 3, 4, 6, 8 (4 steps an
    epoch) and the online kNN after every epoch."""
    return train_tiny_config(
        out_dir, "train.epochs=2", "train.log_every=3", "train.knn_every=1", *extra
    )


def linear_results(checkpoint: Path) -> dict:
    """A linear-eval results.json as wcl.eval.linear writes it (fewer config keys)."""
    history = [{"epoch": 1, "top1": 61.25, "top5": 96.5}, {"epoch": 2, "top1": 60.75, "top5": 97.0}]
    return {
        "command": "linear-eval",
        "final": history[-1],
        "best": history[0],
        "complete": True,
        "mode": "fast",
        "num_classes": 10,
        "history": history,
        "checkpoint": {"path": str(checkpoint.resolve()), "size": 1, "mtime_ns": 1},
        "config": {"linear": {"epochs": 2}},
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-epoch run with online kNN, a real knn-eval of last.pt and a linear-eval file."""
    out = tmp_path_factory.mktemp("report") / "run"
    pretrain(tiny_config(out))
    argv = ["knn-eval", "--config", "knn-small", "--checkpoint", str(out / "last.pt")]
    argv += ["--set", f"data.root={FIXTURE}", "--set", "data.workers=0"]
    assert main(argv + ["--set", "run.progress=false"]) == 0
    linear = out / "eval" / "epoch-0002" / "linear-eval" / "results.json"
    linear.parent.mkdir(parents=True)
    linear.write_text(json.dumps(linear_results(out / "epoch-0002.pt"), indent=2))
    # A fine-tuning stopped after its first epoch (results.json is rewritten every epoch).
    finetune = linear_results(out / "epoch-0001.pt") | {"command": "finetune", "mode": None}
    finetune |= {"complete": False, "subset": {"fraction": 0.1, "images": 30}}
    path = out / "eval" / "epoch-0001" / "finetune" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(finetune))
    return out


def records_of(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_single_run_report_shows_config_training_and_eval_numbers(run):
    text = write_report(run).read_text()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    records = records_of(run)
    training = [r for r in records if "lr" in r]
    last = training[-1]
    knn = [r for r in records if "knn_top1" in r][-1]
    assert [r["step"] for r in training] == [3, 4, 6, 8] and knn["epoch"] == 2

    assert f"| data.root | {FIXTURE} |" in text
    assert "| backbone | resnet10, small stem, width 8 |" in text
    assert "| projection heads | hidden 32, out 16 |" in text
    assert "| graph_weight | 1.0 (WCL) |" in text
    assert f"| model.gather | {cfg['model']['gather']} |" in text
    assert "| batch size (global) | 64 |" in text
    assert "| epochs (trained / planned) | 2 / 2 |" in text
    assert f"| warm-up epochs | {cfg['optim']['warmup_epochs']} |" in text
    assert "| seed | 0 |" in text

    # Training time: each line covers the steps since the one before, at its images/s.
    steps = [3, 1, 2, 2]
    speeds = [r["images_per_s"] for r in training]
    seconds = sum(n * 64 / s for n, s in zip(steps, speeds, strict=True))
    assert f"| training time (estimate) | {seconds:.1f} s:" in text
    assert f"| images/s (mean over the timed steps) | {8 * 64 / seconds:.1f} |" in text
    assert f"| final loss (step 8, epoch 2) | {last['loss']:.4f} |" in text
    assert f"| final instance_loss | {last['instance_loss']:.4f} |" in text
    assert f"| final graph_loss | {last['graph_loss']:.4f} |" in text
    assert f"| final weak-label precision | {last['precision']:.3f} |" in text
    assert f"| final components per batch | {last['components']:.1f} |" in text
    assert (
        f"| online kNN top-1 / top-5 (%), epoch 2 | {knn['knn_top1']:.2f} / "
        f"{knn['knn_top5']:.2f} |" in text
    )

    knn_eval = json.loads((run / "eval" / "last" / "knn-eval" / "results.json").read_text())
    k200, k20 = knn_eval["k200"], knn_eval["k20"]
    assert (
        f"| knn-eval | last.pt | {k200['top1']:.2f} (k=200), {k20['top1']:.2f} (k=20) | "
        f"{k200['top5']:.2f} (k=200), {k20['top5']:.2f} (k=20) |  |" in text
    )
    assert (
        "| linear-eval | epoch-0002.pt | 60.75 | 97.00 | final: epoch 2; best top-1 61.25 at "
        "epoch 1; mode fast |" in text
    )
    assert (
        "| finetune | epoch-0001.pt | 60.75 | 97.00 | final: epoch 2; best top-1 61.25 at "
        "epoch 1; 30 labelled images; incomplete |" in text
    )
    page = (run / "report.html").read_text()
    assert page.count("<table>") == 3 and f"<td>{last['loss']:.4f}</td>" in page
    assert "<h2>Evaluations</h2>" in page


def test_knn_figure_has_integer_epoch_ticks(run):
    from wcl.report import knn_figure

    fig = knn_figure({"run": read_metrics(run)}, {})
    fig.canvas.draw()
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks and all(float(t).is_integer() for t in ticks)
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert labels and all(label.lstrip("−-").isdigit() for label in labels), labels


def test_missing_pieces_are_left_out(run, tmp_path):
    # A SimCLR run: no graph head statistics, no kNN records, no eval folder.
    simclr = tmp_path / "simclr"
    simclr.mkdir()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["graph_weight"] = 0.0
    (simclr / "config.yaml").write_text(yaml.safe_dump(cfg))
    drop = ("components", "component_size", "precision")
    rows = [{k: v for k, v in r.items() if k not in drop} | {"graph_loss": 0.0}
            for r in records_of(run) if "lr" in r]  # fmt: skip
    (simclr / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = write_report(simclr).read_text()
    assert "| graph_weight | 0.0 (SimCLR: graph loss off) |" in text
    assert f"| final loss (step 8, epoch 2) | {rows[-1]['loss']:.4f} |" in text
    for gone in ("graph_loss", "precision", "components", "online kNN", "Evaluations", "knn.png"):
        assert gone not in text, gone

    # No config.yaml either: no config table, no time estimate (it needs the batch size).
    (simclr / "config.yaml").unlink()
    text = write_report(simclr).read_text()
    assert "## Run summary" not in text and "training time" not in text
    assert "| images/s (mean over the timed steps) |" in text


def test_torn_last_line_is_skipped_with_a_warning(run, tmp_path):
    torn = tmp_path / "torn"
    torn.mkdir()
    shutil.copy(run / "config.yaml", torn / "config.yaml")
    whole = (run / "metrics.jsonl").read_text()
    (torn / "metrics.jsonl").write_text(whole + '{"step": 9, "epoch": 3, "lr": 0.1, "lo')
    torn_line = len(whole.splitlines()) + 1
    with pytest.warns(UserWarning, match=rf"metrics\.jsonl: skipped its last line \({torn_line}\)"):
        assert read_metrics(torn) == records_of(run)
    with pytest.warns(UserWarning, match="cut short"):
        text = write_report(torn).read_text()
    assert "| final loss (step 8, epoch 2) |" in text


def test_unparsable_middle_line_is_an_error_naming_file_and_line(run, tmp_path, capsys):
    from wcl.report import MetricsError

    bad = tmp_path / "bad"
    bad.mkdir()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:20]
    (bad / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(MetricsError, match=r"bad/metrics\.jsonl, line 3: not a JSON record"):
        read_metrics(bad)
    assert issubclass(MetricsError, ValueError)
    # The command line prints it as one line, no traceback.
    assert main(["report", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("wcl: ") and "line 3" in err and "\n" not in err
