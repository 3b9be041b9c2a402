"""benchmarks/seed_sweep.py: the grid, resuming, a run's summary, the circuit verdict and the report, without training
(one detection on the bundled checkpoint)."""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("seed_sweep", ROOT / "benchmarks" / "seed_sweep.py")
sweep = importlib.util.module_from_spec(spec)
sys.modules["seed_sweep"] = sweep  # dataclasses look their module up there
spec.loader.exec_module(sweep)


def test_seed_ranges_inverts_parse_seeds():
    assert sweep.seed_ranges([41, 10, 11, 40, 7]) == "7, 10-11, 40-41"
    assert sweep.parse_seeds(sweep.seed_ranges([0, 1, 2, 5, 9])) == [0, 1, 2, 5, 9]


def test_recipe_and_seeds_parse():
    r = sweep.Recipe.parse("helper:parity,binary_copy=--curriculum binary_copy:0.5:3000,polynomial:0.3:0 --stop-when-solved")
    assert r.name == "helper" and r.tasks == ("parity", "binary_copy")
    assert r.flags == ("--curriculum", "binary_copy:0.5:3000,polynomial:0.3:0", "--stop-when-solved")
    assert sweep.Recipe.parse("default=") == sweep.Recipe("default", ())
    assert sweep.Recipe.parse("single=--curriculum ''").flags == ("--curriculum", "")
    assert sweep.parse_seeds("0-2,7") == [0, 1, 2, 7]


def test_jobs_baseline_first_seed_major_and_resumable(tmp_path):
    base, helper = sweep.Recipe("default", ()), sweep.Recipe("helper", ("--x",), ("parity",))
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [
        {"recipe": "default", "task": "parity", "seed": 0, "status": "ok"},
        {"recipe": "default", "task": "polynomial", "seed": 0, "status": "incomplete"},  # killed: runs again
    ]) + "\n")
    jobs = sweep.make_jobs([base, helper], ["parity", "polynomial"], [0, 1], sweep.done_keys(jsonl))
    assert [j.key for j in jobs] == [("default", "polynomial", 0), ("default", "parity", 1), ("default", "polynomial", 1),
                                     ("helper", "parity", 0), ("helper", "parity", 1)]


def _fake_run(run: Path) -> None:
    run.mkdir(parents=True)
    evals = [(0, 0.0, 0.1), (500, 0.5, 0.95), (1000, 0.995, 0.96)]
    lines = [{"kind": "eval", "step": s, "time": s / 10, "task": "parity", "accuracy": a, "attn0_peakiness": 0.5,
              "attn1_peakiness": p, "attn0_mass": 0.4, "attn1_mass": 0.8} for s, a, p in evals]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"kind\": \"ev")  # a cut last line
    per_length = {str(L): {"accuracy": 1.0 if L != 9 else 0.98} for L in range(1, 17)}
    (run / "eval_results.json").write_text(json.dumps({"step": 1000, "seconds": 100.0, "results": [
        {"task": "parity", "summary": {"accuracy": 0.998, "attn1_peakiness": 0.97, "attn0_peakiness": 0.9},
         "per_length": per_length, "summary_lengths": list(range(4, 17))}]}))


def test_a_runs_curve_reads_its_trained_lengths():
    # a run trained on 1..12: its attention signals come from the record's "trained" means, accuracy from 4..16
    full = {"kind": "eval", "step": 500, "task": "parity", "accuracy": 0.5, "attn1_mass": 0.3, "attn1_peakiness": 0.6}
    short = {**full, "step": 1000, "trained": {"max_len": 12, "attn1_mass": 0.45, "attn1_peakiness": 0.92}}
    curve = sweep.curve_of([full, short, {"kind": "train", "step": 1000}], "parity")
    assert [(c["accuracy"], c["attn1_mass"], c["attn1_peakiness"]) for c in curve] == [(0.5, 0.3, 0.6), (0.5, 0.45, 0.92)]


def test_summary_render_and_circuit_classes(tmp_path):
    _fake_run(tmp_path / "run")
    s = sweep.summarize_run(tmp_path / "run", "parity")
    assert (s["formed_step"], s["acc99_step"], s["solved_step"]) == (500, 1000, 1000)
    assert s["accuracy"] == 0.998 and s["steps"] == 1000 and s["worst_length"] == (9, 0.98) and s["attempts"] == 1
    first = tmp_path / "run" / "attempts" / "0"  # a restart moved the first attempt there
    first.mkdir(parents=True)
    (first / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in [
        {"kind": "eval", "step": 1000, "time": 9.0, "task": "parity", "accuracy": 0.1, "attn0_peakiness": 0.12},
        {"kind": "unanchored", "step": 1000, "time": 9.5}]) + "\n")
    again = sweep.summarize_run(tmp_path / "run", "parity")
    assert again["attempts"] == 2 and again["restarts"][0]["kind"] == "unanchored" and again["restarts"][0]["step"] == 1000
    assert again["restarts"][0]["curve"][0]["attn0_peakiness"] == 0.12
    head = {"paper_head": True, "circuit": "iteration head (layer 1)", "top_head": {"layer": 1, "score": 0.9, "detected": True},
            "attention": [{"layer": 0, "top_target": "EoI"}, {"layer": 1, "top_target": "x_t"}]}
    eoi_only = {"paper_head": False, "circuit": "other", "attention": [{"layer": 0, "top_target": "EoI"}]}
    rec = {"recipe": "default", "task": "parity", "seed": 0, "flags": "", "status": "ok", "device": "cpu", "wall_s": 1.0,
           "success": True, "detection": head, **s}
    assert sweep.circuit_class(rec) == "iteration head"
    assert sweep.circuit_class({**rec, "attn1": 0.5}) == "partial iteration head"
    gated = {**head, "gated_cells": [[1, 1]]}
    assert sweep.circuit_class({**rec, "attn1": 0.77, "detection": gated}) == "content-gated iteration head"
    assert sweep.circuit_class({**rec, "detection": eoi_only}) == "EoI head, no look-up"
    assert sweep.circuit_class({**rec, "detection": None}) == "unknown (no detection)"
    md = sweep.render([rec, {**rec, "seed": 1, "success": False, "detection": eoi_only, "attempts": 2}], None)
    assert "| default | parity | 1 | ok, 2 attempts |" in md
    assert "| default | `(default)` | parity | 2 | **1** |" in md and "EoI head, no look-up: 1" in md


def test_length_generalisation_judges_every_unseen_length_and_the_head(tmp_path):
    spec = importlib.util.spec_from_file_location("length_generalisation", ROOT / "benchmarks" / "length_generalisation.py")
    lengen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lengen)
    _fake_run(tmp_path / "run")
    s = sweep.summarize_run(tmp_path / "run", "parity")
    assert s["per_length"]["9"]["accuracy"] == 0.98 and s["per_length"]["9"]["attn1"] is None
    for L in range(1, 17):
        s["per_length"][str(L)]["attn1"] = 0.95
    head = {"paper_head": True}
    rec = {"recipe": "copy16", "task": "parity", "seed": 0, "flags": "--max-train-len 12", "status": "ok", "wall_s": 9.0,
           "detection": head, **s}
    assert lengen.judge(rec)["goal"] and lengen.judge(rec)["mean_unseen"] == 1.0
    one_low = {**rec, "seed": 1, "per_length": {**s["per_length"], "15": {"accuracy": 0.89, "attn1": 0.95}}}
    assert not lengen.judge(one_low)["goal"]  # every unseen length must reach 0.9, not their mean
    assert not lengen.judge({**rec, "detection": {"paper_head": False}})["goal"]
    assert lengen.judge({**rec, "per_length": None}) == {}
    md = lengen.render([rec, one_low, {**rec, "seed": 2, "status": "failed"}], None)
    assert "| copy16 | parity | 1 | 0.998 | 1.000 | 1.000 | 0.890 | 1.000 |" in md
    assert "| copy16 | parity | 1 of 2 | `--max-train-len 12` |" in md


def test_restart_evidence_bands_runs_by_their_step_3000_mass():
    def run(task, mass, formed, flags=""):
        curve = [{"step": 3000, "attn1_mass": mass, "attn1_peakiness": 0.95 if formed else 0.2}]
        return {"task": task, "status": "ok", "flags": flags, "curve": curve, "formed_step": 4000 if formed else None}
    rows = sweep.restart_evidence([run("parity", 0.15, False), run("parity", 0.3, True), run("parity", 0.3, False),
                                   run("cumsum", 0.9, True), run("cumsum", 0.1, True, "--bucket")])
    assert "| binary_copy, parity | 0.00 - 0.22 | 1 | 0 | - | 0.20 - 0.20 |" in rows
    assert "| binary_copy, parity | 0.22 - 0.40 | 2 | 1 | 4000 - 4000 (median 4000) | 0.20 - 0.95 |" in rows
    assert "| polynomial, cumsum, s3_product | 0.40 - 1.00 | 1 | 1 | 4000 - 4000 (median 4000) | 0.95 - 0.95 |" in rows
    assert not any(r.startswith("| polynomial, cumsum, s3_product | 0.00") for r in rows)  # bucketed runs left out


def test_anchor_evidence_counts_every_attempt_with_offsets_by_its_early_attn0():
    def curve(a0, peak):
        return [{"step": 500, "attn0_peakiness": a0, "attn1_peakiness": 0.3},
                {"step": 1000, "attn0_peakiness": a0, "attn1_peakiness": peak}]

    restarted = {"kind": "unanchored", "step": 1000, "curve": curve(0.1, 0.3)}
    rows = sweep.anchor_evidence([
        {"task": "binary_copy", "status": "ok", "flags": "", "curve": curve(0.4, 1.0), "success": True, "restarts": [restarted]},
        {"task": "binary_copy", "status": "ok", "flags": "", "curve": curve(0.1, 0.86), "success": False},
        {"task": "binary_copy", "status": "ok", "flags": "--no-position-offsets", "curve": curve(0.1, 0.2), "success": False},
        {"task": "polynomial", "status": "ok", "flags": "", "curve": curve(0.1, 1.0), "success": True},  # no offsets
    ])
    assert "| binary_copy | < 0.2 | 2 | 1 | 0 | 1 | 0 | 0 | 0.86 - 0.86 |" in rows
    assert "| binary_copy | >= 0.2 | 1 | 0 | 0 | 1 | 1 | 1 | 1.00 - 1.00 |" in rows
    assert not any(r.startswith("| polynomial") for r in rows)


def test_early_evidence_bands_binary_copy_attempts_with_cumsum_rows_by_their_step_1000_mass():
    def curve(mass, formed_at=None):
        return [{"step": 1000, "attn1_mass": mass, "attn1_peakiness": 0.3},
                {"step": 4500, "attn1_mass": 0.8, "attn1_peakiness": 0.95 if formed_at else 0.3}]

    cumsum = {"curriculum": "binary_copy:0.5:3000,cumsum:0.3:0"}
    rows = sweep.early_evidence([
        {"task": "binary_copy", "status": "ok", "flags": "", "config": cumsum, "curve": curve(0.48, 4500), "success": True,
         "restarts": [{"step": 1000, "curve": curve(0.2)}, {"step": 3000, "curve": curve(0.25)}]},
        {"task": "binary_copy", "status": "ok", "flags": "--curriculum binary_copy:0.5:3000,cumsum:0.3:0 --restart-at 3000",
         "curve": curve(0.3), "success": False},
        {"task": "binary_copy", "status": "ok", "flags": "--curriculum ''", "curve": curve(0.6, 4500), "success": True},
        {"task": "parity", "status": "ok", "flags": "", "config": cumsum, "curve": curve(0.1), "success": False},
    ])
    assert "| < 0.4 | 3 | 1 | 1 | 1 | 0 | - | 0 |" in rows  # the no-helper run and parity are left out
    assert "| >= 0.4 | 1 | 0 | 0 | 1 | 1 | 4500 - 4500 | 1 |" in rows


def test_detect_run_on_the_bundled_polynomial_model():
    """The bundled polynomial-cot checkpoint has the paper's circuit: layer 0 -> EoI, layer 1 -> x_t."""
    path = ROOT / "hf_iterheads" / "checkpoints" / "polynomial-cot"
    if not (path / "model.safetensors").is_file():
        pytest.skip("bundled checkpoint not present")
    det = sweep.detect_run(path, "polynomial")
    assert det["paper_head"] and det["circuit"] == "iteration head (layer 1)"
    layer0, layer1 = det["attention"]
    assert layer0["top_target"] == "EoI" and layer1["top_target"] == "x_t" and layer1["mass_x_t"] > 0.8


def test_anchor_probe_shows_the_bundled_circuit_step_by_step():
    """benchmarks/anchor_probe.py on the bundled polynomial-cot: layer 2 reads x_t at every step of L = 6."""
    spec = importlib.util.spec_from_file_location("anchor_probe", ROOT / "benchmarks" / "anchor_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    rows = [r.split(" | ") for r in probe.probe(ROOT / "hf_iterheads" / "checkpoints" / "polynomial-cot", "polynomial", [6])
            if r.startswith("| 6 |")]
    assert [int(r[1]) for r in rows] == list(range(1, 7))
    assert all(float(r[4]) >= 0.9 for r in rows)  # layer 2 -> x_t
    assert all(abs(sum(float(x) for x in r[4:7]) - 1) < 0.02 for r in rows)  # x_t, EoI, other: every sequence once


def test_default_rows_are_the_plain_command():
    """The rows that seed_sweep.md reports as today's default were run with flags that resolve to exactly the plain
    command's configuration (so a changed default, or a wrong DEFAULT_ROWS, fails here)."""
    import dataclasses

    from hf_iterheads.cli import build_parser
    from hf_iterheads.training.config import resolve_config

    def config(task: str, flags: list[str]) -> dict:
        args = build_parser().parse_args(["train", "--task", task, "--seed", "3", "--output-dir", "x", *flags])
        resolved = json.loads(json.dumps(dataclasses.asdict(resolve_config(args))))  # as run_config.json holds it
        return {k: v for k, v in resolved.items() if k not in sweep.PER_RUN_KEYS}

    records = sweep.load_records(ROOT / "benchmarks" / "results" / "seed_sweep.jsonl")
    assert set(sweep.DEFAULT_ROWS) == set(sweep.TASKS)
    for task, recipes in sweep.DEFAULT_ROWS.items():
        plain = config(task, [])
        for i, recipe in enumerate(recipes):
            flags = {r["flags"] for r in records if r["recipe"] == recipe and r["task"] == task}
            assert len(flags) == 1, (task, recipe, flags)
            resolved = config(task, shlex.split(flags.pop()))
            stored = [sweep.stored_config(r) for r in records if r["recipe"] == recipe and r["task"] == task and r.get("config")]
            assert stored or recipe == "default", (task, recipe)  # all but the oldest rows record their configuration
            assert resolved == plain, (task, recipe)
            if i:  # a stand-in: run when the plain command allowed fewer restarts
                assert all(c["max_restarts"] < plain["max_restarts"] for c in stored), (task, recipe)
                stored = [{**c, "max_restarts": plain["max_restarts"]} for c in stored]
            assert all(c == plain for c in stored), (task, recipe)  # what the runs really resolved to
    assert "## Today's default against the goal" in sweep.render(records, None)


def test_a_run_with_fewer_restarts_stands_for_the_default_only_where_the_limit_decided_nothing():
    cfg = {"restart_at": 3000, "restart_below": 0.4, "max_restarts": 1}
    curve = [{"step": 2500, "attn1_mass": 0.1}, {"step": 3000, "attn1_mass": 0.3}, {"step": 3500, "attn1_mass": 0.9}]
    kept = {"config": cfg, "attempts": 1, "curve": curve}  # never restarted: a restart to spare
    forming = {"config": cfg, "attempts": 2, "curve": [{**p, "attn1_mass": 0.5} for p in curve]}
    stopped = {"config": cfg, "attempts": 2, "curve": curve}  # out of restarts at 0.3 < 0.4: two would have restarted
    assert sweep.limit_unused(kept) and sweep.limit_unused(forming) and not sweep.limit_unused(stopped)
    assert not sweep.limit_unused({"attempts": 1, "curve": curve})  # no recorded configuration: cannot tell
    rows = [{"recipe": "old", "task": "polynomial", "seed": s, "status": "ok", **r}
            for s, r in ((1, kept), (2, forming), (3, stopped), (4, kept))]
    rows.append({"recipe": "new", "task": "polynomial", "seed": 4, "status": "ok", "config": cfg, "curve": curve})
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sweep.DEFAULT_ROWS, "polynomial", ("new", "old"))
        assert [(r["seed"], r["recipe"]) for r in sweep.default_rows(rows, "polynomial")] == [(1, "old"), (2, "old"),
                                                                                              (4, "new")]


@pytest.fixture
def builtin_tasks_only():
    """The task registry with the built-ins alone (other tests load tasks of their own under the same names, e.g.
    the README's ``my_tasks:affine7``), restored afterwards."""
    from hf_iterheads import tasks

    saved = dict(tasks._REGISTRY), dict(tasks._SOURCES)
    for name in [n for n in tasks._REGISTRY if not tasks.is_builtin(n)]:
        del tasks._REGISTRY[name]
    tasks._SOURCES.clear()
    yield
    for live, kept in zip((tasks._REGISTRY, tasks._SOURCES), saved):
        live.clear()
        live.update(kept)


def test_untuned_tasks_rows_shown_as_today_are_the_plain_command(builtin_tasks_only):
    """Each untuned task's latest recipe (the rows its page reports as today's) resolved to exactly what the plain
    command resolves to now, so a changed default shows up here until the sweep runs again."""
    import dataclasses

    from hf_iterheads.cli import build_parser
    from hf_iterheads.training.config import resolve_config

    records = [r for r in sweep.load_records(ROOT / "benchmarks" / "results" / "untuned_tasks.jsonl")
               if r["status"] in ("ok", "failed")]
    latest = {r["task"]: r["recipe"] for r in records}
    assert len(latest) >= 3
    for task, recipe in latest.items():
        args = build_parser().parse_args(["train", "--task", task, "--seed", "3", "--output-dir", "x"])
        plain = json.loads(json.dumps(dataclasses.asdict(resolve_config(args))))
        plain = {k: v for k, v in plain.items() if k not in sweep.PER_RUN_KEYS}
        for r in records:
            if r["task"] == task and r["recipe"] == recipe:
                stored = {k: v for k, v in sweep.stored_config(r).items() if k not in sweep.PER_RUN_KEYS}
                assert stored == plain, (task, r["seed"], {k for k in plain if stored.get(k) != plain[k]})
