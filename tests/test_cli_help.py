"""Every example that ``wcl ... --help`` shows is real, and a misspelt preset name gets a
suggestion.

An example runs through ``wcl.cli.main`` itself with the long job (pre-training, an
evaluation, the demo) replaced by a recorder: it must parse, and the config it would run
with (preset, ``--set`` overrides, checkpoint) must load. The commands that load no config
(convert, export, embed, report, check-data) must parse.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from evalkit import (
    float32_default,  # noqa: F401 (autouse: float32 default dtype)
    tiny_checkpoint,
)

from wcl.cli import build_parser, main
from wcl.config import Config
from wcl.config_files import ConfigError, preset_path, read_config
from wcl.eval.config import FinetuneConfig, KnnConfig, LinearConfig, eval_preset_path

# An example is a line "example: wcl ..." or, under "examples:", an indented "  wcl ...".
EXAMPLE = re.compile(r"^(?:example: |\s+)(wcl .*)$", re.M)
# "--set key=value" inside a help text; a closing bracket ends it: "(same as --set a.b=c)".
SET_FRAGMENT = re.compile(r"--set (\S+?)(?=[\s)]|$)", re.M)

EVAL_KINDS = {"linear-eval": "linear", "knn-eval": "knn", "finetune": "finetune"}
CONFIG_TYPES = {
    "pretrain": Config,
    "demo": Config,
    "linear-eval": LinearConfig,
    "knn-eval": KnnConfig,
    "finetune": FinetuneConfig,
}
# The long job of each command that loads a config, and a result its printing accepts.
LONG_JOBS = {
    "pretrain": ("wcl.train.pretrain", Path("runs/x")),
    "demo": ("wcl.demo.run_demo", {"summary": "", "methods": {}, "minutes": 0.0}),
    "linear-eval": ("wcl.eval.linear.linear_eval", {"run_dir": "runs/x/eval"}),
    "knn-eval": ("wcl.eval.knn.knn_eval", {"run_dir": "runs/x/eval"}),
    "finetune": ("wcl.eval.finetune.finetune", {"run_dir": "runs/x/eval"}),
}


def _commands() -> dict[str, argparse.ArgumentParser]:
    """Every subcommand's parser, by name."""
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _texts(parser: argparse.ArgumentParser) -> list[str]:
    """Every text of a parser's help: description, epilog and each argument's help."""
    return [t for t in (parser.description, parser.epilog, *(a.help for a in parser._actions)) if t]


def _examples(parser: argparse.ArgumentParser) -> list[str]:
    return [line for text in _texts(parser) for line in EXAMPLE.findall(text)]


def _fragments(parser: argparse.ArgumentParser) -> list[str]:
    """The ``--set key=value`` shown in help texts outside the examples."""
    return [f for text in _texts(parser) for f in SET_FRAGMENT.findall(EXAMPLE.sub("", text))]


COMMANDS = _commands()
EXAMPLES = [(name, line) for name, sub in COMMANDS.items() for line in _examples(sub)]
FRAGMENTS = [(name, f) for name, sub in COMMANDS.items() for f in _fragments(sub)]


@pytest.fixture(autouse=True)
def long_jobs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, list[Any]]:
    """Run in an empty folder, with every long job replaced by a recorder of its config:
    nothing here may start a real run."""
    monkeypatch.chdir(tmp_path)
    calls: dict[str, list[Any]] = {}
    for command, (target, result) in LONG_JOBS.items():
        calls[command] = []

        def record(cfg: Any, *args: Any, _seen: list = calls[command], _out: Any = result,
                   **kwargs: Any) -> Any:  # fmt: skip
            _seen.append(cfg)
            return _out

        module, _, name = target.rpartition(".")
        # By module object: the package wcl.eval re-exports its finetune function under the
        # name of the module wcl.eval.finetune, so a dotted string would reach the function.
        monkeypatch.setattr(importlib.import_module(module), name, record)
    return calls


def _raw_config(command: str, args: argparse.Namespace) -> dict[str, Any]:
    if command in EVAL_KINDS:
        return read_config(eval_preset_path(args.config, EVAL_KINDS[command]), args.set)
    return read_config(args.config, args.set)


def _run_example(line: str, calls: dict[str, list[Any]], data: Path) -> None:
    """Parse ``line`` with the real parser; run it through ``main`` if it loads a config."""
    argv = shlex.split(line)
    assert argv[0] == "wcl", line
    args = build_parser().parse_args(argv[1:])  # SystemExit (and argparse's message) if bad
    command = argv[1]
    if command not in LONG_JOBS:
        return
    if command in EVAL_KINDS:
        # The example's checkpoint, relative to the empty working folder (runs/x/last.pt).
        Path(args.checkpoint).parent.mkdir(parents=True, exist_ok=True)
        tiny_checkpoint(Path(args.checkpoint))
    root = _raw_config(command, args).get("data", {}).get("root")
    if root and not Path(root).exists():
        # The data folder an example names (/data/imagenet) is the user's, not this machine's:
        # checked are the example's keys and values, so point data.root at a folder here.
        data.mkdir(exist_ok=True)
        argv += ["--set", f"data.root={data}"]
    assert main(argv[1:]) == 0, f"{line!r} fails (its message is on stderr above)"
    (cfg,) = calls[command]
    assert isinstance(cfg, CONFIG_TYPES[command])


@pytest.mark.parametrize("command, line", EXAMPLES, ids=[line for _, line in EXAMPLES])
def test_every_help_example_parses_and_loads_its_config(command, line, long_jobs, tmp_path):
    assert line.split()[1] == command, f"wcl {command} --help shows an example of another command"
    _run_example(line, long_jobs, tmp_path / "data")


@pytest.mark.parametrize("command, fragment", FRAGMENTS, ids=[f for _, f in FRAGMENTS])
def test_every_set_shown_in_help_names_a_real_key(command, fragment, long_jobs, tmp_path):
    """A ``--set key=value`` in an argument's help, added to the command's first example."""
    first = next(line for name, line in EXAMPLES if name == command)
    _run_example(f"{first} --set {shlex.quote(fragment)}", long_jobs, tmp_path / "data")


def test_every_command_shows_an_example_and_no_stray_command_line():
    """Each subcommand has an example; a "wcl <command>" anywhere else in a help text
    would be a command line this test does not check."""
    mention = re.compile(rf"\bwcl (?:{'|'.join(map(re.escape, COMMANDS))})\b")
    top = build_parser()
    for name, sub in [("wcl", top), *COMMANDS.items()]:
        if sub is not top:
            assert _examples(sub), f"wcl {name} --help shows no example"
        for text in _texts(sub):
            assert not mention.search(EXAMPLE.sub("", text)), f"wcl {name}: {text!r}"
    assert ("knn-eval", "knn.k=20") in FRAGMENTS  # the --set help's example is checked


def test_help_prints_examples_unwrapped(monkeypatch):
    """A narrow terminal wraps the descriptions but not an example line (copied, a wrapped
    one would lose its last options, e.g. linear-eval's --fast)."""
    monkeypatch.setenv("COLUMNS", "60")
    for name, sub in _commands().items():
        lines = sub.format_help().splitlines()
        for example in _examples(sub):
            assert any(line.strip().endswith(example) for line in lines), (name, example)


@pytest.mark.parametrize(
    "argv, suggestion",
    [
        (["pretrain", "--config", "fashion-mnist-dem"], "'fashion-mnist-demo'"),
        (["pretrain", "--config", "imagenet-r50-100"], "'imagenet-r50-100ep'"),
        (["demo", "--config", "cifar10-r8"], "'cifar10-r18'"),
        (["knn-eval", "--config", "knn-smal", "--checkpoint", "x.pt"], "'knn-small'"),
        (
            ["linear-eval", "--config", "linear-imagent", "--checkpoint", "x.pt"],
            "'linear-imagenet'",
        ),
        (
            ["finetune", "--config", "finetune-imagenet-1", "--checkpoint", "x.pt"],
            "'finetune-imagenet-1pct'",
        ),
    ],
)
def test_a_misspelt_preset_name_gets_a_suggestion(argv, suggestion, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"config file '{argv[2]}' not found (did you mean {suggestion}?); shipped " in err


def test_a_name_close_to_several_presets_names_them_all():
    with pytest.raises(ConfigError) as err:
        preset_path("imagenet")
    assert (
        "config file 'imagenet' not found (did you mean 'imagenet-r50-100ep', "
        "'imagenet-r50-200ep' or 'imagenet-r50-800ep'?); shipped presets: ['cifar10-r18', "
    ) in str(err.value)


@pytest.mark.parametrize(
    "argv, listed",
    [
        (["pretrain", "--config", "no-such-thing"], "shipped presets: ['cifar10-r18', "),
        (
            ["knn-eval", "--config", "zzz.yaml", "--checkpoint", "x.pt"],
            "shipped knn presets: ['knn-imagenet', 'knn-small']",
        ),
    ],
)
def test_a_name_close_to_no_preset_is_not_found_with_the_presets_listed(argv, listed, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"wcl: config error: config file '{argv[2]}' not found; {listed}" in err
    assert "did you mean" not in err


def test_a_missing_path_is_not_taken_for_the_preset_of_its_name(tmp_path):
    """Only a bare name is a preset: a missing file under a folder is an error, never the
    shipped preset that shares its name; an eval command takes only its own kind."""
    from wcl.config import load_config
    from wcl.eval.config import load_eval_config

    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "fashion-mnist-demo.yaml"))
    ckpt = tiny_checkpoint(tmp_path / "pre.pt")
    with pytest.raises(ConfigError, match="not one of the knn presets"):
        load_eval_config("knn", "linear-small", [f"run.checkpoint={ckpt}"])


def test_a_user_config_may_start_from_a_shipped_preset(tmp_path):
    from wcl.config import load_config

    mine = tmp_path / "mine.yaml"
    mine.write_text("base: fashion-mnist-demo.yaml\ntrain:\n  epochs: 2\n")
    cfg = load_config(str(mine))
    assert cfg.train.epochs == 2 and cfg.model.backbone == "resnet10"  # the preset's
    mine.write_text("base: no-such-file.yaml\n")
    with pytest.raises(ConfigError, match="'base' 'no-such-file.yaml' is neither"):
        load_config(str(mine))
