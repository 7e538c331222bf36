"""The ``wcl`` command: parse arguments, then call the library."""

from __future__ import annotations

import argparse
import sys

from wcl.config import PRESET_DIR, ConfigError, load_config

__all__ = ["main"]


def _presets() -> str:
    return ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))


def _pretrain(args: argparse.Namespace) -> int:
    from wcl.train import pretrain  # torch import deferred so --help stays fast

    cfg = load_config(args.config, args.set)
    run_dir = pretrain(cfg, resume=args.resume)
    print(f"run directory: {run_dir}")
    return 0


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
        epilog="example: wcl pretrain --config fashion-mnist-demo --set train.epochs=5",
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"wcl: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
