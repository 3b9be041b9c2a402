"""``hf-iterheads train``: the flags come from ``TrainConfig``'s fields (``config.add_config_arguments``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import IterHeadsError
from .artifacts import prepare_output_dir
from .config import RECIPES, TrainConfig, add_config_arguments, resolve_config


def load_run_config(output_dir: str) -> TrainConfig:
    path = Path(output_dir) / "run_config.json"
    if not path.is_file():
        raise IterHeadsError(f"cannot --resume: {output_dir} has no run_config.json (was it written by hf-iterheads train?)")
    return TrainConfig.load(path)


def run_train(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from .loop import train

    if args.resume:
        cfg = load_run_config(args.output_dir)
        if args.threads:
            cfg.threads = args.threads
    else:
        cfg = resolve_config(args)
        prepare_output_dir(cfg, resume=False, overwrite=args.overwrite)
    hf_logging.disable_progress_bar()
    train(cfg, resume=args.resume)
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the paper's transformer (Accelerate), log accuracy and attention peakiness",
        description="Train a GPT-2-style model on iterative tasks and watch the iteration head emerge. "
        "Defaults come from --recipe (fast: ours; paper: Adam 3e-4, batch 256, fixed data, 1000 epochs); "
        "any flag given overrides its recipe value.",
    )
    p.add_argument("--recipe", default="fast", help=f"training recipe: {', '.join(RECIPES)} (default fast)")
    add_config_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.set_defaults(func=run_train)
