"""Causal validation: knock heads out and measure what the chain of thought loses.

A head's contribution reaches the residual stream only through the attention's output projection
(``o_proj`` in Llama/Qwen2/Gemma2/Mistral/Phi-3, ``c_proj`` in GPT-2, ``dense`` in GPT-NeoX/Phi,
``out_proj`` elsewhere), whose input is the heads' outputs side by side. A forward pre-hook on that
projection replaces one head's slice by zeros (zero-ablation) or by its mean over the probes
(mean-ablation, which keeps the activation in-distribution). transformers 5 removed ``head_mask``, so
this is the architecture-independent way.

Metrics are teacher-forced, as in the paper: argmax at each position that predicts ``s_t`` against the
true ``s_t`` (its first token in text renderings), per token and per whole chain, and the mean
log-probability of the true ``s_t``. The found heads are compared with the same number of random other heads.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from ..errors import IterHeadsError
from ..tasks import get_task
from .attention import find_attention_modules, find_output_projection, head_counts
from .probes import Probes
from .runner import forward_params as _forward_kwargs

Head = tuple[int, int]


def _device(model) -> torch.device:
    return getattr(model, "device", None) or next(model.parameters()).device


@torch.no_grad()
def teacher_forced_metrics(model, probes: Probes, batch_size: int = 32) -> dict[str, float]:
    """Token accuracy, whole-chain accuracy and mean log-prob of the true ``s_t`` (one forward pass per batch)."""
    device = _device(model)
    keep = "logits_to_keep" in _forward_kwargs(model)
    correct = total = chains_ok = 0
    logp_sum = 0.0
    for idx in probes.batches(batch_size):
        batch = {k: v.to(device) for k, v in probes.batch(idx).items()}
        pred, target = probes.pred_pos[idx], probes.target_ids[idx]
        valid = pred >= 0
        if keep:  # only the rows we read go through the LM head (vocabularies can be 150k wide)
            cols = torch.unique(pred[valid])
            logits = model(**batch, logits_to_keep=cols.to(device), use_cache=False).logits.float().cpu()
            lookup = torch.full((batch["input_ids"].shape[1],), 0, dtype=torch.long)
            lookup[cols] = torch.arange(len(cols))
            rows = lookup[pred.clamp(min=0)]
        else:
            logits = model(**batch, use_cache=False).logits.float().cpu()
            rows = pred.clamp(min=0)
        picked = logits.gather(1, rows[..., None].expand(-1, -1, logits.shape[-1]))  # (B, L, V)
        logp = torch.log_softmax(picked, -1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
        hit = (picked.argmax(-1) == target) & valid
        correct += int(hit.sum())
        total += int(valid.sum())
        chains_ok += int((hit | ~valid).all(1).sum())
        logp_sum += float(logp[valid].sum())
    n_states = len(get_task(probes.task).states)
    return {
        "token_accuracy": correct / max(total, 1),
        "sequence_accuracy": chains_ok / max(len(probes), 1),
        "log_prob": logp_sum / max(total, 1),
        "chance_token_accuracy": 1.0 / n_states,
        "chance_log_prob": -math.log(n_states),
    }


def _projections(model) -> list[torch.nn.Module]:
    return [find_output_projection(m) for _, m, _ in find_attention_modules(model)]


@torch.no_grad()
def head_means(model, probes: Probes, batch_size: int = 32) -> list[torch.Tensor]:
    """Per layer, the mean of every head's output slice over all real (non-padding) tokens: (H, head_dim)."""
    n_heads, _ = head_counts(model)
    sums: dict[int, torch.Tensor] = {}
    count = [0]
    mask_box: list[torch.Tensor] = []

    def make(layer: int):
        def pre_hook(module, args):
            x = args[0].float()
            m = mask_box[0].to(x.device, x.dtype)[..., None]
            s = (x * m).sum(dim=(0, 1)).view(n_heads, -1).cpu()
            sums[layer] = sums.get(layer, 0) + s.double()

        return pre_hook

    handles = [p.register_forward_pre_hook(make(i)) for i, p in enumerate(_projections(model))]
    try:
        device = _device(model)
        for idx in probes.batches(batch_size):
            batch = {k: v.to(device) for k, v in probes.batch(idx).items()}
            mask_box[:] = [batch["attention_mask"]]
            model(**batch, use_cache=False)
            count[0] += int(batch["attention_mask"].sum())
    finally:
        for h in handles:
            h.remove()
    return [(sums[i] / max(count[0], 1)).float() for i in sorted(sums)]


@contextmanager
def ablate_heads(model, heads: Sequence[Head], mode: str = "zero", means: list[torch.Tensor] | None = None) -> Iterator[None]:
    """Within the block, ``heads`` (layer, head) contribute zeros (``zero``) or their mean output (``mean``)."""
    if mode not in ("zero", "mean"):
        raise IterHeadsError(f"ablation mode must be 'zero' or 'mean', got {mode!r}")
    if mode == "mean" and means is None:
        raise IterHeadsError("mean-ablation needs the heads' means (head_means)")
    n_heads, _ = head_counts(model)
    projections = _projections(model)
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        if not (0 <= layer < len(projections) and 0 <= head < n_heads):
            raise IterHeadsError(f"no head ({layer}, {head}) in a model of {len(projections)} layers x {n_heads} heads")
        by_layer.setdefault(layer, []).append(head)

    def make(layer: int, hs: list[int]):
        def pre_hook(module, args):
            x = args[0]
            view = x.view(*x.shape[:-1], n_heads, x.shape[-1] // n_heads).clone()
            for h in hs:
                view[..., h, :] = 0 if mode == "zero" else means[layer][h].to(x.device, x.dtype)
            return (view.view_as(x), *args[1:])

        return pre_hook

    handles = [projections[l].register_forward_pre_hook(make(l, hs)) for l, hs in by_layer.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def random_heads(n_layers: int, n_heads: int, k: int, exclude: Sequence[Head], rng: np.random.Generator) -> list[Head]:
    """``k`` distinct heads drawn uniformly among those not in ``exclude``."""
    pool = [(l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in set(map(tuple, exclude))]
    if len(pool) < k:
        return []
    return [pool[i] for i in sorted(rng.choice(len(pool), size=k, replace=False))]


def matched_heads(heads: Sequence[Head], n_heads: int, rng: np.random.Generator) -> list[Head]:
    """For each head, a random other head of the same layer (none where the layer has no other head left)."""
    taken = set(map(tuple, heads))
    out: list[Head] = []
    for layer, _ in heads:
        pool = [(layer, h) for h in range(n_heads) if (layer, h) not in taken]
        if pool:
            pick = pool[int(rng.integers(len(pool)))]
            taken.add(pick)
            out.append(pick)
    return out


def run_ablation(
    model,
    probes: Probes,
    heads: Sequence[Head],
    seed: int = 0,
    batch_size: int = 32,
    n_random: int = 3,
    modes: Sequence[str] = ("zero", "mean"),
) -> dict:
    """Clean metrics, then each mode for the given heads, for random heads of the same layers (``matched``, the
    fairer control: same depth, same share of the layer) and for ``n_random`` draws of as many random other heads."""
    heads = [tuple(map(int, h)) for h in heads]
    n_layers, (n_heads, _) = len(_projections(model)), head_counts(model)
    rng = np.random.default_rng(seed)
    draws: list[list[Head]] = []
    for _ in range(n_random):  # distinct draws only: a 2-head model has a single "other" head
        d = random_heads(n_layers, n_heads, len(heads), heads, rng)
        if d and d not in draws:
            draws.append(d)
    matched = matched_heads(heads, n_heads, rng)
    out: dict = {"heads": [list(h) for h in heads], "clean": teacher_forced_metrics(model, probes, batch_size)}
    means = head_means(model, probes, batch_size) if "mean" in modes else None
    for mode in modes:
        with ablate_heads(model, heads, mode, means):
            top = teacher_forced_metrics(model, probes, batch_size)
        rand = []
        for d in draws:
            with ablate_heads(model, d, mode, means):
                rand.append({"heads": [list(h) for h in d], **teacher_forced_metrics(model, probes, batch_size)})
        avg = {k: float(np.mean([r[k] for r in rand])) for k in top} if rand else None
        same_layer = None
        if matched:
            with ablate_heads(model, matched, mode, means):
                same_layer = {"heads": [list(h) for h in matched], **teacher_forced_metrics(model, probes, batch_size)}
        out[mode] = {"top": top, "matched": same_layer, "random": rand, "random_mean": avg}
    return out
