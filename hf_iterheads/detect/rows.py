"""Row-sliced capture: the model keeps its fast attention (sdpa); probabilities exist only for the probe rows.

An attention function registered in transformers' ``AttentionInterface`` (with sdpa's mask builder in
``AttentionMaskInterface``, told never to drop the mask, so padding and sliding windows arrive as an explicit
boolean mask) computes each layer's output with ``sdpa_attention_forward`` and, for the query rows the patterns
read, the probabilities the way every eager implementation does: ``softmax(q k^T * scaling [softcap] + mask)``
in float32, key heads repeated for GQA. One layer's (B, H, rows, T) block is alive at a time.

sdpa has no logit softcapping, so a softcapped layer (Gemma 2) computes its output with the eager formula
inside this function: exact, but not faster. A model whose attention does not go through the interface, or
passes something this function cannot honour (attention sinks, position biases), is reported by
:class:`RowsUnavailable`; the detector then falls back to eager capture and says so.
"""

from __future__ import annotations

from typing import Self

import torch

from .attention import find_attention_modules

NAME = "iterheads_rows"
_ACTIVE: dict[int, tuple[RowCapture, int]] = {}  # id(attention module) -> (capture, layer)
_UNSUPPORTED = ("s_aux", "sinks", "position_bias", "alibi")


class RowsUnavailable(RuntimeError):
    """This model cannot be captured row-sliced; the caller falls back to eager."""


def _mask(*args, **kwargs):
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False  # rows need the mask itself, not sdpa's is_causal shortcut
    return sdpa_mask(*args, **kwargs)


def _register() -> None:
    """Make the function and its mask known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, rows_attention_forward)
    AttentionMaskInterface.register(NAME, _mask)


def row_probabilities(query, key, mask, rows: torch.Tensor | None, scaling: float | None, softcap: float | None) -> torch.Tensor:
    """Eager attention probabilities (B, H, R, T) in float32 for the query positions ``rows`` (R,) (None = all)."""
    n_heads, n_kv = query.shape[1], key.shape[1]
    if n_heads != n_kv:
        key = key.repeat_interleave(n_heads // n_kv, dim=1)  # head h reads key head h // groups, as repeat_kv
    q = query if rows is None else query.index_select(2, rows.to(query.device))
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    w = torch.matmul(q, key.transpose(2, 3)) * scaling
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    T = key.shape[2]
    if mask is None:  # pure causal (no padding, no window): query i (after T - Q cached keys) sees keys 0..T - Q + i
        pos = torch.arange(query.shape[2], device=w.device) if rows is None else rows.to(w.device)
        pos = pos + (T - query.shape[2])
        mask = (torch.arange(T, device=w.device)[None, :] <= pos[:, None])[None, None]
    else:
        mask = mask[..., :T]
        mask = mask if rows is None else mask.index_select(2, rows.to(mask.device))
    if mask.dtype == torch.bool:
        w = w.masked_fill(~mask, torch.finfo(w.dtype).min)
    else:
        w = w + mask
    return torch.softmax(w, dim=-1, dtype=torch.float32)


def rows_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The layer output from sdpa (eager formula where softcapped), plus the probe rows handed to the capture."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    softcap = kwargs.pop("softcap", None)
    entry = _ACTIVE.get(id(module))
    if entry is not None and any(kwargs.get(k) is not None for k in _UNSUPPORTED):
        raise RowsUnavailable(f"{type(module).__name__} passes {[k for k in _UNSUPPORTED if kwargs.get(k) is not None]}")
    full = None
    if softcap is None:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    else:
        full = row_probabilities(query, key, attention_mask, None, scaling, softcap)
        n_rep = query.shape[1] // value.shape[1]
        v = value.repeat_interleave(n_rep, dim=1) if n_rep > 1 else value
        out = torch.matmul(full.to(value.dtype), v).transpose(1, 2).contiguous()
    if entry is not None:
        capture, layer = entry
        rows = capture.rows
        if full is not None:
            probs = full if rows is None else full.index_select(2, rows.to(full.device))
        else:
            probs = row_probabilities(query.detach(), key.detach(), attention_mask, rows, scaling, softcap)
        capture.seen.add(layer)
        capture.callback(layer, module, probs.detach(), rows)
    return out, None


class RowCapture:
    """Context manager like :class:`AttentionCapture`, without eager: ``callback(layer, module, probs, rows)``.

    Set ``rows`` (a sorted (R,) tensor of query positions, or None for all) before each forward; ``probs`` is
    (B, H, R, T). Entering switches the model to this attention function and back on exit.
    """

    def __init__(self, model: torch.nn.Module, callback) -> None:
        self.model, self.callback = model, callback
        self.modules = find_attention_modules(model)
        self.rows: torch.Tensor | None = None
        self.seen: set[int] = set()
        self._previous = getattr(model.config, "_attn_implementation", None)

    def __enter__(self) -> Self:
        if not hasattr(self.model, "set_attn_implementation"):
            raise RowsUnavailable(f"{type(self.model).__name__} cannot change its attention implementation")
        _register()
        try:
            self.model.set_attn_implementation(NAME)
        except (ValueError, ImportError, NotImplementedError, KeyError) as err:
            raise RowsUnavailable(f"{type(self.model).__name__} refuses a custom attention function ({err})") from None
        for layer, (_, module, _) in enumerate(self.modules):
            _ACTIVE[id(module)] = (self, layer)
        return self

    def __exit__(self, *exc) -> None:
        for _, module, _ in self.modules:
            _ACTIVE.pop(id(module), None)
        if self._previous is not None:
            self.model.set_attn_implementation(self._previous)

    def check_complete(self) -> None:
        missing = sorted(set(range(len(self.modules))) - self.seen)
        if missing:
            raise RowsUnavailable(f"attention layers {missing} of {type(self.model).__name__} do not use transformers' AttentionInterface")

