"""Evaluation: the paper's sequence accuracy, free-running generation, and the circuit's attention peakiness.

Per length L of the test split (paper.md section 7):

* ``accuracy``: teacher-forced, one forward pass; a sequence counts when every position after EoI is
  predicted right (the states and EoS) -- the paper's metric;
* ``generation_accuracy``: greedy decoding from ``<task> x_1 .. x_L <eoi>``, every generated token must be
  right -- not in the paper; it catches models that only work with the true previous states fed back;
* ``attn0_*``/``attn1_*``: mean attention mass and peakiness (share > 0.5) of the two heads of the circuit
  (layer 1 to EoI, layer 2 to x_t), CoT models with 2+ layers only; with several heads, the best head.

Headline numbers average the per-length values over L = 4 .. n_len, as the paper does (short lengths have
so few distinct inputs that they say little). Everything is batched per length: no per-sequence Python.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import IterHeadsError
from .outputs import write_json_atomic
from .tasks import IterativeTask, get_task, parse_lengths

if TYPE_CHECKING:  # torch, transformers and the circuit are imported where used: `eval --help` does not wait for them
    import torch

    from .tokenizer import Layout


def _no_grad(fn: Callable) -> Callable:
    """``torch.no_grad()`` as a decorator that imports torch at the first call, not at import."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper

SUMMARY_FROM = 4  # the paper averages test metrics over L = 4 .. n_len
SOLVED = 0.99  # test accuracy (mean over L = 4..n_len) at which a task counts as learned
FORMED = 0.9  # attn1 peakiness at which the iteration head counts as formed
CIRCUIT = ("attn0", "attn1")


# --- the metric as a plain function (the evaluate module wraps it) ---------------------------------------


def sequence_accuracy(
    predictions: Sequence[Sequence[int]], references: Sequence[Sequence[int]], ignore_index: int = -100
) -> dict[str, float]:
    """Share of sequences predicted right at every scored position, and the per-token share.

    Positions where the reference is ``ignore_index`` are not scored (use it for the prompt before EoI, or
    for padding). Sequences may have different lengths, but each prediction must match its reference's.
    """
    if len(predictions) != len(references):
        raise IterHeadsError(f"{len(predictions)} predictions for {len(references)} references")
    n_seq = n_right = n_tok = n_tok_right = 0
    for pred, ref in zip(predictions, references):
        pred, ref = np.asarray(pred), np.asarray(ref)
        if pred.shape != ref.shape:
            raise IterHeadsError(f"a prediction of shape {pred.shape} for a reference of shape {ref.shape}")
        scored = ref != ignore_index
        hits = (pred == ref) & scored
        n_seq += 1
        n_right += bool(hits.sum() == scored.sum())
        n_tok += int(scored.sum())
        n_tok_right += int(hits.sum())
    return {
        "sequence_accuracy": n_right / n_seq if n_seq else 0.0,
        "token_accuracy": n_tok_right / n_tok if n_tok else 0.0,
    }


# --- batched scoring of one length -------------------------------------------------------------------------


def _forward(model, ids: torch.Tensor, attentions: bool):
    import torch

    from .circuit import check_attentions

    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=attentions)
    if attentions:
        check_attentions(model, out.attentions)
    return out


@_no_grad
def greedy_generate(model, prompt: torch.Tensor, n_new: int) -> torch.Tensor:
    """``n_new`` greedy tokens after an equal-length prompt batch (shape (B, P)) -> (B, n_new).

    With the key/value cache: each new token costs one position, not a forward over the whole prefix (the final
    evaluation of a run generates 16k sequences)."""
    import torch

    params = inspect.signature(model.forward).parameters
    key = next((k for k in ("cache", "past_key_values") if k in params), None)  # "cache" since transformers 5.x
    ids, past, new = prompt, None, []
    for _ in range(n_new):
        if key is None:  # a model without a cache: the whole prefix every time
            ids = torch.cat([prompt, *new], dim=1)
        mask = torch.ones(prompt.shape[0], prompt.shape[1] + len(new), dtype=torch.long, device=prompt.device)
        out = model(input_ids=ids, attention_mask=mask, **({key: past, "use_cache": True} if key else {}))
        past, ids = getattr(out, key) if key else None, out.logits[:, -1].argmax(-1, keepdim=True)
        new.append(ids)
    return torch.cat(new, dim=1) if new else prompt[:, :0]


@_no_grad
def score_length(
    model,
    layout: Layout,
    inputs: np.ndarray,
    states: np.ndarray,
    batch_size: int = 1024,
    generate: bool = True,
    attention: bool = True,
) -> dict[str, float | int | None]:
    """All metrics for one length; ``inputs``/``states`` have shape (n, L). The model must be in eval mode."""
    import torch

    from .circuit import PAPER_NAMES, circuit_pairs, mass_on, native_positions, summarize
    from .tokenizer import Layout

    length = inputs.shape[1]
    ids_all = torch.from_numpy(layout.ids(inputs, states))
    e = Layout.eoi_index(length)
    device = next(model.parameters()).device
    n_layer = int(model.config.n_layer)
    attention = attention and layout.cot
    pairs = circuit_pairs(*native_positions(length)) if attention else {}
    layers = {"attn0": 0, "attn1": 1} if n_layer >= 2 else {"attn0": 0}
    tf_right, gen_right, masses = [], [], {k: [] for k in layers}
    for start in range(0, len(ids_all), batch_size):
        ids = ids_all[start : start + batch_size].to(device)
        out = _forward(model, ids, attention)
        tf_right.append((out.logits[:, e:-1].argmax(-1) == ids[:, e + 1 :]).all(1).cpu())
        if generate:
            gen = greedy_generate(model, ids[:, : e + 1], ids.shape[1] - e - 1)
            gen_right.append((gen == ids[:, e + 1 :]).all(1).cpu())
        for name, layer in layers.items() if attention else ():
            q, k = (p[None].expand(len(ids), -1) for p in pairs[PAPER_NAMES[name]])
            masses[name].append(mass_on(out.attentions[layer].float(), q, k)[0].cpu())
    result: dict[str, float | int | None] = {"n": len(ids_all), "accuracy": torch.cat(tf_right).float().mean().item()}
    result["generation_accuracy"] = torch.cat(gen_right).float().mean().item() if generate else None
    for name in CIRCUIT:
        if name in masses and masses[name]:
            mass = torch.cat(masses[name])
            mean, peak = summarize(mass, torch.ones(mass.shape[0], mass.shape[2], dtype=torch.bool))
            result[f"{name}_mass"], result[f"{name}_peakiness"] = mean.max().item(), peak.max().item()
        else:
            result[f"{name}_mass"] = result[f"{name}_peakiness"] = None
    return result


def summary_lengths(lengths: Iterable[int]) -> list[int]:
    """Lengths the headline averages use: 4 and above, or all of them when none is that long."""
    lengths = sorted(lengths)
    return [L for L in lengths if L >= SUMMARY_FROM] or lengths


def summarize_lengths(per_length: dict[int, dict], keys: Iterable[str] | None = None) -> dict[str, float | None]:
    """Mean over ``summary_lengths`` of every per-length metric (None when a metric was not measured)."""
    use = summary_lengths(per_length)
    keys = keys or [k for k in next(iter(per_length.values())) if k != "n"]
    out = {}
    for key in keys:
        values = [per_length[L][key] for L in use if per_length[L].get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


@_no_grad
def evaluate_model(
    model,
    tokenizer,
    task: str | IterativeTask,
    data: dict[int, tuple[np.ndarray, np.ndarray]],
    cot: bool = True,
    batch_size: int = 1024,
    generate: bool = True,
    attention: bool = True,
) -> dict:
    """Score ``model`` on ``data`` (length -> (inputs, states)); returns per-length and summary metrics."""
    from .circuit import eager_attention
    from .modeling import check_fits
    from .tokenizer import Layout

    layout = Layout(tokenizer, task, cot=cot)
    if len(tokenizer) > model.config.vocab_size:
        raise IterHeadsError(f"the tokenizer has {len(tokenizer)} tokens, the model only {model.config.vocab_size}")
    check_fits(model.config, layout.seq_len(max(data)), f"length-{max(data)} sequence")
    was_training = model.training
    model.eval()
    try:
        with eager_attention(model) if attention else nullcontext():
            per_length = {
                L: score_length(model, layout, x, s, batch_size, generate, attention) for L, (x, s) in sorted(data.items())
            }
    finally:
        model.train(was_training)
    return {
        "task": layout.task.name,
        "cot": cot,
        "lengths": sorted(per_length),
        "summary_lengths": summary_lengths(per_length),
        "summary": summarize_lengths(per_length),
        "per_length": {str(L): m for L, m in per_length.items()},
    }


def first_step(evals: list[dict], key: str, threshold: float) -> int | None:
    """First evaluated step at which ``key`` reached ``threshold`` (None: never within the run)."""
    for r in evals:
        if r.get(key) is not None and r[key] >= threshold:
            return int(r["step"])
    return None


# --- test data -----------------------------------------------------------------------------------------------


def split_by_length(split, lengths: Iterable[int] | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """A dataset split (columns length, inputs, states) as length -> (inputs, states) arrays, vectorised."""
    if getattr(split, "_indices", None) is not None:  # a selected/shuffled view: materialise it first
        split = split.flatten_indices()
    table = split.data.table if hasattr(split.data, "table") else split.data
    length = np.asarray(table.column("length").to_numpy(), dtype=np.int64)
    columns = {}
    for name in ("inputs", "states"):
        col = table.column(name).combine_chunks()
        columns[name] = (np.asarray(col.offsets.to_numpy(), dtype=np.int64), np.asarray(col.values.to_numpy()))
    wanted = sorted(set(length.tolist()) if lengths is None else set(int(L) for L in lengths))
    out = {}
    for L in wanted:
        rows = np.flatnonzero(length == L)
        if not len(rows):
            raise IterHeadsError(f"the test split has no sequence of length {L}")
        pair = []
        for name in ("inputs", "states"):
            offsets, values = columns[name]
            pair.append(values[offsets[rows][:, None] + np.arange(L)].astype(np.int64))
        out[L] = (pair[0], pair[1])
    return out


def test_data(
    task: str | IterativeTask,
    n_len: int,
    per_length: int = 1024,
    seed: int = 0,
    lengths: Iterable[int] | None = None,
    dataset: str | None = None,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The test split by length: built with ``build_dataset`` (the published data for the same seed), or
    loaded from a dataset folder / Hub repo with one config per task."""
    task = get_task(task)
    if dataset is not None:
        import datasets

        try:
            split = datasets.load_dataset(dataset, task.name, split="test")
        except Exception as err:  # datasets raises many types; the user needs one line
            raise IterHeadsError(f"cannot load the test split of {task.name!r} from {dataset}: {err}") from None
    else:
        from .data import build_dataset

        split = build_dataset(task, n_len, per_length, seed)["test"]
    return split_by_length(split, lengths)


# --- CLI -------------------------------------------------------------------------------------------------------


def run_eval(args: argparse.Namespace) -> int:
    """Check every input and the output path, load, then score task by task; the JSON goes out at the end."""
    from .outputs import check_writable
    from .task_plugins import register_sources_of, trained_tasks

    register_sources_of(args.model_dir)  # tasks the checkpoint was trained on from a user's module (module:attr)
    names = [t for t in (args.task if args.task is not None else ",".join(trained_tasks(args.model_dir))).split(",") if t]
    if not names:
        raise IterHeadsError("--task names no task" if args.task is not None else
                             f"{args.model_dir} does not say which tasks it was trained on: pass --task")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise IterHeadsError(f"--task lists {', '.join(twice)} more than once")
    tasks = [get_task(t) for t in names]  # unknown task: fails before loading anything
    lengths = parse_lengths(args.lengths) if args.lengths else None
    if args.output is not None:  # before the minute of scoring, not after it
        from .outputs import check_not_input

        check_writable(args.output, "file", "--output")
        from .bundled import bundled_path

        model = args.model_dir if Path(args.model_dir).expanduser().exists() else bundled_path(args.model_dir)
        check_not_input(args.output, {"evaluated model": model, "--dataset": args.dataset}, "--output")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from .modeling import check_fits, iterheads_meta, load_checkpoint
    from .tokenizer import Layout

    hf_logging.disable_progress_bar()
    model, tokenizer = load_checkpoint(args.model_dir)
    meta = iterheads_meta(model.config)
    cot = meta.get("cot", True) if args.cot is None else args.cot
    n_len = args.n_len or meta.get("n_len") or 16
    lengths = lengths or list(range(1, n_len + 1))
    trained_on = meta.get("tasks") or []
    for task in tasks:
        Layout(tokenizer, task, cot)  # vocabulary check before the (slower) data build
        check_fits(model.config, (2 * max(lengths) + 3) if cot else max(lengths) + 4, f"length-{max(lengths)} sequence")
    for task in tasks:
        if trained_on and task.name not in trained_on:
            print(f"hf-iterheads eval: warning: {args.model_dir} was not trained on {task.name!r} (its "
                  f"config.iterheads['tasks'] is {', '.join(trained_on)}); expect chance-level accuracy", file=sys.stderr)
    report = {"model": str(args.model_dir), "n_len": n_len, "per_length_count": args.per_length, "seed": args.seed}
    report["results"] = []
    for task in tasks:
        data = test_data(task, max(n_len, max(lengths)), args.per_length, args.seed, lengths, args.dataset)
        result = evaluate_model(
            model, tokenizer, task, data, cot, args.batch_size, generate=not args.no_generate, attention=True
        )
        report["results"].append(result)
        s = result["summary"]
        fmt = lambda v: "  n/a" if v is None else f"{v:5.3f}"  # noqa: E731
        print(
            f"{task.name}: L={result['summary_lengths'][0]}..{result['summary_lengths'][-1]} "
            f"accuracy {fmt(s['accuracy'])} generation {fmt(s['generation_accuracy'])} "
            f"attn0 peak {fmt(s['attn0_peakiness'])} attn1 peak {fmt(s['attn1_peakiness'])}",
            file=sys.stderr,
        )
    if args.output is not None:
        write_json_atomic(report, args.output)
    else:
        print(json.dumps(report, indent=2))
    return 0


def add_cli(subparsers) -> None:
    from .cli import non_negative_int, positive_int

    p = subparsers.add_parser(
        "eval",
        help="test accuracy per length, greedy generation, attention peakiness of a checkpoint",
        description="Evaluate a checkpoint on the test split: teacher-forced sequence accuracy per length (the "
        "paper's metric), free-running greedy accuracy, and attn0/attn1 peakiness; JSON out.",
    )
    p.add_argument("model_dir", help="checkpoint directory written by `hf-iterheads train`")
    p.add_argument("--task", default=None, help="task name or import string module:attr, or several separated by "
                   "commas (default: the tasks the checkpoint was trained on)")
    p.add_argument("--lengths", help="lengths to test, e.g. 4-16 or 1,8,16 (default 1..n_len of the model)")
    p.add_argument("--n-len", type=positive_int, help="training n_len (default: from the checkpoint)")
    p.add_argument("--per-length", type=positive_int, default=1024, help="test sequences per length (paper: 1024)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="dataset seed (0 = the published dataset)")
    p.add_argument("--dataset", help="load the test split from this dataset folder or Hub repo instead")
    p.add_argument("--cot", dest="cot", action="store_true", default=None, help="force CoT layout")
    p.add_argument("--no-cot", dest="cot", action="store_false", help="force the no-CoT layout")
    p.add_argument("--no-generate", action="store_true", help="skip free-running generation")
    p.add_argument("--batch-size", type=positive_int, default=1024, help="sequences per forward pass (default 1024)")
    p.add_argument("--output", "-o", help="write the JSON here (default: stdout); never inside the model or --dataset")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.set_defaults(func=run_eval)
