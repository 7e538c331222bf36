"""The README's examples run as written, from a folder outside the repository: its 2-epoch
pre-training command, then each of its Python blocks, in a fresh interpreter in the folder
that command wrote ``runs/try`` to; and the "own images" commands on a folder of PNGs."""

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import get_type_hints

import pytest

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
PRETRAIN_EXAMPLE = re.search(r"```sh\n(wcl pretrain [^`]*?--set train\.out_dir=runs/try)\n```",
                             README).group(1)  # fmt: skip


def run(argv: list[str], cwd: Path) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """An empty folder, after the README's pre-training example has run there."""
    folder = tmp_path_factory.mktemp("readme")  # nothing of the repository in it
    wcl = Path(sys.executable).parent / "wcl"
    argv = [str(wcl) if word == "wcl" else word for word in PRETRAIN_EXAMPLE.split()
            if word != "\\"]  # fmt: skip
    run(argv, folder)
    assert (folder / "runs" / "try" / "last.pt").is_file()
    return folder


def test_the_readme_has_three_python_blocks():
    assert len(PYTHON_BLOCKS) == 3


def test_loading_a_trained_backbone(workdir):
    out = run([sys.executable, "-c", PYTHON_BLOCKS[1]], workdir)
    assert "BackboneSpec(name='resnet10', stem='small-s2', in_channels=1, width=32)" in out


def test_wcl_steps_in_your_own_loop(workdir):
    out = run([sys.executable, "-c", PYTHON_BLOCKS[2]], workdir)
    assert re.fullmatch(r"loss \d+\.\d{3}, \d+ weak classes in the batch\n", out)


def config_keys(cls) -> dict[str, set[str]]:
    """{section: its keys} of a config dataclass."""
    return {name: {f.name for f in fields(hint)} for name, hint in get_type_hints(cls).items()}


def test_every_pretraining_key_is_in_the_readme_table():
    from wcl.config import Config

    rows = dict(re.findall(r"^\| `(\w+)` \| (.*) \|$", README, re.M))
    for section, keys in config_keys(Config).items():
        missing = keys - set(re.findall(r"`(\w+)`", rows[section]))
        assert not missing, (section, missing)


def test_every_eval_key_is_named_in_the_evaluation_section():
    from wcl.eval.config import FinetuneConfig, KnnConfig, LinearConfig

    text = README[README.index("## Evaluation") : README.index("## Weights")]
    named = set(re.findall(r"`(?:\w+\.)?(\w+)`", text))
    for cls in (LinearConfig, KnnConfig, FinetuneConfig):
        for section, keys in config_keys(cls).items():
            assert not keys - named, (cls.__name__, section, keys - named)


OWN_IMAGES = README[README.index("## Pre-train on your own images") : README.index("## Several")]
# What the 240-image folder below needs on top of the commands as written: a batch and
# neighbour counts that fit it, and a minute of training instead of hours.
TINY = {
    "pretrain": [
        "train.batch_size=64",
        "train.epochs=2",
        "optim.warmup_epochs=1",
        "data.workers=0",
        "model.width=8",
    ],
    "knn-eval": ["knn.k=[10]", "data.workers=0"],
    "linear-eval": ["linear.epochs=2", "data.workers=0"],
}


def test_own_images_commands_run_from_another_directory(tmp_path):
    photos = tmp_path / "my_photos"  # Fashion-MNIST PNGs in class folders, 16 + 8 a class
    for folder in sorted((ROOT / "tests" / "fixtures" / "fashion").iterdir()):
        files = sorted(folder.glob("*.png"))
        for split, chosen in (("train", files[:16]), ("val", files[16:24])):
            (photos / split / folder.name).mkdir(parents=True)
            for f in chosen:
                shutil.copy(f, photos / split / folder.name / f.name)
    wcl = str(Path(sys.executable).parent / "wcl")
    commands = re.search(r"```sh\n(.*?)```", OWN_IMAGES, re.S).group(1)
    for line in commands.splitlines():
        argv = shlex.split(line, comments=True)
        for key in TINY.get(argv[1], []):
            argv += ["--set", key]
        run([wcl, *argv[1:]], tmp_path)
    assert (tmp_path / "runs" / "mine" / "report.md").is_file()
    block = re.search(r"```python\n(.*?)```", OWN_IMAGES, re.S).group(1)
    lines = run([sys.executable, "-c", block], tmp_path).splitlines()
    similarity = [float(x.split()[0]) for x in lines]
    assert len(lines) == 5 and similarity == sorted(similarity, reverse=True)
    assert all("my_photos/val/" in x for x in lines)
