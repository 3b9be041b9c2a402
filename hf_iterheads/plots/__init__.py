"""Figures (matplotlib is an optional extra): ``hf-iterheads plot DIR`` and the detector's pictures.

Importing this package never needs matplotlib; the plotting functions say in one line when it is missing.
"""

from __future__ import annotations


def require_matplotlib():
    """``matplotlib.pyplot`` with the file-only Agg backend, or one clear IterHeadsError."""
    from ..errors import IterHeadsError

    try:
        import matplotlib
    except ImportError:
        raise IterHeadsError("plots need matplotlib, which is not installed: pip install 'hf-iterheads[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def add_cli(subparsers) -> None:
    from .training import add_cli as add_training_cli

    add_training_cli(subparsers)
