"""``train()``: the standard Accelerate loop (accelerate's ``examples/nlp_example.py``), so the same run works on
CPU, one GPU, or several under ``accelerate launch``. Everything around the step is a callback (``callbacks.py``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..modeling import loss_after_eoi, supports_loss_after_eoi
from ..tasks import BUILTIN_TASKS
from ..tokenizer import Layout, build_tokenizer, check_vocabulary
from .artifacts import archive_attempt, restore_checkpoint, save_run, start_run
from .callbacks import Callback, Checkpointer, HeadWatch, LengthFeedback, Plateau, Progress, Run, clock
from .config import TrainConfig
from .data import _trim, build_train_data
from .schedule import make_scheduler


def make_model(cfg: TrainConfig):
    """(model, tokenizer): a fresh preset model, or a checkpoint to fine-tune (transfer) from ``init_from``."""
    from ..modeling import build_config, build_model, check_fits, iterheads_meta, load_checkpoint, max_sequence_length

    if cfg.init_from:
        model, tokenizer = load_checkpoint(cfg.init_from, for_training=True)
        meta = iterheads_meta(model.config)
        meta.update(cot=cfg.cot, n_len=cfg.n_len, tasks=list(dict.fromkeys(meta.get("tasks", []) + cfg.tasks)),
                    task_sources={**meta.get("task_sources", {}), **cfg.task_sources})
        model.config.iterheads = meta
    else:
        # the built-ins and the run's own tasks: the vocabulary does not depend on what else this process loaded
        vocab_tasks = list(dict.fromkeys([t.name for t in BUILTIN_TASKS] + cfg.all_tasks))
        tokenizer = build_tokenizer(vocab_tasks, model_max_length=max_sequence_length(cfg.n_len))
        config = build_config(
            tokenizer, cfg.n_len, cfg.preset, cfg.cot, cfg.tasks, n_layer=cfg.n_layer, n_head=cfg.n_head,
            n_embd=cfg.n_embd, n_inner=cfg.n_inner, freeze_positions=cfg.freeze_positions or None,
            initializer_range=cfg.init_range, embed_init_std=cfg.embed_init_std,
            query_init_scale=cfg.query_init_scale,
        )
        if cfg.task_sources:
            config.iterheads["task_sources"] = dict(cfg.task_sources)
        model = build_model(config, cfg.run_seed)
    for name in cfg.all_tasks:
        check_vocabulary(tokenizer, name)
    check_fits(model.config, Layout(tokenizer, cfg.tasks[0], cfg.cot).seq_len(cfg.n_len), f"length-{cfg.n_len} sequence")
    return model, tokenizer


def make_accelerator(cfg: TrainConfig, out: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    report_to = cfg.report_to
    if report_to == "auto":
        import importlib.util

        report_to = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    return Accelerator(
        gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision,
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dynamo_backend="inductor" if cfg.compile else None,
    )


def length_groups(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Row indices of a batch in (at most) two groups by length, cut where padding costs least.

    Why: with every length in every batch, padding to the longest row wastes about half of the step, and the
    last layer's saving (``loss_after_eoi`` skips what precedes the earliest EoI) shrinks to nothing. Two
    length groups recover most of it (~1.4x per step on CPU, benchmarks/step_cost.py). A batch of one length
    (bucketed) stays one group.
    """
    width = batch["attention_mask"].sum(1)
    if int(width.min()) == int(width.max()):
        return [torch.arange(len(width), device=width.device)]
    order = torch.sort(width, stable=True).indices
    w = width[order]
    n = len(w)
    cost = torch.arange(1, n, device=w.device) * w[:-1] + (n - torch.arange(1, n, device=w.device)) * w[-1]
    cut = int(cost.argmin()) + 1  # rows [0, cut) padded to w[cut - 1], the rest to the longest
    return [order[:cut], order[cut:]]


def step_function(accelerator, model, cfg: TrainConfig):
    """batch -> (loss, correct, batch): runs forward and backward; ``correct`` (one per row of the returned
    batch, whose rows may be reordered) says whether every scored token was right.

    One process, eager: the loss skips the positions it never reads (``modeling.loss_after_eoi``, same
    gradients) and a batch of mixed lengths runs as two length groups, each loss weighted by its share of the
    scored tokens, so the gradient is the whole batch's mean. Under DDP or torch.compile the wrapped model's
    own forward runs on the whole batch.
    """
    if accelerator.num_processes == 1 and not cfg.compile and supports_loss_after_eoi(model):
        def fast(batch):
            groups = length_groups(batch)
            if len(groups) > 1:
                order = torch.cat(groups)
                batch = {k: v[order] for k, v in batch.items()}
            total = (batch["labels"][:, 1:] != -100).sum()
            loss_sum, correct, row = 0.0, [], 0
            for idx in groups:
                part = _trim({k: v[row : row + len(idx)] for k, v in batch.items()})  # to the group's longest row
                row += len(idx)
                with accelerator.autocast():
                    loss, logits, targets = loss_after_eoi(model, part["input_ids"], part["labels"], part.get("position_ids"))
                share = (targets != -100).sum() / total if len(groups) > 1 else 1
                accelerator.backward(loss * share)
                loss_sum = loss_sum + loss.detach() * share
                correct.append(_all_right(logits, targets))
            return loss_sum, torch.cat(correct), batch

        return fast

    def stock(batch):
        output = model(**batch)
        accelerator.backward(output.loss)
        return output.loss.detach(), _all_right(output.logits[:, :-1], batch["labels"][:, 1:]), batch

    return stock


def _all_right(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row: every scored token predicted right (the training accuracy, and the adaptive lengths' signal)."""
    return ((logits.detach().argmax(-1) == targets) | (targets == -100)).all(1)


def run_lock(cfg: TrainConfig):
    """The run folder's advisory lock (``outputs.folder_lock``), held by the main process only: a second
    ``train``, ``--resume`` or ``--overwrite`` of a run in use is refused instead of writing beside it."""
    import contextlib
    import os

    from ..outputs import folder_lock

    if os.environ.get("RANK", "0") != "0" or os.environ.get("LOCAL_RANK", "0") != "0":
        return contextlib.nullcontext()
    return folder_lock(cfg.output_dir, "--output-dir")


def train(cfg: TrainConfig, resume: bool = False, callbacks: Sequence[Callback] = ()) -> Path:
    """Run (or resume) the training run described by ``cfg``; returns its output directory."""
    from ..errors import IterHeadsError
    from .artifacts import check_values

    check_values(cfg)
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise IterHeadsError("--mixed-precision fp16 needs a CUDA GPU; without one the run would silently train in "
                             "fp32 (use bf16, or no)")
    with run_lock(cfg):
        return _train(cfg, resume, callbacks)


def _train(cfg: TrainConfig, resume: bool, callbacks: Sequence[Callback]) -> Path:
    from accelerate.utils import set_seed

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    model, tokenizer = make_model(cfg)  # may raise: nothing written yet
    accelerator = make_accelerator(cfg, out)
    set_seed(cfg.run_seed)
    can_form_head = cfg.cot and model.config.n_layer >= 2  # the circuit needs the CoT states and a second layer
    data = build_train_data(cfg, tokenizer, wait_for_head=can_form_head)

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=cfg.betas)
    model, optimizer, loader = accelerator.prepare(model, optimizer, data.loader)
    steps_per_epoch = max(1, len(loader) // cfg.grad_accum)
    budget = cfg.max_steps or cfg.epochs * steps_per_epoch  # the whole run's; this attempt gets what is left
    total_steps = cfg.attempt_steps(budget)
    scheduler, formed = make_scheduler(cfg, optimizer, total_steps, can_form_head)
    accelerator.register_for_checkpointing(scheduler)  # stepped by hand: once per optimizer step
    if data.lengths is not None:
        accelerator.register_for_checkpointing(data.lengths)

    run = Run(cfg, accelerator, model, out, total_steps, steps_per_epoch, budget)
    if resume:
        restore_checkpoint(run)
    start_run(run, resume)
    progress, watch = Progress(scheduler), HeadWatch(cfg, tokenizer, data, formed)
    feedback = [LengthFeedback(data.lengths, data.task_index)] if data.lengths is not None else []
    callbacks = [*feedback, progress, watch, Checkpointer(), *callbacks]
    train_step = step_function(accelerator, model, cfg)
    run.start = time.perf_counter() - run.elapsed
    for callback in callbacks:
        callback.on_start(run)

    model.train()
    batches = data.batches(accelerator, loader, run.step * cfg.grad_accum)
    while run.step < total_steps and not run.stop:
        batch = next(batches)
        with accelerator.accumulate(model):
            loss, correct, batch = train_step(batch)
            optimizer.step()
            optimizer.zero_grad()
        for callback in callbacks:
            callback.on_batch(run, batch, loss, correct)
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        run.step += 1
        clock(run)
        for callback in callbacks:
            callback.on_step(run)

    progress.close()
    seconds = time.perf_counter() - run.start
    accelerator.wait_for_everyone()
    if run.main:
        final = watch.evaluate(run, final=True)
        run.log.drop("eval", run.step)  # the final evaluation supersedes the periodic one of this step
        watch.log_eval(run, final, seconds)
        save_run(run, tokenizer, final, seconds)
        for r in final:
            s, head = r["summary"], r["summary"]["attn1_peakiness"]
            print(f"{r['task']}: step {run.step}, accuracy {s['accuracy']:.3f}, generation {s['generation_accuracy']:.3f}, "
                  f"attn1 peakiness {head if head is None else round(head, 3)} -> {out}", file=sys.stderr)
    accelerator.end_training()
    return out


def train_with_restarts(cfg: TrainConfig, resume: bool = False, callbacks: Sequence[Callback] = ()) -> Path:
    """``train``, started again from a fresh initialisation (the next attempt's seed) each time ``HeadWatch``
    restarts it (``--anchor-at``, ``--restart-at``); the failed attempt's records move to ``attempts/N/``, and the next attempt
    trains for the steps the run has left (``TrainConfig.attempt_steps``)."""
    with run_lock(cfg):  # held across attempts: no other process slips in between two of them
        while True:
            try:
                return train(cfg, resume, callbacks)
            except Plateau as stop:
                archive_attempt(Path(cfg.output_dir), cfg.attempt)
                cfg, resume = replace(cfg, attempt=cfg.attempt + 1, restarted_at=(*cfg.restarted_at, stop.step)), False
