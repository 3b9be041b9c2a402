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

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__

PAPER = "https://arxiv.org/abs/2406.02128"
FIRST = ("iteration_score", "eoi_score", "peakiness")
# grids shown open; the others sit in a collapsed "more score grids" block
MAIN = ("iteration_score", "eoi_score", "peakiness", "entropy", "prev_score", "next_score", "previous_token_score", "state_score")
MIN_HEADS_FOR_HEATMAPS = 4  # fewer heads in all (or one per layer): a table of heads instead
# viridis at 9 stops (matplotlib's), interpolated linearly: close enough to read, no dependency
_VIRIDIS = ["#440154", "#472c7a", "#3b518b", "#2c718e", "#21908d", "#27ad81", "#5cc863", "#aadc32", "#fde725"]

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


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet back to bytes (``Ġ`` = space, ``Ċ`` = newline), as its tokenizer builds it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTES = _byte_decoder()


def token_text(token: str) -> str:
    """A tokenizer piece as the text it stands for: byte-level BPE (``Ġ1`` -> `` 1``) and SentencePiece
    (``▁1`` -> `` 1``, ``<0x0A>`` -> newline) decoded; anything else unchanged."""
    token = str(token)
    if token.startswith("<0x") and token.endswith(">") and len(token) == 6:
        try:
            return bytes([int(token[3:5], 16)]).decode("latin-1")
        except ValueError:
            return token
    if "▁" in token:
        return token.replace("▁", " ")
    if token and all(ch in _BYTES for ch in token) and any(ch in "ĠĊĉ" or ord(ch) > 255 for ch in token):
        return bytes(_BYTES[ch] for ch in token).decode("utf-8", errors="replace")
    return token


def _shown(text: str) -> str:
    """Whitespace made visible for a label: newline as ⏎, tab as ⇥, leading/trailing spaces dropped."""
    out = text.replace("\n", "⏎").replace("\t", "⇥").strip(" ")
    return out or "␣"


def token_label(role: str, token: str) -> str:
    """``x2 = 1``, ``s3 = 0``, ``EoI "->"``, or the quoted text of any other token."""
    text = _shown(token_text(token))
    if role.startswith(("x", "s")) and role[1:].isdigit():
        return f"{role} = {text}"
    quoted = f'"{text}"'
    return f"{role} {quoted}" if role else quoted


def _color(v: float, lo: float, hi: float) -> str:
    t = 0.0 if hi <= lo else min(1.0, max(0.0, (v - lo) / (hi - lo)))
    pos = t * (len(_VIRIDIS) - 1)
    i = min(int(pos), len(_VIRIDIS) - 2)
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    f = pos - i
    mix = [round(int(a[k : k + 2], 16) * (1 - f) + int(b[k : k + 2], 16) * f) for k in (1, 3, 5)]
    return "#" + "".join(f"{c:02x}" for c in mix)


def _blue(v: float) -> str:
    t = min(1.0, max(0.0, float(v)))
    return f"#{round(255 - 247 * t):02x}{round(255 - 207 * t):02x}{round(255 - 148 * t):02x}"


def is_grid(value: Any, n_layers: int, n_heads: int) -> bool:
    """A layer x head table of numbers (bools count, for ``detected``) in scores.json."""
    return (
        isinstance(value, list)
        and len(value) == n_layers
        and all(isinstance(r, list) and len(r) == n_heads for r in value)
        and all(isinstance(v, (int, float, bool)) for r in value for v in r)
    )


def score_grids(d: dict) -> list[str]:
    """The float grids of a scores.json worth a heatmap, the circuit's own first."""
    L, H = d["n_layers"], d["n_heads"]
    keys = [
        k for k, v in d.items()
        if is_grid(v, L, H) and any(isinstance(x, float) for r in v for x in r) and k != "kv_group"
    ]
    return [k for k in FIRST if k in keys] + sorted(k for k in keys if k not in FIRST)


def heatmap(name: str, grid: Sequence[Sequence[float]], outline: Sequence[Sequence[bool]] | None = None) -> str:
    """One layer x head heatmap as inline SVG; each cell carries its value for the hover read-out."""
    arr = np.asarray(grid, dtype=float)
    L, H = arr.shape
    cell = max(4, min(18, 420 // max(H, 1)))
    x0, y0 = 26, 14
    lo, hi = (0.0, 1.0) if arr.min() >= 0 and arr.max() <= 1 else (float(arr.min()), float(arr.max()))
    bar_x = x0 + H * cell + 10
    w, h = max(bar_x + 46, 120), max(y0 + L * cell + 4, 70)
    step = max(1, (L + 15) // 16)
    parts = [f'<svg width="{w}" height="{h}" data-name="{_esc(name)}" data-cell="{cell}" data-x0="{x0}" data-y0="{y0}">']
    parts += [f'<text x="{x0}" y="10">head 0..{H - 1}</text>']
    parts += [f'<text x="0" y="{y0 + r * cell + cell - 2}">{r}</text>' for r in range(0, L, step)]
    box = f'width="{cell}" height="{cell}"'
    for (r, c), v in np.ndenumerate(arr):
        parts.append(f'<rect x="{x0 + c * cell}" y="{y0 + r * cell}" {box} fill="{_color(v, lo, hi)}" data-v="{v:.3f}"/>')
    if outline is not None:
        for (r, c), on in np.ndenumerate(np.asarray(outline, dtype=bool)):
            if on:
                parts.append(f'<rect x="{x0 + c * cell}" y="{y0 + r * cell}" {box} fill="none" stroke="red" stroke-width="2"/>')
    parts.append(colour_bar(bar_x, y0, max(L * cell, 50), lo, hi))
    parts.append("</svg>")
    return f'<figure><figcaption>{_esc(name)}</figcaption>{"".join(parts)}</figure>'


def colour_bar(x: int, y: int, height: int, lo: float, hi: float) -> str:
    """A vertical viridis bar from ``lo`` (bottom) to ``hi`` (top), labelled at both ends and the middle."""
    stops = "".join(f'<stop offset="{i / (len(_VIRIDIS) - 1):.3f}" stop-color="{c}"/>' for i, c in enumerate(reversed(_VIRIDIS)))
    gid = f"cb{abs(hash((x, y, height, lo, hi))) % 10**8}"
    mid = (lo + hi) / 2
    return (
        f'<defs><linearGradient id="{gid}" x1="0" y1="0" x2="0" y2="1">{stops}</linearGradient></defs>'
        f'<rect x="{x}" y="{y}" width="8" height="{height}" fill="url(#{gid})" stroke="#999" stroke-width=".5"/>'
        f'<text x="{x + 11}" y="{y + 8}">{hi:.2g}</text><text x="{x + 11}" y="{y + height / 2 + 3:.0f}">{mid:.2g}</text>'
        f'<text x="{x + 11}" y="{y + height}">{lo:.2g}</text>'
    )


def _roles(n: int, x_pos: Sequence[int], pred_pos: Sequence[int]) -> list[str]:
    """x_t, EoI (= the position predicting s_1) and s_t (= the position after the one predicting it)."""
    roles = [""] * n
    for t, p in enumerate(x_pos, 1):
        if 0 <= p < n:
            roles[p] = f"x{t}"
    for t, p in enumerate(pred_pos, 1):
        if 0 <= p + 1 < n:
            roles[p + 1] = f"s{t}"
    if pred_pos and 0 <= pred_pos[0] < n:
        roles[pred_pos[0]] = "EoI"
    return roles


def expected_cells(m: dict) -> list[tuple[int, int]]:
    """(query, key) cells the circuit fills: pred s_t -> x_t (iteration) or s_t -> EoI (eoi)."""
    x_pos, pred = list(m["x_pos"]), list(m["pred_pos"])
    if m.get("circuit", "iteration") == "eoi":
        return [(p + 1, pred[0]) for p in pred] if pred else []
    return list(zip(pred, x_pos))


def attention_map(m: dict) -> str:
    """One head's (T, T) attention on a probe; rows are queries, columns keys; circuit cells outlined red.

    Cells under 0.005 are left out (white, no read-out): a probe of 35 tokens then costs a few kB, not 50."""
    pat = np.asarray(m["pattern"], dtype=float)
    T = len(pat)
    tokens = [str(t) for t in m["tokens"]][:T]
    roles = _roles(T, m["x_pos"], m["pred_pos"])
    full = [token_label(r, t) for r, t in zip(roles, tokens)]
    labels = [lab if len(lab) <= 12 else lab[:11] + "~" for lab in full]
    cell = max(6, min(14, 560 // max(T, 1)))
    x0 = y0 = 8 + 7 * max(len(s) for s in labels)
    w, h = x0 + T * cell + 4, y0 + T * cell + 4
    name = f"L{m['layer']}H{m['head']} attention"
    parts = [
        f'<svg width="{w}" height="{h}" data-name="{_esc(name)}" data-cell="{cell}" data-x0="{x0}" data-y0="{y0}" '
        f'data-tokens="{_esc(json.dumps(full, ensure_ascii=False))}">'
    ]
    for i, lab in enumerate(labels):
        weight = ' font-weight="bold"' if roles[i] else ""
        parts.append(f'<text x="{x0 - 4}" y="{y0 + i * cell + cell - 3}" text-anchor="end"{weight}>{_esc(lab)}</text>')
        cx = x0 + i * cell + cell - 3
        parts.append(f'<text x="{cx}" y="{y0 - 4}" transform="rotate(-90 {cx} {y0 - 4})"{weight}>{_esc(lab)}</text>')
    box = f'width="{cell}" height="{cell}"'
    # the attendable (causal) triangle in white, then only the cells with visible mass: the file stays small
    corners = ((0, 0), (cell, 0), (T * cell, (T - 1) * cell), (T * cell, T * cell), (0, T * cell))
    tri = " ".join(f"{x0 + x},{y0 + y}" for x, y in corners)
    parts.append(f'<polygon points="{tri}" fill="#fff" stroke="#ddd"/>')
    for (q, k), v in np.ndenumerate(pat):
        if k <= q and v >= 0.005:
            parts.append(f'<rect x="{x0 + k * cell}" y="{y0 + q * cell}" {box} fill="{_blue(v)}" data-v="{v:.3f}"/>')
    for q, k in expected_cells(m):
        if 0 <= q < T and 0 <= k < T:
            parts.append(f'<rect x="{x0 + k * cell}" y="{y0 + q * cell}" {box} fill="none" stroke="red" stroke-width="1.5"/>')
    parts.append("</svg>")
    what = "s_t -> EoI" if m.get("circuit") == "eoi" else "pred s_t -> x_t"
    cap = f"layer {m['layer']} head {m['head']} ({_esc(m.get('why', 'top head'))}): red boxes = the circuit's cells ({what})"
    return f"<figure><figcaption>{cap}</figcaption>{''.join(parts)}</figure>"


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
    from ..modeling import bundled_path

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
