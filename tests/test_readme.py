"""The README's examples run as written: its 2-epoch pre-training command, then each of
its Python blocks, in a fresh interpreter in the folder that command wrote ``runs/try`` to."""

import re
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
    """A folder like the repository root (the fixtures the example names), after the
    README's pre-training example has run there."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "tests").mkdir()
    (folder / "tests" / "fixtures").symlink_to(ROOT / "tests" / "fixtures")
    wcl = Path(sys.executable).parent / "wcl"
    argv = [str(wcl) if word == "wcl" else word for word in PRETRAIN_EXAMPLE.split()
            if word != "\\"]  # fmt: skip
    run(argv, folder)
    assert (folder / "runs" / "try" / "last.pt").is_file()
    return folder


def test_the_readme_has_two_python_blocks():
    assert len(PYTHON_BLOCKS) == 2


def test_loading_a_trained_backbone(workdir):
    out = run([sys.executable, "-c", PYTHON_BLOCKS[0]], workdir)
    assert "BackboneSpec(name='resnet10', stem='small-s2', in_channels=1, width=32)" in out


def test_wcl_steps_in_your_own_loop(workdir):
    out = run([sys.executable, "-c", PYTHON_BLOCKS[1]], workdir)
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
