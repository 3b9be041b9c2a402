"""Find iteration heads (paper section 8) in any causal LM, and check them causally.

For every (layer, head) the detector measures, on teacher-forced CoT probes (:mod:`hf_iterheads.detect.probes`):

* ``iteration_score`` -- mean attention mass from the position predicting ``s_t`` to ``x_t`` (the
  iteration head); ``peakiness`` -- the paper's share of those attentions above 0.5. Only steps where
  ``s_t`` depends on ``x_t`` count (polynomial iteration after a 0 state does not: ``s_t = 1`` whatever
  ``x_t`` is, and a trained head skips the look-up); ``iteration_all_score`` counts every step;
* ``eoi_score`` -- mass from the positions holding ``s_t`` to EoI (the layer-1 partner of the circuit);
* controls -- the same mass on ``x_(t-1)`` and ``x_(t+1)`` (``prev_score``, ``next_score``) and the uniform
  ``baseline`` 1/(visible keys), so a score can be read as "how far above chance"; ``entropy`` -- the
  normalised attention entropy of the query rows.

Each of these is a head pattern (:mod:`hf_iterheads.detect.patterns`: presets plus whatever users register);
everything below loops over them. Probabilities are computed row-sliced beside the model's fast attention
(:mod:`hf_iterheads.detect.rows`), or inside its own eager attention where that cannot work
(:class:`hf_iterheads.detect.attention.AttentionCapture`), and reduced to these numbers layer by layer, so
memory never holds layers x heads x T x T; the forward stops after the last attention layer.
A head is ``detected`` when its iteration score is at least ``MIN_SCORE``, ``CHANCE_RATIO`` times the
uniform baseline and ``CONTROL_RATIO`` times either neighbour control. Layers and heads are 0-based:
the paper's "layer-2 head" of a 2-layer model is layer 1.

Scores are also split by whether the model's own greedy ``s_t`` is right (:mod:`.competence`), so a readout on a
model that cannot do the task says so; with several templates the tables are means and ``by_template`` keeps each.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..circuit import PEAK_THRESHOLD, mass_on
from ..errors import IterHeadsError
from ..modeling import bundled_path, is_load_error, load_error_message
from ..outputs import check_output_dir
from ..tasks import get_task
from .attention import AttentionCapture, find_attention_modules, head_counts
from .patterns import HeadPattern, registered_patterns, resolve_patterns
from .probes import Probes, concat_probes, make_probes, parse_lengths
from .rows import RowCapture, RowsUnavailable

MIN_SCORE = 0.25
CHANCE_RATIO = 3.0
CONTROL_RATIO = 2.0
NO_CONTROL = "every head of the model is ablated: no other head remains for a random control"
DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --- loading ---------------------------------------------------------------------------------------------


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model_name(name: str) -> str:
    """A local folder, a checkpoint shipped with the package (by short name), or a Hub repo id."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if bundled_path(name):
        return str(bundled_path(name))
    if not _HUB_ID.fullmatch(name):
        raise IterHeadsError(f"{name!r}: no such folder, not a bundled checkpoint, and not a valid Hub id (ORG/NAME)")
    return name


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise IterHeadsError(f"--device {device}: this torch build sees no CUDA device (use cpu or auto)")
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise IterHeadsError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto") from None
    return device


def load_model(
    name: str,
    revision: str | None = None,
    dtype: str = "float32",
    device: str | None = "cpu",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
):
    """(model, tokenizer) the Hub way, with eager attention so weights exist; clear one-line errors."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if dtype not in DTYPES:
        raise IterHeadsError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    path = resolve_model_name(name)
    common = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(path, **common)
    except (OSError, ValueError) as err:
        hint = (
            "HF_HUB_OFFLINE=1 is set, so only models already in the Hub cache ($HF_HOME/hub) or local folders load"
            if _offline()
            else "if this machine is offline, set HF_HUB_OFFLINE=1 and put the model in the Hub cache, or pass a local folder"
        )
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise IterHeadsError(f"cannot load model {name!r}{f' at revision {revision}' if revision else ''}: {first} ({hint})") from None
    auto_map = getattr(config, "auto_map", None) or {}
    if getattr(config, "is_encoder_decoder", False) or (
        type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not (trust_remote_code and "AutoModelForCausalLM" in auto_map)
    ):
        raise IterHeadsError(f"{name!r} is not a causal language model ({type(config).__name__}); the detector needs a decoder-only LM")
    kwargs: dict[str, Any] = {**common, "dtype": DTYPES[dtype], "attn_implementation": "eager"}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
    except Exception as err:  # noqa: BLE001 -- every broken checkpoint is one line; anything else is re-raised
        if not (isinstance(err, RuntimeError) or is_load_error(err)):
            raise
        raise IterHeadsError(load_error_message(name, err)) from None
    if device_map is None:
        model.to(_resolve_device(device))
    model.eval()
    return model, tokenizer


def context_length(model) -> int | None:
    cfg = model.config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# --- scoring ---------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised after the last attention layer is scored: the rest of the model (and its LM head) is not needed."""


def capture_runner(model, capture: str, on_layer):
    """The capture context for ``capture`` (``rows``: the model's fast attention, else eager), calling
    ``on_layer(layer, module, weights, rows=None)`` for every attention layer."""
    if capture == "rows":
        return RowCapture(model, on_layer)
    return AttentionCapture(model, lambda layer, module, weights: on_layer(layer, module, weights))


def _visible(q: torch.Tensor, window: int | None) -> torch.Tensor:
    """Keys a query at position q sees under right padding: 0..q, or its sliding window."""
    visible = (q + 1).clamp(min=1).double()
    return visible.clamp(max=window) if window else visible


class _Accumulator:
    """Running sums per layer and pattern, filled by the capture hook; the attention itself is never kept."""

    def __init__(self, n_layers: int, n_heads: int, patterns: list[HeadPattern]) -> None:
        self.patterns, self.n_heads = patterns, n_heads
        names = [p.name for p in patterns]
        self.mass = {k: np.zeros((n_layers, n_heads)) for k in names}
        self.peak = {k: np.zeros((n_layers, n_heads)) for k in names}
        self.entropy = {k: np.zeros((n_layers, n_heads)) for k in names}
        self.count = {k: np.zeros(n_layers) for k in names}
        self.chance = {k: np.zeros(n_layers) for k in names}
        self.pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def rows(self) -> torch.Tensor:
        """Sorted query positions any pattern reads in this batch: the only rows row-sliced capture computes."""
        qs = [q[q >= 0] for q, _ in self.pairs.values()]
        return torch.unique(torch.cat(qs)) if qs else torch.zeros(0, dtype=torch.long)

    def add(self, layer: int, weights: torch.Tensor, window: int | None, rows: torch.Tensor | None = None) -> None:
        """``weights`` (B, H, T or R, T): full patterns, or only the query positions ``rows`` (R,)."""
        if weights.shape[1] != self.n_heads:
            raise IterHeadsError(f"layer {layer} gave {weights.shape[1]} heads, expected {self.n_heads}")
        lookup = None
        if rows is not None:
            rows = rows.to(weights.device)
            lookup = torch.full((int(rows.max()) + 1 if len(rows) else 1,), -1, dtype=torch.long, device=weights.device)
            lookup[rows] = torch.arange(len(rows), device=weights.device)
        for p in self.patterns:
            q, k = self.pairs[p.name]
            qr = q if lookup is None else torch.where(q >= 0, lookup[q.clamp(min=0)], -1)
            m, valid = mass_on(weights, qr, k)
            m = m.float()
            v = valid.to(m.device)[:, None, :]
            self.mass[p.name][layer] += (m * v).sum((0, 2)).double().cpu().numpy()
            self.peak[p.name][layer] += ((m > PEAK_THRESHOLD) & v).sum((0, 2)).double().cpu().numpy()
            self.count[p.name][layer] += int(valid.sum())
            if p.baseline or p.entropy:
                visible = _visible(q, window)
                self.chance[p.name][layer] += float((1.0 / visible)[valid].sum())
            if p.entropy:
                b, h = weights.shape[:2]
                r = weights.gather(2, qr.clamp(min=0)[:, None, :, None].expand(b, h, -1, weights.shape[-1])).float()
                ent = -torch.special.xlogy(r, r).sum(-1)  # (B, H, P) nats
                norm = visible.log().to(ent.device, torch.float32)[:, None, :]
                ent = torch.where(norm > 0, ent / norm.clamp(min=1e-12), torch.zeros_like(ent))  # one visible key: 0
                self.entropy[p.name][layer] += (ent * v).sum((0, 2)).double().cpu().numpy()

    def mean(self, kind: dict, name: str) -> np.ndarray:
        return kind[name] / np.maximum(self.count[name], 1)[:, None]


def _window(module, config) -> int | None:
    if hasattr(module, "sliding_window"):
        return module.sliding_window or None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    value = getattr(config, "sliding_window", None)
    return value if isinstance(value, int) and value > 0 else None


CAPTURES = ("auto", "rows", "eager")


@torch.no_grad()
def score_heads(
    model,
    probes: Probes,
    batch_size: int = 16,
    patterns: list[HeadPattern | str] | None = None,
    capture: str = "auto",
    stop_early: bool = True,
) -> dict[str, Any]:
    """Per-head scores of every pattern on ``probes``; every array is (n_layers, n_heads).

    ``capture``: ``rows`` (the model's fast attention, probabilities for the probe rows only), ``eager`` (each
    model's own eager attention) or ``auto`` (rows, eager where rows cannot work). ``capture`` and
    ``capture_note`` in the result say which ran and why. ``stop_early=False`` runs the layers after the last
    attention and the LM head anyway (as before; only to compare speed).
    """
    if capture not in CAPTURES:
        raise IterHeadsError(f"unknown capture {capture!r}; use {', '.join(CAPTURES)}")
    patterns = resolve_patterns(patterns)
    note = None
    if capture in ("auto", "rows"):
        try:
            return {**_score(model, probes, batch_size, patterns, "rows", stop_early), "capture": "rows", "capture_note": None}
        except RowsUnavailable as err:
            if capture == "rows":
                raise IterHeadsError(f"row-sliced capture does not work for {type(model).__name__}: {err}") from None
            note = f"row-sliced capture unavailable ({err}); used eager attention"
    return {**_score(model, probes, batch_size, patterns, "eager", stop_early), "capture": "eager", "capture_note": note}


def _score(model, probes: Probes, batch_size: int, patterns: list[HeadPattern], capture: str, stop_early: bool) -> dict[str, Any]:
    n_layers = len(find_attention_modules(model))
    n_heads, n_kv = head_counts(model)
    acc = _Accumulator(n_layers, n_heads, patterns)
    windows: dict[int, int | None] = {}
    config = getattr(model.config, "get_text_config", lambda: model.config)()

    def on_layer(layer, module, weights, rows=None):
        if layer not in windows:
            windows[layer] = _window(module, config)
        acc.add(layer, weights, windows[layer], rows)
        if stop_early and layer == n_layers - 1:
            raise _StopForward  # the rest of the model (last MLP, norm, LM head) changes no score

    device = next(model.parameters()).device
    params = _forward_params(model)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    if "use_cache" in params:  # a KV cache would hold every layer's keys and values: memory grows with depth
        keep["use_cache"] = False
    runner = capture_runner(model, capture, on_layer)
    with runner:
        for idx in probes.batches(batch_size):
            acc.pairs = {}
            for p in patterns:
                q, k = p.pairs(probes, idx)
                acc.pairs[p.name] = (q.to(device), k.to(device))
            if capture == "rows":
                runner.rows = acc.rows()
            batch = {k: v.to(device) for k, v in probes.batch(idx).items()}
            try:
                model(**batch, **keep)
            except _StopForward:
                pass
            runner.check_complete()
    scores: dict[str, Any] = {}
    for p in patterns:
        scores[p.key("score")] = acc.mean(acc.mass, p.name)
        if p.peakiness:
            scores[p.key("peakiness")] = acc.mean(acc.peak, p.name)
        if p.entropy:
            scores[p.key("entropy")] = acc.mean(acc.entropy, p.name)
        if p.baseline:
            scores[p.key("baseline")] = np.repeat((acc.chance[p.name] / np.maximum(acc.count[p.name], 1))[:, None], n_heads, 1)
    for name, arr in scores.items():
        if not np.isfinite(arr).all():
            raise IterHeadsError(f"{name} has non-finite values: the model's attention produced NaN/inf (try --dtype float32)")
    scores["kv_group"] = np.tile(np.arange(n_heads) // max(1, n_heads // n_kv), (n_layers, 1))
    scores["n_kv_heads"] = n_kv
    return scores


def _forward_params(model) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


@torch.no_grad()
def attention_pattern(model, probes: Probes, index: int, layer: int, head: int, capture: str = "eager") -> np.ndarray:
    """One head's (T, T) pattern on one probe, for the picture; only that slice is kept (``capture``: rows or eager)."""
    kept: list[np.ndarray] = []

    def on_layer(l, module, weights, rows=None):
        if l == layer:
            kept.append(weights[0, head].float().cpu().numpy())
            raise _StopForward

    device = next(model.parameters()).device
    idx = np.array([index])
    runner = capture_runner(model, capture, on_layer)
    with runner:
        try:
            model(**{k: v.to(device) for k, v in probes.batch(idx).items()}, use_cache=False)
        except _StopForward:
            pass
    return kept[0]


# --- results ---------------------------------------------------------------------------------------------


@dataclass
class DetectionResult:
    """Score tables plus everything needed to reproduce them; ``to_dict()`` is scores.json."""

    model: str
    task: str
    scores: dict[str, Any]
    meta: dict[str, Any]
    ablation: dict | None = None
    pattern: np.ndarray | None = field(default=None, repr=False)
    pattern_tokens: list[str] | None = field(default=None, repr=False)
    pattern_marks: dict | None = field(default=None, repr=False)
    competence: dict | None = field(default=None, repr=False)  # competence.competence_scores (pooled over templates)
    by_template: list[dict] | None = field(default=None, repr=False)  # score_heads per template, when several
    patterns: list[HeadPattern] | None = field(default=None, repr=False)
    patch: dict | None = None
    gating: dict | None = None  # detect.gating on the top head, when it is flagged: cells and whether it is gated

    @property
    def head_patterns(self) -> list[HeadPattern]:
        """The patterns scored (those given, else every registered one present in ``scores``)."""
        if self.patterns is not None:
            return self.patterns
        return [p for p in registered_patterns() if p.key("score") in self.scores]

    def _pattern(self, name: str) -> HeadPattern:
        found = next((p for p in self.head_patterns if p.name == name or p.key("score") == name), None)
        if found is None:
            raise IterHeadsError(f"no head pattern {name!r}; scored: {', '.join(p.name for p in self.head_patterns)}")
        return found

    @property
    def n_layers(self) -> int:
        return int(self.scores["iteration_score"].shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.scores["iteration_score"].shape[1])

    def pattern_detected(self, name: str) -> np.ndarray:
        """Score >= MIN_SCORE, >= CHANCE_RATIO x its baseline and >= CONTROL_RATIO x each of its controls."""
        p, s = self._pattern(name), self.scores
        score = s[p.key("score")]
        ok = score >= MIN_SCORE
        if p.baseline:
            ok &= score >= CHANCE_RATIO * s[p.key("baseline")]
        for c in p.controls:
            ok &= score >= CONTROL_RATIO * s[self._pattern(c).key("score")]
        return ok

    def detected(self) -> np.ndarray:
        return self.pattern_detected("iteration")

    def eoi_detected(self) -> np.ndarray:
        return self.pattern_detected("eoi")

    def ranked(self, key: str = "iteration_score") -> list[tuple[int, int]]:
        arr = self.scores[key]
        order = np.lexsort((np.arange(arr.size), -arr.ravel()))
        return [divmod(int(i), self.n_heads) for i in order]

    def top_heads(self, k: int | None = None, key: str = "iteration_score") -> list[dict[str, Any]]:
        """Heads ranked by ``key``; iteration rows also carry every other pattern's score (and the entropy)."""
        s, out = self.scores, []
        ranked_by = next((p for p in self.head_patterns if p.key("score") == key), None)  # None: any other grid
        det = self.pattern_detected(ranked_by.name) if ranked_by is not None and ranked_by.baseline else None
        for layer, head in self.ranked(key)[:k]:
            row = {"layer": layer, "head": head, "score": float(s[key][layer, head])}
            if key == "iteration_score":
                row.update(
                    peakiness=float(s["peakiness"][layer, head]),
                    eoi_score=float(s["eoi_score"][layer, head]),
                    prev_score=float(s["prev_score"][layer, head]),
                    next_score=float(s["next_score"][layer, head]),
                    baseline=float(s["baseline"][layer, head]),
                    kv_group=int(s["kv_group"][layer, head]),
                    detected=bool(det[layer, head]),
                    entropy=float(s["entropy"][layer, head]),
                )
                for p in self.head_patterns:
                    row.setdefault(p.key("score"), float(s[p.key("score")][layer, head]))
                row.update(self._extra_columns(layer, head))
            elif det is not None:
                row.update(baseline=float(s[ranked_by.key("baseline")][layer, head]), detected=bool(det[layer, head]))
            out.append(row)
        return out

    def _extra_columns(self, layer: int, head: int) -> dict[str, Any]:
        """Per-head spread over templates and the score split by the model's own right/wrong s_t."""
        row: dict[str, Any] = {}
        if self.by_template:
            row["spread"] = float(self.scores["iteration_score_spread"][layer, head])
            row["templates_passed"] = int(self.templates_passed()[layer, head])
        if self.competence:
            for o in ("correct", "wrong"):
                arr = self.competence["scores"][f"iteration_score_{o}"]
                row[f"score_{o}"] = None if arr is None else float(arr[layer, head])
        return row

    def templates_passed(self) -> np.ndarray:
        """How many templates each head is detected under on its own (all heads 1 with one template)."""
        if not self.by_template:
            return self.detected().astype(int)
        if "_passed" not in self.__dict__:  # top_heads asks once per head
            self._passed = sum(DetectionResult(self.model, self.task, t, {}).detected().astype(int) for t in self.by_template)
        return self._passed

    def to_dict(self) -> dict[str, Any]:
        s = self.scores
        grid = lambda a: [[round(float(v), 6) for v in row] for row in a]  # noqa: E731
        out = {"model": self.model, "task": self.task, "n_layers": self.n_layers, "n_heads": self.n_heads}
        for p in self.head_patterns:
            for what in ["score", *p.reported]:
                out[p.key(what)] = grid(s[p.key(what)])
        out["n_kv_heads"] = int(s["n_kv_heads"])
        out["kv_group"] = [[int(v) for v in row] for row in s["kv_group"]]
        for p in self.head_patterns:
            if p.baseline:
                out[p.key("detected")] = [[bool(v) for v in row] for row in self.pattern_detected(p.name)]
        out["top_heads"] = self.top_heads()
        out["eoi_top_heads"] = self.top_heads(key="eoi_score")
        out["circuit"] = self.circuit()
        out["criteria"] = {"min_score": MIN_SCORE, "chance_ratio": CHANCE_RATIO, "control_ratio": CONTROL_RATIO}
        out["patterns"] = {p.name: p.describe() for p in self.head_patterns}
        out.update(self.meta)
        if self.by_template:
            out["iteration_score_spread"] = grid(s["iteration_score_spread"])
            out["iteration_score_by_template"] = [grid(t["iteration_score"]) for t in self.by_template]
            out["detected_by_template"] = [
                [[bool(v) for v in row] for row in DetectionResult(self.model, self.task, t, {}).detected()] for t in self.by_template
            ]
            out["templates_passed"] = [[int(v) for v in row] for row in self.templates_passed()]
        if self.competence:
            from .competence import to_json

            out.update(to_json(self.competence))
        if self.ablation is not None:
            out["ablation"] = self.ablation
        if self.patch is not None:
            out["patch"] = self.patch
        if self.gating is not None:
            out["gating"] = self.gating
        return out

    def circuit(self) -> dict[str, Any]:
        """The circuit formed, named (detect.circuits): the paper's iteration head or what formed instead."""
        from .circuits import name_circuit

        return name_circuit(self)

    def _pattern_columns(self) -> list[HeadPattern]:
        return [p for p in self.head_patterns if p.plot and p.name not in ("iteration", "eoi")]

    def table(self, k: int = 10) -> str:
        """The ranked table the CLI prints (layers and heads 0-based)."""
        s = self.scores
        extra = self._pattern_columns()
        labels = [(p.column or p.name)[:7] for p in extra]
        lines = [
            (
                f"iteration heads of {self.model} on {self.task} ({self.meta.get('rendering')} rendering, "
                f"{self.meta.get('n')} probes, lengths {self.meta.get('lengths_spec')}, "
                f"{self.meta.get('capture', 'eager')} capture); layers/heads 0-based"
            ),
            (
                f"{'rank':>4} {'layer':>5} {'head':>4} {'kv':>3} {'iter':>6} {'peak':>6} {'ent':>6} {'x_t-1':>6} {'x_t+1':>6} "
                f"{'chance':>6} {'eoi':>6} "
            ) + "".join(f"{c:>8}" for c in labels) + "  detected" + self._extra_header(),
        ]
        for rank, row in enumerate(self.top_heads(k), 1):
            l, h = row["layer"], row["head"]
            lines.append(
                f"{rank:>4} {l:>5} {h:>4} {row['kv_group']:>3} {row['score']:>6.3f} {row['peakiness']:>6.3f} {row['entropy']:>6.3f} "
                f"{row['prev_score']:>6.3f} {row['next_score']:>6.3f} {row['baseline']:>6.3f} {s['eoi_score'][l, h]:>6.3f} "
                + "".join(f"{s[p.key('score')][l, h]:>8.3f}" for p in extra)
                + f"  {'yes' if row['detected'] else '-'}{self._extra_cells(row)}"
            )
        best = self.top_heads(1, key="eoi_score")[0]
        lines.append(
            f"best EoI head: layer {best['layer']} head {best['head']} eoi {best['score']:.3f} "
            f"(chance {best['baseline']:.3f}){' detected' if best['detected'] else ''}"
        )
        for p in extra:
            if p.baseline:
                b = self.top_heads(1, key=p.key("score"))[0]
                lines.append(
                    f"best {p.name} head: layer {b['layer']} head {b['head']} score {b['score']:.3f} "
                    f"(chance {b['baseline']:.3f}){' detected' if b['detected'] else ''}"
                )
        lines.append(f"circuit: {self.circuit()['text']}")
        if self.meta.get("capture_note"):
            lines.append(f"note: {self.meta['capture_note']}")
        lines.extend(self._competence_lines())
        if self.ablation:
            lines.extend(_ablation_lines(self.ablation))
        if self.patch:
            from .patching import patch_lines

            lines.extend(patch_lines(self.patch))
        return "\n".join(lines)

    def _extra_header(self) -> str:
        head = f" {'right':>6} {'wrong':>6}" if self.competence else ""
        return head + (f" {'spread':>6} {'pass':>5}" if self.by_template else "")

    def _extra_cells(self, row: dict[str, Any]) -> str:
        def cell(v: float | None) -> str:
            return f" {'n/a':>6}" if v is None else f" {v:>6.3f}"

        out = " " * (8 - (3 if row["detected"] else 1))
        if self.competence:
            out += cell(row["score_correct"]) + cell(row["score_wrong"])
        if self.by_template:
            out += f" {row['spread']:>6.3f} {row['templates_passed']:>2}/{len(self.by_template):<2}"
        return out.rstrip() if out.strip() else ""

    def _competence_lines(self) -> list[str]:
        """Clean accuracy per length next to chance; what right/wrong and spread mean."""
        out = []
        if self.by_template:
            out.append(f"spread: max - min iteration score over {len(self.by_template)} templates; pass: templates it is detected under")
        if not self.competence:
            return out
        c, n = self.competence["clean_accuracy"], self.competence["counts"]["iteration"]
        per = " ".join(f"L{L}:{a:.2f}" for L, a in c["per_length"].items())
        out.append(
            f"right/wrong: iteration score where the model's own greedy s_t is right ({n['correct']} steps) / wrong "
            f"({n['wrong']} steps)"
        )
        out.append(
            f"clean accuracy on the probes: {c['token_accuracy']:.3f} (chance {c['chance_token_accuracy']:.3f}) per length {per}"
            + (f"; {c['note']}" if c["at_chance"] else "")
        )
        return out


def _ablation_lines(ab: dict) -> list[str]:
    clean = ab["clean"]
    out = [
        f"ablation of {', '.join(f'L{l}H{h}' for l, h in ab['heads'])}: clean token acc {clean['token_accuracy']:.3f} "
        f"chain acc {clean['sequence_accuracy']:.3f} log-prob {clean['log_prob']:.3f} (chance acc {clean['chance_token_accuracy']:.3f})"
    ]
    for key in ("note", "control_note"):
        if ab.get(key):
            out.append(f"  note: {ab[key]}")
    for mode in ("zero", "mean"):
        if mode in ab:
            top, rnd = ab[mode]["top"], ab[mode]["random_mean"]
            line = (f"  {mode:>4}-ablate found: token acc {top['token_accuracy']:.3f} chain {top['sequence_accuracy']:.3f} "
                    f"log-prob {top['log_prob']:.3f}")
            same = ab[mode].get("matched")
            if same:
                line += f" | same-layer random: token acc {same['token_accuracy']:.3f} log-prob {same['log_prob']:.3f}"
            if rnd:
                line += (f" | {len(ab[mode]['random'])} random draws: token acc {rnd['token_accuracy']:.3f} "
                         f"chain {rnd['sequence_accuracy']:.3f} log-prob {rnd['log_prob']:.3f}")
            out.append(line)
    return out


# --- the detector ----------------------------------------------------------------------------------------


@torch.no_grad()
def check_causal(model, name: str) -> None:
    """Refuse a model whose earlier positions see later tokens (e.g. BERT loaded as a bidirectional
    ``BertLMHeadModel``): the iteration head is a causal mechanism, and scores would mean nothing."""
    vocab = int(model.get_input_embeddings().num_embeddings)
    device = next(model.parameters()).device
    ids = (torch.arange(3, 11, device=device) % vocab)[None]
    changed = ids.clone()
    changed[0, 4:] = (changed[0, 4:] + 1) % vocab  # the later half changes; a causal model's first half cannot see it
    a, b = (model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, :4].float() for x in (ids, changed))
    dtype = next(model.parameters()).dtype
    noise = 64 * torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps * (1 + a.abs().max())
    if (a - b).abs().max() > noise:
        raise IterHeadsError(f"{name!r} is not a causal LM: its predictions at earlier positions change with a later "
                             "token (a bidirectional encoder?); the detector needs a decoder-only causal LM")


class IterationHeadDetector:
    """Detector bound to one model and tokenizer: ``detector.detect(task=..., lengths=...)``.

    ``model`` is a loaded causal LM, a local path, a packaged checkpoint's short name or a Hub repo id
    (loaded with ``revision``, ``dtype``, ``device``/``device_map``; ``trust_remote_code`` stays off unless asked).
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        revision: str | None = None,
        dtype: str = "float32",
        device: str | None = "cpu",
        device_map=None,
        trust_remote_code: bool = False,
    ) -> None:
        if isinstance(model, (str, os.PathLike)):
            self.name = str(model)
            self.model, loaded_tok = load_model(str(model), revision, dtype, device, device_map, trust_remote_code)
            tokenizer = tokenizer or loaded_tok
        else:
            self.model = model
            self.name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "") or type(model).__name__
            if tokenizer is None:
                raise IterHeadsError("pass the tokenizer together with a loaded model")
        self.tokenizer = tokenizer
        self.revision = revision
        self.model.eval()
        check_causal(self.model, self.name)

    def probes(
        self, task="parity", lengths="4-16", n=64, seed=0, rendering="auto", template=None, multi_token="first", shots=0, chat=False
    ) -> Probes:
        probes = make_probes(self.tokenizer, task, lengths, n, seed, rendering, template, multi_token, shots, chat)
        limit = context_length(self.model)
        if limit is not None and probes.max_tokens > limit:
            raise IterHeadsError(
                f"the longest probe has {probes.max_tokens} tokens but the model's context is {limit}; use shorter --lengths"
                + (" or fewer --shots" if probes.shots else "")
            )
        vocab = getattr(getattr(self.model, "get_input_embeddings", lambda: None)(), "num_embeddings", None)
        if vocab is not None and int(probes.input_ids.max()) >= vocab:
            raise IterHeadsError(f"the tokenizer produces ids up to {int(probes.input_ids.max())} but the model has {vocab} embeddings")
        return probes

    def detect(
        self,
        task: str = "parity",
        lengths="4-16",
        n: int = 64,
        *,
        seed: int = 0,
        rendering: str = "auto",
        template: str | list[str] | None = None,
        multi_token: str = "first",
        batch_size: int = 16,
        ablate: bool = False,
        top_k: int = 1,
        n_random: int = 3,
        shots: int = 0,
        chat: bool = False,
        competence: bool = True,
        patterns: list[HeadPattern | str] | None = None,
        capture: str = "auto",
        patch: bool = False,
    ) -> DetectionResult:
        """Probe, score every head on every pattern, and optionally ablate (``ablate``) and patch (``patch``) the top-k.

        With several templates, scores are their mean and ``by_template`` keeps each. ``shots`` worked examples
        precede each probe, ``chat`` uses the tokenizer's chat template, and ``competence`` (one more forward pass)
        splits scores by the model's own right/wrong ``s_t``.
        """
        task_obj = get_task(task)
        if int(top_k) < 1:
            raise IterHeadsError(f"--top-k must be at least 1, got {top_k}")
        total = len(find_attention_modules(self.model)) * head_counts(self.model)[0]
        if (ablate or patch) and int(top_k) > total:
            raise IterHeadsError(f"--top-k {top_k}: the model has {total} attention head(s) in all; use at most {total} "
                                 f"(at most {total - 1} to keep other heads for the random control)")
        templates = _templates(template)
        patterns = resolve_patterns(patterns)
        sets = [self.probes(task_obj, lengths, n, seed, rendering, t, multi_token, shots, chat) for t in templates]
        per_template = [score_heads(self.model, p, batch_size, patterns, capture) for p in sets]
        scores = per_template[0] if len(sets) == 1 else _mean_over_templates(per_template)
        probes = concat_probes(sets)
        comp = None
        if competence:
            from .competence import competence_scores, pool

            comp = pool([competence_scores(self.model, p, batch_size) for p in sets], sets)
        meta = {
            "capture": scores.pop("capture"),
            "capture_note": scores.pop("capture_note"),
            "revision": self.revision,
            "rendering": probes.rendering,
            "template": probes.template,
            "templates": [p.template for p in sets],
            "shots": int(probes.shots),
            "chat": bool(probes.chat),
            "lengths": parse_lengths(lengths),
            "lengths_spec": lengths if isinstance(lengths, str) else ",".join(map(str, parse_lengths(lengths))),
            "n": len(sets[0]),
            "seed": int(seed),
            "bos": bool(probes.bos),
            "multi_token_values": bool(probes.multi_token),
            "max_probe_tokens": probes.max_tokens,
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "device": str(next(self.model.parameters()).device),
            "example_probe": probes.texts[0] if probes.texts else None,
            "informative_share": round(float(probes.informative[probes.x_pos.numpy() >= 0].mean()), 6),
        }
        result = DetectionResult(self.name, task_obj.name, scores, meta, competence=comp,
                                 by_template=per_template if len(sets) > 1 else None, patterns=patterns)
        heads = [(r["layer"], r["head"]) for r in result.top_heads(int(top_k))]
        top = result.top_heads(1)[0]
        if top["detected"]:  # a flagged iteration head: does it look x_t up in every (x_t, s_(t-1)) cell?
            from .gating import describe_gating, iteration_cells

            cells = iteration_cells(self.model, probes, top["layer"], top["head"], batch_size, meta["capture"])
            result.gating = {"layer": top["layer"], "head": top["head"], **describe_gating(cells), "cells": cells}
        if ablate:
            from .ablation import run_ablation
            from .competence import CANNOT, at_chance

            result.ablation = run_ablation(self.model, probes, heads, seed, batch_size, n_random)
            if int(top_k) == total:
                result.ablation["control_note"] = NO_CONTROL
            clean = result.ablation["clean"]
            if at_chance(clean["token_accuracy"], clean["chance_token_accuracy"], int((probes.pred_pos >= 0).sum())):
                result.ablation["note"] = CANNOT
        if patch:
            from .patching import run_patching

            eoi = result.top_heads(1, key="eoi_score")[0]
            result.patch = run_patching(self.model, probes, heads, seed, batch_size, contrast=(eoi["layer"], eoi["head"]))
        # the best head's attention map on one probe (the shortest of the longest length, readable)
        layer, head = result.ranked()[0]
        index = int(np.argmax(probes.lengths))
        result.pattern = attention_pattern(self.model, probes, index, layer, head, meta["capture"])
        ids = probes.input_ids[index, : int(probes.seq_lens[index])].tolist()
        result.pattern_tokens = [str(t) for t in self.tokenizer.convert_ids_to_tokens(ids)]
        result.pattern_marks = {
            "layer": layer,
            "head": head,
            "x_pos": probes.x_pos[index][probes.x_pos[index] >= 0].tolist(),
            "pred_pos": probes.pred_pos[index][probes.pred_pos[index] >= 0].tolist(),
        }
        return result


def _templates(template: str | Sequence[str] | None) -> list[str | None]:
    """One entry per rendering: ``None`` (the default), a template, or several (``--template`` repeated)."""
    if template is None or isinstance(template, str):
        return [template]
    out = list(template)
    if not out or not all(isinstance(t, str) for t in out):
        raise IterHeadsError("template must be a string or a non-empty list of strings")
    if len(set(out)) != len(out):
        raise IterHeadsError("the same --template is given twice")
    return out


def _mean_over_templates(per: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of every float score over templates (same chains, so the same counts), plus the iteration spread."""
    out = {}
    for key, value in per[0].items():
        floats = isinstance(value, np.ndarray) and value.dtype.kind == "f"
        out[key] = np.mean([p[key] for p in per], axis=0) if floats else value
    its = np.stack([p["iteration_score"] for p in per])
    out["iteration_score_spread"] = its.max(0) - its.min(0)
    return out


def detect_iteration_heads(model, tokenizer=None, task: str = "parity", lengths="4-16", n: int = 64, **kwargs) -> DetectionResult:
    """One call: load (if given a name), probe, score, optionally ablate (``ablate=True``).

    Loading keywords (``revision``, ``dtype``, ``device``, ``device_map``, ``trust_remote_code``) go to the
    loader; the rest (``seed``, ``rendering``, ``template`` (one or a list), ``shots``, ``chat``, ``batch_size``,
    ``ablate``, ``top_k``, ``competence`` ...) to :meth:`IterationHeadDetector.detect`.
    """
    load_keys = ("revision", "dtype", "device", "device_map", "trust_remote_code")
    load = {k: kwargs.pop(k) for k in load_keys if k in kwargs}
    return IterationHeadDetector(model, tokenizer, **load).detect(task, lengths, n, **kwargs)


# --- output ----------------------------------------------------------------------------------------------


def write_outputs(result: DetectionResult, output_dir: str | Path) -> list[str]:
    """scores.json, heads.png and best_head_attention.png, written to a temp folder then moved in place."""
    output_dir = Path(output_dir)
    parent = output_dir.parent if str(output_dir.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=parent))
    try:
        (tmp / "scores.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        from .html import write_report  # report.html: self-contained, no matplotlib needed

        write_report(result, tmp / "report.html")
        try:
            from . import plots as plots_heads

            plots_heads.plot_scores(result.to_dict(), tmp / "heads.png")
            m = result.pattern_marks
            plots_heads.plot_attention(
                result.pattern, result.pattern_tokens, tmp / "best_head_attention.png",
                title=f"{result.model}: layer {m['layer']} head {m['head']} on one {result.task} probe\n"
                      f"circuit: {result.circuit()['label']}",
                queries=m["pred_pos"], keys=m["x_pos"],
            )
        except ImportError as err:
            notes.append(f"matplotlib is not installed ({err.name}): skipped heads.png and best_head_attention.png "
                         "(pip install 'hf-iterheads[plots]')")
        output_dir.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, output_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return notes


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "detect",
        help="score every attention head of a causal LM as an iteration head (and ablate the best)",
        description="Find iteration heads in any causal LM (a local folder, a packaged checkpoint or a Hub repo id).",
    )
    p.add_argument("model", help="model folder, packaged checkpoint name, or Hub repo id (ORG/NAME)")
    p.add_argument("--task", default="parity", help="task to probe (default parity)")
    p.add_argument("--lengths", default="4-16", help="chain lengths, e.g. 4-16 (default), 8 or 4,8,12")
    p.add_argument("--n", type=int, default=64, help="number of probes (default 64)")
    p.add_argument("--rendering", choices=("auto", "native", "text"), default="auto", help="native layout or text (default: auto)")
    p.add_argument(
        "--template", action="append", default=None,
        help='text template, e.g. "{inputs} -> {states}"; {inputs:SEP} joins values with SEP; repeat it to score '
        "each head under several wordings (mean and spread)",
    )
    p.add_argument("--shots", type=int, default=0, help="worked examples of the task before each probe (text rendering; default 0)")
    p.add_argument("--chat", action="store_true", help="wrap the examples and the probe in the tokenizer's chat template")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="weights dtype (default float32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, auto (default cpu)")
    p.add_argument("--device-map", default=None, help="passed to from_pretrained (e.g. auto: needs accelerate)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the repo's own modeling code (off by default)")
    p.add_argument("--ablate", action="store_true", help="zero- and mean-ablate the top-k heads vs k random heads")
    p.add_argument("--patch", action="store_true", help="counterfactual patching: share of the logit difference each top-k head moves")
    p.add_argument("--top-k", type=int, default=1, help="heads to ablate / patch (default 1)")
    p.add_argument("--pattern", action="append", default=[], metavar="MODULE:ATTR",
                   help="score an extra head pattern (a HeadPattern, or a list of them); repeatable")
    p.add_argument("--capture", choices=CAPTURES, default="auto",
                   help="rows: fast attention, probabilities for the probe rows only; eager: each model's eager attention; "
                   "auto (default): rows, eager where rows cannot work")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--output-dir", required=True,
                   help="folder for scores.json, report.html, heads.png, best_head_attention.png (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --output-dir")
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    get_task(args.task)  # fail before loading anything
    parse_lengths(args.lengths)
    if args.n < 1 or args.batch_size < 1 or args.top_k < 1:
        raise IterHeadsError("--n, --batch-size and --top-k must be at least 1")
    if args.shots < 0:
        raise IterHeadsError(f"--shots must be 0 or more, got {args.shots}")
    out = check_output_dir(args.output_dir, args.overwrite, "--output-dir")
    from .patterns import load_pattern_spec

    extra = [p for spec in args.pattern for p in load_pattern_spec(spec)]
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # errors stay one line; the table is the output
    result = detect_iteration_heads(
        args.model, None, args.task, args.lengths, args.n,
        revision=args.revision, dtype=args.dtype, device=args.device, device_map=args.device_map,
        trust_remote_code=args.trust_remote_code, seed=args.seed, rendering=args.rendering,
        template=args.template, batch_size=args.batch_size, ablate=args.ablate, top_k=args.top_k,
        shots=args.shots, chat=args.chat, patterns=extra or None, capture=args.capture, patch=args.patch,
    )
    if result.meta.get("capture_note"):
        print(f"note: {result.meta['capture_note']}", file=sys.stderr)
    for note in write_outputs(result, out):
        print(note, file=sys.stderr)
    print(result.table())
    print("wrote " + ", ".join(str(out / name) for name in sorted(os.listdir(out))))
    return 0
