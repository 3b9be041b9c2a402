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


def plot_scores(scores: dict, path: str | Path) -> None:
    """One heatmap per panel (iteration score, peakiness, each plotted pattern), cells annotated when the grid is small."""
    panels = _panels(scores)
    n_layers, n_heads = scores["n_layers"], scores["n_heads"]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    size = (4 + 1.2 * cols * max(2, min(n_heads, 16)) / 2, rows * (1.5 + 0.45 * max(2, n_layers)))
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    for ax, (key, title) in zip(axes.ravel(), panels):
        grid = np.asarray(scores[key], dtype=float)
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_heads)) if n_heads <= 16 else None
        ax.set_yticks(range(n_layers)) if n_layers <= 32 else None
        if n_layers * n_heads <= 64:
            for (l, h), v in np.ndenumerate(grid):
                ax.text(h, l, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        fig.colorbar(im, ax=ax, fraction=0.046)
    circuit = (scores.get("circuit") or {}).get("label")
    fig.suptitle(f"{scores['model']} on {scores['task']} (layers and heads 0-based)"
                 + (f"\ncircuit: {circuit}" if circuit else ""), fontsize=10)
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
    (the position predicting s_t -> x_t), said in a legend. Token labels are shown whole (the task token too)."""
    from matplotlib.patches import Patch

    T = len(pattern)
    fig, ax = plt.subplots(figsize=(3 + 0.3 * T, 2 + 0.28 * T))
    im = ax.imshow(pattern, vmin=0, vmax=1, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="attention probability")
    labels = [t if len(t) <= 14 else t[:13] + "~" for t in tokens[:T]]
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
