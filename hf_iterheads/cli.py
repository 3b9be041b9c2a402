"""``hf-iterheads``: one console script, one subcommand per step of the paper.

Each module that offers a subcommand defines ``add_cli(subparsers)``, which adds its parser and sets
``func``; ``func(args)`` does the work. A mistake a user can fix raises ``IterHeadsError`` and is printed
as one line (exit status 2), never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import IterHeadsError

# Modules with subcommands, in the order the paper's story goes.
COMMAND_MODULES = (
    "hf_iterheads.dataset_builder",
    "hf_iterheads.training",
    "hf_iterheads.evaluation",
    "hf_iterheads.plots",
    "hf_iterheads.detect.detection",
    "hf_iterheads.detect.scan",
    "hf_iterheads.paper.reproduce",
    "hf_iterheads.paper.release",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-iterheads",
        description="Iteration heads (Cabannes et al., NeurIPS 2024): datasets, training, evaluation, detection.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # that part of the toolkit is not built (yet)
                continue
            raise
        module.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except IterHeadsError as err:
        print(f"hf-iterheads {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hf-iterheads {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
