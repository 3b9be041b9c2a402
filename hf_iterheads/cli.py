"""``hf-iterheads``: one console script, one subcommand per step of the paper.

Each module that offers a subcommand defines ``add_cli(subparsers)``, which adds its parser and sets
``func``; ``func(args)`` does the work. A mistake a user can fix raises ``IterHeadsError`` and is printed
as one line (exit status 2), never as a traceback; argparse's own errors are one line too
(:class:`OneLineParser`), and so are file-system errors (permission denied, disk full).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

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


def one_line(text: object) -> str:
    """``text`` on one line: a message spread over several lines would read as several errors."""
    return " ".join(str(text).split())


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``PROG: error: MESSAGE``, exit status 2 (no usage block:
    ``--help`` shows it). Subparsers inherit the class, so ``hf-iterheads VERB`` errors name the verb."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """As argparse's, but unknown options are blamed on the subcommand they were given to."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(parsed, "command", None)
            prog = f"{self.prog} {command}" if command else self.prog
            self.exit(2, f"{prog}: error: unrecognized arguments: {one_line(' '.join(extras))}\n")
        return parsed


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # argparse names the type in some messages
    return parse


# Argparse types that refuse impossible numbers while parsing, before any work: ``type=positive_int``.
positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="hf-iterheads",
        description="Iteration heads (Cabannes et al., NeurIPS 2024): datasets, training, evaluation, detection.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # that part of the toolkit is not built (yet)
                continue
            raise
        module.add_cli(sub)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    """Parsed arguments, or the exit status argparse chose (2 after its one-line error, 0 after ``--help``),
    so that ``main([...])`` called in-process returns a status instead of raising SystemExit."""
    try:
        return parser.parse_args(argv)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 2)


def main(argv: list[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        return int(args.func(args) or 0)
    except IterHeadsError as err:
        print(f"hf-iterheads {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # the file system said no (permission, disk full, read-only): the user can fix that
        where = f": {err.filename}" if err.filename else ""
        print(f"hf-iterheads {args.command}: error: {one_line(err.strerror or err)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hf-iterheads {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
