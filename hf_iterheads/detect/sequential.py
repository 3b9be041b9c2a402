"""Sequential verdicts: run probes in rounds until every head's verdict is settled.

Most models at most revisions of a scan have no iteration head, and the first quarter of the probes already
says so. After each round of probes every verdict (a pattern with a chance baseline: score >= ``MIN_SCORE``,
>= ``CHANCE_RATIO`` x baseline, >= ``CONTROL_RATIO`` x each control) is checked against a confidence interval:
each criterion's margin is a ratio of sums over probes, whose standard error comes from the per-probe
residuals (the ratio estimator's linearisation), stratified by chain length since every round draws all lengths
in proportion. A head is settled when every margin lies ``z`` standard
errors above zero (detected) or one lies ``z`` below (not detected), and each of its scores is within
``tolerance`` of what the full ``n`` would give (the standard error of the difference, with the finite-
population correction, times ``z``). The run stops when every head is settled; ``n`` is the maximum.

A later round runs what the open heads are estimated to need (:func:`needed`, :func:`next_round`). Once every
head of the deepest layers is settled, later rounds stop the forward before them (a layer's attention depends
on the layers below it only), so those layers keep the scores they settled with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .criteria import CHANCE_RATIO, CONTROL_RATIO, MIN_SCORE

if TYPE_CHECKING:
    from .patterns import HeadPattern


@dataclass(frozen=True)
class Sequential:
    """When to stop: at least ``min_probes``, then after every round once all verdicts are settled."""

    min_probes: int = 16
    z: float = 3.0  # verdicts: margins this many standard errors clear of zero
    tolerance: float = 0.02
    precision_z: float = 2.0  # scores: this many standard errors of the difference to the full-n score within tolerance
    min_round: int = 4  # a later round runs what the open heads are estimated to need, at least this many probes


def next_round(need: np.ndarray, done: np.ndarray, n: int, rule: Sequential, batch_size: int) -> int:
    """Probes in the next round: what the most demanding open head is estimated to need, in multiples of
    ``min_round``, at most a batch (an estimate from few probes is rough; a short round just runs another)."""
    size = max(int(batch_size), 1)
    open_need = need[~done]
    if not len(open_need) or not np.isfinite(open_need.max()):
        return size
    step = max(int(rule.min_round), 1)
    more = int(np.ceil(max(open_need.max() - n, 1) / step)) * step
    return min(max(more, step), size)


def probe_order(lengths: np.ndarray, seed: int = 0) -> np.ndarray:
    """Probe indices with lengths interleaved (shuffled within each length): any first share mixes all lengths."""
    rng = np.random.default_rng([int(seed), 2])
    rank = np.zeros(len(lengths))
    for L in np.unique(lengths):
        where = np.flatnonzero(lengths == L)
        rank[where] = rng.permutation(len(where))
    return np.lexsort((lengths, rank))


def _ratio(mass: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum(mass) / sum(count), per-probe residuals scaled by the mean count): the ratio and its linearisation."""
    total = max(float(count.sum()), 1.0)
    r = mass.sum(0) / total
    shape = (-1,) + (1,) * (mass.ndim - 1)
    z = (mass - r * count.reshape(shape)) / max(total / len(count), 1e-12)
    return r, z


def strata(lengths: np.ndarray) -> list[np.ndarray]:
    """Positions grouped by chain length, neighbouring lengths merged until each group has two or more probes."""
    groups: list[list[int]] = []
    for L in np.unique(lengths):
        where = np.flatnonzero(lengths == L).tolist()
        if groups and len(groups[-1]) < 2:
            groups[-1].extend(where)
        else:
            groups.append(where)
    if len(groups) > 1 and len(groups[-1]) < 2:
        groups[-2].extend(groups.pop())
    return [np.asarray(g) for g in groups]


def _se(z: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """Standard error of the mean residual under stratified sampling (every length in proportion, as
    :func:`probe_order` draws them): only the spread within lengths counts, not the spread between them."""
    n = sum(len(g) for g in groups)
    var = sum(len(g) * z[g].var(axis=0, ddof=1) for g in groups if len(g) > 1)
    return np.sqrt(var) / max(n, 1)


def needed(acc, patterns: list[HeadPattern], ran: np.ndarray, n_max: int, rule: Sequential, lengths: np.ndarray) -> np.ndarray:
    """(layers, heads): how many probes each head needs, at the spread seen so far, for its verdict to be settled and
    its scores close to their full-n values (a standard error shrinks as 1 / sqrt(n)). A head is settled when this
    is at most the probes run; for one still open it says how large the next round should be.

    ``lengths`` (one per probe) are the strata the rounds are drawn in proportion to.
    """
    n = len(ran)
    floor = float(max(rule.min_probes, 2))
    if n < floor:
        return np.full(acc.shape, floor)
    groups = strata(lengths[ran])
    by_name = {p.name: p for p in patterns}
    ratios = {p.name: _ratio(acc.mass[p.name][ran], acc.count[p.name][ran]) for p in patterns}
    need = np.full(acc.shape, floor)
    for _, z in ratios.values():  # sd * sqrt(1/m - 1/n_max) <= tolerance / precision_z, with sd = se * sqrt(n)
        sd = rule.precision_z * _se(z, groups) * np.sqrt(n) / rule.tolerance
        with np.errstate(divide="ignore"):
            need = np.maximum(need, 1.0 / (1.0 / np.maximum(sd, 1e-12) ** 2 + 1.0 / max(n_max, 1)))
    for p in patterns:
        if not p.baseline:
            continue
        r, z = ratios[p.name]
        b, zb = _ratio(acc.chance[p.name][ran], acc.count[p.name][ran])
        margins = [(r - MIN_SCORE, z), (r - CHANCE_RATIO * b[:, None], z - CHANCE_RATIO * zb[..., None])]
        for c in p.controls:
            rc, zc = ratios[by_name[c].name]
            margins.append((r - CONTROL_RATIO * rc, z - CONTROL_RATIO * zc))
        sure = np.zeros(acc.shape)  # every margin clear above zero: detected
        never = np.full(acc.shape, np.inf)  # one margin clear below zero: not detected
        for d, zd in margins:
            with np.errstate(divide="ignore", invalid="ignore"):
                m = n * (rule.z * _se(zd, groups) / np.abs(d)) ** 2  # the n at which |d| = z standard errors
            m = np.where(np.abs(d) > 0, m, np.inf)
            sure = np.where(d > 0, np.maximum(sure, m), np.inf)
            never = np.where(d < 0, np.minimum(never, m), never)
        need = np.maximum(need, np.minimum(sure, never))
    return need


def settled(acc, patterns: list[HeadPattern], ran: np.ndarray, n_max: int, rule: Sequential, lengths: np.ndarray) -> np.ndarray:
    """(layers, heads) booleans: every verdict clear of its threshold and every score close to its full-n value."""
    return settled_from(needed(acc, patterns, ran, n_max, rule, lengths), len(ran), rule)


def settled_from(need: np.ndarray, n: int, rule: Sequential) -> np.ndarray:
    return (need <= n) & (n >= max(rule.min_probes, 2))
