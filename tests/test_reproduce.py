"""The reproduction: its plan, its verdict rules on hand-made numbers, and a smoke-scale run end to end."""

from __future__ import annotations

import json

from hf_iterheads.cli import main
from hf_iterheads.evaluation import first_step
from hf_iterheads.paper.report import RESULTS_END, RESULTS_START, findings
from hf_iterheads.paper.reproduce import FULL, QUICK, SMOKE, plan
from hf_iterheads.training.config import length_recipe


def test_plan_covers_every_experiment_of_the_issue():
    jobs = {j.name: j for j in plan(QUICK)}
    for task in ("binary_copy", "parity", "polynomial"):
        assert {f"{task}-cot-2L", f"{task}-nocot-2L", f"{task}-cot-1L"} <= set(jobs)
    assert "--no-cot" in jobs["parity-nocot-2L"].train_args and "--no-cot" not in jobs["parity-cot-2L"].train_args
    assert jobs["polynomial-cot-1L"].train_args[jobs["polynomial-cot-1L"].train_args.index("--n-layer") + 1] == "1"
    transfer = [j for j in jobs.values() if j.meta["kind"] == "transfer"]
    assert len(transfer) == QUICK.transfer_seeds and QUICK.seeds >= 3
    for task in ("binary_copy", "parity", "polynomial"):  # from scratch, at least 3 seeds per task, the full budget
        scratch = [j for j in jobs.values() if j.task == task and j.meta.get("cot") and j.meta["layers"] == 2
                   and j.meta["kind"] in ("grid", "seed")]
        assert sorted(j.meta["seed"] for j in scratch) == list(range(QUICK.seeds))
        budget = 12000  # the three paper tasks' default (auto_max_steps)
        assert all(j.steps == budget and j.train_args[j.train_args.index("--max-steps") + 1] == str(budget)
                   and "--stop-when-solved" in j.train_args and "--init-from" not in j.train_args for j in scratch)
        assert [f"--seed {j.meta['seed']}" in " ".join(j.train_args) for j in scratch] == [True] * QUICK.seeds
    assert all(j.deps == ("polynomial-cot-2L",) and "@polynomial-cot-2L" in j.train_args for j in transfer)
    assert {j.meta["width"] for j in jobs.values() if j.meta["kind"] == "width"} == set(QUICK.widths)
    assert jobs["polynomial-cot-2L"].detect_tasks == ("polynomial", "parity")  # scores before transfer
    lengths = [j for j in jobs.values() if j.meta["kind"] == "length"]
    assert all("--max-train-len" in j.train_args for j in lengths) and len(lengths) == 2
    assert [j.meta.get("length_recipe", False) for j in lengths] == [False, True]  # the default, then the recipe
    assert " ".join(length_recipe(QUICK.n_len)) in " ".join(lengths[1].train_args)
    full = plan(FULL)
    assert all(j.train_args[j.train_args.index("--recipe") + 1] == "paper" for j in full)
    assert not any(j.meta.get("length_recipe") for j in full)  # the paper's fixed dataset: no linear weights
    assert len(full) > len(jobs)


def _row(name, acc, per_length=None, **meta):
    base = {"name": name, "task": name.split("-")[0], "cot": "nocot" not in name, "layers": 1 if "1L" in name else 2,
            "width": 128, "seed": 0, "kind": "grid", "budget_steps": 100}
    return {**base, **meta, "summary": {"accuracy": acc, "attn0_peakiness": 0.95, "attn1_peakiness": 0.95},
            "per_length": per_length or {L: acc for L in range(1, 17)}, "curve": [], "formed_step": 50, "solved_step": None}


def _verdicts(rows):
    found = findings({r["name"]: r for r in rows}, {})
    return {f["finding"].split(" ")[0] + f["finding"].split(" ")[1]: f["verdict"] for f in found}


def _seeds(task, accs):
    rows = [_row(f"{task}-cot-2L" + (f"-seed{s}" if s else ""), a, kind="grid" if s == 0 else "seed", seed=s)
            for s, a in enumerate(accs)]
    for r in rows:
        r["formed_step"] = 50 if r["summary"]["accuracy"] >= 0.9 else None
    return rows


def test_verdicts_follow_the_numbers():
    good = [r for t in ("binary_copy", "parity", "polynomial") for r in _seeds(t, [1.0, 1.0, 0.95])]
    collapse = [_row(f"{t}-{v}", 0.1) for t in ("parity", "polynomial") for v in ("nocot-2L", "cot-1L")]
    v = _verdicts(good + collapse)
    assert v["2layers"] == "reproduced" and v["withoutCoT,"] == "reproduced"
    others = [r for r in good if r["task"] != "parity"]
    # the verdict rests on the seeds from scratch: a transfer run does not rescue parity
    bad = others + _seeds("parity", [0.2, 0.3, 0.1]) + [_row("transfer-parity-seed0", 1.0, kind="transfer", solved_step=300)]
    assert _verdicts(bad + collapse)["2layers"] == "not reproduced at this budget: parity learned by no seed"
    minority = others + _seeds("parity", [1.0, 0.3, 0.1])
    assert _verdicts(minority + collapse)["2layers"].startswith("partly")
    assert "parity 1/3 seeds" in findings({r["name"]: r for r in minority + collapse}, {})[0]["measured"]
    assert _verdicts(minority + collapse)["parityhas"] == "reproduced"  # polynomial formed in 3/3, parity in 1/3
    assert _verdicts(good + collapse)["parityhas"] == "not reproduced"  # the same share: no difference shown
    no_collapse = collapse[:-1] + [_row("polynomial-cot-1L", 0.9)]
    assert _verdicts(good + no_collapse)["withoutCoT,"].startswith("partly")
    # parity without CoT at chance (0.5 +- noise) has collapsed; 0.6 is above guessing and above 0.5
    chance = [r for r in collapse if r["name"] != "parity-nocot-2L"]
    assert _verdicts(good + chance + [_row("parity-nocot-2L", 0.52)])["withoutCoT,"] == "reproduced"
    assert _verdicts(good + chance + [_row("parity-nocot-2L", 0.6)])["withoutCoT,"].startswith("partly")


def test_transfer_verdict_uses_steps_to_accuracy_on_the_curves():
    def run(name, kind, seed, curve):
        row = _row(name, curve[-1][1], kind=kind, seed=seed, task="parity")
        row["curve"] = [{"step": s, "accuracy": a} for s, a in curve]
        return row

    scratch = [run("parity-cot-2L", "grid", 0, [(500, 0.1), (1000, 0.2)]),
               run("parity-cot-2L-seed1", "seed", 1, [(500, 0.1), (1000, 0.3)])]
    fast = [run(f"transfer-parity-seed{s}", "transfer", s, [(250, 0.95), (500, 0.995)]) for s in range(2)]
    assert _verdicts(scratch + fast)["transfer:pretrained"] == "reproduced"
    slow = [run(f"transfer-parity-seed{s}", "transfer", s, [(250, 0.95), (500, 0.96)]) for s in range(2)]
    assert _verdicts(scratch + slow)["transfer:pretrained"].startswith("partly")
    never = [run("transfer-parity-seed0", "transfer", 0, [(250, 0.5)])]
    assert _verdicts(scratch + never)["transfer:pretrained"] == "not reproduced"


def test_first_step_is_the_first_crossing():
    evals = [{"step": 10, "a": 0.1}, {"step": 20, "a": None}, {"step": 30, "a": 0.95}, {"step": 40, "a": 0.99}]
    assert first_step(evals, "a", 0.9) == 30 and first_step(evals, "a", 0.999) is None


def test_a_length_run_forms_its_head_on_the_lengths_it_trained(tmp_path):
    """A --max-train-len run's eval records mean attn1 over every evaluated length; the unseen ones would hide a head
    formed on the trained lengths, so the report reads the records' ``trained`` means (as restarts and sweeps do)."""
    from hf_iterheads.paper.reproduce import Job, collect

    run = tmp_path / "runs" / "polynomial-cot-2L-train12"
    run.mkdir(parents=True)
    (run / "model.safetensors").write_bytes(b"")
    per_length = {str(L): {"accuracy": 1.0 if L <= 12 else 0.0} for L in range(1, 17)}
    (run / "eval_results.json").write_text(json.dumps(
        {"step": 1000, "seconds": 9.0, "results": [{"summary": {"accuracy": 0.7}, "per_length": per_length}]}))
    records = [{"kind": "eval", "step": s, "accuracy": a, "attn1_peakiness": 0.7 * h,
                "trained": {"max_len": 12, "attn1_peakiness": h}} for s, a, h in ((500, 0.3, 0.5), (1000, 0.7, 0.95))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    row = collect(Job(run.name, "polynomial", [], 1000, {"kind": "length", "train_len": 12}), tmp_path)
    assert row["formed_step"] == 1000 and [c["attn1_peakiness"] for c in row["curve"]] == [0.5, 0.95]
    (run / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "trained"}) + "\n"
                                               for r in records))  # a run on every length: the summary is the mean
    assert collect(Job(run.name, "polynomial", [], 1000, {"kind": "grid"}), tmp_path)["formed_step"] is None


def test_smoke_reproduction_end_to_end_and_resumes(tmp_path, capsys):
    out = tmp_path / "repro"
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{RESULTS_START}\nold\n{RESULTS_END}\n\nrest\n")
    assert main(["reproduce", "--smoke", "--output-dir", str(out), "--workers", "2", "--update-readme", str(readme)]) == 0
    results = json.loads((out / "results.json").read_text())
    runs = {r["name"]: r for r in results["runs"]}
    assert len(runs) == len(plan(SMOKE)) and all(r["status"] == "ok" for r in runs.values())
    main_run = runs["polynomial-cot-2L"]
    assert set(main_run["detect"]) == {"polynomial", "parity"} and main_run["per_length"]
    assert {f["finding"] for f in results["findings"]} and results["meta"]["versions"]["torch"]
    report = (out / "report.md").read_text()
    assert "## Findings" in report and "emergence.png" in report and "hf-iterheads train" in report
    for png in ("accuracy_by_length.png", "emergence.png", "attention_maps.png", "transfer.png", "width_sweep.png"):
        assert (out / png).stat().st_size > 1000
    text = readme.read_text()
    assert "old" not in text and "rest" in text and "repro/accuracy_by_length.png" in text
    # a second run finds every run finished: nothing is retrained, the report is rewritten
    stamp = (out / "runs" / "polynomial-cot-2L" / "model.safetensors").stat().st_mtime_ns
    assert main(["reproduce", "--smoke", "--output-dir", str(out), "--workers", "2"]) == 0
    assert (out / "runs" / "polynomial-cot-2L" / "model.safetensors").stat().st_mtime_ns == stamp
    # a finished run trained with another configuration than the plan resolves to today is stale (retrained)
    from hf_iterheads.paper.reproduce import _stale

    job = next(j for j in plan(SMOKE) if j.name == "polynomial-cot-2L")
    run = out / "runs" / job.name
    assert not _stale(run, list(job.train_args)) and not _stale(out / "runs" / "absent", list(job.train_args))
    stored = json.loads((run / "run_config.json").read_text())
    (run / "run_config.json").write_text(json.dumps({**stored, "restart_at": stored["restart_at"] + 500}))
    assert _stale(run, list(job.train_args))


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-iterheads reproduce: error:"), err
    return err[0]


def test_bad_output_dirs_are_refused(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["reproduce", "--smoke", "--output-dir", str(tmp_path)]) == 2
    assert "not a reproduction folder" in _one_line(capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
    other = tmp_path / "quick"
    other.mkdir()
    (other / "reproduce.json").write_text(json.dumps({"scale": "quick"}))
    assert main(["reproduce", "--smoke", "--output-dir", str(other)]) == 2
    assert "--overwrite" in _one_line(capsys)
    assert main(["reproduce", "--smoke", "--output-dir", str(tmp_path / "x"), "--workers", "-1"]) == 2
    assert "--workers" in _one_line(capsys) and not (tmp_path / "x").exists()


def test_a_finding_without_finished_runs_gets_no_verdict_and_the_report_names_them():
    from hf_iterheads.paper.report import NO_VERDICT, _missing_note

    good = [_row(f"{t}-cot-2L", 1.0) for t in ("binary_copy", "parity", "polynomial")]
    unfinished = {"name": "parity-cot-2L", "task": "parity", "cot": True, "layers": 2, "width": 128, "seed": 0,
                  "kind": "grid", "budget_steps": 100}  # planned, never finished: collect() leaves no summary
    rows = [r for r in good if r["name"] != "parity-cot-2L"] + [unfinished]
    rows += [{**unfinished, "name": f"{t}-{v}", "task": t, "cot": v.startswith("cot"), "layers": int(v[-2])}
             for t in ("binary_copy", "parity", "polynomial") for v in ("nocot-2L", "cot-1L")]
    found = {f["finding"].split(" ")[0] + f["finding"].split(" ")[1]: f for f in findings({r["name"]: r for r in rows}, {})}
    learn = found["2layers"]
    assert learn["verdict"].startswith(NO_VERDICT) and "parity-cot-2L" in learn["measured"]  # not "not reproduced"
    collapse = found["withoutCoT,"]
    assert collapse["verdict"].startswith(NO_VERDICT) and "polynomial-cot-1L" in collapse["measured"]
    assert found["thecircuit"]["verdict"] == "reproduced"  # its one run finished: judged as before
    note = _missing_note(rows)
    assert "7 of 9 runs did not finish" in note and "parity-cot-2L" in note and "binary_copy-nocot-2L" in note
    assert _missing_note(good) == ""


def test_render_only_with_some_finished_runs_is_allowed_to_start(tmp_path, capsys, monkeypatch):
    """--render-only refuses only a folder without any finished run; one finished run is enough to report."""
    import hf_iterheads.paper.reproduce as rep

    out = tmp_path / "repro"
    assert main(["reproduce", "--smoke", "--output-dir", str(out), "--render-only"]) == 2
    assert "nothing to report" in _one_line(capsys) and not out.exists()
    seen = []
    monkeypatch.setattr(rep, "_done", lambda run: run.name == "polynomial-cot-2L")
    monkeypatch.setattr(rep, "collect", lambda job, out: seen.append(job.name) or {"name": job.name})
    assert main(["reproduce", "--smoke", "--output-dir", str(out), "--render-only"]) == 1  # rows without summary
    assert "no run finished, so no report was written" in capsys.readouterr().err
    assert len(seen) == len(plan(SMOKE)) and not (out / "report.md").exists()


def test_a_jobs_commands_run_in_one_process_each_with_its_own_log(tmp_path):
    """A job's commands share one process; each writes its own log, and the first failure stops the job and is
    reported with its log's last line."""
    import os

    import pytest

    from hf_iterheads.paper.reproduce import _call

    ok, bad, never = tmp_path / "logs" / "a.log", tmp_path / "logs" / "b.log", tmp_path / "logs" / "c.log"
    steps = [[str(ok), "tasks", "parity"], [str(bad), "eval", str(tmp_path / "absent")], [str(never), "tasks"]]
    with pytest.raises(RuntimeError) as err:
        _call(steps, dict(os.environ))
    assert "exit 2" in str(err.value) and str(bad) in str(err.value) and "absent" in str(err.value)
    assert "parity" in ok.read_text() and "hf-iterheads eval: error" in bad.read_text() and not never.exists()
    assert "binary_copy" not in ok.read_text()  # a log holds its own command's output only
    _call([[str(never), "tasks", "polynomial"]], dict(os.environ))
    assert "polynomial" in never.read_text()
