"""Which probes share a forward: rounds, length batches, and probe sets (templates) run together.

The linear layers' cost follows the padded tokens of a forward, and every forward costs a fixed amount on top
(each weight is read from memory once, each layer is called once): about what ``FORWARD_TOKENS`` tokens cost.
So bare probes are packed end to end into a few short rows (no padding, one forward per round); where they
are padded, probes of similar length share a batch and a batch whose lengths are spread runs as two only when
that saves more padding than a forward costs; and the probes of several sets (one per template) fill the same
forwards when they share their cached prefix and their depth, so a small round of each does not pay a forward
of its own.
"""

from __future__ import annotations

import numpy as np
import torch

from .patterns import HeadPattern
from .probes import Probes
from .runner import common_prefix
from .sequential import Sequential, probe_order

FORWARD_TOKENS = 32  # a forward's fixed cost in tokens' worth of work: benchmarks/detector_speed.py measures it per model


def rounds(probes: Probes, rule: Sequential | None, batch_size: int):
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


def query_rows(probes: Probes, patterns: list[HeadPattern]) -> list[torch.Tensor]:
    """Every pattern's (probes, pairs) query positions over all probes (-1: no pair)."""
    every = np.arange(len(probes))
    return [p.checked_pairs(probes, every)[0] for p in patterns]


def read_lens(probes: Probes, queries: list[torch.Tensor]) -> np.ndarray:
    """Per probe, the tokens a forward must run: up to the last query row any pattern reads. The model is causal,
    so the tokens after it (the last state, a template's tail) change nothing read here."""
    last = np.full(len(probes), -1, dtype=np.int64)
    for q in queries:
        if q.numel():
            last = np.maximum(last, q.max(1).values.numpy())
    return np.where(last >= 0, np.minimum(last + 1, probes.seq_lens), probes.seq_lens)


def shared_prefix(probes: Probes, queries: list[torch.Tensor], enabled: bool) -> int:
    """Tokens every probe shares before any query a pattern reads (0: nothing worth caching)."""
    if not enabled or len(probes) < 2:
        return 0
    rows = [q[q >= 0] for q in queries]
    first = min((int(q.min()) for q in rows if len(q)), default=0)
    return common_prefix(probes.input_ids, probes.seq_lens, first)


def length_batches(lens: np.ndarray, subset: np.ndarray, batch_size: int, split: bool = True):
    """Batches of ``subset`` with similar token counts ``lens`` (little padding), longest first. A batch whose
    lengths are spread (a sequential round draws every length) runs as two, cut where padding costs least, when
    that pads at least ``FORWARD_TOKENS`` fewer tokens than one forward (and ``split``: packed rows pad nothing)."""
    order = subset[np.argsort(-lens[subset], kind="stable")]
    for i in range(0, len(order), max(1, int(batch_size))):
        chunk = order[i : i + batch_size]
        sizes = lens[chunk]
        padded = np.arange(1, len(chunk)) * sizes[0] + (len(chunk) - np.arange(1, len(chunk))) * sizes[1:]
        if split and len(chunk) > 1 and len(chunk) * sizes[0] - padded.min() >= FORWARD_TOKENS:
            cut = int(np.argmin(padded)) + 1
            yield np.sort(chunk[:cut])
            yield np.sort(chunk[cut:])
        else:
            yield np.sort(chunk)


def joint_batches(parts: list[tuple[np.ndarray, np.ndarray]], batch_size: int, split: bool = True):
    """Length batches over several sets' probes at once: ``parts`` is one (lens, subset) per set; each batch is a
    list of (set, probe indices), every set at most once, in set order."""
    owner = np.concatenate([np.full(len(s), i) for i, (_, s) in enumerate(parts)]).astype(np.int64)
    probe = np.concatenate([s for _, s in parts]).astype(np.int64)
    lens = np.concatenate([lens[s] for lens, s in parts]).astype(np.int64)
    for items in length_batches(lens, np.arange(len(probe)), batch_size, split):
        yield [(i, np.sort(probe[items[owner[items] == i]])) for i in np.unique(owner[items])]


Where = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # per probe: batch row, query shift, key shift


def stack_inputs(pieces: list[tuple[Probes, np.ndarray, np.ndarray]], cached: int = 0) -> tuple[dict[str, torch.Tensor], list[Where]]:
    """One right-padded batch of several sets' probes (``pieces``: probes, indices, tokens to run per probe), cut
    at the longest; padding is token 0, masked out. Queries start after the ``cached`` prefix tokens."""
    width = max(int(lens[idx].max()) for _, idx, lens in pieces)
    ids, mask, where, start = [], [], [], 0
    for probes, idx, _ in pieces:
        batch = probes.batch(idx)
        pad = width - min(batch["input_ids"].shape[1], width)
        ids.append(torch.nn.functional.pad(batch["input_ids"][:, :width], (0, pad)))
        mask.append(torch.nn.functional.pad(batch["attention_mask"][:, :width], (0, pad)))
        n = len(idx)
        where.append((torch.arange(start, start + n), torch.full((n,), -cached), torch.zeros(n, dtype=torch.long)))
        start += n
    return {"input_ids": torch.cat(ids), "attention_mask": torch.cat(mask)}, where


PACK_TOKENS = 128  # a packed row holds about this many tokens (or one probe, if longer): row-sliced capture's
# probabilities grow with the square of a row, so short rows keep their cost near the padded batch's


def pack_rows(sizes: list[int], budget: int = PACK_TOKENS) -> list[list[int]]:
    """Items (by index) into the fewest rows of at most ``max(budget, largest)`` tokens that first fit (largest
    first) finds, the rows as even as it makes them, so the filler that evens the rows out stays small."""
    total, longest = sum(sizes), max(sizes)
    limit = max(budget, longest)
    count = -(-total // limit)
    while True:
        cap = max(longest, -(-total // count))
        while cap <= limit:
            rows = _first_fit(sizes, cap)
            if len(rows) <= count:
                return rows
            cap += max(1, longest // 8)
        count += 1  # each item alone always fits: count reaches len(sizes) at most


def _first_fit(sizes: list[int], cap: int) -> list[list[int]]:
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        j = next((j for j, r in enumerate(room) if r >= sizes[i]), None)
        if j is None:
            rows.append([]), room.append(cap)
            j = len(rows) - 1
        rows[j].append(i)
        room[j] -= sizes[i]
    return rows


def packed_inputs(pieces: list[tuple[Probes, np.ndarray, np.ndarray]]) -> tuple[dict[str, torch.Tensor], list[Where], torch.Tensor]:
    """Probes packed end to end into rows, no attention mask: each probe's positions restart at 0, which is how
    transformers tells packed sequences apart (a block-diagonal causal mask). A short row ends in a filler
    sequence repeating its last token. Returns the inputs, each piece's :data:`Where`, and (rows, T) sequence ids per token."""
    items = [(i, j, int(lens[j])) for i, (_, idx, lens) in enumerate(pieces) for j in idx]
    rows = pack_rows([t for _, _, t in items])
    width = max(sum(items[k][2] for k in r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    pos, seq = torch.zeros_like(ids), torch.full_like(ids, -1)
    place: dict[tuple[int, int], tuple[int, int]] = {}
    for b, r in enumerate(rows):
        start = 0
        for k in r:
            i, j, t = items[k]
            ids[b, start : start + t] = pieces[i][0].input_ids[j, :t]
            pos[b, start : start + t] = torch.arange(t)
            seq[b, start : start + t] = k
            place[(i, j)] = (b, start)
            start += t
        ids[b, start:] = ids[b, start - 1]  # the filler, a sequence of its own, repeats the row's last real token:
        pos[b, start:] = torch.arange(width - start)  # a pad id there would make transformers warn of padding
    where = []
    for i, (_, idx, _) in enumerate(pieces):
        b, start = (torch.tensor([place[(i, int(j))][c] for j in idx]) for c in (0, 1))
        where.append((b, start, start))
    return {"input_ids": ids, "position_ids": pos}, where, seq


class PackingUnavailable(RuntimeError):
    """Packed probes attend across each other in this model (its mask ignores position ids): pad them instead."""


def check_packed(weights: torch.Tensor, rows: torch.Tensor | None, seq: torch.Tensor, name: str) -> None:
    """Raise :class:`PackingUnavailable` when a captured row (B, H, R, T) puts attention on another sequence's keys."""
    rows = torch.arange(weights.shape[2], device=seq.device) if rows is None else rows.to(seq.device)
    other = seq[:, rows][:, :, None] != seq[:, None, : weights.shape[-1]]  # (B, R, T)
    if float((weights.float() * other[:, None]).amax()) > 1e-6:
        raise PackingUnavailable(f"{name} lets packed probes attend to each other")
