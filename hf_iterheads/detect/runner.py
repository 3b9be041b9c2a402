"""The capture runner: forwards that stop after the last layer they need, with a shared-prefix KV cache.

Every part of the detector that reads attention (scores, the picture of one head, gating cells) runs the model
the same way: inside a capture context (row-sliced or eager, :mod:`.rows` / :mod:`.attention`), stopping right
after the last attention layer it reads. Spelled once here.

Shared prefix: probes that begin with the same tokens (few-shot shots, a chat system turn, the template head)
compute those tokens once. The model is causal, so the keys and values of positions ``0..P-1`` depend on those
tokens alone; :class:`CaptureRun` computes them for one copy, keeps them in a transformers ``DynamicCache`` of
full (never window-trimmed) layers so key positions stay absolute, and runs only each probe's suffix. The
callback then sees query rows ``P..T-1`` against keys ``0..T-1``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Self

import torch

from .attention import AttentionCapture, find_attention_modules
from .rows import RowCapture

MIN_PREFIX = 4  # shorter shared prefixes cost more (one more forward, cache bookkeeping) than they save


class _StopForward(Exception):
    """Raised after the last attention layer needed: the rest of the model (and its LM head) is not run."""


def forward_params(model) -> set[str]:
    """Keyword arguments ``model.forward`` accepts (models differ: ``logits_to_keep``, ``use_cache``)."""
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def capture_runner(model, capture: str, on_layer):
    """The capture context for ``capture`` (``rows``: the model's fast attention, else eager), calling
    ``on_layer(layer, module, weights, rows=None)`` for every attention layer."""
    if capture == "rows":
        return RowCapture(model, on_layer)
    return AttentionCapture(model, lambda layer, module, weights: on_layer(layer, module, weights))


def common_prefix(input_ids: torch.Tensor, seq_lens, limit: int) -> int:
    """Length of the token prefix every row shares, at most ``limit`` and shorter than every row."""
    if len(input_ids) == 0:
        return 0
    width = min(int(min(seq_lens)) - 1, int(limit), input_ids.shape[1])
    if width <= 0:
        return 0
    same = (input_ids[:, :width] == input_ids[:1, :width]).all(0)
    differs = torch.nonzero(~same)
    return int(differs[0]) if len(differs) else width


class CaptureRun:
    """A capture context whose forwards stop after layer ``stop_after`` and may start from a cached prefix.

    ``on_layer(layer, module, weights, rows)`` sees each layer's probabilities; their query dimension starts at
    the forward's first uncached token (absolute position ``prefix``, 0 without one). Set ``rows`` (query rows
    counted from there) before a forward for row-sliced capture.
    """

    def __init__(self, model, capture: str, on_layer: Callable, stop_after: int | None = None) -> None:
        self.model, self.on_layer = model, on_layer
        self.n_layers = len(find_attention_modules(model))
        self.stop_after = self.n_layers - 1 if stop_after is None else stop_after
        self.device = model_device(model)
        params = forward_params(model)
        self.kwargs: dict[str, Any] = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        # transformers 5.2x names the KV cache argument ``cache``; earlier releases ``past_key_values``
        self.cache_arg = next((a for a in ("cache", "past_key_values") if a in params), None)
        self.cacheable = self.cache_arg is not None and "use_cache" in params
        self.packable = capture == "rows" and "position_ids" in params  # packed rows need the fast path's own mask
        if "use_cache" in params:  # a KV cache would hold every layer's keys and values: memory grows with depth
            self.kwargs["use_cache"] = False
        self._filling = False
        self._prefixes: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._runner = capture_runner(model, capture, self._layer)

    @property
    def rows(self) -> torch.Tensor | None:
        return getattr(self._runner, "rows", None)

    @rows.setter
    def rows(self, value: torch.Tensor | None) -> None:
        if hasattr(self._runner, "rows"):
            self._runner.rows = value

    def __enter__(self) -> Self:
        self._runner.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._runner.__exit__(*exc)

    def check_complete(self) -> None:
        self._runner.check_complete()

    def _layer(self, layer, module, weights, rows=None) -> None:
        if not self._filling:
            self.on_layer(layer, module, weights, rows)
        if layer >= self.stop_after:
            raise _StopForward  # the rest of the model (later layers, norm, LM head) changes nothing read here

    def _call(self, **inputs) -> None:
        try:
            self.model(**inputs)
        except _StopForward:
            pass

    def usable(self, prefix: int) -> int:
        """The prefix a forward will really take from the cache: 0 when too short to pay or the model takes no cache."""
        return prefix if prefix >= MIN_PREFIX and self.cacheable else 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, prefix: int = 0,
                position_ids: torch.Tensor | None = None) -> None:
        """One forward of a right-padded batch; the first ``prefix`` tokens (shared by every row) come from the cache.
        With ``position_ids`` and no mask, rows hold probes packed end to end (positions restart at each probe)."""
        if position_ids is not None:
            self._call(input_ids=input_ids.to(self.device), position_ids=position_ids.to(self.device), **self.kwargs)
            return
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        prefix = self.usable(prefix)
        if not prefix:
            self._call(input_ids=input_ids, attention_mask=attention_mask, **self.kwargs)
            return
        from transformers import DynamicCache

        layers = self._prefix_cache(input_ids[0, :prefix])
        b = input_ids.shape[0]
        cache = DynamicCache([(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in layers])
        self._call(input_ids=input_ids[:, prefix:], attention_mask=attention_mask, **{self.cache_arg: cache},
                   **{**self.kwargs, "use_cache": True})

    def _prefix_cache(self, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of ``ids`` per layer up to ``stop_after``, computed once per distinct prefix (again only
        when a forward needs deeper layers than the cached ones)."""
        key = tuple(ids.tolist())
        if key not in self._prefixes or len(self._prefixes[key]) < min(self.stop_after + 1, self.n_layers):
            from transformers import DynamicCache

            cache = DynamicCache()  # full layers only: a sliding layer would trim keys and shift their positions
            self._filling, rows = True, self.rows
            self.rows = torch.zeros(0, dtype=torch.long)  # row-sliced capture computes no probabilities for the prefix
            try:
                self._call(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], **{self.cache_arg: cache},
                           **{**self.kwargs, "use_cache": True})
            finally:
                self._filling, self.rows = False, rows
            self._prefixes = {key: [(layer.keys, layer.values) for layer in cache.layers[: self.stop_after + 1]]}
        return self._prefixes[key]
