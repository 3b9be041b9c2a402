"""The detector bound to one model: probe, score every head, follow the best one up (gating, ablation, patching).

Scores are also split by whether the model's own greedy ``s_t`` is right (:mod:`.competence`), so a readout on a
model that cannot do the task says so; with several templates the tables are means and ``by_template`` keeps each.
By default the probes run in rounds until every verdict is settled (:mod:`.sequential`); ``n`` is the maximum
and ``full_n=True`` runs them all.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import IterHeadsError
from ..tasks import get_task
from .attention import find_attention_modules, head_counts
from .criteria import NO_CONTROL
from .loading import check_causal, context_length, load_model
from .patterns import HeadPattern, resolve_patterns
from .probes import Probes, concat_probes, make_probes, parse_lengths, select_probes
from .result import DetectionResult
from .scoring import attention_pattern, score_sets
from .sequential import Sequential


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
            if not (hasattr(model, "config") and hasattr(model, "forward") and callable(getattr(model, "eval", None))):
                raise IterHeadsError(f"the detector needs a transformers causal LM (e.g. AutoModelForCausalLM."
                                     f"from_pretrained(...)) or its name, got a {type(model).__name__}")
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
        full_n: bool = False,
        sequential: Sequential | None = None,
        prefix_cache: bool = True,
    ) -> DetectionResult:
        """Probe, score every head on every pattern, and optionally ablate (``ablate``) and patch (``patch``) the top-k.

        With several templates, scores are their mean and ``by_template`` keeps each. ``shots`` worked examples
        precede each probe, ``chat`` uses the tokenizer's chat template, and ``competence`` (one more forward pass)
        splits scores by the model's own right/wrong ``s_t``. ``n`` is the most probes per template: fewer run once
        every verdict is settled, unless ``full_n``; everything after the scores uses the probes that ran.
        """
        task_obj = get_task(task)
        self._check_top_k(int(top_k), ablate or patch)
        patterns = resolve_patterns(patterns)
        sets = [self.probes(task_obj, lengths, n, seed, rendering, t, multi_token, shots, chat) for t in _templates(template)]
        rule = None if full_n else (sequential or Sequential())
        per_template = score_sets(self.model, sets, batch_size, patterns, capture, sequential=rule, prefix_cache=prefix_cache)
        scores = per_template[0] if len(sets) == 1 else _mean_over_templates(per_template)
        sets = [select_probes(p, s["probes_run"]) for p, s in zip(sets, per_template)]
        probes = concat_probes(sets)
        comp = None
        if competence:
            from .competence import competence_scores, pool

            comp = pool([competence_scores(self.model, p, batch_size) for p in sets], sets)
        meta = self._meta(scores, probes, sets, lengths, n, seed, rule)
        result = DetectionResult(self.name, task_obj.name, scores, meta, competence=comp,
                                 by_template=per_template if len(sets) > 1 else None, patterns=patterns)
        self._follow_up(result, probes, int(top_k), seed, batch_size, n_random, ablate, patch)
        self._picture(result, probes)
        return result

    def _check_top_k(self, top_k: int, heads_needed: bool) -> None:
        if top_k < 1:
            raise IterHeadsError(f"--top-k must be at least 1, got {top_k}")
        total = len(find_attention_modules(self.model)) * head_counts(self.model)[0]
        if heads_needed and top_k > total:
            raise IterHeadsError(f"--top-k {top_k}: the model has {total} attention head(s) in all; use at most {total} "
                                 f"(at most {total - 1} to keep other heads for the random control)")

    def _meta(self, scores: dict, probes: Probes, sets: list[Probes], lengths, n: int, seed: int, rule) -> dict[str, Any]:
        """Everything needed to reproduce the scores (scores.json beside the tables)."""
        param = next(self.model.parameters())
        return {
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
            "n_max": int(n),
            "sequential": rule is not None,
            "prefix_tokens": int(scores.pop("prefix_tokens", 0)),
            "seed": int(seed),
            "bos": bool(probes.bos),
            "multi_token_values": bool(probes.multi_token),
            "max_probe_tokens": probes.max_tokens,
            "dtype": str(param.dtype).replace("torch.", ""),
            "device": str(param.device),
            "example_probe": probes.texts[0] if probes.texts else None,
            "informative_share": round(float(probes.informative[probes.x_pos.numpy() >= 0].mean()), 6),
        }

    def _follow_up(self, result: DetectionResult, probes: Probes, top_k: int, seed: int, batch_size: int, n_random: int,
                   ablate: bool, patch: bool) -> None:
        """Gating cells of a flagged top head; ablation and patching of the top-k when asked."""
        heads = [(r["layer"], r["head"]) for r in result.top_heads(top_k)]
        top = result.top_heads(1)[0]
        if top["detected"]:  # a flagged iteration head: does it look x_t up in every (x_t, s_(t-1)) cell?
            from .gating import describe_gating, iteration_cells

            cells = iteration_cells(self.model, probes, top["layer"], top["head"], batch_size, result.meta["capture"])
            result.gating = {"layer": top["layer"], "head": top["head"], **describe_gating(cells), "cells": cells}
        if ablate:
            from .ablation import run_ablation
            from .competence import CANNOT, at_chance

            result.ablation = run_ablation(self.model, probes, heads, seed, batch_size, n_random)
            if top_k == len(find_attention_modules(self.model)) * head_counts(self.model)[0]:
                result.ablation["control_note"] = NO_CONTROL
            clean = result.ablation["clean"]
            if at_chance(clean["token_accuracy"], clean["chance_token_accuracy"], int((probes.pred_pos >= 0).sum())):
                result.ablation["note"] = CANNOT
        if patch:
            from .patching import run_patching

            eoi = result.top_heads(1, key="eoi_score")[0]
            result.patch = run_patching(self.model, probes, heads, seed, batch_size, contrast=(eoi["layer"], eoi["head"]))

    def _picture(self, result: DetectionResult, probes: Probes) -> None:
        """The best head's attention map on one probe (the shortest of the longest length, readable)."""
        layer, head = result.ranked()[0]
        index = int(np.argmax(probes.lengths))
        result.pattern = attention_pattern(self.model, probes, index, layer, head, result.meta["capture"])
        ids = probes.input_ids[index, : int(probes.seq_lens[index])].tolist()
        result.pattern_tokens = [str(t) for t in self.tokenizer.convert_ids_to_tokens(ids)]
        result.pattern_marks = {
            "layer": layer,
            "head": head,
            "x_pos": probes.x_pos[index][probes.x_pos[index] >= 0].tolist(),
            "pred_pos": probes.pred_pos[index][probes.pred_pos[index] >= 0].tolist(),
        }


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
    """Mean of every float score over templates (same chains, so the same counts), plus the iteration spread.

    Each template settles its verdicts on its own: ``probes_used`` is the most any template used per head.
    """
    out = {}
    for key, value in per[0].items():
        floats = isinstance(value, np.ndarray) and value.dtype.kind == "f"
        out[key] = np.mean([p[key] for p in per], axis=0) if floats else value
    its = np.stack([p["iteration_score"] for p in per])
    out["iteration_score_spread"] = its.max(0) - its.min(0)
    out["probes_used"] = np.max([p["probes_used"] for p in per], axis=0)
    out["n_probes_run"] = max(p["n_probes_run"] for p in per)
    return out


def detect_iteration_heads(model, tokenizer=None, task: str = "parity", lengths="4-16", n: int = 64, **kwargs) -> DetectionResult:
    """One call: load (if given a name), probe, score, optionally ablate (``ablate=True``).

    Loading keywords (``revision``, ``dtype``, ``device``, ``device_map``, ``trust_remote_code``) go to the
    loader; the rest (``seed``, ``rendering``, ``template`` (one or a list), ``shots``, ``chat``, ``batch_size``,
    ``ablate``, ``top_k``, ``competence``, ``full_n`` ...) to :meth:`IterationHeadDetector.detect`.
    """
    load_keys = ("revision", "dtype", "device", "device_map", "trust_remote_code")
    load = {k: kwargs.pop(k) for k in load_keys if k in kwargs}
    return IterationHeadDetector(model, tokenizer, **load).detect(task, lengths, n, **kwargs)
