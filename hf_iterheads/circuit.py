"""The iteration-head circuit: where its two heads look, and how much attention lands there (paper section 7).

One definition serves training, evaluation, plots and the detector. Positions come per sequence as index
tensors (B, L) padded with -1: ``x_pos`` (x_t), ``state_pos`` (s_t), ``pred_pos`` (the position that predicts
s_t: EoI for t = 1, else s_(t-1)) and ``eoi_pos`` (B,). Pairs of (queries, keys):

* ``eoi``: s_t -> EoI, the layer-1 head (the paper's ``attn0``);
* ``iteration``: the position predicting s_t -> x_t, the iteration head (the paper's ``attn1``), on the
  informative steps only when a mask is given (``iteration_all`` keeps every step);
* ``prev`` / ``next``: the same queries -> x_(t-1) / x_(t+1), controls against a fixed-offset head.

Peakiness is the share of valid pairs whose attention exceeds 0.5; the mean mass is reported beside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import IterHeadsError

PEAK_THRESHOLD = 0.5
# The paper's names for the two heads, as they appear in metrics.jsonl and evaluation results.
PAPER_NAMES = {"attn0": "eoi", "attn1": "iteration"}


def native_positions(length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_pos, state_pos, pred_pos, eoi_pos) of the native CoT layout ``<task> x_1..x_L <eoi> s_1..s_L``."""
    t = torch.arange(1, length + 1)
    e = length + 1
    return t, e + t, e + t - 1, torch.tensor(e)


def circuit_pairs(
    x_pos: torch.Tensor,
    state_pos: torch.Tensor,
    pred_pos: torch.Tensor,
    eoi_pos: torch.Tensor,
    informative: torch.Tensor | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(queries, keys) of every pair the circuit is scored on; shapes follow ``x_pos``, -1 where none."""
    pred = pred_pos if informative is None else torch.where(informative, pred_pos, -1)
    none = torch.full_like(x_pos[..., :1], -1)
    prev = torch.cat([none, x_pos[..., :-1]], -1)
    nxt = torch.where(pred >= 0, torch.cat([x_pos[..., 1:], none], -1), -1)
    eoi = torch.where(state_pos >= 0, eoi_pos[..., None], -1)
    return {
        "iteration": (pred, x_pos), "iteration_all": (pred_pos, x_pos), "eoi": (state_pos, eoi),
        "prev": (pred, prev), "next": (pred, nxt),
    }


def mass_on(probs: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mass at (query, key) pairs: ``probs`` (B, H, T, T), ``queries``/``keys`` (B, P) with -1 = none.

    Returns ``(mass, valid)``: mass (B, H, P) (0 where invalid) and valid (B, P) booleans.
    """
    if probs.dim() != 4:
        raise ValueError(f"expected attention of shape (B, H, T, T), got {tuple(probs.shape)}")
    valid = (queries >= 0) & (keys >= 0)
    q, k = queries.clamp(min=0).to(probs.device), keys.clamp(min=0).to(probs.device)
    b, h = probs.shape[:2]
    flat = (q * probs.shape[-1] + k)[:, None, :].expand(b, h, -1)  # one gather of (B, H, P): no (B, H, P, T) copy
    mass = probs.flatten(2).gather(2, flat)
    return mass * valid.to(probs.device)[:, None, :], valid


def summarize(mass: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean mass, peakiness) per head, averaged over every valid (sequence, pair): shapes (H,)."""
    n = valid.sum().clamp(min=1)
    v = valid.to(mass.device)[:, None, :]
    mean = (mass * v).sum(dim=(0, 2)) / n
    peak = ((mass > PEAK_THRESHOLD) & v).sum(dim=(0, 2)) / n
    return mean, peak


@contextmanager
def eager_attention(model) -> Iterator:
    """Run the block with eager attention, the one implementation that returns attention weights
    (under sdpa/flash transformers silently returns none); the previous implementation comes back after."""
    previous = getattr(model.config, "_attn_implementation", None)
    if previous != "eager" and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("eager")
        except (ValueError, ImportError, NotImplementedError) as err:
            raise IterHeadsError(f"{type(model).__name__} cannot switch to eager attention: {err}") from err
    try:
        yield model
    finally:
        if previous not in (None, "eager") and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(previous)


def check_attentions(model, attentions) -> tuple[torch.Tensor, ...]:
    """``attentions`` of a forward pass, or one clear error where the model gave none (never silently empty)."""
    if not attentions or any(a is None for a in attentions):
        raise IterHeadsError(f"{type(model).__name__} returned no attention weights, even with eager attention")
    return attentions


def eager_attentions(model, **inputs) -> tuple[torch.Tensor, ...]:
    """Per-layer attention probabilities (B, H, T, T) of one forward pass."""
    with eager_attention(model):
        out = model(**inputs, output_attentions=True)
    return check_attentions(model, getattr(out, "attentions", None))
