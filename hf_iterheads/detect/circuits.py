"""Which circuit a model formed, named: the paper's iteration head, half of it, or another circuit.

Why: a model can learn an iterative task without the paper's circuit (a recorded parity run: layer 1 reads the
inputs along a diagonal, layer 2 attends within the chain). "No iteration head" hides that; saying what each
layer attends to instead is the finding. The name comes from the detector's pattern scores alone, so it applies
to any causal LM the detector scores, ours or a third party's.

Classes, in the order they are tested:

* ``iteration head``: a flagged iteration head, and a flagged EoI head in an earlier layer (the paper's
  two-layer circuit: attn0 finds EoI, attn1 looks x_t up);
* ``look-up without an EoI head``: a flagged iteration head, no flagged EoI head before it;
* ``EoI head, no look-up``: a flagged EoI head, no flagged iteration head (the circuit's first half);
* ``other circuit``: neither; each layer's strongest pattern says what formed instead.

A flagged head that looks x_t up only for some values of (x_t, s_(t-1)) (``detect.gating``) keeps its class, and
the text says which cells it skips.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PAPER = "iteration head"
CLASSES = (PAPER, "look-up without an EoI head", "EoI head, no look-up", "other circuit")


def _strongest(result, layer: int) -> dict[str, Any]:
    """The (head, pattern) with the largest mean attention mass in ``layer``, over every scored pattern."""
    best = {"layer": layer, "head": 0, "pattern": None, "score": -1.0}
    for p in result.head_patterns:
        grid = np.asarray(result.scores[p.key("score")], dtype=float)[layer]
        head = int(np.argmax(grid))
        if grid[head] > best["score"]:
            best = {"layer": layer, "head": head, "pattern": p.name, "score": round(float(grid[head]), 3)}
    return best


def name_circuit(result) -> dict[str, Any]:
    """``{"label", "layers", "text"}`` for a :class:`~hf_iterheads.detect.detection.DetectionResult`."""
    top = result.top_heads(1)[0]
    eoi = result.eoi_detected()
    eoi_before = [(int(l), int(h)) for l, h in zip(*np.nonzero(eoi)) if l < top["layer"]]
    if top["detected"]:
        label = CLASSES[0] if eoi_before else CLASSES[1]
    else:
        label = CLASSES[2] if eoi.any() else CLASSES[3]
    layers = [_strongest(result, layer) for layer in range(result.n_layers)]
    if label == CLASSES[0]:
        l, h = eoi_before[0]
        what = f"EoI head layer {l} head {h}, iteration head layer {top['layer']} head {top['head']} (0-based)"
    elif label == CLASSES[1]:
        what = f"iteration head layer {top['layer']} head {top['head']} (0-based)"
    else:
        shown = layers if len(layers) <= 4 else sorted(layers, key=lambda r: -r["score"])[:4]
        what = "strongest pattern per layer: " + "; ".join(
            f"layer {r['layer']} head {r['head']} {r['pattern']} {r['score']:.2f}" for r in shown)
    gating = getattr(result, "gating", None) or {}
    if gating.get("gated") and label in CLASSES[:2]:  # detect.gating: the head skips x_t for some values
        what += "; " + gating["text"]
    return {"label": label, "layers": layers, "text": f"{label}: {what}"}
