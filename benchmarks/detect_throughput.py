#!/usr/bin/env python
"""Detector throughput and peak memory: scoring inside the capture vs keeping every attention pattern.

"ours"  = hf_iterheads.detect.detection.score_heads: eager attention, a forward hook per layer reduces the
          pattern to per-head sums and drops it; logits only for the last position.
"naive" = what a user would write: attn_implementation="eager", model(..., output_attentions=True) per
          batch, keep every layer's (B, H, T, T) pattern, score afterwards.
"naive1"= the same but with logits_to_keep=1, to separate the cost of keeping patterns from the LM head
          (50257 x 768: most of the naive time on CPU).

Each measurement runs in a fresh process on a randomly initialised GPT-2 (768 wide, 12 heads; layers
and probe lengths swept), 64 parity probes in the native layout. Peak memory = the highest RSS sampled
every millisecond during the measured call, minus the RSS just before it (glibc told to mmap every
block >= 64 KiB so freed memory leaves RSS); "kept" = bytes of attention
patterns held at the end (naive only). Heads/s = n_layers * n_heads / seconds for all probes.

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


def _measure(method: str, layers: int, max_len: int, n: int, batch_size: int, repeats: int) -> dict:
    import numpy as np
    import psutil
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_iterheads.detect.attention import mass_on
    from hf_iterheads.detect.detection import score_heads
    from hf_iterheads.detect.probes import make_probes
    from hf_iterheads.tokenizer import build_tokenizer

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)
    model = GPT2LMHeadModel(cfg).eval()
    if method != "ours":
        model.set_attn_implementation("eager")
    probes = make_probes(build_tokenizer(model_max_length=1024), "parity", f"4-{max_len}", n=n, seed=0)

    def naive():
        kept, pairs = [], []
        with torch.no_grad():
            for idx in probes.batches(batch_size):
                out = model(**probes.batch(idx), output_attentions=True, logits_to_keep=1 if method == "naive1" else 0)
                kept.append(out.attentions)
                pairs.append(probes.pairs(idx)["iteration"])
        it = np.zeros((layers, 12))
        count = 0
        for atts, (q, k) in zip(kept, pairs):
            for layer, a in enumerate(atts):
                m, valid = mass_on(a, q, k)
                it[layer] += (m * valid[:, None, :]).sum((0, 2)).numpy()
            count += int(valid.sum())
        kept_bytes = sum(a.numel() * a.element_size() for atts in kept for a in atts)
        return it / count, kept_bytes

    def ours():
        return score_heads(model, probes, batch_size)["iteration_score"], 0

    run = ours if method == "ours" else naive
    run()  # warm-up
    proc = psutil.Process()
    times, peaks = [], []
    for _ in range(repeats):
        base = proc.memory_info().rss
        peak = [base]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.001)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t0 = time.perf_counter()
        scores, kept_bytes = run()
        times.append(time.perf_counter() - t0)
        stop.set()
        th.join()
        peaks.append(peak[0] - base)
    return {
        "method": method, "layers": layers, "heads": 12, "max_len": max_len, "max_tokens": probes.max_tokens,
        "n": n, "seconds": min(times), "heads_per_s": layers * 12 / min(times),
        "peak_mb": min(peaks) / 2**20, "kept_mb": kept_bytes / 2**20, "checksum": float(np.asarray(scores).sum()),
    }


# glibc serves blocks >= 64 KiB with mmap and unmaps them on free, so RSS follows live tensors closely
# (otherwise freed warm-up memory stays in malloc's arenas and later peaks are invisible).
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


def _child(args) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--layers", default="2,6,12,24", help="layer sweep (memory); timing at 12 layers")
    ap.add_argument("--lengths", default="16,64", help="max chain length sweep at 12 layers")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="write a markdown report here (and .json beside it)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_measure(**json.loads(a.child))))
        return
    runs = []
    configs = [(l, 16) for l in map(int, a.layers.split(","))] + [(12, m) for m in map(int, a.lengths.split(",")) if m != 16]
    for layers, max_len in configs:
        for method in ("ours", "naive", "naive1"):
            r = _child({"method": method, "layers": layers, "max_len": max_len, "n": a.n, "batch_size": a.batch_size, "repeats": a.repeats})
            runs.append(r)
            print(f"{method:>5} layers {layers:>2} max_len {max_len:>2} (T<={r['max_tokens']}): {r['seconds']:.2f} s, "
                  f"{r['heads_per_s']:.0f} heads/s, peak +{r['peak_mb']:.0f} MB, patterns kept {r['kept_mb']:.1f} MB", flush=True)
    for o, nv, n1 in zip(runs[::3], runs[1::3], runs[2::3]):
        assert abs(o["checksum"] - n1["checksum"]) < 1e-3 * max(1.0, abs(nv["checksum"])), (o, n1)
        assert abs(o["checksum"] - nv["checksum"]) < 1e-3 * max(1.0, abs(nv["checksum"])), (o, nv)
    if a.out:
        import platform

        import torch
        import transformers

        lines = [
            "# Detector throughput: ours vs naive (keep all patterns)",
            "",
            f"`python benchmarks/detect_throughput.py --out {a.out}`, {time.strftime('%Y-%m-%d')}, "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), torch {torch.__version__}, "
            f"transformers {transformers.__version__}. Random GPT-2, 768 wide, 12 heads, {a.n} parity probes, "
            f"batch {a.batch_size}, best of {a.repeats}. Both methods give the same scores (checked).",
            "",
            "naive1 = naive with `logits_to_keep=1` (no full LM head), to isolate the cost of keeping patterns.",
            "",
            "| layers | max L (T) | heads/s ours | heads/s naive | heads/s naive1 | peak MB ours | peak MB naive | peak MB naive1 | patterns kept MB (naive) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for o, nv, n1 in zip(runs[::3], runs[1::3], runs[2::3]):
            lines.append(
                f"| {o['layers']} | {o['max_len']} ({o['max_tokens']}) | {o['heads_per_s']:.0f} | {nv['heads_per_s']:.0f} | {n1['heads_per_s']:.0f} | "
                f"{o['peak_mb']:.0f} | {nv['peak_mb']:.0f} | {n1['peak_mb']:.0f} | {nv['kept_mb']:.1f} |"
            )
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
