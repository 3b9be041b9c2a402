#!/usr/bin/env python
"""What drawing training lengths in proportion to L costs per step: ``--length-weights uniform`` against
``linear`` (parity's default since session 17), side by side in one process.

Both variants use the default recipe's batches for the task (helpers included, every length in every batch,
batch 32) drawn at steps spread over the whole 12,000-step run (the copy helper's share fades by step 3,000), the
paper's model, and the training step itself (``training.loop.step_function``: forward, backward, Adam). Variants
alternate in rounds of 20 steps, so a machine busy with other work slows them alike. Reported: milliseconds per
step, the mean real (unpadded) tokens per row, and linear's cost relative to uniform.

    python benchmarks/length_weights_cost.py --threads 1 --steps 200 --out benchmarks/results/length_weights_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from accelerate import Accelerator

from hf_iterheads.training import TrainConfig
from hf_iterheads.training.data import build_train_data
from hf_iterheads.training.loop import make_model, step_function

WEIGHTS = ("uniform", "linear")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="parity")
    p.add_argument("--steps", type=int, default=200, help="timed steps per variant (in rounds of 20)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    batches, cfgs = {}, {}
    for weights in WEIGHTS:
        cfg = cfgs[weights] = TrainConfig(tasks=[args.task], output_dir="unused", length_weights=weights)
        data = build_train_data(cfg, make_model(cfg)[1], wait_for_head=True).loader.dataset
        spread = max(1, cfg.max_steps // args.steps)  # batch numbers across the whole run
        b = cfg.batch_size
        batches[weights] = [data.__getitems__(list(range(i * spread * b, (i * spread + 1) * b))) for i in range(args.steps)]
    model, _ = make_model(cfgs["uniform"])
    optimizer = torch.optim.Adam(model.parameters(), lr=cfgs["uniform"].lr)
    step = step_function(Accelerator(cpu=True), model, cfgs["uniform"])
    seconds = dict.fromkeys(WEIGHTS, 0.0)
    model.train()
    for weights in WEIGHTS:  # warm-up
        for batch in batches[weights][:5]:
            step(batch)
            optimizer.zero_grad()
    for start in range(0, args.steps, 20):
        for weights in WEIGHTS:
            t = time.perf_counter()
            for batch in batches[weights][start : start + 20]:
                step(batch)
                optimizer.step()
                optimizer.zero_grad()
            seconds[weights] += time.perf_counter() - t
    results = [{"length_weights": w, "ms_per_step": round(1000 * seconds[w] / args.steps, 2),
                "real_tokens_per_row": round(float(sum(x["attention_mask"].sum() for x in batches[w]))
                                             / sum(len(x["attention_mask"]) for x in batches[w]), 2),
                "cost_vs_uniform": round(seconds[w] / seconds["uniform"], 3)} for w in WEIGHTS]
    report = {"setting": f"{args.task}, default recipe batches (batch {cfgs['uniform'].batch_size}) at steps spread over "
                         f"{cfgs['uniform'].max_steps}, paper model, length-split step",
              "steps": args.steps, "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
              "results": results}
    for r in results:
        print(f"{r['length_weights']:>8}: {r['ms_per_step']:7.2f} ms/step, {r['real_tokens_per_row']:5.2f} tokens/row, "
              f"x{r['cost_vs_uniform']:.3f} vs uniform")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
