"""Figures of ``hf-iterheads reproduce``: one PNG per finding, drawn from the rows ``reproduce.collect`` read."""

from __future__ import annotations

from pathlib import Path

from ..plots import require_matplotlib

VARIANT_STYLE = {("cot", 2): ("CoT, 2 layers", "C0", "-"), ("nocot", 2): ("no CoT, 2 layers", "C3", "--"),
                 ("cot", 1): ("CoT, 1 layer", "C1", ":")}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    require_matplotlib().close(fig)
    return path


def accuracy_by_length(rows: dict[str, dict], tasks, path: Path) -> Path:
    """Final test accuracy per length: CoT vs no CoT, 2 layers vs 1, one panel per task."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for (cot, layers), (label, colour, ls) in VARIANT_STYLE.items():
            row = rows.get(f"{task}-{cot}-{layers}L", {})
            if row.get("per_length"):
                Ls = sorted(row["per_length"])
                ax.plot(Ls, [row["per_length"][L] for L in Ls], color=colour, ls=ls, marker="o", ms=3, label=label)
        row = rows.get("transfer-parity-seed0", {})
        if task == "parity" and row.get("per_length"):
            Ls = sorted(row["per_length"])
            ax.plot(Ls, [row["per_length"][L] for L in Ls], color="C2", marker="s", ms=3, label="CoT, 2 layers, transfer")
        ax.set(title=task, xlabel="sequence length L", ylabel="test accuracy", ylim=(-0.03, 1.03))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def emergence(rows: list[dict], path: Path, formed: float) -> Path:
    """Accuracy and attn0/attn1 peakiness against steps, the step where the head formed marked."""
    plt = require_matplotlib()
    rows = [r for r in rows if r.get("curve")]
    fig, axes = plt.subplots(1, max(1, len(rows)), figsize=(4.6 * max(1, len(rows)), 3.5), squeeze=False)
    for ax, row in zip(axes[0], rows):
        steps = [c["step"] for c in row["curve"]]
        for key, label, colour in (("accuracy", "accuracy", "C0"), ("attn0_peakiness", "attn0 peakiness (-> EoI)", "C1"),
                                   ("attn1_peakiness", "attn1 peakiness (-> x_t)", "C2")):
            ax.plot(steps, [c.get(key) if c.get(key) is not None else float("nan") for c in row["curve"]],
                    color=colour, marker="o", ms=2.5, label=label)
        if row.get("formed_step") is not None:
            ax.axvline(row["formed_step"], color="k", ls=":", lw=1)
            ax.annotate(f"head formed @ {row['formed_step']}", (row["formed_step"], 0.05),
                        fontsize=7, rotation=90, ha="right")
        ax.set(title=row["name"], xlabel="step", ylabel="test, mean over L = 4..n_len", ylim=(-0.03, 1.03))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def transfer(rows: list[dict], path: Path, solved: float) -> Path:
    """Parity accuracy against fine-tuning steps: transfer from polynomial (blue) vs from scratch (red)."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for row in rows:
        if not row.get("curve"):
            continue
        colour = "C0" if row["kind"] == "transfer" else "C3"
        label = ("transfer from polynomial" if row["kind"] == "transfer" else "from scratch") + f", seed {row['seed']}"
        ax.plot([c["step"] for c in row["curve"]], [c["accuracy"] for c in row["curve"]], color=colour,
                alpha=0.5 + 0.5 / (1 + row["seed"]), marker="o", ms=2, label=label)
    ax.axhline(solved, color="k", ls=":", lw=1)
    ax.set(title="parity with CoT: transfer vs scratch", xlabel="step", ylabel="test accuracy (L = 4..n_len)",
           ylim=(-0.03, 1.03))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def width_sweep(rows: list[dict], path: Path) -> Path:
    """Final accuracy and iteration-head peakiness against the embedding width."""
    plt = require_matplotlib()
    rows = sorted((r for r in rows if r.get("summary")), key=lambda r: r["width"])
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    widths = [r["width"] for r in rows]
    ax.plot(widths, [r["summary"]["accuracy"] for r in rows], marker="o", label="test accuracy")
    ax.plot(widths, [r["summary"].get("attn1_peakiness") for r in rows], marker="s", label="attn1 peakiness")
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.set(title="polynomial, CoT, 2 layers: embedding width", xlabel="embedding dimension d", ylim=(-0.03, 1.03))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def length_generalisation(rows: list[dict], path: Path) -> Path:
    """Accuracy per length of models trained on lengths 1..M only (the grey band), one line per recipe."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.axvspan(0.5, rows[0]["train_len"] + 0.5, color="0.9", label=f"trained lengths 1..{rows[0]['train_len']}")
    for row in rows:
        Ls, gen = sorted(row["per_length"]), row.get("generation_per_length") or {}
        recipe = "length recipe" if row.get("length_recipe") else "default recipe"
        line, = ax.plot(Ls, [row["per_length"][L] for L in Ls], marker="o", label=f"{recipe}: teacher-forced")
        if any(v is not None for v in gen.values()):
            ax.plot(Ls, [gen.get(L) for L in Ls], marker="s", ls="--", color=line.get_color(),
                    label=f"{recipe}: greedy generation")
    ax.set(title=f"{rows[0]['task']}: length generalisation", xlabel="sequence length L", ylabel="test accuracy",
           ylim=(-0.03, 1.03))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
