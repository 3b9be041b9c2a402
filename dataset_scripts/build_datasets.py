#!/usr/bin/env python
"""Build (and optionally publish) the iterative-task datasets as a Hub-ready folder.

    python dataset_scripts/build_datasets.py --output-dir DIR [--tasks ...] [--seed S] [--n-len N] \
        [--per-length N] [--overwrite] [--push-to-hub ORG/NAME]

Same as ``hf-iterheads build-datasets``; defaults are the paper's (lengths 1..16, 1024 + 1024 per length).
Every error is one line, ``build_datasets.py: error: ...`` (exit status 2), never a traceback.
"""

import sys

from hf_iterheads.cli import OneLineParser, Terminated, one_line, parse, sigterm_as_interrupt
from hf_iterheads.dataset_builder import add_arguments, run
from hf_iterheads.errors import IterHeadsError

PROG = "build_datasets.py"


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parse(parser, argv)
    if isinstance(args, int):
        return args
    try:
        with sigterm_as_interrupt():  # a SIGTERM mid-build removes the half-built folder, like Ctrl-C
            return run(args)
    except IterHeadsError as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # the file system said no (permission, disk full): one line too
        where = f": {err.filename}" if err.filename else ""
        print(f"{PROG}: error: {one_line(err.strerror or err)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        print(f"{PROG}: {'terminated' if isinstance(stop, Terminated) else 'interrupted'}", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
