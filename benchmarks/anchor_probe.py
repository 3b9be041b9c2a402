"""Where a trained run's two circuit heads look, step by step: the evidence behind the anchor restart.

Binary copy's partial heads (attn1 peakiness ~0.86, accuracy 0.95-0.97) fail at one place: the chain's last step,
where x_L sits right before EoI. This script shows it, and shows what layer 1 does instead of reading EoI. For each
run folder and length L it takes the test split, runs the model once with attentions, and per chain step t reports

* the step's accuracy (the next state predicted from the position that predicts s_t);
* layer 2 (0-based layer 1): the share of sequences whose attention argmax is x_t, EoI, or another position;
* layer 1 (0-based layer 0): the share whose argmax is EoI, the previous token, the task token (row start) or other.

The runs quoted in ``benchmarks/results/anchor_probe.md`` are ``hf-iterheads train --task binary_copy
--seed S`` with polynomial rows as the binary tasks' helper: seed 4 (partial head) and seed 2 (the paper's circuit).

    python benchmarks/anchor_probe.py runs/binary_copy-s4 runs/binary_copy-s2 --task binary_copy \
        --out benchmarks/results/anchor_probe.md

Eager attention on the CPU; a few seconds per run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def probe(run: Path, task: str, lengths: list[int]) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_iterheads.evaluation import test_data
    from hf_iterheads.tokenizer import Layout

    model = AutoModelForCausalLM.from_pretrained(run, attn_implementation="eager").eval()
    layout = Layout(AutoTokenizer.from_pretrained(run), task)
    data = test_data(task, model.config.iterheads["n_len"])
    lines = [f"### `{run.name}`", "", "| L | step t | n | accuracy | layer 2 -> x_t | -> EoI | -> other "
             "| layer 1 -> EoI | -> previous token | -> task token | -> other |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for length in lengths:
        inputs, states = data[length]
        ids = torch.from_numpy(layout.ids(inputs, states))
        with torch.no_grad():
            out = model(ids, output_attentions=True)
        pred = out.logits.argmax(-1)
        eoi = Layout.eoi_index(length)
        for t in range(1, length + 1):
            p = eoi + t - 1  # the position that predicts s_t; x_t sits at t
            acc = (pred[:, p] == ids[:, p + 1]).float().mean().item()
            a1 = out.attentions[1][:, :, p].mean(1).argmax(-1).numpy()  # mean over heads, argmax over keys
            a0 = out.attentions[0][:, :, p].mean(1).argmax(-1).numpy()
            share = lambda hits: f"{np.mean(hits):.2f}"  # noqa: E731
            other1 = (a1 != t) & (a1 != eoi)
            previous = (a0 == p - 1) & (a0 != eoi)  # at t = 2 the previous token is EoI: counted as EoI
            other0 = (a0 != eoi) & ~previous & (a0 != 0)
            lines.append(f"| {length} | {t} | {len(ids)} | {acc:.2f} | {share(a1 == t)} | {share(a1 == eoi)} | {share(other1)} "
                         f"| {share(a0 == eoi)} | {share(previous)} | {share(a0 == 0)} | {share(other0)} |")
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (or checkpoints) of a CoT model with 2+ layers")
    p.add_argument("--task", default="binary_copy")
    p.add_argument("--lengths", default="8,9,12", help="lengths to show, comma separated")
    p.add_argument("--out", type=Path, default=None, help="write the markdown here (default: print it)")
    args = p.parse_args()
    torch.set_num_threads(1)
    lengths = [int(x) for x in args.lengths.split(",")]
    text = "\n".join(["# Where the circuit's heads look, per chain step", "",
                      f"`python benchmarks/anchor_probe.py {' '.join(str(r) for r in args.runs)} --task {args.task} "
                      f"--lengths {args.lengths}`; test split, argmax of each layer's attention (mean over heads) from "
                      "the position that predicts s_t.", ""]
                     + [line for run in args.runs for line in probe(run, args.task, lengths)])
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
