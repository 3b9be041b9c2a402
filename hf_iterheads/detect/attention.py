"""Attention capture in any causal LM: find its attention layers, and score each layer's probabilities
inside the model's own attention code, then drop them (the circuit's pairs and scores: ``circuit.py``)."""

from __future__ import annotations

import torch

from ..circuit import eager_attention
from ..errors import IterHeadsError

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
        self._eager = eager_attention(model)

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

    def __enter__(self) -> AttentionCapture:
        self._eager.__enter__()
        for layer, (_, module, index) in enumerate(self.modules):
            self._handles.append(module.register_forward_hook(self._hook(layer, index)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._eager.__exit__(*exc)

    def check_complete(self) -> None:
        missing = sorted(set(range(len(self.modules))) - self.seen)
        if missing:
            raise IterHeadsError(f"attention layers {missing} never ran; no weights were captured for them")
