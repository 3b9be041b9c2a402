"""Screen candidate recipes on the early signal, cheaply.

A run that will form the iteration head shows it by step 2,500: the layer-2 attention mass on x_t
(``attn1_mass``) there was 0.63-0.98 in 10 of the 12 mixed-length runs that went on to form the head (the two
others: parity, forming late) and 0.12-0.37 in all 16 that did not (bucketed: 0.25-0.35 and 0.06-0.19;
the early-signal tables of benchmarks/results/seed_sweep.md). So a candidate can be
screened on many seeds for a fraction of the price of full runs: each run is the plain ``hf-iterheads train``
command with the candidate's flags and ``--restart-at 0`` (one attempt: the signal is what a restart would read),
stopped once its evaluation at ``--until`` is written. ``forming``: the mass is at least the default
``--restart-below`` (over the trained lengths when a run trains on fewer than it evaluates, as the restart reads
it). A candidate that raises the signal's rate is then confirmed with full runs (benchmarks/seed_sweep.py).

    python benchmarks/early_signal_screen.py --tasks polynomial,parity --seeds 100-103 \
        --candidate default= --candidate beta2=--betas 0.9,0.98 --workers 2

One JSON line per finished run goes to --out (resumable: runs already there are skipped); ``--table`` prints
--out as one markdown table per task (candidate x seed).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from seed_sweep import best_anchor, parse_seeds, trained  # this folder's sibling script (run from the repository root)

from hf_iterheads.outputs import read_jsonl
from hf_iterheads.tasks import get_task
from hf_iterheads.training import FAST
from hf_iterheads.training.config import ANCHOR_BELOW, auto_restart_at, auto_restart_below


def signal(task: str, step: int | None = None) -> float:
    """The attn1 mass from which a run counts as forming at ``step`` (default: the task's ``--restart-at``): today's
    default ``--restart-below`` there (older rows were judged against the thresholds of their time, which their
    flags record)."""
    return auto_restart_below([task], FAST.n_len, auto_restart_at([task]) if step is None else step)


def evals(metrics: Path) -> list[dict]:
    """The run's evaluation records so far (the file is being written: a torn last line is skipped)."""
    return [r for r in read_jsonl(metrics, torn_tail_ok=True) if r.get("kind") == "eval"] if metrics.exists() else []


def screen(name: str, flags: str, task: str, seed: int, until: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "hf_iterheads.cli", "train", "--task", task, "--seed", str(seed),
               "--output-dir", str(out), "--threads", str(threads), "--report-to", "none", "--restart-at", "0", "--anchor-at", "0",
               *shlex.split(flags)]
        start = time.time()
        log = open(Path(tmp) / "log", "w+")  # a file, not a pipe: tqdm's output would fill a pipe and stall the run
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        while proc.poll() is None:
            rows = evals(out / "metrics.jsonl")
            if rows and rows[-1]["step"] >= until:
                proc.kill()
                break
            time.sleep(2)
        proc.wait()
        rows = evals(out / "metrics.jsonl")
        log.seek(0)
        err = "" if rows and rows[-1]["step"] >= until else log.read()[-400:]
        log.close()
    keys = ("accuracy", "attn0_mass", "attn0_peakiness", "attn1_mass", "attn1_peakiness")
    curve = {r["step"]: {k: None if v is None else round(v, 3) for k in keys for v in [trained(r, k)]}
             for r in rows if r.get("task") == get_task(task).name}  # an import string's records carry its task's name
    at = max((s for s in curve if s <= until), default=None)
    mass = curve[at]["attn1_mass"] if at is not None else None
    anchor = best_anchor(((s, c["attn0_peakiness"]) for s, c in curve.items()), until)
    return {"candidate": name, "flags": flags, "task": task, "seed": seed, "seconds": round(time.time() - start, 1),
            "signal_step": at, "attn1_mass": mass, "forming": mass is not None and mass >= signal(task, at), "signal": signal(task, at),
            "anchor": anchor, "curve": curve, "error": err}


def table(rows: list[dict]) -> str:
    """A markdown table per task: candidate x seed, the attn1 mass at each run's signal step, and how many of a
    candidate's runs were forming (mass >= the task's signal) there."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        seeds = sorted({r["seed"] for r in mine})
        steps = sorted({r["signal_step"] for r in mine if r["signal_step"] is not None})
        marks = ", ".join(f"{signal(task, s)} at step {s}" for s in steps)
        out += [f"{task}: attn1 mass at step {'/'.join(map(str, steps))} (forming: >= {marks}, today's --restart-below)", "",
                "| candidate | " + " | ".join(f"seed {s}" for s in seeds) + " | forming | mean |",
                "|---" * (len(seeds) + 3) + "|"]
        for name in dict.fromkeys(r["candidate"] for r in mine):
            by_seed = {r["seed"]: r["attn1_mass"] for r in mine if r["candidate"] == name}
            at = {r["seed"]: r["signal_step"] for r in mine if r["candidate"] == name}
            got = [m for m in by_seed.values() if m is not None]
            forming = sum(m is not None and m >= signal(task, at[s]) for s, m in by_seed.items())
            cells = [f"{by_seed[s]:.3f}" if by_seed.get(s) is not None else "" for s in seeds]
            flags = next(r["flags"] for r in mine if r["candidate"] == name) or "(default)"
            mean = f"{sum(got) / len(got):.3f}" if got else ""
            out.append(f"| {name} (`{flags}`) | " + " | ".join(cells)
                       + f" | {forming}/{len(got)} | {mean} |")
        out.append("")
        anchored = [r for r in mine if r.get("anchor") is not None]
        if anchored:  # rows that record it: layer 1's best attn0 peakiness (the anchor check's signal)
            out += [f"{task}: best attn0 peakiness up to the signal step (anchored: >= {ANCHOR_BELOW})", "",
                    "| candidate | " + " | ".join(f"seed {s}" for s in seeds) + " | anchored |", "|---" * (len(seeds) + 2) + "|"]
            for name in dict.fromkeys(r["candidate"] for r in anchored):
                by_seed = {r["seed"]: r["anchor"] for r in anchored if r["candidate"] == name}
                out.append(f"| {name} | " + " | ".join(f"{by_seed[s]:.2f}" if s in by_seed else "" for s in seeds)
                           + f" | {sum(a >= ANCHOR_BELOW for a in by_seed.values())}/{len(by_seed)} |")
            out.append("")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="polynomial")
    p.add_argument("--seeds", default="100-103", help="e.g. 100-103,110")
    p.add_argument("--candidate", action="append", default=[], help="NAME=FLAGS (repeatable)")
    p.add_argument("--until", type=int, default=None,
                   help="stop each run after this step's evaluation (default: the task's --restart-at)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/early_signal_screen.jsonl"))
    p.add_argument("--table", action="store_true", help="print --out as markdown tables and exit")
    a = p.parse_args()
    if a.table:
        print(table(read_jsonl(a.out)))
        return
    done = set()
    if a.out.exists():
        for line in a.out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["candidate"], r["task"], r["seed"]))
    jobs = []
    for spec in a.candidate:
        name, _, flags = spec.partition("=")
        for seed in parse_seeds(a.seeds):  # seed-major, so every candidate gets its first seeds early
            for task in a.tasks.split(","):
                if (name, task, seed) not in done:
                    jobs.append((name, flags, task, seed))
    jobs.sort(key=lambda j: j[3])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(a.workers) as pool:
        for future in as_completed([pool.submit(screen, *j, a.until or auto_restart_at([j[2]]), a.threads) for j in jobs]):
            row = future.result()
            with a.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{row['candidate']:>14} {row['task']:>12} seed {row['seed']:>4}: attn1 mass {row['attn1_mass']} "
                  f"at {row['signal_step']} ({row['seconds']} s) {row['error'][-120:]}", flush=True)


if __name__ == "__main__":
    main()
