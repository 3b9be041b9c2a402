"""The pictures and labels of ``report.html``: probe tokens as text, colour scales, score heatmaps and attention
maps as inline SVG (no network, no matplotlib). ``html`` lays them out into the page."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

FIRST = ("iteration_score", "eoi_score", "peakiness")
_VIRIDIS = ["#440154", "#472c7a", "#3b518b", "#2c718e", "#21908d", "#27ad81", "#5cc863", "#aadc32", "#fde725"]


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
