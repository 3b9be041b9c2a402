"""Head patterns as data: which (query, key) cells a kind of head fills, and what to report about it.

A :class:`HeadPattern` names a function from probes to (query, key) index pairs. The detector scores every
registered pattern on every head (mean attention mass on the pairs; optionally the share above 0.5, the
normalised entropy of the query rows and a uniform chance baseline), writes the numbers to scores.json, the
ranked table, heads.png and each ``top_heads`` row. Adding a kind of head is one :func:`register_pattern`
call (or ``--pattern module:attr`` on the command line), not eight edits.

Presets: ``iteration`` (the position predicting s_t -> x_t, informative steps only), ``iteration_all``
(every step), ``eoi`` (s_t -> EoI), ``prev`` / ``next`` (the iteration queries -> x_(t-1) / x_(t+1), the
controls), ``previous_token`` (every token -> the token before) and ``state`` (the position predicting s_t ->
s_(t-1), the other operand of F; from t = 2). The key names of the original five stay as they were.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import IterHeadsError
from .probes import Probes

PairsFn = Callable[[Probes, np.ndarray], tuple[torch.Tensor, torch.Tensor]]
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class HeadPattern:
    """One kind of head. ``pairs(probes, idx)`` gives (queries, keys), each (len(idx), P), -1 where none.

    ``peakiness``/``entropy``/``baseline`` switch on the share of pairs above 0.5, the normalised entropy of the
    query rows and the uniform chance 1/(visible keys); ``controls`` names patterns the score must beat (by
    ``CONTROL_RATIO``) to count as ``detected``; ``plot`` puts it in heads.png and a column in the table.
    ``keys`` overrides the scores.json key of ``score``/``peakiness``/``entropy``/``baseline`` (defaults:
    ``{name}_score`` ...), which is how the original names stay.
    """

    name: str
    pairs: PairsFn
    description: str = ""
    peakiness: bool = True
    entropy: bool = True
    baseline: bool = True
    controls: tuple[str, ...] = ()
    plot: bool = True
    column: str | None = None
    keys: tuple[tuple[str, str], ...] = ()

    def checked_pairs(self, probes: Probes, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``pairs(probes, idx)``, or one IterHeadsError naming the pattern's function when it raises or returns
        anything but two integer tensors of shape (len(idx), P) with positions inside the probes."""
        fn = getattr(self.pairs, "__qualname__", repr(self.pairs))
        try:
            out = self.pairs(probes, idx)
        except IterHeadsError:
            raise
        except Exception as err:  # a user's pattern function: its failure is one line, the traceback under --debug
            raise IterHeadsError(f"head pattern {self.name!r}: its function {fn} raised {type(err).__name__}: {err} "
                                 f"on probes {idx[:4].tolist()}{'...' if len(idx) > 4 else ''}") from err
        ok = isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)
        if ok:
            q, k = out
            ok = (q.shape == k.shape and q.dim() == 2 and q.shape[0] == len(idx) and not q.is_floating_point()
                  and not k.is_floating_point())
        if not ok:
            shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in
                      (out if isinstance(out, (tuple, list)) else [out])]
            raise IterHeadsError(f"head pattern {self.name!r}: its function {fn} must return (queries, keys), two "
                                 f"integer tensors of shape ({len(idx)}, P); got {shapes}")
        longest = int(probes.seq_lens[idx].max()) if len(idx) else 0
        if (q >= longest).any() or (k >= longest).any():
            raise IterHeadsError(f"head pattern {self.name!r}: its function {fn} returned a position past the "
                                 f"longest probe ({longest} tokens)")
        return q, k

    def key(self, what: str) -> str:
        """The scores.json key of ``what`` (score, peakiness, entropy, baseline, detected)."""
        return dict(self.keys).get(what, f"{self.name}_{what}")

    @property
    def reported(self) -> list[str]:
        """What this pattern reports besides its score, in table order."""
        flags = {"peakiness": self.peakiness, "entropy": self.entropy, "baseline": self.baseline}
        return [k for k, on in flags.items() if on]

    def describe(self) -> dict:
        return {
            "description": self.description,
            "keys": {w: self.key(w) for w in ["score", *self.reported] + (["detected"] if self.baseline else [])},
            "controls": list(self.controls),
            "plot": self.plot,
        }


def _circuit(name: str) -> PairsFn:
    def pairs(probes: Probes, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return probes.pairs(idx)[name]

    pairs.__name__ = f"circuit_{name}"
    return pairs


def previous_token_pairs(probes: Probes, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Every real token of the probe itself (from x_1 on, after the first token) -> the token just before it.

    Shots and chat turns before x_1 are context, as for every other pattern: never queries.
    """
    n = torch.as_tensor(probes.seq_lens[idx])
    start = probes.x_pos[idx][:, 0].clamp(min=1)
    q = torch.arange(1, int(n.max()))[None, :].expand(len(idx), -1)
    q = torch.where((q < n[:, None]) & (q >= start[:, None]), q, -1)
    return q, torch.where(q >= 0, q - 1, -1)


def state_pairs(probes: Probes, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The position predicting s_t -> the (first) token of s_(t-1), for t >= 2 (in the native layout they coincide)."""
    pred, states = probes.pred_pos[idx], probes.state_pos[idx]
    none = torch.full_like(pred[:, :1], -1)
    prev_state = torch.cat([none, states[:, :-1]], 1)
    valid = (pred >= 0) & (prev_state >= 0)
    return torch.where(valid, pred, -1), torch.where(valid, prev_state, -1)


PRESETS: tuple[HeadPattern, ...] = (
    HeadPattern("iteration", _circuit("iteration"), "the position predicting s_t -> x_t, on steps where s_t depends on x_t",
                controls=("prev", "next"), column="iter",
                keys=(("peakiness", "peakiness"), ("entropy", "entropy"), ("baseline", "baseline"), ("detected", "detected"))),
    HeadPattern("iteration_all", _circuit("iteration_all"), "the position predicting s_t -> x_t, every step",
                peakiness=False, entropy=False, baseline=False, plot=False),
    HeadPattern("eoi", _circuit("eoi"), "the positions holding s_t -> EoI (the layer-1 partner)", column="eoi"),
    HeadPattern("prev", _circuit("prev"), "control: the iteration queries -> x_(t-1)",
                peakiness=False, entropy=False, baseline=False, plot=False, column="x_t-1"),
    HeadPattern("next", _circuit("next"), "control: the iteration queries -> x_(t+1)",
                peakiness=False, entropy=False, baseline=False, plot=False, column="x_t+1"),
    HeadPattern("previous_token", previous_token_pairs, "every token -> the token before it", column="prevtok"),
    HeadPattern("state", state_pairs, "the position predicting s_t -> s_(t-1) (from t = 2)", column="state"),
)

_REGISTRY: dict[str, HeadPattern] = {p.name: p for p in PRESETS}
_RESERVED = {"kv_group", "n_kv_heads", "top_heads", "criteria", "patterns"}


def registered_patterns() -> list[HeadPattern]:
    """Every pattern the detector scores, presets first, in registration order."""
    return list(_REGISTRY.values())


def _check(pattern: HeadPattern, others: dict[str, HeadPattern]) -> None:
    """One clear error for a pattern that cannot be scored next to ``others`` (by name)."""
    if not isinstance(pattern, HeadPattern):
        raise IterHeadsError(f"a head pattern must be a HeadPattern, got {type(pattern).__name__}")
    if not _NAME.match(pattern.name):
        raise IterHeadsError(f"pattern name {pattern.name!r} must be lower-case letters, digits and _, starting with a letter")
    if not callable(pattern.pairs):
        raise IterHeadsError(f"pattern {pattern.name!r}: pairs must be a function (probes, idx) -> (queries, keys)")
    taken = {k for p in others.values() if p.name != pattern.name for k in p.describe()["keys"].values()}
    clash = set(pattern.describe()["keys"].values()) & (taken | _RESERVED)
    if clash:
        raise IterHeadsError(f"pattern {pattern.name!r} would overwrite scores.json keys {sorted(clash)}")
    unknown = [c for c in pattern.controls if c not in others and c != pattern.name]
    if unknown:
        raise IterHeadsError(f"pattern {pattern.name!r}: unknown control patterns {unknown}; register them first")


def register_pattern(pattern: HeadPattern, replace: bool = False) -> HeadPattern:
    """Add ``pattern`` to every later detection (scores.json, table, heads.png, top_heads)."""
    _check(pattern, _REGISTRY)
    if pattern.name in _REGISTRY and _REGISTRY[pattern.name] is not pattern and not replace:
        raise IterHeadsError(f"a pattern named {pattern.name!r} is already registered (pass replace=True to replace it)")
    if any(p.name == pattern.name for p in PRESETS) and _REGISTRY[pattern.name] is not pattern:
        raise IterHeadsError(f"{pattern.name!r} is a preset pattern and cannot be replaced")
    _REGISTRY[pattern.name] = pattern
    return pattern


def unregister_pattern(name: str) -> None:
    """Remove a user pattern (presets stay)."""
    if any(p.name == name for p in PRESETS):
        raise IterHeadsError(f"{name!r} is a preset pattern and cannot be removed")
    _REGISTRY.pop(name, None)


def resolve_patterns(patterns: Iterable[HeadPattern | str] | None = None) -> list[HeadPattern]:
    """All registered patterns (``None``), or the presets plus ``patterns`` (names or HeadPatterns, not registered)."""
    if patterns is None:
        return registered_patterns()
    chosen = {p.name: p for p in PRESETS}
    for p in patterns:
        if isinstance(p, str):
            if p not in _REGISTRY:
                raise IterHeadsError(f"unknown head pattern {p!r}; registered: {', '.join(_REGISTRY)}")
            p = _REGISTRY[p]
        if p.name in chosen and chosen[p.name] is not p:
            raise IterHeadsError(f"two different head patterns are named {p.name!r}")
        _check(p, {**chosen, p.name: p})
        chosen[p.name] = p
    return list(chosen.values())


def load_pattern_spec(spec: str) -> list[HeadPattern]:
    """``module:attr`` (a HeadPattern, or a list/tuple of them) imported for ``--pattern``, registered."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise IterHeadsError(f"--pattern {spec!r}: expected module:attr, e.g. mypatterns:INDUCTION")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like python -m: modules in the current folder import
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise IterHeadsError(f"--pattern {spec!r}: cannot import {module_name!r} ({err})") from None
    except Exception as err:  # the user's module raised while it was imported
        raise IterHeadsError(f"--pattern {spec!r}: importing {module_name!r} raised {type(err).__name__}: {err}") from err
    if not hasattr(module, attr):
        raise IterHeadsError(f"--pattern {spec!r}: module {module_name!r} has no attribute {attr!r}")
    value = getattr(module, attr)
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    bad = [type(v).__name__ for v in items if not isinstance(v, HeadPattern)]
    if bad or not items:
        raise IterHeadsError(f"--pattern {spec!r}: expected a HeadPattern (or a list of them), got {', '.join(bad) or 'nothing'}")
    return [register_pattern(p) for p in items]
