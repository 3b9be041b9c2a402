"""``hf-iterheads reproduce``: the paper's findings (paper.md section 9) as measured tables and figures.

One command trains every model the findings need, scores each with the iteration-head detector (and
ablation), and writes ``DIR/report.md`` (tables, PNG figures, the exact commands and versions) and
``DIR/results.json``. Every number in the report is read back from the files the runs wrote.

Experiments (``runs/NAME`` in the output directory, one ``hf-iterheads train`` run each):

* ``{task}-cot-2L[-seedS]`` -- CoT, 2 layers, from scratch, several seeds per task (binary copy, parity,
  polynomial): the first finding and the seed-to-seed variance rest on them;
* ``{task}-{nocot-2L|cot-1L}`` -- the paper's ablations: no CoT, or 1 layer;
* ``transfer-parity-seedS`` -- parity fine-tuned from ``polynomial-cot-2L`` (the paper's transfer) against the
  parity runs from scratch: steps to 0.99 test accuracy;
* ``polynomial-cot-2L-dW`` -- the embedding-width sweep (the main run is d = 128);
* ``polynomial-cot-2L-trainM`` -- trained on lengths 1..M, tested up to n_len (length generalisation); with
  ``-lengthrecipe``, the same with ``training.config.length_recipe`` (not at ``--full``: the paper's fixed dataset).

Scales: ``--quick`` (default) is our default training recipe, 3 seeds per task from scratch, shorter budgets
for the controls (its wall time on 2 CPU cores is in each report's header); ``--full`` is the paper's recipe
and budgets (1000 epochs, 5 seeds), for GPUs. Runs go to separate worker processes
(one CPU thread each, or one GPU each); an interrupted reproduction continues where it stopped when run
again with the same ``--output-dir``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import IterHeadsError
from ..evaluation import FORMED, SOLVED, first_step
from ..outputs import check_not_in_use, check_writable, folder_lock, remove_atomically, write_json_atomic
from ..tasks import PAPER_TASKS, get_task, task_ref
from ..training.config import RECIPES, auto_max_steps, length_recipe
from .report import update_readme, write_report

VARIANTS = (("cot", 2), ("nocot", 2), ("cot", 1))  # the paper's ablations: CoT vs none, 2 layers vs 1


@dataclasses.dataclass(frozen=True)
class Scale:
    """Budgets of one reproduction (optimizer steps unless said otherwise)."""

    name: str
    recipe: str  # training recipe of every run (training.RECIPES)
    n_len: int
    # CoT, 2 layers, from scratch: every task and seed (stopped once solved), the length run; None = each task's
    # default budget (training.config.auto_max_steps)
    main_steps: int | None
    short_steps: int  # no-CoT and 1-layer runs
    transfer_steps: int  # fine-tuning budget of the transfer runs
    width_steps: int
    seeds: int  # CoT 2-layer runs from scratch per task (seeds 0..seeds-1)
    transfer_seeds: int  # fine-tuning runs from polynomial-cot-2L
    widths: tuple[int, ...]
    train_len: int  # longest length of the length-generalisation run
    per_length: int  # test sequences per length (final evaluation)
    eval_every: int
    curve_every: int  # evaluation interval of the parity and transfer runs (the transfer figure's curves)
    probes: int  # detector probes per model
    preset: str = "paper"  # model preset every run starts from (modeling.PRESETS)
    transfer_args: tuple[str, ...] = ()  # extra flags of the fine-tuning runs


# The quick scale is the default recipe throughout. Fine-tuning uses the paper's learning rate: at 1e-3 the
# transferred head was first disrupted, then relearned.
# The width sweep's wide end is the main run (d = 128); d = 16 is the narrow end.
QUICK = Scale("quick", "fast", 16, main_steps=None, short_steps=2000, transfer_steps=2500, width_steps=4000,
              seeds=3, transfer_seeds=2, widths=(16,), train_len=12, per_length=1024, eval_every=500, curve_every=250,
              probes=64, transfer_args=("--lr", "3e-4"))
FULL = Scale("full", "paper", 16, main_steps=64000, short_steps=64000, transfer_steps=64000, width_steps=64000, seeds=5,
             transfer_seeds=5, widths=(16, 32, 48, 64, 256), train_len=12, per_length=1024, eval_every=640,
             curve_every=640, probes=256)
SMOKE = Scale("smoke", "fast", 6, main_steps=40, short_steps=20, transfer_steps=20, width_steps=20, seeds=2,
              transfer_seeds=2, widths=(16,), train_len=4, per_length=16, eval_every=10, curve_every=10, probes=8,
              preset="tiny")
SCALES = {s.name: s for s in (QUICK, FULL, SMOKE)}


@dataclasses.dataclass
class Job:
    """One training run plus the detector on its result; ``deps`` must finish first."""

    name: str
    task: str
    train_args: list[str]
    steps: int
    meta: dict[str, Any]
    deps: tuple[str, ...] = ()
    detect_tasks: tuple[str, ...] = ()

    def cost(self) -> float:  # for scheduling the longest first
        return self.steps * (2.0 if self.meta.get("cot", True) else 1.2) * self.meta.get("layers", 2)


def plan(scale: Scale, extra: tuple[str, ...] = ()) -> list[Job]:
    """Every run of a reproduction, in the order the report tells the story; ``extra`` tasks (names or import
    strings ``module:attr``) get the first finding's grid too: CoT 2 layers from scratch per seed, no CoT, 1 layer."""
    common = ["--recipe", scale.recipe, "--preset", scale.preset, "--n-len", str(scale.n_len),
              "--per-length", str(scale.per_length), "--eval-every", str(scale.eval_every), "--report-to", "none"]
    jobs: list[Job] = []

    def add(name, ref, steps, extra=(), deps=(), detect=None, **meta):
        task = get_task(ref).name  # an import string trains as itself, and is named by its task's name
        meta = {"task": task, "cot": True, "layers": 2, "width": 128, "seed": 0, **meta}
        steps = steps or auto_max_steps([task], scale.n_len)
        args = ["--task", task_ref(ref), *common, "--max-steps", str(steps), "--seed", str(meta["seed"]), *extra]
        if not meta["cot"]:
            args.append("--no-cot")
        if meta["layers"] != 2:
            args += ["--n-layer", str(meta["layers"])]
        jobs.append(Job(name, task, args, steps, meta, tuple(deps), tuple(detect or (task,))))

    for ref in (*PAPER_TASKS, *extra):
        task = get_task(ref).name
        curve = ["--eval-every", str(scale.curve_every)] if task == "parity" else []
        for cot, layers in VARIANTS:
            if cot == "cot" and layers == 2:  # from scratch, several seeds: the first finding's verdict rests on them
                for seed in range(scale.seeds):
                    add(f"{task}-cot-2L" + (f"-seed{seed}" if seed else ""), ref, scale.main_steps,
                        [*curve, "--stop-when-solved"], kind="grid" if seed == 0 else "seed", seed=seed,
                        detect=("polynomial", "parity") if task == "polynomial" and seed == 0 else None)
            else:
                add(f"{task}-{cot}-{layers}L", ref, scale.short_steps, kind="grid", cot=cot == "cot", layers=layers)
    for seed in range(scale.transfer_seeds):
        add(f"transfer-parity-seed{seed}", "parity", scale.transfer_steps,
            ["--eval-every", str(scale.curve_every), "--stop-when-solved", "--init-from", "@polynomial-cot-2L",
             *scale.transfer_args],
            deps=("polynomial-cot-2L",), kind="transfer", seed=seed)
    for width in scale.widths:
        add(f"polynomial-cot-2L-d{width}", "polynomial", scale.width_steps, ["--n-embd", str(width), "--stop-when-solved"],
            kind="width", width=width)
    add(f"polynomial-cot-2L-train{scale.train_len}", "polynomial", scale.main_steps,
        ["--max-train-len", str(scale.train_len)], kind="length", train_len=scale.train_len)
    if RECIPES[scale.recipe].data == "online":  # a fixed dataset (the paper's) cannot draw lengths in proportion to L
        add(f"polynomial-cot-2L-train{scale.train_len}-lengthrecipe", "polynomial", scale.main_steps,
            ["--max-train-len", str(scale.train_len), *length_recipe(scale.n_len)], kind="length",
            train_len=scale.train_len, length_recipe=True)
    return jobs


# --- running ------------------------------------------------------------------------------------------------


def _done(run: Path) -> bool:
    return (run / "eval_results.json").is_file() and (run / "model.safetensors").is_file()


PER_RUN_KEYS = ("output_dir", "threads", "attempt", "restarted_at")  # run_config.json keys that vary per run


def _stale(run: Path, args: list[str]) -> bool:
    """Whether the run in ``run`` was trained (or started) with another configuration than ``args`` resolve to today:
    the plan, or a default it leaves to the tasks, changed since. Such a run is trained again, not reported."""
    from ..training.cli import config_of

    stored = run / "run_config.json"
    if not stored.is_file():
        return False
    then = json.loads(stored.read_text())
    now = json.loads(json.dumps(dataclasses.asdict(config_of(["--output-dir", str(run), *args]))))
    return any(then.get(k) != v for k, v in now.items() if k not in PER_RUN_KEYS)


def run_job(job: Job, out: Path, threads: int, probes: int, lengths: str, env: dict[str, str]) -> None:
    """Train (or resume, or skip when finished with today's configuration), then detect, in one worker process
    (``paper.steps``: torch is imported once per job); logs go to ``logs/NAME.train.log`` and
    ``logs/NAME.detect-TASK.log``."""
    run = out / "runs" / job.name
    logs = out / "logs"
    args = [a.replace("@", str(out / "runs") + os.sep) if a.startswith("@") else a for a in job.train_args]
    if _stale(run, args):
        shutil.rmtree(run)  # its weights, logs and detections answer another plan
    steps: list[list[str]] = []
    train = not _done(run)
    if train:
        resume = (run / "run_config.json").is_file() and (run / "checkpoints").is_dir()
        if run.exists() and not resume:
            shutil.rmtree(run)
        steps.append([str(logs / f"{job.name}.train.log"), "train", "--output-dir", str(run), "--threads", str(threads),
                      *(["--resume"] if resume else args)])
    for task in job.detect_tasks:
        dest = run / f"detect-{task}"
        if not (dest / "scores.json").is_file():
            shutil.rmtree(dest, ignore_errors=True)
            steps.append([str(logs / f"{job.name}.detect-{task}.log"), "detect", str(run), "--task", task, "--ablate",
                          "--n", str(probes), "--lengths", lengths, "--output-dir", str(dest)])
    if steps:
        _call(steps, env)
    if train:
        shutil.rmtree(run / "checkpoints", ignore_errors=True)  # the final model is what the report needs


def _call(steps: list[list[str]], env: dict[str, str]) -> None:
    """Run ``steps`` (each ``[log, command, args...]``) in one ``paper.steps`` process; a failure names its log's
    last line."""
    proc = subprocess.run([sys.executable, "-m", "hf_iterheads.paper.steps", json.dumps(steps)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        named = (proc.stderr.strip().splitlines() or [""])[-1]
        log = Path(named) if named in {s[0] for s in steps} else None
        tail = (log.read_text().strip().splitlines()[-1:] if log and log.is_file() else proc.stderr.strip().splitlines()[-1:]) or [""]
        raise RuntimeError(f"exit {proc.returncode}: {tail[0][:200]}" + (f" (log: {log})" if log else ""))


def run_plan(jobs: list[Job], out: Path, workers: int, threads: int, scale: Scale, gpus: int) -> dict[str, str]:
    """Run ``jobs`` on ``workers`` processes, dependencies first, longest first; returns name -> status."""
    from tqdm.auto import tqdm

    status: dict[str, str] = {}
    pending = sorted(jobs, key=lambda j: -j.cost())
    running: dict[futures.Future, Job] = {}
    bar = tqdm(total=len(jobs), desc="reproduce", unit="run", dynamic_ncols=True)
    with futures.ThreadPoolExecutor(max_workers=workers) as pool:
        slot = 0
        while pending or running:
            for job in list(pending):
                if len(running) >= workers:
                    break
                if any(status.get(d) not in (None, "ok") for d in job.deps):
                    pending.remove(job)
                    status[job.name] = "skipped: " + ", ".join(d for d in job.deps if status.get(d) != "ok") + " failed"
                    bar.update(1)
                    continue
                if all(status.get(d) == "ok" for d in job.deps):
                    pending.remove(job)
                    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                               TOKENIZERS_PARALLELISM="false")
                    if gpus:
                        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
                    slot += 1
                    lengths = f"{min(4, scale.n_len)}-{scale.n_len}"  # the detector's probes: the summary lengths
                    running[pool.submit(run_job, job, out, threads, scale.probes, lengths, env)] = job
            if not running:
                break
            bar.set_postfix_str(", ".join(sorted(j.name for j in running.values())), refresh=True)
            done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
            for fut in done:
                job = running.pop(fut)
                err = fut.exception()
                status[job.name] = "ok" if err is None else f"failed: {err}"
                if err is not None:
                    bar.write(f"{job.name} failed: {err}")
                bar.update(1)
    bar.close()
    return status


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA is simply "no GPU"
        return 0


# --- reading the runs back ----------------------------------------------------------------------------------


def collect(job: Job, out: Path) -> dict[str, Any]:
    """Everything the report says about one run, read from the files the run wrote."""
    from ..training import read_metrics
    from ..training.callbacks import over_trained_lengths

    run = out / "runs" / job.name
    row: dict[str, Any] = {"name": job.name, **job.meta, "budget_steps": job.steps, "path": f"runs/{job.name}"}
    if not _done(run):
        return row
    final = json.loads((run / "eval_results.json").read_text())
    result = final["results"][0]
    # the last is the final one; a --max-train-len run's head is judged on its trained lengths (the unseen would hide it)
    evals = [over_trained_lengths(r) for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "eval"]
    row.update(
        steps=final["step"], seconds=final["seconds"], summary=result["summary"],
        per_length={int(L): m["accuracy"] for L, m in result["per_length"].items()},
        generation_per_length={int(L): m.get("generation_accuracy") for L, m in result["per_length"].items()},
        formed_step=first_step(evals, "attn1_peakiness", FORMED), solved_step=first_step(evals, "accuracy", SOLVED),
        curve=[{k: r.get(k) for k in ("step", "time", "accuracy", "attn0_peakiness", "attn1_peakiness")} for r in evals],
    )
    row["detect"] = {}
    for task in job.detect_tasks:
        path = run / f"detect-{task}" / "scores.json"
        if path.is_file():
            s = json.loads(path.read_text())
            top, ab = s["top_heads"][0], s.get("ablation") or {}
            zero = ab.get("zero") or {}
            row["detect"][task] = {
                "layer": top["layer"], "head": top["head"], "iteration_score": top["score"],
                "peakiness": top["peakiness"], "detected": top["detected"], "eoi_score": s["eoi_top_heads"][0]["score"],
                "token_accuracy": (ab.get("clean") or {}).get("token_accuracy"),
                "ablated_token_accuracy": (zero.get("top") or {}).get("token_accuracy"),
                "random_ablated_token_accuracy": (zero.get("random_mean") or {}).get("token_accuracy"),
                "chance_token_accuracy": (ab.get("clean") or {}).get("chance_token_accuracy"),
            }
    return row


# --- CLI ----------------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("hf-iterheads", "torch", "transformers", "datasets", "accelerate", "huggingface_hub", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def prepare(out: Path, scale: Scale, overwrite: bool, create: bool = True) -> None:
    """A fresh folder, or one an earlier reproduction of the same scale left (it is continued).

    Every refusal comes before anything is created; ``create=False`` only checks."""
    marker = out / "reproduce.json"
    check_writable(out, "dir", "--output-dir")
    if out.exists() and any(out.iterdir()):
        if not marker.is_file():
            raise IterHeadsError(f"{out} exists and is not a reproduction folder; choose another --output-dir")
        try:
            previous = json.loads(marker.read_text()).get("scale")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise IterHeadsError(f"{marker} is damaged (not a JSON object); choose another --output-dir") from None
        if previous != scale.name and not overwrite:
            raise IterHeadsError(f"{out} holds a --{previous} reproduction; pass --overwrite to start a --{scale.name} one")
        if overwrite and create:
            check_not_in_use(out, "--output-dir")  # another reproduction still runs there
            remove_atomically(out)
    if create:
        out.mkdir(parents=True, exist_ok=True)
        if not marker.is_file():
            write_json_atomic({"scale": scale.name, "started": time.strftime("%Y-%m-%d %H:%M:%S")}, marker)


def extra_tasks(spec: str) -> tuple[str, ...]:
    """``--tasks``: the references of the tasks beyond the paper's three, each checked now (before any training)."""
    refs = tuple(dict.fromkeys(t.strip() for t in (spec or "").split(",") if t.strip()))
    names = [get_task(r).name for r in refs]
    paper = sorted(set(names) & set(PAPER_TASKS))
    if paper or len(set(names)) != len(names):
        raise IterHeadsError(f"--tasks: {', '.join(paper) or 'a task'} is named twice (the paper's three always run)")
    return refs


def check_readme(readme: Path) -> None:
    """Before hours of training: the README to refresh exists, has the generated block, and can be written."""
    from .report import RESULTS_END, RESULTS_START

    if not readme.is_file():
        what = "is a folder, not a file" if readme.is_dir() else "does not exist"
        raise IterHeadsError(f"--update-readme {readme} {what}")
    try:
        text = readme.read_text()
    except UnicodeDecodeError:
        raise IterHeadsError(f"--update-readme {readme} is not UTF-8 text") from None
    if RESULTS_START not in text or RESULTS_END not in text:
        raise IterHeadsError(f"--update-readme {readme} has no {RESULTS_START} ... {RESULTS_END} block to fill")
    check_writable(readme, "file", "--update-readme")


def run_reproduce(args: argparse.Namespace) -> int:
    """Check every option and the output folder, run (or only render) the plan, write the report."""
    scale = SCALES[args.scale]
    cpus = os.cpu_count() or 1
    out = Path(args.output_dir)
    if args.overwrite and args.render_only:
        raise IterHeadsError("--render-only reads the finished runs; --overwrite would discard them")
    if args.update_readme:
        check_readme(Path(args.update_readme))
    extra = extra_tasks(args.tasks)
    jobs = plan(scale, extra)
    if args.render_only:  # a report needs runs: refuse a folder without any, and create nothing
        prepare(out, scale, overwrite=False, create=False)
        if not any(_done(out / "runs" / job.name) for job in jobs):
            raise IterHeadsError(f"{out} holds no finished --{scale.name} run: nothing to report (run without --render-only)")
    gpus = _gpu_count()
    workers = args.workers or (gpus or cpus)
    threads = args.threads or max(1, cpus // workers)
    prepare(out, scale, args.overwrite)
    with folder_lock(out, "--output-dir"):  # one reproduction per folder at a time
        command = "hf-iterheads reproduce --" + scale.name + f" --output-dir {args.output_dir}"
        print(f"{len(jobs)} runs at the {scale.name} scale on {workers} worker(s) x {threads} thread(s) -> {out}", file=sys.stderr)
        start = time.perf_counter()
        finished = None
        if args.render_only:
            status = {job.name: "ok" if _done(out / "runs" / job.name) else "not run" for job in jobs}
            previous = out / "results.json"
            try:
                old = json.loads(previous.read_text())["meta"] if previous.is_file() else {}
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                old = {}  # a damaged results.json is rewritten below; only its timing is lost
            wall, finished = old.get("wall_seconds", 0.0), old.get("finished")
        else:
            status = run_plan(jobs, out, workers, threads, scale, gpus)
            wall = time.perf_counter() - start
        rows = [collect(job, out) for job in jobs]
        for row in rows:
            row["status"] = status.get(row["name"], "not run")
        failed = [n for n, s in status.items() if s != "ok"]
        if not any(row.get("summary") for row in rows):
            print(f"hf-iterheads reproduce: no run finished, so no report was written (see {out / 'logs'})", file=sys.stderr)
            return 1
        meta = {"command": command, "scale": dataclasses.asdict(scale), "workers": workers, "threads": threads,
                "cpus": cpus, "gpus": gpus, "wall_seconds": round(wall, 1), "versions": versions(),
                "finished": finished or time.strftime("%Y-%m-%d %H:%M:%S"),
                "tasks": [*PAPER_TASKS, *(get_task(t).name for t in extra)]}
        report = write_report(rows, meta, out, {job.name: job for job in jobs})
        if args.update_readme:

            readme = Path(args.update_readme)
            update_readme(readme, out, os.path.relpath(out, readme.resolve().parent).replace(os.sep, "/") + "/")
            print(f"updated the results block of {readme}", file=sys.stderr)
        print(f"wrote {report} and {out / 'results.json'} in {wall / 60:.1f} min", file=sys.stderr)
        if failed:
            print(f"hf-iterheads reproduce: {len(failed)} run(s) did not finish: {', '.join(failed)} (see {out / 'logs'})",
                  file=sys.stderr)
            return 1
        return 0


def add_cli(subparsers) -> None:
    from ..cli import positive_int

    p = subparsers.add_parser(
        "reproduce",
        help="train, evaluate and probe every model the paper's findings need; write report.md + results.json",
        description="Reproduce the paper's findings end to end: CoT vs no CoT, 1 vs 2 layers, emergence, "
        "attention maps, transfer vs scratch (seeds), width sweep, length generalisation, detector + ablation "
        "on every model. --quick (default): the default recipe, 3 seeds per task from scratch, CPU-sized "
        "budgets (the report's header gives its wall time); --full is the paper's scale (GPUs). Running again "
        "with the same --output-dir continues an interrupted reproduction.",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="scale", action="store_const", const="quick", help="CPU-sized budgets (default)")
    size.add_argument("--full", dest="scale", action="store_const", const="full", help="the paper's recipe and budgets")
    size.add_argument("--smoke", dest="scale", action="store_const", const="smoke", help=argparse.SUPPRESS)
    p.set_defaults(scale="quick")
    p.add_argument("--output-dir", required=True, help="folder for report.md, results.json, figures and runs/")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="runs in parallel (default: one per CPU core, or per GPU)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads per run (default: cores / workers)")
    p.add_argument("--overwrite", action="store_true", help="discard an earlier reproduction in --output-dir")
    p.add_argument("--render-only", action="store_true", help="rewrite report.md/results.json from the finished runs")
    p.add_argument("--update-readme", metavar="MARKDOWN", help="also refresh the generated results block of this Markdown "
                   "file (between <!-- reproduce:results:start --> and <!-- reproduce:results:end -->)")
    p.add_argument("--tasks", default="", metavar="TASK[,TASK...]",
                   help="more tasks (names or import strings module:attr) through the first finding's grid: CoT 2 layers "
                   "from scratch per seed, no CoT, 1 layer, each with the detector; the paper's verdicts are unchanged")
    p.set_defaults(func=run_reproduce)
