"""Learning-rate schedules: transformers' own, plus ``formed-cosine``, which waits for the iteration head."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


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

    def finished(self, step: int) -> bool:
        return self.decay_start is not None and step >= self.decay_start + self.decay_steps


def make_scheduler(cfg: TrainConfig, optimizer, total_steps: int, can_form_head: bool):
    """(scheduler, the FormedThenCosine factor or None). Without CoT or a second layer there is no head to wait
    for, so formed-cosine falls back to a plain cosine."""
    from transformers import get_scheduler

    if cfg.schedule == "formed-cosine" and can_form_head:
        formed = FormedThenCosine(cfg.warmup_steps, cfg.decay_steps)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, formed), formed
    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear", "formed-cosine": "cosine"}
    return get_scheduler(name[cfg.schedule], optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=total_steps), None
