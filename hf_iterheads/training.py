"""Train the paper's transformer with Accelerate, and watch the iteration head emerge.

``hf-iterheads train --task polynomial --output-dir runs/poly`` trains with the ``fast`` recipe (below);
``--recipe paper`` is the paper's exact one (Adam 3e-4, batch 256, no schedule, fixed data, 1000 epochs).
The loop follows accelerate's ``examples/by_feature`` (checkpointing, tracking, gradient accumulation), so
the same command runs on CPU, one GPU, or several under ``accelerate launch``.

Data (both regimes give equal-length, vectorised batches; a batch index fully determines its content, so a
resumed run sees exactly the batches the uninterrupted one would have seen):

* ``fixed``: the paper's dataset (``build_dataset``: per_length sequences per length, shuffled every epoch);
* ``online``: fresh sequences for every batch, never drawn from the test split (nothing to memorise).

Output directory: ``metrics.jsonl`` (train and eval records, one JSON per line), ``run_config.json``,
``checkpoints/step_N`` (``save_state``), ``logs/`` (tensorboard), ``eval_results.json``, and at the end a
checkpoint loadable by ``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained(DIR)`` with a model card.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import IterHeadsError
from .tasks import IterativeTask, get_task
from .tokenizer import Layout, build_tokenizer, check_vocabulary, save_tokenizer

# --- the fast recipe: our default (benchmarks/results/recipe_search.md says how each value was chosen) -------
FAST_DATA = "online"  # fresh sequences every batch: the model cannot memorise, it has to find the circuit
FAST_LR = 1e-3  # Adam learning rate after warmup
FAST_WARMUP_STEPS = 200  # linear warmup from 0
# After warmup, a cosine to 0 over the run: the decay takes accuracy from ~0.93 to ~0.99. With the copy curriculum
# the head formed for 3 seeds in 3 under it. The alternative "formed-cosine" (a constant rate until attn1
# peakiness reaches 0.9, then a cosine over FAST_DECAY_STEPS, then stop) gave the bundled polynomial-cot
# (accuracy 1.000) but never formed the head for another seed (recipe_search.md): an option, not the default.
FAST_SCHEDULE = "cosine"
FAST_DECAY_STEPS = 4000
FAST_BATCH_SIZE = 32  # emergence counts steps, not samples: small batches reach the head in less wall time
FAST_BUCKET = True  # one (task, length) per batch: no padding, ~1.7x fewer tokens than padding to 35
FAST_MAX_STEPS = 12000
FAST_BETAS = (0.9, 0.999)
# Half the batches are binary copy at step 0, fading to none at step 3000. Copy needs exactly the circuit's
# attention (look up x_t) with a trivial MLP, so it teaches the head before the harder F. Without it the head
# formed for 1 seed in 3 within 12,000 steps; with it for 3 in 3 (recipe_search.md). Not applied to fine-tuning.
FAST_CURRICULUM = "binary_copy:0.5:3000"
FAST_LENGTH_WARMUP = 0  # steps over which the longest trained length grows from 1 to n_len (0 = off)
# Once the head has formed, the runs that missed 0.99 with uniform lengths missed whole lengths (L = 5..7, or
# L = 16) while the others were exact: 1 seed in 3 reached 0.99. "adaptive" draws the lengths the model still gets
# wrong more often (AdaptiveLengths), once attn1 peakiness reaches 0.5: 5 seeds in 8 then reached accuracy >= 0.99
# with attn1 >= 0.9 (recipe_search.md, sessions 3-4). Adapting from step 0 skipped the head for 2 seeds in 7.
FAST_LENGTH_SAMPLING = "adaptive"
FAST_EVAL_EVERY = 500
# Initialisation as in the paper's reference code (PyTorch defaults: embeddings N(0, 1), linear layers with
# std ~ 1/sqrt(3 * 128) = 0.05) instead of GPT-2's 0.02 everywhere; with GPT-2's own init the head did not form
# in our CPU budget. Only the starting weights change: checkpoints stay stock GPT-2.
INIT_RANGE = 0.05
EMBED_INIT_STD = 1.0

# --- the paper's recipe (paper.md section 6), exactly -------------------------------------------------------
PAPER_RECIPE = dict(
    data="fixed", lr=3e-4, warmup_steps=0, schedule="constant", batch_size=256, bucket=True, epochs=1000,
    max_steps=None, decay_steps=FAST_DECAY_STEPS, betas=(0.9, 0.999), curriculum="", length_warmup=0,
    length_sampling="uniform", eval_every=640,
    init_range=INIT_RANGE, embed_init_std=EMBED_INIT_STD,
)
FAST_RECIPE = dict(
    data=FAST_DATA, lr=FAST_LR, warmup_steps=FAST_WARMUP_STEPS, schedule=FAST_SCHEDULE, batch_size=FAST_BATCH_SIZE,
    bucket=FAST_BUCKET, epochs=None, max_steps=FAST_MAX_STEPS, decay_steps=FAST_DECAY_STEPS, betas=FAST_BETAS,
    curriculum=FAST_CURRICULUM,
    length_warmup=FAST_LENGTH_WARMUP, length_sampling=FAST_LENGTH_SAMPLING, eval_every=FAST_EVAL_EVERY,
    init_range=INIT_RANGE, embed_init_std=EMBED_INIT_STD,
)
RECIPES = {"paper": PAPER_RECIPE, "fast": FAST_RECIPE}
SCHEDULES = ("constant", "cosine", "linear", "formed-cosine")
LENGTH_SAMPLINGS = ("uniform", "adaptive")
SOLVED_ACCURACY, SOLVED_PEAKINESS = 0.99, 0.9  # "the head has formed": the headline thresholds
DATASET_REPO_ID = "hf-iterheads/iterative-tasks"  # where the datasets are published (model card metadata)


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on; saved as run_config.json so ``--resume`` needs nothing else."""

    tasks: list[str]
    output_dir: str
    recipe: str = "fast"
    preset: str = "paper"
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    n_inner: int | None = None
    freeze_positions: bool = False
    init_range: float = INIT_RANGE
    embed_init_std: float = EMBED_INIT_STD
    cot: bool = True
    n_len: int = 16
    max_train_len: int | None = None  # train on lengths 1..max_train_len only (length generalisation); None = n_len
    per_length: int = 1024
    data_seed: int = 0
    seed: int = 0
    init_from: str | None = None
    data: str = FAST_DATA
    bucket: bool = FAST_BUCKET
    lr: float = FAST_LR
    betas: tuple[float, float] = FAST_BETAS
    batch_size: int = FAST_BATCH_SIZE
    warmup_steps: int = FAST_WARMUP_STEPS
    schedule: str = FAST_SCHEDULE
    decay_steps: int = FAST_DECAY_STEPS  # formed-cosine: steps of decay after the head forms
    epochs: int | None = None
    max_steps: int | None = FAST_MAX_STEPS
    task_weights: list[float] | None = None
    curriculum: str = FAST_CURRICULUM
    length_warmup: int = FAST_LENGTH_WARMUP
    length_sampling: str = "uniform"  # the recipes set it; runs saved before the option existed were uniform
    eval_every: int = FAST_EVAL_EVERY
    eval_per_length: int = 256
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    grad_accum: int = 1
    mixed_precision: str = "no"
    report_to: str = "auto"
    compile: bool = False
    stop_when_solved: bool = False

    @property
    def longest_trained(self) -> int:
        """The longest length the run trains on (``max_train_len``, else ``n_len``); evaluation goes to n_len."""
        return self.max_train_len or self.n_len


# --- data ----------------------------------------------------------------------------------------------------


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
    for (layout, inputs, _), a in zip(groups, ids):
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


class OnlineData(Dataset):
    """Fresh sequences for every batch, a pure function of (seed, batch number): resumable and shardable.

    A batch is one (task, length) when bucketed, otherwise every row draws its own task and length. Tasks are
    drawn with the curriculum's weights at that step; lengths uniformly in 1..max_len(step). Rows equal to a
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
            return rng.integers(1, max_len + 1, size=n)
        return rng.choice(max_len, size=n, p=p) + 1

    def __len__(self) -> int:
        return self.epoch_len * self.cfg.batch_size

    def _draw(self, task: IterativeTask, n: int, length: int, rng: np.random.Generator):
        inputs = task.sample_inputs(n, length, rng)
        test = self.exclude.get((task.name, length))
        if test is not None:
            base = max(task.inputs) + 1
            bad = np.isin(_row_codes(inputs, base), test)
            while bad.any():
                inputs[bad] = task.sample_inputs(int(bad.sum()), length, rng)
                bad = np.isin(_row_codes(inputs, base), test)
        return inputs, task.run(inputs)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch_no = indices[0] // self.cfg.batch_size
        rng = np.random.default_rng([self.cfg.seed, batch_no, 0x1CE])
        step = batch_no // self.cfg.grad_accum
        names, weights = self.schedule.weights(step)
        max_len = self.schedule.max_len(step)
        n = len(indices)
        if self.cfg.bucket:
            task = get_task(names[rng.choice(len(names), p=weights)])
            picks = [(task.name, int(self._lengths(task.name, step, max_len, None, rng)), n)]
        else:
            t = rng.choice(len(names), size=n, p=weights)
            if self.lengths is None:
                lengths = rng.integers(1, max_len + 1, size=n)
            else:
                lengths = np.zeros(n, dtype=np.int64)
                for i in np.unique(t):
                    lengths[t == i] = self._lengths(names[i], step, max_len, int((t == i).sum()), rng)
            keys, counts = np.unique(np.stack([t, lengths], 1), axis=0, return_counts=True)
            picks = [(names[k[0]], int(k[1]), int(c)) for k, c in zip(keys, counts)]
        groups = []
        for name, length, count in picks:
            x, s = self._draw(get_task(name), count, length, rng)
            groups.append((self.layouts[name], x, s))
        return assemble(groups, self.pad_id)


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
    """Task weights and longest length at a given step: mixtures, a fading helper task, short lengths first."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.primary = list(cfg.tasks)
        w = cfg.task_weights or [1.0] * len(self.primary)
        self.primary_w = np.asarray(w, dtype=float) / sum(w)
        self.aux = parse_curriculum(cfg.curriculum)
        self.n_len, self.length_warmup = cfg.longest_trained, cfg.length_warmup

    def weights(self, step: int) -> tuple[list[str], np.ndarray]:
        shares = [s if n == 0 else s * max(0.0, 1.0 - step / n) for _, s, n in self.aux]
        names = self.primary + [name for name, _, _ in self.aux]
        w = np.concatenate([self.primary_w * (1.0 - sum(shares)), np.asarray(shares, dtype=float)])
        return names, w / w.sum()

    def max_len(self, step: int) -> int:
        if not self.length_warmup:
            return self.n_len
        return min(self.n_len, 1 + int((self.n_len - 1) * step / self.length_warmup))


class AdaptiveLengths:
    """Length weights that follow training accuracy: the lengths the model still gets wrong are drawn more often.

    Why: with absolute positions every length needs its own look-up, and once the head has formed the runs that
    miss 0.99 miss whole lengths while the rest are exact (recipe_search.md). With ``wait``, sampling stays uniform
    until the iteration head is forming (attn1 peakiness >= START_PEAKINESS): adapting from step 0 let two seeds in
    seven learn the short lengths one by one without the head, and never form it. Each (task, L) keeps an EMA of the
    teacher-forced sequence accuracy of its training rows (every process sees every row: they are gathered).
    Every ``every`` steps (the run's --log-every) the weights are republished as half uniform, half in proportion
    to the error 1 - EMA, so no length drops below half its uniform share. Weights published at step s apply from
    step s + LAG: the data loader prefetches a batch, and this way an interrupted run resumed from a checkpoint
    draws exactly the batches the uninterrupted one drew. The state is saved with ``save_state``.
    """

    LAG, DECAY, UNIFORM_SHARE = 2, 0.9, 0.5
    START_PEAKINESS = 0.5  # half way: the head is forming, and no longer at risk of being skipped

    def __init__(self, tasks: list[str], n_len: int, every: int = 100, wait: bool = False) -> None:
        self.tasks, self.n_len, self.every, self.wait = list(dict.fromkeys(tasks)), int(n_len), int(every), bool(wait)
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
        """P(L = 1..max_len) for a batch of ``task`` drawn for ``step``; None = uniform (nothing published yet)."""
        current = [err for first, err in self.published if first <= step]
        if not current or task not in self.tasks:
            return None
        err = np.clip(current[-1][self.tasks.index(task), 1 : max_len + 1], 0.0, 1.0)
        uniform = np.full(max_len, 1.0 / max_len)
        if err.sum() <= 0:
            return uniform
        p = self.UNIFORM_SHARE * uniform + (1 - self.UNIFORM_SHARE) * err / err.sum()
        return p / p.sum()

    def state_dict(self) -> dict:
        return {"ema": torch.from_numpy(self.ema.copy()), "steps": [first for first, _ in self.published],
                "errors": [torch.from_numpy(e.copy()) for _, e in self.published], "wait": self.wait}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.wait = state["ema"].numpy().copy(), bool(state["wait"])
        self.published = [(int(first), e.numpy().copy()) for first, e in zip(state["steps"], state["errors"])]


def parse_curriculum(spec: str) -> list[tuple[str, float, int]]:
    """``"binary_copy:0.5:1000,parity:0.2:0"`` -> [(task, share at step 0, steps to fade to 0; 0 = constant)]."""
    out = []
    for part in filter(None, (spec or "").split(",")):
        bits = part.split(":")
        try:
            name, share, steps = bits[0], float(bits[1]), int(bits[2] if len(bits) > 2 else 0)
        except (IndexError, ValueError):
            raise IterHeadsError(f"cannot read curriculum {part!r}; write TASK:SHARE[:STEPS], e.g. binary_copy:0.5:1000") from None
        get_task(name)
        if not 0 <= share < 1 or steps < 0:
            raise IterHeadsError(f"curriculum {part!r}: the share must be in [0, 1) and the steps >= 0")
        out.append((name, share, steps))
    if sum(s for _, s, _ in out) >= 1:
        raise IterHeadsError(f"curriculum {spec!r}: the helper tasks' shares must sum to less than 1")
    return out


# --- configuration checks (everything before the output directory is touched) --------------------------------


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """CLI flags over the recipe's values over the defaults; every mistake is an IterHeadsError here."""
    if args.recipe not in RECIPES:
        raise IterHeadsError(f"unknown recipe {args.recipe!r}; known recipes: {', '.join(RECIPES)}")
    recipe = dict(RECIPES[args.recipe])
    for key in recipe:
        value = getattr(args, key, None)
        if value is not None:
            recipe[key] = value
    if args.epochs is not None:  # --epochs and --max-steps: the one given wins over the recipe's
        recipe["max_steps"] = args.max_steps
    elif args.max_steps is not None:
        recipe["epochs"] = None
    if args.curriculum is None and (args.init_from or recipe["data"] == "fixed"):
        recipe["curriculum"] = ""  # fine-tuning (transfer) and the fixed dataset: the given task only, unless asked
    if args.length_sampling is None and recipe["data"] == "fixed":
        recipe["length_sampling"] = "uniform"  # the fixed dataset has its own lengths
    tasks = [t for t in (args.task or "").split(",") if t]
    if not tasks:
        raise IterHeadsError("give at least one task with --task (e.g. --task polynomial)")
    weights = [float(w) for w in args.task_weights.split(",")] if args.task_weights else None
    cfg = TrainConfig(
        tasks=tasks, output_dir=str(args.output_dir), recipe=args.recipe, preset=args.preset, n_layer=args.n_layer,
        n_head=args.n_head, n_embd=args.n_embd, n_inner=args.n_inner, freeze_positions=args.freeze_positions,
        cot=not args.no_cot, n_len=args.n_len, max_train_len=args.max_train_len, per_length=args.per_length, data_seed=args.data_seed, seed=args.seed,
        init_from=args.init_from, task_weights=weights, eval_per_length=args.eval_per_length,
        log_every=args.log_every, checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        grad_accum=args.grad_accum, mixed_precision=args.mixed_precision, report_to=args.report_to,
        compile=args.compile, stop_when_solved=args.stop_when_solved, **recipe,
    )
    cfg.betas = tuple(cfg.betas)
    check_config(cfg)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    for name in cfg.tasks:
        get_task(name)
    if cfg.task_weights is not None and (len(cfg.task_weights) != len(cfg.tasks) or min(cfg.task_weights) < 0
                                         or sum(cfg.task_weights) <= 0):
        raise IterHeadsError(f"--task-weights needs {len(cfg.tasks)} non-negative numbers, one per task")
    from .modeling import PRESETS

    if cfg.preset not in PRESETS:
        raise IterHeadsError(f"unknown model preset {cfg.preset!r}; known presets: {', '.join(PRESETS)}")
    if cfg.data not in ("fixed", "online"):
        raise IterHeadsError(f"unknown data regime {cfg.data!r}; use fixed or online")
    if cfg.schedule not in SCHEDULES:
        raise IterHeadsError(f"unknown schedule {cfg.schedule!r}; use one of {', '.join(SCHEDULES)}")
    positive = dict(n_len=cfg.n_len, per_length=cfg.per_length, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                    eval_every=cfg.eval_every, eval_per_length=cfg.eval_per_length, log_every=cfg.log_every,
                    checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints, decay_steps=cfg.decay_steps)
    for name, value in positive.items():
        if value is None or value < 1:
            raise IterHeadsError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if cfg.max_train_len is not None and not 1 <= cfg.max_train_len <= cfg.n_len:
        raise IterHeadsError(f"--max-train-len must be between 1 and --n-len ({cfg.n_len}), got {cfg.max_train_len}")
    if not cfg.lr > 0 or cfg.warmup_steps < 0:
        raise IterHeadsError(f"the learning rate must be > 0 and warmup >= 0 (got {cfg.lr}, {cfg.warmup_steps})")
    if (cfg.max_steps is None) == (cfg.epochs is None) or (cfg.max_steps or cfg.epochs) < 1:
        raise IterHeadsError("give a positive --epochs or --max-steps (not both)")
    if cfg.length_sampling not in LENGTH_SAMPLINGS:
        raise IterHeadsError(f"unknown length sampling {cfg.length_sampling!r}; use {' or '.join(LENGTH_SAMPLINGS)}")
    if (parse_curriculum(cfg.curriculum) or cfg.length_warmup or cfg.length_sampling != "uniform") and cfg.data != "online":
        raise IterHeadsError("--curriculum, --length-warmup and --length-sampling adaptive need --data online "
                             "(the fixed dataset is fixed)")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise IterHeadsError(f"unknown mixed precision {cfg.mixed_precision!r}; use no, fp16 or bf16")


def prepare_output_dir(cfg: TrainConfig, resume: bool, overwrite: bool) -> None:
    out = Path(cfg.output_dir)
    if resume:
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise IterHeadsError(f"{out} exists and is not empty; pass --resume to continue or --overwrite to replace it")
        if not (out / "run_config.json").is_file():
            raise IterHeadsError(f"refusing to --overwrite {out}: it does not look like a training run directory")
        shutil.rmtree(out)


def load_run_config(output_dir: str) -> TrainConfig:
    path = Path(output_dir) / "run_config.json"
    if not path.is_file():
        raise IterHeadsError(f"cannot --resume: {output_dir} has no run_config.json (was it written by hf-iterheads train?)")
    data = json.loads(path.read_text())
    data["betas"] = tuple(data["betas"])
    return TrainConfig(**data)


# --- model and tokenizer --------------------------------------------------------------------------------------


def make_model(cfg: TrainConfig):
    """(model, tokenizer): a fresh preset model, or a checkpoint to fine-tune (transfer) from ``init_from``."""
    from .modeling import (
        build_config,
        build_model,
        check_fits,
        iterheads_meta,
        load_checkpoint,
    )

    all_tasks = cfg.tasks + [name for name, _, _ in parse_curriculum(cfg.curriculum)]
    if cfg.init_from:
        model, tokenizer = load_checkpoint(cfg.init_from, for_training=True)
        meta = iterheads_meta(model.config)
        meta.update(cot=cfg.cot, n_len=cfg.n_len, tasks=list(dict.fromkeys(meta.get("tasks", []) + cfg.tasks)))
        model.config.iterheads = meta
    else:
        tokenizer = build_tokenizer(model_max_length=2 * cfg.n_len + 3)
        config = build_config(
            tokenizer, cfg.n_len, cfg.preset, cfg.cot, cfg.tasks, n_layer=cfg.n_layer, n_head=cfg.n_head,
            n_embd=cfg.n_embd, n_inner=cfg.n_inner, freeze_positions=cfg.freeze_positions or None,
            initializer_range=cfg.init_range, embed_init_std=cfg.embed_init_std,
        )
        model = build_model(config, cfg.seed)
    for name in all_tasks:
        check_vocabulary(tokenizer, name)
    check_fits(model.config, Layout(tokenizer, cfg.tasks[0], cfg.cot).seq_len(cfg.n_len), f"length-{cfg.n_len} sequence")
    return model, tokenizer


# --- metrics log --------------------------------------------------------------------------------------------


class MetricsLog:
    """Append-only JSONL of every record (``metrics.jsonl``); on resume, records after the checkpoint go."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.is_file():
            keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise IterHeadsError(f"{path} does not exist (no training metrics there)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- final checkpoint and model card -----------------------------------------------------------------------


def render_model_card(cfg: TrainConfig, model, final_eval: list[dict], steps: int, seconds: float) -> str:
    """README.md of the checkpoint from ``model_cards/model_card_template.md``, measured results in model-index."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from .modeling import count_parameters, iterheads_meta

    results = []
    for r in final_eval:
        lo, hi = r["summary_lengths"][0], r["summary_lengths"][-1]
        for key, label in (("accuracy", "test sequence accuracy"), ("generation_accuracy", "greedy generation accuracy"),
                           ("attn1_peakiness", "attn1 (iteration head) peakiness")):
            if r["summary"].get(key) is not None:
                results.append(EvalResult(
                    task_type="text-generation", dataset_type=DATASET_REPO_ID, dataset_name=f"iterative tasks: {r['task']}",
                    dataset_config=r["task"], dataset_split="test", metric_type=key,
                    metric_name=f"{label} (mean L={lo}..{hi})", metric_value=round(float(r["summary"][key]), 4),
                ))
    name = f"iterheads-{'-'.join(cfg.tasks)}-{'cot' if cfg.cot else 'nocot'}-{model.config.n_layer}L"
    data = ModelCardData(
        model_name=name, license="mit", library_name="transformers", pipeline_tag="text-generation",
        datasets=[DATASET_REPO_ID], tags=["iteration-head", "chain-of-thought", "mechanistic-interpretability", "hf-iterheads"],
        eval_results=results or None,
    )
    c = model.config
    return str(ModelCard.from_template(
        data, template_path=str(model_card_template()), model_name=name, tasks=cfg.tasks, cot=cfg.cot, n_len=cfg.n_len,
        n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_inner=c.n_inner, n_positions=c.n_positions,
        n_params=count_parameters(model), frozen_positions=bool(iterheads_meta(c).get("freeze_positions")),
        recipe=cfg.recipe, cfg=dataclasses.asdict(cfg), steps=steps, minutes=round(seconds / 60, 1), results=final_eval,
        dataset_repo=DATASET_REPO_ID,
    ))


def model_card_template() -> Path:
    """The template shipped in the package, else the repository's ``model_cards/`` source."""
    from importlib.resources import files

    packaged = Path(str(files("hf_iterheads") / "templates" / "model_card_template.md"))
    source = Path(__file__).resolve().parents[1] / "model_cards" / "model_card_template.md"
    for path in (packaged, source):
        if path.is_file():
            return path
    raise IterHeadsError("the model card template is missing from the installation (templates/model_card_template.md)")


def save_final(model, tokenizer, output_dir: Path, card: str) -> None:
    """save_pretrained + tokenizer + README into a temp dir, then renamed in, ``config.json`` last: a
    directory with a config.json always holds the complete checkpoint."""
    tmp = Path(tempfile.mkdtemp(dir=output_dir, prefix=".final-"))
    try:
        model.save_pretrained(str(tmp))
        save_tokenizer(tokenizer, tmp)
        (tmp / "README.md").write_text(card)
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
            f.chmod(0o644)
            os.replace(f, output_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- the loop ------------------------------------------------------------------------------------------------


def _latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = [p for p in (output_dir / "checkpoints").glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return max(ckpts, key=lambda p: int(p.name[5:]), default=None)


def _rows_correct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per sequence: is every scored token predicted right (teacher-forced)? ``logits[:, i]`` predicts
    ``targets[:, i]`` (already shifted)."""
    return ((logits.argmax(-1) == targets) | (targets == -100)).all(1)


def _row_outcomes(batch: dict, correct: torch.Tensor, task_index: torch.Tensor) -> torch.Tensor:
    """(rows, 3): task index (from the task token), length L (EoI sits at L + 1), whole row right (0/1)."""
    length = (batch["labels"][:, 1:] != -100).int().argmax(1) - 1
    return torch.stack([task_index[batch["input_ids"][:, 0]], length, correct.long()], 1)


class FormedThenCosine:
    """Learning-rate factor of ``formed-cosine``: linear warmup, constant until ``decay_start`` is set (the step
    the head formed), then a cosine to 0 over ``decay_steps``, and the run ends. An object, not a function, so
    that ``LambdaLR`` saves ``decay_start`` with the scheduler and ``--resume`` continues the same schedule."""

    def __init__(self, warmup_steps: int, decay_steps: int) -> None:
        self.warmup_steps, self.decay_steps, self.decay_start = warmup_steps, decay_steps, None

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        if self.decay_start is None:
            return 1.0
        progress = min(1.0, (step - self.decay_start) / max(1, self.decay_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def head_formed(results: list[dict], max_len: int, threshold: float = SOLVED_PEAKINESS) -> bool:
    """attn1 peakiness >= ``threshold`` for every task, averaged over the trained lengths 4..max_len."""
    for r in results:
        values = [m.get("attn1_peakiness") for L, m in r["per_length"].items() if 4 <= int(L) <= max_len]
        values = [v for v in values if v is not None]
        if not values or float(np.mean(values)) < threshold:
            return False
    return True


def train(cfg: TrainConfig, resume: bool = False, interrupt_at_step: int | None = None) -> Path:
    """Run (or resume) a training run described by ``cfg``; returns the output directory."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from .data import build_dataset
    from .evaluation import evaluate_model, split_by_length
    from .modeling import loss_after_eoi, supports_loss_after_eoi

    out = Path(cfg.output_dir)
    model, tokenizer = make_model(cfg)  # may raise: nothing written yet
    report_to = cfg.report_to
    if report_to == "auto":
        import importlib.util

        report_to = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision,
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dynamo_backend="inductor" if cfg.compile else None,
    )
    set_seed(cfg.seed)
    main = accelerator.is_main_process

    # Data: the fixed dataset's test split is the evaluation set in both regimes.
    layouts = {name: Layout(tokenizer, name, cfg.cot) for name in cfg.tasks + [n for n, _, _ in parse_curriculum(cfg.curriculum)]}
    splits = {name: build_dataset(name, cfg.n_len, cfg.per_length, cfg.data_seed) for name in cfg.tasks}
    test = {name: split_by_length(s["test"]) for name, s in splits.items()}
    eval_data = {name: {L: (x[: cfg.eval_per_length], s[: cfg.eval_per_length]) for L, (x, s) in t.items()} for name, t in test.items()}
    pad_id = layouts[cfg.tasks[0]].pad_id
    lengths = None  # AdaptiveLengths, online data only
    can_form_head = cfg.cot and model.config.n_layer >= 2  # the circuit needs the CoT states and a second layer
    if cfg.data == "fixed":
        keep = range(1, cfg.longest_trained + 1)
        dataset = FixedData([(layouts[n], split_by_length(splits[n]["train"], keep)) for n in cfg.tasks], pad_id)
        sampler = FixedSampler(dataset.groups, cfg.batch_size, cfg.seed, cfg.bucket)
    else:
        epoch_len = max(1, math.ceil(len(cfg.tasks) * cfg.n_len * cfg.per_length / cfg.batch_size))  # paper: 64
        exclude = {}
        for name, t in test.items():
            base = max(get_task(name).inputs) + 1
            for L, (x, _) in t.items():
                codes = _row_codes(x, base)
                if codes is not None:
                    exclude[(name, L)] = np.unique(codes)
        if cfg.length_sampling == "adaptive":
            # No iteration head to wait for without CoT or a second layer: adapt from the start.
            lengths = AdaptiveLengths(list(layouts), cfg.longest_trained, every=cfg.log_every, wait=can_form_head)
            task_index = torch.full((len(tokenizer),), -1, dtype=torch.long)
            for i, name in enumerate(lengths.tasks):
                task_index[layouts[name].task_id] = i
        dataset = OnlineData(cfg, layouts, exclude, pad_id, epoch_len, lengths)
        sampler = OnlineSampler(epoch_len, cfg.batch_size)
    # Own generator: a DataLoader iterator otherwise draws its base seed from the global RNG, so a resumed
    # run (one extra iterator) would get other dropout masks than an uninterrupted one.
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=lambda batch: batch,
                        generator=torch.Generator().manual_seed(cfg.seed))

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=cfg.betas)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    # One process, eager: the loss skips the work it does not depend on (modeling.loss_after_eoi, ~20% faster,
    # same gradients). Under DDP or torch.compile the wrapped model's own forward has to run.
    fast_loss = accelerator.num_processes == 1 and not cfg.compile and supports_loss_after_eoi(model)
    steps_per_epoch = max(1, len(loader) // cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    schedule = cfg.schedule
    if schedule == "formed-cosine" and not can_form_head:
        schedule = "cosine"  # no iteration head to wait for (no CoT, or no second layer): a plain cosine
    formed = None
    if schedule == "formed-cosine":
        formed = FormedThenCosine(cfg.warmup_steps, cfg.decay_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, formed)
    else:
        name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[schedule]
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)
    accelerator.register_for_checkpointing(scheduler)  # stepped by hand: once per optimizer step
    if lengths is not None:
        accelerator.register_for_checkpointing(lengths)

    step, elapsed = 0, 0.0
    ckpt = _latest_checkpoint(out) if resume else None
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        step, elapsed = state["step"], state["elapsed"]
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    log = MetricsLog(out / "metrics.jsonl", step if resume else None, main)
    if report_to != "none":
        hparams = {k: v for k, v in dataclasses.asdict(cfg).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("iterheads", config=hparams)

    def run_eval(final: bool = False) -> list[dict]:
        data = test if final else eval_data
        return [evaluate_model(accelerator.unwrap_model(model), tokenizer, name, data[name], cfg.cot,
                               generate=final, attention=True) for name in cfg.tasks]

    def log_eval(results: list[dict], now: float) -> bool:
        solved = True
        for r in results:
            s = r["summary"]
            record = {"kind": "eval", "step": step, "time": round(now, 2), "task": r["task"], **s,
                      "per_length": {L: m["accuracy"] for L, m in r["per_length"].items()}}
            log.write(record)
            accelerator.log({f"eval/{r['task']}/{k}": v for k, v in s.items() if v is not None}, step=step)
            head = s.get("attn1_peakiness")
            solved &= s["accuracy"] >= SOLVED_ACCURACY and (head is None or head >= SOLVED_PEAKINESS)
        return solved

    batches_done = step * cfg.grad_accum
    epoch, skip = divmod(batches_done, len(loader))
    bar = tqdm(total=total_steps, initial=step, disable=not main, desc="train", dynamic_ncols=True)
    start = time.perf_counter() - elapsed
    solved_logged = any(r.get("kind") == "solved" for r in read_metrics(out / "metrics.jsonl")) if resume and (out / "metrics.jsonl").is_file() else False
    if step == 0 and main:
        log_eval(run_eval(), 0.0)
    model.train()
    loss_sum, acc_sum, n_sum, tokens = 0.0, 0.0, 0, 0
    done = step >= total_steps
    while not done:
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        # Accelerate's loaders re-set the sampler's epoch from their own counter when iterated: a fresh
        # skip-loader would say epoch 0. Tell the loader actually iterated which epoch this is.
        batches.set_epoch(epoch) if hasattr(batches, "set_epoch") else None
        sampler.set_epoch(epoch)
        for batch in batches:
            with accelerator.accumulate(model):
                if fast_loss:
                    with accelerator.autocast():
                        loss, logits, targets = loss_after_eoi(model, batch["input_ids"], batch["labels"])
                else:
                    output = model(**batch)
                    loss, logits, targets = output.loss, output.logits[:, :-1], batch["labels"][:, 1:]
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            loss_sum += loss.item()
            correct = _rows_correct(logits.detach(), targets)
            acc_sum += correct.float().mean().item()
            if lengths is not None:  # every process folds in every process's rows, in the same order
                rows = accelerator.gather(_row_outcomes(batch, correct, task_index)).cpu().numpy()
                lengths.observe(rows[:, 0], rows[:, 1], rows[:, 2])
            n_sum += 1
            tokens += int(batch["attention_mask"].sum())
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            if lengths is not None:
                lengths.after_step(step)
            bar.update(1)
            now = time.perf_counter() - start
            if step % cfg.log_every == 0 or step == total_steps:
                record = {"kind": "train", "step": step, "epoch": round(step / steps_per_epoch, 3), "time": round(now, 2),
                          "loss": loss_sum / n_sum, "train_accuracy": acc_sum / n_sum, "lr": scheduler.get_last_lr()[0],
                          "tokens_per_s": tokens / max(now - elapsed, 1e-9)}
                log.write(record)
                accelerator.log({f"train/{k}": v for k, v in record.items() if k not in ("kind", "step")}, step=step)
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['train_accuracy']:.2f}")
                loss_sum, acc_sum, n_sum = 0.0, 0.0, 0
            results = None
            if step % cfg.eval_every == 0 and main:
                results = run_eval()
                solved = log_eval(results, now)
                if solved and not solved_logged:
                    log.write({"kind": "solved", "step": step, "time": round(now, 2)})
                    solved_logged = True
                    bar.write(f"step {step}: solved (accuracy >= {SOLVED_ACCURACY}, attn1 peakiness >= {SOLVED_PEAKINESS})")
                    if cfg.stop_when_solved:
                        accelerator.set_trigger()
            if step % cfg.eval_every == 0 and cfg.stop_when_solved and accelerator.check_trigger():
                done = True  # every process stops at the same step (the trigger is all-reduced)
            waiting = (formed is not None and formed.decay_start is None, lengths is not None and lengths.wait)
            if step % cfg.eval_every == 0 and any(waiting):
                from accelerate.utils import broadcast_object_list

                # the main process decides for all: has the head formed (0.9), is it forming (START_PEAKINESS)?
                thresholds = (SOLVED_PEAKINESS, AdaptiveLengths.START_PEAKINESS)
                flags = broadcast_object_list([results is not None and head_formed(results, cfg.longest_trained, t)
                                               for t in thresholds])
                if waiting[0] and flags[0]:
                    log.write({"kind": "formed", "step": step, "time": round(now, 2)})
                    bar.write(f"step {step}: the iteration head formed")
                    formed.decay_start = step  # the learning rate decays over cfg.decay_steps from here
                if waiting[1] and flags[1]:
                    log.write({"kind": "adapting", "step": step, "time": round(now, 2)})
                    bar.write(f"step {step}: the iteration head is forming; the failing lengths are drawn more often")
                    lengths.wait = False
            if formed is not None and formed.decay_start is not None and step >= formed.decay_start + cfg.decay_steps:
                done = True
            if step % cfg.checkpoint_every == 0 or step == total_steps:
                save_checkpoint(accelerator, out, step, now, cfg.keep_checkpoints)
            if interrupt_at_step is not None and step == interrupt_at_step:
                raise KeyboardInterrupt  # tests: a run killed between checkpoints
            if step >= total_steps or done:
                done = True
                break
        epoch += 1
    bar.close()
    seconds = time.perf_counter() - start
    accelerator.wait_for_everyone()
    if main:
        final = run_eval(final=True)
        log_eval(final, seconds)
        from .outputs import write_json_atomic

        write_json_atomic({"step": step, "seconds": round(seconds, 1), "results": final}, out / "eval_results.json")
        unwrapped = accelerator.unwrap_model(model)
        save_final(unwrapped, tokenizer, out, render_model_card(cfg, unwrapped, final, step, seconds))
        for r in final:
            s = r["summary"]
            print(f"{r['task']}: step {step}, accuracy {s['accuracy']:.3f}, generation {s['generation_accuracy']:.3f}, "
                  f"attn1 peakiness {s['attn1_peakiness'] if s['attn1_peakiness'] is None else round(s['attn1_peakiness'], 3)}"
                  f" -> {out}", file=sys.stderr)
    accelerator.end_training()
    return out


def save_checkpoint(accelerator, out: Path, step: int, elapsed: float, keep: int) -> None:
    """``save_state`` into ``checkpoints/step_N`` (written under a temporary name, then renamed)."""
    final = out / "checkpoints" / f"step_{step}"
    tmp = out / "checkpoints" / f".tmp_step_{step}"
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "elapsed": elapsed}) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        ckpts = sorted((p for p in final.parent.glob("step_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
        for old in ckpts[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


# --- CLI -------------------------------------------------------------------------------------------------------


def run_train(args: argparse.Namespace) -> int:
    if args.resume:
        if not args.output_dir:
            raise IterHeadsError("--resume needs --output-dir of the run to continue")
        cfg = load_run_config(args.output_dir)
    else:
        cfg = resolve_config(args)
        prepare_output_dir(cfg, resume=False, overwrite=args.overwrite)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.threads:  # on a busy 2-core CPU, 1 thread can be many times faster than 2 (OpenMP spinning)
        torch.set_num_threads(args.threads)
    train(cfg, resume=args.resume, interrupt_at_step=args.interrupt_at_step)
    return 0


def add_cli(subparsers) -> None:
    from .modeling import PRESETS

    p = subparsers.add_parser(
        "train",
        help="train the paper's transformer (Accelerate), log accuracy and attention peakiness",
        description="Train a GPT-2-style model on iterative tasks and watch the iteration head emerge. "
        "Recipe defaults come from --recipe (fast: ours; paper: Adam 3e-4, batch 256, fixed data, 1000 epochs); "
        "any flag given overrides its recipe value.",
    )
    p.add_argument("--task", help="task, or a mixture separated by commas (e.g. binary_copy,parity)")
    p.add_argument("--output-dir", required=True, help="run directory (metrics, checkpoints, final model)")
    p.add_argument("--recipe", default="fast", help=f"training recipe: {', '.join(RECIPES)} (default fast)")
    p.add_argument("--preset", default="paper", help=f"model preset: {', '.join(PRESETS)}")
    p.add_argument("--n-layer", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--n-embd", type=int)
    p.add_argument("--n-inner", type=int, help="MLP width (default 4 * n_embd)")
    p.add_argument("--freeze-positions", action="store_true", help="keep the random positional embeddings frozen")
    p.add_argument("--init-range", type=float,
                   help=f"std of the linear layers at init (GPT2Config.initializer_range; default {INIT_RANGE})")
    p.add_argument("--embed-init-std", type=float,
                   help=f"std of token/position embeddings at init (default {EMBED_INIT_STD}; 0 = --init-range)")
    p.add_argument("--no-cot", action="store_true", help="train without chain-of-thought (only s_L after EoI)")
    p.add_argument("--init-from", help="start from this checkpoint (fine-tuning / transfer)")
    p.add_argument("--n-len", type=int, default=16, help="train on lengths 1..N (paper: 16)")
    p.add_argument("--max-train-len", type=int,
                   help="train on lengths 1..M only, evaluate on 1..--n-len (length generalisation; default M = n_len)")
    p.add_argument("--per-length", type=int, default=1024, help="fixed data and test sequences per length (paper: 1024)")
    p.add_argument("--data-seed", type=int, default=0, help="dataset seed (0 = the published dataset)")
    p.add_argument("--seed", type=int, default=0, help="model init, data order and dropout seed")
    p.add_argument("--data", choices=("fixed", "online"), help="fixed paper dataset or fresh sequences per batch")
    p.add_argument("--bucket", dest="bucket", action="store_true", default=None, help="one length per batch")
    p.add_argument("--no-bucket", dest="bucket", action="store_false", help="mix lengths in a batch (padded)")
    p.add_argument("--lr", type=float)
    p.add_argument("--betas", type=lambda s: tuple(float(b) for b in s.split(",")), help="Adam betas, e.g. 0.9,0.99")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--schedule", help=f"learning-rate schedule after warmup: {', '.join(SCHEDULES)} (formed-cosine: "
                   "constant until attn1 peakiness >= 0.9, then cosine to 0 over --decay-steps and stop)")
    p.add_argument("--decay-steps", type=int, help=f"formed-cosine: decay steps after the head forms (default {FAST_DECAY_STEPS})")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="epochs (paper: 1000 of 64 steps)")
    length.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--task-weights", help="mixture weights, one per --task, e.g. 0.3,0.7")
    p.add_argument("--curriculum", help="helper tasks fading out, TASK:SHARE:STEPS[,...] e.g. binary_copy:0.5:1000")
    p.add_argument("--length-warmup", type=int, help="steps over which the longest length grows from 1 to n_len")
    p.add_argument("--length-sampling", choices=LENGTH_SAMPLINGS,
                   help="online data: lengths uniform, or adaptive (once attn1 peakiness reaches 0.5, the lengths the "
                        "model still gets wrong are drawn more often)")
    p.add_argument("--eval-every", type=int, help="steps between evaluations (accuracy + peakiness)")
    p.add_argument("--eval-per-length", type=int, default=256, help="test sequences per length during training")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between save_state checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--mixed-precision", default="no", help="no, fp16 or bf16")
    p.add_argument("--report-to", default="auto", help="Accelerate tracker: auto (tensorboard if installed), none, ...")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    p.add_argument("--stop-when-solved", action="store_true", help="stop once accuracy >= 0.99 and attn1 >= 0.9")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--interrupt-at-step", type=int, help=argparse.SUPPRESS)  # tests: simulate a killed run
    p.set_defaults(func=run_train)
