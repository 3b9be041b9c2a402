"""Content gating: does the iteration head look x_t up at every step, or only for some values of (x_t, s_(t-1))?

Why: parity trained from scratch formed a head that attends x_t with mass 0.97-0.99 in three of the four
(x_t, s_(t-1)) cells and ~0.00 in (1, 1), where it reads EoI instead: the attention itself computes XOR's fourth
case ("x_t was not attended"). Averaged over steps it scores ~0.75 and reads as a weak head; split by cell it is
a sharp, gated one. Computed for one head from the probes' own values, so it applies to any LM the detector
scores; cells are (value of x_t, value of s_(t-1)) for t >= 2.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..circuit import mass_on
from ..evaluation import FORMED
from .runner import CaptureRun


@torch.no_grad()
def iteration_cells(model, probes, layer: int, head: int, batch_size: int = 16, capture: str = "eager") -> list[dict]:
    """The head's mean attention mass on x_t at the position predicting s_t, per (x_t, s_(t-1)) cell, most
    frequent cell first: ``{"x_t", "s_prev", "n", "mass"}``. Only ``layer`` runs (the forward stops there)."""
    sums: dict[tuple[int, int], list[float]] = {}
    kept: list[torch.Tensor] = []

    def on_layer(l, module, weights, rows=None):
        if l == layer:
            kept.append(weights[:, head : head + 1])

    with CaptureRun(model, capture, on_layer, stop_after=layer) as run:
        for idx in probes.batches(batch_size):
            kept.clear()
            batch = probes.batch(idx)
            run.forward(batch["input_ids"], batch["attention_mask"])
            q, k = probes.pred_pos[idx][:, 1:], probes.x_pos[idx][:, 1:]  # t >= 2: s_(t-1) exists
            mass = mass_on(kept[0].float(), q, k)[0][:, 0].cpu().numpy()  # (B, L - 1)
            valid = ((q >= 0) & (k >= 0)).numpy()
            x, prev = probes.inputs[idx][:, 1:], probes.states[idx][:, :-1]
            for b, t in zip(*np.nonzero(valid)):
                sums.setdefault((int(x[b, t]), int(prev[b, t])), []).append(float(mass[b, t]))
    cells = [{"x_t": c[0], "s_prev": c[1], "n": len(v), "mass": round(float(np.mean(v)), 4)} for c, v in sums.items()]
    return sorted(cells, key=lambda c: (-c["n"], c["x_t"], c["s_prev"]))


def gated_cells(cells: list[dict], low: float = 0.5, high: float = FORMED) -> list[tuple[int, int]] | None:
    """The cells a content-gated head skips, or None when it is not one: mass on x_t >= ``high`` in most steps (by
    count) and < ``low`` in every other cell. A head soft everywhere is not gated (it is a partial head)."""
    n = sum(c["n"] for c in cells)
    looked = sum(c["n"] for c in cells if c["mass"] >= high)
    skipped = [(c["x_t"], c["s_prev"]) for c in cells if c["mass"] < low]
    if not skipped or looked < n / 2 or looked + sum(c["n"] for c in cells if c["mass"] < low) < n:
        return None
    return skipped


def describe_gating(cells: list[dict]) -> dict[str, Any]:
    """``{"gated": bool, "skipped": [[x_t, s_prev], ...], "text"}`` (see ``gated_cells``)."""
    skipped = gated_cells(cells)
    if not skipped:
        return {"gated": False, "skipped": [], "text": ""}
    shown = ", ".join(f"({x}, {s})" for x, s in skipped[:6]) + (" ..." if len(skipped) > 6 else "")
    return {"gated": True, "skipped": [list(c) for c in skipped],
            "text": f"content-gated: looks x_t up except when (x_t, s_(t-1)) is {shown}"}
