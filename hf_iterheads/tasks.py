"""Iterative tasks: ``s_t = F(s_{t-1}, x_t)`` with the chain of states written out (chain-of-thought).

Every task follows the paper's reference code for its first step: ``s_1 = first(x_1)`` (the identity
unless a task says otherwise) and ``F`` applies from ``t = 2`` on. For binary copy, parity and cumulative
sums this equals starting from ``s_0 = 0``; for polynomial iteration it is a special first step (with
``s_0 = 0`` every chain would start at 1).

The paper's three tasks:

* ``binary_copy`` -- ``s_t = x_t`` over bits: the iteration head alone solves it (look up ``x_t``).
* ``parity``      -- ``s_t = s_{t-1} XOR x_t`` over bits: commutative, high-variance training.
* ``polynomial``  -- ``s_t = s_{t-1} * x_t + 1 (mod 11)``, ``x_t`` uniform in 1..10: order matters.

Two that the paper lacks, to separate "commutative" from "needs the head":

* ``cumsum``      -- ``s_t = s_{t-1} + x_t (mod p)``, p = 11 by default (``make_cumsum_task(p)`` for others):
  the commutative twin of ``polynomial`` on the same alphabet.
* ``s3_product``  -- ``s_t = s_{t-1} o x_t`` in the symmetric group S3 (6 permutations, ids 0..5 in the
  lexicographic order of ``S3_ELEMENTS``): non-commutative, so a bag-of-inputs shortcut cannot work.

Register your own ``F`` with :func:`register_task`; ``step`` receives and returns numpy arrays so that
generation stays vectorised::

    register_task(IterativeTask("mod7_affine", inputs=range(7), states=range(7),
                                step=lambda s, x: (2 * s + x) % 7))
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from .errors import IterHeadsError

StepFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
FirstFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class IterativeTask:
    """An iterative algorithm ``s_1 = first(x_1); s_t = step(s_{t-1}, x_t)`` over small integer alphabets."""

    name: str
    inputs: tuple[int, ...]
    states: tuple[int, ...]
    step: StepFn = field(repr=False)
    first: FirstFn | None = field(default=None, repr=False)
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(int(v) for v in self.inputs))
        object.__setattr__(self, "states", tuple(int(v) for v in self.states))
        if not self.name or not self.name.replace("_", "").isalnum():
            raise IterHeadsError(f"task name {self.name!r} must be letters, digits and underscores")
        for what, values in (("inputs", self.inputs), ("states", self.states)):
            if not values or min(values) < 0 or len(set(values)) != len(values):
                raise IterHeadsError(f"task {self.name!r}: {what} must be distinct non-negative integers")

    @property
    def chance(self) -> float:
        """Accuracy of guessing one state uniformly (parity: 0.5, polynomial: 1/11)."""
        return 1.0 / len(self.states)

    @property
    def n_values(self) -> int:
        """How many value tokens (0 .. n_values - 1) a vocabulary needs for this task."""
        return max(self.inputs + self.states) + 1

    def n_distinct(self, length: int) -> int:
        """Number of distinct input sequences of this length (a Python int: it can be huge)."""
        return len(self.inputs) ** length

    def sample_inputs(self, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` input sequences of ``length`` values drawn uniformly and independently, shape (n, length)."""
        check_length(length)
        alphabet = np.asarray(self.inputs, dtype=np.int64)
        return alphabet[rng.integers(0, len(alphabet), size=(n, length))]

    def run(self, inputs: np.ndarray) -> np.ndarray:
        """The chain of states ``s_1 .. s_L`` for each row of ``inputs`` (shape (n, L)), checked against the alphabet."""
        inputs = np.asarray(inputs, dtype=np.int64)
        if inputs.ndim != 2 or inputs.shape[1] < 1:
            raise IterHeadsError(f"task {self.name!r}: inputs must have shape (n, L) with L >= 1, got {inputs.shape}")
        states = np.empty_like(inputs)
        first = self.first(inputs[:, 0]) if self.first is not None else inputs[:, 0]
        states[:, 0] = self._checked(first, "first step")
        for t in range(1, inputs.shape[1]):
            states[:, t] = self._checked(self.step(states[:, t - 1], inputs[:, t]), "step")
        return states

    def informative(self, inputs: np.ndarray, states: np.ndarray) -> np.ndarray:
        """Where ``s_t`` depends on ``x_t`` (shape (n, L) booleans): the steps an iteration head must fetch.

        Polynomial iteration after ``s_(t-1) = 0`` gives ``s_t = 1`` whatever ``x_t`` is, so a trained head
        may (and does) skip ``x_t`` there; the detector scores only the informative steps.
        """
        inputs, states = np.asarray(inputs, dtype=np.int64), np.asarray(states, dtype=np.int64)
        alphabet = np.asarray(self.inputs, dtype=np.int64)
        first = self.first(alphabet) if self.first is not None else alphabet
        # states after which F(s, .) is the same for every input: nothing to fetch
        constant = [s for s in self.states if len(np.unique(self.step(np.full_like(alphabet, s), alphabet))) == 1]
        out = np.empty(inputs.shape, dtype=bool)
        out[:, 0] = len(np.unique(first)) > 1
        out[:, 1:] = ~np.isin(states[:, :-1], constant)
        return out

    def _checked(self, values: np.ndarray, where: str) -> np.ndarray:
        values = np.asarray(values)
        if values.dtype.kind in "iu" and values.size:  # the common case, by table look-up: training runs this
            lo, hi = int(values.min()), int(values.max())  # once per step of every drawn group (np.isin: ~15x slower)
            table = _state_table(self.states)
            if lo >= 0 and hi < len(table) and table[values].all():
                return values.astype(np.int64, copy=False)
        bad = ~np.isin(values, self.states)
        if bad.any():
            raise IterHeadsError(
                f"task {self.name!r}: its {where} returned {values[bad].flat[0]!r}, "
                f"which is not in its state alphabet {list(self.states)}"
            )
        return values.astype(np.int64)


@functools.lru_cache(maxsize=64)
def _state_table(states: tuple[int, ...]) -> np.ndarray:
    """Booleans indexed by value: True where the value is a state."""
    table = np.zeros(max(states) + 1, dtype=bool)
    table[list(states)] = True
    return table


def parse_lengths(spec: str | int | Iterable[int], minimum: int = 1) -> list[int]:
    """``"4-16"`` -> 4..16, ``"4,8,12"`` or ``"4-8,16"`` -> those, ``8`` -> [8]; sorted, each >= ``minimum``."""
    values: list[int] = []
    try:
        if isinstance(spec, (int, np.integer)):
            values = [int(spec)]
        elif isinstance(spec, str):
            for part in spec.replace(" ", "").split(","):
                lo, dash, hi = part.partition("-")
                if dash and int(hi) < int(lo):
                    raise ValueError
                values.extend(range(int(lo), int(hi) + 1) if dash else [int(part)] if part else [])
        else:
            values = [int(v) for v in spec]
    except ValueError:
        raise IterHeadsError(f"cannot read lengths {spec!r}: use e.g. 4-16, 8 or 4,8,12") from None
    if not values or min(values) < minimum:
        raise IterHeadsError(f"lengths must be at least {minimum}, got {spec!r}")
    return sorted(set(values))


def check_length(length: int) -> None:
    if int(length) < 1:
        raise IterHeadsError(f"sequence length must be at least 1, got {length}")


# --- the built-in tasks -------------------------------------------------------------------------------

BITS = (0, 1)
S3_ELEMENTS: tuple[tuple[int, int, int], ...] = tuple(itertools.permutations(range(3)))
# S3_TABLE[a, b] = index of the permutation i -> a(b(i)), i.e. "apply b, then a".
S3_TABLE = np.array(
    [[S3_ELEMENTS.index(tuple(a[b[i]] for i in range(3))) for b in S3_ELEMENTS] for a in S3_ELEMENTS],
    dtype=np.int64,
)


def make_cumsum_task(p: int = 11, name: str | None = None) -> IterativeTask:
    """Cumulative sum modulo ``p``: inputs and states 0..p-1, ``s_t = s_{t-1} + x_t mod p``."""
    if int(p) < 2:
        raise IterHeadsError(f"modulus must be at least 2, got {p}")
    p = int(p)
    return IterativeTask(
        name or ("cumsum" if p == 11 else f"cumsum_mod{p}"),
        inputs=range(p),
        states=range(p),
        step=lambda s, x: (s + x) % p,
        description=f"cumulative sum modulo {p}: s_t = s_(t-1) + x_t mod {p}, inputs uniform in 0..{p - 1}",
    )


BUILTIN_TASKS: tuple[IterativeTask, ...] = (
    IterativeTask(
        "binary_copy", BITS, BITS, step=lambda s, x: x,
        description="binary copy: s_t = x_t, inputs uniform bits",
    ),
    IterativeTask(
        "parity", BITS, BITS, step=lambda s, x: s ^ x,
        description="parity: s_t = s_(t-1) XOR x_t (s_1 = x_1), inputs uniform bits",
    ),
    IterativeTask(
        "polynomial", range(1, 11), range(11), step=lambda s, x: (s * x + 1) % 11,
        description="polynomial iteration: s_t = s_(t-1) * x_t + 1 mod 11 (s_1 = x_1), inputs uniform in 1..10",
    ),
    make_cumsum_task(11),
    IterativeTask(
        "s3_product", range(6), range(6), step=lambda s, x: S3_TABLE[s, x],
        description="product in the symmetric group S3: s_t = s_(t-1) o x_t (s_1 = x_1), "
        "elements 0..5 = permutations of (0,1,2) in lexicographic order, inputs uniform",
    ),
)

_REGISTRY: dict[str, IterativeTask] = {t.name: t for t in BUILTIN_TASKS}
PAPER_TASKS = ("binary_copy", "parity", "polynomial")


def register_task(task: IterativeTask, overwrite: bool = False) -> IterativeTask:
    """Make ``task`` known to datasets, tokenizers, training and detection by its name."""
    if task.name in _REGISTRY and not overwrite:
        raise IterHeadsError(f"a task named {task.name!r} is already registered (pass overwrite=True)")
    task.run(np.asarray([task.inputs[:1] * 3]))  # fail now, not mid-training, if F leaves the alphabet
    _REGISTRY[task.name] = task
    return task


def task_names() -> list[str]:
    return list(_REGISTRY)


def get_task(name: str | IterativeTask) -> IterativeTask:
    """Look a task up by name; ``cumsum_modP`` names build the cumulative sum for any modulus P."""
    if isinstance(name, IterativeTask):
        return name
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("cumsum_mod") and name[len("cumsum_mod"):].lstrip("-").isdigit():
        return make_cumsum_task(int(name[len("cumsum_mod"):]))
    raise IterHeadsError(f"unknown task {name!r}; known tasks: {', '.join(_REGISTRY)} (or cumsum_modP)")


def get_tasks(names: Iterable[str] | str) -> list[IterativeTask]:
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    return [get_task(n) for n in names]
