"""The atlas's figures: best iteration score against model size, per-layer profiles, emergence across revisions.

matplotlib is optional: importing this module raises ImportError without it, and the scan says so in one line.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _name(p: dict) -> str:
    short = Path(p["model"]).name if "/" in p["model"] and Path(p["model"]).is_dir() else p["model"]
    return f"{short}@{p['revision']}" if p.get("revision") else short


def _tasks(parts: list[dict]) -> list[str]:
    return list(dict.fromkeys(p["task"] for p in parts))


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _axes(n: int, width: float = 4.8, height: float = 3.6):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, axes[0]


def best_vs_params(parts: list[dict], path: Path) -> None:
    """Best iteration score per model revision against its parameter count; filled where detected, x marks chance."""
    ok = [p for p in parts if p["status"] == "ok" and p.get("n_params")]
    tasks = _tasks(ok)
    fig, axes = _axes(len(tasks))
    for ax, task in zip(axes, tasks):
        for p in (p for p in ok if p["task"] == task):
            best = p["result"]["top_heads"][0]
            line = ax.scatter(p["n_params"], best["score"], s=36, label=_name(p),
                              facecolors=None if best["detected"] else "none", edgecolors="C0" if best["detected"] else "C1")
            ax.scatter(p["n_params"], best["baseline"], marker="x", s=20, color=line.get_edgecolor())
            ax.annotate(_name(p), (p["n_params"], best["score"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("parameters")
        ax.set_ylabel("best iteration score")
        ax.set_title(f"{task}: filled = detected, x = chance", fontsize=9)
    _save(fig, path)


def layer_profiles(parts: list[dict], path: Path) -> None:
    """Per model, the best iteration score in each layer against relative depth (0 = first layer, 1 = last)."""
    ok = [p for p in parts if p["status"] == "ok"]
    tasks = _tasks(ok)
    fig, axes = _axes(len(tasks))
    for ax, task in zip(axes, tasks):
        for p in (p for p in ok if p["task"] == task):
            best = np.asarray(p["result"]["iteration_score"], dtype=float).max(1)
            depth = np.linspace(0, 1, len(best)) if len(best) > 1 else np.zeros(1)
            ax.plot(depth, best, marker="o", ms=3, lw=1, label=_name(p))
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("relative depth (layer / (layers - 1))")
        ax.set_ylabel("best iteration score in the layer")
        ax.set_title(task, fontsize=9)
        ax.legend(fontsize=6)
    _save(fig, path)


def emergence(parts: list[dict], path: Path) -> bool:
    """Across revisions, the best iteration score against training step (revision order where no step is named)."""
    ok = [p for p in parts if p["status"] == "ok"]
    series: dict[tuple[str, str], list[dict]] = {}
    for p in ok:
        series.setdefault((p["model"], p["task"]), []).append(p)
    series = {k: v for k, v in series.items() if len({p.get("revision") for p in v}) > 1}
    if not series:
        return False
    tasks = list(dict.fromkeys(t for _, t in series))
    fig, axes = _axes(len(tasks))
    for ax, task in zip(axes, tasks):
        for (model, t), ps in series.items():
            if t != task:
                continue
            steps = [p.get("step") for p in ps]
            by_step = all(s is not None for s in steps)
            ps = sorted(ps, key=lambda p: p["step"]) if by_step else ps
            xs = [p["step"] for p in ps] if by_step else list(range(len(ps)))
            ax.plot(xs, [p["result"]["top_heads"][0]["score"] for p in ps], marker="o", label=model)
            if not by_step:
                ax.set_xticks(xs, [p["revision"] for p in ps], rotation=30, fontsize=7)
            ax.plot(xs, [p["result"]["top_heads"][0]["baseline"] for p in ps], ls=":", color="grey")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("training step (revision)")
        ax.set_ylabel("best iteration score (dotted: chance)")
        ax.set_title(task, fontsize=9)
        ax.legend(fontsize=6)
    _save(fig, path)
    return True


def plot_atlas(parts: list[dict], folder: Path) -> list[str]:
    """Every figure that the parts allow; returns the file names written."""
    written = []
    if any(p["status"] == "ok" for p in parts):
        best_vs_params(parts, folder / "best_score_vs_params.png")
        layer_profiles(parts, folder / "layer_profiles.png")
        written += ["best_score_vs_params.png", "layer_profiles.png"]
        if emergence(parts, folder / "emergence.png"):
            written.append("emergence.png")
    return written
