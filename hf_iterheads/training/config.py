"""Everything a training run depends on, written once: the ``TrainConfig`` dataclass, the recipes as instances of
it, and the ``train`` CLI flags generated from its fields (the way ``HfArgumentParser`` does).

The dataclass defaults are the ``fast`` recipe, ours; ``paper`` is the paper's exact one (paper.md section 6).
Why each fast value was chosen is measured in ``benchmarks/results/recipe_search.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from ..errors import IterHeadsError
from ..tasks import get_task

Data = Literal["fixed", "online"]
Schedule = Literal["constant", "cosine", "linear", "formed-cosine"]
LengthSampling = Literal["uniform", "adaptive"]
LengthWeights = Literal["uniform", "linear"]
MixedPrecision = Literal["no", "fp16", "bf16"]


class Helper(NamedTuple):
    """A helper task of the curriculum: its share of the batches from step ``start`` (0: from the first step),
    fading to 0 over ``steps`` more, trained on lengths 1..``max_len``."""

    task: str
    share: float
    steps: int  # 0 = a constant share
    # None = the run's own (--max-train-len, else --n-len). Longer than the run's: the helper trains the look-up at
    # distances the main task never sees (length generalisation, benchmarks/results/length_generalisation.md).
    max_len: int | None = None
    # A helper that joins once the head has formed: its rows cannot stop the head forming (polynomial's does,
    # when present from step 0), and can still train the look-up on longer lengths.
    start: int = 0

    def share_at(self, step: int) -> float:
        """The helper's share of the rows at ``step``."""
        if step < self.start:
            return 0.0
        return self.share if self.steps == 0 else self.share * max(0.0, 1.0 - (step - self.start) / self.steps)


def parse_curriculum(spec: str) -> tuple[Helper, ...]:
    """``"binary_copy:0.5:1000,cumsum:0.2:0:16:4000"`` -> helpers (task, share when it starts, steps to fade
    (0 = constant), longest length (empty or absent: the run's), step it starts at (default 0))."""
    out = []
    for part in filter(None, (spec or "").split(",")):
        bits = part.split(":")
        try:
            if len(bits) > 5:
                raise ValueError
            helper = Helper(bits[0], float(bits[1]), int(bits[2] if len(bits) > 2 else 0),
                            int(bits[3]) if len(bits) > 3 and bits[3] else None, int(bits[4]) if len(bits) > 4 else 0)
        except (IndexError, ValueError):
            raise IterHeadsError(f"cannot read curriculum {part!r}; write TASK:SHARE[:STEPS[:MAX_LEN[:START]]], "
                                 "e.g. binary_copy:0.5:1000") from None
        get_task(helper.task)
        if (not 0 <= helper.share < 1 or helper.steps < 0 or (helper.max_len is not None and helper.max_len < 1)
                or helper.start < 0):
            raise IterHeadsError(f"curriculum {part!r}: the share must be in [0, 1), the steps >= 0, the longest "
                                 "length >= 1 and the start step >= 0")
        out.append(helper)
    if sum(h.share for h in out) >= 1:
        raise IterHeadsError(f"curriculum {spec!r}: the helper tasks' shares must sum to less than 1")
    return tuple(out)


AUTO = "auto"
COPY_HELPER = "binary_copy:0.5:3000"
FEW_INPUTS_HELPER = "cumsum:0.3:0"  # for tasks with few distinct inputs (auto_curriculum)
FEW_INPUTS = 256


def few_inputs(tasks: list[str], n_len: int) -> bool:
    """Whether some task has fewer than ``FEW_INPUTS`` distinct inputs at some evaluated length (4..n_len): the
    binary tasks (2^L inputs, half of them in the test split)."""
    lengths = range(min(4, n_len), n_len + 1)
    return any(get_task(t).n_distinct(L) < FEW_INPUTS for t in tasks for L in lengths)


OFFSET_TASKS = ("cumsum", "s3_product", "parity", "binary_copy")  # every task but polynomial (auto_position_offsets)


def auto_position_offsets(tasks: list[str]) -> bool:
    """The default of ``--position-offsets``: on when every task is in ``OFFSET_TASKS`` (all but polynomial).

    Why (benchmarks/results/seed_sweep_notes.md, sessions 8-10): without offsets cumsum formed the head in 1 attempt
    of 7 and s3_product in 3 of 8, and failing runs tend to read the inputs along a fixed diagonal of absolute
    positions (a look-up that fits one length); with every row shifted by a random offset no absolute position
    means anything, and the two tasks formed the head in 13 of 14 runs. On the binary tasks (every mixed-length
    run recorded in seed_sweep.jsonl, last attempts) parity formed the head in 11 of 12 attempts with offsets
    against 2 of 7 without, and binary copy in 4 of 11 against 1 of 6. Polynomial forms the head without them in
    most seeds, and with them it formed later (3,500-4,500 steps instead of 2,500-3,000): it goes without."""
    return bool(tasks) and all(t in OFFSET_TASKS for t in tasks)


RESTART_AT, EARLY_RESTART_AT = 3000, 1000  # the plateau restart's step (auto_restart_at)
RESTART_BELOW, FEW_INPUTS_RESTART_BELOW = 0.4, 0.22  # the plateau restart's threshold (auto_restart_below)
MAX_RESTARTS, FAST_FINISH_MAX_RESTARTS, EARLY_MAX_RESTARTS = 1, 2, 5  # restarts at most (auto_max_restarts)
EARLY_TASKS = ("binary_copy",)  # heads that show by step 1,000 or not at all: judged there, restarted cheaply
FAST_FINISH_TASKS = ("polynomial",)  # a forming attempt is exact within 6,000 steps: a third attempt fits the budget
ANCHOR_BELOW = 0.2  # the anchor restart's threshold on attn0 peakiness (auto_anchor_below)


def early_head(tasks: list[str]) -> bool:
    """Whether every task is in ``EARLY_TASKS`` (binary copy): the run is judged at step 1,000, not 3,000."""
    return bool(tasks) and all(t in EARLY_TASKS for t in tasks)


def auto_restart_at(tasks: list[str]) -> int:
    """The default of ``--restart-at``: step 3,000, and 1,000 for binary copy (``early_head``).

    Why (benchmarks/results/seed_sweep.md, "Binary copy's early restart's evidence"): binary copy's attempts
    split at step 1,000. All 12 recorded attempts (cumsum rows) whose layer-2 mass on x_t was 0.47-0.51 there formed
    the head (at steps 4,000-6,000); the others sat at 0.15-0.29, and of the 10 of them that ran to the end only 2
    formed it, late (steps 5,000 and 10,500): the other 8 ended with layer 2 not looking x_t up (accuracy
    0.36-0.90). A restart at step 1,000 costs a twelfth of the budget, so a run can afford several
    (``auto_max_restarts``). The other tasks' masses rise later (parity: 0.14-0.25 at step 1,000 in runs that
    formed the head), so they are judged at step 3,000."""
    return EARLY_RESTART_AT if early_head(tasks) else RESTART_AT


def auto_restart_below(tasks: list[str], n_len: int, restart_at: int) -> float:
    """The default of ``--restart-below``: ``RESTART_BELOW`` (0.4), or 0.22 when a task has few distinct inputs
    (``few_inputs``: the binary tasks) and the run is judged after step 1,000.

    Why (benchmarks/results/seed_sweep.md, "The plateau restart's evidence": the step-3,000 layer-2 mass on x_t of
    every recorded mixed-length attempt against its outcome): the binary tasks' heads form late. 4 of the 14 binary
    attempts between 0.22 and 0.4 formed the head, at steps 4,000-5,500, where the 0.4 that restarts the other
    tasks would have thrown them away; none of the 6 below 0.22 formed it (peakiness at most 0.18): those are the
    ones to restart. Judged at step 1,000 (binary copy, ``auto_restart_at``) 0.4 splits the two groups there."""
    late = not restart_at or restart_at > EARLY_RESTART_AT  # 0: never judged
    return FEW_INPUTS_RESTART_BELOW if late and few_inputs(tasks, n_len) else RESTART_BELOW


def auto_max_restarts(tasks: list[str]) -> int:
    """The default of ``--max-restarts``: 1; 2 for polynomial (``FAST_FINISH_TASKS``); 5 for binary copy (``early_head``),
    whose restarts at step 1,000 leave the last attempt at least 7,000 of the 12,000 steps.

    Why: about half of binary copy's fresh attempts are forming at step 1,000 (11 of 20 fresh seeds in the early
    signal screen, benchmarks/results/early_signal_screen.jsonl, and 12 of 29 recorded attempts), so six attempts
    all miss it in about 2% of runs. Two judged at step 3,000 leave the last attempt 6,000 of 12,000 steps: too
    few for parity, whose heads form at steps 3,500-6,000 and were still short of 0.99 there (seed_sweep_notes.md,
    session 13), and enough for polynomial, whose forming attempts had the head by step 2,000-4,000 and 0.99 by step
    5,500 of the attempt in 19 of 20 default runs. Polynomial's only failures with one restart were runs whose
    second attempt missed too (seeds 9 and 45, mass 0.11-0.12 at its step 3,000); with a third attempt both formed
    the head and ended at 1.000, and fresh seeds 46-53 succeeded in 8 of 8, one of them (49) in its third attempt
    (seed_sweep_notes.md, session 16). Only runs whose second attempt is not forming are changed by it."""
    if early_head(tasks):
        return EARLY_MAX_RESTARTS
    return FAST_FINISH_MAX_RESTARTS if all(t in FAST_FINISH_TASKS for t in tasks) else MAX_RESTARTS


def auto_anchor_below(position_offsets: bool) -> float:
    """The default of ``--anchor-below`` (used with ``--anchor-at``): ``ANCHOR_BELOW`` (0.2) with position offsets,
    else 0 (no anchor check).

    Why (benchmarks/results/seed_sweep_notes.md, session 11): with offsets, layer 1 settles on its anchor within
    1,000 steps. In binary copy's partial-head runs (peakiness ~0.86, the last step confused with EoI) layer 1
    never attended to EoI: its peakiness was 0.06-0.15 at steps 500 and 1,000 and stayed under 0.25; runs whose
    head formed had 0.29-0.49 by then. Without offsets layer 1 finds EoI later (polynomial: 0.12 until step
    2,000 in runs that formed the head), so there is nothing to judge at step 1,000."""
    return ANCHOR_BELOW if position_offsets else 0.0


def auto_curriculum(tasks: list[str], n_len: int) -> str:
    """The default curriculum of these tasks: the copy helper always; a constant 30% of cumsum rows too when a
    task has fewer than ``FEW_INPUTS`` distinct inputs at some evaluated length (4..n_len).

    Why (benchmarks/results/seed_sweep_notes.md): such a task has few training inputs there (parity: 8 at L = 4,
    the other 8 are test inputs), and a model memorises them instead of looking x_t up; rows of a task with many
    inputs train the same (length, position) look-ups on inputs it cannot memorise. Polynomial rows did that at
    first (parity 8 of 10 seeds, binary copy 3 of 10), but in binary copy layer 1 then often anchored on the task
    token instead of EoI (a partial head, the last step confused with EoI). Cumsum rows, which share position
    offsets with the binary tasks, made layer 1 anchor on EoI in all 10 binary-copy runs; with the 12,000-step
    budget (auto_max_steps) they gave binary copy 8 of 10 and parity 10 of 10 (seed_sweep.md, ``cumsum12k-s11``).
    On tasks with plenty of inputs (cumsum, s3_product) a permanent helper kept the head from forming (polynomial
    rows: accuracy 0.01-0.02), so they do without it."""
    return COPY_HELPER + ("," + FEW_INPUTS_HELPER if few_inputs(tasks, n_len) else "")


LINEAR_LENGTH_TASKS = ("parity",)  # long lengths drawn more often by default (auto_length_weights)


def auto_length_weights(tasks: list[str]) -> str:
    """The default of ``--length-weights``: linear (P(L) proportional to L) when every task is in
    ``LINEAR_LENGTH_TASKS`` (parity), uniform otherwise.

    Why (benchmarks/results/seed_sweep_notes.md, sessions 16-17): parity's short lengths have a handful of training
    inputs each (8 at L = 4) that a model can memorise, and a uniform draw spends most rows on them; drawn in
    proportion to L, the long lengths, whose inputs cannot be memorised, weigh more, and every chain step is drawn
    equally often. Parity then succeeded in 18 of 18 runs (seeds 0-9 and held-out 12, 40-41, 80-84; uniform: 26 of
    28, failing 40-41): first attempts that pass the restart check are at 0.66-0.94 at step 3,000 (uniform mostly
    0.22-0.35), those that do not at 0.13-0.18, and every second attempt formed the head. Binary copy stays uniform:
    under linear weights it succeeded in 9 of 10 seeds 0-9 against 10 of 10 (session 18), the share of first
    attempts passing its step-1,000 check unchanged (5 of 10). The other tasks have inputs enough at every length."""
    return "linear" if tasks and all(t in LINEAR_LENGTH_TASKS for t in tasks) else "uniform"


def length_recipe(n_len: int) -> list[str]:
    """Flags that make a run trained on lengths 1..M (``--max-train-len M``) right on the longer lengths up to
    ``n_len`` too: cumsum helper rows on every length 1..n_len, lengths drawn in proportion to L, position offsets
    (already on for every task but polynomial). Online data only (linear weights cannot re-draw the fixed dataset).

    Why (benchmarks/results/length_generalisation.md): the look-up is the same for every task, so helper rows on
    1..n_len carry it to lengths the main task never had, and with position offsets it is relative to EoI rather
    than learned per absolute position and length. Linear weights give the long lengths, whose inputs cannot be
    memorised, most of the rows; with uniform ones the binary tasks' heads formed less often on 1..12 and
    polynomial's not at all beside a permanent helper."""
    return ["--curriculum", f"{COPY_HELPER},{FEW_INPUTS_HELPER}:{n_len}", "--length-weights", "linear",
            "--position-offsets"]


MAX_STEPS, QUICK_MAX_STEPS = 12000, 9000  # the run's step budget (auto_max_steps)
QUICK_TASKS = ("cumsum", "s3_product")  # heads that form early, restarts that are rare: 9,000 steps


def auto_max_steps(tasks: list[str], n_len: int) -> int:
    """The default of ``--max-steps`` (unless ``--epochs`` is given): 12,000 steps, or 9,000 when every task is in
    ``QUICK_TASKS`` (cumsum, s3_product) and none has few distinct inputs (``few_inputs``).

    Why (benchmarks/results/seed_sweep.md): at 9,000 steps an attempt restarted at step 3,000 had 6,000 steps, and
    that was where binary copy, parity and polynomial failed: parity seeds 0 and 3 and polynomial seed 1 formed the
    head late in the second attempt and ended short of 0.99; none of the restarted binary-copy runs succeeded. The
    binary tasks' heads also form late (steps 3,000-10,500) and sharpen for thousands of steps after. With 12,000
    steps parity went from 8 to 10 of 10 seeds, binary copy (with cumsum rows) from 4 to 8, polynomial from 8 to
    9 (rows ``cumsum12k-s11`` and ``steps12k-s12``), at 414-603 s per binary run and 445-481 s per polynomial
    run two at a time on the 2-core Xeon. Cumsum and s3_product formed the head in 10 of 10 seeds at 9,000 steps
    (at steps 2,000-4,500, one restart in 20 runs), so they keep the shorter run."""
    quick = all(t in QUICK_TASKS for t in tasks) and not few_inputs(tasks, n_len)
    return QUICK_MAX_STEPS if quick else MAX_STEPS


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class TrainConfig:
    """One training run; saved as ``run_config.json`` so that ``--resume`` needs nothing else.

    Fields with ``help`` metadata are CLI flags (``--field-name``, or ``flag``); the defaults are the fast recipe.
    """

    tasks: list[str] = field(default_factory=list, metadata=_help(
        "task, or a mixture separated by commas (e.g. binary_copy,parity)", flag="--task"))
    output_dir: str = field(default="", metadata=_help("run directory (metrics, checkpoints, final model)", required=True))
    recipe: str = "fast"  # which recipe the values came from (--recipe, handled by resolve_config)
    # --- model -----------------------------------------------------------------------------------------------
    preset: str = field(default="paper", metadata=_help("model preset (modeling.PRESETS)"))
    n_layer: int | None = field(default=None, metadata=_help("layers (default: the preset's)"))
    n_head: int | None = field(default=None, metadata=_help("attention heads per layer (default: the preset's)"))
    n_embd: int | None = field(default=None, metadata=_help("embedding width (default: the preset's)"))
    n_inner: int | None = field(default=None, metadata=_help("MLP width (default 4 * n_embd)"))
    freeze_positions: bool = field(default=False, metadata=_help("keep the random positional embeddings frozen"))
    # The reference code's initialisation (PyTorch defaults: embeddings N(0, 1), linear layers std ~0.05) instead
    # of GPT-2's 0.02: with GPT-2's own the head did not form in our CPU budget. Checkpoints stay stock GPT-2.
    init_range: float = field(default=0.05, metadata=_help("std of the linear layers at init (GPT2Config.initializer_range)"))
    embed_init_std: float = field(default=1.0, metadata=_help("std of token/position embeddings at init (0 = --init-range)"))
    # The attention temperature at init: scaling the query weights scales every attention logit (0 = uniform
    # attention at step 0; the keys still get gradient through the queries' first update).
    query_init_scale: float = field(default=1.0, metadata=_help(
        "multiply the initial query weights of every attention layer (attention temperature at init; 0 = uniform)"))
    cot: bool = field(default=True, metadata=_help("train without chain-of-thought (only s_L after EoI)", flag="--no-cot"))
    init_from: str | None = field(default=None, metadata=_help("start from this checkpoint (fine-tuning / transfer)"))
    # --- data ------------------------------------------------------------------------------------------------
    n_len: int = field(default=16, metadata=_help("train on lengths 1..N (paper: 16)"))
    max_train_len: int | None = field(default=None, metadata=_help(
        "train on lengths 1..M only, evaluate on 1..--n-len (length generalisation; default M = n_len)"))
    per_length: int = field(default=1024, metadata=_help("fixed data and test sequences per length (paper: 1024)"))
    data_seed: int = field(default=0, metadata=_help("dataset seed (0 = the published dataset)"))
    seed: int = field(default=0, metadata=_help("model init, data order and dropout seed"))
    # Fresh sequences every batch: the model cannot memorise, it has to find the circuit.
    data: Data = field(default="online", metadata=_help("fixed paper dataset or fresh sequences per batch"))
    # One (task, length) per batch: no padding, ~1.7x fewer tokens than padding to 35.
    # Mixed lengths in every batch: with one length per batch (the paper's loader) each step can fit a look-up
    # for that length alone, and most runs settle on a circuit without the iteration head; mixed, only a look-up
    # relative to EoI lowers the loss of the whole batch (benchmarks/results/seed_sweep.md). Costs ~2x per step.
    bucket: bool = field(default=False, metadata=_help(
        "one length per batch, as the paper's loader (the default mixes lengths in every batch, padded)"))
    task_weights: list[float] | None = field(default=None, metadata=_help("mixture weights, one per --task, e.g. 0.3,0.7"))
    # "auto": binary copy fading out for every task (copy needs exactly the circuit's attention with a trivial
    # MLP, so it teaches the head before the harder F), plus a constant share of cumsum rows for tasks with
    # few distinct inputs at the evaluated lengths (auto_curriculum). Applies to training from scratch on online
    # data (resolve_config); the run stores the curriculum it resolved to.
    curriculum: str = field(default=AUTO, metadata=_help(
        "helper tasks, TASK:SHARE:STEPS[:MAX_LEN[:START]][,...]: SHARE of the rows from step START (default 0), "
        "fading to none over STEPS (0 = constant), on lengths 1..MAX_LEN (empty or absent: the run's, "
        "--max-train-len); '' for none; "
        "auto = binary_copy:0.5:3000, plus cumsum:0.3:0 for a task with fewer than 256 distinct inputs at some length "
        "from 4 (binary tasks)"))
    length_warmup: int = field(default=0, metadata=_help("steps over which the longest length grows from 1 to n_len"))
    # Once the head forms, runs that miss 0.99 miss whole lengths: draw the lengths still wrong more often.
    length_sampling: LengthSampling = field(default="adaptive", metadata=_help(
        "online data: lengths uniform, or adaptive (once attn1 peakiness reaches 0.5, the lengths the model still "
        "gets wrong are drawn more often)"))
    # Short lengths have few distinct inputs (a binary task has 2^L) and can be memorised: "linear" draws L in
    # proportion to L, so every chain step is drawn equally often and the long lengths weigh more
    # (benchmarks/results/length_generalisation_notes.md, session 16). None = auto (auto_length_weights): linear
    # for parity, uniform otherwise; uniform for transfer and the fixed dataset.
    length_weights: LengthWeights | None = field(default=None, metadata=_help(
        "online data: how lengths 1..max are drawn before --length-sampling adapts them: uniform, or linear "
        "(P(L) proportional to L, every chain step equally often); auto = linear for parity, else uniform"))
    # None = auto (auto_position_offsets): on for every task but polynomial (without them most cumsum, s3_product
    # and binary runs settled on another circuit instead of forming the head); resolved from the tasks.
    position_offsets: bool | None = field(default=None, metadata=_help(
        "online data: shift each training sequence by a random number of positions within the context, so every "
        "position is trained and the look-up must be relative to EoI; --no-position-offsets for none; auto = on "
        "for every task but polynomial"))
    # --- optimisation ----------------------------------------------------------------------------------------
    lr: float = field(default=1e-3, metadata=_help("Adam learning rate after warmup"))
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=_help("Adam betas, e.g. 0.9,0.99"))
    # Emergence counts steps, not samples: small batches reach the head in less wall time.
    batch_size: int = field(default=32, metadata=_help("sequences per optimizer step"))
    warmup_steps: int = field(default=200, metadata=_help("linear warmup from 0"))
    schedule: Schedule = field(default="cosine", metadata=_help(
        "learning-rate schedule after warmup (formed-cosine: constant until attn1 peakiness >= 0.9, then cosine to 0 "
        "over --decay-steps and stop)"))
    decay_steps: int = field(default=4000, metadata=_help("formed-cosine: decay steps after the head forms"))
    epochs: int | None = field(default=None, metadata=_help("epochs (paper: 1000 of 64 steps)", group="length"))
    # The run's whole budget, restarts included: an attempt restarted at step 3,000 leaves the next one the rest.
    # None = auto (auto_max_steps, unless --epochs is given): 12,000, and 9,000 for cumsum and s3_product, whose
    # heads form early. 12,000 steps took 414-603 s two at a time on the 2-core Xeon (a run may take 15 minutes;
    # 9,000 took 801-828 s on the slowest 2-core CPU we measured).
    max_steps: int | None = field(default=None, metadata=_help(
        "optimizer steps in all: an attempt after a restart gets what the attempts before it left; auto = 12,000, "
        "or 9,000 for cumsum and s3_product",
        group="length"))
    grad_accum: int = field(default=1, metadata=_help("gradient accumulation steps"))
    mixed_precision: MixedPrecision = field(default="no", metadata=_help("no, fp16 or bf16"))
    compile: bool = field(default=False, metadata=_help("torch.compile the model (inductor)"))
    # --- evaluation, logging, checkpoints --------------------------------------------------------------------
    eval_every: int = field(default=500, metadata=_help("steps between evaluations (accuracy + peakiness)"))
    eval_per_length: int = field(default=256, metadata=_help("test sequences per length during training"))
    log_every: int = field(default=50, metadata=_help("steps between training records"))
    checkpoint_every: int = field(default=1000, metadata=_help("steps between save_state checkpoints"))
    keep_checkpoints: int = field(default=2, metadata=_help("checkpoints kept"))
    report_to: str = field(default="auto", metadata=_help("Accelerate tracker: auto (tensorboard if installed), none, ..."))
    stop_when_solved: bool = field(default=False, metadata=_help(
        "stop once accuracy >= 0.99 and attn1 >= 0.9 (means over lengths 4..--n-len: with --max-train-len, the "
        "unseen lengths too)"))
    # A run heading for another circuit shows it early: at step 3,000 the layer-2 attention mass on x_t was
    # 0.12-0.39 in 19 of the 23 six-thousand-step CPU runs whose head never formed (the other four ended with a
    # partial or gated head, peakiness 0.63-0.89) and 0.49-0.99 in 24 of the 27 whose head formed (the three others,
    # 0.31-0.35, formed late: two parity runs and one polynomial run with offsets; seed_sweep.jsonl, session 8).
    # With position offsets the mass rises later (a cumsum run at 0.22 at step 2,500 was at 0.50 at 3,000 and formed
    # the head), hence step 3,000 and 0.4.
    # Starting again from a fresh initialisation is cheaper than waiting.
    # None = auto (auto_restart_at): 3,000, and 1,000 for binary copy, whose head shows by then or not at all.
    restart_at: int | None = field(default=None, metadata=_help(
        "at the first evaluation from this step on, restart from a fresh initialisation if the iteration head is "
        "not forming (attn1 mass below --restart-below); 0 = never; auto = 3000, or 1000 for binary_copy"))
    # None = auto (auto_restart_below): 0.4, and 0.22 for the binary tasks judged at step 3,000 (late heads).
    restart_below: float | None = field(default=None, metadata=_help(
        "attn1 mass under which --restart-at restarts; auto = 0.4, or 0.22 for a task with fewer than 256 distinct "
        "inputs at some length from 4 (binary tasks) judged after step 1000"))
    # Layer 1's anchor is decided early: an attempt whose layer 1 has not found EoI by step 1,000 (attn0 peakiness
    # below 0.2 at every evaluation so far) settled on another anchor, and its head never formed (0 of 8 recorded
    # attempts; auto_anchor_below). A restart there costs 1,000 steps. Off by default: in binary copy most fresh
    # attempts do not anchor either, and on seeds 0-5 restarting them gained no run (seed_sweep.md, anchor-s11).
    anchor_at: int = field(default=0, metadata=_help(
        "at the first evaluation from this step on, restart from a fresh initialisation if layer 1 has not anchored "
        "on EoI (attn0 peakiness below --anchor-below at every evaluation so far); 0 = never"))
    # None = auto (auto_anchor_below): 0.2 with position offsets, 0 (never) without.
    anchor_below: float | None = field(default=None, metadata=_help(
        "attn0 peakiness under which --anchor-at restarts; auto = 0.2 with --position-offsets, 0 (never) without"))
    # Restarts share the run's step budget (max_steps), so they never make a run longer; each must leave the next
    # attempt at least the steps this one had when judged. None = auto (auto_max_restarts): one, as a second
    # restart at step 3,000 would leave the last attempt 6,000 of 12,000 steps; two for polynomial, whose heads
    # form and finish within those 6,000; five for binary copy, judged at step 1,000 (7,000 steps left after all five).
    max_restarts: int | None = field(default=None, metadata=_help(
        "restarts at most (they share --max-steps; the wall time of every attempt counts); auto = 1, 2 for "
        "polynomial, 5 for binary_copy"))
    attempt: int = 0  # which attempt of the run this is (restarts); not a flag
    restarted_at: tuple[int, ...] = ()  # the step at which each earlier attempt stopped; not a flag
    # On a busy 2-core CPU one thread can be many times faster than two (OpenMP spinning); results differ in
    # the last bits with the thread count, so a resumed run uses the stored one.
    threads: int = field(default=0, metadata=_help("CPU threads for torch (0 = torch's default)"))

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.curriculum == AUTO and self.tasks:
            self.curriculum = auto_curriculum(self.tasks, self.n_len)
        self.helpers = parse_curriculum("" if self.curriculum == AUTO else self.curriculum)  # not a field: not saved
        if self.length_weights is None and self.tasks:
            self.length_weights = auto_length_weights(self.tasks)
        if self.max_steps is None and self.epochs is None and self.tasks:
            self.max_steps = auto_max_steps(self.tasks, self.n_len)
        if self.position_offsets is None and self.tasks:
            self.position_offsets = auto_position_offsets(self.tasks)
        if self.restart_at is None and self.tasks:
            self.restart_at = auto_restart_at(self.tasks)
        if self.restart_below is None and self.tasks:
            self.restart_below = auto_restart_below(self.tasks, self.n_len, self.restart_at)  # resolved just above
        if self.max_restarts is None and self.tasks:
            self.max_restarts = auto_max_restarts(self.tasks)
        if self.anchor_below is None and self.position_offsets is not None:
            self.anchor_below = auto_anchor_below(self.position_offsets)
        self.restarted_at = tuple(self.restarted_at)

    @property
    def run_seed(self) -> int:
        """The seed of this attempt: ``seed`` itself, then one derived from (seed, attempt) after each restart."""
        if not self.attempt:
            return self.seed
        return int(np.random.SeedSequence([self.seed, self.attempt]).generate_state(1)[0])

    @property
    def restart_step(self) -> int:
        """The step of the evaluation that may restart the run: the first at or after ``restart_at`` (0: none)."""
        return -(-self.restart_at // self.eval_every) * self.eval_every if self.restart_at else 0

    @property
    def spent(self) -> int:
        """The steps the earlier attempts used."""
        return sum(self.restarted_at)

    def attempt_steps(self, budget: int) -> int:
        """The steps of this attempt: the run's budget less what the attempts before it used, so restarts never
        make a run longer."""
        return budget - self.spent

    def may_restart(self, budget: int, step: int) -> bool:
        """Whether this attempt may restart at ``step``: restarts left, and the next attempt would have at least
        the steps this one had when judged (else it could not get as far before the budget ends)."""
        return self.attempt < self.max_restarts and self.attempt_steps(budget) - step >= step

    @property
    def longest_trained(self) -> int:
        """The longest length the run trains on (``max_train_len``, else ``n_len``); evaluation goes to n_len."""
        return self.max_train_len or self.n_len

    @property
    def longest_drawn(self) -> int:
        """The longest length any training row has: the run's, or a helper's when it trains on longer ones."""
        return max([self.longest_trained, *(h.max_len or 0 for h in self.helpers)])

    @property
    def all_tasks(self) -> list[str]:
        """The tasks the run sees: its own, then the curriculum's helpers."""
        return list(dict.fromkeys(self.tasks + [h.task for h in self.helpers]))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        data = json.loads(path.read_text())
        data.setdefault("length_sampling", "uniform")  # runs saved before the option existed were uniform
        data.setdefault("anchor_at", 0)  # runs saved before the anchor check had none
        data.setdefault("length_weights", "uniform")  # runs saved before the option existed drew lengths uniformly
        if "restarted_at" not in data and data.get("attempt"):  # before it was stored: each stopped at restart_at
            step = replace(FAST, restart_at=data["restart_at"], eval_every=data["eval_every"]).restart_step
            data["restarted_at"] = [step] * data["attempt"]
        return cls(**{k: v for k, v in data.items() if k in {f.name for f in fields(cls)}})


FAST = TrainConfig()
PAPER = replace(FAST, recipe="paper", data="fixed", lr=3e-4, warmup_steps=0, schedule="constant", batch_size=256,
                epochs=1000, max_steps=None, curriculum="", length_sampling="uniform", length_weights="uniform",
                position_offsets=False, eval_every=640, bucket=True, restart_at=0, anchor_at=0)
RECIPES = {"fast": FAST, "paper": PAPER}


# --- the CLI flags, generated from the fields ----------------------------------------------------------------------


def _comma(kind: type):
    def parse(text: str):
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}s separated by commas, got {text!r}") from None

    return parse


# fields whose None means "chosen from the tasks" (TrainConfig.__post_init__)
AUTO_FIELDS = ("length_weights", "max_steps", "position_offsets", "restart_at", "restart_below", "max_restarts", "anchor_below")


def shown(value) -> str:
    """A field's value as a flag takes it: lists comma-joined, none for no value."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return "none" if value in (None, "") else str(value)


def is_auto(cfg: TrainConfig, name: str) -> bool:
    """Whether the recipe leaves field ``name`` to be chosen from the tasks (``--max-steps``: unless ``--epochs``)."""
    return getattr(cfg, name) is None and name in AUTO_FIELDS and not (name == "max_steps" and cfg.epochs)


def _recipe_note(name: str) -> str:
    """`` (default X)``, or `` (fast: X; paper: Y)`` where the recipes differ; nothing for an empty default."""
    values = {recipe: "auto" if is_auto(cfg, name) else shown(getattr(cfg, name)) for recipe, cfg in RECIPES.items()}
    if len(set(values.values())) > 1:
        return " (" + "; ".join(f"{recipe}: {v}" for recipe, v in values.items()) + ")"
    return "" if values["fast"] in ("none", "") else f" (default {values['fast']})"


def _unwrap_optional(hint):
    """``X | None`` -> ``X``; any other hint as it is."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per documented field. Every default is None, so ``resolve_config`` knows what was given."""
    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in fields(TrainConfig):
        if "help" not in f.metadata:
            continue
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        target = parser
        if "group" in f.metadata:
            if f.metadata["group"] not in groups:
                groups[f.metadata["group"]] = parser.add_mutually_exclusive_group()
            target = groups[f.metadata["group"]]
        hint, text = hints[f.name], f.metadata["help"]
        kind = _unwrap_optional(hint)
        if kind is bool and flag.startswith("--no-"):
            target.add_argument(flag, dest=f.name, action="store_false", default=None, help=text)
        elif kind is bool and f.default is True:
            target.add_argument(flag, dest=f.name, action="store_true", default=None, help=text + _recipe_note(f.name))
            target.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", help=argparse.SUPPRESS)
        elif kind is bool:
            target.add_argument(flag, dest=f.name, action="store_true", default=None, help=text + _recipe_note(f.name))
            target.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", help=argparse.SUPPRESS)
        elif typing.get_origin(kind) is Literal:
            target.add_argument(flag, dest=f.name, choices=typing.get_args(kind), help=text + _recipe_note(f.name))
        elif typing.get_origin(kind) in (list, tuple):
            item = typing.get_args(kind)[0]
            parse = _comma(item)
            if typing.get_origin(kind) is tuple:
                parse = (lambda p: lambda s: tuple(p(s)))(parse)  # noqa: E731
            target.add_argument(flag, dest=f.name, type=parse, metavar=flag[2:].upper().replace("-", "_"),
                                help=text + _recipe_note(f.name))
        else:
            target.add_argument(flag, dest=f.name, type=kind, required=f.metadata.get("required", False),
                                help=text + _recipe_note(f.name))


def given_flags(args: argparse.Namespace) -> dict:
    """The fields whose flags were given on the command line (every flag defaults to None)."""
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}


def flag_name(field_name: str) -> str:
    f = next(f for f in fields(TrainConfig) if f.name == field_name)
    return f.metadata.get("flag", "--" + field_name.replace("_", "-"))


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The recipe's values, overridden by every flag given; every mistake is an IterHeadsError here."""
    name = args.recipe or "fast"
    if name not in RECIPES:
        raise IterHeadsError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    given = given_flags(args)
    if "epochs" in given:  # --epochs and --max-steps: the one given wins over the recipe's
        given["max_steps"] = None
    elif "max_steps" in given:
        given["epochs"] = None
    data = given.get("data", recipe.data)
    if "curriculum" not in given and (given.get("init_from") or data == "fixed"):
        given["curriculum"] = ""  # fine-tuning (transfer) and the fixed dataset: the given task only, unless asked
    if "position_offsets" not in given and (given.get("init_from") or data == "fixed"):
        given["position_offsets"] = False  # transfer and the fixed dataset keep the checkpoint's / paper's positions
    if "length_weights" not in given and (given.get("init_from") or data == "fixed"):
        given["length_weights"] = "uniform"  # transfer and the fixed dataset: lengths as the paper draws them
    if "length_sampling" not in given and data == "fixed":
        given["length_sampling"] = "uniform"  # the fixed dataset has its own lengths
    cfg = replace(recipe, **given)
    check_config(cfg)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """Every combination that cannot train says so in one line, before anything is written."""
    from ..modeling import PRESETS

    if not cfg.tasks:
        raise IterHeadsError("give at least one task with --task (e.g. --task polynomial)")
    for name in cfg.tasks:
        get_task(name)
    if cfg.task_weights is not None and (len(cfg.task_weights) != len(cfg.tasks) or min(cfg.task_weights) < 0
                                         or sum(cfg.task_weights) <= 0):
        raise IterHeadsError(f"--task-weights needs {len(cfg.tasks)} non-negative numbers, one per task")
    if cfg.preset not in PRESETS:
        raise IterHeadsError(f"unknown model preset {cfg.preset!r}; known presets: {', '.join(PRESETS)}")
    positive = dict(n_len=cfg.n_len, per_length=cfg.per_length, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                    eval_every=cfg.eval_every, eval_per_length=cfg.eval_per_length, log_every=cfg.log_every,
                    checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints, decay_steps=cfg.decay_steps)
    for name, value in positive.items():
        if value is None or value < 1:
            raise IterHeadsError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if cfg.max_train_len is not None and not 1 <= cfg.max_train_len <= cfg.n_len:
        raise IterHeadsError(f"--max-train-len must be between 1 and --n-len ({cfg.n_len}), got {cfg.max_train_len}")
    for h in cfg.helpers:
        if h.max_len is not None and h.max_len > cfg.n_len:
            raise IterHeadsError(f"--curriculum: {h.task}'s longest length {h.max_len} is over --n-len ({cfg.n_len}), "
                                 "which sets the model's context")
    if not cfg.lr > 0:
        raise IterHeadsError(f"--lr must be > 0, got {cfg.lr}")
    if not all(0 <= b < 1 for b in cfg.betas) or len(cfg.betas) != 2:
        raise IterHeadsError(f"--betas needs two numbers in [0, 1), e.g. 0.9,0.999; got {','.join(map(str, cfg.betas))}")
    length = cfg.max_steps if cfg.max_steps is not None else cfg.epochs
    if (cfg.max_steps is None) == (cfg.epochs is None) or length < 1:
        raise IterHeadsError("give a positive --epochs or --max-steps (not both)")
    for name in ("seed", "data_seed", "warmup_steps", "length_warmup", "threads", "restart_at", "anchor_at",
                 "max_restarts", "query_init_scale"):
        if getattr(cfg, name) < 0:
            raise IterHeadsError(f"{flag_name(name)} must be 0 or more, got {getattr(cfg, name)}")
    if not 0 <= cfg.restart_below <= 1:
        raise IterHeadsError(f"--restart-below must be between 0 and 1 (an attention mass), got {cfg.restart_below}")
    if not 0 <= cfg.anchor_below <= 1:
        raise IterHeadsError(f"--anchor-below must be between 0 and 1 (a peakiness), got {cfg.anchor_below}")
    if len(set(cfg.tasks)) != len(cfg.tasks):
        raise IterHeadsError(f"--task names a task twice: {','.join(cfg.tasks)}")
    if (cfg.helpers or cfg.length_warmup or cfg.length_sampling != "uniform" or cfg.length_weights != "uniform"
            or cfg.position_offsets) and cfg.data != "online":
        raise IterHeadsError("--curriculum, --length-warmup, --length-sampling adaptive, --length-weights linear and "
                             "--position-offsets need --data online (the fixed dataset is fixed)")
