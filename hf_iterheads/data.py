"""Datasets for the iterative tasks: the paper's fixed splits as ``datasets.DatasetDict``, and fresh batches.

Fixed splits follow the paper (for every length L = 1 .. n_len the same count, 1024 train + 1024 test),
with one deliberate change: train and test never share an input sequence. Where a length has fewer
distinct inputs than ``2 * per_length`` (bits with L <= 10, polynomial with L <= 3 ...), every distinct
sequence is used once and split in two halves (test gets the smaller half); :func:`split_sizes` says how many.

Randomness is seeded per (seed, task name, length), so adding a task or a length never changes the others.
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
from datasets import Dataset, DatasetDict, Features, List, Value

from .errors import IterHeadsError
from .tasks import IterativeTask, check_length, get_task
from .tokenizer import Layout

N_LEN = 16  # paper: lengths 1 .. 16
PER_LENGTH = 1024  # paper: 1024 train and 1024 test sequences per length

FEATURES = Features(
    {
        "task": Value("string"),
        "length": Value("int32"),
        "inputs": List(Value("int32")),
        "states": List(Value("int32")),
        "answer": Value("int32"),
        "text": Value("string"),
    }
)


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


def check_sizes(n_len: int, per_length: int) -> None:
    check_length(n_len)
    if int(per_length) < 1:
        raise IterHeadsError(f"the per-length count must be at least 1, got {per_length}")


def build_dataset(
    task: str | IterativeTask, n_len: int = N_LEN, per_length: int = PER_LENGTH, seed: int = 0, tokenizer=None
) -> DatasetDict:
    """Splits ``train`` and ``test`` for one task: every length 1..n_len, disjoint input sequences."""
    task = get_task(task)
    check_sizes(n_len, per_length)
    from .tokenizer import (
        build_tokenizer,  # local: building a tokenizer is only needed for the text column
    )

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
    return Dataset(table.cast(FEATURES.arrow_schema))

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
