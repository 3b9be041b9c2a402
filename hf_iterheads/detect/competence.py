"""Competence-aware scores: does the model do the task, and does a head look at ``x_t`` when it does?

A pretrained LM probed on parity may be at chance; a head's attention to ``x_t`` then says little about how
the model computes, and knocking the head out cannot lower an accuracy that is already at chance. So, in one
teacher-forced pass with the attention captured, every step ``t`` gets the model's own greedy prediction of
``s_t`` (argmax at the position predicting it, against the first token of ``s_t``) and the circuit's scores
are split by it: ``iteration_score_correct`` over the steps it gets right, ``_wrong`` over the others, with
their counts. Clean accuracy is reported per length, next to chance (1 / number of states).

"At chance" means the token accuracy is not above chance by two binomial standard errors,
``chance + 2 * sqrt(chance * (1 - chance) / steps)``; below chance (a model that writes no digit) counts too.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..circuit import PEAK_THRESHOLD, mass_on
from ..tasks import get_task
from .attention import AttentionCapture, find_attention_modules, head_counts
from .probes import Probes
from .runner import forward_params as _forward_params

# Every score but the baselines. The queries of iteration/prev/next predict s_t; eoi's queries hold s_t and
# predict s_(t+1), so eoi is split by that prediction, and its last step (which predicts no state) by neither.
SPLIT_NAMES = ("iteration", "iteration_all", "eoi", "prev", "next")
OUTCOMES = ("correct", "wrong")
CANNOT = "the model cannot do the task; ablation drops are uninformative"


def _greedy_hits(model, batch: dict[str, torch.Tensor], pred: torch.Tensor, target: torch.Tensor, keep: bool) -> torch.Tensor:
    """(B, L) booleans: the argmax at ``pred`` equals ``target`` (False where ``pred`` is -1)."""
    device = batch["input_ids"].device
    valid = pred >= 0
    if keep:  # only the rows we read go through the LM head (vocabularies can be 150k wide)
        cols = torch.unique(pred[valid])
        logits = model(**batch, logits_to_keep=cols.to(device), use_cache=False).logits
        lookup = torch.zeros(batch["input_ids"].shape[1], dtype=torch.long)
        lookup[cols] = torch.arange(len(cols))
        rows = lookup[pred.clamp(min=0)]
    else:
        logits = model(**batch, use_cache=False).logits
        rows = pred.clamp(min=0)
    top = logits.argmax(-1).cpu()  # (B, kept rows)
    return (top.gather(1, rows) == target) & valid


def _own_prediction(hit: torch.Tensor, steps: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(right, defined) of the prediction made at each pair's query: [the one predicting s_t, the one holding s_t]."""
    none = torch.zeros_like(hit[:, :1])
    return [(hit, steps), (torch.cat([hit[:, 1:], none], 1), torch.cat([steps[:, 1:], none], 1))]


def at_chance(accuracy: float, chance: float, steps: int) -> bool:
    """True when ``accuracy`` is not above ``chance`` by two binomial standard errors over ``steps``."""
    return accuracy <= chance + 2.0 * math.sqrt(chance * (1.0 - chance) / max(steps, 1))


@torch.no_grad()
def competence_scores(model, probes: Probes, batch_size: int = 16) -> dict[str, Any]:
    """Greedy hits per step, clean accuracy per length, and the circuit's scores split by hit (one pass)."""
    n_layers, (n_heads, _) = len(find_attention_modules(model)), head_counts(model)
    mass = {(k, o): np.zeros((n_layers, n_heads)) for k in SPLIT_NAMES for o in OUTCOMES}
    peak = {o: np.zeros((n_layers, n_heads)) for o in OUTCOMES}
    count = {(k, o): 0 for k in SPLIT_NAMES for o in OUTCOMES}
    hits = np.zeros(probes.x_pos.shape, dtype=bool)
    device = next(model.parameters()).device
    keep = "logits_to_keep" in _forward_params(model)
    stash: dict[int, dict[str, torch.Tensor]] = {}
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_layer(layer, module, weights):  # keep only (B, H, L) masses: the pattern is dropped
        stash[layer] = {k: mass_on(weights, *pairs[k])[0].float().cpu() for k in SPLIT_NAMES}

    with AttentionCapture(model, on_layer) as capture:
        for idx in probes.batches(batch_size):
            cpu_pairs = {k: v for k, v in probes.pairs(idx).items() if k in SPLIT_NAMES}
            pairs = {k: (q.to(device), kk.to(device)) for k, (q, kk) in cpu_pairs.items()}
            stash.clear()
            batch = {k: v.to(device) for k, v in probes.batch(idx).items()}
            hit = _greedy_hits(model, batch, probes.pred_pos[idx], probes.target_ids[idx], keep)
            hits[idx] = hit.numpy()
            own = _own_prediction(hit, probes.pred_pos[idx] >= 0)
            for k in SPLIT_NAMES:
                q, kk = cpu_pairs[k]
                h, defined = own[k == "eoi"]
                valid = (q >= 0) & (kk >= 0) & defined
                for o, sel in zip(OUTCOMES, (valid & h, valid & ~h)):
                    count[k, o] += int(sel.sum())
                    w = sel[:, None, :].float()
                    for layer, m in stash.items():
                        mass[k, o][layer] += (m[k] * w).sum((0, 2)).double().numpy()
                        if k == "iteration":
                            peak[o][layer] += ((m[k] > PEAK_THRESHOLD).float() * w).sum((0, 2)).double().numpy()
        capture.check_complete()
    return _summary(probes.task, probes.lengths, probes.pred_pos.numpy() >= 0, hits, mass, peak, count)


def _summary(task: str, lengths: np.ndarray, steps: np.ndarray, hits: np.ndarray, mass, peak, count) -> dict[str, Any]:
    """Means from the sums; ``steps`` (N, L_max) marks real steps, ``lengths`` (N,) each probe's length."""
    n_steps = int(steps.sum())
    accuracy = float(hits[steps].sum()) / max(n_steps, 1)
    chance = get_task(task).chance
    per_length = {}
    for L in sorted(set(lengths.tolist())):
        rows = lengths == L
        per_length[str(L)] = round(float(hits[rows][steps[rows]].mean()), 6)
    split: dict[str, np.ndarray | None] = {}
    for k in SPLIT_NAMES:
        for o in OUTCOMES:
            split[f"{k}_score_{o}"] = mass[k, o] / count[k, o] if count[k, o] else None
    for o in OUTCOMES:
        split[f"peakiness_{o}"] = peak[o] / count["iteration", o] if count["iteration", o] else None
    low = at_chance(accuracy, chance, n_steps)
    return {
        "hits": hits,
        "scores": split,
        "counts": {k: {o: count[k, o] for o in OUTCOMES} for k in SPLIT_NAMES},
        "clean_accuracy": {
            "token_accuracy": round(accuracy, 6),
            "chance_token_accuracy": round(chance, 6),
            "steps": n_steps,
            "per_length": per_length,
            "at_chance": bool(low),
            "note": CANNOT if low else None,
        },
    }


def pool(parts: list[dict[str, Any]], probes_list: list[Probes]) -> dict[str, Any]:
    """One summary over several renderings of the same chains (one per template): counts add up."""
    if len(parts) == 1:
        return parts[0]
    n_layers, n_heads = next(v for v in parts[0]["scores"].values() if v is not None).shape
    mass = {(k, o): np.zeros((n_layers, n_heads)) for k in SPLIT_NAMES for o in OUTCOMES}
    peak = {o: np.zeros((n_layers, n_heads)) for o in OUTCOMES}
    count = {(k, o): 0 for k in SPLIT_NAMES for o in OUTCOMES}
    for part in parts:
        for k in SPLIT_NAMES:
            for o in OUTCOMES:
                c = part["counts"][k][o]
                count[k, o] += c
                if c:
                    mass[k, o] += part["scores"][f"{k}_score_{o}"] * c
                    if k == "iteration":
                        peak[o] += part["scores"][f"peakiness_{o}"] * c
    lengths = np.concatenate([p.lengths for p in probes_list])
    steps = np.concatenate([p.pred_pos.numpy() >= 0 for p in probes_list])
    hits = np.concatenate([p["hits"] for p in parts])
    return _summary(probes_list[0].task, lengths, steps, hits, mass, peak, count)


def to_json(comp: dict[str, Any]) -> dict[str, Any]:
    """scores.json keys: the split grids (null where no step fell on that side), counts and clean accuracy."""
    def grid(a: np.ndarray | None) -> list | None:
        return None if a is None else [[round(float(v), 6) for v in row] for row in a]

    out: dict[str, Any] = {name: grid(arr) for name, arr in comp["scores"].items()}
    out["split_counts"] = comp["counts"]
    out["clean_accuracy"] = comp["clean_accuracy"]
    return out
