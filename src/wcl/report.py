"""Figures, report.md and report.html from a run directory's files.

Works on a single pre-training run (``metrics.jsonl``) and on a demo directory holding
``wcl/`` and ``simclr/`` runs plus ``results.json``, ``embeddings.npz`` and the
``late_batch.pt`` that the trainer saves at its last step. Everything is redrawn from
those files, so ``wcl report RUN_DIR`` can be run at any time. A single run's report
also gets a table of numbers (:mod:`wcl.report_summary`).
"""

from __future__ import annotations

import html
import json
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from wcl.report_summary import summary_lines  # noqa: E402

__all__ = ["MetricsError", "read_metrics", "write_report", "knn_figure", "RUN_NAMES"]

RUN_NAMES = {"wcl": "WCL", "simclr": "SimCLR (graph loss off)"}
COLOURS = {"wcl": "tab:blue", "simclr": "tab:orange"}


class MetricsError(ValueError, OSError):
    """A line of metrics.jsonl that is not JSON; the message names the file and line.

    Also an OSError, so that the command line prints it as one line (as for any file it
    cannot read) instead of a traceback.
    """


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``metrics.jsonl`` (training steps and evaluation lines).

    A last line that is not JSON is skipped with a warning: a run killed while writing it
    leaves it cut short. Anywhere else such a line is a :class:`MetricsError`.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a wcl run directory?")
    numbered = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1)
                if line.strip()]  # fmt: skip
    records = []
    for i, (number, line) in enumerate(numbered):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i < len(numbered) - 1:
                raise MetricsError(
                    f"{path}, line {number}: not a JSON record ({err.msg}): {line[:60]!r}"
                ) from None
            warnings.warn(
                f"{path}: skipped its last line ({number}), which is cut short: the run was "
                "probably stopped while writing it",
                stacklevel=2,
            )
    return records


def _runs(root: Path) -> dict[str, list[dict]]:
    """{name: records} for a demo directory's runs, or {"run": records} for one run."""
    found = {name: read_metrics(root / name) for name in RUN_NAMES if (root / name).is_dir()}
    return found or {"run": read_metrics(root)}


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in records if key in r and r[key] is not None and "step" in r]
    return np.array([r["step"] for r in rows]), np.array([r[key] for r in rows], dtype=float)


def _integer_x(ax: Axes) -> None:
    """Ticks only at whole numbers on the x axis (steps, epochs): never "epoch 1.5"."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _label(name: str) -> str:
    extra = {"random_init": "same network, random init", "raw_pixels": "raw pixels"}
    return RUN_NAMES.get(name) or extra.get(name, name)


def plot_training(runs: dict[str, list[dict]], path: Path) -> Path:
    """Instance loss, graph loss and learning rate against the step."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for name, records in runs.items():
        colour = COLOURS.get(name)
        for ax, key in zip(axes, ("instance_loss", "graph_loss", "lr"), strict=True):
            steps, values = _series(records, key)
            if key == "graph_loss" and name == "simclr":
                continue  # identically zero: the baseline has no graph loss
            if len(steps):
                ax.plot(steps, values, label=_label(name), color=colour)
    for ax, title in zip(axes, ("instance loss (NT-Xent)", "graph loss (weak labels)",
                                "learning rate"), strict=True):  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("step")
        _integer_x(ax)
        ax.grid(alpha=0.3)
    axes[0].legend()
    return _save(fig, path)


def knn_figure(runs: dict[str, list[dict]], results: dict) -> Figure:
    """Online kNN top-1 (%) over epochs, with the final baselines as horizontal lines."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, records in runs.items():
        rows = [r for r in records if "knn_top1" in r]
        if rows:
            ax.plot([r["epoch"] for r in rows], [r["knn_top1"] for r in rows], "o-",
                    label=_label(name), color=COLOURS.get(name))  # fmt: skip
    for key, style in (("raw_pixels", ":"), ("random_init", "--")):
        if key in results.get("methods", {}):
            value = results["methods"][key]["knn_top1"]
            ax.axhline(value, linestyle=style, color="grey", label=f"{key.replace('_', ' ')}")
    ax.set_xlabel("epoch")
    _integer_x(ax)  # the checks run after whole epochs
    ax.set_ylabel("kNN top-1 (%)")
    ax.set_title("kNN accuracy on the held-out split")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_knn(runs: dict[str, list[dict]], results: dict, path: Path) -> Path:
    """:func:`knn_figure`, saved to ``path``."""
    return _save(knn_figure(runs, results), path)


def plot_weak_labels(runs: dict[str, list[dict]], path: Path) -> Path:
    """Components per batch, mean component size and weak-label precision over training."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    keys = ("components", "component_size", "precision")
    titles = ("components per global batch", "mean component size",
              "weak-label precision (pairs sharing a class)")  # fmt: skip
    for name, records in runs.items():
        for ax, key in zip(axes, keys, strict=True):
            steps, values = _series(records, key)
            if len(steps):
                ax.plot(steps, values, label=_label(name), color=COLOURS.get(name))
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        _integer_x(ax)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_embedding_map(embeddings: Path, path: Path, max_points: int = 2000) -> Path:
    """t-SNE of test embeddings (from ``embeddings.npz``: one array per method + targets)."""
    from sklearn.manifold import TSNE

    data = np.load(embeddings, allow_pickle=False)
    classes = [str(c) for c in data["classes"]] if "classes" in data else None
    targets = data["targets"][:max_points]
    methods = [k for k in data.files if k not in ("targets", "classes")]
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 5), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        feats = data[method][:max_points]
        xy = TSNE(n_components=2, init="pca", random_state=0, perplexity=30).fit_transform(feats)
        scatter = ax.scatter(xy[:, 0], xy[:, 1], c=targets, cmap="tab10", s=4)
        ax.set_title(f"t-SNE: {_label(method)}")
        ax.set_xticks([])
        ax.set_yticks([])
    handles, _ = scatter.legend_elements()
    names = classes or [str(i) for i in range(len(handles))]
    fig.legend(handles, names[: len(handles)], loc="lower center", ncol=min(10, len(handles)),
               fontsize=8)  # fmt: skip
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_components(late_batch: Path, path: Path, groups: int = 8, per_group: int = 10) -> Path:
    """Image grids of weak-label components from the last training batch.

    Each row is one component (the largest first), its images as the graph saw them (the
    first augmented view), titled with its size and how many members share its most
    common true class.
    """
    batch = torch.load(late_batch, map_location="cpu", weights_only=True)
    images, labels = batch["images"], batch["labels"]
    targets = batch.get("targets")
    classes = batch.get("classes") or []
    ids, counts = torch.unique(labels, return_counts=True)
    order = ids[torch.argsort(counts, descending=True, stable=True)][:groups]
    fig, axes = plt.subplots(len(order), per_group, figsize=(per_group * 1.1, len(order) * 1.35),
                             squeeze=False)  # fmt: skip
    for row, comp in enumerate(order.tolist()):
        members = torch.nonzero(labels == comp).flatten()
        title = f"component of {len(members)}"
        if targets is not None:
            member_targets = targets[members]
            top = torch.mode(member_targets).values.item()
            agree = int((member_targets == top).sum())
            name = classes[top] if top < len(classes) else str(top)
            title += f": {agree}/{len(members)} are {name}"
        axes[row, 0].set_title(title, loc="left", fontsize=8)
        for col in range(per_group):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(members):
                img = images[members[col]]
                cmap = "gray" if img.shape[0] == 1 else None
                ax.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap=cmap)
                if targets is not None:
                    # Each image's true class under it; red where it is not the majority's.
                    own = int(targets[members[col]])
                    name = classes[own] if own < len(classes) else str(own)
                    ax.text(0.5, -0.08, name[:10], transform=ax.transAxes, ha="center",
                            va="top", fontsize=6, color="black" if own == top else "red")  # fmt: skip
    fig.suptitle("What the graph puts together: weak-label components of the last batch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _results_table(results: dict) -> list[str]:
    methods = results.get("methods", {})
    if not methods:
        return []
    lines = ["| method | kNN top-1 (%) | linear probe top-1 (%) | pre-training |",
             "|---|---|---|---|"]  # fmt: skip
    for name, row in methods.items():
        linear = row.get("linear_top1")
        lines.append(
            f"| {row.get('label', name)} | {row['knn_top1']:.2f} | "
            f"{'' if linear is None else f'{linear:.2f}'} | {row.get('pretrain', '')} |"
        )
    return lines


def write_report(run_dir: str | Path) -> Path:
    """Draw every figure the run directory's files allow and write report.md/.html."""
    root = Path(run_dir)
    runs = _runs(root)
    figures = root / "figures"
    figures.mkdir(exist_ok=True)
    results_file = root / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    drawn: list[tuple[str, Path]] = [
        ("Training curves", plot_training(runs, figures / "training.png")),
        ("Weak-label statistics", plot_weak_labels(runs, figures / "weak_labels.png")),
    ]
    if any("knn_top1" in r for records in runs.values() for r in records):
        drawn.append(("kNN accuracy over epochs", plot_knn(runs, results, figures / "knn.png")))
    if (root / "embeddings.npz").exists():
        drawn.append(("Test embeddings (t-SNE)",
                      plot_embedding_map(root / "embeddings.npz", figures / "tsne.png")))  # fmt: skip
    late = next((p for p in (root / "wcl" / "late_batch.pt", root / "late_batch.pt") if p.exists()),
                None)  # fmt: skip
    if late is not None:
        drawn.append(("Weak-label components", plot_components(late, figures / "components.png")))

    lines = [f"# WCL report: {root.name}", ""]
    if "run" in runs:  # a single pre-training run, not a demo directory
        lines += summary_lines(root, runs["run"])
    if results.get("summary"):
        lines += [results["summary"], ""]
    table = _results_table(results)
    if table:
        lines += ["## Results", "", *table, ""]
        if results.get("notes"):
            lines += [results["notes"], ""]
    for title, path in drawn:
        lines += [f"## {title}", "", f"![{title}](figures/{path.name})", ""]
    report = root / "report.md"
    report.write_text("\n".join(lines))
    _write_html(root, lines)
    return report


def _write_html(root: Path, lines: list[str]) -> Path:
    """A plain HTML rendering of report.md (headings, paragraphs, table, images)."""
    body: list[str] = []
    table: list[str] = []
    for line in lines + [""]:
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if not set("".join(cells)) <= set("-"):
                tag = "th" if not table else "td"
                table.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
            continue
        if table:
            body.append("<table>" + "".join(table) + "</table>")
            table = []
        if line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("!["):
            src = line[line.index("(") + 1 : -1]
            body.append(f'<img src="{html.escape(src)}" style="max-width:100%">')
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}")  # fmt: skip
    page = f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style>" \
           f"<title>WCL report</title></head><body>{''.join(body)}</body></html>"  # fmt: skip
    path = root / "report.html"
    path.write_text(page)
    return path
