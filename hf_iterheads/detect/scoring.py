"""Per-head scores: every head pattern's attention mass, reduced layer by layer inside the capture.

Probabilities are computed row-sliced beside the model's fast attention (:mod:`.rows`), or inside its own eager
attention where that cannot work (:mod:`.attention`), and reduced to sums per probe and head as each layer
runs, so memory never holds layers x heads x T x T. Probes sharing a token prefix compute it once
(:class:`.runner.CaptureRun`); with ``sequential`` the probes run in rounds until every verdict is settled
(:mod:`.sequential`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..circuit import PEAK_THRESHOLD
from ..errors import IterHeadsError
from .attention import find_attention_modules, head_counts
from .batching import (
    PackingUnavailable,
    Where,
    check_packed,
    joint_batches,
    packed_inputs,
    query_rows,
    read_lens,
    rounds,
    shared_prefix,
    stack_inputs,
)
from .criteria import CAPTURES
from .patterns import HeadPattern, resolve_patterns
from .probes import Probes
from .rows import RowsUnavailable
from .runner import CaptureRun
from .sequential import Sequential, needed, next_round, settled_from


def _visible(q: torch.Tensor, window: int | None) -> torch.Tensor:
    """Keys a query at position q sees under right padding: 0..q, or its sliding window."""
    visible = (q + 1).clamp(min=1).double()
    return visible.clamp(max=window) if window else visible


def _window(module, config) -> int | None:
    if hasattr(module, "sliding_window"):
        return module.sliding_window or None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    value = getattr(config, "sliding_window", None)
    return value if isinstance(value, int) and value > 0 else None


class _Accumulator:
    """Sums per probe, layer and head for every pattern, filled by the capture hook; the attention is never kept.

    Per-probe sums let :mod:`.sequential` put a confidence interval on each score; peakiness and entropy, which
    no verdict reads, are summed over probes directly. Each layer keeps its own count of (probe, pair)s: a
    sequential run stops running layers whose verdicts are all settled, so deeper layers may see fewer probes.
    """

    def __init__(self, n_probes: int, n_layers: int, n_heads: int, patterns: list[HeadPattern]) -> None:
        self.patterns, self.n_heads, self.shape = patterns, n_heads, (n_layers, n_heads)
        names = [p.name for p in patterns]
        self.mass = {k: np.zeros((n_probes, n_layers, n_heads)) for k in names}
        self.count = {k: np.zeros(n_probes) for k in names}
        self.layer_count = {k: np.zeros(n_layers) for k in names}
        self.chance = {k: np.zeros((n_probes, n_layers)) for k in names}
        self.peak = {k: np.zeros((n_layers, n_heads)) for k in names}
        self.entropy = {k: np.zeros((n_layers, n_heads)) for k in names}
        self.pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.idx = np.zeros(0, dtype=np.int64)

    def rows(self, where: Where | None = None) -> torch.Tensor:
        """Sorted query coordinates any pattern reads in this batch: the only rows row-sliced capture computes."""
        shift = 0 if where is None else where[1].cpu()[:, None]
        qs = [(q + shift)[q >= 0] for q, _ in self.pairs.values()]
        return torch.unique(torch.cat(qs)) if qs else torch.zeros(0, dtype=torch.long)

    def add(self, layer: int, weights: torch.Tensor, window: int | None, rows: torch.Tensor | None = None,
            where: Where | None = None) -> None:
        """``weights`` (B, H, Q or R, T), R the query coordinates ``rows``. Probe i of this batch is batch row
        ``where[0][i]``; its position t is query coordinate t + ``where[1][i]`` and key t + ``where[2][i]`` (a cached
        prefix, or probes packed into one row). None: probe i is row i, unshifted."""
        if weights.shape[1] != self.n_heads:
            raise IterHeadsError(f"layer {layer} gave {weights.shape[1]} heads, expected {self.n_heads}")
        dev = weights.device
        if where is None:
            zero = torch.zeros(len(self.idx), dtype=torch.long)
            where = (torch.arange(len(self.idx)), zero, zero)
        row, qs, ks = (t.to(dev) for t in where)
        lookup = None
        if rows is not None:
            rows = rows.to(dev)
            lookup = torch.full((int(rows.max()) + 1 if len(rows) else 1,), -1, dtype=torch.long, device=dev)
            lookup[rows] = torch.arange(len(rows), device=dev)
        ent = None  # (B, H, rows) entropy of every captured row, computed once for all patterns that read it
        if any(p.entropy for p in self.patterns):
            w = weights.float()
            ent = -torch.special.xlogy(w, w).sum(-1)
        heads = torch.arange(self.n_heads, device=dev)[None, :, None]
        for p in self.patterns:
            q, k = self.pairs[p.name]
            qr = torch.where(q >= 0, q + qs[:, None], -1)
            qr = qr if lookup is None else torch.where(qr >= 0, lookup[qr.clamp(min=0)], -1)
            valid = (qr >= 0) & (k >= 0)
            at = (row[:, None, None], heads, qr.clamp(min=0)[:, None, :])
            m = weights[(*at, (k + ks[:, None]).clamp(min=0)[:, None, :])] * valid[:, None, :]  # (B, H, P)
            self._add_pattern(p, layer, None if ent is None else ent[at], q, m.float(), valid, window)

    def _add_pattern(self, p: HeadPattern, layer: int, entropy, q, m, valid, window) -> None:
        v = valid.to(m.device)[:, None, :]
        self.mass[p.name][self.idx, layer] += (m * v).sum(2).double().cpu().numpy()
        self.peak[p.name][layer] += ((m > PEAK_THRESHOLD) & v).sum((0, 2)).double().cpu().numpy()
        if layer == 0:
            self.count[p.name][self.idx] += valid.sum(1).cpu().numpy()
        self.layer_count[p.name][layer] += float(valid.sum())
        if not (p.baseline or p.entropy):
            return
        visible = _visible(q, window)
        self.chance[p.name][self.idx, layer] += ((1.0 / visible) * valid).sum(1).cpu().numpy()
        if p.entropy:
            ent = entropy  # (B, H, P) nats
            norm = visible.log().to(ent.device, torch.float32)[:, None, :]
            ent = torch.where(norm > 0, ent / norm.clamp(min=1e-12), torch.zeros_like(ent))  # one visible key: 0
            self.entropy[p.name][layer] += (ent * v).sum((0, 2)).double().cpu().numpy()

    def total(self, name: str) -> np.ndarray:
        """(n_layers, 1): the (probe, pair)s each layer has seen."""
        return np.maximum(self.layer_count[name], 1.0)[:, None]

    def scores(self, patterns: list[HeadPattern]) -> dict[str, np.ndarray]:
        """Means over every valid (probe, pair) each layer saw: the tables of scores.json."""
        out: dict[str, np.ndarray] = {}
        for p in patterns:
            n = self.total(p.name)
            out[p.key("score")] = self.mass[p.name].sum(0) / n
            if p.peakiness:
                out[p.key("peakiness")] = self.peak[p.name] / n
            if p.entropy:
                out[p.key("entropy")] = self.entropy[p.name] / n
            if p.baseline:
                out[p.key("baseline")] = np.repeat(self.chance[p.name].sum(0)[:, None] / n, self.n_heads, 1)
        return out


@torch.no_grad()
def score_heads(
    model,
    probes: Probes,
    batch_size: int = 16,
    patterns: list[HeadPattern | str] | None = None,
    capture: str = "auto",
    stop_early: bool = True,
    sequential: Sequential | bool | None = None,
    prefix_cache: bool = True,
    pack: bool = True,
) -> dict[str, Any]:
    """Per-head scores of every pattern on ``probes``; every array is (n_layers, n_heads).

    ``capture``: ``rows`` (the model's fast attention, probabilities for the probe rows only), ``eager`` (each
    model's own eager attention) or ``auto`` (rows, eager where rows cannot work). ``capture`` and
    ``capture_note`` in the result say which ran and why. ``stop_early=False`` runs the layers after the last
    attention and the LM head anyway (only to compare speed). ``sequential`` (True or a :class:`Sequential`)
    stops once every verdict is settled: ``probes_used`` (per head) and ``n_probes_run`` say how many probes
    each verdict and the run used. ``prefix_cache=False`` recomputes shared prefixes and ``pack=False`` pads
    probes rather than packing them end to end in row-sliced capture (both only to compare).
    """
    return score_sets(model, [probes], batch_size, patterns, capture, stop_early, sequential, prefix_cache, pack)[0]


@torch.no_grad()
def score_sets(
    model,
    sets: list[Probes],
    batch_size: int = 16,
    patterns: list[HeadPattern | str] | None = None,
    capture: str = "auto",
    stop_early: bool = True,
    sequential: Sequential | bool | None = None,
    prefix_cache: bool = True,
    pack: bool = True,
) -> list[dict[str, Any]]:
    """:func:`score_heads` of several probe sets (one per template) at once: one result per set, each as if scored
    alone (within float tolerance), but the sets' probes share forwards wherever they share a cached prefix and
    their depth, so a round of every template can be one set of forwards. Each set settles its verdicts on its
    own. ``pack``: bare probes run packed end to end (see :mod:`.batching`), padded where the model's mask does
    not keep them apart."""
    if capture not in CAPTURES:
        raise IterHeadsError(f"unknown capture {capture!r}; use {', '.join(CAPTURES)}")
    patterns = resolve_patterns(patterns)
    rule = Sequential() if sequential is True else (sequential or None)
    args = (model, list(sets), batch_size, patterns, stop_early, rule, prefix_cache)
    note = None
    if capture in ("auto", "rows"):
        try:
            try:
                found = _score_sets(*args, "rows", pack=pack)
            except PackingUnavailable:  # this model lets packed probes see each other: pad them instead
                found = _score_sets(*args, "rows")
            return [{**s, "capture": "rows", "capture_note": None} for s in found]
        except RowsUnavailable as err:
            if capture == "rows":
                raise IterHeadsError(f"row-sliced capture does not work for {type(model).__name__}: {err}") from None
            note = f"row-sliced capture unavailable ({err}); used eager attention"
    return [{**s, "capture": "eager", "capture_note": note} for s in _score_sets(*args, "eager")]


class _SetRun:
    """One probe set's state in a joint run: its accumulator, its rounds, and how deep its open verdicts reach."""

    def __init__(self, probes: Probes, shape: tuple[int, int], patterns: list[HeadPattern], rule: Sequential | None,
                 batch_size: int, stop_after: int, prefix_cache: bool, stop_early: bool) -> None:
        self.probes, self.patterns, self.rule, self.batch_size = probes, patterns, rule, batch_size
        self.acc = _Accumulator(len(probes), shape[0], shape[1], patterns)
        queries = query_rows(probes, patterns)  # computed once: the shared prefix ends before them, each probe after them
        self.prefix = shared_prefix(probes, queries, prefix_cache)
        self.lens = read_lens(probes, queries) if stop_early else probes.seq_lens
        self.stop_after, self.stop_early = stop_after, stop_early
        self.used = np.zeros(shape, dtype=np.int64)
        self.ran = np.zeros(0, dtype=np.int64)
        self._rounds = rounds(probes, rule, batch_size)
        self.subset: np.ndarray | None = next(self._rounds)

    def share_key(self, run: CaptureRun) -> tuple[int, tuple[int, ...]]:
        """Sets with the same key share forwards: the same depth (a shared forward runs as deep as its deepest set,
        which costs the shallower set's probes more than a forward saves) and the same cached prefix tokens."""
        return self.stop_after, tuple(self.probes.input_ids[0, : run.usable(self.prefix)].tolist())

    def finish_round(self) -> None:
        """Record the round just run; settle verdicts (sequential) and draw the next round, or end (``subset`` None)."""
        self.ran = np.concatenate([self.ran, self.subset])
        size = None
        if self.rule is not None:
            need = needed(self.acc, self.patterns, self.ran, len(self.probes), self.rule, self.probes.lengths)
            done = settled_from(need, len(self.ran), self.rule)
            done[self.stop_after + 1 :] = True  # layers no longer run keep the verdicts they settled with
            self.used = np.where(done & (self.used > 0), self.used, np.where(done, len(self.ran), 0))
            if done.all():
                self.subset = None
                return
            if self.stop_early:  # later rounds stop after the deepest layer with a verdict still open
                self.stop_after = int(np.flatnonzero(~done.all(1)).max())
            size = next_round(need, done, len(self.ran), self.rule, self.batch_size)
        try:
            self.subset = self._rounds.send(size)
        except StopIteration:
            self.subset = None

    def result(self, n_heads: int, n_kv: int, prefix: int) -> dict[str, Any]:
        scores: dict[str, Any] = self.acc.scores(self.patterns)
        for name, arr in scores.items():
            if not np.isfinite(arr).all():
                raise IterHeadsError(f"{name} has non-finite values: the model's attention produced NaN/inf (try --dtype float32)")
        n_layers = self.acc.shape[0]
        scores["kv_group"] = np.tile(np.arange(n_heads) // max(1, n_heads // n_kv), (n_layers, 1))
        scores["n_kv_heads"] = n_kv
        scores["probes_used"] = np.where(self.used > 0, self.used, len(self.ran))
        scores["n_probes_run"] = len(self.ran)
        scores["probes_run"] = np.sort(self.ran)
        scores["prefix_tokens"] = prefix
        return scores


class _Forward:
    """The forward in flight: each set's probes in it (:data:`.batching.Where`) and, for the first packed forward,
    the sequence id of every token, to check that no probe's attention reaches another's."""

    def __init__(self) -> None:
        self.pieces: list[tuple[_SetRun, Where]] = []
        self.check: torch.Tensor | None = None
        self.checked = False


def _score_sets(model, sets: list[Probes], batch_size: int, patterns: list[HeadPattern], stop_early: bool,
                rule: Sequential | None, prefix_cache: bool, capture: str, pack: bool = False) -> list[dict[str, Any]]:
    n_layers = len(find_attention_modules(model))
    n_heads, n_kv = head_counts(model)
    windows: dict[int, int | None] = {}
    config = getattr(model.config, "get_text_config", lambda: model.config)()
    fwd = _Forward()

    def on_layer(layer, module, weights, rows=None):
        if layer not in windows:
            windows[layer] = _window(module, config)
        if fwd.check is not None:
            check_packed(weights, rows, fwd.check, type(model).__name__)
        for r, where in fwd.pieces:
            if layer <= r.stop_after:  # a set whose deeper verdicts are settled keeps their scores
                r.acc.add(layer, weights, windows[layer], rows, where)

    last = n_layers - 1 if stop_early else n_layers
    runs = [_SetRun(p, (n_layers, n_heads), patterns, rule, batch_size, last, prefix_cache, stop_early) for p in sets]
    with CaptureRun(model, capture, on_layer, last) as run:
        while active := [r for r in runs if r.subset is not None]:
            groups: dict[tuple, list[_SetRun]] = {}
            for r in active:
                groups.setdefault(r.share_key(run), []).append(r)
            for key, group in groups.items():
                packed = pack and run.packable and not key[1]  # a cached prefix cannot be shared inside a packed row
                for batch in joint_batches([(r.lens, r.subset) for r in group], batch_size, split=not packed):
                    _run_batch(run, fwd, [(group[i], idx) for i, idx in batch], len(key[1]), capture, packed)
            for r in active:
                r.finish_round()
    return [r.result(n_heads, n_kv, run.usable(r.prefix)) for r in runs]


def _score(model, probes: Probes, batch_size: int, patterns: list[HeadPattern], stop_early: bool,
           rule: Sequential | None, prefix_cache: bool, capture: str) -> dict[str, Any]:
    """One set through :func:`_score_sets` (kept for callers of the single-set form)."""
    return _score_sets(model, [probes], batch_size, patterns, stop_early, rule, prefix_cache, capture)[0]


def _run_batch(run: CaptureRun, fwd: _Forward, batch: list[tuple[_SetRun, np.ndarray]], cached: int, capture: str,
               packed: bool) -> None:
    """One forward of several sets' probes, each cut at the last position its patterns read (plus one): packed end
    to end, or right-padded (after a ``cached`` prefix)."""
    for r, idx in batch:
        r.acc.idx = idx
        r.acc.pairs = {p.name: tuple(t.to(run.device) for t in p.checked_pairs(r.probes, idx)) for p in r.patterns}
    pieces = [(r.probes, idx, r.lens) for r, idx in batch]
    if packed:
        inputs, where, seq = packed_inputs(pieces)
        fwd.check = None if fwd.checked else seq.to(run.device)
    else:
        inputs, where = stack_inputs(pieces, cached)
    fwd.pieces = [(r, w) for (r, _), w in zip(batch, where)]
    if capture == "rows":
        run.rows = torch.unique(torch.cat([r.acc.rows(w) for (r, _), w in zip(batch, where)]))
    run.stop_after = max(r.stop_after for r, _ in batch)
    run.forward(inputs["input_ids"], inputs.get("attention_mask"), cached, inputs.get("position_ids"))
    run.check_complete()
    fwd.checked, fwd.check = fwd.checked or packed, None


@torch.no_grad()
def attention_pattern(model, probes: Probes, index: int, layer: int, head: int, capture: str = "eager") -> np.ndarray:
    """One head's (T, T) pattern on one probe, for the picture; only that slice is kept (``capture``: rows or eager)."""
    kept: list[np.ndarray] = []

    def on_layer(l, module, weights, rows=None):
        if l == layer:
            kept.append(weights[0, head].float().cpu().numpy())

    batch = probes.batch(np.array([index]))
    with CaptureRun(model, capture, on_layer, stop_after=layer) as run:
        run.forward(batch["input_ids"], batch["attention_mask"])
    return kept[0]
