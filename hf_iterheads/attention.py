"""Where the iteration-head circuit looks, and how much attention lands there (paper section 7).

For a CoT sequence of length L with ``<eoi>`` at index ``e = L + 1`` (task token at 0, ``x_t`` at ``t``):

* ``attn0[t]``: layer-1 attention from query ``e + t`` (the position holding ``s_t``) to key ``e`` (EoI);
* ``attn1[t]``: layer-2 attention from query ``e + t - 1`` (the position predicting ``s_t``; EoI predicts
  ``s_1``) to key ``t`` (``x_t``) -- the iteration head.

Peakiness is the share of (sequence, t) pairs whose attention exceeds 0.5; the mean mass is reported
beside it. Position pairs are given per sequence as index tensors of shape (B, P) padded with -1, so a
batch may mix lengths and renderings (the detector's text probes put x_t wherever the tokenizer did).
"""

from __future__ import annotations

import torch

from .errors import IterHeadsError

PEAK_THRESHOLD = 0.5


def circuit_pairs(length: int, offset: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(queries, keys) for the native CoT layout of one length; ``offset`` shifts for leading tokens (BOS).

    Keys ``attn1``/``attn0`` are the circuit; ``prev``/``next`` (x_{t-1}, x_{t+1}) are controls, -1 where
    that input does not exist.
    """
    t = torch.arange(1, length + 1)
    e = length + 1
    pred = e + t - 1
    prev = torch.where(t > 1, t - 1, -1)
    nxt = torch.where(t < length, t + 1, -1)
    sh = lambda x: torch.where(x >= 0, x + offset, -1)  # noqa: E731
    return {
        "attn1": (sh(pred), sh(t)),
        "attn0": (sh(e + t), sh(torch.full_like(t, e))),
        "prev": (sh(pred), sh(prev)),
        "next": (sh(pred), sh(nxt)),
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
    rows = probs.gather(2, q[:, None, :, None].expand(b, h, -1, probs.shape[-1]))  # (B, H, P, T)
    mass = rows.gather(3, k[:, None, :, None].expand(b, h, -1, 1)).squeeze(-1)
    return mass * valid.to(probs.device)[:, None, :], valid


def summarize(mass: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean mass, peakiness) per head, averaged over every valid (sequence, pair): shapes (H,)."""
    n = valid.sum().clamp(min=1)
    v = valid.to(mass.device)[:, None, :]
    mean = (mass * v).sum(dim=(0, 2)) / n
    peak = ((mass > PEAK_THRESHOLD) & v).sum(dim=(0, 2)) / n
    return mean, peak


def eager_attentions(model, **inputs) -> tuple[torch.Tensor, ...]:
    """Per-layer attention probabilities (B, H, T, T) of a small model; never silently empty.

    Under sdpa/flash attention transformers returns no weights, so the model is switched to eager for
    the call and switched back afterwards.
    """
    previous = getattr(model.config, "_attn_implementation", None)
    if previous != "eager":
        model.set_attn_implementation("eager")
    try:
        out = model(**inputs, output_attentions=True)
    finally:
        if previous not in (None, "eager"):
            model.set_attn_implementation(previous)
    attentions = getattr(out, "attentions", None)
    if not attentions or any(a is None for a in attentions):
        raise IterHeadsError(f"{type(model).__name__} returned no attention weights, even with eager attention")
    return attentions


# --- scalable capture: score inside each layer's own attention call, then drop the pattern ---------------

_PROJECTION_NAMES = ("o_proj", "c_proj", "dense", "out_proj")


def _recorder_specs(model: torch.nn.Module) -> list[tuple[type | None, str | None, int, str | None]]:
    """(class, class-name suffix, output index, layer name) for ``attentions`` from transformers' own registry.

    transformers 5 declares on each model class where its attention weights come from
    (``_can_record_outputs["attentions"]``); reading it finds the right module in any architecture,
    including ones whose attention class is not called ``*Attention``.
    """
    specs = []
    for module in model.modules():
        record = getattr(type(module), "_can_record_outputs", None) or {}
        entries = record.get("attentions")
        if entries is None:
            continue
        for spec in entries if isinstance(entries, list) else [entries]:
            if isinstance(spec, str):
                specs.append((None, spec, 1, None))
            elif isinstance(spec, type):
                specs.append((spec, None, 1, None))
            else:  # OutputRecorder
                specs.append((spec.target_class, spec.class_name, spec.index, spec.layer_name))
    return specs


def find_attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, int]]:
    """Every self-attention module in layer order, as (qualified name, module, index of the weights in its output).

    Uses the model's declared recorder first; falls back to the outermost modules whose class name ends
    in ``Attention`` (remote-code and older models), whose eager forward returns ``(output, weights, ...)``.
    """
    found: list[tuple[str, torch.nn.Module, int]] = []
    for cls, suffix, index, layer_name in _recorder_specs(model):
        for name, module in model.named_modules():
            if (cls is None or not isinstance(module, cls)) and (suffix is None or not name.endswith(suffix)):
                continue
            if layer_name is not None and f".{layer_name.strip('.')}." not in f".{name}.":
                continue
            if "cross" in name.lower():
                continue
            found.append((name, module, index))
        if found:
            break
    if not found:
        names = [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("Attention")]
        outer = [(n, m) for n, m in names if not any(n.startswith(p + ".") for p, _ in names if p != n)]
        found = [(n, m, 1) for n, m in outer if "cross" not in n.lower()]
    if not found:
        raise IterHeadsError(f"found no attention modules in {type(model).__name__}; it cannot be probed")
    seen, unique = set(), []
    for item in found:
        if id(item[1]) not in seen:
            seen.add(id(item[1]))
            unique.append(item)
    return unique


def find_output_projection(attention: torch.nn.Module) -> torch.nn.Module:
    """The attention's output projection (``o_proj`` / ``c_proj`` / ``dense`` / ``out_proj``): its input holds the heads side by side."""
    for name in _PROJECTION_NAMES:
        proj = getattr(attention, name, None)
        if isinstance(proj, torch.nn.Module):
            return proj
    raise IterHeadsError(
        f"{type(attention).__name__} has no output projection named {', '.join(_PROJECTION_NAMES)}; cannot ablate its heads"
    )


def head_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(query heads, key/value heads) per layer from the config; KV heads differ under GQA/MQA."""
    cfg = model.config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    n_heads = next((getattr(cfg, k) for k in ("num_attention_heads", "n_head", "num_heads") if getattr(cfg, k, None)), None)
    if n_heads is None:
        raise IterHeadsError(f"cannot read the number of attention heads from {type(cfg).__name__}")
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    if getattr(cfg, "multi_query", False):
        n_kv = 1
    return int(n_heads), int(n_kv)


class AttentionCapture:
    """Context manager: eager attention + a forward hook per layer that hands ``(layer, probs)`` to ``callback``.

    The weights are produced by each model's own eager attention (softcap, sliding windows, custom scaling
    and GQA stay exactly right); the callback reads what it needs and the tensor is dropped when the layer
    returns, so at most one layer's (B, H, T, T) pattern is alive at a time. A layer that gives no
    weights raises instead of silently returning nothing.
    """

    def __init__(self, model: torch.nn.Module, callback) -> None:
        self.model, self.callback = model, callback
        self.modules = find_attention_modules(model)
        self.seen: set[int] = set()
        self._handles: list = []
        self._previous = None

    def _hook(self, layer: int, index: int):
        def hook(module, args, output):
            weights = output[index] if isinstance(output, (tuple, list)) and len(output) > index else None
            if not isinstance(weights, torch.Tensor) or weights.dim() != 4:
                raise IterHeadsError(
                    f"{type(self.model).__name__}: attention layer {layer} ({type(module).__name__}) returned no "
                    "attention weights even with eager attention; this model cannot be probed"
                )
            self.seen.add(layer)
            self.callback(layer, module, weights.detach())

        return hook

    def __enter__(self) -> "AttentionCapture":
        self._previous = getattr(self.model.config, "_attn_implementation", None)
        if self._previous != "eager" and hasattr(self.model, "set_attn_implementation"):
            try:
                self.model.set_attn_implementation("eager")
            except (ValueError, ImportError, NotImplementedError) as err:
                raise IterHeadsError(f"{type(self.model).__name__} cannot switch to eager attention: {err}") from err
        for layer, (_, module, index) in enumerate(self.modules):
            self._handles.append(module.register_forward_hook(self._hook(layer, index)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._previous not in (None, "eager") and hasattr(self.model, "set_attn_implementation"):
            self.model.set_attn_implementation(self._previous)

    def check_complete(self) -> None:
        missing = sorted(set(range(len(self.modules))) - self.seen)
        if missing:
            raise IterHeadsError(f"attention layers {missing} never ran; no weights were captured for them")
