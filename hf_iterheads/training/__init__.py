"""Train the paper's transformer with Accelerate, and watch the iteration head emerge.

``hf-iterheads train --task polynomial --output-dir runs/poly`` trains with the ``fast`` recipe;
``--recipe paper`` is the paper's exact one. Modules, in the order a run uses them: ``config`` (TrainConfig,
recipes, flags), ``data`` (batches), ``schedule``, ``callbacks`` (around each step), ``loop`` (``train()``),
``artifacts`` (what a run leaves on disk), ``cli``.
"""

import importlib

# Where each name lives, imported on first use: ``hf-iterheads train --help`` and a bad flag must not wait for
# torch, which ``loop`` and ``callbacks`` import.
_WHERE = {
    "read_metrics": "artifacts", "Callback": "callbacks", "Run": "callbacks", "add_cli": "cli", "FAST": "config",
    "PAPER": "config", "RECIPES": "config", "TrainConfig": "config", "resolve_config": "config", "train": "loop",
    "train_with_restarts": "loop",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FAST", "PAPER", "RECIPES", "Callback", "Run", "TrainConfig", "add_cli", "read_metrics", "resolve_config", "train",
    "train_with_restarts",
]
