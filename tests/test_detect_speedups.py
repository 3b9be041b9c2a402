"""The engine's speed-ups change no answer: shared-prefix caching, sequential verdicts, templates sharing
forwards and half precision.

Every architecture of the test zoo (GQA, sliding windows, softcapping, partial rotary) scores the same with the
shots computed once as with every probe run in full, and several templates scored together as each alone;
sequential verdicts equal the full-n ones on the bundled checkpoints, a planted head and models without one, with
scores within 0.02.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_iterheads.detect.detection import DetectionResult, detect_iteration_heads, score_heads
from hf_iterheads.detect.probes import make_probes, select_probes
from hf_iterheads.detect.runner import CaptureRun
from hf_iterheads.detect.scoring import score_sets
from hf_iterheads.detect.sequential import Sequential
from hf_iterheads.tokenizer import build_tokenizer
from tests.test_detection import ARCHS, plant_circuit, text_tokenizer, tiny_model

CHECKPOINTS = Path(__file__).resolve().parents[1] / "hf_iterheads" / "checkpoints"
SCORES = ("iteration_score", "eoi_score", "prev_score", "next_score", "baseline", "previous_token_score", "state_score")


def _floats(scores: dict) -> dict[str, np.ndarray]:
    return {k: v for k, v in scores.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f"}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("capture", ["rows", "eager"])
def test_shared_prefix_cache_equals_the_uncached_run(arch, capture):
    model, tok = tiny_model(arch), text_tokenizer()
    probes = make_probes(tok, "parity", "4-5", n=6, seed=0, shots=2)  # 2 shots = 20 shared tokens; window 6 / 10 slides
    cached = score_heads(model, probes, 4, capture=capture)
    plain = score_heads(model, probes, 4, capture=capture, prefix_cache=False)
    assert cached["prefix_tokens"] == int(probes.x_pos[:, 0].min()) > 10 and plain["prefix_tokens"] == 0
    assert cached["capture"] == capture
    for key, value in _floats(plain).items():
        np.testing.assert_allclose(cached[key], value, atol=1e-5, err_msg=key)


TEMPLATES = ("{inputs} -> {states}", "the answer is : {inputs} , {states}", "{inputs} : {states}")


def _forwards(monkeypatch) -> list[int]:
    """Counts the capture's forwards (batch sizes) while a test runs."""
    sizes: list[int] = []
    real = CaptureRun.forward

    def counted(self, input_ids, attention_mask, prefix=0, position_ids=None):
        sizes.append(int(input_ids.shape[0]))
        return real(self, input_ids, attention_mask, prefix, position_ids)

    monkeypatch.setattr(CaptureRun, "forward", counted)
    return sizes


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shots", [0, 2])
def test_templates_scored_together_equal_each_alone(arch, shots, monkeypatch):
    model, tok = tiny_model(arch), text_tokenizer()
    sets = [make_probes(tok, "parity", "4-6", n=20, seed=0, template=t, shots=shots) for t in TEMPLATES]
    sizes = _forwards(monkeypatch)
    alone = [score_heads(model, p, 8, sequential=True) for p in sets]
    n_alone = len(sizes)
    together = score_sets(model, sets, 8, sequential=True)
    n_together = len(sizes) - n_alone
    for a, b in zip(alone, together):
        assert a["n_probes_run"] == b["n_probes_run"] and a["prefix_tokens"] == b["prefix_tokens"]
        np.testing.assert_array_equal(a["probes_used"], b["probes_used"])
        for key, value in _floats(a).items():
            np.testing.assert_allclose(b[key], value, atol=1e-5, err_msg=key)
    if shots:  # each template's shots are its own prefix: nothing to share, the same forwards
        assert n_together == n_alone and together[0]["prefix_tokens"] > 10
    else:  # bare probes share their forwards: fewer, fuller batches
        assert n_together < n_alone


def test_sets_sharing_a_prefix_share_forwards(monkeypatch):
    """Two sets with the same shots (one cached prefix) run in shared forwards and score as each alone."""
    model, tok = tiny_model("llama_gqa", layers=3), text_tokenizer()
    whole = make_probes(tok, "parity", "4-6", n=48, seed=0, shots=2)
    sets = [select_probes(whole, np.arange(0, 48, 2)), select_probes(whole, np.arange(1, 48, 2))]
    rule = Sequential(min_probes=8, min_round=4)
    sizes = _forwards(monkeypatch)
    alone = [score_heads(model, p, 16, sequential=rule) for p in sets]
    n_alone = len(sizes)
    together = score_sets(model, sets, 16, sequential=rule)
    assert len(sizes) - n_alone < n_alone, sizes
    for x, y in zip(alone, together):
        assert x["prefix_tokens"] == y["prefix_tokens"] > 10
        np.testing.assert_array_equal(x["probes_used"], y["probes_used"])
        np.testing.assert_allclose(y["iteration_score"], x["iteration_score"], atol=1e-5)


def test_a_cached_prefix_deepens_when_a_forward_needs_more_layers():
    """A prefix cached for a shallow forward is recomputed, not reused short, for a deeper one."""
    model, tok = tiny_model("qwen2", layers=3), text_tokenizer()
    probes = make_probes(tok, "parity", "4", n=4, seed=0, shots=2)
    seen: dict[str, list] = {"cached": [], "plain": []}
    batch = probes.batch(np.arange(4))
    prefix = int(probes.x_pos[:, 0].min())
    for name, cached in (("cached", prefix), ("plain", 0)):
        with CaptureRun(model, "rows", lambda layer, m, w, rows=None, name=name: seen[name].append((layer, w)), 0) as run:
            run.rows = torch.arange(prefix, batch["input_ids"].shape[1]) - cached
            run.forward(batch["input_ids"], batch["attention_mask"], cached)  # caches the prefix for layer 0 only
            run.stop_after = 2
            run.forward(batch["input_ids"], batch["attention_mask"], cached)
    assert [layer for layer, _ in seen["cached"]] == [0, 0, 1, 2]
    for (_, w), (_, v) in zip(seen["cached"], seen["plain"]):
        torch.testing.assert_close(w, v, atol=1e-5, rtol=1e-4)


def _packed_forwards(monkeypatch) -> list[bool]:
    """For each capture forward while a test runs: were its probes packed end to end?"""
    seen: list[bool] = []
    real = CaptureRun.forward

    def spy(self, input_ids, attention_mask, prefix=0, position_ids=None):
        seen.append(position_ids is not None)
        return real(self, input_ids, attention_mask, prefix, position_ids)

    monkeypatch.setattr(CaptureRun, "forward", spy)
    return seen


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_probes_equal_padded_ones(arch, monkeypatch):
    model, tok = tiny_model(arch), text_tokenizer()
    probes = make_probes(tok, "parity", "4-9", n=24, seed=1)  # windows of 6 / 10 tokens slide inside each probe
    seen = _packed_forwards(monkeypatch)
    packed = score_heads(model, probes, 12, sequential=Sequential(min_probes=8, min_round=4))
    assert seen and all(seen)
    n = len(seen)
    padded = score_heads(model, probes, 12, sequential=Sequential(min_probes=8, min_round=4), pack=False)
    assert len(seen) > n and not any(seen[n:])
    np.testing.assert_array_equal(packed["probes_used"], padded["probes_used"])
    for key, value in _floats(padded).items():
        np.testing.assert_allclose(packed[key], value, atol=1e-5, err_msg=key)


def test_a_model_whose_mask_ignores_packing_is_padded_instead(monkeypatch):
    """If packed probes could see each other (a mask built without position ids), the check on the first packed
    forward finds attention across probes and the scores come from padded batches."""
    import transformers.masking_utils as masking

    model, tok = tiny_model("llama_gqa"), text_tokenizer()
    probes = make_probes(tok, "parity", "4-6", n=12, seed=0)
    padded = score_heads(model, probes, 12, pack=False)
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    seen = _packed_forwards(monkeypatch)
    fallback = score_heads(model, probes, 12)
    assert seen[0] and not any(seen[1:])
    for key, value in _floats(padded).items():
        np.testing.assert_allclose(fallback[key], value, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("sizes, n_rows", [([34] * 3 + [30] * 3 + [26] * 3 + [22] * 4 + [18] * 3, 4), ([5], 1),
                                           ([200, 3, 3], 2), (list(range(1, 40)), 7), ([122, 126, 130] * 5, 15)])
def test_pack_rows_places_every_probe_once_in_few_even_rows(sizes, n_rows):
    from hf_iterheads.detect.batching import PACK_TOKENS, pack_rows

    rows = pack_rows(sizes)
    assert sorted(i for r in rows for i in r) == list(range(len(sizes)))
    assert len(rows) == n_rows
    widths = [sum(sizes[i] for i in r) for r in rows]
    assert max(widths) <= max(PACK_TOKENS, max(sizes))  # a row never grows past the budget or one probe
    assert max(widths) * len(rows) - sum(sizes) <= max(sizes) * len(rows)  # filler: under one probe per row


def test_packed_rows_hold_each_probe_with_its_own_positions_and_no_pad_id():
    from hf_iterheads.detect.batching import packed_inputs

    tok = text_tokenizer()
    probes = make_probes(tok, "parity", "4-9", n=10, seed=2)
    lens = probes.seq_lens
    inputs, (where,), seq = packed_inputs([(probes, np.arange(10), lens)])
    row, start, _ = where
    for i in range(10):
        t = int(lens[i])
        assert inputs["input_ids"][row[i], start[i] : start[i] + t].tolist() == probes.input_ids[i, :t].tolist()
        assert inputs["position_ids"][row[i], start[i] : start[i] + t].tolist() == list(range(t))
        assert (seq[row[i], start[i] : start[i] + t] == seq[row[i], start[i]]).all()
    assert tok.pad_token_id not in inputs["input_ids"][:, [0, -1]]  # transformers would warn of padding


def test_shots_are_shared_and_never_a_probe():
    probes = make_probes(text_tokenizer(), "parity", "4", n=8, seed=3, shots=3)
    heads = {t.rsplit("\n", 1)[0] for t in probes.texts}
    assert len(heads) == 1  # one prefix for every probe
    shots = [line.split(" -> ")[0] for line in next(iter(heads)).strip().splitlines()]
    assert len(shots) == 3 and not set(shots) & {t.splitlines()[-1].split(" -> ")[0] for t in probes.texts}


def _verdicts(model, probes, **kwargs) -> tuple[dict, np.ndarray, np.ndarray]:
    s = score_heads(model, probes, 16, **kwargs)
    r = DetectionResult("m", probes.task, s, {})
    return s, r.detected(), r.eoi_detected()


def _same_verdicts(model, probes, **kwargs) -> dict:
    full, det_full, eoi_full = _verdicts(model, probes, **kwargs)
    seq, det_seq, eoi_seq = _verdicts(model, probes, sequential=Sequential(), **kwargs)
    assert (det_seq == det_full).all() and (eoi_seq == eoi_full).all()
    for key in SCORES:
        assert np.abs(seq[key] - full[key]).max() <= 0.02, key
    assert full["n_probes_run"] == len(probes) and (full["probes_used"] == len(probes)).all()
    assert seq["probes_used"].max() <= seq["n_probes_run"] <= len(probes)
    return seq


@pytest.mark.parametrize("name, task", [("parity-cot", "parity"), ("polynomial-cot", "polynomial"), ("polynomial-nocot", "polynomial")])
def test_sequential_verdicts_equal_full_n_on_bundled_checkpoints(name, task):
    path = CHECKPOINTS / name
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    _same_verdicts(model, make_probes(AutoTokenizer.from_pretrained(path), task, "4-16", n=64, seed=0))


def test_sequential_verdicts_equal_full_n_on_a_planted_head(monkeypatch):
    model = plant_circuit(monkeypatch)
    seq = _same_verdicts(model, make_probes(build_tokenizer(), "parity", "4-12", n=64, seed=0), capture="eager")
    assert seq["n_probes_run"] < 64  # a one-hot head is settled at once


@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa", "gemma2"])
def test_sequential_verdicts_equal_full_n_without_a_head(arch):
    seq = _same_verdicts(tiny_model(arch, init=0.02), make_probes(build_tokenizer(), "parity", "4-16", n=64, seed=1))
    assert seq["n_probes_run"] < 64


def test_settled_deep_layers_stop_running_and_keep_their_scores(monkeypatch):
    """Once the deepest layers' verdicts are settled, later rounds stop the forward below them: those layers'
    scores are exactly the full scores of the probes they saw, the layers still open see every round, and a
    later round runs what the open heads are estimated to need."""
    from hf_iterheads.detect import scoring
    from hf_iterheads.detect.probes import select_probes
    from hf_iterheads.detect.sequential import probe_order

    model, probes = tiny_model("gpt2", init=0.02), make_probes(build_tokenizer(), "parity", "4-16", n=48, seed=2)
    rounds = []

    def fake_needed(acc, patterns, ran, n_max, rule, lengths):
        rounds.append(len(ran))
        need = np.zeros(acc.shape)
        need[0] = 22 if len(rounds) == 1 else 0  # the last layer settles after the first round, layer 0 needs 6 more
        return need

    monkeypatch.setattr(scoring, "needed", fake_needed)
    seq = score_heads(model, probes, 16, sequential=Sequential(min_probes=16, min_round=4))
    assert rounds == [16, 24] and seq["n_probes_run"] == 24  # the second round: 6 probes, rounded up to 4s
    assert (seq["probes_used"][1] == 16).all() and (seq["probes_used"][0] == 24).all()
    order = probe_order(probes.lengths)
    first, both = (score_heads(model, select_probes(probes, order[:k]), 16) for k in (16, 24))
    for key in ("iteration_score", "eoi_score", "baseline"):
        np.testing.assert_allclose(seq[key][1], first[key][1], atol=1e-6)
        np.testing.assert_allclose(seq[key][0], both[key][0], atol=1e-6)


def test_scores_json_records_probes_per_verdict():
    result = detect_iteration_heads(tiny_model("gpt2", init=0.02), build_tokenizer(), "parity", "4-16", n=48, competence=False)
    d = result.to_dict()
    assert d["sequential"] and d["n_max"] == 48 and d["n"] < 48
    assert f"{d['n']} probes of at most 48 (verdicts settled)" in result.table()
    assert np.asarray(d["probes_used"]).shape == (2, 4) and max(map(max, d["probes_used"])) <= d["n"]
    full = detect_iteration_heads(tiny_model("gpt2", init=0.02), build_tokenizer(), "parity", "4-16", n=48, competence=False,
                                  full_n=True).to_dict()
    assert not full["sequential"] and full["n"] == 48 and full["probes_used"] == [[48] * 4] * 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_scores_match_float32(dtype):
    path = CHECKPOINTS / "parity-cot"
    probes = make_probes(AutoTokenizer.from_pretrained(path), "parity", "4-16", n=32, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    full, det, eoi = _verdicts(model, probes)
    half, det_h, eoi_h = _verdicts(model.to(dtype), probes)
    assert det.any() and (det_h == det).all() and (eoi_h == eoi).all()
    for key in SCORES:
        assert np.abs(half[key] - full[key]).max() <= 0.02, key


def test_fast_dtype_is_native_half_precision_or_float32():
    from hf_iterheads.detect.loading import _cpu_has_amx, fast_dtype, load_model

    model, _ = load_model(str(CHECKPOINTS / "parity-cot"), dtype="fast")
    amx = _cpu_has_amx()
    assert next(model.parameters()).dtype == fast_dtype("cpu") == (torch.bfloat16 if amx else torch.float32)


@pytest.mark.parametrize("need, n, want", [([20.0, 0.0], 16, 4), ([23.0, 0.0], 16, 8), ([200.0, 0.0], 16, 16),
                                           ([np.inf, 0.0], 16, 16), ([16.5, 0.0], 16, 4)])
def test_next_round_runs_what_the_open_heads_need(need, n, want):
    from hf_iterheads.detect.sequential import next_round

    need = np.array([need])
    assert next_round(need, need <= n, n, Sequential(min_round=4), 16) == want
