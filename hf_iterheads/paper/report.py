"""The reproduction's report: findings with verdicts, tables and figures, all from the runs' own files.

``write_report`` turns the rows of :func:`hf_iterheads.paper.reproduce.collect` into ``report.md``,
``results.json`` and PNG figures. A verdict is a rule applied to measured numbers (written next to it),
never a claim typed in advance: where the paper's finding did not show at this scale, the report says so.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..evaluation import FORMED, SOLVED, first_step
from ..outputs import atomic_file, write_json_atomic
from ..tasks import PAPER_TASKS, get_task

RESULTS_START, RESULTS_END = "<!-- reproduce:results:start -->", "<!-- reproduce:results:end -->"


def _f(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _long_acc(row: dict) -> float | None:
    """Mean accuracy over the longest quarter of the lengths (where collapse shows)."""
    per = row.get("per_length") or {}
    if not per:
        return None
    top = max(per)
    use = [L for L in per if L > 0.75 * top] or [top]
    return float(np.mean([per[L] for L in use]))


def _acc(row: dict | None) -> float | None:
    return (row or {}).get("summary", {}).get("accuracy")


def _steps_to(row: dict, threshold: float = 0.99) -> int | None:
    """First evaluated step with test accuracy >= threshold (the curve is evaluated every few hundred steps)."""

    return first_step(row.get("curve", []), "accuracy", threshold)


def _width_rows(rows: dict[str, dict]) -> list[dict]:
    """The width sweep and the main run (d = 128), finished runs only, narrowest first."""
    sweep = [r for r in rows.values() if r.get("kind") == "width" or r["name"] == "polynomial-cot-2L"]
    return sorted((r for r in sweep if r.get("summary")), key=lambda r: r["width"])


def _spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{np.mean(values):.0f} ± {np.std(values):.0f}" if len(values) > 1 else f"{values[0]:.0f}"


# --- findings ----------------------------------------------------------------------------------------------


def _finding(finding: str, rule: str, measured: str, verdict: str) -> dict[str, str]:
    return {"finding": finding, "rule": rule, "measured": measured, "verdict": verdict}


NO_VERDICT = "no verdict"


def _finished(row: dict | None) -> bool:
    return bool((row or {}).get("summary"))


def _missing(rows: dict[str, dict], names) -> list[str]:
    """Planned runs (present in ``rows``) among ``names`` that did not finish; runs never planned are not missing."""
    return [n for n in names if n in rows and not _finished(rows[n])]


def _unjudged(finding: str, rule: str, rows: dict[str, dict], needed: list[str]) -> dict[str, str] | None:
    """The no-verdict entry of a finding when a run it needs did not finish (None when all needed runs did):
    a verdict from missing numbers would read as a measurement."""
    missing = _missing(rows, needed)
    if not missing and any(_finished(rows.get(n)) for n in needed):
        return None
    return _finding(finding, rule, "runs not finished: " + (", ".join(missing) or "none of its runs exist"),
                    f"{NO_VERDICT}: {len(missing) or len(needed)} run(s) missing")


def _seed_runs(rows: dict[str, dict], task: str, finished: bool = False) -> list[dict]:
    """The task's CoT 2-layer runs from scratch, one per seed (finished ones only with ``finished``)."""
    runs = [r for r in rows.values() if r.get("task") == task and r.get("kind") in ("grid", "seed") and r.get("cot")
            and r.get("layers") == 2]
    return sorted((r for r in runs if _finished(r) or not finished), key=lambda r: r.get("seed", 0))


def _learn_all(rows: dict[str, dict]) -> dict[str, str]:
    what = ("2 layers + CoT learn all three tasks (~100%)",
            "from scratch, accuracy (L = 4..n_len) >= 0.9 in a majority of seeds, for every task")
    if (none := _unjudged(*what, rows, [r["name"] for t in PAPER_TASKS for r in _seed_runs(rows, t)])) is not None:
        return none
    finished = {t: runs for t in PAPER_TASKS if (runs := _seed_runs(rows, t, finished=True))}
    counts = {t: (sum((_acc(r) or 0) >= 0.9 for r in runs), len(runs)) for t, runs in finished.items()}
    measured = "; ".join(f"{t} {k}/{n} seeds ({', '.join(_f(_acc(r), 2) for r in finished[t])})"
                         for t, (k, n) in counts.items())
    if len(counts) == len(PAPER_TASKS) and all(2 * k > n for k, n in counts.values()):
        verdict = "reproduced"
    elif len(counts) == len(PAPER_TASKS) and all(k for k, _ in counts.values()):
        verdict = "partly: every task is learned by some seeds, not by a majority of them"
    else:
        verdict = "not reproduced at this budget: " + ", ".join(t for t in PAPER_TASKS if not counts.get(t, (0,))[0]) \
            + " learned by no seed"
    return _finding(*what, measured, verdict)


CHANCE_MARGIN = 0.05  # accuracy this close to guessing counts as collapsed (sampling noise on a binary answer)


def _guess(task: str, cot: bool) -> float:
    """Accuracy of guessing the answer: one state token without CoT (parity: 0.5), a whole chain with CoT (~0)."""
    return 0.0 if cot else get_task(task).chance


def _collapse(rows: dict[str, dict]) -> dict[str, str]:
    what = ("without CoT, or with 1 layer, accuracy collapses as L grows",
            f"accuracy over the longest quarter of lengths <= 0.5, or within {CHANCE_MARGIN} of guessing")
    needed = [f"{t}-{v}" for t in PAPER_TASKS for v in ("nocot-2L", "cot-1L")]
    if (none := _unjudged(*what, rows, [n for n in needed if n in rows] or needed)) is not None:
        return none
    cells, collapsed = [], []
    for t in PAPER_TASKS:
        for variant in ("nocot-2L", "cot-1L"):
            long = _long_acc(rows.get(f"{t}-{variant}", {}))
            if long is None:
                continue
            cells.append(f"{t} {variant} {_f(long, 2)}")
            # parity without CoT at chance scores 0.5 +- noise: "<= 0.5" alone would be a coin flip
            collapsed.append(long <= 0.5 or long <= _guess(t, variant.startswith("cot")) + CHANCE_MARGIN)
    verdict = "reproduced" if collapsed and all(collapsed) else (
        f"partly: {sum(collapsed)} of {len(collapsed)} collapse" if any(collapsed) else "not reproduced")
    return _finding(*what, "; ".join(cells) + " (binary copy without CoT only outputs x_L, which needs no iteration)", verdict)


def _emergence(rows: dict[str, dict]) -> dict[str, str]:
    what = ("the circuit forms during training (peakiness near 1), a jump together with accuracy",
            "polynomial: attn1 peakiness reaches 0.9, final attn0 >= 0.5")
    if (none := _unjudged(*what, rows, ["polynomial-cot-2L"])) is not None:
        return none
    main = rows.get("polynomial-cot-2L", {})
    s = main.get("summary") or {}
    formed = main.get("formed_step")
    before = [c for c in main.get("curve", []) if formed is not None and c["step"] < formed]
    jump = ""
    if formed is not None and before:
        at = next(c for c in main["curve"] if c["step"] == formed)
        jump = (f"; between steps {before[-1]['step']} and {formed} accuracy went {_f(before[-1]['accuracy'], 2)} -> "
                f"{_f(at['accuracy'], 2)}, attn1 {_f(before[-1]['attn1_peakiness'], 2)} -> {_f(at['attn1_peakiness'], 2)}")
    good = formed is not None and (s.get("attn1_peakiness") or 0) >= 0.9 and (s.get("attn0_peakiness") or 0) >= 0.5
    return _finding(*what, f"head formed at step {formed}; final attn0 {_f(s.get('attn0_peakiness'))}, attn1 "
                    f"{_f(s.get('attn1_peakiness'))}{jump}", "reproduced" if good else "not reproduced")


def _width(rows: dict[str, dict]) -> dict[str, str] | None:
    planned = [n for n, r in rows.items() if r.get("kind") == "width"]
    if not planned:
        return None  # no width sweep in this plan
    what = ("small embedding widths (below ~30-40) fail to form the circuit",
            "the head forms (attn1 peakiness >= 0.9) for d >= 64 and not for d < 30")
    if (none := _unjudged(*what, rows, [*planned, "polynomial-cot-2L"])) is not None:
        return none
    widths = _width_rows(rows)
    fail = {r["width"]: r.get("formed_step") is None for r in widths}
    good = all(fail[w] for w in fail if w < 30) and not any(fail[w] for w in fail if w >= 64)
    return _finding(*what, ", ".join(f"d={r['width']}: {_f(_acc(r), 2)} (attn1 {_f(r['summary'].get('attn1_peakiness'), 2)})"
                              for r in widths), "reproduced" if good else "not reproduced")


def _parity_scratch(rows: dict[str, dict]) -> list[dict]:
    return _seed_runs(rows, "parity", finished=True)


def _variance(rows: dict[str, dict]) -> dict[str, str]:
    what = ("parity has high variance across seeds; polynomial forms the head more reliably",
            "the head forms (attn1 peakiness >= 0.9) in a larger share of polynomial seeds than of parity seeds")
    needed = [r["name"] for t in PAPER_TASKS for r in _seed_runs(rows, t)]
    if (none := _unjudged(*what, rows, needed)) is not None:
        return none
    share, parts = {}, []
    for t in PAPER_TASKS:
        runs = _seed_runs(rows, t, finished=True)
        if runs:
            formed = sum(r.get("formed_step") is not None for r in runs)
            share[t] = formed / len(runs)
            parts.append(f"{t}: head in {formed}/{len(runs)} seeds, accuracy {', '.join(_f(_acc(r), 2) for r in runs)}")
    if "polynomial" not in share or "parity" not in share:
        return _finding(*what, "; ".join(parts), f"{NO_VERDICT}: needs polynomial and parity seeds")
    return _finding(*what, "; ".join(parts), "reproduced" if share["polynomial"] > share["parity"] else "not reproduced")


def _transfer(rows: dict[str, dict]) -> dict[str, str] | None:
    planned = [n for n, r in rows.items() if r.get("kind") == "transfer"]
    if not planned:
        return None  # no transfer runs in this plan
    what = ("transfer: pretrained on polynomial, parity is learned far faster than from scratch",
            "steps to 0.99 (and to 0.9) accuracy: every transfer seed gets there, sooner than scratch")
    scratch = [r["name"] for r in _seed_runs(rows, "parity")]
    if (none := _unjudged(*what, rows, [*planned, *scratch])) is not None:
        return none
    tr = [r for r in rows.values() if r.get("kind") == "transfer" and r.get("summary")]
    sc = _parity_scratch(rows)
    budget = max((r["budget_steps"] for r in sc), default=0)
    parts, verdicts = [], []
    for threshold in (0.99, 0.9):
        tr_ok = [s for s in (_steps_to(r, threshold) for r in tr) if s is not None]
        sc_ok = [s for s in (_steps_to(r, threshold) for r in sc) if s is not None]
        verdicts.append(len(tr_ok) == len(tr) and (len(sc_ok) < len(sc) or np.median(tr_ok) < np.median(sc_ok)))
        parts.append(f"to {threshold}: transfer {len(tr_ok)}/{len(tr)} seeds" + (f" ({_spread(tr_ok)} steps)" if tr_ok else "")
                     + f", scratch {len(sc_ok)}/{len(sc)}"
                     + (f" ({_spread(sc_ok)} steps)" if sc_ok else f" within {budget} steps"))
    verdict = "reproduced" if verdicts[0] else ("partly: at 0.9, not at 0.99" if verdicts[1] else "not reproduced")
    return _finding(*what, "; ".join(parts), verdict)


FINDINGS = (_learn_all, _collapse, _emergence, _width, _variance, _transfer)  # the paper's section 9, in order


def findings(rows: dict[str, dict], meta: dict) -> list[dict[str, str]]:
    """The paper's section-9 findings, each with what was measured here and a verdict by a stated rule."""
    return [f for f in (rule(rows) for rule in FINDINGS) if f is not None]


# --- tables ---------------------------------------------------------------------------------------------------


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _missing_note(rows_list: list[dict]) -> str:
    """The runs that did not finish, named under the findings: their findings carry no verdict."""
    missing = [r["name"] for r in rows_list if not _finished(r)]
    if not missing:
        return ""
    return (f"\n\n**{len(missing)} of {len(rows_list)} runs did not finish**, so the findings that need them have no "
            f"verdict: {', '.join(missing)} (their status is in the Runs table).")


def findings_table(found: list[dict]) -> str:
    return _table(["paper's finding", "rule", "measured here", "verdict"],
                  [[f["finding"], f["rule"], f["measured"], f"**{f['verdict']}**"] for f in found])


def grid_table(rows: dict[str, dict], n_len: int, tasks: list[str] | tuple[str, ...] = PAPER_TASKS) -> str:
    body = []
    for task in tasks:
        for variant in ("cot-2L", "nocot-2L", "cot-1L"):
            r = rows.get(f"{task}-{variant}", {})
            s = r.get("summary") or {}
            per = r.get("per_length") or {}
            body.append([task, variant, r.get("steps", "-"), _f(s.get("accuracy")), _f(_long_acc(r)),
                         _f(per.get(n_len)), _f(s.get("generation_accuracy")), _f(s.get("attn1_peakiness"))])
    return _table(["task", "model", "steps", "accuracy L=4..16", "longest quarter", f"L={n_len}", "greedy generation",
                   "attn1 peakiness"], body)


def detection_table(rows: dict[str, dict]) -> str:
    body = []
    for r in rows.values():
        for task, d in (r.get("detect") or {}).items():
            body.append([r["name"], task, f"L{d['layer']} H{d['head']}", _f(d["iteration_score"]), _f(d["peakiness"]),
                         "yes" if d["detected"] else "no", _f(d["eoi_score"]), _f(d["token_accuracy"]),
                         _f(d["ablated_token_accuracy"]), _f(d["random_ablated_token_accuracy"]), _f(d["chance_token_accuracy"])])
    return _table(["model", "probes", "top head (0-based)", "iteration score", "peakiness", "detected", "best EoI score",
                   "token acc", "top head zero-ablated", "other heads ablated", "chance"], body)


# --- the report -------------------------------------------------------------------------------------------------


def write_report(rows_list: list[dict], meta: dict, out: Path, jobs: dict) -> Path:
    """Figures, ``results.json`` and ``report.md`` in ``out``; returns the report's path."""
    from . import plots as figs

    rows = {r["name"]: r for r in rows_list}
    n_len = meta["scale"]["n_len"]
    found = findings(rows, meta)
    pictures: dict[str, str] = {}

    def picture(name: str, draw) -> None:
        try:
            draw(out / name)
            pictures[name] = name
        except Exception as err:  # noqa: BLE001 - a missing figure must not lose the numbers
            pictures[name] = f"(not drawn: {err})"

    tasks = meta.get("tasks") or PAPER_TASKS  # the paper's three, then any --tasks
    picture("accuracy_by_length.png", lambda p: figs.accuracy_by_length(rows, tasks, p))
    curves = [rows[n] for n in ("polynomial-cot-2L", "transfer-parity-seed0", "parity-cot-2L") if n in rows]
    picture("emergence.png", lambda p: figs.emergence(curves, p, FORMED))
    picture("transfer.png", lambda p: figs.transfer([r for r in rows_list if r.get("kind") == "transfer"]
                                                    + _seed_runs(rows, "parity"), p, SOLVED))
    picture("width_sweep.png", lambda p: figs.width_sweep(_width_rows(rows), p))
    length_rows = [r for r in rows_list if r.get("kind") == "length" and r.get("per_length")]
    if length_rows:
        picture("length_generalisation.png", lambda p: figs.length_generalisation(length_rows, p))
    if rows.get("polynomial-cot-2L", {}).get("summary"):
        def maps(p):
            from ..modeling import load_checkpoint
            from ..plots import plot_attention_maps

            model, tok = load_checkpoint(out / "runs" / "polynomial-cot-2L")
            plot_attention_maps(model, tok, "polynomial", min(8, n_len), p)
        picture("attention_maps.png", maps)

    results = {"meta": meta, "findings": found, "runs": rows_list}
    write_json_atomic(results, out / "results.json")
    text = render(rows, rows_list, meta, found, pictures, jobs, out)
    for name, body in (("report.md", text), ("summary.md", summary(found, rows, n_len, pictures, meta))):
        with atomic_file(out / name) as tmp:
            tmp.write_text(body)
    return out / "report.md"


def _img(pictures: dict, name: str, alt: str, prefix: str = "") -> str:
    value = pictures.get(name)
    if value is None:
        return ""
    return f"![{alt}]({prefix}{name})" if value == name else f"_{alt}: {value}_"


def summary(found: list[dict], rows: dict, n_len: int, pictures: dict, meta: dict, prefix: str = "") -> str:
    """The short version (findings, accuracy table, two figures) that the README embeds."""
    v = meta["versions"]
    return "\n\n".join([
        f"Measured by `{meta['command']}` ({meta['wall_seconds'] / 60:.1f} min on {meta['cpus']} CPU cores, "
        f"{meta['workers']} workers; torch {v['torch']}, transformers {v['transformers']}; {meta['finished']}).",
        findings_table(found) + _missing_note(list(rows.values())),
        grid_table(rows, n_len, meta.get("tasks") or PAPER_TASKS),
        _img(pictures, "accuracy_by_length.png", "accuracy per length", prefix),
        _img(pictures, "emergence.png", "emergence of the iteration head", prefix),
    ]) + "\n"


def _header(meta: dict) -> str:
    n_len, scale = meta["scale"]["n_len"], meta["scale"]
    return (f"# Iteration heads: reproduction report ({scale['name']} scale)\n\n"
            f"Command: `{meta['command']}`  \nFinished {meta['finished']} after {meta['wall_seconds'] / 60:.1f} min on "
            f"{meta['cpus']} CPU cores and {meta['gpus']} GPU(s), {meta['workers']} worker(s) x {meta['threads']} thread(s).  \n"
            "Versions: " + ", ".join(f"{k} {val}" for k, val in meta["versions"].items()) + ".  \n"
            f"Recipe `{scale['recipe']}`, lengths 1..{n_len}, accuracy = teacher-forced whole-chain accuracy on the "
            f"test split ({scale['per_length']} sequences per length at most), averaged over L = 4..{n_len} unless said. "
            f"The head counts as formed when attn1 peakiness reaches {FORMED}; a task as learned at accuracy {SOLVED}.")


def _emergence_section(rows: dict, pictures: dict, tasks: list[str] | tuple[str, ...] = PAPER_TASKS) -> str:
    em = []
    runs = [r for t in tasks for r in _seed_runs(rows, t)] + [rows[n] for n in ("transfer-parity-seed0",) if n in rows]
    for r in runs:
        if r.get("curve"):
            t = next((c["time"] for c in r["curve"] if c["step"] == r.get("formed_step")), None)
            s = r.get("summary") or {}
            em.append([r["name"], r.get("formed_step") or f"not within {r.get('steps')}", _f(t, 0) if t is not None else "-",
                       r.get("solved_step") or "-", r.get("steps"), _f(r.get("seconds"), 0), _f(s.get("accuracy")),
                       _f(s.get("attn1_peakiness"))])
    return ("## 2. Emergence of the iteration head\n\nEvery CoT 2-layer run from scratch (one per seed), and the first "
            "transfer run.\n\n" + _table(
                ["run", "head formed at step", "seconds", f"accuracy >= {SOLVED} at step", "steps run", "wall s",
                 "final accuracy", "final attn1"], em)
            + "\n\n" + _img(pictures, "emergence.png", "emergence"))


def _transfer_section(rows: dict, rows_list: list[dict], pictures: dict) -> str:
    tr = []
    for r in [r for r in rows_list if r.get("kind") == "transfer"] + _seed_runs(rows, "parity"):
        d = (r.get("detect") or {}).get("parity", {})
        tr.append(["transfer" if r.get("kind") == "transfer" else "scratch", r["seed"],
                   _steps_to(r, 0.9) or f"> {r.get('steps')}", _steps_to(r, SOLVED) or f"> {r.get('steps')}",
                   _f(_acc(r)), _f(d.get("iteration_score"))])
    before = (rows.get("polynomial-cot-2L", {}).get("detect") or {}).get("parity", {})
    return ("## 4. Transfer: polynomial -> parity\n\n" + _table(
        ["start", "seed", "steps to 0.9", f"steps to {SOLVED}", "final accuracy", "detector: iteration score on parity"], tr)
        + f"\n\nBefore fine-tuning, the polynomial model's best head scores {_f(before.get('iteration_score'))} "
        f"(layer {before.get('layer')}, peakiness {_f(before.get('peakiness'))}) on parity probes.\n\n"
        + _img(pictures, "transfer.png", "transfer vs scratch"))


def _width_section(rows_list: list[dict], pictures: dict) -> str:
    wd = [[r["width"], r.get("steps"), _f(_acc(r)), _f((r.get("summary") or {}).get("attn1_peakiness")),
           r.get("formed_step") or "-"]
          for r in sorted((r for r in rows_list if r.get("kind") == "width"), key=lambda r: r["width"])]
    return ("## 5. Embedding width (polynomial, CoT, 2 layers)\n\n" + _table(
        ["d", "steps", "accuracy", "attn1 peakiness", "head formed at"], wd)
        + "\n\n" + _img(pictures, "width_sweep.png", "width sweep"))


def _length_section(rows_list: list[dict], pictures: dict) -> str | None:
    rows = [r for r in rows_list if r.get("kind") == "length" and r.get("per_length")]
    if not rows:
        return None
    notes, header, Ls = [], ["L"], sorted(rows[0]["per_length"])
    for row in rows:
        per = row["per_length"]
        trained = [L for L in per if 4 <= L <= row["train_len"]]
        acc_in = float(np.mean([per[L] for L in trained])) if trained else None
        acc_out = float(np.mean([per[L] for L in per if L > row["train_len"]] or [float("nan")]))
        formed = row.get("formed_step")
        short = "length recipe" if row.get("length_recipe") else "default"
        recipe = ("with the length recipe (`training.config.length_recipe`: cumsum helper rows on every length, "
                  "lengths drawn in proportion to L, position offsets)" if row.get("length_recipe") else
                  "the default recipe")
        notes.append(f"- `{row['name']}`, {recipe}: mean accuracy on the trained lengths 4..{row['train_len']} "
                     f"{_f(acc_in)}, on the unseen longer lengths {_f(acc_out)}. "
                     + (f"The iteration head formed at step {formed} (attn1 peakiness on the trained lengths)."
                        if formed is not None else "The iteration head did not form in this run (attn1 peakiness "
                        f"on the trained lengths never reached {FORMED}), so it says nothing about how the circuit "
                        "generalises in length."))
        header += [f"{short}: accuracy", "greedy generation"]
    table = [[L, *(v for r in rows for v in (_f(r["per_length"].get(L)),
                                              _f((r.get("generation_per_length") or {}).get(L))))] for L in Ls]
    return (f"## 6. Length generalisation ({rows[0]['task']}, trained on 1..{rows[0]['train_len']})\n\n"
            + "\n".join(notes) + "\n\n" + _table(header, table)
            + "\n\n" + _img(pictures, "length_generalisation.png", "length generalisation"))


def _runs_section(rows_list: list[dict], jobs: dict) -> str:
    runs = [[r["name"], r.get("status", "-"), r.get("steps", "-"), _f(r.get("seconds"), 0),
             "`hf-iterheads train " + " ".join(jobs[r["name"]].train_args).replace("@", "RUNS/") + "`"] for r in rows_list]
    return ("## Runs\n\nEvery run's folder is `runs/NAME` (model, `metrics.jsonl`, `eval_results.json`, detector "
            "output); its log is `logs/NAME.train.log`. RUNS/ = this report's `runs/` folder.\n\n"
            + _table(["run", "status", "steps", "wall s", "command"], runs))


def render(rows: dict, rows_list: list[dict], meta: dict, found: list[dict], pictures: dict, jobs: dict, out: Path) -> str:
    """``report.md``: the header, the findings, one section per experiment, then every run's command."""
    parts = [
        _header(meta),
        "## Findings\n\n" + findings_table(found) + _missing_note(rows_list),
        "## 1. Chain-of-thought and depth\n\n" + grid_table(rows, meta["scale"]["n_len"], meta.get("tasks") or PAPER_TASKS)
        + "\n\n"
        + _img(pictures, "accuracy_by_length.png", "accuracy per length"),
        _emergence_section(rows, pictures, meta.get("tasks") or PAPER_TASKS),
        "## 3. Attention maps (polynomial, CoT, 2 layers)\n\nLayer 1 attends from each s_t to EoI (attn0); "
        "layer 2 attends from the position predicting s_t to x_t (attn1, the iteration head).\n\n"
        + _img(pictures, "attention_maps.png", "attention maps"),
        _transfer_section(rows, rows_list, pictures),
        _width_section(rows_list, pictures),
        _length_section(rows_list, pictures),
        "## 7. Detector and ablation on every model\n\nTop head by iteration score (mean attention from the "
        "position predicting s_t to x_t), then token accuracy of the teacher-forced probes with that head "
        "zero-ablated vs other heads ablated.\n\n" + detection_table(rows),
        _runs_section(rows_list, jobs),
    ]
    return "\n\n".join(p for p in parts if p is not None) + "\n"


def update_readme(readme: Path, out: Path, prefix: str) -> None:
    """Replace the README's generated results block with this reproduction's summary (figure links via ``prefix``)."""
    import json

    text = readme.read_text()
    if RESULTS_START not in text or RESULTS_END not in text:
        from ..errors import IterHeadsError

        raise IterHeadsError(f"{readme} has no {RESULTS_START} ... {RESULTS_END} block to fill")
    res = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in res["runs"]}
    for r in rows.values():  # JSON turned the length keys into strings
        for key in ("per_length", "generation_per_length"):
            if r.get(key):
                r[key] = {int(L): v for L, v in r[key].items()}
    pictures = {p.name: p.name for p in out.glob("*.png")}
    block = summary(res["findings"], rows, res["meta"]["scale"]["n_len"], pictures, res["meta"], prefix)
    new = re.sub(re.escape(RESULTS_START) + ".*?" + re.escape(RESULTS_END),
                 lambda m: f"{RESULTS_START}\n{block}\n{RESULTS_END}", text, flags=re.S)
    with atomic_file(readme) as tmp:
        tmp.write_text(new)
