#!/usr/bin/env python
"""What drawing training lengths in proportion to L costs per step: ``--length-weights uniform`` against
``linear`` (parity's default), side by side in one process.

Both variants use the default recipe's batches for the task (helpers included, every length in every batch,
batch 32) drawn at steps spread over the whole 12,000-step run (the copy helper's share fades by step 3,000), the
paper's model, and the training step itself (``training.loop.step_function``: forward, backward, Adam). Variants
alternate in rounds of 20 steps (``step_cost.time_in_rounds``), so a machine busy with other work slows them alike. Reported: milliseconds per
step, the mean real (unpadded) tokens per row, and linear's cost relative to uniform.

    python benchmarks/length_weights_cost.py --threads 1 --steps 200 --out benchmarks/results/length_weights_cost.json
"""

from __future__ import annotations

import platform

import torch
from accelerate import Accelerator
from step_cost import parse_args, time_in_rounds, write_report  # this folder's sibling script (run from the repository root)

from hf_iterheads.training import TrainConfig
from hf_iterheads.training.data import build_train_data
from hf_iterheads.training.loop import make_model, step_function

WEIGHTS = ("uniform", "linear")


def main() -> None:
    args = parse_args(__doc__, "parity")
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
    model.train()
    seconds = time_in_rounds({w: (step, batches[w]) for w in WEIGHTS}, optimizer, args.steps)
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
    write_report(report, args.out)


if __name__ == "__main__":
    main()
