"""A self-contained ``report.html``: see the heads, not only read the table.

One file, no server, no CDN, no network: inline SVG for the pictures, a few lines of inline JS for the hover
read-out and inline CSS. It shows, per (model, revision, task) section:

* a layer x head heatmap for every score grid in scores.json (found generically, so grids that later
  detector options add are drawn too), detected heads outlined;
* the attention map of the top heads on one probe, tokens labelled with their role (``x_t``, ``EoI``,
  ``s_t``) and the cells the circuit should fill outlined (pred ``s_t`` -> ``x_t`` for the iteration head,
  ``s_t`` -> EoI for the EoI head);
* the ablation numbers and, when present, the patching numbers;
* the clean accuracy on the probes and the circuit verdict (the EoI partner head), as the terminal prints them.

Probe tokens are shown as text (``x2 = 1``, ``EoI "->"``), never as tokenizer pieces (``Ġ1``). A model with
one head per layer (or a handful in all) gets a table of its heads instead of heatmaps: there is nothing to
compare across a grid of one column. Every heatmap carries its colour bar.

``detect`` writes one section (the best head's map, which the result carries); ``scan`` writes one per
triple with a table of models linking to them, and the maps of its top heads (recomputed by :func:`head_maps`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from .html_maps import (  # noqa: F401  (re-exported: plots and users import the labels from here)
    _blue,
    _byte_decoder,
    _color,
    _esc,
    _roles,
    _shown,
    attention_map,
    colour_bar,
    expected_cells,
    heatmap,
    is_grid,
    score_grids,
    token_label,
    token_text,
)

PAPER = "https://arxiv.org/abs/2406.02128"
# grids shown open; the others sit in a collapsed "more score grids" block
MAIN = ("iteration_score", "eoi_score", "peakiness", "entropy", "prev_score", "next_score", "previous_token_score", "state_score")
MIN_HEADS_FOR_HEATMAPS = 4  # fewer heads in all (or one per layer): a table of heads instead
# viridis at 9 stops (matplotlib's), interpolated linearly: close enough to read, no dependency

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.6em}h2{border-top:2px solid #ccc;padding-top:.6em;margin-top:2em}h3{margin:1.2em 0 .4em}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ddd;padding:2px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.yes{color:#0a0;font-weight:600}.fail{color:#b00}
.grids{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}.verdict{font-size:15px}
.flag{background:#fff3cd;border:1px solid #e0c060;padding:4px 8px}details{margin:.4em 0}summary{cursor:pointer}.nw{white-space:nowrap}
figure{margin:0}figcaption{font-size:12px;font-weight:600}
svg text{font:10px monospace;fill:#333}svg rect[data-v]:hover{stroke:#000;stroke-width:1.5}
#readout{position:fixed;top:8px;right:8px;background:#fff;border:1px solid #888;padding:4px 8px;
font:12px monospace;min-width:16em;box-shadow:0 1px 4px #0003}.note{color:#555;font-size:12px}
"""

JS = """
(function(){var out=document.getElementById('readout');
document.addEventListener('mouseover',function(e){var r=e.target;if(!r.dataset||r.dataset.v===undefined)return;
var s=r.ownerSVGElement,c=+s.dataset.cell,x0=+s.dataset.x0,y0=+s.dataset.y0;
var row=Math.round((+r.getAttribute('y')-y0)/c),col=Math.round((+r.getAttribute('x')-x0)/c);
if(s.dataset.tokens){var t=JSON.parse(s.dataset.tokens);
out.textContent=s.dataset.name+': query '+row+' '+t[row]+' -> key '+col+' '+t[col]+' = '+r.dataset.v;}
else{out.textContent=s.dataset.name+': layer '+row+' head '+col+' = '+r.dataset.v;}});})();
"""


def _num(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else _esc(v)


def ablation_table(ab: dict) -> str:
    """Clean vs found heads vs random heads, per ablation mode."""
    cols = ("token_accuracy", "sequence_accuracy", "log_prob")
    rows = [("clean", ab.get("clean") or {})]
    for mode in ("zero", "mean"):
        if mode in ab:
            rows.append((f"{mode}-ablate found heads", ab[mode].get("top") or {}))
            if ab[mode].get("matched"):
                rows.append((f"{mode}-ablate same-layer random", ab[mode]["matched"]))
            if ab[mode].get("random_mean"):
                draws = len(ab[mode].get("random") or [])
                rows.append((f"{mode}-ablate random heads (mean of {draws})", ab[mode]["random_mean"]))
    heads = ", ".join(f"L{layer}H{h}" for layer, h in ab.get("heads", []))
    cells = lambda r: "".join(f"<td>{_num(r.get(c, ''))}</td>" for c in cols)
    body = "".join(f'<tr><td class="l">{_esc(n)}</td>{cells(r)}</tr>' for n, r in rows)
    head = '<tr><th class="l">heads ' + _esc(heads) + "</th>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"
    note = f'<p class="note">{_esc(ab["note"])}</p>' if ab.get("note") else ""
    return f"<table>{head}{body}</table>{note}"


def generic_table(d: Any, prefix: str = "") -> str:
    """Any nested dict of numbers as key / value rows (the patching numbers, whatever their shape)."""
    rows: list[tuple[str, Any]] = []

    def walk(v: Any, key: str) -> None:
        if isinstance(v, dict):
            for k, sub in v.items():
                walk(sub, f"{key}.{k}" if key else str(k))
        elif isinstance(v, list) and v and all(isinstance(x, (dict, list)) for x in v):
            for i, sub in enumerate(v):
                walk(sub, f"{key}[{i}]")
        else:
            rows.append((key, v if not isinstance(v, list) else json.dumps(v)))

    walk(d, prefix)
    return "<table>" + "".join(f'<tr><td class="l">{_esc(k)}</td><td>{_num(v)}</td></tr>' for k, v in rows) + "</table>"


META_KEYS = (
    "revision", "commit", "rendering", "template", "n", "lengths_spec", "seed", "dtype", "device", "n_params", "example_probe",
)


def _f(v: Any, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt) if isinstance(v, (int, float)) else _esc(v)


def verdict_block(d: dict) -> str:
    """Best head, clean accuracy against chance, and the circuit verdict (the EoI partner head)."""
    out = []
    best = (d.get("top_heads") or [{}])[0]
    n_templates = len(d.get("templates") or [])
    over = f"; means over {n_templates} templates" if n_templates > 1 else ""
    if best:
        verdict = '<span class="yes">detected</span>' if best.get("detected") else "not detected"
        out.append(
            f"<p class=verdict>best iteration head: <b>layer {best['layer']} head {best['head']}</b>, score {best['score']:.3f} "
            f"(chance {best.get('baseline', float('nan')):.3f}, x_t-1 {best.get('prev_score', float('nan')):.3f}, "
            f"x_t+1 {best.get('next_score', float('nan')):.3f}{over}): {verdict}</p>"
        )
    circuit = d.get("circuit") or {}
    if circuit.get("text") or circuit.get("label"):
        gate = (d.get("gating") or {}).get("text") or (d.get("gating") or {}).get("description")
        extra = f"; {_esc(gate)}" if isinstance(gate, str) else ""
        out.append(f"<p class=verdict>circuit: <b>{_esc(circuit.get('text') or circuit.get('label'))}</b>{extra}</p>")
    clean = d.get("clean_accuracy") or {}
    if clean.get("token_accuracy") is not None:
        per = clean.get("per_length") or {}
        lengths = " ".join(f"L{k}:{v:.2f}" for k, v in per.items() if v is not None)
        state = " <b>at chance</b>" if clean.get("at_chance") else ""
        note = f' <span class="note">{_esc(clean["note"])}</span>' if clean.get("note") else ""
        out.append(
            f"<p class=verdict>clean accuracy on the probes: <b>{clean['token_accuracy']:.3f}</b> "
            f"(chance {clean.get('chance_token_accuracy', float('nan')):.3f}, {clean.get('steps', '?')} steps){state}"
            f' <span class="note">per length {_esc(lengths)}</span>{note}</p>'
        )
    return "".join(out)


def heads_table(d: dict, keys: Sequence[str]) -> str:
    """Every head as a row and every score grid as a column: for models too small for heatmaps."""
    cols = [k for k in keys if k in d]
    head = '<tr><th class="l">head</th>' + "".join(f"<th>{_esc(k)}</th>" for k in cols) + "</tr>"
    rows = []
    for layer in range(d["n_layers"]):
        for h in range(d["n_heads"]):
            flag = " (detected)" if (d.get("detected") or [[False] * d["n_heads"]] * d["n_layers"])[layer][h] else ""
            rows.append(f'<tr><td class="l">L{layer}H{h}{flag}</td>'
                        + "".join(f"<td>{_f(d[k][layer][h])}</td>" for k in cols) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def patch_table(p: dict) -> str:
    """The patching numbers: the rule, the logit differences, and each patched head's share (n/a when refused)."""
    if p.get("refused"):
        return f'<p class="flag">patching not run: {_esc(p["refused"])}</p>'
    rows = [(f"L{r['layer']}H{r['head']}", "found (top-k)", r["share"]) for r in p.get("heads", [])]
    rows += [(f"L{r['layer']}H{r['head']}", "random, same layer", r["share"]) for r in p.get("random", [])]
    if not p.get("random"):
        rows.append(("-", "random, same layer: none (one head per layer)", "-"))
    if p.get("contrast"):
        r = p["contrast"]
        rows.append((f"L{r['layer']}H{r['head']}", "best EoI head (contrast)", r["share"]))
    rows += [(f"L{r['layer']} (all heads)", "whole layer", r["share"]) for r in p.get("layers", [])]
    body = "".join(f'<tr><td class="l">{_esc(a)}</td><td class="l">{_esc(b)}</td><td>{_f(c)}</td></tr>' for a, b, c in rows)
    separates = p.get("separates", True)
    verdict = "" if separates else (
        '<p class="flag">n/a: the model does not separate s_t from s\'_t, so no head has a logit difference to move</p>')
    groups = f", {p['token_groups']} token groups patched apart and pooled" if p.get("token_groups", 1) > 1 else ""
    return (
        f"<p>{p.get('n', '?')} probes ({p.get('skipped', 0)} without a counterfactual{groups}); logit difference "
        f"logit(s_t) - logit(s'_t): clean {_f(p.get('clean_logit_diff'))}, counterfactual {_f(p.get('counterfactual_logit_diff'))}; "
        f"separated on {p.get('separated', '?')} of {p.get('n', '?')}</p>{verdict}"
        f'<table><tr><th class="l">head</th><th class="l">what</th><th>share moved</th></tr>{body}</table>'
        f'<p class="note">share = sum(LD_clean - LD_patched) / sum(LD_clean - LD_counterfactual); {_esc(p.get("rule", ""))}</p>'
    )


def template_table(d: dict) -> str:
    """Per template (``--template`` given several times): the best head's score under each, and its drop."""
    grids, templates = d.get("iteration_score_by_template"), d.get("templates") or []
    if not d.get("top_heads"):
        return ""
    best = d["top_heads"][0]
    reference = d.get("organism_reference")  # a text organism: its score under its default training rendering
    if (not grids or len(grids) != len(templates)) and reference is not None and len(templates) == 1:
        grids = [d["iteration_score"]]
    if not grids or len(grids) != len(templates):
        return ""
    trained = set(d.get("trained_templates") or [])
    scores = [g[best["layer"]][best["head"]] for g in grids]
    top = max(scores) if reference is None else reference
    passed = d.get("detected_by_template") or []
    rows = []
    for i, (t, v) in enumerate(zip(templates, scores)):
        ok = passed[i][best["layer"]][best["head"]] if i < len(passed) else best.get("detected") if len(templates) == 1 else None
        mark = "" if not trained else f'<td class="l">{"trained on" if t in trained else "not trained on"}</td>'
        rows.append(f'<tr><td class="l"><code>{_esc(t)}</code></td><td>{v:.3f}</td><td>{top - v:.3f}</td>'
                    f'<td>{"yes" if ok else "no" if ok is not None else "-"}</td>{mark}</tr>')
    extra = "<th class=l>model</th>" if trained else ""
    what = "drop from best" if reference is None else "drop from its trained default"
    note = "" if reference is None else (
        f'<p class="note">a text organism: drop = its iteration score under its default training template without shots '
        f"({reference:.3f}, text_eval.json) minus the score here</p>")
    return (f"<h3>Per template (head L{best['layer']}H{best['head']})</h3><table><tr><th class=l>template</th>"
            f"<th>iteration score</th><th>{what}</th><th>detected</th>{extra}</tr>{''.join(rows)}</table>{note}")


def section(d: dict, maps: Sequence[dict] = (), anchor: str = "s0", heading: str | None = None, flags: Sequence[str] = ()) -> str:
    """One (model, revision, task): verdicts, meta, heads (heatmaps or a table), attention maps, ablation, patching.

    ``flags``: warnings shown first (the scan's control: templates under which the organism's head is not found)."""
    heading = heading or f"{d['model']} on {d['task']}"
    out = [f'<section id="{_esc(anchor)}"><h2>{_esc(heading)}</h2>']
    out.extend(f'<p class="flag">{_esc(f)}</p>' for f in flags)
    out.append(verdict_block(d))
    meta = [(k, d[k]) for k in META_KEYS if d.get(k) not in (None, "")]
    if d.get("shots"):
        meta.append(("shots", d["shots"]))
    rows = "".join(f'<tr><th class="l">{_esc(k)}</th><td class="l">{_esc(v)}</td></tr>' for k, v in meta)
    out.append(f"<details><summary>settings</summary><table>{rows}</table></details>")
    keys = score_grids(d)
    if d["n_layers"] * d["n_heads"] < MIN_HEADS_FOR_HEATMAPS or d["n_heads"] == 1:
        out.append(f"<h3>Heads ({d['n_layers']} layers x {d['n_heads']} head{'s' if d['n_heads'] > 1 else ''}, 0-based)</h3>")
        out.append(heads_table(d, [k for k in MAIN if k in keys]))
    else:
        main, more = [k for k in keys if k in MAIN], [k for k in keys if k not in MAIN]
        out.append("<h3>Heatmaps (layer x head)</h3><div class=grids>")
        for key in main:
            outline = d.get("detected") if key == "iteration_score" else d.get("eoi_detected") if key == "eoi_score" else None
            out.append(heatmap(key, d[key], outline))
        out.append("</div><p class=note>layers top to bottom, heads left to right, 0-based; red outline: detected heads</p>")
        if more:
            out.append(f"<details><summary>{len(more)} more score grids</summary><div class=grids>")
            out.extend(heatmap(key, d[key]) for key in more)
            out.append("</div></details>")
    out.append(template_table(d))
    if maps:
        out.append("<h3>Attention of the top heads</h3><div class=grids>")
        out.extend(attention_map(m) for m in maps)
        out.append("</div>")
    if d.get("ablation"):
        out.append("<h3>Ablation</h3>" + ablation_table(d["ablation"]))
    if d.get("patch"):
        out.append("<h3>Patching</h3>" + patch_table(d["patch"]))
    out.append("</section>")
    return "".join(out)


def page(title: str, body: str) -> str:
    """The whole file: CSS, body, read-out box and JS inline."""
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{_esc(title)}</h1>"
        f'<div id="readout">hover a cell</div>{body}'
        f'<p class="note">hf-iterheads {__version__}; the iteration head: Cabannes et al., '
        f'"Iteration Head: A Mechanistic Study of Chain-of-Thought" ({PAPER})</p>'
        f"<script>{JS}</script></body></html>\n"
    )


def result_maps(result) -> list[dict]:
    """The best head's map that a DetectionResult carries (detect keeps only that one)."""
    if result.pattern is None or result.pattern_marks is None:
        return []
    m = result.pattern_marks
    return [{
        "layer": m["layer"], "head": m["head"], "pattern": np.round(result.pattern, 3).tolist(), "tokens": result.pattern_tokens,
        "x_pos": list(m["x_pos"]), "pred_pos": list(m["pred_pos"]), "circuit": "iteration", "why": "best iteration score",
    }]


@torch.no_grad()
def head_maps(model, tokenizer, result, k: int = 3) -> list[dict]:
    """Maps of the top-``k`` iteration heads and the best EoI head on the result's probe, in one forward pass.

    The probe is rebuilt from its tokens (``convert_tokens_to_ids``), so this needs no probe settings; if the
    best head's map does not come out equal to the one the detector kept, only that one is returned.
    """
    from .attention import AttentionCapture

    base = result_maps(result)
    if not base:
        return []
    ids = tokenizer.convert_tokens_to_ids(list(result.pattern_tokens))
    if any(i is None for i in ids):
        return base
    wanted = [(layer, h, "iteration", f"iteration rank {r}") for r, (layer, h) in enumerate(result.ranked()[:k], 1)]
    el, eh = result.ranked("eoi_score")[0]
    wanted.append((el, eh, "eoi", "best EoI score"))
    kept: dict[tuple[int, int], np.ndarray] = {}

    def on_layer(layer, module, weights):
        for at, h, _, _ in wanted:
            if at == layer:
                kept[(at, h)] = weights[0, h].float().cpu().numpy()

    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    with AttentionCapture(model, on_layer):
        model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
    first = kept.get(tuple(base[0][k] for k in ("layer", "head")))
    if first is None or first.shape != np.shape(base[0]["pattern"]) or not np.allclose(first, base[0]["pattern"], atol=2e-3):
        return base
    return [{**base[0], "layer": at, "head": h, "pattern": np.round(kept[(at, h)], 3).tolist(), "circuit": c, "why": why}
            for at, h, c, why in wanted]


def organism_context(model: str, d: dict) -> dict:
    """For a text organism (``iterheads.text_organism`` in its config): the templates it was trained on and, from its
    ``text_eval.json``, its score under its default template without shots, so the report says how much a
    rendering costs it. Empty for any other model."""
    from ..bundled import bundled_path

    path = bundled_path(model) or (Path(model) if Path(model).is_dir() else None)
    if path is None or not (path / "config.json").is_file() or d.get("rendering") != "text":
        return {}
    try:
        meta = json.loads((path / "config.json").read_text()).get("iterheads") or {}
        if not meta.get("text_organism"):
            return {}
        out: dict = {"trained_templates": meta.get("templates", [])}
        evals = json.loads((path / "text_eval.json").read_text()) if (path / "text_eval.json").is_file() else {}
        ref = next((r["score"] for r in evals.get("renderings", []) if r["template"] == meta["templates"][0] and r["shots"] == 0), None)
        if ref is not None:
            out["organism_reference"] = ref
        return out
    except (OSError, ValueError, KeyError, IndexError):
        return {}


def write_report(result, path: str | Path, maps: Sequence[dict] | None = None) -> None:
    """report.html for one detection (``detect`` calls this from ``write_outputs``)."""
    d = result.to_dict()
    d.setdefault("eoi_detected", [[bool(v) for v in row] for row in result.eoi_detected()])
    d.update(organism_context(str(result.model), d))
    body = section(d, result_maps(result) if maps is None else maps, "s0", f"{result.model} on {result.task}")
    Path(path).write_text(page(f"Iteration heads of {result.model}", body), encoding="utf-8")
