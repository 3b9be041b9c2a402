#!/usr/bin/env python
"""Build (and optionally publish) the iterative-task datasets as a Hub-ready folder.

    python dataset_scripts/build_datasets.py --output-dir DIR [--tasks ...] [--seed S] [--n-len N] \
        [--per-length N] [--overwrite] [--push-to-hub ORG/NAME]

Same as ``hf-iterheads build-datasets``; defaults are the paper's (lengths 1..16, 1024 + 1024 per length).
"""

import argparse
import sys

from hf_iterheads.dataset_builder import add_arguments, run
from hf_iterheads.errors import IterHeadsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except IterHeadsError as err:
        print(f"build_datasets.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
