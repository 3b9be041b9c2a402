"""Which probes share a forward: rounds, length batches, and probe sets (templates) run together.

The linear layers' cost follows the padded tokens of a forward, and every forward costs a fixed amount on top
(each weight is read from memory once, each layer is called once): about what ``FORWARD_TOKENS`` tokens cost.
So probes of similar length share a batch, a batch whose lengths are spread runs as two only when that saves
more padding than a forward costs, and the probes of several sets (one per template) fill the same batches
when they share their cached prefix and their depth, so a small round of each does not pay a forward of its own.
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


def length_batches(lens: np.ndarray, subset: np.ndarray, batch_size: int):
    """Batches of ``subset`` with similar token counts ``lens`` (little padding), longest first. A batch whose
    lengths are spread (a sequential round draws every length) runs as two, cut where padding costs least, when
    that pads at least ``FORWARD_TOKENS`` fewer tokens than one forward."""
    order = subset[np.argsort(-lens[subset], kind="stable")]
    for i in range(0, len(order), max(1, int(batch_size))):
        chunk = order[i : i + batch_size]
        sizes = lens[chunk]
        padded = np.arange(1, len(chunk)) * sizes[0] + (len(chunk) - np.arange(1, len(chunk))) * sizes[1:]
        if len(chunk) > 1 and len(chunk) * sizes[0] - padded.min() >= FORWARD_TOKENS:
            cut = int(np.argmin(padded)) + 1
            yield np.sort(chunk[:cut])
            yield np.sort(chunk[cut:])
        else:
            yield np.sort(chunk)


def joint_batches(parts: list[tuple[np.ndarray, np.ndarray]], batch_size: int):
    """Length batches over several sets' probes at once: ``parts`` is one (lens, subset) per set; each batch is a
    list of (set, probe indices), every set at most once, in set order."""
    owner = np.concatenate([np.full(len(s), i) for i, (_, s) in enumerate(parts)]).astype(np.int64)
    probe = np.concatenate([s for _, s in parts]).astype(np.int64)
    lens = np.concatenate([lens[s] for lens, s in parts]).astype(np.int64)
    for items in length_batches(lens, np.arange(len(probe)), batch_size):
        yield [(i, np.sort(probe[items[owner[items] == i]])) for i in np.unique(owner[items])]


def stack_inputs(pieces: list[tuple[Probes, np.ndarray]], width: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of ``width`` tokens from several sets' probes (padding: token 0, masked out)."""
    ids, mask = [], []
    for probes, idx in pieces:
        batch = probes.batch(idx)
        pad = width - min(batch["input_ids"].shape[1], width)
        ids.append(torch.nn.functional.pad(batch["input_ids"][:, :width], (0, pad)))
        mask.append(torch.nn.functional.pad(batch["attention_mask"][:, :width], (0, pad)))
    return {"input_ids": torch.cat(ids), "attention_mask": torch.cat(mask)}
