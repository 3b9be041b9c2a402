"""``hf-iterheads``: one console script, one subcommand per step of the paper.

Each module that offers a subcommand defines ``add_cli(subparsers)``, which adds its parser and sets
``func``; ``func(args)`` does the work. A mistake a user can fix raises ``IterHeadsError`` and is printed
as one line (exit status 2), never as a traceback; argparse's own errors are one line too
(:class:`OneLineParser`), and so are file-system errors (permission denied, disk full). ``--debug`` (before or
after the command) shows the traceback behind such a line.

Answering fast: ``main`` imports only the module of the command it runs (``COMMANDS`` says which; the others
get a placeholder with their one-line help), so ``--help``, argparse errors and checks that need no model print
before torch is imported. A module in ``COMMAND_MODULES`` that ``COMMANDS`` does not name is always imported to
find its subcommands; ``build_parser()`` imports them all.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
from collections.abc import Iterator
from typing import NoReturn

from .errors import IterHeadsError

# Modules with subcommands, in the order the paper's story goes.
COMMAND_MODULES = (
    "hf_iterheads.dataset_builder",
    "hf_iterheads.training.cli",
    "hf_iterheads.evaluation",
    "hf_iterheads.plots",
    "hf_iterheads.detect.cli",
    "hf_iterheads.detect.scan",
    "hf_iterheads.paper.reproduce",
    "hf_iterheads.paper.release",
    "hf_iterheads.task_plugins",
)

# command -> (the module(s) whose add_cli may add it, the first listed in COMMAND_MODULES counting; its one-line
# help for the top-level listing). A module named here is imported only for its commands, so every command it adds
# must be listed; a module of COMMAND_MODULES that is not named here is imported for every command line (keep such
# a module torch-free).
COMMANDS: dict[str, tuple[str | tuple[str, ...], str]] = {
    "build-datasets": ("hf_iterheads.dataset_builder", "write the tasks as a Hub-ready dataset folder"),
    "train": ("hf_iterheads.training.cli", "train the paper's transformer (Accelerate), log accuracy and attention peakiness"),
    "eval": ("hf_iterheads.evaluation", "test accuracy per length, greedy generation, attention peakiness of a checkpoint"),
    "plot": ("hf_iterheads.plots", "PNG figures of a training run: emergence curves and attention maps"),
    "detect": (("hf_iterheads.detect.cli", "hf_iterheads.detect.detection"),
               "score every attention head of a causal LM as an iteration head (and ablate the best)"),
    "scan": ("hf_iterheads.detect.scan",
             "detect iteration heads in many models, revisions and tasks; results.parquet, summary, figures, report.html"),
    "reproduce": ("hf_iterheads.paper.reproduce",
                  "train, evaluate and probe every model the paper's findings need; write report.md + results.json"),
    "release": ("hf_iterheads.paper.release", "upload a checkpoint (weights, tokenizer, model card) to the Hub"),
    "tasks": ("hf_iterheads.task_plugins", "list the tasks usable by name, with what they are and the training defaults "
              "that follow"),
}


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


def _add_module(sub, name: str) -> None:
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name == name:  # that part of the toolkit is not built (yet)
            return
        raise
    module.add_cli(sub)


def build_parser(command: str | None = None, everything: bool = True) -> argparse.ArgumentParser:
    """The ``hf-iterheads`` parser. ``everything``: every subcommand's full parser (imports every module).
    Otherwise only ``command``'s module is imported (none when ``command`` is None, e.g. for ``--help``): the
    other commands of ``COMMANDS`` are placeholders that list their help. A command ``COMMANDS`` does not know,
    or whose module is not in ``COMMAND_MODULES``, falls back to importing every module."""
    parser = OneLineParser(
        prog="hf-iterheads",
        description="Iteration heads (Cabannes et al., NeurIPS 2024): datasets, training, evaluation, detection.",
    )
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback behind its one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)
    known = {}
    for name, (modules, _) in COMMANDS.items():
        found = [m for m in ((modules,) if isinstance(modules, str) else modules) if m in COMMAND_MODULES]
        if found:
            known[name] = found[0]
    if everything:
        for name in COMMAND_MODULES:
            _add_module(sub, name)
        return parser
    for name, module in known.items():
        if name == command:
            _add_module(sub, module)
        elif name not in sub.choices:
            sub.add_parser(name, help=COMMANDS[name][1], add_help=False)
    for module in [m for m in COMMAND_MODULES if m not in known.values()]:  # modules the table does not describe
        _add_module(sub, module)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    """Parsed arguments, or the exit status argparse chose (2 after its one-line error, 0 after ``--help``),
    so that ``main([...])`` called in-process returns a status instead of raising SystemExit."""
    try:
        return parser.parse_args(argv)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 2)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C: ``finally`` blocks run, so temporary folders and locks go."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` (the default would end the process at once and
    leave a half-built ``.tmp-*`` folder and a lock behind). Outside the main thread nothing changes."""

    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def print_original(err: BaseException) -> None:
    """The traceback behind a one-line error: the exception it replaced (e.g. raised in a user's step function or
    pattern module, kept as its cause or context even when hidden with ``from None``), else its own."""
    import traceback

    original = err.__cause__ or err.__context__
    traceback.print_exception(original if original is not None else err, file=sys.stderr)


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    if debug:  # accepted after the command too
        argv = [a for a in argv if a != "--debug"]
    args = parse(build_parser(_command_of(argv), everything=False), argv)
    if isinstance(args, int):
        return args
    try:
        with sigterm_as_interrupt():
            return int(args.func(args) or 0)
    except IterHeadsError as err:
        if debug:
            print_original(err)
        print(f"hf-iterheads {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # the file system said no (permission, disk full, read-only): the user can fix that
        if debug:
            print_original(err)
        where = f": {err.filename}" if err.filename else ""
        print(f"hf-iterheads {args.command}: error: {one_line(err.strerror or err)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        print(f"hf-iterheads {args.command}: {'terminated' if isinstance(stop, Terminated) else 'interrupted'}", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
