"""Markdown tables of the config keys, generated from their declarations.

Every row comes from the key's field in :mod:`wcl.config` or :mod:`wcl.eval.config`
(default, type) and the metadata :func:`wcl.config_schema.key` stored there (allowed
values, range, resume rule, help), so the documentation cannot drift from the checks.
``python -m wcl.config_docs [TABLE]`` prints them; ``python -m wcl.config_docs --update
FILE...`` rewrites the regions of markdown files marked ``<!-- NAME:start -->`` /
``<!-- NAME:end -->`` for each NAME of :data:`REGIONS` (docs/pretraining.md and
docs/evaluation.md; tests/test_docs.py checks they are in sync).
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

from wcl.config import Config
from wcl.config_schema import KeyInfo, key_info, sections

__all__ = ["REGIONS", "TABLES", "key_table_markdown", "region_text", "table_rows", "update_regions"]

# Table name -> (title, config class name, section). The eval sections data and run are
# the same in the three eval configs, so LinearConfig stands for them.
TABLES: dict[str, tuple[str, str, str]] = {
    "data": ("Pre-training: `data`", "Config", "data"),
    "model": ("Pre-training: `model`", "Config", "model"),
    "optim": ("Pre-training: `optim`", "Config", "optim"),
    "train": ("Pre-training: `train`", "Config", "train"),
    "eval-data": ("Evaluation (all three commands): `data`", "LinearConfig", "data"),
    "eval-run": ("Evaluation (all three commands): `run`", "LinearConfig", "run"),
    "linear": ("`wcl linear-eval`: `linear`", "LinearConfig", "linear"),
    "knn": ("`wcl knn-eval`: `knn`", "KnnConfig", "knn"),
    "finetune": ("`wcl finetune`: `finetune`", "FinetuneConfig", "finetune"),
}
# Marked region of a markdown page -> (its tables, their heading level).
REGIONS: dict[str, tuple[tuple[str, ...], int]] = {
    "config-keys": (("data", "model", "optim", "train"), 4),
    "eval-config-keys": (("eval-data", "eval-run", "linear", "knn", "finetune"), 3),
}
HEADER = ("key", "default", "allowed", "may change on resume", "meaning")
# Ranges a narrower one implies, left out of the "allowed" column beside it.
_IMPLIED = {"in [0, 1]": {">= 0"}, "in (0, 1]": {"> 0", ">= 0"}}


def _config_class(name: str) -> type:
    if name == "Config":
        return Config
    # Imported here: wcl.eval loads torch, which the pre-training tables do not need.
    from wcl.eval import config as eval_config

    return getattr(eval_config, name)


def _yaml(value: Any) -> str:
    """A value as it is written in a config file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return str(value)


def _allowed(hint: Any, info: KeyInfo) -> str:
    """The "allowed" cell: the choices, or the type with its range (and null if allowed)."""
    if info.choices is not None:
        return ", ".join(f"`{_yaml(c)}`" for c in info.choices)
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    if base is bool:
        return "true, false"
    implied = set().union(*(_IMPLIED.get(b, set()) for b in info.bounds))
    ranges = " and ".join(b for b in info.bounds if b not in implied)
    # A list's range names its items ("a list of ..."); a number's follows its type.
    text = ranges.removeprefix("a ") if base is list else f"{base.__name__} {ranges}".strip()
    if info.at_most is not None:
        text += f", at most {info.at_most}"
    return text + (", or null" if optional else "")


def table_rows(table: str) -> list[tuple[str, ...]]:
    """The rows of one table (see :data:`TABLES`): key, default, allowed, resume, meaning."""
    _, cls_name, section = TABLES[table]
    cls = sections(_config_class(cls_name))[section]
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        info = key_info(f)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        rows.append(
            (
                f"`{section}.{f.name}`",
                f"`{_yaml(default)}`",
                _allowed(hints[f.name], info),
                "yes" if info.resume_ok else "no",
                info.help,
            )
        )
    return rows


def key_table_markdown(section: str | None = None, level: int = 3) -> str:
    """Markdown tables of the config keys: one per table of :data:`TABLES`, or only
    ``section``'s; each under a heading of ``level`` (3: ``###``)."""
    if section is not None and section not in TABLES:
        raise ValueError(f"unknown key table {section!r}; choose one of {list(TABLES)}")
    out = []
    for name in [section] if section else TABLES:
        lines = [f"{'#' * level} {TABLES[name][0]}", "", _row(HEADER), _row(("---",) * 5)]
        lines += [_row(r) for r in table_rows(name)]
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def region_text(name: str) -> str:
    """What the marked region ``name`` of :data:`REGIONS` holds between its markers."""
    tables, level = REGIONS[name]
    return "\n".join(key_table_markdown(t, level) for t in tables)


def update_regions(markdown: str) -> str:
    """``markdown`` with every marked region of :data:`REGIONS` regenerated."""
    for name in REGIONS:
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if start in markdown:
            head, rest = markdown.split(start, 1)
            markdown = f"{head}{start}\n{region_text(name)}{end}{rest.split(end, 1)[1]}"
    return markdown


def _row(cells: tuple[str, ...]) -> str:
    # A | inside a cell would end it: escaped.
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--update"]:
        for page in sys.argv[2:]:
            path = Path(page)
            path.write_text(update_regions(path.read_text()))
    else:
        sys.stdout.write(key_table_markdown(*sys.argv[1:2]))
