#!/usr/bin/env python
"""Training throughput for the paper's setting: polynomial, n_len 16, batch 256, 64 steps per epoch.

Variants, all with the paper's model (2 layers, d 128) and Adam, run in the same process one after another:

* ``reference``: a faithful re-implementation of the reference code's model (no biases, its pre-norm; the
  ``RefBlockModel`` of ``recipe_search.py``) fed by the reference loader below: the baseline;
* ``reference-like``: the same loader with our model: the fixed dataset, rows collated one by one in Python,
  every batch padded to 35 tokens (2 * 16 + 3), no bucketing;
* ``ours-padded``: our vectorised loader (``FixedData``), lengths mixed in a batch, padded to the longest;
* ``ours-bucketed``: the same with one length per batch (no padding at all), stock ``model(**batch).loss``;
* ``ours-bucketed+loss-after-eoi``: the same batches with ``modeling.loss_after_eoi`` (the last layer skips the
  positions before EoI, the last token is not fed): what training uses;
* ``ours-online``: fresh sequences per batch (bucketed), generated inside the loader, with loss_after_eoi;
* ``ours-bucketed+compile``: ``torch.compile(dynamic=True)`` on top (the first steps, which compile, are excluded).

Reported per variant: seconds per step and per epoch (64 steps), real tokens/s (padding excluded, comparable
across variants) and processed tokens/s (padding included).

    python benchmarks/train_throughput.py --steps 64 --threads 2 --skip-compile --out benchmarks/results/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F
from recipe_search import (
    RefBlockModel,  # benchmarks/ is on sys.path when this script runs
)
from torch.utils.data import DataLoader

from hf_iterheads.data import build_dataset
from hf_iterheads.evaluation import split_by_length
from hf_iterheads.modeling import build_config, build_model, loss_after_eoi
from hf_iterheads.tokenizer import Layout, build_tokenizer
from hf_iterheads.training import TrainConfig
from hf_iterheads.training.data import FixedData, FixedSampler, OnlineData, OnlineSampler

N_LEN, BATCH, STEPS_PER_EPOCH, WIDTH = 16, 256, 64, 35


def reference_like_loader(train_split, layout: Layout, seed: int) -> DataLoader:
    """Rows one by one, each encoded and padded to 35 tokens in Python (the reference loader's cost)."""
    rows = list(train_split)

    def collate(items):
        ids, labels = [], []
        for r in items:
            seq = [layout.task_id, *[int(layout.value_ids[v]) for v in r["inputs"]], layout.eoi_id,
                   *[int(layout.value_ids[v]) for v in r["states"]], layout.eos_id]
            e = len(r["inputs"]) + 1
            lab = [-100] * (e + 1) + seq[e + 1 :]
            ids.append(seq + [layout.eos_id] * (WIDTH - len(seq)))  # reference: right-padded with EoS
            labels.append(lab + [-100] * (WIDTH - len(lab)))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}

    return DataLoader(rows, batch_size=BATCH, shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(seed))


def batches(loader):
    while True:
        yield from loader


def stock_loss(model, batch):
    return model(**batch).loss


def eoi_loss(model, batch):
    return loss_after_eoi(model, batch["input_ids"], batch["labels"])[0]


def reference_loss(model, batch):
    logits, _ = model(batch["input_ids"])
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)


def measure(name: str, loader, model, steps: int, warmup: int, loss_fn=stock_loss) -> dict:
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    it = batches(loader)
    real = padded = 0
    for i in range(warmup + steps):
        if i == warmup:
            start, real, padded = time.perf_counter(), 0, 0
        batch = dict(next(it))
        n_real = batch.pop("n_real", None)  # the reference-like loader has no attention mask, only a count
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        padded += batch["input_ids"].numel()
        real += int(n_real if n_real is not None else batch["attention_mask"].sum())
    seconds = time.perf_counter() - start
    per_step = seconds / steps
    out = {"variant": name, "steps": steps, "s_per_step": round(per_step, 4), "s_per_epoch": round(per_step * STEPS_PER_EPOCH, 2),
           "real_tokens_per_s": round(real / seconds), "processed_tokens_per_s": round(padded / seconds)}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=64, help="timed steps per variant (one epoch = 64)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = build_tokenizer(model_max_length=WIDTH)
    layout = Layout(tok, "polynomial")
    split = build_dataset("polynomial", N_LEN, 1024, seed=0)["train"]
    by_len = split_by_length(split)
    fixed = FixedData([(layout, by_len)], layout.pad_id)

    def model():
        return build_model(build_config(tok, N_LEN, "paper"), seed=0).train()

    def counted(loader):  # real-token count for the reference loader, which has no attention mask
        for b in loader:
            targets = (b["labels"] != -100).sum(1)  # L + 1 targets (L states + EoS) -> 2L + 3 real tokens
            b["n_real"] = int((2 * targets + 1).sum())
            yield b

    class Wrap:
        def __init__(self, loader): self.loader = loader
        def __iter__(self): return counted(self.loader)

    def reference_model():
        torch.manual_seed(0)
        return RefBlockModel().train()

    results = []
    reference = Wrap(reference_like_loader(split, layout, 0))
    results.append(measure("reference", reference, reference_model(), args.steps, args.warmup, reference_loss))
    results.append(measure("reference-like", reference, model(), args.steps, args.warmup))
    loader = lambda bucket: DataLoader(fixed, batch_sampler=FixedSampler(fixed.groups, BATCH, 0, bucket), collate_fn=lambda b: b)  # noqa: E731
    results.append(measure("ours-padded", loader(False), model(), args.steps, args.warmup))
    results.append(measure("ours-bucketed", loader(True), model(), args.steps, args.warmup))
    results.append(measure("ours-bucketed+loss-after-eoi", loader(True), model(), args.steps, args.warmup, eoi_loss))
    cfg = TrainConfig(tasks=["polynomial"], output_dir="-", n_len=N_LEN, batch_size=BATCH, bucket=True, curriculum="")
    online = OnlineData(cfg, {"polynomial": layout}, {}, layout.pad_id, STEPS_PER_EPOCH)
    results.append(measure("ours-online", DataLoader(online, batch_sampler=OnlineSampler(STEPS_PER_EPOCH, BATCH),
                                                     collate_fn=lambda b: b), model(), args.steps, args.warmup, eoi_loss))
    if not args.skip_compile:
        compiled = torch.compile(model(), dynamic=True)
        results.append(measure("ours-bucketed+compile", loader(True), compiled, args.steps, max(args.warmup, 16)))
    results.append(measure("reference (again, for drift)", reference, reference_model(), args.steps, args.warmup,
                           reference_loss))
    base = (results[0]["s_per_epoch"] + results[-1]["s_per_epoch"]) / 2  # the reference, measured first and last
    for r in results:
        r["fraction_of_reference_time"] = round(r["s_per_epoch"] / base, 3)
        r["speedup_vs_reference"] = round(base / r["s_per_epoch"], 2)
    report = {"setting": "polynomial, n_len 16, batch 256, 64 steps/epoch, paper model (2 layers, d 128)",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "cores": torch.get_num_interop_threads(), "results": results}
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
