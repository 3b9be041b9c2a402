"""What happens around each optimizer step, one object per concern (minGPT's callback style).

The loop calls ``on_start`` once, ``on_batch`` after every backward pass, ``on_step`` after every optimizer
step, in list order. A new training signal is a new callback, not a new branch in the loop. Everything about
the iteration head (evaluations, the solved / formed / adapting events, the formed-cosine trigger,
stop-when-solved) lives in ``HeadWatch``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..evaluation import FORMED, SOLVED, evaluate_model, summarize_lengths
from .artifacts import MetricsLog, read_metrics, save_checkpoint
from .config import TrainConfig
from .data import AdaptiveLengths, TrainData
from .schedule import FormedThenCosine


@dataclass
class Run:
    """What the loop shares with its callbacks. ``stop = True`` ends the run after the current step."""

    cfg: TrainConfig
    accelerator: Any
    model: Any  # as prepared by the accelerator
    out: Path
    total_steps: int  # this attempt's
    steps_per_epoch: int
    budget: int  # the whole run's steps, every attempt included
    log: MetricsLog | None = None
    step: int = 0
    elapsed: float = 0.0  # seconds trained before this process (resume)
    start: float = 0.0  # perf_counter origin: time = perf_counter() - start
    time: float = 0.0  # seconds trained so far, as of the last step
    stop: bool = False

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


class Plateau(Exception):
    """Raised by ``HeadWatch`` at ``--anchor-at`` (layer 1 has not anchored on EoI) or ``--restart-at`` (the
    iteration head is not forming): the run starts again from a fresh initialisation."""

    def __init__(self, step: int) -> None:
        super().__init__(step)
        self.step = step


class Callback:
    def on_start(self, run: Run) -> None: ...

    def on_batch(self, run: Run, batch: dict, loss: torch.Tensor, correct: torch.Tensor) -> None: ...

    def on_step(self, run: Run) -> None: ...


def head_formed(results: list[dict], max_len: int, threshold: float = FORMED) -> bool:
    """attn1 peakiness >= ``threshold`` for every task, averaged over the trained lengths 4..max_len."""
    for r in results:
        values = [m.get("attn1_peakiness") for L, m in r["per_length"].items() if 4 <= int(L) <= max_len]
        values = [v for v in values if v is not None]
        if not values or float(np.mean(values)) < threshold:
            return False
    return True


class Progress(Callback):
    """The tqdm bar, and a ``train`` record (loss, accuracy, lr, tokens/s) every ``log_every`` steps."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.loss = self.accuracy = 0.0
        self.batches = self.tokens = 0

    def on_start(self, run: Run) -> None:
        self.bar = tqdm(total=run.total_steps, initial=run.step, disable=not run.main, desc="train", dynamic_ncols=True)

    def on_batch(self, run: Run, batch: dict, loss: torch.Tensor, correct: torch.Tensor) -> None:
        self.loss += loss.item()
        self.accuracy += correct.float().mean().item()
        self.batches += 1
        self.tokens += int(batch["attention_mask"].sum())

    def on_step(self, run: Run) -> None:
        self.bar.update(1)
        if run.step % run.cfg.log_every and run.step != run.total_steps:
            return
        record = {"kind": "train", "step": run.step, "epoch": round(run.step / run.steps_per_epoch, 3),
                  "time": round(run.time, 2), "loss": self.loss / self.batches, "train_accuracy": self.accuracy / self.batches,
                  "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": self.tokens / max(run.time - run.elapsed, 1e-9)}
        run.log.write(record)
        run.accelerator.log({f"train/{k}": v for k, v in record.items() if k not in ("kind", "step")}, step=run.step)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['train_accuracy']:.2f}")
        self.loss = self.accuracy = 0.0
        self.batches = 0

    def close(self) -> None:
        self.bar.close()


class LengthFeedback(Callback):
    """Feeds every row's outcome to ``AdaptiveLengths`` (gathered: every process folds in every row, in the same
    order) and lets it republish its weights after each step."""

    def __init__(self, lengths: AdaptiveLengths, task_index: torch.Tensor) -> None:
        self.lengths, self.task_index = lengths, task_index

    def on_batch(self, run: Run, batch: dict, loss: torch.Tensor, correct: torch.Tensor) -> None:
        length = (batch["labels"][:, 1:] != -100).int().argmax(1) - 1  # EoI sits at L + 1
        ids = batch["input_ids"][:, 0]
        if self.task_index.device != ids.device:  # on a GPU the batch is there: index on its device
            self.task_index = self.task_index.to(ids.device)
        rows = torch.stack([self.task_index[ids], length, correct.long()], 1)
        rows = run.accelerator.gather(rows).cpu().numpy()
        self.lengths.observe(rows[:, 0], rows[:, 1], rows[:, 2])

    def on_step(self, run: Run) -> None:
        self.lengths.after_step(run.step)


class HeadWatch(Callback):
    """Evaluates every ``eval_every`` steps (main process) and acts on what the iteration head does.

    Events, each written once to ``metrics.jsonl``: ``solved`` (accuracy >= SOLVED and attn1 >= FORMED for every
    task; ends the run with ``stop_when_solved``), ``formed`` (formed-cosine starts its decay) and ``adapting``
    (attn1 peakiness reached ``AdaptiveLengths.START_PEAKINESS``: adaptive lengths start). The main process decides
    and broadcasts, so every process acts at the same step.
    """

    def __init__(self, cfg: TrainConfig, tokenizer, data: TrainData, formed: FormedThenCosine | None) -> None:
        self.cfg, self.tokenizer, self.data, self.formed = cfg, tokenizer, data, formed
        self.solved_logged = False

    def on_start(self, run: Run) -> None:
        path = run.out / "metrics.jsonl"
        records = read_metrics(path) if run.step > 0 and path.is_file() else []
        self.solved_logged = any(r.get("kind") == "solved" for r in records)
        self.anchor = {}  # task -> best attn0 peakiness of this attempt's evaluations (the anchor check)
        for r in records:  # over the trained lengths where the record has them, as check() remembered it
            if r.get("kind") == "eval":
                self.remember_anchor(r["task"], over_trained_lengths(r).get("attn0_peakiness"))
        if run.step == 0 and run.main:
            self.log_eval(run, self.evaluate(run), 0.0)
        run.stop = self.formed is not None and self.formed.finished(run.step)

    def evaluate(self, run: Run, final: bool = False) -> list[dict]:
        data = self.data.test if final else self.data.eval_data
        model = run.accelerator.unwrap_model(run.model)
        return [evaluate_model(model, self.tokenizer, name, data[name], self.cfg.cot, generate=final, attention=True)
                for name in self.cfg.tasks]

    def log_eval(self, run: Run, results: list[dict], now: float) -> bool:
        """One ``eval`` record per task; True when every task is solved. A run trained on shorter lengths than it
        is evaluated on (``--max-train-len``) also records the attention metrics over its trained lengths
        (``trained``), the ones its restarts read."""
        solved, longest = True, self.cfg.longest_trained
        for r in results:
            s = r["summary"]
            record = {"kind": "eval", "step": run.step, "time": round(now, 2), "task": r["task"], **s,
                      "per_length": {L: m["accuracy"] for L, m in r["per_length"].items()}}
            if longest < self.cfg.n_len:  # the signals the restarts read (trained lengths), for screens and sweeps
                record["trained"] = {"max_len": longest, **{k: trained_mean(r, k, longest) for k in TRAINED_KEYS}}
            run.log.write(record)
            run.accelerator.log({f"eval/{r['task']}/{k}": v for k, v in s.items() if v is not None}, step=run.step)
            head = s.get("attn1_peakiness")
            solved &= s["accuracy"] >= SOLVED and (head is None or head >= FORMED)
        return solved

    def remember_anchor(self, task: str, peakiness: float | None) -> None:
        if peakiness is not None:
            self.anchor[task] = max(peakiness, self.anchor.get(task, 0.0))

    def restart_if(self, run: Run, failed: bool, kind: str, why: str) -> None:
        """Restart (raise Plateau) when the main process says ``failed``; every process gets its verdict."""
        from accelerate.utils import broadcast_object_list

        if broadcast_object_list([failed])[0]:
            self.event(run, kind, f"{why}; restarting from a fresh initialisation (attempt {self.cfg.attempt + 2})")
            raise Plateau(run.step)

    def due(self, at: int, step: int) -> bool:
        """Whether this step's evaluation is the first at or after step ``at`` (a pure function of the step, so a
        run resumed past it does not decide again; 0 = never)."""
        return bool(at) and step >= at and step - self.cfg.eval_every < at

    def restart_due(self, step: int) -> bool:
        return self.due(self.cfg.restart_at, step)

    def event(self, run: Run, kind: str, message: str) -> None:
        run.log.write({"kind": kind, "step": run.step, "time": round(run.time, 2)})
        tqdm.write(f"step {run.step}: {message}")

    def on_step(self, run: Run) -> None:
        if run.step % self.cfg.eval_every == 0:
            self.check(run)
        if self.formed is not None and self.formed.finished(run.step):
            run.stop = True

    def check(self, run: Run) -> None:
        from accelerate.utils import broadcast_object_list

        accelerator, results = run.accelerator, None
        if run.main:
            results = self.evaluate(run)
            for r in results:
                self.remember_anchor(r["task"], trained_mean(r, "attn0_peakiness", self.cfg.longest_trained))
            if self.log_eval(run, results, run.time) and not self.solved_logged:
                self.solved_logged = True
                self.event(run, "solved", f"solved (accuracy >= {SOLVED}, attn1 peakiness >= {FORMED})")
                if self.cfg.stop_when_solved:
                    accelerator.set_trigger()
        if self.cfg.stop_when_solved and accelerator.check_trigger():
            run.stop = True  # every process stops at the same step (the trigger is all-reduced)
        cfg = self.cfg
        if self.due(cfg.anchor_at, run.step) and cfg.anchor_below and cfg.may_restart(run.budget, run.step):
            self.restart_if(run, run.main and _unanchored(self.anchor, cfg.anchor_below), "unanchored",
                            f"attn0 peakiness below {cfg.anchor_below}: layer 1 has not anchored on EoI")
        if self.restart_due(run.step) and cfg.may_restart(run.budget, run.step):
            self.restart_if(run, _plateau(results, cfg.restart_below, cfg.longest_trained), "plateau",
                            f"attn1 mass below {cfg.restart_below}: the iteration head is not forming")
        lengths = self.data.lengths
        waiting = (self.formed is not None and self.formed.decay_start is None, lengths is not None and lengths.wait)
        if not any(waiting):
            return
        # has the head formed (FORMED), is it forming (START_PEAKINESS)?
        thresholds = (FORMED, AdaptiveLengths.START_PEAKINESS)
        flags = broadcast_object_list([results is not None and head_formed(results, self.cfg.longest_trained, t)
                                       for t in thresholds])
        if waiting[0] and flags[0]:
            self.event(run, "formed", "the iteration head formed")
            self.formed.decay_start = run.step  # the learning rate decays over cfg.decay_steps from here
        if waiting[1] and flags[1]:
            self.event(run, "adapting", "the iteration head is forming; the failing lengths are drawn more often")
            lengths.wait = False


TRAINED_KEYS = ("attn0_mass", "attn0_peakiness", "attn1_mass", "attn1_peakiness")  # eval records' "trained" means


def over_trained_lengths(record: dict) -> dict:
    """An ``eval`` record of metrics.jsonl with its attention metrics over the trained lengths where it has them
    (``--max-train-len`` runs, ``log_eval``'s ``trained``), the ones restarts judge and the head forms on; accuracy
    stays the mean over 4..n_len."""
    return {**record, **record.get("trained", {})}


def trained_mean(result: dict, key: str, max_len: int) -> float | None:
    """``key`` averaged over the trained lengths 4..max_len, as the summary averages 4..n_len (None: not measured).

    Why not the summary: a run trained on 1..12 (``--max-train-len``) is evaluated up to n_len, and the untrained
    lengths' low attention mass would make a forming head look like a plateau."""
    per = {int(L): m for L, m in result["per_length"].items() if int(L) <= max_len}
    return summarize_lengths(per, [key])[key] if per else result["summary"].get(key)


def _plateau(results: list[dict] | None, below: float, max_len: int) -> bool:
    """The layer-2 attention mass on x_t (mean L = 4..max_len, the trained lengths) is under ``below`` for some
    task (a model without the circuit's second layer or CoT states has no such mass: never a plateau)."""
    masses = [trained_mean(r, "attn1_mass", max_len) for r in results or []]
    return any(m is not None and m < below for m in masses)


def _unanchored(best: dict[str, float], below: float) -> bool:
    """Layer 1 has not attended to EoI (best attn0 peakiness so far under ``below``) for some task (a model with
    no such head has no entry: never unanchored)."""
    return any(p < below for p in best.values())


class Checkpointer(Callback):
    """``save_state`` every ``checkpoint_every`` steps and at the last step; after every other callback, so the
    checkpoint holds what they changed at this step."""

    def on_step(self, run: Run) -> None:
        if run.step % run.cfg.checkpoint_every == 0 or run.step == run.total_steps:
            save_checkpoint(run.accelerator, run.out, run.step, run.time, run.cfg.keep_checkpoints)


def clock(run: Run) -> None:
    """Set the run's clock after a step (one reading shared by every callback)."""
    run.time = time.perf_counter() - run.start
