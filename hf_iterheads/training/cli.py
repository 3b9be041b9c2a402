"""``hf-iterheads train``: the flags come from ``TrainConfig``'s fields (``config.add_config_arguments``)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from ..errors import IterHeadsError
from .artifacts import check_flags_used, check_values, load_run_config, prepare_output_dir
from .config import RECIPES, TrainConfig, add_config_arguments, check_config, flag_name, given_flags, resolve_config, shown

# Options a resumed run may change without changing its weights.
SAFE_ON_RESUME = ("checkpoint_every", "keep_checkpoints", "report_to", "stop_when_solved")


def resume_config(args: argparse.Namespace) -> TrainConfig:
    """The run stored in ``--output-dir``, wherever that folder now is. An option given again with the stored
    value is fine; a longer ``--max-steps``/``--epochs`` and the options of ``SAFE_ON_RESUME`` are applied (and
    said); anything else that contradicts the stored run is refused: it would not be the same run."""
    out = Path(args.output_dir)
    if not (out / "run_config.json").is_file():
        raise IterHeadsError(f"cannot --resume: {out} has no run_config.json (was it written by hf-iterheads train?)")
    if args.overwrite:
        raise IterHeadsError("--resume continues the run in --output-dir and --overwrite replaces it: give one")
    stored = load_run_config(out / "run_config.json")
    if args.recipe is not None and args.recipe != stored.recipe:
        raise IterHeadsError(f"--recipe {args.recipe} contradicts the run in {out} (recipe {stored.recipe})")
    changes = {}
    for name, value in given_flags(args).items():
        old = getattr(stored, name)
        if name == "output_dir" or value == old or (isinstance(old, tuple) and tuple(value) == old):
            continue
        longer = name in ("max_steps", "epochs") and old is not None and value > old
        if not (longer or name in SAFE_ON_RESUME):
            raise IterHeadsError(f"{flag_name(name)} {shown(value)} contradicts the run in {out} ({flag_name(name)} "
                                 f"{shown(old)}); resume without it to continue the same run")
        changes[name] = value
        extra = " (the learning-rate schedule now ends there)" if longer and stored.schedule != "constant" else ""
        print(f"hf-iterheads train: resuming with {flag_name(name)} {shown(value)} instead of {shown(old)}{extra}",
              file=sys.stderr)
    cfg = replace(stored, output_dir=str(out), **changes)
    check_config(cfg)
    check_values(cfg)
    return cfg


def config_of(argv: list[str]) -> TrainConfig:
    """The configuration ``hf-iterheads train ARGV`` would run today (a finished run's ``run_config.json`` holds the
    one it ran: the two differ when a flag or a default has changed since)."""
    parser = argparse.ArgumentParser(prog="hf-iterheads")
    add_cli(parser.add_subparsers())
    return resolve_config(parser.parse_args(["train", *argv]))


def run_train(args: argparse.Namespace) -> int:
    if args.resume:
        cfg = resume_config(args)
        prepare_output_dir(cfg, resume=True, overwrite=False)
    else:
        cfg = resolve_config(args)
        check_values(cfg)
        check_flags_used(cfg, set(given_flags(args)))
        prepare_output_dir(cfg, resume=False, overwrite=args.overwrite)
    from transformers.utils import logging as hf_logging  # after every check: a mistake is said at once

    from .loop import train_with_restarts

    hf_logging.disable_progress_bar()
    train_with_restarts(cfg, resume=args.resume)
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the paper's transformer (Accelerate), log accuracy and attention peakiness",
        description="Train a GPT-2-style model on iterative tasks and watch the iteration head emerge. "
        "Defaults come from --recipe (fast: ours; paper: Adam 3e-4, batch 256, fixed data, 1000 epochs); "
        "any flag given overrides its recipe value. --resume continues the run stored in --output-dir with the "
        "settings it was started with (threads included), so it ends with the weights of an uninterrupted run.",
    )
    p.add_argument("--recipe", help=f"training recipe: {', '.join(RECIPES)} (default fast)")
    add_config_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.set_defaults(func=run_train)
