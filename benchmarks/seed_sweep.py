#!/usr/bin/env python
"""Seed sweep: does the plain ``hf-iterheads train --task T --seed S`` form the iteration head every time?

Runs the plain training command for a grid of recipes x tasks x seeds with N worker processes, and appends one
JSON line per finished run to ``--jsonl`` as soon as it finishes (resumable: finished (recipe, task, seed) triples
are skipped). Per run it records:

* steps and seconds until the head formed (first evaluation with attn1 peakiness >= 0.9) and until accuracy 0.99;
* the final accuracy (mean over L = 4..16, full test split) and attn1 peakiness, from ``eval_results.json``, and both
  per length (``benchmarks/length_generalisation.py`` renders runs trained on 1..12 from them);
* which circuit formed: ``detect_iteration_heads`` on the final model (is the top head in layer 1, 0-based, i.e. the
  paper's layer 2, and flagged?) plus, per layer, where the positions that predict s_t put their attention
  (x_t, another input, EoI, the chain), so "no head" runs say what they do instead;
* the evaluation curve (step, accuracy, attn0/attn1 peakiness and mass), for the early-signal analysis.

Why a separate script and not a test: emergence is a property of seeds, measured over many minutes of training.

    python benchmarks/seed_sweep.py --tasks polynomial,parity --seeds 0-9 --workers 2      # CPU, 2 at a time
    python benchmarks/seed_sweep.py --recipe 'poly-helper:parity,binary_copy=--curriculum binary_copy:0.5:3000,polynomial:0.3:0'
    python benchmarks/seed_sweep.py --render          # benchmarks/results/seed_sweep.md from the JSONL

A recipe is ``NAME[:TASK,TASK...]=EXTRA FLAGS`` (no flags = the default recipe, the plain command); the task list
restricts it to those tasks. Each run gets ``--threads 1`` (the 2-core setting the goal is stated for). ``--cuda-workers K`` runs K of
the workers on the GPU (several processes share it), the rest on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["binary_copy", "parity", "polynomial", "cumsum", "s3_product"]
FORMED, SOLVED = 0.9, 0.99  # hf_iterheads.evaluation's thresholds (not imported: the manager stays light)
DETECT_GRACE = 25.0  # seconds past --deadline that a finished run's detection may take
CURVE_KEYS = ("step", "time", "accuracy", "attn0_peakiness", "attn1_peakiness", "attn0_mass", "attn1_mass")
EARLY_STEPS = (500, 1000, 1500, 2000, 2500, 3000, 4000)


@dataclass(frozen=True)
class Recipe:
    """A named set of extra ``train`` flags, optionally restricted to some tasks."""

    name: str
    flags: tuple[str, ...]
    tasks: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, spec: str) -> Recipe:
        head, _, flags = spec.partition("=")
        name, _, tasks = head.partition(":")
        if not name.strip():
            raise SystemExit(f"recipe {spec!r}: write NAME[:TASK,...]=FLAGS")
        return cls(name.strip(), tuple(shlex.split(flags)), tuple(t for t in tasks.split(",") if t) or None)


@dataclass(frozen=True)
class Job:
    recipe: Recipe
    task: str
    seed: int

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.recipe.name, self.task, self.seed)

    def run_dir(self, runs: Path) -> Path:
        return runs / self.recipe.name / f"{self.task.rpartition(':')[2]}-s{self.seed}"  # module:attr -> attr


def last_json(text: str) -> dict | None:
    """The last line of ``text`` that is a JSON object (warnings may follow it on stderr)."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def parse_seeds(text: str) -> list[int]:
    """``0-9`` or ``0,3,7`` or ``0-4,11``."""
    out: list[int] = []
    for part in filter(None, text.split(",")):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b) + 1) if b else [int(a)])
    return out


# --- reading a run --------------------------------------------------------------------------------------------


RESTART_EVENTS = ("unanchored", "plateau")  # the metrics.jsonl events that end an attempt (training.callbacks)


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (none when it is missing; a line cut by a kill is skipped)."""
    path = run_dir / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def trained(record: dict, key: str) -> Any:
    """``key`` of an ``eval`` record, over the trained lengths when the run trained on fewer than it evaluates
    (``--max-train-len``: the record's ``trained`` means, which the run's restarts read); accuracy stays the
    mean over 4..n_len."""
    return record.get("trained", {}).get(key, record.get(key))


def curve_of(records: list[dict], task: str) -> list[dict[str, Any]]:
    """The periodic evaluations of ``task`` among ``records`` (``eval`` records), compacted."""
    curve = [{k: (round(v, 4) if isinstance(v, float) else v) for k in CURVE_KEYS for v in [trained(r, k)]}
             for r in records if r.get("kind") == "eval" and r.get("task") == task]
    # a resumed/restarted log may repeat steps: keep the last record per step
    return list({r["step"]: r for r in curve}.values())


def read_curve(run_dir: Path, task: str) -> list[dict[str, Any]]:
    """The run's periodic evaluations of ``task`` (``metrics.jsonl`` ``eval`` records), compacted."""
    return curve_of(read_records(run_dir), task)


def read_restarts(run_dir: Path, task: str) -> list[dict[str, Any]]:
    """Each restarted attempt (``attempts/N/``): why and where it stopped (the ``unanchored`` / ``plateau`` event)
    and its evaluation curve, for the restart rules' evidence."""
    out = []
    for d in sorted((p for p in (run_dir / "attempts").glob("*") if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        records = read_records(d)
        stop = next((r for r in reversed(records) if r.get("kind") in RESTART_EVENTS), {})
        out.append({"attempt": int(d.name), "kind": stop.get("kind"), "step": stop.get("step"), "curve": curve_of(records, task)})
    return out


def best_anchor(points, until: int = 1000) -> float | None:
    """The anchor check's signal: the best attn0 peakiness (layer 1 on EoI) among (step, peakiness) evaluations
    at steps 1..``until`` (None when there is none)."""
    return max((p for step, p in points if 0 < step <= until and p is not None), default=None)


def first(curve: list[dict], test) -> tuple[int | None, float | None]:
    for r in curve:
        if test(r):
            return r["step"], r["time"]
    return None, None


PER_RUN_KEYS = ("output_dir", "seed", "threads", "attempt", "restarted_at")  # run_config.json keys that vary per run
# Options added after rows were recorded, with the value every earlier run had (TrainConfig.load reads them so).
ADDED_KEYS = {"length_weights": "uniform", "task_sources": {}}


def stored_config(row: dict) -> dict[str, Any] | None:
    """The configuration a row recorded (``recipe_config``), with ``ADDED_KEYS`` filled in for older rows."""
    return None if row.get("config") is None else {**ADDED_KEYS, **row["config"]}


def recipe_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's resolved configuration (``run_config.json``) less what differs between runs of one recipe: what
    the recipe's flags meant when it ran, so a later change of defaults cannot silently relabel its rows."""
    path = run_dir / "run_config.json"
    if not path.is_file():
        return None
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in PER_RUN_KEYS}


def run_task_name(run_dir: Path, task: str) -> str:
    """The name the run's records use for ``task`` (an import string ``module:attr`` trains as its task's name):
    the run's first task in ``run_config.json``, else ``task`` itself."""
    path = run_dir / "run_config.json"
    try:
        return json.loads(path.read_text())["tasks"][0] if path.is_file() else task
    except (ValueError, KeyError, IndexError):
        return task


def summarize_run(run_dir: Path, task: str) -> dict[str, Any]:
    """Milestones from the curve, final numbers from ``eval_results.json`` (None where the run has none)."""
    curve = read_curve(run_dir, task)
    periodic = [r for r in curve if r["step"] > 0]
    formed = first(periodic, lambda r: (r["attn1_peakiness"] or 0) >= FORMED)
    acc99 = first(periodic, lambda r: (r["accuracy"] or 0) >= SOLVED)
    solved = first(periodic, lambda r: (r["attn1_peakiness"] or 0) >= FORMED and (r["accuracy"] or 0) >= SOLVED)
    out: dict[str, Any] = {"formed_step": formed[0], "formed_s": formed[1], "acc99_step": acc99[0], "acc99_s": acc99[1],
                           "solved_step": solved[0], "solved_s": solved[1], "curve": curve,
                           "restarts": read_restarts(run_dir, task), "config": recipe_config(run_dir)}
    out["attempts"] = 1 + len(out["restarts"])
    path = run_dir / "eval_results.json"
    if path.is_file():
        final = json.loads(path.read_text())
        res = next(r for r in final["results"] if r["task"] == task)
        s = res["summary"]
        out.update(steps=final["step"], train_s=final["seconds"], accuracy=s["accuracy"],
                   generation_accuracy=s.get("generation_accuracy"), attn0=s.get("attn0_peakiness"),
                   attn1=s.get("attn1_peakiness"), summary_lengths=res.get("summary_lengths"),
                   worst_length=min(((int(L), m["accuracy"]) for L, m in res["per_length"].items()
                                     if 4 <= int(L)), key=lambda p: p[1], default=None),
                   per_length={L: {"accuracy": m["accuracy"], "attn1": m.get("attn1_peakiness")}
                               for L, m in res["per_length"].items()})  # length generalisation reads it
    return out


# --- which circuit formed (runs in its own process, on the CPU) -------------------------------------------------


def describe_attention(model, tokenizer, task: str, length: int = 12, n: int = 64) -> list[dict[str, Any]]:
    """Per layer (head 0..H-1), where the positions that predict s_t attend: the most common argmax target and the
    mass on x_t, other inputs, EoI and the chain. Layout: ``<task> x_1..x_L <eoi> s_1..s_L <eos>``; the query that
    predicts s_t sits at L + t and holds s_(t-1) (EoI for t = 1)."""
    import numpy as np
    import torch

    from hf_iterheads.circuit import eager_attentions
    from hf_iterheads.tasks import get_task
    from hf_iterheads.tokenizer import Layout

    t_obj = get_task(task)
    rng = np.random.default_rng(12345)
    x = t_obj.sample_inputs(n, length, rng)
    ids = torch.from_numpy(Layout(tokenizer, task, True).ids(x, t_obj.run(x)))
    with torch.no_grad():
        atts = eager_attentions(model, input_ids=ids, attention_mask=torch.ones_like(ids))
    eoi = length + 1
    t = torch.arange(1, length + 1)
    q = t + length  # the query that predicts s_t: EoI (L + 1) for s_1, then s_(t-1) at L + t
    out = []
    for layer, a in enumerate(atts):
        for head in range(a.shape[1]):
            w = a[:, head, q, :].float()  # (n, L, T)
            top = w.argmax(-1)  # (n, L)
            labels: dict[str, int] = {}
            for k, tt, qq in zip(top.flatten().tolist(), t.repeat(n).tolist(), q.repeat(n).tolist()):
                if k == 0:
                    lab = "task token"
                elif k <= length:
                    lab = "x_t" if k == tt else f"x_t{k - tt:+d}"
                elif k == eoi:
                    lab = "EoI"
                else:
                    lab = "self (s_t-1)" if k == qq else f"chain s_t-1{k - qq:+d}"
                labels[lab] = labels.get(lab, 0) + 1
            top_lab, count = max(labels.items(), key=lambda kv: kv[1])
            mass_xt = w[:, torch.arange(length), t].mean().item()  # query row i predicts s_(i+1): key x_(i+1)
            mass_inputs = w[:, :, 1 : length + 1].sum(-1).mean().item()
            out.append({"layer": layer, "head": head, "top_target": top_lab, "top_share": round(count / (n * length), 3),
                        "mass_x_t": round(mass_xt, 3), "mass_inputs": round(mass_inputs, 3),
                        "mass_eoi": round(w[:, :, eoi].mean().item(), 3),
                        "mass_chain": round(w[:, :, eoi + 1 :].sum(-1).mean().item(), 3)})
    return out


def detect_run(run_dir: Path, task: str) -> dict[str, Any]:
    """The detector's verdict on the final model plus the attention description; the circuit in one label."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_iterheads.detect.detection import detect_iteration_heads

    model = AutoModelForCausalLM.from_pretrained(str(run_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir))
    n_len = int(getattr(model.config, "iterheads", {}).get("n_len", 16))
    res = detect_iteration_heads(model, tokenizer, task=task, lengths=f"{min(4, n_len)}-{n_len}")
    top = res.top_heads(1)[0]
    eoi = res.top_heads(1, key="eoi_score")[0]
    heads = describe_attention(model, tokenizer, task, length=min(12, n_len))
    gating = res.gating or {}  # the flagged top head's mass on x_t per (x_t, s_(t-1)) cell (detect.gating)
    cells, gated = gating.get("cells"), gating.get("skipped") or None
    paper = top["layer"] == res.n_layers - 1 and top["detected"]
    if paper:
        circuit = "iteration head (layer 1)"
    elif top["detected"]:
        circuit = f"look-up of x_t in layer {top['layer']}"
    else:
        circuit = "other: " + "; ".join(f"L{h['layer']} -> {h['top_target']} ({h['top_share']:.0%})" for h in heads)
    return {"paper_head": bool(paper), "circuit": circuit,
            "top_head": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in top.items()},
            "eoi_head": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in eoi.items()},
            "attention": heads, "cells": cells, "gated_cells": gated}


# --- the sweep ------------------------------------------------------------------------------------------------


class Sweep:
    """Worker threads, each running one subprocess at a time on its own device; the JSONL is the only state."""

    def __init__(self, args: argparse.Namespace, jobs: list[Job]) -> None:
        self.args, self.jobs, self.lock = args, list(jobs), threading.Lock()
        self.procs: dict[int, subprocess.Popen] = {}
        self.deadline = time.time() + args.deadline if args.deadline else None
        self.durations: list[float] = []
        self.stopping = False
        from tqdm import tqdm

        self.bar = tqdm(total=len(jobs), desc="runs", dynamic_ncols=True)

    def next_job(self) -> Job | None:
        with self.lock:
            if self.stopping or not self.jobs:
                return None
            left = None if self.deadline is None else self.deadline - time.time()
            if left is not None and left < 30:
                return None  # a run started now could not even get past its first evaluations
            if left is not None and self.durations and self.args.skip_unfinishable:
                if left < 0.8 * statistics.median(self.durations):
                    return None  # it would be killed before it ends: leave the cores to the runs in flight
            return self.jobs.pop(0)

    def write(self, record: dict) -> None:
        with self.lock:
            with open(self.args.jsonl, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.bar.update(1)
            s = record
            self.bar.write(f"{s['recipe']:>14} {s['task']:>12} s{s['seed']:<3} {s['status']:>10} "
                           f"acc {s.get('accuracy')} attn1 {s.get('attn1')} formed {s.get('formed_step')} "
                           f"circuit {(s.get('detection') or {}).get('circuit')} ({s['wall_s']:.0f} s, {s['device']})")

    def call(self, cmd: list[str], env: dict, log: Path | None, timeout: float | None) -> int | None:
        """Run ``cmd`` in its own process group; None when the deadline killed it."""
        out = open(log, "w") if log else subprocess.DEVNULL
        try:
            p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
            with self.lock:
                self.procs[p.pid] = p
            try:
                return p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                return None
            finally:
                with self.lock:
                    self.procs.pop(p.pid, None)
        finally:
            if log:
                out.close()

    def worker(self, device: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        while (job := self.next_job()) is not None:
            try:
                self.run_job(job, device, env)
            except Exception as err:  # one broken run must not stop the worker (nor lose the job silently)
                self.write({"recipe": job.recipe.name, "task": job.task, "seed": job.seed, "status": "error",
                            "error": repr(err), "device": device, "wall_s": 0.0, "success": False})

    def run_job(self, job: Job, device: str, env: dict) -> None:
        """Train, summarise, detect, and write the run's record."""
        out = job.run_dir(self.args.runs_dir)
        if (out / "eval_results.json").is_file() and (out / "model.safetensors").is_file():
            # finished, but its record is missing (the sweep was stopped while it summarised): no second training
            return self.finish(job, out, 0, None, device, env, f"hf-iterheads train --task {job.task} --seed {job.seed} "
                               f"--output-dir {out} {' '.join(job.recipe.flags)} --threads 1".replace("  ", " "))
        cmd = [sys.executable, "-m", "hf_iterheads.cli", "train", "--task", job.task, "--seed", str(job.seed),
               "--output-dir", str(out), *job.recipe.flags, "--threads", "1", *self.args.train_flags]
        if (out / "run_config.json").is_file():
            cmd.append("--overwrite")  # a run killed earlier: start it again from scratch
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.time()
        left = None if self.deadline is None else self.deadline - start
        rc = self.call(cmd, env, out.parent / f"{out.name}.log", left)
        self.finish(job, out, rc, start, device, env, " ".join(["hf-iterheads", *cmd[3:]]))

    def finish(self, job: Job, out: Path, rc: int | None, start: float | None, device: str, env: dict,
               command: str) -> None:
        """Summarise and detect a run that ended with ``rc`` (None: killed); ``start`` None: a run finished before
        this sweep started, whose record is missing (its wall time is then its training time plus detection)."""
        record: dict[str, Any] = {"recipe": job.recipe.name, "task": job.task, "seed": job.seed,
                                  "flags": " ".join(job.recipe.flags), "device": device, "command": command}
        if start is None:
            record["summarised_later"] = True
            start = time.time()
        if rc is None:
            record["status"] = "incomplete"
        elif rc != 0:
            record["status"] = "failed"
            record["error"] = (out.parent / f"{out.name}.log").read_text()[-800:]
        else:
            record["status"] = "ok"
            with self.lock:
                self.durations.append(time.time() - start)
        record.update(summarize_run(out, run_task_name(out, job.task)))
        if rc == 0:
            det_env = dict(env, CUDA_VISIBLE_DEVICES="")
            left = None if self.deadline is None else max(1.0, self.deadline + DETECT_GRACE - time.time())
            det_log = out.parent / f"{out.name}.detect.json"
            drc = self.call([sys.executable, str(Path(__file__).resolve()), "--detect", str(out), job.task],
                            det_env, det_log, left)
            record["detection"] = last_json(det_log.read_text()) if drc == 0 else None
            if record["detection"] is None:
                record["detection_error"] = det_log.read_text()[-500:] if det_log.is_file() else "killed"
        record["wall_s"] = round(time.time() - start + (record.get("train_s") or 0 if record.get("summarised_later") else 0), 1)
        record["success"] = bool(rc == 0 and (record.get("accuracy") or 0) >= SOLVED
                                 and (record.get("attn1") or 0) >= FORMED
                                 and (record.get("detection") or {}).get("paper_head", False))
        self.write(record)

    def run(self, devices: list[str]) -> None:
        threads = [threading.Thread(target=self.worker, args=(d,), daemon=True) for d in devices]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.bar.close()


def done_keys(path: Path) -> set[tuple[str, str, int]]:
    """(recipe, task, seed) of the runs already recorded as finished (ok or failed; incomplete ones run again)."""
    keys = set()
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("status") in ("ok", "failed"):
                keys.add((r["recipe"], r["task"], r["seed"]))
    return keys


def make_jobs(recipes: list[Recipe], tasks: list[str], seeds: list[int], done: set) -> list[Job]:
    """Recipe by recipe (the first, the baseline, finishes first); within a recipe seed-major, so a cut sweep
    still has the same seeds for every task."""
    return [Job(r, t, s) for r in recipes for s in seeds for t in tasks
            if (r.tasks is None or t in r.tasks) and (r.name, t, s) not in done]


def pack_runs(runs: Path, target: Path) -> None:
    """The compact per-run files (metrics, config, final evaluation, detection, log) in one tar.gz."""
    import io

    with tarfile.open(target, "w:gz") as tar:
        for p in sorted(runs.rglob("*")):
            if p.is_file() and p.suffix == ".log":  # the progress bar's redraws: the end is what matters
                data = p.read_bytes()[-4000:]
                info = tarfile.TarInfo(str(p.relative_to(runs)))
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            elif p.is_file() and (p.name in ("metrics.jsonl", "run_config.json", "eval_results.json")
                                  or p.name.endswith(".detect.json")):
                tar.add(p, arcname=str(p.relative_to(runs)))


# --- the report -----------------------------------------------------------------------------------------------


def load_records(path: Path) -> list[dict]:
    """The last record per (recipe, task, seed)."""
    latest: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            latest[(r["recipe"], r["task"], r["seed"])] = r
    return list(latest.values())


def _f(v, digits: int = 3) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def circuit_class(r: dict) -> str:
    """One of four circuits, from the detector and the per-layer attention (why: "no head" hides what formed).

    * ``iteration head``: the detector flags a layer-1 head, attn1 peakiness >= 0.9;
    * ``content-gated iteration head``: the same head with attn1 peakiness < 0.9 because it looks x_t up
      (mass >= 0.9) in some (x_t, s_(t-1)) cells and skips it (< 0.5) in the others (parity: skips (1, 1));
    * ``partial iteration head``: the same head, attn1 peakiness < 0.9 otherwise;
    * ``EoI head, no look-up``: layer 0 attends EoI most (the circuit's first half), layer 1 does not look x_t up;
    * ``no EoI head``: layer 0 reads the inputs (x_t+k) and layer 1 the task token or the chain.
    """
    det = r.get("detection")
    if not det:
        return "unknown (no detection)"
    if det.get("paper_head"):
        if (r.get("attn1") or 0) >= FORMED:
            return "iteration head"
        return "content-gated iteration head" if det.get("gated_cells") else "partial iteration head"
    layer0 = next((h for h in det.get("attention", []) if h["layer"] == 0), None)
    if layer0 is not None and layer0["top_target"] == "EoI":
        return "EoI head, no look-up"
    return "no EoI head"


def _top(top: dict) -> str:
    """``L1 0.93 yes``: the detector's top head's layer, iteration score and whether it is flagged."""
    if not top:
        return "-"
    return f"L{top['layer']} {top['score']:.2f} {'yes' if top['detected'] else 'no'}"


def _at(curve: list[dict], step: int, key: str) -> float | None:
    return next((r[key] for r in curve if r["step"] == step), None)


# Which recorded recipe is today's default for each task: rows whose flags resolve to exactly the plain command's
# configuration (tests/test_seed_sweep.py checks it against training.config), so they are the default's results.
# A second recipe, recorded when the default allowed fewer restarts (--max-restarts), stands in for seeds the first
# has not run, where that limit decided nothing (limit_unused).
DEFAULT_ROWS = {"binary_copy": ("early1k-s13",), "parity": ("linear-s17",),
                "polynomial": ("cumsum-rows",), "cumsum": ("default",), "s3_product": ("default",)}


def limit_unused(row: dict) -> bool:
    """Whether the run would have been the same with more restarts allowed: it had restarts to spare, or its last
    attempt was forming (layer-2 mass at least --restart-below) at the evaluation that judges it."""
    cfg = row.get("config") or {}
    if not cfg.get("restart_at") or (row.get("attempts") or 1) - 1 < cfg.get("max_restarts", 0):
        return bool(cfg)
    judged = next((p for p in row["curve"] if p["step"] >= cfg["restart_at"]), None)
    return judged is not None and judged["attn1_mass"] >= cfg["restart_below"]


def default_rows(records: list[dict], task: str) -> list[dict]:
    """The finished runs of the plain command for ``task``, one per seed, by ``DEFAULT_ROWS``."""
    first, *others = DEFAULT_ROWS[task]
    rows = {r["seed"]: r for r in records if r["recipe"] == first and r["task"] == task and r["status"] == "ok"}
    for recipe in others:
        for r in records:
            if r["recipe"] == recipe and r["task"] == task and r["status"] == "ok" and limit_unused(r):
                rows.setdefault(r["seed"], r)
    return [rows[seed] for seed in sorted(rows)]


GOAL = 9  # of seeds 0-9


def _spread(rows: list[dict], key: str) -> str:
    """``min-max (n runs)`` of a milestone over the runs that reached it."""
    vals = [r[key] for r in rows if r.get(key) is not None]
    return f"{min(vals)}-{max(vals)} ({len(vals)} runs)" if vals else "-"


def seed_ranges(seeds: list[int]) -> str:
    """``[10, 11, 40, 41, 42]`` -> ``10-11, 40-42`` (the inverse of ``parse_seeds``)."""
    spans: list[list[int]] = []
    for seed in sorted(set(seeds)):
        if spans and seed == spans[-1][1] + 1:
            spans[-1][1] = seed
        else:
            spans.append([seed, seed])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def default_table(records: list[dict]) -> list[str]:
    """The goal (9 of 10 seeds), task by task, from the rows of ``DEFAULT_ROWS`` (seeds 0-9; other seeds listed apart)."""
    lines = ["## Today's default against the goal (seeds 0-9; 9 of 10 per task)", "",
             "The plain command `hf-iterheads train --task T --seed S --output-dir D`, on the rows recorded under "
             "the recipe whose flags resolve to it (`DEFAULT_ROWS`). A second recipe, where one is listed, was "
             "recorded when the default allowed fewer restarts and stands in for the seeds where that limit decided "
             "nothing (the run kept a restart, or its last attempt was forming when judged).", "",
             "| task | rows | success (seeds 0-9) | goal | head formed at step | 0.99 at step | wall s | failed seeds: "
             "final accuracy, attn1, circuit | other seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for task in TASKS:
        rs = default_rows(records, task)
        rec = " + ".join(name for name in DEFAULT_ROWS[task] if any(r["recipe"] == name for r in rs))
        main, other = [r for r in rs if r["seed"] < 10], [r for r in rs if r["seed"] >= 10]
        if not main:
            continue
        n_ok = sum(r["success"] for r in main)
        fails = "; ".join(f"{r['seed']}: {_f(r.get('accuracy'))}, {_f(r.get('attn1'))}, {circuit_class(r)}"
                          + (f" ({r['attempts']} attempts)" if (r.get("attempts") or 1) > 1 else "")
                          for r in main if not r["success"]) or "none"
        failed = [r["seed"] for r in other if not r["success"]]
        others = (f"{sum(r['success'] for r in other)} of {len(other)} (seeds {seed_ranges([r['seed'] for r in other])}"
                  + (f"; failed: {seed_ranges(failed)})" if failed else ")") if other else "-")
        walls = [r["wall_s"] for r in main]
        verdict = "met" if n_ok >= GOAL else "not met" if len(main) - n_ok > 10 - GOAL else "pending"
        lines.append(f"| {task} | {rec} | **{n_ok} of {len(main)}** | {verdict} "
                     f"| {_spread(main, 'formed_step')} | {_spread(main, 'acc99_step')} | {min(walls):.0f}-{max(walls):.0f} "
                     f"| {fails} | {others} |")
    return lines + [""]


def render(records: list[dict], notes: Path | None) -> str:
    recipes = list(dict.fromkeys(r["recipe"] for r in records))
    order = {t: i for i, t in enumerate(TASKS)}
    lines = ["# Seed sweep: does the plain training command form the iteration head every time?", "",
             "Generated by `python benchmarks/seed_sweep.py --render` from `benchmarks/results/seed_sweep.jsonl`; "
             "every number below is from a run recorded there. Success = final accuracy >= 0.99 (mean L = 4..16, full "
             "test split) AND final attn1 peakiness >= 0.9 AND the detector ranks a layer-1 (0-based; the paper's "
             "layer 2) head first and flags it.", ""]
    lines += default_table(records)
    if notes is not None and notes.is_file():
        lines += [notes.read_text().rstrip(), ""]
    lines += ["## Success counts", "", "| recipe | flags | task | runs finished | success | acc >= 0.99 | attn1 >= 0.9 "
              "| layer-1 head detected | head formed at step (median) | circuits |", "|---|---|---|---|---|---|---|---|---|---|"]
    for rec in recipes:
        for task in sorted({r["task"] for r in records if r["recipe"] == rec}, key=order.get):
            rs = [r for r in records if r["recipe"] == rec and r["task"] == task and r["status"] == "ok"]
            if not rs:
                continue
            steps = [r["formed_step"] for r in rs if r.get("formed_step") is not None]
            circuits: dict[str, int] = {}
            for r in rs:
                c = circuit_class(r)
                circuits[c] = circuits.get(c, 0) + 1
            n_acc = sum((r.get("accuracy") or 0) >= SOLVED for r in rs)
            n_head = sum((r.get("attn1") or 0) >= FORMED for r in rs)
            n_det = sum((r.get("detection") or {}).get("paper_head", False) for r in rs)
            n_ok = sum(r["success"] for r in rs)
            lines.append(f"| {rec} | `{rs[0]['flags'] or '(default)'}` | {task} | {len(rs)} | **{n_ok}** "
                         f"| {n_acc} | {n_head} | {n_det} "
                         f"| {_f(statistics.median(steps) if steps else None, 0)} ({len(steps)} formed) "
                         f"| {', '.join(f'{k}: {v}' for k, v in circuits.items())} |")
    lines += ["", "## Every run", "", "Formed = first evaluation (every 500 steps, 256 test sequences per length) with "
              "attn1 peakiness >= 0.9; 0.99 = first with accuracy >= 0.99. Seconds are the run's own training clock; "
              "after a restart (status `ok, 2 attempts`) steps and seconds are those of the last attempt, and wall s "
              "counts every attempt. "
              "Circuit: the class (`circuit_class`), then `iteration head (layer 1)` = the detector's top head is in "
              "layer 1 and flagged, or `other:` per layer, the most common argmax target of the positions that "
              "predict s_t (x_t = the iteration head's target; x_t+k = another input; EoI; chain s_t-1-k = the CoT "
              "states before the query's own) and its share.", "",
              "| recipe | task | seed | status | head formed: step (s) | acc 0.99: step (s) | final acc | worst L (acc) "
              "| final attn1 | top head (layer, score, flagged) | circuit | device | wall s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (recipes.index(r["recipe"]), order.get(r["task"], 99), r["seed"])):
        det = r.get("detection") or {}
        top = det.get("top_head") or {}
        worst = r.get("worst_length")
        attempts = f", {r['attempts']} attempts" if (r.get("attempts") or 1) > 1 else ""
        lines.append(
            f"| {r['recipe']} | {r['task']} | {r['seed']} | {r['status']}"
            f"{attempts}"
            f"{' **ok**' if r.get('success') else ''} "
            f"| {_f(r.get('formed_step'))} ({_f(r.get('formed_s'), 0)}) | {_f(r.get('acc99_step'))} ({_f(r.get('acc99_s'), 0)}) "
            f"| {_f(r.get('accuracy'))} | {f'L={worst[0]} ({worst[1]:.2f})' if worst else '-'} | {_f(r.get('attn1'))} "
            f"| {_top(top)} "
            f"| {circuit_class(r)}: {det.get('circuit', '-')} | {r['device']} | {r['wall_s']:.0f} |")
    lines += ["", "## Early signals: attn0 / attn1 peakiness (and attn0 mass) at steps 500-4,000, formed vs not", "",
              "Mean over the runs of each group (finished runs; formed = attn1 peakiness >= 0.9 at some evaluation).", "",
              "| recipe | task | group | runs | " + " | ".join(f"step {s}" for s in EARLY_STEPS) + " |",
              "|---|---|---|---|" + "---|" * len(EARLY_STEPS)]
    for rec in recipes:
        for task in sorted({r["task"] for r in records if r["recipe"] == rec}, key=order.get):
            rs = [r for r in records if r["recipe"] == rec and r["task"] == task and r["status"] == "ok"]
            for name, group in (("formed", [r for r in rs if r.get("formed_step") is not None]),
                                ("not formed", [r for r in rs if r.get("formed_step") is None])):
                if not group:
                    continue
                cells = []
                for s in EARLY_STEPS:
                    vals = [(_at(r["curve"], s, "attn0_peakiness"), _at(r["curve"], s, "attn1_peakiness"),
                             _at(r["curve"], s, "attn0_mass")) for r in group]
                    vals = [v for v in vals if None not in v]
                    cells.append("-" if not vals else "/".join(f"{statistics.mean(v[i] for v in vals):.2f}" for i in range(3)))
                lines.append(f"| {rec} | {task} | {name} | {len(group)} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: attn0 peakiness / attn1 peakiness / attn0 mass.", "",
              "### attn1 mass by final circuit (all tasks of a recipe)", "",
              "attn1 mass = mean attention from the position that predicts s_t to x_t in layer 1. Cells: min - max over "
              "the runs (mean).", "", "| recipe | final circuit | runs | " + " | ".join(f"step {s}" for s in EARLY_STEPS) + " |",
              "|---|---|---|" + "---|" * len(EARLY_STEPS)]
    for rec in recipes:
        rs = [r for r in records if r["recipe"] == rec and r["status"] == "ok"]
        for cls in ("iteration head", "partial iteration head", "EoI head, no look-up", "no EoI head"):
            group = [r for r in rs if circuit_class(r) == cls]
            if not group:
                continue
            cells = []
            for step in EARLY_STEPS:
                vals = [v for v in (_at(r["curve"], step, "attn1_mass") for r in group) if v is not None]
                cells.append("-" if not vals else f"{min(vals):.2f} - {max(vals):.2f} ({statistics.mean(vals):.2f})")
            lines.append(f"| {rec} | {cls} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines + restart_evidence(records) + anchor_evidence(records) + early_evidence(records)) + "\n"


BINARY_TASKS = ("binary_copy", "parity")  # the tasks with few distinct inputs (training.config.few_inputs)
MASS_BINS = (0.0, 0.22, 0.4, 1.01)  # the plateau restart's thresholds (training.config.auto_restart_below)


def restart_evidence(records: list[dict]) -> list[str]:
    """The plateau restart's evidence: layer-2 mass on x_t at step 3,000 against what the attempt became.

    Mixed-length CPU runs only (no ``--bucket``). A restarted run contributes the attempt it ended on (the
    first attempt's curve lives in its run folder, not in the JSONL)."""
    lines = ["", "## The plateau restart's evidence: attn1 mass at step 3,000 against the outcome", "",
             "Runs with every length in every batch (no `--bucket`), every recipe; one row per mass band. Formed = attn1 "
             "peakiness >= 0.9 at some evaluation of the same attempt; peak = the attempt's highest attn1 peakiness.",
             "", "| tasks | attn1 mass at step 3,000 | attempts | head formed | formed at step | peak attn1 peakiness (min - max) |",
             "|---|---|---|---|---|---|"]
    for label, binary in (("binary_copy, parity", True), ("polynomial, cumsum, s3_product", False)):
        masses = [(r, _at(r["curve"], 3000, "attn1_mass")) for r in records if r["status"] == "ok"
                  and (r["task"] in BINARY_TASKS) == binary and "--bucket" not in (r.get("flags") or "").split()]
        for lo, hi in zip(MASS_BINS, MASS_BINS[1:]):
            group = [r for r, mass in masses if mass is not None and lo <= mass < hi]
            if not group:
                continue
            peaks = [max(c["attn1_peakiness"] for c in r["curve"]) for r in group]
            formed = sorted(r["formed_step"] for r in group if r.get("formed_step") is not None)
            lines.append(f"| {label} | {lo:.2f} - {min(hi, 1.0):.2f} | {len(group)} | {len(formed)} "
                         f"| {f'{formed[0]} - {formed[-1]} (median {statistics.median(formed):.0f})' if formed else '-'} "
                         f"| {min(peaks):.2f} - {max(peaks):.2f} |")
    return lines


OFFSET_TASKS = ("binary_copy", "parity", "cumsum", "s3_product")  # position offsets by default before polynomial had them
ANCHOR_BELOW, ANCHOR_STEP = 0.2, 1000  # the anchor restart's defaults (training.config.auto_anchor_below, anchor_at)


def has_offsets(r: dict) -> bool:
    """Whether a recorded run trained with position offsets: its stored configuration says so, or (older rows,
    recorded without one) its flags under the defaults of their time."""
    if "position_offsets" in (r.get("config") or {}):
        return bool(r["config"]["position_offsets"])
    flags = (r.get("flags") or "").split()
    return "--position-offsets" in flags or (r["task"] in OFFSET_TASKS and "--no-position-offsets" not in flags)


def anchor_evidence(records: list[dict]) -> list[str]:
    """The anchor restart's evidence: layer 1's best attn0 peakiness up to step 1,000 against what the attempt
    became, for every recorded attempt with position offsets and mixed lengths (restarted attempts included)."""
    lines = ["", "## The anchor restart's evidence: attn0 peakiness by step 1,000 against the outcome", "",
             f"Attempts with position offsets and every length in every batch, every recipe. Anchor = the attempt's best "
             f"attn0 peakiness (layer 1 on EoI) at steps 500 and {ANCHOR_STEP:,}. An attempt restarted at step "
             f"{ANCHOR_STEP:,} for an anchor under {ANCHOR_BELOW} has no outcome (counted apart); formed = attn1 peakiness "
             ">= 0.9 at some evaluation; solved = the run's success (its last attempt only).", "",
             "| task | anchor | attempts | restarted there (anchor) | restarted later (plateau) | ran to the end "
             "| head formed | solved | peak attn1 peakiness (min - max) |", "|---|---|---|---|---|---|---|---|---|"]
    order = {t: i for i, t in enumerate(TASKS)}
    attempts: dict[tuple[str, bool], list[tuple[str, dict, list]]] = {}
    for r in records:
        if r["status"] != "ok" or not has_offsets(r) or "--bucket" in (r.get("flags") or "").split():
            continue
        tries = [(a.get("kind") or "restarted", None, a["curve"]) for a in r.get("restarts") or []]
        tries.append(("end", r, r["curve"]))
        for kind, run, curve in tries:
            if sum(0 < c["step"] <= ANCHOR_STEP for c in curve) < 2:
                continue  # an attempt without its step-500 and step-1,000 evaluations (an older restart's record)
            anchor = best_anchor(((c["step"], c["attn0_peakiness"]) for c in curve), ANCHOR_STEP)
            if anchor is not None:
                attempts.setdefault((r["task"], anchor >= ANCHOR_BELOW), []).append((kind, run, curve))
    for (task, anchored), group in sorted(attempts.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])):
        ended = [(run, curve) for kind, run, curve in group if kind == "end"]
        peaks = [max(c["attn1_peakiness"] or 0 for c in curve) for _, curve in ended]
        lines.append(f"| {task} | {'>=' if anchored else '<'} {ANCHOR_BELOW} | {len(group)} "
                     f"| {sum(k == 'unanchored' for k, _, _ in group)} | {sum(k == 'plateau' for k, _, _ in group)} "
                     f"| {len(ended)} | {sum(p >= FORMED for p in peaks)} | {sum(bool(run['success']) for run, _ in ended)} "
                     f"| {f'{min(peaks):.2f} - {max(peaks):.2f}' if peaks else '-'} |")
    return lines


EARLY_STEP, EARLY_BELOW = 1000, 0.4  # binary copy's restart (training.config.auto_restart_at / auto_restart_below)


def early_evidence(records: list[dict]) -> list[str]:
    """Binary copy's early restart's evidence: the layer-2 mass on x_t at step 1,000 against what the attempt became,
    for every recorded binary-copy attempt with cumsum rows (today's curriculum), offsets and mixed lengths."""
    lines = ["", "## Binary copy's early restart's evidence: attn1 mass at step 1,000 against the outcome", "",
             f"Binary-copy attempts with cumsum rows (today's curriculum), position offsets and every length in every "
             f"batch, every recipe, restarted attempts included. An attempt restarted at step {EARLY_STEP:,} has no outcome "
             "(counted apart); one restarted at step 3,000 had its mass under 0.22 there; formed = attn1 peakiness >= 0.9 at "
             "some evaluation of the attempt; solved = the run's success (its last attempt only).", "",
             f"| attn1 mass at step {EARLY_STEP:,} | attempts | restarted there | restarted at step 3,000 | ran to the end "
             "| head formed | formed at step | solved |", "|---|---|---|---|---|---|---|---|"]
    bands: dict[bool, list] = {}
    for r in records:
        flags = (r.get("flags") or "").split()
        curriculum = (r.get("config") or {}).get("curriculum") or " ".join(flags)
        if (r["task"] != "binary_copy" or r["status"] != "ok" or "cumsum:" not in curriculum or not has_offsets(r)
                or "--bucket" in flags):
            continue
        tries = [(a.get("step"), None, a["curve"]) for a in r.get("restarts") or []] + [(None, r, r["curve"])]
        for stopped, run, curve in tries:
            mass = _at(curve, EARLY_STEP, "attn1_mass")
            if mass is not None:
                bands.setdefault(mass >= EARLY_BELOW, []).append((stopped, run, curve))
    for forming in (False, True):
        group = bands.get(forming, [])
        if not group:
            continue
        ended = [(run, curve) for stopped, run, curve in group if run is not None]
        formed = sorted(next(c["step"] for c in curve if (c["attn1_peakiness"] or 0) >= FORMED) for _, curve in ended
                        if any((c["attn1_peakiness"] or 0) >= FORMED for c in curve))
        lines.append(f"| {'>=' if forming else '<'} {EARLY_BELOW} | {len(group)} "
                     f"| {sum(st == EARLY_STEP for st, _, _ in group)} | {sum(st is not None and st > EARLY_STEP for st, _, _ in group)} "
                     f"| {len(ended)} | {len(formed)} | {f'{formed[0]} - {formed[-1]}' if formed else '-'} "
                     f"| {sum(bool(run['success']) for run, _ in ended)} |")
    return lines


# --- CLI ------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--tasks", default=",".join(TASKS), help="tasks, comma separated (default: all five)")
    p.add_argument("--seeds", default="0-9", help="seeds, e.g. 0-9 or 0,3,7 (default 0-9)")
    p.add_argument("--recipe", action="append", default=None, metavar="NAME[:TASKS]=FLAGS",
                   help="a recipe to run (repeatable, run in this order); default: 'default=' (the plain command)")
    p.add_argument("--train-flags", default="", help="flags added to every run, e.g. '--max-steps 2000' (smoke tests)")
    p.add_argument("--workers", type=int, default=2, help="parallel runs (default 2: two runs on a 2-core machine)")
    p.add_argument("--cuda-workers", type=int, default=0, help="how many of the workers train on the GPU (default 0)")
    p.add_argument("--jsonl", type=Path, default=ROOT / "benchmarks/results/seed_sweep.jsonl")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs/seed_sweep")
    p.add_argument("--deadline", type=float, default=None, help="seconds: kill what still runs then (recorded incomplete)")
    p.add_argument("--skip-unfinishable", action="store_true",
                   help="with --deadline: start no run that the median run time says cannot finish")
    p.add_argument("--pack", type=Path, default=None, help="at the end, a tar.gz of every run's compact files")
    p.add_argument("--render", action="store_true", help="write --out (markdown) from --jsonl and exit")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/seed_sweep.md")
    p.add_argument("--notes", type=Path, default=ROOT / "benchmarks/results/seed_sweep_notes.md",
                   help="hand-written analysis included by --render")
    p.add_argument("--detect", nargs=2, metavar=("RUN_DIR", "TASK"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.detect:
        print(json.dumps(detect_run(Path(args.detect[0]), args.detect[1])))
        return
    if args.render:
        args.out.write_text(render(load_records(args.jsonl), args.notes))
        print(f"wrote {args.out}")
        return
    recipes = [Recipe.parse(s) for s in (args.recipe or ["default="])]
    args.train_flags = shlex.split(args.train_flags)
    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
    jobs = make_jobs(recipes, args.tasks.split(","), parse_seeds(args.seeds), done_keys(args.jsonl))
    devices = ["cuda"] * min(args.cuda_workers, args.workers) + ["cpu"] * max(0, args.workers - args.cuda_workers)
    print(f"{len(jobs)} runs to do, {len(devices)} workers ({', '.join(sorted(set(devices)))})", file=sys.stderr)
    try:
        Sweep(args, jobs).run(devices)
    finally:
        if args.pack is not None and args.runs_dir.is_dir():
            pack_runs(args.runs_dir, args.pack)


if __name__ == "__main__":
    main()
