"""The detector's result: score tables, verdicts, the ranked table, and scores.json / report / pictures on disk."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IterHeadsError
from .criteria import CHANCE_RATIO, CONTROL_RATIO, MIN_SCORE
from .patterns import HeadPattern, registered_patterns


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
        if "probes_used" in s:  # how many probes each verdict used (sequential verdicts; the full n otherwise)
            out["probes_used"] = [[int(v) for v in row] for row in s["probes_used"]]
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
                f"{self.meta.get('n')} probes{self._of_max()}, lengths {self.meta.get('lengths_spec')}, "
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

    def _of_max(self) -> str:
        """' of at most N (verdicts settled)' when sequential verdicts stopped before the maximum."""
        n, n_max = self.meta.get("n"), self.meta.get("n_max")
        return f" of at most {n_max} (verdicts settled)" if self.meta.get("sequential") and n_max and n != n_max else ""

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
