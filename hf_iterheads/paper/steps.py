"""Run several ``hf-iterheads`` commands in one process, each writing its own log file.

A reproduction's job is a training run and then the detector on it. Run as two processes, each would import
torch and transformers again (about 4-5 CPU-seconds on a 2-core machine, more than a smoke-scale run itself);
run here, the job imports them once. Each command's output (Python's and the C libraries', tqdm's bars
included) goes to its own log at the file-descriptor level, so the logs read as if each command ran alone.

    python -m hf_iterheads.paper.steps '[["LOG", "train", "--output-dir", ...], ["LOG2", "detect", ...]]'

The commands run in order; the first that fails stops the job, and its exit status and log path are the
process's (the log path on stderr's last line).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def run_logged(argv: list[str], log: Path) -> int:
    """``hf-iterheads ARGV`` in this process with stdout and stderr (fds 1 and 2) sent to ``log``."""
    from ..cli import main

    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "w") as fh:
        fh.write(" ".join([sys.executable, "-m", "hf_iterheads.cli", *argv]) + "\n")
        fh.flush()
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        try:
            try:
                return main(argv)
            except SystemExit as stop:  # argparse's own exits
                return stop.code if isinstance(stop.code, int) else 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def main(argv: list[str] | None = None) -> int:
    steps = json.loads((sys.argv[1:] if argv is None else argv)[0])
    for log, *command in steps:
        code = run_logged(command, Path(log))
        if code:
            print(log, file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
