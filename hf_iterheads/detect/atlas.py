"""The scan's parts merged into an atlas: results.parquet, summary.md, figures/, report.html, and the Hub dataset.

One Parquet row per (model, revision, task, layer, head), written through ``datasets``; a failed triple is one
row with ``status = failed``, its ``error`` and null layer/head. Every grid of scores.json becomes a per-head
column and every scalar a column (nested ones such as the ablation numbers flattened with ``_``), so options the
detector gains later appear as columns without a change here. The core columns are typed and documented in
:data:`COLUMNS`; the dataset card is built from that with ``huggingface_hub``'s DatasetCardData / DatasetCard.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .. import __version__
from ..bundled import bundled_path
from ..bundled import is_local as is_local  # a local folder or bundled checkpoint; importable from here too
from .html import PAPER, is_grid, page, section

# Zero-ablating the found heads counts as causal when it removes at least CAUSAL_SHARE of the model's accuracy
# above chance, and more of it than ablating as many random heads (in a 2-head model the random head is the
# circuit's other head, which matters too: a fixed ratio to it would call the paper's own head not causal).
CAUSAL_SHARE = 0.5
AT_CHANCE = 0.1  # clean accuracy within this of chance: nothing to remove, no verdict

COLUMNS: dict[str, tuple[str, str]] = {
    "model": ("string", "the model as given to scan: a local folder, a bundled checkpoint name or a Hub repo id"),
    "revision": ("string", "the Hub revision asked for (null for local folders and bundled checkpoints)"),
    "commit": ("string", "the commit that revision resolved to, read from the loaded config, when known"),
    "step": ("int64", "training step parsed from the revision name (e.g. Pythia's step143000), else null"),
    "task": ("string", "the iterative task of the probes (parity, binary_copy, polynomial, ...)"),
    "status": ("string", "ok, or failed: then `error` says why and the head columns are null"),
    "error": ("string", "why the triple failed (not causal, no attention weights, out of memory, not found offline ...)"),
    "architecture": ("string", "the transformers model class"),
    "n_params": ("int64", "number of parameters"),
    "layer": ("int64", "0-based layer of this head"),
    "head": ("int64", "0-based query head"),
    "n_layers": ("int64", "attention layers of the model"),
    "n_heads": ("int64", "query heads per layer"),
    "n_kv_heads": ("int64", "key/value heads per layer (fewer under GQA/MQA)"),
    "kv_group": ("int64", "the key/value head this query head reads"),
    "rank": ("int64", "rank of the head by iteration_score within its (model, revision, task); 1 = best"),
    "eoi_rank": ("int64", "rank by eoi_score"),
    "iteration_score": ("float64", "mean attention from the position predicting s_t to x_t, on steps where s_t depends on x_t"),
    "iteration_all_score": ("float64", "the same on every step"),
    "peakiness": ("float64", "share of those attentions above 0.5 (the paper's measure)"),
    "prev_score": ("float64", "control: the same queries' attention to x_(t-1)"),
    "next_score": ("float64", "control: the same queries' attention to x_(t+1)"),
    "baseline": ("float64", "chance: mean 1/(visible keys) of those queries (uniform attention)"),
    "eoi_score": ("float64", "mean attention from the positions holding s_t to EoI (the circuit's first-layer head)"),
    "eoi_peakiness": ("float64", "share of those attentions above 0.5"),
    "eoi_baseline": ("float64", "chance for eoi_score"),
    "detected": ("bool", "iteration_score >= min_score, >= chance_ratio x baseline and >= control_ratio x each control"),
    "eoi_detected": ("bool", "eoi_score >= min_score and >= chance_ratio x eoi_baseline"),
    "circuit_label": ("string", "the circuit formed (detect.circuits): iteration head, look-up without an EoI head, "
                                "EoI head, no look-up, or other circuit"),
    "circuit_text": ("string", "that label with its heads, or each layer's strongest pattern for another circuit"),
    "circuit_layers": ("string", "JSON: per layer, the head and pattern with the largest attention mass"),
    "clean_token_accuracy": ("float64", "teacher-forced accuracy of the model's s_t on the probes (per step)"),
    "clean_sequence_accuracy": ("float64", "share of probes whose every s_t is right"),
    "clean_log_prob": ("float64", "mean log-probability of the true s_t"),
    "chance_token_accuracy": ("float64", "1 / number of state values"),
    "ablated": ("bool", "the head was among the top-k ablated (with --ablate; the ablation_* columns hold the numbers)"),
    "rendering": ("string", "native (the project's layout) or text (a template through the model's tokenizer)"),
    "template": ("string", "the text template (text rendering)"),
    "lengths": ("string", "chain lengths of the probes"),
    "n": ("int64", "probes per task"),
    "seed": ("int64", "probe seed"),
    "dtype": ("string", "weights dtype"),
    "tool_version": ("string", "hf-iterheads version"),
    "date": ("string", "when the triple was scanned (UTC, ISO 8601)"),
    "worker": ("string", "the process that scanned it: index/count (several under accelerate launch)"),
}
SKIP = {"model", "task", "top_heads", "eoi_top_heads", "lengths_spec", "revision"}
SUMMARY_DOCS = "one row per (model, revision, task): the best head, its scores against chance, detected and causal verdicts"


# --- rows ------------------------------------------------------------------------------------------------


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}_{k}", v, out)
    elif isinstance(value, list):
        if not any(isinstance(v, list) for v in value):  # lists of grids (per-template tables) stay in the parts
            out[prefix] = json.dumps(value)
    else:
        out[prefix] = value


def part_rows(part: dict) -> list[dict[str, Any]]:
    """The Parquet rows of one triple: one per head, or one failure row."""
    keys = ("model", "revision", "commit", "step", "task", "status", "error", "architecture", "n_params")
    common = {k: part.get(k) for k in (*keys, "tool_version", "date", "worker")}
    if part["status"] != "ok":
        return [common]
    d = part["result"]
    L, H = d["n_layers"], d["n_heads"]
    grids = {k: v for k, v in d.items() if is_grid(v, L, H)}
    scalars: dict[str, Any] = {}
    for k, v in d.items():
        if k not in grids and k not in SKIP and not (isinstance(v, list) and v and isinstance(v[0], list)):
            _flat(k, v, scalars)
    scalars["lengths"] = d.get("lengths_spec") or scalars.get("lengths")
    clean = part.get("clean") or {}
    for k in ("token_accuracy", "sequence_accuracy", "log_prob"):
        scalars[f"clean_{k}"] = clean.get(k)
    scalars["chance_token_accuracy"] = clean.get("chance_token_accuracy")
    ablated = {tuple(h) for h in (d.get("ablation") or {}).get("heads", [])}
    rank = _ranks(d["iteration_score"])
    eoi_rank = _ranks(d["eoi_score"])
    rows = []
    for layer in range(L):
        for head in range(H):
            row = {**common, **scalars, "layer": layer, "head": head}
            row.update(rank=rank[layer][head], eoi_rank=eoi_rank[layer][head])
            row.update({k: g[layer][head] for k, g in grids.items()})
            row["ablated"] = (layer, head) in ablated if d.get("ablation") else None
            rows.append(row)
    return rows


def _ranks(grid: list[list[float]]) -> list[list[int]]:
    cells = sorted((-v, layer, h) for layer, row in enumerate(grid) for h, v in enumerate(row))
    out = [[0] * len(grid[0]) for _ in grid]
    for r, (_, layer, h) in enumerate(cells, 1):
        out[layer][h] = r
    return out


def _dtype(values: list[Any]) -> str:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return "bool"
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return "int64"
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return "float64"
    return "string"


def to_dataset(rows: list[dict[str, Any]], typed: dict[str, tuple[str, str]] = COLUMNS):
    """A ``datasets.Dataset``: the ``typed`` columns first with their declared type, the others inferred."""
    from datasets import Dataset, Features, Value

    names = list(typed) + [k for k in dict.fromkeys(k for r in rows for k in r) if k not in typed]
    columns = {k: [r.get(k) for r in rows] for k in names}
    features = {}
    for k, values in columns.items():
        kind = typed[k][0] if k in typed else _dtype(values)
        if kind == "string":
            columns[k] = [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
        elif kind == "float64":
            columns[k] = [None if v is None else float(v) for v in values]
        features[k] = Value(kind)
    return Dataset.from_dict(columns, features=Features(features))


# --- per-triple verdicts ---------------------------------------------------------------------------------


def causal_verdict(part: dict) -> tuple[str, float | None, float | None]:
    """(verdict, share of the above-chance accuracy that zero-ablating the found heads removes, same for random heads)."""
    ab = (part.get("result") or {}).get("ablation")
    if not ab:
        return "not asked", None, None
    clean, chance = ab["clean"]["token_accuracy"], ab["clean"]["chance_token_accuracy"]
    if clean < chance + AT_CHANCE:
        return "n/a (model at chance)", None, None
    share = lambda acc: (clean - acc) / (clean - chance)  # noqa: E731
    top = share(ab["zero"]["top"]["token_accuracy"])
    rnd = share(ab["zero"]["random_mean"]["token_accuracy"]) if ab["zero"].get("random_mean") else 0.0
    return ("yes" if top >= CAUSAL_SHARE and top > rnd else "no"), round(top, 6), round(rnd, 6)


def summary_rows(parts: list[dict]) -> list[dict[str, Any]]:
    """One row per triple: the best head against chance and controls, detected, causal."""
    out = []
    for p in parts:
        row = {k: p.get(k) for k in ("model", "revision", "step", "task", "status", "error", "n_params")}
        if p["status"] == "ok":
            d = p["result"]
            best, eoi = d["top_heads"][0], d["eoi_top_heads"][0]
            verdict, drop, rnd = causal_verdict(p)
            clean = p.get("clean") or {}
            row.update(
                n_layers=d["n_layers"], n_heads=d["n_heads"], best_layer=best["layer"], best_head=best["head"],
                best_score=best["score"], best_baseline=best["baseline"],
                best_prev=best["prev_score"], best_next=best["next_score"],
                best_peakiness=best["peakiness"], detected=bool(best["detected"]),
                n_detected=sum(bool(v) for r in d.get("detected", []) for v in r),
                eoi_layer=eoi["layer"], eoi_head=eoi["head"], eoi_score=eoi["score"], eoi_detected=bool(eoi.get("detected")),
                clean_token_accuracy=clean.get("token_accuracy"), chance_token_accuracy=clean.get("chance_token_accuracy"),
                removed_share=drop, random_removed_share=rnd, causal=verdict,
                circuit=(d.get("circuit") or {}).get("label"),
            )
        out.append(row)
    return out


def _label(p: dict) -> str:
    return f"{p['model']}{'@' + p['revision'] if p.get('revision') else ''}"


def summary_md(parts: list[dict], control: dict | None = None) -> str:
    from .control import control_markdown

    rows = summary_rows(parts)
    ok = [r for r in rows if r["status"] == "ok"]
    settings = next((p["settings"] for p in parts), {})
    lines = [
        "# Iteration-head atlas", "",
        f"{len({_label(p) for p in parts})} model revisions x {len({p['task'] for p in parts})} tasks = {len(parts)} triples "
        f"({len(rows) - len(ok)} failed); {settings.get('n')} probes per task, lengths {settings.get('lengths')}; "
        f"hf-iterheads {__version__}, merged {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}.", "",
        "| model | task | best head | score | chance | x/chance | x_t-1 / x_t+1 | clean acc (chance) | detected | causal | circuit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ok:
        acc = "-" if r["clean_token_accuracy"] is None else f"{r['clean_token_accuracy']:.2f} ({r['chance_token_accuracy']:.2f})"
        lines.append(
            f"| {_label(r)} | {r['task']} | L{r['best_layer']}H{r['best_head']} | {r['best_score']:.3f} | "
            f"{r['best_baseline']:.3f} | "
            f"{r['best_score'] / max(r['best_baseline'], 1e-9):.1f} | {r['best_prev']:.3f} / {r['best_next']:.3f} | {acc} | "
            f"{'yes' if r['detected'] else 'no'} | {r['causal']} | {r['circuit'] or '-'} |"
        )
    lines += control_markdown(control)
    lines += ["", "## How to read it", "",
              "Layers and heads are 0-based. A head is *detected* when its iteration score is at least 0.25, three times the "
              "uniform-attention chance and twice either neighbour control (x_t-1, x_t+1). *Causal*: zero-ablating the found "
              f"heads (--ablate) removes at least {CAUSAL_SHARE:.0%} of the teacher-forced accuracy above chance, and more "
              "than ablating as many random heads does; `n/a` where the model is within "
              f"{AT_CHANCE} of chance on the task.",
              f"The iteration head: Cabannes et al., \"Iteration Head: A Mechanistic Study of Chain-of-Thought\", {PAPER}."]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["", "## Failures", "", "| model | task | reason |", "|---|---|---|"]
        lines += [f"| {_label(r)} | {r['task']} | {str(r['error']).replace('|', '/')} |" for r in failed]
    return "\n".join(lines) + "\n"


def _is_local_part(p: dict) -> bool:
    """A model given as a folder path (not a bundled checkpoint, not a Hub id)."""
    return is_local(p["model"]) and bundled_path(p["model"]) is None or p["model"].startswith(("/", ".", "~"))


def report_order(parts: list[dict]) -> list[tuple[str, list[dict]]]:
    """(group title, parts) by model name (case-folded), then revision step and task; local folders in their own group."""
    key = lambda p: (p["model"].casefold(), p.get("step") or 0, p.get("revision") or "", p["task"])  # noqa: E731
    hub = sorted((p for p in parts if not _is_local_part(p)), key=key)
    local = sorted((p for p in parts if _is_local_part(p)), key=key)
    return [(t, g) for t, g in (("Hub and bundled models", hub), ("Local folders", local)) if g]


def report_html(parts: list[dict], control: dict | None = None) -> str:
    """report.html for a scan: the control, then a table of models (by name; local folders apart) linking to one
    section per triple."""
    from html import escape

    from .control import control_html, flags

    warn = flags(control)
    text_flags = lambda d: warn if d.get("rendering") == "text" else []  # noqa: E731
    tables, sections, i = [], [], 0
    titles = ("model", "task", "parameters", "best head", "score", "chance", "clean acc (chance)", "detected", "causal", "circuit")
    head = "<tr>" + "".join(f'<th class="l">{h}</th>' if h in ("model", "task", "circuit") else f"<th>{h}</th>" for h in titles) + "</tr>"
    groups = report_order(parts)
    for title, group in groups:
        rows = []
        for p, s in zip(group, summary_rows(group)):
            i += 1
            if p["status"] == "ok":
                anchor = f"s{i}"
                d = {**p["result"], "revision": p.get("revision"), "commit": p.get("commit"), "n_params": p.get("n_params")}
                if not isinstance(d.get("clean_accuracy"), dict) and isinstance(p.get("clean"), dict):
                    d["clean_accuracy"] = p["clean"]
                sections.append(section(d, p.get("maps") or [], anchor, f"{_label(p)} on {p['task']}", flags=text_flags(d)))
                acc = "-" if s["clean_token_accuracy"] is None else f"{s['clean_token_accuracy']:.2f} ({s['chance_token_accuracy']:.2f})"
                rows.append(
                    f'<tr><td class="l nw"><a href="#{anchor}">{escape(_label(p))}</a></td><td class="l">{p["task"]}</td>'
                    f"<td>{p.get('n_params') or ''}</td><td>L{s['best_layer']}H{s['best_head']}</td><td>{s['best_score']:.3f}</td>"
                    f"<td>{s['best_baseline']:.3f}</td><td>{acc}</td><td>{'<span class=yes>yes</span>' if s['detected'] else 'no'}</td>"
                    f"<td>{escape(str(s['causal']))}</td><td class=l>{escape(str(s['circuit'] or '-'))}</td></tr>"
                )
            else:
                rows.append(f'<tr><td class="l nw">{escape(_label(p))}</td><td class="l">{p["task"]}</td>'
                            f'<td class="l fail" colspan="{len(titles) - 2}">failed: {escape(str(p["error"]))}</td></tr>')
        sub = f"<h3>{title}</h3>" if len(groups) > 1 else ""
        tables.append(f"{sub}<table>{head}{''.join(rows)}</table>")
    body = control_html(control) + "<h2>Models</h2>" + "".join(tables) + "".join(sections)
    return page("Iteration-head atlas", body)


# --- writing ---------------------------------------------------------------------------------------------


def write_atlas(out: Path, parts: list[dict]) -> dict[str, Any]:
    """results.parquet, summary.md, report.html and figures/ from every part, each file moved into place whole."""
    parts = sorted(parts, key=lambda p: (p["model"], p.get("step") or 0, p.get("revision") or "", p["task"]))
    notes: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix=".atlas-", dir=out))
    try:
        to_dataset([r for p in parts for r in part_rows(p)]).to_parquet(str(tmp / "results.parquet"))
        from .control import load_control

        control = load_control(out)
        (tmp / "summary.md").write_text(summary_md(parts, control))
        (tmp / "report.html").write_text(report_html(parts, control), encoding="utf-8")
        try:
            from .atlas_plots import plot_atlas

            (tmp / "figures").mkdir()
            plot_atlas(parts, tmp / "figures")
        except ImportError as err:
            notes.append(f"matplotlib is not installed ({err.name}): skipped figures/ (pip install 'hf-iterheads[plots]')")
        (out / "figures").mkdir(exist_ok=True)
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                os.replace(f, out / f.relative_to(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"failed": sum(p["status"] != "ok" for p in parts), "notes": notes}


def __getattr__(name: str):
    """``publish`` lives in :mod:`.atlas_hub` (the Hub side); its old path keeps working."""
    if name == "publish":
        import importlib

        return importlib.import_module(f"{__package__}.atlas_hub").publish
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
