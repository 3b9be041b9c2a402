"""Pictures of a training run: emergence curves from ``metrics.jsonl`` and the paper's two attention maps.

* ``curves.png``: test accuracy and the peakiness (solid) / mean mass (dashed) of ``attn0`` (layer 1 to EoI)
  and ``attn1`` (layer 2 to x_t, the iteration head) against steps, with training loss beside them; the
  step where the run was first solved is marked. The head's emergence shows as a jump in both.
* ``attention_maps.png``: layer-1 and layer-2 attention of the trained model on one test sequence, the
  circuit's target cells outlined (the paper's attention-map figure).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .errors import IterHeadsError


def require_matplotlib():
    """``matplotlib.pyplot`` with the file-only Agg backend, or one clear IterHeadsError (matplotlib is the
    optional ``plots`` extra: importing this module never needs it)."""
    try:
        import matplotlib
    except ImportError:
        raise IterHeadsError("plots need matplotlib, which is not installed: pip install 'hf-iterheads[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(records: list[dict], path: str | Path, title: str = "") -> Path:
    """Accuracy and attn0/attn1 peakiness (and mass) against steps, one colour per task; loss on the right."""
    plt = require_matplotlib()
    evals = [r for r in records if r.get("kind") == "eval"]
    trains = [r for r in records if r.get("kind") == "train"]
    if not evals and not trains:
        raise IterHeadsError("metrics.jsonl holds no train or eval records yet")
    fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    tasks = list(dict.fromkeys(r["task"] for r in evals))
    styles = {"accuracy": ("accuracy", "C0"), "attn0_peakiness": ("attn0 peakiness", "C1"),
              "attn1_peakiness": ("attn1 peakiness", "C2")}
    for i, task in enumerate(tasks):
        rows = sorted((r for r in evals if r["task"] == task), key=lambda r: r["step"])
        rows = list({r["step"]: r for r in rows}.values())  # the final full evaluation replaces a same-step one
        steps = [r["step"] for r in rows]
        suffix = f" ({task})" if len(tasks) > 1 else ""
        for key, (label, colour) in styles.items():
            values = [r.get(key) for r in rows]
            if any(v is not None for v in values):
                ax.plot(steps, [np.nan if v is None else v for v in values], color=colour, marker="o", ms=3,
                        alpha=1 - 0.3 * i, label=label + suffix)
        for key, colour in (("attn0_mass", "C1"), ("attn1_mass", "C2")):
            values = [r.get(key) for r in rows]
            if any(v is not None for v in values):
                ax.plot(steps, [np.nan if v is None else v for v in values], color=colour, ls="--", lw=1,
                        alpha=0.6, label=key.replace("_", " ") + suffix)
    marks = {"solved": ("solved", ":"), "formed": ("head formed", "--"), "adapting": ("adaptive lengths", "-.")}
    for r in records:
        if r.get("kind") in marks:
            text, ls = marks[r["kind"]]
            ax.axvline(r["step"], color="k", ls=ls, lw=1)
            ax.annotate(f"{text} @ {r['step']}", (r["step"], 0.03), fontsize=8, rotation=90, ha="right")
    ax.set(xlabel="step", ylabel="test (mean over L = 4..n_len)", ylim=(-0.02, 1.02), title=title or "emergence")
    ax.legend(fontsize=7, loc="center right")
    ax.grid(alpha=0.3)
    if trains:
        ax_loss.plot([r["step"] for r in trains], [r["loss"] for r in trains], color="C3")
        ax_loss.set_yscale("log")
    ax_loss.set(xlabel="step", ylabel="training loss (after EoI)", title="loss")
    ax_loss.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def _save(fig, path: str | Path) -> None:
    """Save via a temporary file and a rename: a kill mid-write never leaves half a PNG."""
    from .outputs import atomic_file

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format=Path(path).suffix.lstrip(".") or "png")


def check_records(records: list[dict], path: str | Path) -> list[dict]:
    """Refuse, naming the line, a metrics record the curves cannot use (a hand edit, another tool's file)."""
    need = {"eval": ("step", "task"), "train": ("step", "loss"), "solved": ("step",), "formed": ("step",),
            "adapting": ("step",)}
    for number, r in enumerate(records, 1):
        for key in need.get(r.get("kind"), ()):
            if key not in r:
                raise IterHeadsError(f"{path}: record {number} ({r.get('kind')}) has no {key!r}")
        if "step" in r and (not isinstance(r["step"], int) or isinstance(r["step"], bool)):
            raise IterHeadsError(f"{path}: record {number} has a step that is not an integer: {r['step']!r}")
        if r.get("kind") == "train" and not isinstance(r["loss"], (int, float)):
            raise IterHeadsError(f"{path}: record {number} has a loss that is not a number: {r['loss']!r}")
    return records


def attention_maps(model, tokenizer, task: str, length: int, seed: int = 0, cot: bool = True):
    """(tokens, [layer-1 map, layer-2 map, ...]) for one test-like sequence, head 0 ... averaged over heads."""
    import torch

    from .circuit import eager_attentions
    from .modeling import check_fits
    from .tasks import get_task
    from .tokenizer import Layout

    layout = Layout(tokenizer, task, cot)
    check_fits(model.config, layout.seq_len(length), f"length-{length} sequence")
    task_obj = get_task(task)
    inputs = task_obj.sample_inputs(1, length, np.random.default_rng(seed))
    ids = torch.from_numpy(layout.ids(inputs, task_obj.run(inputs)))
    model.eval()
    with torch.no_grad():
        attentions = eager_attentions(model, input_ids=ids, attention_mask=torch.ones_like(ids))
    tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    return tokens, [a[0].mean(0).float().numpy() for a in attentions]


def plot_attention_maps(model, tokenizer, task: str, length: int, path: str | Path, seed: int = 0, cot: bool = True) -> Path:
    """The paper's figure: each layer's attention (query rows, key columns), circuit cells outlined."""
    plt = require_matplotlib()
    from matplotlib.patches import Rectangle

    from .circuit import PAPER_NAMES, circuit_pairs, native_positions

    tokens, maps = attention_maps(model, tokenizer, task, length, seed, cot)
    pairs = {paper: circuit_pairs(*native_positions(length))[ours] for paper, ours in PAPER_NAMES.items()} if cot else {}
    n = len(maps)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 5), squeeze=False)
    for layer, (ax, grid) in enumerate(zip(axes[0], maps)):
        ax.imshow(grid, vmin=0, vmax=1, cmap="Blues")
        target = {0: "attn0", 1: "attn1"}.get(layer)
        if target in pairs:
            for q, k in zip(*pairs[target]):
                ax.add_patch(Rectangle((int(k) - 0.5, int(q) - 0.5), 1, 1, fill=False, ec="C3", lw=1.2))
        ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
        ax.set_yticks(range(len(tokens)), tokens, fontsize=7)
        name = {0: " (attn0: s_t -> EoI)", 1: " (attn1: iteration head, -> x_t)"}.get(layer, "") if cot else ""
        ax.set_title(f"layer {layer + 1}{name}", fontsize=9)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.suptitle(f"{task}, L = {length}: attention (red: the circuit's target cells)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def run_plot(args: argparse.Namespace) -> int:
    """Check the run folder, the metrics, the checkpoint and the output folder first; then draw."""
    from .outputs import check_writable, read_jsonl

    require_matplotlib()  # before anything is written
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        what = "is a file" if run_dir.exists() else "does not exist"
        raise IterHeadsError(f"{run_dir} {what}; expected a run directory written by hf-iterheads train")
    has_metrics = (run_dir / "metrics.jsonl").is_file()
    has_model = (run_dir / "config.json").is_file()
    if not has_metrics and not has_model:
        raise IterHeadsError(f"{run_dir} has neither metrics.jsonl nor a model checkpoint: nothing to plot")
    out_dir = Path(args.output_dir) if args.output_dir else run_dir / "plots"
    check_writable(out_dir, "dir", "--output-dir" if args.output_dir else "output folder")
    records = check_records(read_jsonl(run_dir / "metrics.jsonl"), run_dir / "metrics.jsonl") if has_metrics else []
    if has_metrics and not any(r.get("kind") in ("train", "eval") for r in records) and not has_model:
        raise IterHeadsError(f"{run_dir / 'metrics.jsonl'} holds no train or eval records yet: nothing to plot")
    task, length, model = args.task, args.length, None
    if not has_model and (args.task or args.length):
        raise IterHeadsError(f"{run_dir} has no final checkpoint yet: --task and --length choose the attention-map "
                             "sequence, and there is no model to draw it from; plot the curves without them")
    if has_model:  # load before writing anything: a broken checkpoint leaves no half set of pictures
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        from transformers.utils import logging as hf_logging

        from .modeling import iterheads_meta, load_checkpoint

        hf_logging.disable_progress_bar()

        model, tokenizer = load_checkpoint(run_dir)
        meta = iterheads_meta(model.config)
        task = task or (meta.get("tasks") or [None])[0]
        if task is None:
            raise IterHeadsError("the checkpoint does not say which task it was trained on: pass --task")
        length = length or meta.get("n_len") or 16
        from .modeling import check_fits
        from .tokenizer import Layout

        check_fits(model.config, Layout(tokenizer, task, meta.get("cot", True)).seq_len(length), f"length-{length} sequence")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if any(r.get("kind") in ("train", "eval") for r in records):
        written.append(plot_curves(records, out_dir / "curves.png", title=run_dir.name))
    if model is not None:
        cot = iterheads_meta(model.config).get("cot", True)
        written.append(plot_attention_maps(model, tokenizer, task, length, out_dir / "attention_maps.png", args.seed, cot))
    else:
        print(f"{run_dir} has no final checkpoint yet: attention maps skipped", file=sys.stderr)
    for path in written:
        print(path)
    return 0


def add_cli(subparsers) -> None:
    from .cli import non_negative_int, positive_int

    p = subparsers.add_parser(
        "plot",
        help="PNG figures of a training run: emergence curves and attention maps",
        description="Write curves.png (accuracy, attn0/attn1 peakiness vs steps) from DIR/metrics.jsonl and "
        "attention_maps.png (both layers on one test sequence) from the checkpoint in DIR.",
    )
    p.add_argument("run_dir", help="a directory written by `hf-iterheads train`")
    p.add_argument("--output-dir", help="where the PNGs go (default DIR/plots)")
    p.add_argument("--task", help="task of the attention-map sequence (default: the run's first task)")
    p.add_argument("--length", type=positive_int, help="length L of that sequence (default: the run's n_len)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed drawing that sequence")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.set_defaults(func=run_plot)
