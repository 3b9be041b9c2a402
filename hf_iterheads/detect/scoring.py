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

from ..circuit import PEAK_THRESHOLD, mass_on
from ..errors import IterHeadsError
from .attention import find_attention_modules, head_counts
from .criteria import CAPTURES
from .patterns import HeadPattern, resolve_patterns
from .probes import Probes
from .rows import RowsUnavailable
from .runner import CaptureRun, common_prefix
from .sequential import Sequential, needed, next_round, probe_order, settled_from


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

    def rows(self) -> torch.Tensor:
        """Sorted query positions any pattern reads in this batch: the only rows row-sliced capture computes."""
        qs = [q[q >= 0] for q, _ in self.pairs.values()]
        return torch.unique(torch.cat(qs)) if qs else torch.zeros(0, dtype=torch.long)

    def add(self, layer: int, weights: torch.Tensor, window: int | None, rows: torch.Tensor | None = None, offset: int = 0) -> None:
        """``weights`` (B, H, Q or R, T): query rows from absolute position ``offset`` on, or only the rows ``rows``."""
        if weights.shape[1] != self.n_heads:
            raise IterHeadsError(f"layer {layer} gave {weights.shape[1]} heads, expected {self.n_heads}")
        lookup = None
        if rows is not None:
            rows = rows.to(weights.device)
            lookup = torch.full((int(rows.max()) + 1 if len(rows) else 1,), -1, dtype=torch.long, device=weights.device)
            lookup[rows] = torch.arange(len(rows), device=weights.device)
        for p in self.patterns:
            q, k = self.pairs[p.name]
            qr = torch.where(q >= 0, q - offset, -1)
            qr = qr if lookup is None else torch.where(qr >= 0, lookup[qr.clamp(min=0)], -1)
            m, valid = mass_on(weights, qr, k)
            self._add_pattern(p, layer, weights, q, qr, m.float(), valid, window)

    def _add_pattern(self, p: HeadPattern, layer: int, weights, q, qr, m, valid, window) -> None:
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
            b, h = weights.shape[:2]
            r = weights.gather(2, qr.clamp(min=0)[:, None, :, None].expand(b, h, -1, weights.shape[-1])).float()
            ent = -torch.special.xlogy(r, r).sum(-1)  # (B, H, P) nats
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
) -> dict[str, Any]:
    """Per-head scores of every pattern on ``probes``; every array is (n_layers, n_heads).

    ``capture``: ``rows`` (the model's fast attention, probabilities for the probe rows only), ``eager`` (each
    model's own eager attention) or ``auto`` (rows, eager where rows cannot work). ``capture`` and
    ``capture_note`` in the result say which ran and why. ``stop_early=False`` runs the layers after the last
    attention and the LM head anyway (only to compare speed). ``sequential`` (True or a :class:`Sequential`)
    stops once every verdict is settled: ``probes_used`` (per head) and ``n_probes_run`` say how many probes
    each verdict and the run used. ``prefix_cache=False`` recomputes shared prefixes (only to compare).
    """
    if capture not in CAPTURES:
        raise IterHeadsError(f"unknown capture {capture!r}; use {', '.join(CAPTURES)}")
    patterns = resolve_patterns(patterns)
    rule = Sequential() if sequential is True else (sequential or None)
    args = (model, probes, batch_size, patterns, stop_early, rule, prefix_cache)
    note = None
    if capture in ("auto", "rows"):
        try:
            return {**_score(*args, "rows"), "capture": "rows", "capture_note": None}
        except RowsUnavailable as err:
            if capture == "rows":
                raise IterHeadsError(f"row-sliced capture does not work for {type(model).__name__}: {err}") from None
            note = f"row-sliced capture unavailable ({err}); used eager attention"
    return {**_score(*args, "eager"), "capture": "eager", "capture_note": note}


def _rounds(probes: Probes, rule: Sequential | None, batch_size: int):
    """Probe indices in the order they run: one round (all) for a full run, else rounds of mixed lengths, the
    first ``max(min_probes, batch_size)`` long. The generator is sent each later round's size."""
    if rule is None:
        yield np.arange(len(probes))
        return
    order = probe_order(probes.lengths)
    start, size = 0, max(rule.min_probes, int(batch_size), 1)
    while start < len(order):
        subset = order[start : start + size]
        start += len(subset)
        size = (yield subset) or max(int(batch_size), 1)


SPLIT_SAVES = 0.1  # a batch is run as two when that pads this share of its tokens less


def _query_rows(probes: Probes, patterns: list[HeadPattern]) -> list[torch.Tensor]:
    """Every pattern's (probes, pairs) query positions over all probes (-1: no pair)."""
    every = np.arange(len(probes))
    return [p.checked_pairs(probes, every)[0] for p in patterns]


def _read_lens(probes: Probes, queries: list[torch.Tensor]) -> np.ndarray:
    """Per probe, the tokens a forward must run: up to the last query row any pattern reads. The model is causal,
    so the tokens after it (the last state, a template's tail) change nothing read here."""
    last = np.full(len(probes), -1, dtype=np.int64)
    for q in queries:
        if q.numel():
            last = np.maximum(last, q.max(1).values.numpy())
    return np.where(last >= 0, np.minimum(last + 1, probes.seq_lens), probes.seq_lens)


def _length_batches(lens: np.ndarray, subset: np.ndarray, batch_size: int):
    """Batches of ``subset`` with similar token counts ``lens`` (little padding), longest first. A batch whose
    lengths are spread (a sequential round draws every length) runs as two, cut where padding costs least, when that
    saves at least ``SPLIT_SAVES`` of its tokens: the linear layers' cost follows the padded tokens."""
    order = subset[np.argsort(-lens[subset], kind="stable")]
    for i in range(0, len(order), max(1, int(batch_size))):
        chunk = order[i : i + batch_size]
        sizes = lens[chunk]
        padded = np.arange(1, len(chunk)) * sizes[0] + (len(chunk) - np.arange(1, len(chunk))) * sizes[1:]
        if len(chunk) > 1 and padded.min() <= (1 - SPLIT_SAVES) * len(chunk) * sizes[0]:
            cut = int(np.argmin(padded)) + 1
            yield np.sort(chunk[:cut])
            yield np.sort(chunk[cut:])
        else:
            yield np.sort(chunk)


def _shared_prefix(probes: Probes, queries: list[torch.Tensor], enabled: bool) -> int:
    """Tokens every probe shares before any query a pattern reads (0: nothing worth caching)."""
    if not enabled or len(probes) < 2:
        return 0
    rows = [q[q >= 0] for q in queries]
    first = min((int(q.min()) for q in rows if len(q)), default=0)
    return common_prefix(probes.input_ids, probes.seq_lens, first)


def _score(model, probes: Probes, batch_size: int, patterns: list[HeadPattern], stop_early: bool,
           rule: Sequential | None, prefix_cache: bool, capture: str) -> dict[str, Any]:
    n_layers = len(find_attention_modules(model))
    n_heads, n_kv = head_counts(model)
    acc = _Accumulator(len(probes), n_layers, n_heads, patterns)
    windows: dict[int, int | None] = {}
    config = getattr(model.config, "get_text_config", lambda: model.config)()

    def on_layer(layer, module, weights, rows=None):
        if layer not in windows:
            windows[layer] = _window(module, config)
        acc.add(layer, weights, windows[layer], rows, run.offset)

    queries = _query_rows(probes, patterns)  # computed once: the shared prefix ends before them, each probe after them
    prefix = _shared_prefix(probes, queries, prefix_cache)
    lens = _read_lens(probes, queries) if stop_early else probes.seq_lens
    used = np.zeros(acc.shape, dtype=np.int64)
    ran = np.zeros(0, dtype=np.int64)
    rounds = _rounds(probes, rule, batch_size)
    with CaptureRun(model, capture, on_layer, None if stop_early else n_layers) as run:
        subset = next(rounds)
        while True:
            for idx in _length_batches(lens, subset, batch_size):
                _run_batch(run, acc, probes, idx, patterns, prefix, capture, int(lens[idx].max()))
            ran = np.concatenate([ran, subset])
            size = None
            if rule is not None:
                need = needed(acc, patterns, ran, len(probes), rule, probes.lengths)
                done = settled_from(need, len(ran), rule)
                done[run.stop_after + 1 :] = True  # layers no longer run keep the verdicts they settled with
                used = np.where(done & (used > 0), used, np.where(done, len(ran), 0))
                if done.all():
                    break
                if stop_early:  # later rounds stop after the deepest layer with a verdict still open
                    run.stop_after = int(np.flatnonzero(~done.all(1)).max())
                size = next_round(need, done, len(ran), rule, batch_size)
            try:
                subset = rounds.send(size)
            except StopIteration:
                break
    scores: dict[str, Any] = acc.scores(patterns)
    for name, arr in scores.items():
        if not np.isfinite(arr).all():
            raise IterHeadsError(f"{name} has non-finite values: the model's attention produced NaN/inf (try --dtype float32)")
    scores["kv_group"] = np.tile(np.arange(n_heads) // max(1, n_heads // n_kv), (n_layers, 1))
    scores["n_kv_heads"] = n_kv
    scores["probes_used"] = np.where(used > 0, used, len(ran))
    scores["n_probes_run"] = len(ran)
    scores["probes_run"] = np.sort(ran)
    scores["prefix_tokens"] = run.usable(prefix)
    return scores


def _run_batch(run: CaptureRun, acc: _Accumulator, probes: Probes, idx: np.ndarray, patterns, prefix: int, capture: str,
               width: int) -> None:
    """One batch through the capture, its tokens cut at ``width`` (the last position a pattern reads, plus one)."""
    device = run.device
    acc.idx = idx
    acc.pairs = {}
    for p in patterns:
        q, k = p.checked_pairs(probes, idx)
        acc.pairs[p.name] = (q.to(device), k.to(device))
    batch = {k: v[:, :width] for k, v in probes.batch(idx).items()}
    cached = run.usable(prefix)
    if capture == "rows":
        run.rows = acc.rows() - cached
    run.forward(batch["input_ids"], batch["attention_mask"], cached)
    run.check_complete()


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
