#!/usr/bin/env python
"""Wall time of one `hf-iterheads scan` over the three bundled checkpoints and two random zoo models.

The zoo models are the tests' tiny random GPT-2 and Llama (GQA) with the project's tokenizer, saved to a temp
folder. The scan runs in a fresh process with the default settings (tasks parity, binary_copy, polynomial; 64
probes of lengths 4-16 per task), so the time includes Python and library imports, loading each model, probing,
the report's attention maps, and merging (Parquet, summary, figures, report.html). The goal is under 2 minutes
on 2 cores. The load average is recorded before and after, since the machine may be shared.

    python benchmarks/scan_throughput.py --out benchmarks/results/scan_throughput.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_zoo(folder: Path) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from hf_iterheads.tokenizer import build_tokenizer

    tok = build_tokenizer()
    common = dict(vocab_size=64, initializer_range=0.3, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    configs = {
        "zoo-gpt2": GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=128, **common),
        "zoo-llama": LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=128, **common),
    }
    paths = []
    for name, cfg in configs.items():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
        paths.append(str(folder / name))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scan_throughput.md"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = ["polynomial-cot", "parity-cot", "polynomial-nocot", *make_zoo(Path(tmp))]
        cmd = [sys.executable, "-m", "hf_iterheads.cli", "scan", *models, "--output-dir", str(Path(tmp) / "atlas")]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        load_before = os.getloadavg()
        t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        load_after = os.getloadavg()
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        summary = (Path(tmp) / "atlas" / "summary.md").read_text()
        size = (Path(tmp) / "atlas" / "report.html").stat().st_size
    import torch
    import transformers

    record = {
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "goal_s": 120,
        "models": [Path(m).name for m in models], "tasks": 3, "n": 64, "lengths": "4-16",
        "triples": 15, "report_html_bytes": size, "cpus": os.cpu_count(), "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after], "torch": torch.__version__, "transformers": transformers.__version__,
        "machine": platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    table = summary.split("\n\n", 2)[2].split("\n\n## ")[0].replace(str(Path(tmp)) + "/", "")
    out.write_text(
        "# Scan throughput: three bundled checkpoints + two zoo models\n\n"
        f"`python benchmarks/scan_throughput.py`, {record['date']}, {record['machine']}, {record['cpus']} CPUs (shared; load "
        f"average {record['load_before'][0]} before, {record['load_after'][0]} after), torch {record['torch']}, transformers "
        f"{record['transformers']}.\n\n"
        f"`hf-iterheads scan polynomial-cot parity-cot polynomial-nocot ZOO-GPT2 ZOO-LLAMA --output-dir DIR` (defaults: tasks "
        f"parity, binary_copy, polynomial; 64 probes of lengths 4-16): 15 triples, **{record['wall_s']} s wall**, "
        f"{record['cpu_s']} s of CPU time (user + system, all threads; less sensitive to the shared load than the wall time) "
        f"for the whole process: imports, loading, probing, maps, Parquet, figures, report.html "
        f"of {size / 1e3:.0f} kB. Goal: < 120 s.\n\n"
        f"{table}\n"
    )
    print(out.read_text())


if __name__ == "__main__":
    main()
