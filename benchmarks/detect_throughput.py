#!/usr/bin/env python
"""Detector throughput and peak memory: the naive way, today's eager capture, and row-sliced capture.

Methods (same probes, same model; per model one process runs them in interleaved rounds):

* ``naive``  -- what a user would write: ``attn_implementation="eager"``, ``output_attentions=True``, full
  logits, every layer's (B, H, T, T) pattern kept, scored afterwards;
* ``today``  -- the eager capture as it was: a forward hook per layer scores and drops the pattern, the
  whole model runs with ``logits_to_keep=1`` (``score_heads(capture="eager", stop_early=False)``);
* ``eager``  -- the same hooks, stopping after the last attention layer (no last MLP, no LM head);
* ``rows``   -- row-sliced capture: sdpa for the layer outputs, probabilities only for the probe rows, same stop;
* ``patch``  -- ``--patch`` machinery on the last layer's head 0: "seconds" covers the counterfactual run, the
  clean run and one patched run; "per patched head" is the patched run alone (one forward over the probes),
  the cost of each further head.

Models are random: GPT-2 small (12 x 12 x 768, vocab 50257) and a Llama-style ~1.1B model (TinyLlama's
shape: 22 x 32 heads (4 KV heads) x 2048, MLP 5632, vocab 32000), bf16 where the CPU has native bf16
(``torch.ops.mkldnn._is_mkldnn_bf16_supported()``), float32 otherwise. 64 parity probes, lengths 4-16,
native layout. Peak memory = highest RSS sampled every millisecond during the measured call minus the RSS
before it (glibc told to mmap every block >= 64 KiB, so freed memory leaves RSS). Heads/s = layers x heads /
seconds for all probes. The machine is shared: CPU seconds of the process are recorded beside wall seconds, the
load average before each call too, and the best round (by CPU time) of each method is kept.

    python benchmarks/detect_throughput.py --out benchmarks/results/detect_throughput.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

METHODS = ("naive", "today", "eager", "rows", "patch")


def _model(name: str):
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    torch.manual_seed(0)
    if name == "gpt2":
        cfg, dtype = GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257), torch.float32
    elif name == "llama1b":
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                          num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
        dtype = torch.bfloat16 if bf16 else torch.float32
    else:
        raise SystemExit(f"unknown model {name}")
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval(), cfg


def timed(fn):
    """(result, wall s, CPU s, peak RSS MB above the start) of ``fn()``."""
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, stop = [base], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    stop.set()
    th.join()
    return out, wall, cpu, (peak[0] - base) / 2**20


def _measure(model_name: str, methods: list[str], n: int, batch_size: int, rounds: int) -> list[dict]:
    """Every method on one model in this process, interleaved over ``rounds`` (best round kept): on a shared
    machine a burst of load then hits one round of every method rather than one method."""
    import numpy as np
    import torch

    from hf_iterheads.circuit import mass_on
    from hf_iterheads.detect.detection import score_heads
    from hf_iterheads.detect.patching import patch_heads
    from hf_iterheads.detect.probes import make_probes
    from hf_iterheads.tokenizer import build_tokenizer

    t_build = time.perf_counter()
    model, cfg = _model(model_name)
    build_s = time.perf_counter() - t_build
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    tok = build_tokenizer(model_max_length=1024)
    probes = make_probes(tok, "parity", "4-16", n=n, seed=0)
    warm = make_probes(tok, "parity", "4-16", n=min(n, batch_size), seed=1)

    def naive(pr):
        previous = model.config._attn_implementation
        model.set_attn_implementation("eager")
        kept, pairs = [], []
        with torch.no_grad():
            for idx in pr.batches(batch_size):
                out = model(**pr.batch(idx), output_attentions=True, use_cache=False)
                kept.append((out.attentions, out.logits))
                pairs.append(pr.pairs(idx)["iteration"])
        model.set_attn_implementation(previous)
        it, count = np.zeros((layers, heads)), 0
        for (atts, _), (q, k) in zip(kept, pairs):
            for layer, a in enumerate(atts):
                m, valid = mass_on(a.float(), q, k)
                it[layer] += (m * valid[:, None, :]).sum((0, 2)).numpy()
            count += int(valid.sum())
        kept_bytes = sum(a.numel() * a.element_size() for atts, _ in kept for a in atts)
        return it / count, kept_bytes

    def scored(capture: str, stop: bool):
        return lambda pr: (score_heads(model, pr, batch_size, capture=capture, stop_early=stop)["iteration_score"], 0)

    def patch(pr):
        report = patch_heads(model, pr, [[(layers - 1, 0)]], batch_size=batch_size)
        return np.array([report["shares"][0] or 0.0]), report["seconds_per_group"]

    runners = {"naive": naive, "today": scored("eager", False), "eager": scored("eager", True),
               "rows": scored("rows", True), "patch": patch}
    for m in methods:
        runners[m](warm)  # warm-up on one batch of other probes
    best: dict[str, dict] = {}
    for r in range(rounds):
        for m in methods:
            load = os.getloadavg()[0]
            (scores, extra), wall, cpu, peak = timed(lambda m=m: runners[m](probes))
            row = {
                "method": m, "model": model_name, "layers": layers, "heads": heads, "hidden": cfg.hidden_size,
                "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "n": n, "max_tokens": probes.max_tokens,
                "seconds": wall, "cpu_seconds": cpu, "heads_per_s": layers * heads / wall, "heads_per_cpu_s": layers * heads / cpu,
                "peak_mb": peak, "load_avg": load, "round": r, "build_s": build_s,
                "checksum": float(np.asarray(scores).sum()),
            }
            if m == "naive":
                row["kept_mb"] = extra / 2**20
            if m == "patch":
                row["seconds_per_head"] = extra
            print(json.dumps(row), file=sys.stderr, flush=True)
            if m not in best or row["cpu_seconds"] < best[m]["cpu_seconds"]:
                best[m] = {**row, "wall_rounds": [*best.get(m, {}).get("wall_rounds", []), wall]}
            else:
                best[m]["wall_rounds"].append(wall)
    return [best[m] for m in methods]


# glibc serves blocks >= 64 KiB with mmap and unmaps them on free, so RSS follows live tensors closely.
# Passive OpenMP waits: threads that spin while the CPU is shared would count as CPU time.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "OMP_WAIT_POLICY": "PASSIVE"}


def _child(args, script: str = __file__, env: dict | None = None) -> list[dict]:
    """``script --child ARGS`` in a fresh process (its own peak memory); the last stdout line is its JSON result."""
    cmd = [sys.executable, script, "--child", json.dumps(args)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **(CHILD_ENV if env is None else env)},
                          check=False)
    if proc.returncode:
        raise SystemExit(f"child failed: {args}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine(each: str) -> str:
    """The machine sentence of a report's header: architecture, CPUs and the load, torch and transformers."""
    import platform

    import torch
    import transformers

    return (f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs (load average before each {each} "
            f"below), torch {torch.__version__}, transformers {transformers.__version__}")


def _report(runs: list[dict], a, started: str) -> list[str]:
    import torch

    lines = [
        "# Detector throughput: naive vs eager capture vs row-sliced capture",
        "",
        (
            f"`python benchmarks/detect_throughput.py {' '.join(sys.argv[1:])}`, started {started}, {machine('run')}, bf16 native: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}. "
            f"Random models, {a.n} parity probes of lengths 4-16 (native layout), batch {a.batch_size}. "
            "All score methods give the same iteration scores (checked)."
        ),
        "",
        "Per model one process runs every method in interleaved rounds; each method's best round by CPU time is shown.",
        "CPU seconds (all threads of the process) are what the load on this shared machine disturbs least, so the",
        "speed-ups (x naive) are ratios of CPU seconds; wall-clock heads/s of the same round beside them.",
        "",
        "| model | dtype | T max | method | wall s | CPU s | heads/s (wall) | heads per CPU-s | x naive (CPU) | peak MB | patterns kept MB | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        naive = next((x for x in runs if x["model"] == r["model"] and x["method"] == "naive"), r)
        if r["method"] == "patch":
            speed, per_cpu, ratio = f"{r['seconds_per_head']:.2f} s per patched head", "", ""
        else:
            speed, per_cpu = f"{r['heads_per_s']:.1f}", f"{r['heads_per_cpu_s']:.1f}"
            ratio = f"{naive['cpu_seconds'] / r['cpu_seconds']:.2f}"
        lines.append(
            f"| {r['model']} ({r['layers']}x{r['heads']}x{r['hidden']}) | {r['dtype']} | {r['max_tokens']} | {r['method']} | "
            f"{r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {speed} | {per_cpu} | {ratio} | {r['peak_mb']:.0f} | "
            f"{r.get('kept_mb', 0):.1f} | {r['load_avg']:.1f} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--models", default="gpt2,llama1b")
    ap.add_argument("--methods", default="gpt2=naive+today+eager+rows+patch,llama1b=naive+today+rows+patch",
                    help="methods per model (MODEL=M+M,...)")
    ap.add_argument("--rounds", default="gpt2=3,llama1b=1", help="interleaved rounds per model (best kept)")
    ap.add_argument("--out", default=None, help="write a markdown report here (and .json beside it)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_measure(**json.loads(a.child))))
        return
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rounds = dict(kv.split("=") for kv in a.rounds.split(","))
    methods = {k: v.split("+") for k, v in (kv.split("=") for kv in a.methods.split(","))}
    runs = []
    for model in a.models.split(","):
        rows = _child({"model_name": model, "methods": methods.get(model, list(METHODS)), "n": a.n,
                       "batch_size": a.batch_size, "rounds": int(rounds.get(model, 1))})
        runs.extend(rows)
        for r in rows:
            print(f"{model:>8} {r['method']:>6}: {r['seconds']:.2f} s wall, {r['cpu_seconds']:.2f} s CPU, "
                  f"{r['heads_per_s']:.1f} heads/s, peak +{r['peak_mb']:.0f} MB"
                  + (f", {r['seconds_per_head']:.2f} s per patched head" if r["method"] == "patch" else "")
                  + f" (load {r['load_avg']:.1f})", flush=True)
    for r in runs:
        if r["method"] in ("today", "eager", "rows"):
            ref = next((x for x in runs if x["model"] == r["model"] and x["method"] == "naive"), r)
            assert abs(r["checksum"] - ref["checksum"]) < 1e-3 * max(1.0, abs(ref["checksum"])), (r, ref)
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(_report(runs, a, started)) + "\n")
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
