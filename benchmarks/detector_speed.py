#!/usr/bin/env python
"""Time to verdict: the detector engine against the naive way, at equal verdicts, side by side in one run.

* ``naive``  -- what a user would write: ``attn_implementation="eager"``, ``output_attentions=True``, full logits,
  every probe run in full (its shots included), every layer's (B, H, T, T) pattern reduced afterwards;
* ``engine`` -- ``score_heads(sequential=Sequential())``: row-sliced capture beside sdpa, the forward stopped after
  the last attention layer, the shared prefix (the shots) computed once from a KV cache, bare probes packed end
  to end, and probes run in rounds until every head's verdict is settled (``--n`` is the maximum).

Both reduce with the same accumulator, so the verdicts (iteration and EoI ``detected`` grids) are compared
cell by cell and the largest iteration-score difference is recorded. Models are random with real tokenizers
from ``/work/shared/tokenizers``: GPT-2 small's shape (12 x 12 x 768) with GPT-2's tokenizer, and a 1B-class
Llama (TinyLlama-1.1B's shape: 22 x 32 heads (4 KV) x 2048, MLP 5632) with Mistral's (a Llama-family
SentencePiece tokenizer). Probes: parity, text rendering, bare and 4-shot. Per model one child process builds
the model once and runs the methods in interleaved rounds (best round by CPU seconds kept). Peak memory is
the highest RSS sampled every millisecond during the call minus the RSS before it. The machine's cores may be
shared: CPU seconds and the load average are recorded beside wall seconds, and speed-ups are CPU-second ratios.

Two more tables per model: several templates scored together (``score_sets``: their probes share forwards)
against one after another (``score_heads`` per template), and a forward's fixed cost in tokens (CPU seconds of
one probe and of a batch of one length, a line through the two), the figure behind ``batching.FORWARD_TOKENS``.

    python benchmarks/detector_speed.py --out benchmarks/results/detector_speed.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

TOKENIZERS = Path(os.environ.get("ITERHEADS_TOKENIZERS", "/work/shared/tokenizers"))
MODELS = {"gpt2": ("gpt2", "4-16"), "llama1b": ("mistral", "4-8")}  # (tokenizer, probe lengths)
TARGETS = {0: 3.0, 4: 5.0}  # shots -> wanted speed-up
TEMPLATES = ("{inputs} -> {states}", "{inputs} = {states}", "Input: {inputs}\nOutput: {states}")


def _model(name: str, vocab: int):
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if name == "gpt2":
        cfg = GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=vocab)
    else:
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                          num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=2048)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval(), cfg


def _naive(model, probes, patterns, batch_size: int) -> dict:
    """Eager attention, output_attentions=True, every probe in full, reduced afterwards by the same accumulator."""
    import torch

    from hf_iterheads.detect.scoring import _Accumulator, _window

    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    acc = _Accumulator(len(probes), n_layers, n_heads, patterns)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            for idx in probes.batches(batch_size):
                out = model(**probes.batch(idx), output_attentions=True, use_cache=False)
                acc.idx, acc.pairs = idx, {p.name: p.pairs(probes, idx) for p in patterns}
                for layer, weights in enumerate(out.attentions):
                    acc.add(layer, weights, _window(None, model.config))
    finally:
        model.set_attn_implementation(previous)
    return {**acc.scores(patterns), "n_probes_run": len(probes)}


def _verdicts(scores: dict, task: str):
    from hf_iterheads.detect.result import DetectionResult

    r = DetectionResult("m", task, scores, {})
    return r.detected(), r.eoi_detected()


def _forward_cost(model, tok, lengths: str, batch_size: int, rounds: int) -> dict:
    """A forward's fixed cost, in tokens: the engine's capture forward of 1 and of ``batch_size`` probes of one
    length (best of ``rounds`` CPU seconds each); the cost is a + s * tokens, and a / s is the figure."""
    import numpy as np

    from hf_iterheads.detect.probes import make_probes
    from hf_iterheads.detect.runner import CaptureRun

    probes = make_probes(tok, "parity", lengths.split("-")[-1], n=batch_size, seed=0)
    best = {1: np.inf, batch_size: np.inf}
    with CaptureRun(model, "rows", lambda *args, **kw: None) as run:
        for i in range(rounds + 1):  # the first round warms up
            for b in best:
                batch = probes.batch(np.arange(b))
                t = time.process_time()
                run.forward(batch["input_ids"], batch["attention_mask"])
                best[b] = min(best[b], time.process_time() - t) if i else best[b]
    tokens = int(probes.seq_lens[0])
    slope = (best[batch_size] - best[1]) / ((batch_size - 1) * tokens)
    return {"tokens": tokens, "cpu_1": best[1], "cpu_batch": best[batch_size], "batch": batch_size,
            "fixed_tokens": (best[1] - slope * tokens) / slope}


def _templates(model, tok, lengths: str, n: int, batch_size: int, rounds: int, patterns) -> dict:
    """Three templates' bare probes: scored one after another against together (shared forwards)."""
    import numpy as np
    from detect_throughput import timed

    from hf_iterheads.detect.probes import make_probes
    from hf_iterheads.detect.scoring import score_heads, score_sets
    from hf_iterheads.detect.sequential import Sequential

    sets = [make_probes(tok, "parity", lengths, n=n, seed=0, template=t) for t in TEMPLATES]
    methods = {"alone": lambda: [score_heads(model, p, batch_size, patterns, sequential=Sequential()) for p in sets],
               "together": lambda: score_sets(model, sets, batch_size, patterns, sequential=Sequential())}
    best: dict[str, tuple] = {}
    for _ in range(rounds):
        for name, fn in methods.items():
            out, wall, cpu, _peak = timed(fn)
            if name not in best or cpu < best[name][2]:
                best[name] = (out, wall, cpu)
    same = all((a == b).all() for x, y in zip(best["alone"][0], best["together"][0])
               for a, b in zip(_verdicts(x, "parity"), _verdicts(y, "parity")))
    diff = max(float(np.abs(x["iteration_score"] - y["iteration_score"]).max()) for x, y in zip(best["alone"][0], best["together"][0]))
    return {"templates": len(sets), "probes_run": [int(x["n_probes_run"]) for x in best["together"][0]],
            "alone_wall": best["alone"][1], "alone_cpu": best["alone"][2], "together_wall": best["together"][1],
            "together_cpu": best["together"][2], "verdicts_equal": bool(same), "max_iteration_score_diff": diff}


def _measure(model_name: str, n: int, batch_size: int, rounds: int, shots: list[int]) -> dict:
    import numpy as np
    from detect_throughput import timed  # this folder's sibling script: the same wall / CPU / peak-memory measure
    from transformers import AutoTokenizer

    from hf_iterheads.detect.patterns import resolve_patterns
    from hf_iterheads.detect.probes import make_probes
    from hf_iterheads.detect.scoring import score_heads
    from hf_iterheads.detect.sequential import Sequential

    tok_name, lengths = MODELS[model_name]
    tok = AutoTokenizer.from_pretrained(TOKENIZERS / tok_name)
    model, cfg = _model(model_name, len(tok))
    patterns = resolve_patterns(None)
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    methods = {
        "naive": lambda pr: _naive(model, pr, patterns, batch_size),
        "engine": lambda pr: score_heads(model, pr, batch_size, patterns, sequential=Sequential()),
    }
    rows = []
    for k in shots:
        probes = make_probes(tok, "parity", lengths, n=n, seed=0, shots=k)
        warm = make_probes(tok, "parity", lengths, n=2, seed=1, shots=k)
        for fn in methods.values():
            fn(warm)
        best: dict[str, dict] = {}
        for r in range(rounds):
            for name, fn in methods.items():
                load = os.getloadavg()[0]
                scores, wall, cpu, peak = timed(lambda fn=fn, pr=probes: fn(pr))
                row = {"model": model_name, "tokenizer": tok_name, "layers": layers, "heads": heads, "hidden": cfg.hidden_size,
                       "shots": k, "method": name, "n_max": n, "n_run": int(scores["n_probes_run"]), "lengths": lengths,
                       "max_tokens": probes.max_tokens, "mean_tokens": float(probes.seq_lens.mean()),
                       "prefix_tokens": int(scores.get("prefix_tokens", 0)), "seconds": wall, "cpu_seconds": cpu,
                       "heads_per_s": layers * heads / wall, "peak_mb": peak, "load_avg": load, "round": r,
                       "_scores": scores}
                print(json.dumps({k2: v for k2, v in row.items() if k2 != "_scores"}), file=sys.stderr, flush=True)
                if name not in best or cpu < best[name]["cpu_seconds"]:
                    best[name] = row
        naive, engine = best["naive"].pop("_scores"), best["engine"].pop("_scores")
        same = [bool((a == b).all()) for a, b in zip(_verdicts(naive, "parity"), _verdicts(engine, "parity"))]
        diff = float(np.abs(naive["iteration_score"] - engine["iteration_score"]).max())
        for name in methods:
            best[name].update(verdicts_equal=all(same), iteration_detected=int(_verdicts(naive, "parity")[0].sum()),
                              max_iteration_score_diff=diff,
                              speedup_cpu=best["naive"]["cpu_seconds"] / best[name]["cpu_seconds"],
                              speedup_wall=best["naive"]["seconds"] / best[name]["seconds"])
            rows.append(best[name])
    extra = {"model": model_name, "tokenizer": tok_name, "lengths": lengths,
             "forward": _forward_cost(model, tok, lengths, batch_size, rounds),
             "templates": _templates(model, tok, lengths, n, batch_size, rounds, patterns)}
    return {"rows": rows, "extra": extra}


# glibc serves blocks >= 64 KiB with mmap and unmaps them on free, so RSS follows live tensors closely.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_WAIT_POLICY": "PASSIVE"}


def _child(args: dict) -> dict:
    from detect_throughput import _child as run_child  # the same child-process runner, with this script's env

    return run_child(args, __file__, CHILD_ENV)


def _report(runs: list[dict], a, started: str) -> list[str]:
    from detect_throughput import machine

    lines = [
        "# Detector speed: time to verdict, engine vs the naive way",
        "",
        f"`python benchmarks/detector_speed.py {' '.join(sys.argv[1:])}`, started {started}, {machine('call')}, float32, no GPU. Random models, real tokenizers, parity probes "
        f"(text rendering), at most {a.n} per run, batch {a.batch_size}. Speed-up = naive CPU seconds / engine CPU seconds "
        "(the load on a shared machine disturbs CPU time least); wall seconds beside them.",
        "",
        "| model | tokenizer | shots | lengths | mean tokens | method | probes run | prefix cached | wall s | CPU s | heads/s | "
        "peak MB | x naive (CPU) | x naive (wall) | target | equal verdicts | max iter diff | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        target = TARGETS.get(r["shots"])
        lines.append(
            f"| {r['model']} ({r['layers']}x{r['heads']}x{r['hidden']}) | {r['tokenizer']} | {r['shots']} | {r['lengths']} | "
            f"{r['mean_tokens']:.0f} | {r['method']} | {r['n_run']}/{r['n_max']} | {r['prefix_tokens']} | {r['seconds']:.1f} | "
            f"{r['cpu_seconds']:.1f} | {r['heads_per_s']:.1f} | {r['peak_mb']:.0f} | {r['speedup_cpu']:.2f} | {r['speedup_wall']:.2f} | "
            f"{'' if r['method'] == 'naive' or target is None else f'>= {target:g}'} | {r['verdicts_equal']} | "
            f"{r['max_iteration_score_diff']:.4f} | {r['load_avg']:.1f} |"
        )
    return lines


def _report_extra(extras: list[dict], a) -> list[str]:
    lines = ["", "## Templates sharing forwards", "",
             f"Bare parity probes under {len(TEMPLATES)} templates ({', '.join(repr(t) for t in TEMPLATES)}), sequential, at most "
             f"{a.n} each: `score_heads` per template one after another against `score_sets` (their probes fill the same batches).",
             "", "| model | lengths | probes run | alone CPU s | together CPU s | x alone (CPU) | alone wall s | together wall s | equal verdicts | max iter diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for x in extras:
        t = x["templates"]
        lines.append(f"| {x['model']} | {x['lengths']} | {'+'.join(map(str, t['probes_run']))} | {t['alone_cpu']:.1f} | {t['together_cpu']:.1f} | "
                     f"{t['alone_cpu'] / t['together_cpu']:.2f} | {t['alone_wall']:.1f} | {t['together_wall']:.1f} | {t['verdicts_equal']} | "
                     f"{t['max_iteration_score_diff']:.4f} |")
    lines += ["", "## A forward's fixed cost", "",
              "CPU seconds of the capture forward of 1 probe and of a batch of probes of one length (best of the rounds); "
              "with cost = a + s x tokens, a / s is what a forward costs on top of its tokens, in tokens "
              "(`hf_iterheads.detect.batching.FORWARD_TOKENS`).", "",
              "| model | tokens per probe | CPU s, 1 probe | CPU s, batch | batch | fixed cost (tokens) |", "|---|---|---|---|---|---|"]
    for x in extras:
        f = x["forward"]
        lines.append(f"| {x['model']} | {f['tokens']} | {f['cpu_1']:.2f} | {f['cpu_batch']:.2f} | {f['batch']} | {f['fixed_tokens']:.0f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="most probes per run (the naive way runs them all)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--models", default="gpt2,llama1b")
    ap.add_argument("--shots", default="0,4")
    ap.add_argument("--rounds", default="gpt2=2,llama1b=1", help="interleaved rounds per model (best kept)")
    ap.add_argument("--out", default=None, help="write a markdown report here (and .jsonl beside it)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_measure(**json.loads(a.child))))
        return
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rounds = dict(kv.split("=") for kv in a.rounds.split(","))
    runs, extras = [], []
    for model in a.models.split(","):
        got = _child({"model_name": model, "n": a.n, "batch_size": a.batch_size, "rounds": int(rounds.get(model, 1)),
                      "shots": [int(s) for s in a.shots.split(",")]})
        rows, x = got["rows"], got["extra"]
        runs.extend(rows)
        extras.append(x)
        t, f = x["templates"], x["forward"]
        print(f"{model:>8} {t['templates']} templates: alone {t['alone_cpu']:.1f} s CPU, together {t['together_cpu']:.1f} s CPU, "
              f"x{t['alone_cpu'] / t['together_cpu']:.2f}, verdicts equal {t['verdicts_equal']}; "
              f"a forward's fixed cost {f['fixed_tokens']:.0f} tokens", flush=True)
        for r in rows:
            print(f"{model:>8} {r['shots']}-shot {r['method']:>6}: {r['n_run']}/{r['n_max']} probes, {r['seconds']:.1f} s wall, "
                  f"{r['cpu_seconds']:.1f} s CPU, {r['heads_per_s']:.1f} heads/s, peak +{r['peak_mb']:.0f} MB, "
                  f"x{r['speedup_cpu']:.2f} CPU, verdicts equal {r['verdicts_equal']} (load {r['load_avg']:.1f})", flush=True)
    if a.out:
        Path(a.out).write_text("\n".join(_report(runs, a, started) + _report_extra(extras, a)) + "\n")
        with open(os.path.splitext(a.out)[0] + ".jsonl", "w") as f:
            for r in runs + extras:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
