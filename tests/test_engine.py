"""The detector engine: head patterns as data, row-sliced capture (= eager), entropy, counterfactual patching."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_iterheads.detect.ablation import run_ablation
from hf_iterheads.detect.detection import detect_iteration_heads, score_heads, write_outputs
from hf_iterheads.detect.patching import counterfactuals, patch_heads
from hf_iterheads.detect.patterns import HeadPattern, register_pattern, unregister_pattern
from hf_iterheads.detect.probes import make_probes
from hf_iterheads.detect.rows import RowCapture
from hf_iterheads.errors import IterHeadsError
from hf_iterheads.tasks import get_task
from hf_iterheads.tokenizer import build_tokenizer
from tests.test_detection import ARCHS, CLI_SCRIPT, text_tokenizer, tiny_model

WORKTREE = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def native_tok():
    return build_tokenizer()


def sink_pairs(probes, idx):
    """A pattern defined here, not in the package: the iteration queries -> the first token (an attention sink)."""
    q = probes.pred_pos[idx]
    return q, torch.where(q >= 0, 0, -1)


SINK = HeadPattern("sink", sink_pairs, "the position predicting s_t -> token 0", column="sink")


def test_a_registered_pattern_reaches_all_four_outputs(tmp_path, monkeypatch, native_tok):
    import matplotlib.axes

    register_pattern(SINK)
    try:
        result = detect_iteration_heads(tiny_model("llama_gqa"), native_tok, task="parity", lengths="4-6", n=6)
        titles: list[str] = []
        original = matplotlib.axes.Axes.set_title
        monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda ax, t, *a, **k: (titles.append(t), original(ax, t, *a, **k))[1])
        write_outputs(result, tmp_path / "out")
    finally:
        unregister_pattern("sink")
    d = json.loads((tmp_path / "out" / "scores.json").read_text())
    for key in ("sink_score", "sink_peakiness", "sink_entropy", "sink_baseline", "sink_detected"):
        assert np.asarray(d[key]).shape == (2, 4), key
    assert d["patterns"]["sink"]["keys"]["score"] == "sink_score"
    assert all("sink_score" in row for row in d["top_heads"])
    assert "sink" in result.table().splitlines()[1] and "best sink head" in result.table()
    assert "sink score" in titles
    # the original keys are all still there, unchanged in name
    for key in ("iteration_score", "peakiness", "iteration_all_score", "eoi_score", "eoi_peakiness", "prev_score",
                "next_score", "baseline", "eoi_baseline", "detected", "entropy", "eoi_entropy", "top_heads", "eoi_top_heads"):
        assert key in d, key
    assert "sink_score" not in detect_iteration_heads(tiny_model("gpt2"), native_tok, task="parity", lengths="4", n=2).scores


def test_pattern_checks():
    with pytest.raises(IterHeadsError, match="already registered"):
        register_pattern(HeadPattern("eoi", sink_pairs))
    with pytest.raises(IterHeadsError, match="lower-case"):
        register_pattern(HeadPattern("Bad Name", sink_pairs))
    with pytest.raises(IterHeadsError, match="overwrite"):
        register_pattern(HeadPattern("clash", sink_pairs, keys=(("score", "eoi_score"),)))
    with pytest.raises(IterHeadsError, match="unknown control"):
        register_pattern(HeadPattern("ctl", sink_pairs, controls=("nope",)))
    with pytest.raises(IterHeadsError, match="preset"):
        unregister_pattern("iteration")


def test_preset_pairs_point_where_they_say(native_tok):
    probes = make_probes(native_tok, "parity", "4", n=2)
    d = detect_iteration_heads(tiny_model("gpt2"), native_tok, task="parity", lengths="4", n=2)
    from hf_iterheads.detect.patterns import previous_token_pairs, state_pairs

    q, k = previous_token_pairs(probes, np.arange(2))
    assert (k[q >= 0] == q[q >= 0] - 1).all() and int(q.max()) == int(probes.seq_lens.max()) - 1
    q, k = state_pairs(probes, np.arange(2))  # native layout: s_(t-1) is the token predicting s_t
    assert (q[:, 0] == -1).all() and (q[:, 1:] == k[:, 1:]).all() and (k[:, 1:] == probes.state_pos[:, :-1]).all()
    assert {"previous_token_score", "state_score"} <= set(d.scores)


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_equal_eager_on_every_architecture(arch):
    """Row-sliced capture (sdpa output, probe rows only) gives eager's numbers: softcap, windows, scaling, GQA, padding."""
    model = tiny_model(arch)
    tok = text_tokenizer()
    probes = make_probes(tok, "polynomial", "4-9", 10, 0, "text")
    rows = score_heads(model, probes, 4, capture="rows")
    eager = score_heads(model, probes, 4, capture="eager")
    assert rows.pop("capture") == "rows" and eager.pop("capture") == "eager"
    rows.pop("capture_note"), eager.pop("capture_note")
    assert set(rows) == set(eager)
    for key in rows:
        np.testing.assert_allclose(np.asarray(rows[key], float), np.asarray(eager[key], float), atol=1e-5, err_msg=key)
    # the layer outputs are the model's own: logits unchanged under the row function
    batch = probes.batch(np.arange(len(probes)))
    with torch.no_grad():
        reference = model(**batch).logits
        with RowCapture(model, lambda *a: None) as capture:
            capture.rows = torch.tensor([1, 3])
            ours = model(**batch).logits
    keep = batch["attention_mask"].bool()
    np.testing.assert_allclose(ours[keep].numpy(), reference[keep].numpy(), atol=1e-5)


def test_fallback_to_eager_is_said(native_tok, monkeypatch):
    model = tiny_model("gpt2")
    original = model.set_attn_implementation

    def refuse(name):
        if name == "iterheads_rows":
            raise ValueError("no custom attention here")
        return original(name)

    monkeypatch.setattr(model, "set_attn_implementation", refuse)
    result = detect_iteration_heads(model, native_tok, task="parity", lengths="4-5", n=4)
    assert result.meta["capture"] == "eager" and "no custom attention here" in result.meta["capture_note"]
    assert "note: row-sliced capture unavailable" in result.table()
    with pytest.raises(IterHeadsError, match="row-sliced capture does not work"):
        detect_iteration_heads(model, native_tok, task="parity", lengths="4", n=2, capture="rows")


def test_entropy_of_uniform_attention_is_one(native_tok):
    model = tiny_model("gpt2")
    with torch.no_grad():  # q = k = 0 in every layer: each row is uniform over its visible keys
        for block in model.transformer.h:
            block.attn.c_attn.weight[:, :64] = 0
            block.attn.c_attn.bias[:64] = 0
    s = detect_iteration_heads(model, native_tok, task="parity", lengths="4-8", n=8).scores
    np.testing.assert_allclose(s["entropy"], 1.0, atol=1e-5)
    np.testing.assert_allclose(s["iteration_score"], s["baseline"], atol=1e-5)
    np.testing.assert_allclose(s["previous_token_entropy"], 1.0, atol=1e-5)  # its first query already sees 2 keys


# --- counterfactual patching ----------------------------------------------------------------------------


def test_counterfactuals_change_x_t_and_the_chain_after_it(native_tok):
    probes = make_probes(native_tok, "polynomial", "4-8", n=16)
    cf = counterfactuals(probes, seed=1)
    task = get_task("polynomial")
    vocab = {v: k for k, v in native_tok.get_vocab().items()}
    assert (cf["step"] >= 0).sum() >= 12
    for i in np.flatnonzero(cf["step"] >= 0):
        t, L = int(cf["step"][i]), int(probes.lengths[i])
        ids = cf["input_ids"][i]
        xs = np.array([int(vocab[int(ids[int(p)])]) for p in probes.x_pos[i, :L]])
        ss = np.array([int(vocab[int(ids[int(p)])]) for p in probes.state_pos[i, :L]])
        assert (xs != probes.inputs[i, :L]).sum() == 1 and xs[t] != probes.inputs[i, t]
        assert (ss == task.run(xs[None])[0]).all() and ss[t] != probes.states[i, t]
        assert cf["cf_token"][i] == int(ids[int(probes.state_pos[i, t])])


@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa"])
def test_patching_a_whole_one_layer_model_moves_everything(arch, native_tok):
    """One layer: the logits at the patched position depend on the patched attention output and its own token only."""
    model = tiny_model(arch, layers=1)
    probes = make_probes(native_tok, "parity", "4-6", n=8)
    out = patch_heads(model, probes, [[(0, h) for h in range(4)], [(0, 1)]], batch_size=3)
    assert out["n"] == 8 and out["shares"][0] == pytest.approx(1.0, abs=1e-4)
    assert out["shares"][1] != pytest.approx(1.0, abs=1e-3)


def test_bundled_iteration_head_carries_x_t_and_the_eoi_head_does_not():
    from hf_iterheads.detect.detection import IterationHeadDetector

    detector = IterationHeadDetector("polynomial-cot")
    probes = detector.probes("polynomial", "4-16", 32)
    out = patch_heads(detector.model, probes, [[(1, 0)], [(0, 0)]], batch_size=16)
    iteration, eoi = out["shares"]
    assert iteration >= 0.9 and abs(eoi) <= 0.1, out
    assert out["clean_logit_diff"] > 0 > out["counterfactual_logit_diff"]


def test_patching_refuses_values_split_into_tokens():
    probes = make_probes(text_tokenizer(split_digits=True), "polynomial", "4-6", n=8)
    assert probes.multi_token
    with pytest.raises(IterHeadsError, match="one token"):
        counterfactuals(probes)


def test_ablation_and_patching_controls_are_heads_of_the_same_layer(native_tok):
    model = tiny_model("qwen2")
    probes = make_probes(native_tok, "parity", "4-6", n=6)
    report = run_ablation(model, probes, [(1, 0)], seed=0, batch_size=4, n_random=2)
    for mode in ("zero", "mean"):
        same = report[mode]["matched"]
        assert same["heads"][0][0] == 1 and same["heads"][0] != [1, 0] and 0 <= same["token_accuracy"] <= 1
    result = detect_iteration_heads(model, native_tok, task="parity", lengths="4-6", n=6, patch=True, top_k=2)
    p = result.patch
    top = {(r["layer"], r["head"]) for r in p["heads"]}
    assert len(p["random"]) == 2 and all((r["layer"], r["head"]) not in top for r in p["random"])
    assert sorted(r["layer"] for r in p["random"]) == sorted(r["layer"] for r in p["heads"])
    assert {r["layer"] for r in p["layers"]} == {r["layer"] for r in p["heads"]} and p["seconds_per_head"] > 0
    assert "patching x_t" in result.table() and "patch" in result.to_dict()


# --- the CLI: --pattern module:attr, --patch, --capture -------------------------------------------------


def test_cli_pattern_patch_and_errors(tmp_path, native_tok):
    (tmp_path / "mypatterns.py").write_text(textwrap.dedent(
        """
        import torch
        from hf_iterheads import HeadPattern

        def _pairs(probes, idx):
            q = probes.pred_pos[idx]
            return q, torch.where(q >= 0, 0, -1)

        SINK = HeadPattern("sink", _pairs, "pred s_t -> token 0")
        NOT_A_PATTERN = 3
        """
    ))
    good = tmp_path / "good"
    tiny_model("gpt2").save_pretrained(good)
    native_tok.save_pretrained(good)
    out = tmp_path / "out"

    def d(*a: str) -> list[str]:
        return ["detect", str(good), "--n", "6", "--lengths", "4-5", *a]

    cases = [
        d("--pattern", "mypatterns:SINK", "--patch", "--output-dir", str(out / "ok")),
        d("--capture", "eager", "--output-dir", str(out / "eager")),
        d("--pattern", "nosuchmodule:X", "--output-dir", str(out / "bad1")),
        d("--pattern", "mypatterns:MISSING", "--output-dir", str(out / "bad2")),
        d("--pattern", "mypatterns:NOT_A_PATTERN", "--output-dir", str(out / "bad3")),
        d("--pattern", "mypatterns", "--output-dir", str(out / "bad4")),
    ]
    env = {**os.environ, "PYTHONPATH": str(WORKTREE), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", CLI_SCRIPT, json.dumps(cases)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert runs[0]["rc"] == 0, runs[0]["stderr"]
    scores = json.loads((out / "ok" / "scores.json").read_text())
    assert "sink_score" in scores and scores["capture"] == "rows" and "share" in scores["patch"]["heads"][0]  # n/a: random model
    assert "patching x_t" in runs[0]["stdout"] and "sink" in runs[0]["stdout"]
    assert runs[1]["rc"] == 0 and json.loads((out / "eager" / "scores.json").read_text())["capture"] == "eager"
    for run, needle in zip(runs[2:], ["cannot import", "no attribute", "expected a HeadPattern", "expected module:attr"]):
        lines = run["stderr"].strip().splitlines()
        assert run["rc"] == 2 and len(lines) == 1 and needle in lines[0], run["stderr"]
