"""The numbers in a single pre-training run's report: config, training, evaluations.

Read from the run directory's ``config.yaml`` (written by the trainer), its
``metrics.jsonl`` records and every ``eval/**/results.json`` that the evaluation commands
wrote (``RUN/eval/<checkpoint stem>/<command>/results.json``). Whatever is missing (no
config, no kNN records, no graph loss, no evaluations) is left out of the tables.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import yaml

__all__ = ["summary_lines", "training_seconds", "images_per_second", "eval_rows"]


def _read_config(root: Path) -> dict[str, Any]:
    """The run's config.yaml as nested dicts; {} when absent or unreadable (with a warning)."""
    path = root / "config.yaml"
    if not path.is_file():
        return {}
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        warnings.warn(f"{path}: not readable YAML, config left out of the report ({err})",
                      stacklevel=3)  # fmt: skip
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _training(records: list[dict]) -> list[dict]:
    # Training lines carry the lr; kNN checks and skipped-file counts do not.
    return [r for r in records if "lr" in r and "step" in r]


def _windows(records: list[dict]) -> list[tuple[int, float]]:
    """(steps, images/s) of each training line that timed its window of steps.

    A line covers the steps since the line before. After a resume the step count can go
    back (the run restarts from its checkpoint): such a line's window is unknown and left out.
    """
    out, previous = [], 0
    for r in _training(records):
        steps = r["step"] - previous
        previous = r["step"]
        speed = r.get("images_per_s")
        if steps > 0 and isinstance(speed, (int, float)) and speed > 0:
            out.append((steps, float(speed)))
    return out


def training_seconds(records: list[dict], batch: int) -> float | None:
    """Seconds spent in training steps: each line's steps x global batch / its images/s.

    Leaves out what no line times: kNN checks, checkpoint writes, start-up. None when no
    line has a speed.
    """
    windows = _windows(records)
    return sum(steps * batch / speed for steps, speed in windows) if windows else None


def images_per_second(records: list[dict]) -> float | None:
    """Mean training speed over all timed steps (images / seconds; the batch cancels)."""
    windows = _windows(records)
    if not windows:
        return None
    return sum(steps for steps, _ in windows) / sum(steps / speed for steps, speed in windows)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def _number(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec``; "nan" for a step whose metrics were all dropped."""
    if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return "nan" if isinstance(value, float) else str(value)
    return format(value, spec)


def _config_rows(cfg: dict[str, Any], records: list[dict]) -> list[tuple[str, str]]:
    data, model = cfg.get("data") or {}, cfg.get("model") or {}
    optim, train = cfg.get("optim") or {}, cfg.get("train") or {}
    rows: list[tuple[str, str]] = []

    def add(name: str, *values: Any, fmt: str = "{}") -> None:
        if all(v is not None for v in values):
            rows.append((name, fmt.format(*values)))

    add("dataset", data.get("dataset"))
    add("data.root", data.get("root"))
    add("image size", data.get("image_size"), data.get("channels"), fmt="{} px, {} channel(s)")
    add("backbone", model.get("backbone"), model.get("stem"), model.get("width"),
        fmt="{}, {} stem, width {}")  # fmt: skip
    add("projection heads", model.get("hidden_dim"), model.get("out_dim"),
        fmt="hidden {}, out {}")  # fmt: skip
    weight = model.get("graph_weight")
    if weight is not None:
        add("graph_weight", weight, "SimCLR: graph loss off" if weight == 0 else "WCL",
            fmt="{} ({})")  # fmt: skip
    add("model.gather", model.get("gather"))
    add("batch size (global)", train.get("batch_size"))
    trained = max((r.get("epoch", 0) for r in _training(records)), default=0)
    add("epochs (trained / planned)", trained, train.get("epochs"), fmt="{} / {}")
    add("lr", optim.get("lr"), optim.get("lr_scaling"), fmt="{} base, {} scaling")
    add("warm-up epochs", optim.get("warmup_epochs"))
    add("seed", train.get("seed"))
    return rows


def _training_rows(records: list[dict], batch: int | None) -> list[tuple[str, str]]:
    training = _training(records)
    if not training:
        return []
    last = training[-1]
    rows = [("steps", str(last["step"]))]
    peak = max((r["lr"] for r in training if isinstance(r["lr"], (int, float))), default=None)
    if peak is not None:
        rows.append(("peak lr (logged)", f"{peak:.4g}"))
    seconds = training_seconds(records, batch) if batch else None
    if seconds is not None:
        rows.append(("training time (estimate)", f"{_duration(seconds)}: each metrics line's "
                     "steps x batch / images/s; kNN checks, checkpoints and start-up not "
                     "included"))  # fmt: skip
    speed = images_per_second(records)
    if speed is not None:
        rows.append(("images/s (mean over the timed steps)", f"{speed:.1f}"))
    where = f" (step {last['step']}, epoch {last.get('epoch', '?')})"
    rows.append(("final loss" + where, _number(last.get("loss"), ".4f")))
    if "instance_loss" in last:
        rows.append(("final instance_loss", _number(last["instance_loss"], ".4f")))
    # Only runs with the graph head log weak-label statistics; SimCLR's graph loss is 0.
    if "graph_loss" in last and "components" in last:
        rows.append(("final graph_loss", _number(last["graph_loss"], ".4f")))
    if "precision" in last:
        rows.append(("final weak-label precision", _number(last["precision"], ".3f")))
    if "components" in last:
        rows.append(("final components per batch", _number(last["components"], ".1f")))
    knn = [r for r in records if "knn_top1" in r]
    if knn:
        top5 = knn[-1].get("knn_top5")
        value = _number(knn[-1]["knn_top1"], ".2f")
        if top5 is not None:
            value += f" / {_number(top5, '.2f')}"
        rows.append((f"online kNN top-1 / top-5 (%), epoch {knn[-1].get('epoch', '?')}", value))
    return rows


def _checkpoint_name(root: Path, path: Path, results: dict[str, Any]) -> str:
    saved = results.get("checkpoint")
    name = saved.get("path") if isinstance(saved, dict) else saved
    if isinstance(name, str):
        where = Path(name)
        # A checkpoint of this run goes by its file name; any other by its full path.
        return where.name if where.resolve().parent == root.resolve() else name
    parts = path.relative_to(root / "eval").parts
    return parts[0] if len(parts) > 2 else "?"


def _accuracy_cells(results: dict[str, Any]) -> tuple[str, str, str]:
    """(top-1, top-5, notes) of a knn-eval / linear-eval / finetune results.json."""
    ks = sorted((key for key in results if re.fullmatch(r"k\d+", key)),
                key=lambda key: -int(key[1:]))  # fmt: skip
    if ks:
        top1 = ", ".join(f"{_number(results[k].get('top1'), '.2f')} (k={k[1:]})" for k in ks)
        top5 = ", ".join(f"{_number(results[k].get('top5'), '.2f')} (k={k[1:]})" for k in ks)
        return top1, top5, ""
    final, best = results.get("final") or {}, results.get("best") or {}
    notes = []
    if final:
        notes.append(f"final: epoch {final.get('epoch', '?')}")
    if best:
        notes.append(f"best top-1 {_number(best.get('top1'), '.2f')} at epoch "
                     f"{best.get('epoch', '?')}")  # fmt: skip
    if results.get("mode"):
        notes.append(f"mode {results['mode']}")
    subset = results.get("subset")
    if isinstance(subset, dict) and subset.get("images") is not None:
        notes.append(f"{subset['images']} labelled images")  # finetune's label subset
    if results.get("complete") is False:
        notes.append("incomplete")
    top1 = _number(final["top1"], ".2f") if "top1" in final else ""
    top5 = _number(final["top5"], ".2f") if "top5" in final else ""
    return top1, top5, "; ".join(notes)


def eval_rows(root: Path) -> list[tuple[str, str, str, str, str]]:
    """(command, checkpoint, top-1 %, top-5 %, notes) of each ``root/eval/**/results.json``."""
    rows = []
    for path in sorted((root / "eval").rglob("results.json")):
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            warnings.warn(f"{path}: not readable, left out of the report ({err})", stacklevel=2)
            continue
        if not isinstance(results, dict):
            continue
        command = results.get("command") or path.parent.name
        top1, top5, notes = _accuracy_cells(results)
        rows.append((str(command), _checkpoint_name(root, path, results), top1, top5, notes))
    return rows


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    # "|" inside a value would split its cell.
    cells = [[str(c).replace("|", "/") for c in row] for row in rows]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(row) + " |" for row in cells
    ]


def summary_lines(root: Path, records: list[dict]) -> list[str]:
    """Markdown sections "Run summary", "Training" and "Evaluations" (those with rows)."""
    cfg = _read_config(root)
    lines: list[str] = []
    config_rows = _config_rows(cfg, records)
    if config_rows:
        lines += ["## Run summary", "", *_table(("setting", "value"), config_rows), ""]
    batch = (cfg.get("train") or {}).get("batch_size")
    training_rows = _training_rows(records, batch if isinstance(batch, int) else None)
    if training_rows:
        lines += ["## Training", "", *_table(("measure", "value"), training_rows), ""]
    evals = eval_rows(root)
    if evals:
        header = ("command", "checkpoint", "top-1 (%)", "top-5 (%)", "notes")
        lines += ["## Evaluations", "", *_table(header, evals), ""]
    return lines
