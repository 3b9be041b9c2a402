#!/usr/bin/env python
"""Time building every default dataset (paper sizes: lengths 1..16, 1024 + 1024 per length, all tasks).

Side by side in one run: our vectorised builder (`write_dataset_folder`, Parquet + card included) and a
per-sequence Python baseline in the style of the reference code (draw one sequence at a time, iterate F
in Python, no de-duplication, no files written).

    python benchmarks/build_datasets.py [--repeats 3] [--json benchmarks/results/build_datasets.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time

import torch

from hf_iterheads.dataset_builder import write_dataset_folder
from hf_iterheads.tasks import get_task, task_names


def python_baseline(n_len: int = 16, per_length: int = 1024) -> int:
    rows = 0
    for name in task_names():
        task = get_task(name)
        rng = random.Random(0)
        for length in range(1, n_len + 1):
            for _ in range(2 * per_length):
                x = [rng.choice(task.inputs) for _ in range(length)]
                s = [x[0]]
                for v in x[1:]:
                    s.append(int(task.step(s[-1], v)))
                _ = " ".join(map(str, x + s))
                rows += 1
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    ours, base = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            write_dataset_folder(os.path.join(tmp, "ds"))
            ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        python_baseline()
        base.append(time.perf_counter() - t)
    result = {
        "tasks": task_names(),
        "ours_seconds_best": min(ours),
        "ours_seconds_all": ours,
        "python_baseline_seconds_best": min(base),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    print(f"all default datasets ({len(result['tasks'])} tasks, Parquet + card): best {min(ours):.2f} s of {args.repeats}")
    print(f"per-sequence Python baseline (generation only, no files):     best {min(base):.2f} s")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
