"""Datasets for the iterative tasks: the paper's fixed splits as ``datasets.DatasetDict``, and fresh batches.

Fixed splits follow the paper (for every length L = 1 .. n_len the same count, 1024 train + 1024 test),
with one deliberate change: train and test never share an input sequence. Where a length has fewer
distinct inputs than ``2 * per_length`` (bits with L <= 10, polynomial with L <= 3 ...), every distinct
sequence is used once and split in two halves (test gets the smaller half); :func:`split_sizes` says how many.

Randomness is seeded per (seed, task name, length), so adding a task or a length never changes the others.
"""

from __future__ import annotations

import functools
import zlib
from typing import TYPE_CHECKING

import numpy as np

from .errors import IterHeadsError
from .tasks import IterativeTask, check_length, get_task

if TYPE_CHECKING:  # datasets, pyarrow and transformers load when a dataset is built, not when a parser is
    import pyarrow as pa
    from datasets import Dataset, DatasetDict, Features

    from .tokenizer import Layout

N_LEN = 16  # paper: lengths 1 .. 16
PER_LENGTH = 1024  # paper: 1024 train and 1024 test sequences per length
MAX_N_LEN = 4096  # the longest length a dataset may have: 256 times the paper's, beyond any model's use here
BYTES_PER_POSITION = 64  # what one position of one row costs while a split is built (numpy, Arrow, text; measured ~30, x2)


@functools.cache
def features() -> Features:
    """The columns' types (``datasets.Features``)."""
    from datasets import Features, List, Value

    return Features(
        {
            "task": Value("string"),
            "length": Value("int32"),
            "inputs": List(Value("int32")),
            "states": List(Value("int32")),
            "answer": Value("int32"),
            "text": Value("string"),
        }
    )


def __getattr__(name: str):
    if name == "FEATURES":  # the constant it was, built on first use
        return features()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def rng_for(seed: int, task: IterativeTask, length: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(task.name.encode()), int(length)])


def split_sizes(task: str | IterativeTask, length: int, per_length: int) -> tuple[int, int]:
    """(train, test) counts for one length: ``per_length`` each unless there are too few distinct inputs."""
    distinct = get_task(task).n_distinct(length)
    if distinct >= 2 * per_length:
        return per_length, per_length
    return distinct - distinct // 2, distinct // 2


def distinct_inputs(task: IterativeTask, length: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` pairwise distinct input sequences in random order (all of them if fewer exist)."""
    if task.n_distinct(length) <= n:
        grid = np.stack(np.meshgrid(*[task.inputs] * length, indexing="ij"), axis=-1).reshape(-1, length)
        return grid[rng.permutation(len(grid))]
    rows = np.empty((0, length), dtype=np.int64)
    while len(rows) < n:  # rejection of duplicates, keeping the order of first appearance
        rows = np.concatenate([rows, task.sample_inputs(n + n // 4 + 8, length, rng)])
        _, first = np.unique(rows, axis=0, return_index=True)
        rows = rows[np.sort(first)]
    return rows[:n]


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or None where unknown."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def build_bytes(n_len: int, per_length: int, n_tasks: int = 1) -> int:
    """An upper bound on the memory a build of ``n_tasks`` tasks holds: 2 splits x ``per_length`` rows per length,
    each of 2 L + 3 positions."""
    positions = sum(2 * L + 3 for L in range(1, n_len + 1))
    return 2 * per_length * positions * BYTES_PER_POSITION * n_tasks


def check_sizes(n_len: int, per_length: int, n_tasks: int = 1) -> None:
    """Refuse, before any work, sizes no build should attempt: a length over ``MAX_N_LEN``, or more memory than
    half of what this machine has available (a build that size would grind for minutes, then be killed)."""
    check_length(n_len)
    if int(per_length) < 1:
        raise IterHeadsError(f"the per-length count must be at least 1, got {per_length}")
    if int(n_len) > MAX_N_LEN:
        raise IterHeadsError(f"--n-len {n_len} is over the limit of {MAX_N_LEN} (the longest sequence length a "
                             f"dataset may have; the paper's is {N_LEN})")
    need, free = build_bytes(int(n_len), int(per_length), n_tasks), available_memory()
    if free is not None and need > free // 2:
        raise IterHeadsError(
            f"--n-len {n_len} with --per-length {per_length} for {n_tasks} task(s) needs about {need / 2**30:,.1f} GiB "
            f"while building, over the limit of half the memory available ({free / 2**30:,.1f} GiB); lower --n-len or "
            "--per-length, or build fewer tasks at a time")


def build_dataset(
    task: str | IterativeTask, n_len: int = N_LEN, per_length: int = PER_LENGTH, seed: int = 0, tokenizer=None
) -> DatasetDict:
    """Splits ``train`` and ``test`` for one task: every length 1..n_len, disjoint input sequences."""
    from datasets import DatasetDict

    from .tokenizer import Layout, build_tokenizer

    task = get_task(task)
    check_sizes(n_len, per_length)

    layout = Layout(tokenizer or build_tokenizer(), task)
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    for length in range(1, n_len + 1):
        n_train, n_test = split_sizes(task, length, per_length)
        inputs = distinct_inputs(task, length, n_train + n_test, rng_for(seed, task, length))
        states = task.run(inputs)
        parts["train"].append((inputs[:n_train], states[:n_train]))
        parts["test"].append((inputs[n_train:], states[n_train:]))
    return DatasetDict({split: _to_dataset(task, layout, chunks) for split, chunks in parts.items()})


def _to_dataset(task: IterativeTask, layout: Layout, chunks: list[tuple[np.ndarray, np.ndarray]]) -> Dataset:
    """Assemble the Arrow table column by column (list columns straight from numpy, no per-row encoding)."""
    import pyarrow as pa
    from datasets import Dataset

    def ragged(arrays: list[np.ndarray]) -> pa.ListArray:
        lengths = np.concatenate([np.full(len(a), a.shape[1]) for a in arrays])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        values = np.concatenate([a.ravel() for a in arrays]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))

    inputs, states = [c[0] for c in chunks], [c[1] for c in chunks]
    n = sum(len(x) for x in inputs)
    table = pa.table(
        {
            "task": pa.array([task.name] * n, pa.string()),
            "length": pa.array(np.concatenate([np.full(len(x), x.shape[1]) for x in inputs]).astype(np.int32)),
            "inputs": ragged(inputs),
            "states": ragged(states),
            "answer": pa.array(np.concatenate([s[:, -1] for s in states]).astype(np.int32)),
            "text": pa.array([layout.text(a, b) for x, s in chunks for a, b in zip(x.tolist(), s.tolist())]),
        }
    )
    return Dataset(table.cast(features().arrow_schema))

def load_task_dataset(path_or_repo: str, task: str, revision: str | None = None) -> DatasetDict:
    """Load one task's splits from a folder written by ``build-datasets`` or from a Hub dataset repo.

    A repo id goes through ``snapshot_download`` (only that config's files), which also serves files from
    the local Hub cache when ``HF_HUB_OFFLINE=1``; datasets 5's ``load_dataset("ORG/NAME")`` offline only
    looks in its own Arrow cache, never in the Hub cache.
    """
    from pathlib import Path

    from datasets import load_dataset
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    name = get_task(task).name
    folder = Path(path_or_repo)
    if not folder.is_dir():
        if path_or_repo.count("/") != 1:
            raise IterHeadsError(f"{path_or_repo!r} is neither a dataset folder nor a Hub repo id (ORG/NAME)")
        try:
            folder = Path(
                snapshot_download(
                    path_or_repo, repo_type="dataset", revision=revision, allow_patterns=[f"{name}/*", "README.md"]
                )
            )
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
            raise IterHeadsError(
                f"cannot fetch dataset {path_or_repo!r} ({type(err).__name__}); offline (HF_HUB_OFFLINE=1) it must "
                "already be in the Hub cache"
            ) from None
    if not (folder / name).is_dir():
        raise IterHeadsError(f"{path_or_repo} has no config {name!r}")
    return load_dataset(str(folder), name)
