#!/usr/bin/env python
"""Render the Results pages from their data files, in one command.

    python docs/render_results.py   # rewrites benchmarks/results/{seed_sweep,length_generalisation,untuned_tasks,benchmarks}.md

Each page comes from data only: the seed sweeps from ``benchmarks/results/seed_sweep.jsonl`` (through
``benchmarks/seed_sweep.py``'s renderer), length generalisation from ``length_generalisation.jsonl`` (through
``benchmarks/length_generalisation.py``'s), the untuned tasks from ``untuned_tasks.jsonl`` (through
``benchmarks/untuned_tasks.py``'s), and the benchmarks page from the JSON files the benchmark scripts write.
The documentation site (``mkdocs build``, through ``docs/hooks.py``) calls the same functions, so the site always
shows what the data say; the reproduction report is ``docs/reproduction/report.md``, written by
``hf-iterheads reproduce``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# JSON results of the benchmark scripts: (file, title, the command that writes it, what it measures)
BENCHMARKS = [
    ("train_throughput.json", "Training throughput",
     "python benchmarks/train_throughput.py --steps 64 --threads 2 --skip-compile --out benchmarks/results/train_throughput.json",
     "Seconds per epoch of the paper's setting (polynomial, n_len 16, batch 256, 64 steps per epoch) against the "
     "reference model and loader."),
    ("step_cost.json", "Cost of a default-recipe step",
     "python benchmarks/step_cost.py --threads 1 --steps 200 --out benchmarks/results/step_cost.json",
     "Milliseconds per step with every length in every batch: stock forward, one padded batch, and the two length "
     "groups the trainer uses."),
    ("length_weights_cost.json", "Cost of lengths drawn in proportion to L",
     "python benchmarks/length_weights_cost.py --threads 1 --steps 200 --out benchmarks/results/length_weights_cost.json",
     "Milliseconds per step of parity's batches with uniform and with linear length weights."),
    ("build_datasets.json", "Building the datasets",
     "python benchmarks/build_datasets.py --json benchmarks/results/build_datasets.json",
     "Seconds to build every default dataset, against a per-sequence Python baseline."),
    ("detect_throughput.json", "Detector throughput",
     "python benchmarks/detect_throughput.py --out benchmarks/results/detect_throughput.md",
     "CPU seconds and peak memory to score every head, per capture method, on GPT-2 small and a random 1.1B "
     "Llama-shaped model (64 probes of lengths 4-16)."),
    ("scan_throughput.json", "Scan throughput",
     "python benchmarks/scan_throughput.py --out benchmarks/results/scan_throughput.md",
     "One `hf-iterheads scan` of the bundled checkpoints and two random zoo models, three tasks each."),
]

# columns shown for list-of-records results (others are left in the JSON)
DETECT_COLUMNS = ["model", "method", "cpu_seconds", "heads_per_cpu_s", "peak_mb", "load_avg"]


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
    if isinstance(v, list | tuple):
        return ", ".join(_cell(x) for x in v)
    if isinstance(v, dict):
        return "; ".join(f"{k} {_cell(x)}" for k, x in v.items())
    return str(v).replace("|", "\\|")


def _table(rows: list[dict], columns: list[str] | None = None) -> list[str]:
    cols = columns or list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return out


def benchmarks_page() -> str:
    """The benchmarks page: one section per JSON result file, settings first, then the measured rows."""
    lines = ["# Benchmarks", "",
             "Rendered by `python docs/render_results.py` from the JSON files in `benchmarks/results/` and "
             "`detector_speed.md`; each section "
             "names the command that measured it. Timings are from 2-core CPU machines shared with other jobs unless "
             "the settings say otherwise.", ""]
    for name, title, command, what in BENCHMARKS:
        path = RESULTS / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        lines += [f"## {title}", "", what, "", f"`{command}`", ""]
        if isinstance(data, list):
            lines += _table(data, [c for c in DETECT_COLUMNS if any(c in r for r in data)] or None)
        else:
            settings = {k: v for k, v in data.items() if k != "results"}
            lines += ["| setting | value |", "|---|---|"]
            lines += [f"| {k} | {_cell(v)} |" for k, v in settings.items()]
            if isinstance(data.get("results"), list):
                lines += [""] + _table(data["results"])
        lines.append("")
    speed = RESULTS / "detector_speed.md"  # written as markdown by its script: its headings go one level down here
    if speed.is_file():
        lines += [("#" + line) if line.startswith("#") else line for line in speed.read_text().splitlines()] + [""]
    return "\n".join(lines).rstrip() + "\n"


def _benchmark_module(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def seed_sweep_page() -> str:
    """The seed sweeps: ``benchmarks/seed_sweep.py``'s rendering of ``seed_sweep.jsonl``."""
    sweep = _benchmark_module("seed_sweep")
    return sweep.render(sweep.load_records(RESULTS / "seed_sweep.jsonl"), None)


def length_generalisation_page() -> str:
    """Length generalisation: ``benchmarks/length_generalisation.py``'s rendering of its JSONL."""
    sweep = _benchmark_module("seed_sweep")
    lg = _benchmark_module("length_generalisation")
    return lg.render(sweep.load_records(RESULTS / "length_generalisation.jsonl"), None)


def untuned_tasks_page() -> str:
    """Tasks no default was tuned for: ``benchmarks/untuned_tasks.py``'s page, its results rendered from
    ``untuned_tasks.jsonl`` below the page's hand-written head (rendered into a copy, so building the site writes
    nothing in the tree)."""
    import tempfile

    page = RESULTS / "untuned_tasks.md"
    jsonl = RESULTS / "untuned_tasks.jsonl"
    if not jsonl.is_file():
        return page.read_text()
    _benchmark_module("seed_sweep")  # the renderer imports it by name
    untuned = _benchmark_module("untuned_tasks")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / page.name
        copy.write_text(page.read_text())
        sys.path.insert(0, str(ROOT / "benchmarks"))
        try:
            untuned.render(jsonl, copy)
        finally:
            sys.path.pop(0)
        return copy.read_text()


# page in the site -> (renderer, the tracked file it is also written to)
PAGES = {
    "results/benchmarks.md": (benchmarks_page, RESULTS / "benchmarks.md"),
    "results/seed-sweep.md": (seed_sweep_page, RESULTS / "seed_sweep.md"),
    "results/length-generalisation.md": (length_generalisation_page, RESULTS / "length_generalisation.md"),
    "results/untuned-tasks.md": (untuned_tasks_page, RESULTS / "untuned_tasks.md"),
}


def main() -> None:
    for page, (render, target) in PAGES.items():
        target.write_text(render())
        print(f"wrote {target.relative_to(ROOT)} (site page {page})")


if __name__ == "__main__":
    main()
