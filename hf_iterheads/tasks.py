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
MAX_VALUES = 4096  # the largest alphabet value + 1: one vocabulary token per value
MAX_TABLE = 1 << 22  # (state, input) pairs a task's step table may have (checked when the task is made)


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
        if not isinstance(self.name, str) or not self.name or not self.name.replace("_", "").isalnum():
            raise IterHeadsError(f"task name {self.name!r} must be letters, digits and underscores")
        for what, values in (("inputs", self.inputs), ("states", self.states)):
            if not values or min(values) < 0 or len(set(values)) != len(values):
                raise IterHeadsError(f"task {self.name!r}: {what} must be distinct non-negative integers")
            if max(values) >= MAX_VALUES:
                raise IterHeadsError(f"task {self.name!r}: {what} go up to {max(values)}, over the limit of "
                                     f"{MAX_VALUES - 1} (one vocabulary token per value)")
        if len(self.states) < 2:
            raise IterHeadsError(f"task {self.name!r} has {len(self.states)} state: an iterative task needs at least two")
        object.__setattr__(self, "_table", self._step_table())

    def _call(self, fn: Callable, what: str, *args: np.ndarray) -> np.ndarray:
        """``fn(*args)`` as a numpy integer array of the arguments' shape; a user's function that raises or
        returns something else becomes one IterHeadsError naming it and the values it was given."""
        name = getattr(fn, "__qualname__", repr(fn))
        shown = ", ".join(f"{a[:4].tolist()}{'...' if len(a) > 4 else ''}" for a in args)
        try:
            out = np.asarray(fn(*args))
        except Exception as err:  # the user's code: any failure is theirs to fix, said in one line
            raise IterHeadsError(f"task {self.name!r}: its {what} function {name} raised "
                                 f"{type(err).__name__}: {err} on ({shown})") from err
        if out.shape != args[0].shape or (out.size and out.dtype.kind not in "iub"):
            raise IterHeadsError(f"task {self.name!r}: its {what} function {name} must return integers of the shape "
                                 f"it was given {args[0].shape}, got {out.dtype} {out.shape} on ({shown})")
        return out.astype(np.int64)

    def _step_table(self) -> np.ndarray:
        """``F`` on every (state, input) pair, shape (n_states, n_inputs), checked once when the task is made:
        a step that raises, leaves the states or is not deterministic fails here, never mid-training."""
        if len(self.states) * len(self.inputs) > MAX_TABLE:
            raise IterHeadsError(f"task {self.name!r}: {len(self.states)} states x {len(self.inputs)} inputs is over "
                                 f"the limit of {MAX_TABLE:,} (state, input) pairs")
        s = np.repeat(np.asarray(self.states, dtype=np.int64), len(self.inputs))
        x = np.tile(np.asarray(self.inputs, dtype=np.int64), len(self.states))
        alphabet = np.asarray(self.inputs, dtype=np.int64)
        if self.first is not None:
            first = self._call(self.first, "first", alphabet)
            self._in_states(first, "first", alphabet)
            if not np.array_equal(first, self._call(self.first, "first", alphabet.copy())):
                raise IterHeadsError(f"task {self.name!r}: its first function is not deterministic (two calls on the "
                                     "same inputs gave different states)")
        table = self._call(self.step, "step", s, x)
        self._in_states(table, "step", s, x)
        if not np.array_equal(table, self._call(self.step, "step", s.copy(), x.copy())):
            raise IterHeadsError(f"task {self.name!r}: its step function is not deterministic (two calls on the same "
                                 "(state, input) pairs gave different states)")
        return table.reshape(len(self.states), len(self.inputs))

    def _in_states(self, values: np.ndarray, what: str, *args: np.ndarray) -> None:
        bad = ~np.isin(values, self.states)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            at = ", ".join(str(int(a[i])) for a in args)
            raise IterHeadsError(f"task {self.name!r}: its {what} function returned {int(values[i])} on ({at}), which "
                                 f"is not one of its states {list(self.states)[:12]}{'...' if len(self.states) > 12 else ''}")

    @property
    def properties(self) -> TaskProperties:
        """What the task is, measured on its step table: what the training defaults follow from."""
        return task_properties(self)

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
    if not 2 <= int(p) <= MAX_VALUES:
        raise IterHeadsError(f"cumsum's modulus must be between 2 and {MAX_VALUES} (one vocabulary token per value), got {p}")
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
_BUILTIN_NAMES = frozenset(_REGISTRY)
PAPER_TASKS = ("binary_copy", "parity", "polynomial")
ENTRY_POINT_GROUP = "hf_iterheads.tasks"
_SOURCES: dict[str, str] = {}  # task name -> the import string it was loaded from (``module:attr``)


def is_builtin(name: str) -> bool:
    """A built-in task's name (``cumsum_modP`` included): no registered or plug-in task may take it."""
    return name in _BUILTIN_NAMES or _cumsum_modulus(name) is not None


def _cumsum_modulus(name: str) -> int | None:
    tail = name[len("cumsum_mod"):] if name.startswith("cumsum_mod") else ""
    return int(tail) if tail.lstrip("-").isdigit() else None


def register_task(task: IterativeTask, overwrite: bool = False) -> IterativeTask:
    """Make ``task`` known to datasets, tokenizers, training and detection by its name (its step table was
    checked when it was made). A built-in's name is refused: one name, one task, in every process."""
    if not isinstance(task, IterativeTask):
        raise IterHeadsError(f"register_task needs an IterativeTask, got {type(task).__name__}")
    if is_builtin(task.name) and _REGISTRY.get(task.name) is not task:
        raise IterHeadsError(f"task name {task.name!r} is a built-in task's: give your task another name")
    if task.name in _REGISTRY and _REGISTRY[task.name] is not task and not overwrite:
        raise IterHeadsError(f"a task named {task.name!r} is already registered (pass overwrite=True)")
    _REGISTRY[task.name] = task
    return task


def task_names() -> list[str]:
    """The tasks known in this process: the built-ins, then those registered or imported."""
    return list(_REGISTRY)


def source_of(name: str) -> str | None:
    """The import string a task was loaded from (``module:attr``), which finds it again in a new process; None for
    built-ins, plug-ins and tasks registered in Python (their name finds them)."""
    return _SOURCES.get(get_task(name).name if isinstance(name, IterativeTask) else name)


def task_ref(task: str | IterativeTask) -> str:
    """How to name ``task`` so that another process finds it: its import string, else its name."""
    name = get_task(task).name
    return _SOURCES.get(name, name)


def get_task(name: str | IterativeTask) -> IterativeTask:
    """Look a task up: a built-in or registered name, ``cumsum_modP`` for any modulus P, an import string
    ``package.module:attr`` (the current directory is on the import path), or a plug-in's name (entry-point group
    ``hf_iterheads.tasks``)."""
    if isinstance(name, IterativeTask):
        return name
    if not isinstance(name, str) or not name.strip():
        raise IterHeadsError(f"a task is a name or an import string module:attr, got {name!r}")
    name = name.strip()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        from .task_plugins import load_task_ref

        return load_task_ref(name)
    modulus = _cumsum_modulus(name)
    if modulus is not None:
        return make_cumsum_task(modulus)
    from .task_plugins import load_plugin

    task = load_plugin(name)
    if task is not None:
        return task
    raise IterHeadsError(f"unknown task {name!r}; known tasks: {', '.join(_REGISTRY)} (or cumsum_modP, or an import "
                         "string module:attr naming an IterativeTask; `hf-iterheads tasks` lists the installed ones)")


def get_tasks(names: Iterable[str] | str) -> list[IterativeTask]:
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    return [get_task(n) for n in names]


# --- what a task is: the properties the training defaults follow from -------------------------------------------

FEW_INPUTS = 256  # fewer distinct input sequences than this at some evaluated length: "few inputs"


@dataclass(frozen=True)
class TaskProperties:
    """Measurable facts about a task, read off its step table ``F(s, x)``."""

    n_inputs: int
    n_states: int
    reads_state: bool  # F depends on s: False for binary copy (s_t = x_t), where the head alone solves the task
    input_recoverable: bool  # x_t follows from (s_(t-1), s_t) at every state: no state makes a step ignore x_t
    order_free: bool | None  # the last state does not depend on the inputs' order (parity, cumsum); None: too big

    def few_inputs(self, n_len: int) -> bool:
        """Fewer than ``FEW_INPUTS`` distinct input sequences at some evaluated length (4..n_len)."""
        return self.n_inputs ** min(4, int(n_len)) < FEW_INPUTS


@functools.lru_cache(maxsize=256)
def task_properties(task: IterativeTask) -> TaskProperties:
    table = task._table
    index = {s: i for i, s in enumerate(task.states)}
    order_free = None
    if table.size * len(task.inputs) <= 1 << 24:
        rows = np.vectorize(index.__getitem__, otypes=[np.int64])(table)  # state index after (s, x)
        ab = table[rows, :]  # F(F(s, a), b): shape (states, a, b)
        order_free = bool(np.array_equal(ab, ab.transpose(0, 2, 1)))
    return TaskProperties(
        n_inputs=len(task.inputs),
        n_states=len(task.states),
        reads_state=bool((table != table[:1]).any()),
        input_recoverable=all(len(np.unique(row)) == len(task.inputs) for row in table),
        order_free=order_free,
    )
