"""Pictures of the detector's output: layer x head heatmaps, and the best head's attention on one probe.

matplotlib is optional (``pip install 'hf-iterheads[plots]'``): importing this module raises ImportError
without it, and the detector then says so in one line and still writes scores.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _panels(scores: dict) -> list[tuple[str, str]]:
    """(key, title) per panel: iteration score and peakiness, then every plotted head pattern's score."""
    panels = [("iteration_score", "iteration score (pred s_t -> x_t)"), ("peakiness", "peakiness (share > 0.5)")]
    patterns = scores.get("patterns") or {"eoi": {"plot": True, "keys": {"score": "eoi_score"}, "description": "s_t -> EoI"}}
    for name, p in patterns.items():
        if name != "iteration" and p.get("plot") and p["keys"]["score"] in scores:
            panels.append((p["keys"]["score"], f"{name} score"))
    return panels


MIN_HEADS_FOR_HEATMAPS = 4  # as report.html: fewer heads in all, or one per layer, get bars (nothing to compare in a grid)


def plot_scores(scores: dict, path: str | Path) -> None:
    """One heatmap per panel (iteration score, peakiness, each plotted pattern) with its colour bar, cells annotated when
    the grid is small; a model with one head per layer (or a handful in all) gets one bar chart of every head instead."""
    panels = _panels(scores)
    n_layers, n_heads = scores["n_layers"], scores["n_heads"]
    circuit = (scores.get("circuit") or {}).get("label")
    title = f"{scores['model']} on {scores['task']} (layers and heads 0-based)" + (f"\ncircuit: {circuit}" if circuit else "")
    if n_heads == 1 or n_layers * n_heads < MIN_HEADS_FOR_HEATMAPS:
        heads = [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
        fig, ax = plt.subplots(figsize=(2.5 + 1.3 * len(heads) * len(panels) / 2, 3.6))
        width = 0.8 / len(panels)
        x = np.arange(len(heads))
        for i, (key, label) in enumerate(panels):
            values = [np.asarray(scores[key], dtype=float)[layer, h] for layer, h in heads]
            bars = ax.bar(x + (i - (len(panels) - 1) / 2) * width, values, width, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(x, [f"L{layer}H{h}" for layer, h in heads])
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("score")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    size = (4 + 1.2 * cols * max(2, min(n_heads, 16)) / 2, rows * (1.5 + 0.45 * max(2, n_layers)))
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    for ax, (key, label) in zip(axes.ravel(), panels):
        grid = np.asarray(scores[key], dtype=float)
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_heads)) if n_heads <= 16 else None
        ax.set_yticks(range(n_layers)) if n_layers <= 32 else None
        if n_layers * n_heads <= 64:
            for (l, h), v in np.ndenumerate(grid):
                ax.text(h, l, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attention(
    pattern: np.ndarray,
    tokens: Sequence[str],
    path: str | Path,
    title: str = "",
    queries: Sequence[int] = (),
    keys: Sequence[int] = (),
) -> None:
    """A (T, T) attention map with a colour bar; red boxes mark the cells an iteration head should fill
    (the position predicting s_t -> x_t), said in a legend. Tokens are labelled by their text and role (``x2 = 1``,
    ``EoI "->"``), not by tokenizer pieces."""
    from matplotlib.patches import Patch

    from .html import _roles, token_label  # the report's labels: x2 = 1, EoI "->", not tokenizer pieces

    T = len(pattern)
    fig, ax = plt.subplots(figsize=(3 + 0.3 * T, 2 + 0.28 * T))
    im = ax.imshow(pattern, vmin=0, vmax=1, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="attention probability")
    roles = _roles(T, list(keys), list(queries))
    labels = [token_label(r, t) for r, t in zip(roles, tokens[:T])]
    labels = [t if len(t) <= 14 else t[:13] + "~" for t in labels]
    ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(T), labels, fontsize=7)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    for q, k in zip(queries, keys):
        ax.add_patch(plt.Rectangle((k - 0.5, q - 0.5), 1, 1, fill=False, ec="red", lw=1))
    if len(queries):
        # upper right: above the diagonal a causal model's attention is empty
        ax.legend(handles=[Patch(fill=False, edgecolor="red", label="expected: position predicting s_t -> x_t")],
                  loc="upper right", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
