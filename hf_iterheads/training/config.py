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
from ..tasks import get_task, source_of

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
    # distances the main task never sees (length generalisation).
    max_len: int | None = None
    # A helper that joins once the head has formed cannot stop the head forming, and still trains the look-up
    # on longer lengths.
    start: int = 0

    def share_at(self, step: int) -> float:
        """The helper's share of the rows at ``step``."""
        if step < self.start:
            return 0.0
        return self.share if self.steps == 0 else self.share * max(0.0, 1.0 - (step - self.start) / self.steps)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_curriculum(spec: str) -> tuple[Helper, ...]:
    """``"binary_copy:0.5:1000,cumsum:0.2:0:16:4000"`` -> helpers (task, share when it starts, steps to fade
    (0 = constant), longest length (empty or absent: the run's), step it starts at (default 0))."""
    out = []
    for part in filter(None, (spec or "").split(",")):
        bits = part.split(":")
        if len(bits) > 1 and not _is_number(bits[1]):  # an import string module:attr names the helper task
            bits = [f"{bits[0]}:{bits[1]}", *bits[2:]]
        try:
            if len(bits) > 5:
                raise ValueError
            helper = Helper(bits[0], float(bits[1]), int(bits[2] if len(bits) > 2 else 0),
                            int(bits[3]) if len(bits) > 3 and bits[3] else None, int(bits[4]) if len(bits) > 4 else 0)
        except (IndexError, ValueError):
            raise IterHeadsError(f"cannot read curriculum {part!r}; write TASK:SHARE[:STEPS[:MAX_LEN[:START]]], "
                                 "e.g. binary_copy:0.5:1000") from None
        helper = helper._replace(task=get_task(helper.task).name)
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
FEW_INPUTS_HELPER = "cumsum:0.3:0"  # for tasks whose own rows teach the look-up poorly (auto_curriculum)

# Every auto default below follows from what the tasks are (``tasks.TaskProperties``), never from their names; a
# mixture gets a task's default only when every task in it has the property. Why each rule: the documentation's
# Explanation page "Why the training defaults", with the seed-sweep data behind each row.
RESTART_AT, EARLY_RESTART_AT = 3000, 1000  # the plateau restart's step (auto_restart_at)
RESTART_BELOW, FEW_INPUTS_RESTART_BELOW = 0.4, 0.22  # the plateau restart's threshold (auto_restart_below)
MAX_RESTARTS, EARLY_MAX_RESTARTS = 1, 5  # restarts at most (auto_max_restarts)
ANCHOR_BELOW = 0.2  # the anchor restart's threshold on attn0 peakiness (auto_anchor_below)
MAX_STEPS, QUICK_MAX_STEPS = 12000, 9000  # the run's step budget (auto_max_steps)
LARGE_TABLE = 256  # (state, input) pairs above which a head forms after the plateau check (auto_restart_at)


def _every(tasks: list[str], test) -> bool:
    """Whether every task of the run has the property ``test(TaskProperties)`` (False for no task)."""
    return bool(tasks) and all(test(get_task(t).properties) for t in tasks)


def _needs_cumsum_rows(p, n_len: int) -> bool:
    """A task whose own rows teach the look-up of ``x_t`` poorly: few distinct inputs (memorised instead), or a
    state that makes a step ignore ``x_t`` (no signal there)."""
    return p.few_inputs(n_len) or not p.input_recoverable


def few_inputs(tasks: list[str], n_len: int) -> bool:
    """Whether some task has fewer than ``tasks.FEW_INPUTS`` distinct inputs at some evaluated length (4..n_len):
    a model can memorise such a length's training inputs instead of looking ``x_t`` up."""
    return any(get_task(t).properties.few_inputs(n_len) for t in tasks)


def early_head(tasks: list[str]) -> bool:
    """Whether no task reads its state (``s_t = g(x_t)``, binary copy): the head alone solves it, and whether an
    attempt will form it shows by step 1,000."""
    return _every(tasks, lambda p: not p.reads_state)


def auto_position_offsets(tasks: list[str]) -> bool:
    """``--position-offsets``: on for every task. With offsets no absolute position means anything, so a look-up
    tied to one length cannot fit, and layer 1 anchors on EoI early (the documentation's "Why the training
    defaults" has the measurements)."""
    return bool(tasks)


def large_table(tasks: list[str]) -> bool:
    """Whether some task's step table has more than ``LARGE_TABLE`` (state, input) pairs: its MLP has that many
    cases to learn before a look-up of ``x_t`` pays, so layer 2's mass on ``x_t`` rises only after step 3,000."""
    return any(get_task(t).properties.n_states * get_task(t).properties.n_inputs > LARGE_TABLE for t in tasks)


def auto_restart_at(tasks: list[str]) -> int:
    """``--restart-at``: step 1,000 where the head alone solves the task (``early_head``); 0 (one attempt with the
    whole budget) where a task's table is large (``large_table``): a check at step 3,000 would cut heads that are
    still forming; else 3,000."""
    if early_head(tasks):
        return EARLY_RESTART_AT
    return 0 if large_table(tasks) else RESTART_AT


def auto_restart_below(tasks: list[str], n_len: int, restart_at: int) -> float:
    """``--restart-below``: 0.4, or 0.22 when a task has few distinct inputs and the run is judged after step 1,000
    (those heads form late, from lower layer-2 masses)."""
    late = not restart_at or restart_at > EARLY_RESTART_AT  # 0: never judged
    return FEW_INPUTS_RESTART_BELOW if late and few_inputs(tasks, n_len) else RESTART_BELOW


def auto_max_restarts(tasks: list[str], n_len: int = 16, restart_at: int | None = None) -> int:
    """``--max-restarts``: 5 where the run is judged at step 1,000 (the last attempt keeps 7,000 of 12,000 steps);
    0 for a large table never judged (``large_table``; ``restart_at``: the run's resolved ``--restart-at``, auto
    when None); 1 with few distinct inputs (late heads need the steps); else as many as leave the last attempt half
    the budget (2 of 12,000 steps, 1 of 9,000)."""
    if early_head(tasks):
        return EARLY_MAX_RESTARTS
    if large_table(tasks) and not (auto_restart_at(tasks) if restart_at is None else restart_at):
        return 0
    if few_inputs(tasks, n_len):
        return MAX_RESTARTS
    return max(MAX_RESTARTS, auto_max_steps(tasks, n_len) // (2 * RESTART_AT))


def auto_anchor_below(position_offsets: bool) -> float:
    """``--anchor-below`` (used with ``--anchor-at``): 0.2 with position offsets, else 0 (no anchor check): without
    offsets layer 1 finds EoI too late to be judged at step 1,000."""
    return ANCHOR_BELOW if position_offsets else 0.0


def auto_curriculum(tasks: list[str], n_len: int) -> str:
    """The default curriculum: the copy helper (the look-up alone) always; a constant 30% of cumsum rows too when a
    task's own rows teach the look-up poorly (few distinct inputs, or a state that ignores ``x_t``), so that the
    look-up is trained on inputs that cannot be memorised and always matter."""
    extra = any(_needs_cumsum_rows(get_task(t).properties, n_len) for t in tasks)
    return COPY_HELPER + ("," + FEW_INPUTS_HELPER if extra else "")


def auto_length_weights(tasks: list[str], n_len: int = 16) -> str:
    """``--length-weights``: linear (P(L) proportional to L) when every task reads its state and gets the cumsum
    rows (few distinct inputs, or a state that ignores ``x_t``), so the long lengths, which cannot be memorised and
    hold the most steps that do read ``x_t``, get most rows; uniform otherwise (a task the head alone solves is
    judged at step 1,000, and keeps the lengths that judgement was measured with)."""
    return "linear" if _every(tasks, lambda p: p.reads_state and _needs_cumsum_rows(p, n_len)) else "uniform"


def length_recipe(n_len: int) -> list[str]:
    """Flags that make a run trained on lengths 1..M (``--max-train-len M``) right on the longer lengths up to
    ``n_len`` too: cumsum helper rows on every length 1..n_len, lengths drawn in proportion to L, position offsets.
    Online data only (linear weights cannot re-draw the fixed dataset)."""
    return ["--curriculum", f"{COPY_HELPER},{FEW_INPUTS_HELPER}:{n_len}", "--length-weights", "linear",
            "--position-offsets"]


def auto_max_steps(tasks: list[str], n_len: int) -> int:
    """``--max-steps`` (unless ``--epochs`` is given): 9,000 when every task reads its state, its input is
    recoverable from each step, it has inputs enough (such heads form by step 4,500) and no table is large
    (``large_table``: later heads); else 12,000."""
    quick = _every(tasks, lambda p: p.reads_state and p.input_recoverable and not p.few_inputs(n_len))
    return QUICK_MAX_STEPS if quick and not large_table(tasks) else MAX_STEPS


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class TrainConfig:
    """One training run; saved as ``run_config.json`` so that ``--resume`` needs nothing else.

    Fields with ``help`` metadata are CLI flags (``--field-name``, or ``flag``); the defaults are the fast recipe.
    """

    tasks: list[str] = field(default_factory=list, metadata=_help(
        "task: a name, an import string package.module:attr, or a mixture separated by commas (e.g. binary_copy,parity)",
        flag="--task"))
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
    # for that length alone; mixed, only a look-up relative to EoI lowers the loss of the whole batch. ~2x per step.
    bucket: bool = field(default=False, metadata=_help(
        "one length per batch, as the paper's loader (the default mixes lengths in every batch, padded)"))
    task_weights: list[float] | None = field(default=None, metadata=_help("mixture weights, one per --task, e.g. 0.3,0.7"))
    # "auto" (auto_curriculum): binary copy fading out (it needs exactly the head's look-up with a trivial MLP),
    # plus cumsum rows for tasks whose own rows teach the look-up poorly. From scratch on online data only; the run stores it.
    curriculum: str = field(default=AUTO, metadata=_help(
        "helper tasks, TASK:SHARE:STEPS[:MAX_LEN[:START]][,...]: SHARE of the rows from step START (default 0), "
        "fading to none over STEPS (0 = constant), on lengths 1..MAX_LEN (empty or absent: the run's, "
        "--max-train-len); '' for none; "
        "auto = binary_copy:0.5:3000, plus cumsum:0.3:0 for a task with fewer than 256 distinct inputs at some length "
        "from 4 or a state that makes a step ignore its input"))
    length_warmup: int = field(default=0, metadata=_help("steps over which the longest length grows from 1 to n_len"))
    # Once the head forms, runs that miss 0.99 miss whole lengths: draw the lengths still wrong more often.
    length_sampling: LengthSampling = field(default="adaptive", metadata=_help(
        "online data: lengths uniform, or adaptive (once attn1 peakiness reaches 0.5, the lengths the model still "
        "gets wrong are drawn more often)"))
    # "linear" draws L in proportion to L: every chain step equally often, the long lengths weigh more.
    # None = auto (auto_length_weights); uniform for transfer and the fixed dataset.
    length_weights: LengthWeights | None = field(default=None, metadata=_help(
        "online data: how lengths 1..max are drawn before --length-sampling adapts them: uniform, or linear "
        "(P(L) proportional to L, every chain step equally often); auto = linear for a task that reads its state and "
        "has fewer than 256 distinct inputs at some length from 4 or a state that ignores its input, else uniform"))
    # None = auto (auto_position_offsets), resolved from what the tasks are.
    position_offsets: bool | None = field(default=None, metadata=_help(
        "online data: shift each training sequence by a random number of positions within the context, so every "
        "position is trained and the look-up must be relative to EoI; --no-position-offsets for none; auto = on"))
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
    # None = auto (auto_max_steps, unless --epochs is given).
    max_steps: int | None = field(default=None, metadata=_help(
        "optimizer steps in all: an attempt after a restart gets what the attempts before it left; auto = 12,000, "
        "or 9,000 when every task reads its state, x_t is recoverable from each step and inputs are many",
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
    # A run heading for another circuit shows it early (a low layer-2 mass on x_t); starting again from a fresh
    # initialisation is cheaper than waiting. None = auto (auto_restart_at).
    restart_at: int | None = field(default=None, metadata=_help(
        "at the first evaluation from this step on, restart from a fresh initialisation if the iteration head is "
        "not forming (attn1 mass below --restart-below); 0 = never; auto = 3000, or 1000 for a task that does not "
        "read its state (s_t = g(x_t)), or 0 for a task with more than 256 (state, input) pairs"))
    # None = auto (auto_restart_below).
    restart_below: float | None = field(default=None, metadata=_help(
        "attn1 mass under which --restart-at restarts; auto = 0.4, or 0.22 for a task with fewer than 256 distinct "
        "inputs at some length from 4 judged after step 1000"))
    # Layer 1's anchor is decided early: an attempt whose layer 1 has not found EoI by step 1,000 settled on
    # another anchor. Off by default: restarting such attempts gained no run in the seed sweeps.
    anchor_at: int = field(default=0, metadata=_help(
        "at the first evaluation from this step on, restart from a fresh initialisation if layer 1 has not anchored "
        "on EoI (attn0 peakiness below --anchor-below at every evaluation so far); 0 = never"))
    # None = auto (auto_anchor_below): 0.2 with position offsets, 0 (never) without.
    anchor_below: float | None = field(default=None, metadata=_help(
        "attn0 peakiness under which --anchor-at restarts; auto = 0.2 with --position-offsets, 0 (never) without"))
    # Restarts share the run's step budget (max_steps), so they never make a run longer; each must leave the next
    # attempt at least the steps this one had when judged. None = auto (auto_max_restarts).
    max_restarts: int | None = field(default=None, metadata=_help(
        "restarts at most (they share --max-steps; the wall time of every attempt counts); auto = 5 when judged at "
        "step 1000, 0 when never judged, 1 for a task with few distinct inputs, else as many as leave the last "
        "attempt half the budget"))
    # task name -> the import string (module:attr) it came from, so a new process finds it again; not a flag
    task_sources: dict[str, str] = field(default_factory=dict)
    attempt: int = 0  # which attempt of the run this is (restarts); not a flag
    restarted_at: tuple[int, ...] = ()  # the step at which each earlier attempt stopped; not a flag
    # On a busy 2-core CPU one thread can be many times faster than two (OpenMP spinning); results differ in
    # the last bits with the thread count, so a resumed run uses the stored one.
    threads: int = field(default=0, metadata=_help("CPU threads for torch (0 = torch's default)"))

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        for source in dict(self.task_sources).values():  # a stored run: import its tasks again, then name them
            get_task(source)
        self.tasks = [get_task(t).name for t in self.tasks]  # "module:attr" -> the task's name (source kept below)
        if self.curriculum == AUTO and self.tasks:
            self.curriculum = auto_curriculum(self.tasks, self.n_len)
        self.helpers = parse_curriculum("" if self.curriculum == AUTO else self.curriculum)  # not a field: not saved
        if self.length_weights is None and self.tasks:
            self.length_weights = auto_length_weights(self.tasks, self.n_len)
        if self.max_steps is None and self.epochs is None and self.tasks:
            self.max_steps = auto_max_steps(self.tasks, self.n_len)
        if self.position_offsets is None and self.tasks:
            self.position_offsets = auto_position_offsets(self.tasks)
        if self.restart_at is None and self.tasks:
            self.restart_at = auto_restart_at(self.tasks)
        if self.restart_below is None and self.tasks:
            self.restart_below = auto_restart_below(self.tasks, self.n_len, self.restart_at)  # resolved just above
        if self.max_restarts is None and self.tasks:
            self.max_restarts = auto_max_restarts(self.tasks, self.n_len, self.restart_at)  # resolved above
        if self.anchor_below is None and self.position_offsets is not None:
            self.anchor_below = auto_anchor_below(self.position_offsets)
        self.restarted_at = tuple(self.restarted_at)
        self.task_sources = {**self.task_sources, **{n: source_of(n) for n in self.all_tasks if source_of(n)}}

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
    from ..presets import PRESETS

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
