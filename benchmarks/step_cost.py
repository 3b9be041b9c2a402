#!/usr/bin/env python
"""The default recipe's training step (every length in every batch, batch 32, the paper's model), three ways,
on the same batches in one process:

* ``stock``: ``model(**batch).loss`` on the whole right-padded batch;
* ``whole-batch``: ``modeling.loss_after_eoi`` on the whole batch (the step before the length split: with a
  length-1 row in the batch, the last layer's saving is gone, and every row is padded to the longest);
* ``length-split``: ``training.loop.step_function``: the rows in two length groups, cut where padding costs least,
  each loss weighted by its share of the scored tokens (the same gradient; tests/test_training.py checks it).

Each variant runs forward, backward and an Adam step; reported: milliseconds per step and the speed-up over
``whole-batch``. Variants alternate in rounds, so a machine busy with other work slows them alike.

    python benchmarks/step_cost.py --threads 1 --steps 200 --out benchmarks/results/step_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import torch
from accelerate import Accelerator

from hf_iterheads.modeling import loss_after_eoi
from hf_iterheads.training import TrainConfig
from hf_iterheads.training.data import build_train_data
from hf_iterheads.training.loop import make_model, step_function

ROUND = 20  # timed steps per variant before the next variant's turn


def parse_args(doc: str, task: str) -> argparse.Namespace:
    """The step benchmarks' common flags (this script's and ``length_weights_cost.py``'s); sets torch's threads."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--task", default=task)
    p.add_argument("--steps", type=int, default=200, help=f"timed steps per variant (in rounds of {ROUND})")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    return args


def time_in_rounds(variants: dict[str, tuple[Callable, list]], optimizer, steps: int) -> dict[str, float]:
    """Seconds each variant's ``(step, batches)`` took for ``steps`` Adam steps: five warm-up batches each, then the
    variants alternate in rounds of ``ROUND`` steps, so a machine busy with other work slows them alike."""
    seconds = dict.fromkeys(variants, 0.0)
    for step, batches in variants.values():  # warm-up
        for batch in batches[:5]:
            step(batch)
            optimizer.zero_grad()
    for start in range(0, steps, ROUND):
        for name, (step, batches) in variants.items():
            t = time.perf_counter()
            for batch in batches[start : start + ROUND]:
                step(batch)
                optimizer.step()
                optimizer.zero_grad()
            seconds[name] += time.perf_counter() - t
    return seconds


def write_report(report: dict, out: str | None) -> None:
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")


def main() -> None:
    args = parse_args(__doc__, "polynomial")
    cfg = TrainConfig(tasks=[args.task], output_dir="unused")
    model, tokenizer = make_model(cfg)
    data = build_train_data(cfg, tokenizer, wait_for_head=True)
    b = cfg.batch_size
    batches = [data.loader.dataset.__getitems__(list(range(i * b, (i + 1) * b))) for i in range(args.steps)]
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    split = step_function(Accelerator(cpu=True), model, cfg)

    def stock(batch):
        model(**batch).loss.backward()

    def whole(batch):
        loss_after_eoi(model, batch["input_ids"], batch["labels"])[0].backward()

    model.train()
    seconds = time_in_rounds({"stock": (stock, batches), "whole-batch": (whole, batches), "length-split": (split, batches)},
                             optimizer, args.steps)
    base = seconds["whole-batch"]
    results = [{"variant": n, "ms_per_step": round(1000 * s / args.steps, 2), "speedup_vs_whole_batch": round(base / s, 2)}
               for n, s in seconds.items()]
    padding = sum(int(x["attention_mask"].numel() - x["attention_mask"].sum()) for x in batches)
    report = {"setting": f"{args.task}, default recipe batches (every length 1..{cfg.n_len}, batch {b}), paper model",
              "steps": args.steps, "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
              "padding_share_whole_batch": round(padding / sum(x["attention_mask"].numel() for x in batches), 3),
              "results": results}
    for r in results:
        print(f"{r['variant']:>13}: {r['ms_per_step']:7.2f} ms/step  x{r['speedup_vs_whole_batch']:.2f} vs whole-batch")
    write_report(report, args.out)


if __name__ == "__main__":
    main()
