"""The ``detect`` subcommand: its parser, and the run that loads, scores and writes the outputs.

Importing this module imports neither torch nor transformers (they load inside :func:`run`), so that
``hf-iterheads --help`` and argparse errors answer before any of them is imported.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import IterHeadsError
from .criteria import CAPTURES, DTYPE_NAMES


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """``--threads N`` (torch.set_num_threads), shared by ``detect`` and ``scan``."""
    p.add_argument("--threads", type=int, default=None, help="CPU threads torch uses (default: torch's own choice)")


def apply_threads(threads: int | None) -> None:
    """Set torch's intra-op threads; one-line error for a count below 1."""
    if threads is None:
        return
    if int(threads) < 1:
        raise IterHeadsError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(int(threads))


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "detect",
        help="score every attention head of a causal LM as an iteration head (and ablate the best)",
        description="Find iteration heads in any causal LM (a local folder, a packaged checkpoint or a Hub repo id).",
    )
    p.add_argument("model", help="model folder, packaged checkpoint name, or Hub repo id (ORG/NAME)")
    p.add_argument("--task", default=None, help="task to probe: a name or an import string module:attr (default: the "
                   "first task a checkpoint of ours was trained on, else parity)")
    p.add_argument("--lengths", default="4-16", help="chain lengths, e.g. 4-16 (default), 8 or 4,8,12")
    p.add_argument("--n", type=int, default=64,
                   help="most probes per template (default 64): fewer run once every head's verdict is settled")
    p.add_argument("--full-n", action="store_true", help="run all --n probes even when the verdicts settle earlier")
    p.add_argument("--rendering", choices=("auto", "native", "text"), default="auto", help="native layout or text (default: auto)")
    p.add_argument(
        "--template", action="append", default=None,
        help='text template, e.g. "{inputs} -> {states}"; {inputs:SEP} joins values with SEP; repeat it to score '
        "each head under several wordings (mean and spread)",
    )
    p.add_argument("--shots", type=int, default=0, help="worked examples of the task before each probe (text rendering; default 0)")
    p.add_argument("--chat", action="store_true", help="wrap the examples and the probe in the tokenizer's chat template")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                   help="weights dtype (default float32; fast: bf16/fp16 where the device computes it natively)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, auto (default cpu)")
    p.add_argument("--device-map", default=None, help="passed to from_pretrained (e.g. auto: needs accelerate)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the repo's own modeling code (off by default)")
    p.add_argument("--ablate", action="store_true", help="zero- and mean-ablate the top-k heads vs k random heads")
    p.add_argument("--patch", action="store_true", help="counterfactual patching: share of the logit difference each top-k head moves")
    p.add_argument("--top-k", type=int, default=1, help="heads to ablate / patch (default 1)")
    p.add_argument("--pattern", action="append", default=[], metavar="MODULE:ATTR",
                   help="score an extra head pattern (a HeadPattern, or a list of them); repeatable")
    p.add_argument("--capture", choices=CAPTURES, default="auto",
                   help="rows: fast attention, probabilities for the probe rows only; eager: each model's eager attention; "
                   "auto (default): rows, eager where rows cannot work")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    add_threads_argument(p)
    p.add_argument("--output-dir", required=True,
                   help="folder for scores.json, report.html, heads.png, best_head_attention.png (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --output-dir")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    """Every bad number or name is one line, before anything loads."""
    from ..task_plugins import register_sources_of, trained_tasks
    from ..tasks import get_task, parse_lengths

    register_sources_of(args.model)  # a run trained on a task from a user's module finds it again
    if args.task is None:
        args.task = (trained_tasks(args.model) or ["parity"])[0]
    get_task(args.task)
    parse_lengths(args.lengths, minimum=2)
    if args.n < 1 or args.batch_size < 1 or args.top_k < 1:
        raise IterHeadsError("--n, --batch-size and --top-k must be at least 1")
    if args.shots < 0:
        raise IterHeadsError(f"--shots must be 0 or more, got {args.shots}")
    if args.threads is not None and args.threads < 1:
        raise IterHeadsError(f"--threads must be at least 1, got {args.threads}")


def _detect_layout(folder: Path) -> bool:
    """A folder ``detect`` wrote: --overwrite may replace it (a checkpoint or anything else it refuses)."""
    return (folder / "scores.json").is_file() and not (folder / "config.json").is_file()


def _local_model(name: str) -> str | None:
    """The folder the model is read from when it is one (a local folder or a bundled checkpoint): never an output."""
    from ..bundled import bundled_path

    folder = Path(name).expanduser()
    bundled = bundled_path(name)
    return str(folder) if folder.is_dir() else str(bundled) if bundled else None


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    from ..outputs import check_output_dir

    model_dir = _local_model(args.model)
    if model_dir is not None and Path(args.output_dir).resolve() == Path(model_dir).resolve():
        raise IterHeadsError(f"--output-dir {args.output_dir} is the model {args.model}: the detector never writes "
                             "into the folder it reads (a folder inside it is fine)")
    out = check_output_dir(args.output_dir, args.overwrite, "--output-dir", command="detect", layout=_detect_layout)
    from .patterns import load_pattern_spec

    extra = [p for spec in args.pattern for p in load_pattern_spec(spec)]
    apply_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from .detector import detect_iteration_heads
    from .result import write_outputs

    hf_logging.disable_progress_bar()  # errors stay one line; the table is the output
    result = detect_iteration_heads(
        args.model, None, args.task, args.lengths, args.n,
        revision=args.revision, dtype=args.dtype, device=args.device, device_map=args.device_map,
        trust_remote_code=args.trust_remote_code, seed=args.seed, rendering=args.rendering,
        template=args.template, batch_size=args.batch_size, ablate=args.ablate, top_k=args.top_k,
        shots=args.shots, chat=args.chat, patterns=extra or None, capture=args.capture, patch=args.patch,
        full_n=args.full_n,
    )
    if result.meta.get("capture_note"):
        print(f"note: {result.meta['capture_note']}", file=sys.stderr)
    for note in write_outputs(result, out):
        print(note, file=sys.stderr)
    print(result.table())
    print("wrote " + ", ".join(str(out / name) for name in sorted(os.listdir(out))))
    return 0
