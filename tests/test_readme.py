"""The examples of the README and docs/ run as written, from a folder outside the
repository: the 2-epoch pre-training command first, then, in the folder it wrote
``runs/try`` to, the Python API blocks and the evaluation, report, export and embed
commands; the multi-crop command and the "own images" commands each in a folder of their
own. Commands that would take minutes get a few ``--set`` overrides that shrink them
(``TINY``); tests/docblocks.py finds each block by page and section heading."""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from docblocks import EVALUATION, OWN_IMAGES, WEIGHTS, block, blocks

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
FASHION = ROOT / "tests" / "fixtures" / "fashion"
WCL = str(Path(sys.executable).parent / "wcl")
PRETRAIN_EXAMPLE = block("README.md", "Pre-training", "sh")

# What the small data sets here need on top of the commands as written: batches and
# neighbour counts that fit them, and seconds of work instead of minutes or hours.
SUBSETS = ["data.train_subset=500", "data.test_subset=100", "data.workers=0"]
TINY = {
    "own-images": {
        "pretrain": [
            "train.batch_size=64",
            "train.epochs=2",
            "optim.warmup_epochs=1",
            "data.workers=0",
            "model.width=8",
        ],
        "knn-eval": ["knn.k=[10]", "data.workers=0"],
        "linear-eval": ["linear.epochs=2", "data.workers=0"],
    },
    "example-run": {
        "knn-eval": SUBSETS,
        "linear-eval": ["linear.epochs=2", *SUBSETS],
        "finetune": ["finetune.epochs=1", *SUBSETS],
    },
    "multi-crop": {
        "pretrain": [
            "data.subset=64",
            "train.batch_size=32",
            "train.epochs=1",
            "optim.warmup_epochs=0",
            "train.knn_every=0",
            "model.width=8",
            "data.workers=0",
            "train.out_dir=runs/multicrop",
        ],
    },
}


def run(argv: list[str], cwd: Path) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def commands(sh: str) -> list[list[str]]:
    """The commands of a shell block, each as argv, comments and continuations removed."""
    joined = sh.replace("\\\n", " ")
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def run_commands(sh: str, cwd: Path, tiny: dict[str, list[str]] | None = None) -> None:
    """Run a block's ``wcl`` commands with the venv's wcl, plus ``tiny``'s overrides."""
    for argv in commands(sh):
        assert argv[0] == "wcl", argv
        extra = [word for key in (tiny or {}).get(argv[1], []) for word in ("--set", key)]
        run([WCL, *argv[1:], *extra], cwd)


def copy_fixture_images(dest: Path, per_class: slice) -> None:
    """Fashion-MNIST PNGs of the fixture into dest/<class>/."""
    for folder in sorted(FASHION.iterdir()):
        (dest / folder.name).mkdir(parents=True)
        for f in sorted(folder.glob("*.png"))[per_class]:
            shutil.copy(f, dest / folder.name / f.name)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """An empty folder, after the 2-epoch pre-training example has run there."""
    folder = tmp_path_factory.mktemp("readme")  # nothing of the repository in it
    run_commands(PRETRAIN_EXAMPLE, folder)
    return folder


def test_the_readme_opens_with_make_demo_and_make_test_and_stays_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, len(lines)
    first = blocks("README.md")[0]
    assert first.lang == "sh"
    assert [line.split("#")[0].strip() for line in first.code.splitlines()] == [
        "make demo",
        "make test",
    ]


def test_the_2_epoch_example_writes_a_checkpoint(workdir):
    # docs/pretraining.md shows the README's command; running one runs both.
    assert block("docs/pretraining.md", "Pre-training: `wcl pretrain`", "sh") == PRETRAIN_EXAMPLE
    assert (workdir / "runs" / "try" / "last.pt").is_file()


def test_loading_a_trained_backbone(workdir):
    code = block("docs/python-api.md", "A trained backbone in plain PyTorch", "python")
    out = run([sys.executable, "-c", code], workdir)
    assert "BackboneSpec(name='resnet10', stem='small-s2', in_channels=1, width=32)" in out


def test_wcl_steps_in_your_own_loop(tmp_path):
    code = block("docs/python-api.md", "WCL's training step in your own loop", "python")
    out = run([sys.executable, "-c", code], tmp_path)
    assert re.fullmatch(r"loss \d+\.\d{3}, \d+ weak classes in the batch\n", out)


def test_evaluation_and_report_commands_on_the_example_run(workdir):
    run_commands(block("docs/evaluation.md", EVALUATION, "sh"), workdir, TINY["example-run"])
    evals = workdir / "runs" / "try" / "eval" / "last"
    for command in ("knn-eval", "linear-eval-fast", "finetune"):
        results = json.loads((evals / command / "results.json").read_text())
        assert results, command
    run_commands(block("docs/evaluation.md", "Reports: `wcl report` and `wcl demo`", "sh"), workdir)
    report = (workdir / "runs" / "try" / "report.md").read_text()
    assert all(command in report for command in ("knn-eval", "linear-eval", "finetune"))


def test_export_and_embed_commands_on_the_example_run(workdir):
    copy_fixture_images(workdir / "photos", slice(0, 2))  # 20 images
    run_commands(block("docs/weights.md", WEIGHTS, "sh"), workdir)
    export = workdir / "runs" / "try" / "export"
    for name in ("backbone.pt", "backbone.safetensors", "backbone.json"):
        assert (export / name).is_file(), name
    paths = (workdir / "photos-emb.txt").read_text().splitlines()
    assert len(paths) == 20 and (workdir / "photos-emb.npy").is_file()


def test_the_multi_crop_example_trains(tmp_path):
    run_commands(block("docs/pretraining.md", "Multi-crop", "sh", 1), tmp_path, TINY["multi-crop"])
    metrics = (tmp_path / "runs" / "multicrop" / "metrics.jsonl").read_text().splitlines()
    assert "small_instance_loss" in json.loads(metrics[-1])


def test_own_images_commands_run_from_another_directory(tmp_path):
    photos = tmp_path / "my_photos"  # Fashion-MNIST PNGs in class folders, 16 + 8 a class
    copy_fixture_images(photos / "train", slice(0, 16))
    copy_fixture_images(photos / "val", slice(16, 24))
    run_commands(block("docs/own-images.md", OWN_IMAGES, "sh"), tmp_path, TINY["own-images"])
    assert (tmp_path / "runs" / "mine" / "report.md").is_file()
    code = block("docs/own-images.md", OWN_IMAGES, "python")
    lines = run([sys.executable, "-c", code], tmp_path).splitlines()
    similarity = [float(x.split()[0]) for x in lines]
    assert len(lines) == 5 and similarity == sorted(similarity, reverse=True)
    assert all("my_photos/val/" in x for x in lines)
