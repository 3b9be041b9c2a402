"""Train the paper's transformer with Accelerate, and watch the iteration head emerge.

``hf-iterheads train --task polynomial --output-dir runs/poly`` trains with the ``fast`` recipe;
``--recipe paper`` is the paper's exact one. Modules, in the order a run uses them: ``config`` (TrainConfig,
recipes, flags), ``data`` (batches), ``schedule``, ``callbacks`` (around each step), ``loop`` (``train()``),
``artifacts`` (what a run leaves on disk), ``cli``.
"""

from .artifacts import read_metrics
from .callbacks import Callback, Run
from .cli import add_cli
from .config import FAST, PAPER, RECIPES, TrainConfig, resolve_config
from .loop import train, train_with_restarts

__all__ = [
    "FAST", "PAPER", "RECIPES", "Callback", "Run", "TrainConfig", "add_cli", "read_metrics", "resolve_config", "train",
    "train_with_restarts",
]
