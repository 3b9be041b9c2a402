"""Training batches: the fixed dataset and fresh online sequences, the task schedule, adaptive lengths.

Both regimes give equal-length, vectorised batches, and a batch index fully determines its content, so a
resumed run sees exactly the batches the uninterrupted one would have seen:

* ``fixed``: the paper's dataset (``data.build_dataset``: per_length sequences per length, shuffled every epoch);
* ``online``: fresh sequences for every batch, never drawn from the test split (nothing to memorise).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data import build_dataset
from ..evaluation import split_by_length
from ..modeling import max_sequence_length
from ..tasks import IterativeTask, get_task
from ..tokenizer import Layout
from .config import TrainConfig


def assemble(groups: list[tuple[Layout, np.ndarray, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    """Model inputs for rows given as (layout, inputs, states) groups of equal length, right-padded.

    Labels are -100 up to and including EoI and on padding: the loss sees only the states and EoS.
    """
    ids = [g[0].ids(g[1], g[2]) for g in groups]
    width = max(a.shape[1] for a in ids)
    n = sum(len(a) for a in ids)
    out_ids = np.full((n, width), pad_id, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    labels = np.full((n, width), -100, dtype=np.int64)
    row = 0
    for (_, inputs, _), a in zip(groups, ids):
        r, w = slice(row, row + len(a)), a.shape[1]
        out_ids[r, :w], mask[r, :w] = a, 1
        start = Layout.eoi_index(inputs.shape[1]) + 1
        labels[r, start:w] = a[:, start:]
        row += len(a)
    return {k: torch.from_numpy(v) for k, v in (("input_ids", out_ids), ("attention_mask", mask), ("labels", labels))}


def _trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    width = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :width] for k, v in batch.items()}


class FixedData(Dataset):
    """The paper's fixed training set, encoded once; ``__getitems__`` slices whole batches (no per-row Python)."""

    def __init__(self, parts: list[tuple[Layout, dict[int, tuple[np.ndarray, np.ndarray]]]], pad_id: int) -> None:
        groups = [(layout, x, s) for layout, by_len in parts for _, (x, s) in sorted(by_len.items())]
        self.tensors = assemble(groups, pad_id)
        sizes = [len(x) for _, x, _ in groups]
        self.groups = np.split(np.arange(sum(sizes)), np.cumsum(sizes)[:-1])  # row indices of each (task, L)

    def __len__(self) -> int:
        return len(self.tensors["input_ids"])

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices)
        return _trim({k: v[idx] for k, v in self.tensors.items()})


class FixedSampler:
    """Batches of row indices, reshuffled every epoch from (seed, epoch); bucketed = one (task, L) per batch."""

    def __init__(self, groups: list[np.ndarray], batch_size: int, seed: int, bucket: bool) -> None:
        self.groups, self.batch_size, self.seed, self.bucket, self.epoch = groups, batch_size, seed, bucket, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        b = self.batch_size
        if not self.bucket:
            rows = rng.permutation(np.concatenate(self.groups))
            return [rows[i : i + b] for i in range(0, len(rows), b)]
        batches = [g[i : i + b] for g in (rng.permutation(g) for g in self.groups) for i in range(0, len(g), b)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self):
        return (batch.tolist() for batch in self._batches())

    def __len__(self) -> int:
        if not self.bucket:
            return math.ceil(sum(len(g) for g in self.groups) / self.batch_size)
        return sum(math.ceil(len(g) / self.batch_size) for g in self.groups)


def _row_codes(inputs: np.ndarray, base: int) -> np.ndarray | None:
    """An exact integer code per row (None when it would overflow int64: then collisions are negligible)."""
    if base ** inputs.shape[1] >= 2**62:
        return None
    return inputs @ (base ** np.arange(inputs.shape[1], dtype=np.int64))


def _in_sorted(codes: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``np.isin(codes, table)`` for a sorted, unique ``table``: a binary search, several times faster for the few
    rows of a batch (the data loader runs it a few hundred times per step)."""
    at = np.minimum(np.searchsorted(table, codes), len(table) - 1)
    return table[at] == codes


class OnlineData(Dataset):
    """Fresh sequences for every batch, a pure function of (seed, batch number): resumable and shardable.

    A batch is one (task, length) when bucketed, otherwise every row draws its own task and length. Tasks are
    drawn with the curriculum's weights at that step; lengths in 1..max_len(step) of that task, uniformly or as
    ``--length-weights`` says (a helper may have its own longest length). Rows equal to a
    test sequence are redrawn, so test accuracy never measures memorisation.
    """

    def __init__(self, cfg: TrainConfig, layouts: dict[str, Layout], exclude: dict, pad_id: int, epoch_len: int,
                 lengths: AdaptiveLengths | None = None):
        self.cfg, self.layouts, self.pad_id, self.epoch_len = cfg, layouts, pad_id, epoch_len
        self.schedule = TaskSchedule(cfg)
        self.exclude = exclude  # (task, L) -> sorted row codes of the test split
        self.lengths = lengths  # None: lengths uniform in 1..max_len

    def _lengths(self, name: str, step: int, max_len: int, n: int | None, rng: np.random.Generator):
        p = self.lengths.probabilities(name, step, max_len) if self.lengths is not None else None
        if p is None:
            p = length_prior(self.cfg.length_weights, max_len)
        if p is None:
            return rng.integers(1, max_len + 1, size=n)
        return rng.choice(max_len, size=n, p=p) + 1

    def __len__(self) -> int:
        return self.epoch_len * self.cfg.batch_size

    def _draw(self, task: IterativeTask, n: int, length: int, rng: np.random.Generator):
        inputs = task.sample_inputs(n, length, rng)
        test = self.exclude.get((task.name, length))
        if test is not None:
            base = max(task.inputs) + 1
            bad = _in_sorted(_row_codes(inputs, base), test)
            while bad.any():
                inputs[bad] = task.sample_inputs(int(bad.sum()), length, rng)
                bad = _in_sorted(_row_codes(inputs, base), test)
        return inputs, task.run(inputs)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch_no = indices[0] // self.cfg.batch_size
        rng = np.random.default_rng([self.cfg.run_seed, batch_no, 0x1CE])
        step = batch_no // self.cfg.grad_accum
        names, weights = self.schedule.weights(step)
        max_lens = self.schedule.max_lens(step)  # one per name: helpers may train on longer lengths
        n = len(indices)
        if self.cfg.bucket:
            i = rng.choice(len(names), p=weights)
            picks = [(names[i], int(self._lengths(names[i], step, max_lens[i], None, rng)), n)]
        else:
            t = rng.choice(len(names), size=n, p=weights)
            if self.lengths is None and self.cfg.length_weights == "uniform":
                same = len(set(max_lens)) == 1  # the draw every run without per-helper lengths has always made
                lengths = rng.integers(1, max_lens[0] + 1, size=n) if same else rng.integers(1, np.asarray(max_lens)[t] + 1)
            else:
                lengths = np.zeros(n, dtype=np.int64)
                for i in np.unique(t):
                    lengths[t == i] = self._lengths(names[i], step, max_lens[i], int((t == i).sum()), rng)
            keys, counts = np.unique(np.stack([t, lengths], 1), axis=0, return_counts=True)
            picks = [(names[k[0]], int(k[1]), int(c)) for k, c in zip(keys, counts)]
        groups = []
        for name, length, count in picks:
            x, s = self._draw(get_task(name), count, length, rng)
            groups.append((self.layouts[name], x, s))
        batch = assemble(groups, self.pad_id)
        if self.cfg.position_offsets:
            batch["position_ids"] = position_offsets(batch["attention_mask"], max_sequence_length(self.cfg.n_len), rng)
        return batch


def position_offsets(mask: torch.Tensor, n_positions: int, rng: np.random.Generator) -> torch.Tensor:
    """Position ids shifted per row by a random offset that keeps the row inside ``n_positions``: every position
    gets trained, and since x_t no longer sits at an absolute position, the look-up has to be relative to EoI."""
    room = n_positions - mask.sum(1).numpy()
    offsets = torch.from_numpy(rng.integers(0, room + 1))
    return (torch.arange(mask.shape[1])[None] + offsets[:, None]).clamp(max=n_positions - 1)  # padding: unread


class OnlineSampler:
    """Batch b of epoch e holds the virtual indices of global batch number e * epoch_len + b."""

    def __init__(self, epoch_len: int, batch_size: int) -> None:
        self.epoch_len, self.batch_size, self.epoch = epoch_len, batch_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        for b in range(self.epoch_len):
            start = (self.epoch * self.epoch_len + b) * self.batch_size
            yield list(range(start, start + self.batch_size))

    def __len__(self) -> int:
        return self.epoch_len


class TaskSchedule:
    """Task weights and longest lengths at a given step: mixtures, a fading helper task, short lengths first."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.primary = list(cfg.tasks)
        w = cfg.task_weights or [1.0] * len(self.primary)
        self.primary_w = np.asarray(w, dtype=float) / sum(w)
        self.aux = cfg.helpers
        self.n_len, self.length_warmup = cfg.longest_trained, cfg.length_warmup
        self.caps = [self.n_len] * len(self.primary) + [h.max_len or self.n_len for h in self.aux]  # per name

    def weights(self, step: int) -> tuple[list[str], np.ndarray]:
        shares = [h.share_at(step) for h in self.aux]
        names = self.primary + [h.task for h in self.aux]
        w = np.concatenate([self.primary_w * (1.0 - sum(shares)), np.asarray(shares, dtype=float)])
        return names, w / w.sum()

    def max_len(self, step: int, cap: int | None = None) -> int:
        """The longest length at ``step`` of a task trained on 1..``cap`` (default: the run's longest)."""
        cap = cap or self.n_len
        if not self.length_warmup:
            return cap
        return min(cap, 1 + int((cap - 1) * step / self.length_warmup))

    def max_lens(self, step: int) -> list[int]:
        """``max_len`` of every name ``weights`` returns, in its order."""
        return [self.max_len(step, cap) for cap in self.caps]


def length_prior(weights: str, max_len: int) -> np.ndarray | None:
    """P(L = 1..max_len) under ``--length-weights``; None for uniform (drawn with ``rng.integers``, as always).

    "linear" draws L in proportion to L: every chain step s_t is drawn equally often, so the long lengths, whose
    inputs are too many to memorise, get most of the rows."""
    if weights == "uniform":
        return None
    p = np.arange(1, max_len + 1, dtype=np.float64)
    return p / p.sum()


class AdaptiveLengths:
    """Length weights that follow training accuracy: the lengths the model still gets wrong are drawn more often.

    Why: with absolute positions every length needs its own look-up, and once the head has formed the runs that
    miss 0.99 miss whole lengths while the rest are exact. With ``wait``, sampling follows the ``--length-weights``
    prior (uniform by default) until the iteration head is forming (attn1 peakiness >= START_PEAKINESS): adapting
    from step 0 can teach the short lengths one by one without the head (measured in
    benchmarks/results/recipe_search.md). Each (task, L) keeps an EMA of the teacher-forced sequence accuracy of its
    training rows (every process sees every row: they are gathered). Every ``every`` steps (the run's --log-every)
    the weights are republished as half the prior, half in proportion to the error 1 - EMA, so no length drops below
    half its prior share. Weights published at step s apply from step s + LAG: the data loader prefetches a batch,
    and this way an interrupted run resumed from a checkpoint draws exactly the batches the uninterrupted one drew.
    The state is saved with ``save_state``.
    """

    LAG, DECAY, PRIOR_SHARE = 2, 0.9, 0.5
    START_PEAKINESS = 0.5  # half way: the head is forming, and no longer at risk of being skipped

    def __init__(self, tasks: list[str], n_len: int, every: int = 100, wait: bool = False,
                 weights: str = "uniform") -> None:
        self.tasks, self.n_len, self.every, self.wait = list(dict.fromkeys(tasks)), int(n_len), int(every), bool(wait)
        self.weights = weights  # --length-weights: the share not given to the errors follows it
        self.ema = np.zeros((len(self.tasks), self.n_len + 1))  # column L (column 0 unused)
        self.published: list[tuple[int, np.ndarray]] = []  # (first step it applies to, error per (task, L))

    def observe(self, tasks: np.ndarray, lengths: np.ndarray, correct: np.ndarray) -> None:
        """Fold in one step's rows: task index, length and whether the whole row was right, for every row."""
        for t, L in {(int(t), int(L)) for t, L in zip(tasks, lengths)}:
            rows = (tasks == t) & (lengths == L)
            self.ema[t, L] = self.DECAY * self.ema[t, L] + (1 - self.DECAY) * float(correct[rows].mean())

    def after_step(self, step: int) -> None:
        if step % self.every == 0 and not self.wait:
            self.published = [*self.published[-1:], (step + self.LAG, 1.0 - self.ema.copy())]

    def probabilities(self, task: str, step: int, max_len: int) -> np.ndarray | None:
        """P(L = 1..max_len) for a batch of ``task`` drawn for ``step``; None = nothing published yet (the
        ``--length-weights`` prior applies)."""
        current = [err for first, err in self.published if first <= step]
        if not current or task not in self.tasks:
            return None
        err = np.clip(current[-1][self.tasks.index(task), 1 : max_len + 1], 0.0, 1.0)
        prior = length_prior(self.weights, max_len)
        base = np.full(max_len, 1.0 / max_len) if prior is None else prior
        if err.sum() <= 0:
            return base
        p = self.PRIOR_SHARE * base + (1 - self.PRIOR_SHARE) * err / err.sum()
        return p / p.sum()

    def state_dict(self) -> dict:
        return {"ema": torch.from_numpy(self.ema.copy()), "steps": [first for first, _ in self.published],
                "errors": [torch.from_numpy(e.copy()) for _, e in self.published], "wait": self.wait}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.wait = state["ema"].numpy().copy(), bool(state["wait"])
        self.published = [(int(first), e.numpy().copy()) for first, e in zip(state["steps"], state["errors"])]




@dataclass
class TrainData:
    """What a run trains and evaluates on. ``test`` is the full test split by (task, L): the final evaluation;
    ``eval_data`` its first ``eval_per_length`` rows per length: the periodic one."""

    loader: DataLoader
    sampler: FixedSampler | OnlineSampler
    test: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]
    eval_data: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]
    lengths: AdaptiveLengths | None = None  # online data with --length-sampling adaptive
    task_index: torch.Tensor | None = None  # token id -> index in lengths.tasks (task tokens only)

    def batches(self, accelerator, loader, start_batch: int) -> Iterator[dict[str, torch.Tensor]]:
        """Every batch from batch number ``start_batch`` on, epoch after epoch: skips what a resumed run already
        trained on and tells the sampler which epoch it is (the prepared ``loader`` wraps ``self.loader``)."""
        epoch, skip = divmod(start_batch, len(loader))
        while True:
            batches = accelerator.skip_first_batches(loader, skip) if skip else loader
            skip = 0
            # Accelerate's loaders re-set the sampler's epoch from their own counter when iterated: a fresh
            # skip-loader would say epoch 0. Tell the loader actually iterated which epoch this is.
            if hasattr(batches, "set_epoch"):
                batches.set_epoch(epoch)
            self.sampler.set_epoch(epoch)
            yield from batches
            epoch += 1


def excluded_rows(test: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]) -> dict[tuple[str, int], np.ndarray]:
    """(task, L) -> sorted row codes of the test inputs, which online batches must never contain."""
    exclude = {}
    for name, by_len in test.items():
        base = max(get_task(name).inputs) + 1
        for L, (x, _) in by_len.items():
            codes = _row_codes(x, base)
            if codes is not None:
                exclude[(name, L)] = np.unique(codes)
    return exclude


def build_train_data(cfg: TrainConfig, tokenizer, wait_for_head: bool) -> TrainData:
    """Training batches and evaluation sets; the fixed dataset's test split is the evaluation set in both regimes.

    ``wait_for_head``: adaptive lengths start once the iteration head is forming (False: from step 0, as when
    there is no head to wait for, without CoT or a second layer).
    """
    layouts = {name: Layout(tokenizer, name, cfg.cot) for name in cfg.all_tasks}
    splits = {name: build_dataset(name, cfg.n_len, cfg.per_length, cfg.data_seed) for name in cfg.tasks}
    test = {name: split_by_length(s["test"]) for name, s in splits.items()}
    eval_data = {name: {L: (x[: cfg.eval_per_length], s[: cfg.eval_per_length]) for L, (x, s) in t.items()}
                 for name, t in test.items()}
    pad_id = layouts[cfg.tasks[0]].pad_id
    lengths = task_index = None
    if cfg.data == "fixed":
        keep = range(1, cfg.longest_trained + 1)
        dataset = FixedData([(layouts[n], split_by_length(splits[n]["train"], keep)) for n in cfg.tasks], pad_id)
        sampler = FixedSampler(dataset.groups, cfg.batch_size, cfg.run_seed, cfg.bucket)
    else:
        epoch_len = max(1, math.ceil(len(cfg.tasks) * cfg.n_len * cfg.per_length / cfg.batch_size))  # paper: 64
        if cfg.length_sampling == "adaptive":
            lengths = AdaptiveLengths(list(layouts), cfg.longest_drawn, every=cfg.log_every, wait=wait_for_head,
                                      weights=cfg.length_weights)
            task_index = torch.full((len(tokenizer),), -1, dtype=torch.long)
            for i, name in enumerate(lengths.tasks):
                task_index[layouts[name].task_id] = i
        dataset = OnlineData(cfg, layouts, excluded_rows(test), pad_id, epoch_len, lengths)
        sampler = OnlineSampler(epoch_len, cfg.batch_size)
    # Own generator: a DataLoader iterator otherwise draws its base seed from the global RNG, so a resumed
    # run (one extra iterator) would get other dropout masks than an uninterrupted one.
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=lambda batch: batch,
                        generator=torch.Generator().manual_seed(cfg.run_seed))
    return TrainData(loader, sampler, test, eval_data, lengths, task_index)
