"""The ``wcl`` command: parse arguments, then call the library."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable

from wcl.config import AMP_CHOICES, load_config
from wcl.config_files import PRESET_DIR, ConfigError, preset_names

__all__ = ["main"]


def _presets() -> str:
    return ", ".join(preset_names())


def _eval_presets(kind: str) -> str:
    # Named here, not imported from wcl.eval (EVAL_PRESET_DIR), which --help does not load.
    return ", ".join(preset_names(PRESET_DIR / "eval", kind))


def _examples(*commands: str) -> str:
    """An epilog of example command lines, one a line (tests/test_cli_help.py runs each
    through this parser and checks the config it would load)."""
    if len(commands) == 1:
        return f"example: {commands[0]}"
    return "examples:\n" + "\n".join(f"  {command}" for command in commands)


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that an epilog of :func:`_examples` is printed as
    written: wrapped to the terminal, a copied example would lose its last options."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith(("example: ", "examples:\n")):
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


# A real key of each evaluation's own section, for the --set help ("epochs" is no knn key).
_SET_EXAMPLES = {"linear": "linear.epochs=10", "knn": "knn.k=20", "finetune": "finetune.epochs=10"}


def _one_line(err: BaseException) -> str:
    """An error's message as one line. An error raised in a DataLoader worker arrives
    re-raised with the worker's whole traceback as its message; its last line is the error
    ("module.ErrorName: message"), the rest is noise to a user."""
    text = str(err)
    if isinstance(err, OSError) and err.strerror and err.filename is None and err.args[1:]:
        text = err.strerror  # OSError(errno, message) would print "[Errno 28] message"
    if "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


# What to lower when a command runs out of memory.
_MEMORY_HINTS = {
    "pretrain": "lower train.batch_size or model.width",
    "demo": "lower train.batch_size or model.width",
    "linear-eval": "lower linear.batch_size or run.eval_batch_size",
    "knn-eval": "lower run.eval_batch_size or knn.chunk",
    "finetune": "lower finetune.batch_size or run.eval_batch_size",
    "embed": "lower --batch-size",
}


def _out_of_memory(err: BaseException) -> str | None:
    """The gist of an out-of-memory error (torch's first two sentences), or None for any
    other error. torch says "CUDA out of memory" on GPUs (torch.OutOfMemoryError) and
    "can't allocate memory" in a plain RuntimeError on the CPU."""
    text = " ".join(str(err).split())
    if not (isinstance(err, MemoryError) or "out of memory" in text or "allocate memory" in text):
        return None
    text = re.sub(r"^\[enforce fail at [^\]]*\] [^.]*\. ", "", text)  # c10's source location
    return ". ".join(text.split(". ")[:2]).rstrip(".") or type(err).__name__


def _user_errors(run: Callable[[], int]) -> int:
    """Run a subcommand; a bad file or a missing package is one line on stderr, exit 1."""
    from wcl.checkpoint import CheckpointError
    from wcl.export import OnnxUnavailableError

    try:
        return run()
    except (CheckpointError, FileNotFoundError, OnnxUnavailableError) as err:
        print(f"wcl: error: {_one_line(err)}", file=sys.stderr)
        return 1


def _eval_config(kind: str, args: argparse.Namespace, extra: list[str] | None = None) -> object:
    from wcl.eval.config import load_eval_config

    overrides = (extra or []) + list(args.set)
    if args.checkpoint:
        # Quoted (a JSON string is a YAML one), so that no file name reads as YAML: a "#",
        # ": " or a name like "true" stays part of the path.
        overrides.insert(0, f"run.checkpoint={json.dumps(args.checkpoint)}")
    return load_eval_config(kind, args.config, overrides)


def _print_results(results: dict) -> None:
    """The scores of any evaluation command, printed by rank 0 only (under torchrun every
    process holds the same results)."""
    from wcl import dist

    if not dist.is_main():
        return
    if "subset" in results:
        print(f"labelled images: {results['subset']['images']}")
    for key, r in results.items():
        if key.startswith("k") and isinstance(r, dict):  # knn-eval: k200, k20, ...
            print(f"{key}: top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%")
        elif key in ("final", "best"):
            print(f"{key}: top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  (epoch {r['epoch']})")
    print(f"results: {results['run_dir']}/results.json")


def _linear_eval(args: argparse.Namespace) -> int:
    def run() -> int:
        from wcl.eval.linear import linear_eval

        cfg = _eval_config("linear", args, ["linear.mode=fast"] if args.fast else [])
        _print_results(linear_eval(cfg, resume=args.resume))
        return 0

    return _user_errors(run)


def _knn_eval(args: argparse.Namespace) -> int:
    def run() -> int:
        from wcl.eval.knn import knn_eval

        _print_results(knn_eval(_eval_config("knn", args)))
        return 0

    return _user_errors(run)


def _finetune(args: argparse.Namespace) -> int:
    def run() -> int:
        from wcl.eval.finetune import finetune

        _print_results(finetune(_eval_config("finetune", args), resume=args.resume))
        return 0

    return _user_errors(run)


def _convert(args: argparse.Namespace) -> int:
    def run() -> int:
        from wcl.release import convert_release

        summary = convert_release(args.release, args.out)
        b = summary["backbone"]
        print(
            f"converted {args.release} -> {args.out}: {b['name']} ({b['stem']} stem, width "
            f"{b['width']}), heads {summary['hidden_dim']}/{summary['out_dim']}, "
            f"release epoch {summary['release_epoch']}"
        )
        return 0

    return _user_errors(run)


def _export(args: argparse.Namespace) -> int:
    def run() -> int:
        from wcl.export import export_backbone

        paths = export_backbone(args.checkpoint, args.out_dir, onnx=args.onnx, name=args.name)
        for path in paths.values():
            print(path)
        return 0

    return _user_errors(run)


def _embed(args: argparse.Namespace) -> int:
    def run() -> int:
        from wcl.eval.embed import embed_images

        result = embed_images(
            args.checkpoint,
            args.images,
            args.out,
            normalize=args.normalize,
            batch_size=args.batch_size,
            device=args.device,
            workers=args.workers,
            image_size=args.image_size,
            resize=args.resize,
            amp=args.amp,
            progress=not args.no_progress,
        )
        print(f"{result.count} x {result.dim} embeddings: {result.array} (paths: {result.paths})")
        if result.skipped:
            print(
                f"{len(result.skipped)} files did not decode and have no row: listed with "
                f"their reasons in {result.skipped_list}"
            )
        return 0

    return _user_errors(run)


def _add_eval_args(sub: argparse.ArgumentParser, kind: str, resumable: bool) -> None:
    sub.add_argument("--config", required=True, help="YAML file or eval preset name")
    sub.add_argument(
        "--checkpoint",
        help="pre-trained weights: a wcl checkpoint, a release .pth, or an exported backbone "
        "(sets run.checkpoint)",
    )
    sub.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config key, e.g. --set {_SET_EXAMPLES[kind]} (repeatable; value read "
        "as YAML)",
    )
    if resumable:
        sub.add_argument(
            "--resume",
            metavar="auto|PATH",
            help="continue: 'auto' takes the run directory's last.pt if present, or a path",
        )


def _pretrain(args: argparse.Namespace) -> int:
    from wcl.train import pretrain  # torch import deferred so --help stays fast

    cfg = load_config(args.config, args.set)
    run_dir = pretrain(cfg, resume=args.resume)
    print(f"run directory: {run_dir}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from wcl.demo import run_demo

    cfg = load_config(args.config, args.set)
    results = run_demo(cfg, args.out)
    print(results["summary"])
    for row in results["methods"].values():
        print(
            f"  {row['label']:<28} kNN {row['knn_top1']:6.2f}%   linear {row['linear_top1']:6.2f}%"
        )
    print(f"report: {args.out}/report.md (and report.html); took {results['minutes']:.1f} min")
    return 0


def _report(args: argparse.Namespace) -> int:
    from wcl.report import write_report

    print(f"report: {write_report(args.run_dir)}")
    return 0


def _check_data(args: argparse.Namespace) -> int:

    from wcl.data.check import check_data

    report = check_data(args.root, channels=args.channels, workers=args.workers,
                        progress=not args.quiet)  # fmt: skip
    print(report.summary())
    if args.json:
        from wcl.atomic import write_json

        write_json(args.json, report.to_dict())
    return 0 if report.usable and (report.ok or not args.strict) else 1


def _add_demo_commands(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo",
        help="pre-train WCL and SimCLR on Fashion-MNIST, compare, write a report",
        description=(
            "The embedded demo: pre-trains the fashion-mnist-demo preset with the graph loss "
            "(WCL) and without it (SimCLR), measures both, a randomly initialised network "
            "and raw pixels with weighted kNN and a linear probe on the 10,000 test images, "
            "and writes report.md / report.html with figures. Re-running continues an "
            "interrupted demo."
        ),
        epilog=_examples("wcl demo --out runs/demo-3ep --set train.epochs=3"),
        formatter_class=_HelpFormatter,
    )
    demo.add_argument("--config", default="fashion-mnist-demo", help="preset or YAML file")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key (repeatable)")  # fmt: skip
    demo.add_argument("--out", default="runs/demo", help="demo directory (default runs/demo)")
    demo.set_defaults(func=_demo)

    rep = commands.add_parser(
        "report",
        help="redraw figures and report.md/html of a run or demo directory",
        description="Redraw the figures, report.md and report.html from a run directory's "
        "metrics files (a pre-training run, or a demo directory).",
        epilog=_examples("wcl report runs/demo"),
        formatter_class=_HelpFormatter,
    )
    rep.add_argument("run_dir", help="run or demo directory")
    rep.set_defaults(func=_report)

    chk = commands.add_parser(
        "check-data",
        help="scan an image folder for broken files before a long run",
        description="Decode every image of a folder data set and report broken files (with "
        "the reason), odd modes that will be converted, classes, sizes and duplicates. "
        "Exit status 1 if no image is usable (or, with --strict, if any file is broken).",
        epilog=_examples("wcl check-data /data/imagenet/train --json imagenet-train.json"),
        formatter_class=_HelpFormatter,
    )
    chk.add_argument("root", help="image folder (class sub-folders or flat)")
    chk.add_argument("--channels", type=int, choices=(1, 3), default=3)
    chk.add_argument("--workers", type=int, default=None, help="decoding threads")
    chk.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    chk.add_argument("--strict", action="store_true", help="exit 1 if any file is broken")
    chk.add_argument("--quiet", action="store_true", help="no progress bar")
    chk.set_defaults(func=_check_data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wcl",
        description="Weakly Supervised Contrastive Learning: pre-train, evaluate, export.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pre = commands.add_parser(
        "pretrain",
        help="pre-train a backbone with WCL",
        description=(
            "Pre-train WCL from a YAML config (a file, or a shipped preset name). "
            "Runs as one process, or under torchrun / SLURM srun for several. "
            "Writes config.yaml, metrics.jsonl and checkpoints (last.pt, epoch-NNNN.pt) "
            f"to train.out_dir. Presets: {_presets()}."
        ),
        epilog=_examples(
            "wcl pretrain --config fashion-mnist-demo --set train.epochs=5",
            "wcl pretrain --config imagenet-r50-100ep --set data.root=/data/imagenet --resume auto",
        ),
        formatter_class=_HelpFormatter,
    )
    pre.add_argument("--config", required=True, help="YAML file or preset name")
    pre.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set optim.lr=0.3 (repeatable; value read as YAML)",
    )
    pre.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="continue a run: 'auto' takes train.out_dir/last.pt if present, or a checkpoint path",
    )
    pre.set_defaults(func=_pretrain)
    _add_eval_commands(commands)
    _add_weight_commands(commands)
    _add_demo_commands(commands)
    return parser


def _add_eval_commands(commands: argparse._SubParsersAction) -> None:
    lin = commands.add_parser(
        "linear-eval",
        help="linear probe on the frozen backbone (release protocol, or fast cached mode)",
        description=(
            "Train a linear classifier on the frozen backbone (eval mode) with the release's "
            "protocol: Linear init N(0, 0.01), SGD Nesterov 0.9, no weight decay, "
            "lr 0.2*batch/256 with a cosine per iteration, 80 epochs, RandomResizedCrop + flip; "
            "test Resize + CenterCrop; top-1/top-5 final and best. --fast trains on cached "
            "centre-crop features instead (NOT the paper's protocol). Writes config.yaml, "
            "last.pt and results.json to run.out_dir (default <checkpoint folder>/eval/"
            "<checkpoint name>/linear-eval, or linear-eval-fast with --fast). Runs as one process, or under torchrun / SLURM "
            "srun for several (linear.batch_size is global). "
            f"Presets: {_eval_presets('linear')}."
        ),
        epilog=_examples(
            "wcl linear-eval --config linear-small --checkpoint runs/x/last.pt --fast",
            "wcl linear-eval --config linear-imagenet --checkpoint wcl-100.pt "
            "--set data.root=/data/imagenet",
        ),
        formatter_class=_HelpFormatter,
    )
    _add_eval_args(lin, "linear", resumable=True)
    lin.add_argument(
        "--fast",
        action="store_true",
        help="cached-feature mode (same as --set linear.mode=fast)",
    )
    lin.set_defaults(func=_linear_eval)

    knn = commands.add_parser(
        "knn-eval",
        help="weighted kNN classification of backbone features",
        description=(
            "Weighted kNN (InstDisc): cosine similarity of L2-normalised centre-crop features, "
            "the k nearest training images vote with weight exp(sim/T). Reports top-1/top-5 "
            "for every k in knn.k (default 200 and 20, T = 0.07). Writes results.json (and "
            "cached features) to run.out_dir (default <checkpoint folder>/eval/<checkpoint "
            "name>/knn-eval). Runs as one process, or under torchrun / SLURM srun for "
            f"several. Presets: {_eval_presets('knn')}."
        ),
        epilog=_examples(
            "wcl knn-eval --config knn-small --checkpoint runs/x/last.pt --set knn.k=20"
        ),
        formatter_class=_HelpFormatter,
    )
    _add_eval_args(knn, "knn", resumable=False)
    knn.set_defaults(func=_knn_eval)

    fin = commands.add_parser(
        "finetune",
        help="semi-supervised fine-tuning of the whole network on a fraction of the labels",
        description=(
            "Fine-tune backbone + a new linear head on a class-balanced seeded fraction of the "
            "labels (finetune.fraction) or a published subset list (finetune.subset_file, one "
            "image file name per line). SimCLR's recipe: SGD Nesterov 0.9, no weight decay, "
            "lr 0.05*batch/256, cosine; crop + flip. Top-1/top-5 on the test split. Runs as "
            "one process, or under torchrun / SLURM srun for several (finetune.batch_size is "
            f"global, BatchNorm synchronised). Presets: {_eval_presets('finetune')}."
        ),
        epilog=_examples(
            "wcl finetune --config finetune-small --checkpoint runs/x/last.pt "
            "--set finetune.fraction=0.05"
        ),
        formatter_class=_HelpFormatter,
    )
    _add_eval_args(fin, "finetune", resumable=True)
    fin.set_defaults(func=_finetune)


def _add_weight_commands(commands: argparse._SubParsersAction) -> None:
    conv = commands.add_parser(
        "convert",
        help="convert an authors' release checkpoint (wcl-100.pth ...) to a wcl checkpoint",
        description=(
            "Read a release checkpoint (module.net.* ResNet-50, module.head1.* -> g, "
            "module.head2.* -> phi) safely (weights_only) and write a wcl checkpoint usable by "
            "every command. A file that needs pickled code is refused."
        ),
        epilog=_examples("wcl convert wcl-100.pth wcl-100.pt"),
        formatter_class=_HelpFormatter,
    )
    conv.add_argument("release", help="the release .pth file")
    conv.add_argument("out", help="the wcl checkpoint to write (.pt)")
    conv.set_defaults(func=_convert)

    exp = commands.add_parser(
        "export",
        help="write the backbone as a torchvision state dict, safetensors and optionally ONNX",
        description=(
            "Write OUT_DIR/backbone.pt (plain torchvision-keyed state dict, no fc), "
            "backbone.safetensors, backbone.json (how to rebuild it, input size and "
            "normalisation) and, with --onnx, backbone.onnx (needs: pip install onnx onnxscript)."
        ),
        epilog=_examples("wcl export runs/x/last.pt runs/x/export --onnx"),
        formatter_class=_HelpFormatter,
    )
    exp.add_argument("checkpoint", help="any checkpoint wcl can read")
    exp.add_argument("out_dir", help="folder to write into (created if missing)")
    exp.add_argument("--onnx", action="store_true", help="also write backbone.onnx")
    exp.add_argument("--name", default="backbone", help="file name stem (default: backbone)")
    exp.set_defaults(func=_export)

    emb = commands.add_parser(
        "embed",
        help="backbone embeddings of a folder of images, as .npy plus a list of paths",
        description=(
            "Embed every image under --images (recursive, sorted by path): centre crop at the "
            "pre-training size, backbone features (optionally L2-normalised). Writes FILE.npy "
            "(N x C float32) and FILE.txt (the N image paths, in row order)."
        ),
        epilog=_examples(
            "wcl embed --checkpoint runs/x/last.pt --images photos/ --out photos-emb --normalize"
        ),
        formatter_class=_HelpFormatter,
    )
    emb.add_argument("--checkpoint", required=True, help="any checkpoint wcl can read")
    emb.add_argument("--images", required=True, help="folder of images")
    emb.add_argument("--out", required=True, help="output FILE or FILE.npy")
    emb.add_argument("--normalize", action="store_true", help="L2-normalise each embedding")
    emb.add_argument("--batch-size", type=int, default=256)
    emb.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    emb.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    emb.add_argument("--image-size", type=int, help="crop side (default: pre-training size)")
    emb.add_argument("--resize", type=int, help="short side before the crop")
    emb.add_argument("--amp", choices=AMP_CHOICES, default="auto")
    emb.add_argument("--no-progress", action="store_true", help="no progress bar")
    emb.set_defaults(func=_embed)


def _escape_undecodable_names() -> None:
    """Print a file name that is not UTF-8 with its odd bytes escaped (Python holds byte
    0xe9 as the surrogate \\udce9, printed so), instead of failing on it with
    UnicodeEncodeError; the output stays valid UTF-8."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("pretrain", "demo"):
        from wcl.early_signals import catch_early

        catch_early()  # before torch loads: a pre-emption then still ends in `preempted`
    _escape_undecodable_names()
    # Errors that describe a fixable problem get one clear line, not a traceback.
    from wcl import dist
    from wcl.checkpoint import CheckpointError
    from wcl.data.errors import DataError
    from wcl.preemption import PREEMPTED_EXIT_CODE, Preempted

    try:
        status = args.func(args)
        # Leave the process group before exit tears down gloo's threads (which can abort a
        # finished process); only on success, as others may still wait after an error.
        dist.shutdown()
        return status
    except ConfigError as err:
        print(f"wcl: config error: {_one_line(err)}", file=sys.stderr)
        return 2
    except DataError as err:  # a damaged data set: bad input, as a bad config is
        print(f"wcl: data error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Preempted as err:
        print(f"wcl: {_one_line(err)}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except (CheckpointError, FloatingPointError) as err:
        print(f"wcl: {_one_line(err)}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"wcl: {_one_line(err)}", file=sys.stderr)
        return 1
    except (RuntimeError, MemoryError) as err:
        gist = _out_of_memory(err)
        if gist is None:
            raise
        hint = _MEMORY_HINTS.get(args.command, "free memory or use a larger machine")
        print(f"wcl: out of memory ({gist}): {hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
