"""Competence-aware scores, several templates, few-shot and chat renderings, and the bundled checkpoints' scores.

The right/wrong split is checked against an independent computation (output_attentions + logits), and against
the unsplit score that ``score_heads`` computes on its own: the two halves must add back up to it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_iterheads.circuit import eager_attentions, mass_on
from hf_iterheads.detect.ablation import teacher_forced_metrics
from hf_iterheads.detect.competence import CANNOT, at_chance, competence_scores
from hf_iterheads.detect.detection import detect_iteration_heads, score_heads
from hf_iterheads.detect.probes import make_probes
from hf_iterheads.errors import IterHeadsError
from hf_iterheads.tokenizer import build_tokenizer
from tests.test_detection import CLI_SCRIPT, planted_gpt2, text_tokenizer, tiny_model  # noqa: F401  (fixture)
from tests.test_probes import _check_positions
from tests.test_real_tokenizers import ROOT as REAL_TOKENIZERS
from tests.test_real_tokenizers import tiny_model_for


@pytest.fixture(scope="module")
def native_tok():
    return build_tokenizer()


def test_split_matches_an_independent_computation():
    tok, model = text_tokenizer(), tiny_model("qwen2", seed=1)
    probes = make_probes(tok, "parity", "4-7", n=12, seed=0)
    comp = competence_scores(model, probes, batch_size=5)
    with torch.no_grad():  # reference: every pattern kept, greedy predictions from the full logits
        idx = np.arange(len(probes))
        atts = eager_attentions(model, **probes.batch(idx))
        logits = model(**probes.batch(idx)).logits
    pred, target = probes.pred_pos, probes.target_ids
    hit = (logits.argmax(-1).gather(1, pred.clamp(min=0)) == target) & (pred >= 0)
    assert (torch.from_numpy(comp["hits"]) == hit).all() and 0 < int(hit.sum()) < int((pred >= 0).sum())
    q, k = probes.pairs(idx)["iteration"]
    for outcome, sel in (("correct", hit), ("wrong", ~hit)):
        want = []
        for a in atts:
            m, valid = mass_on(a, q, k)
            s = (valid & sel)[:, None, :]
            want.append(((m * s).sum((0, 2)) / s.sum()).numpy())
        np.testing.assert_allclose(comp["scores"][f"iteration_score_{outcome}"], np.stack(want), atol=1e-5)
    q, k = probes.pairs(idx)["eoi"]  # s_t -> EoI, split by the prediction made at s_t (of s_(t+1))
    nxt = torch.cat([hit[:, 1:], torch.zeros_like(hit[:, :1])], 1)
    has_next = torch.cat([pred[:, 1:] >= 0, torch.zeros_like(hit[:, :1])], 1)
    for outcome, sel in (("correct", nxt & has_next), ("wrong", ~nxt & has_next)):
        want = []
        for a in atts:
            m, valid = mass_on(a, q, k)
            s = (valid & sel)[:, None, :]
            want.append(((m * s).sum((0, 2)) / s.sum()).numpy())
        np.testing.assert_allclose(comp["scores"][f"eoi_score_{outcome}"], np.stack(want), atol=1e-5)
    n = comp["counts"]["iteration"]
    whole = (comp["scores"]["iteration_score_correct"] * n["correct"] + comp["scores"]["iteration_score_wrong"] * n["wrong"])
    np.testing.assert_allclose(whole / (n["correct"] + n["wrong"]), score_heads(model, probes, 5)["iteration_score"], atol=1e-5)
    clean = teacher_forced_metrics(model, probes)
    assert comp["clean_accuracy"]["token_accuracy"] == pytest.approx(clean["token_accuracy"], abs=1e-6)
    per = comp["clean_accuracy"]["per_length"]
    assert sorted(per) == ["4", "5", "6", "7"]
    rows = probes.lengths == 5
    assert per["5"] == pytest.approx(float(hit[torch.from_numpy(rows)][pred[torch.from_numpy(rows)] >= 0].float().mean()), abs=1e-6)


def test_at_chance_rule():
    assert at_chance(0.0, 0.5, 100) and at_chance(0.55, 0.5, 100)  # 2 SE = 0.1 over 100 steps
    assert not at_chance(0.61, 0.5, 100) and not at_chance(0.2, 1 / 11, 600)


@pytest.mark.parametrize("name, task, iteration, eoi", [("polynomial-cot", "polynomial", 0.993, 0.815), ("parity-cot", "parity", 0.992, 0.777)])
def test_bundled_checkpoints_keep_their_scores(name, task, iteration, eoi):
    """The numbers of their model cards (native rendering, 64 probes of lengths 4-16, seed 0)."""
    result = detect_iteration_heads(name, task=task, full_n=True)  # the cards' numbers are over all 64 probes
    d = result.to_dict()
    assert d["rendering"] == "native" and d["templates"] == [None]
    assert abs(d["iteration_score"][1][0] - iteration) < 0.005 and abs(d["eoi_score"][0][0] - eoi) < 0.005
    assert d["clean_accuracy"]["token_accuracy"] == 1.0 and not d["clean_accuracy"]["at_chance"]
    assert d["split_counts"]["iteration"]["wrong"] == 0 and d["iteration_score_wrong"] is None
    assert d["iteration_score_correct"] == d["iteration_score"]
    assert CANNOT not in result.table()


def test_random_model_is_at_chance_and_says_so(native_tok):
    result = detect_iteration_heads(tiny_model("gpt2", init=0.02), native_tok, task="polynomial", lengths="4-6", n=8,
                                    ablate=True, n_random=1)
    d = result.to_dict()
    assert d["clean_accuracy"]["at_chance"] and d["clean_accuracy"]["note"] == CANNOT and d["ablation"]["note"] == CANNOT
    table = result.table()
    ablation_at = table.index("ablation of")
    assert table.index(f"note: {CANNOT}") > ablation_at  # next to the ablation numbers


def test_a_head_passing_under_one_wording_only_shows_it(planted_gpt2, native_tok):  # noqa: F811
    """The planted head looks at x_t in the native layout; one more <eoi> shifts it onto x_(t+1)."""
    same = "<parity> {inputs} <eoi> {states} <eos>"
    shifted = "<parity> {inputs} <eoi> <eoi> {states} <eos>"
    # capture="eager": the plant lives in GPT-2's eager attention function
    result = detect_iteration_heads(planted_gpt2, native_tok, task="parity", lengths="4-8", n=10, template=[same, shifted],
                                    capture="eager")
    d = result.to_dict()
    one = [detect_iteration_heads(planted_gpt2, native_tok, task="parity", lengths="4-8", n=10, template=t, capture="eager").scores
           for t in (same, shifted)]
    np.testing.assert_allclose(result.scores["iteration_score"], (one[0]["iteration_score"] + one[1]["iteration_score"]) / 2, atol=1e-6)
    assert d["iteration_score_by_template"][0][1][2] == pytest.approx(1.0) and d["iteration_score_by_template"][1][1][2] < 0.1
    assert d["iteration_score_spread"][1][2] > 0.9 and d["templates_passed"][1][2] == 1
    assert d["detected_by_template"][0][1][2] and not d["detected_by_template"][1][1][2]
    assert d["templates"] == [same, shifted] and d["template"] == same
    row = next(r for r in result.top_heads() if (r["layer"], r["head"]) == (1, 2))
    assert row["templates_passed"] == 1 and row["spread"] > 0.9
    assert " 1/2" in result.table()
    with pytest.raises(IterHeadsError, match="twice"):
        detect_iteration_heads(planted_gpt2, native_tok, task="parity", lengths="4", n=2, template=[same, same])


def test_few_shot_scores_the_probe_only():
    tok = text_tokenizer(bos=False)
    probes = make_probes(tok, "parity", "4", n=6, seed=0, shots=2)
    for i, text in enumerate(probes.texts):
        lines = text.split("\n")
        assert len(lines) == 3 and all(" -> " in line for line in lines)
        assert lines[2].split(" -> ")[0] not in (lines[0].split(" -> ")[0], lines[1].split(" -> ")[0])  # never the probe itself
        assert int(probes.x_pos[i, 0]) == 2 * 9  # two shots of 4 + 1 + 4 tokens before it
        assert tok.convert_ids_to_tokens(probes.input_ids[i, probes.x_pos[i, :4]].tolist()) == [str(v) for v in probes.inputs[i, :4]]
    with pytest.raises(IterHeadsError, match="text rendering only"):
        make_probes(build_tokenizer(), "parity", "4", n=2, rendering="native", shots=1)
    with pytest.raises(IterHeadsError, match="has no chat template"):
        make_probes(tok, "parity", "4", n=2, chat=True)


def test_chat_with_a_system_prompt_full_of_values():
    """A system prompt listing every 4-bit parity chain: the probe's own turns, at the end, are the ones located."""
    from itertools import product

    from hf_iterheads.tasks import get_task

    parity = get_task("parity")
    xs = np.array(list(product([0, 1], repeat=4)))
    listing = " ".join(f"{' '.join(map(str, x))} -> {' '.join(map(str, y))} ," for x, y in zip(xs, parity.run(xs)))
    tok = text_tokenizer(bos=False)
    tok.chat_template = "system : " + listing + " </s>\n{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s>\n{% endfor %}"
    probes = make_probes(tok, "parity", "4", n=6, seed=0, chat=True)
    _check_positions(probes, tok)
    for i in range(len(probes)):
        words = tok.convert_ids_to_tokens(probes.input_ids[i].tolist())
        assert int(probes.x_pos[i, 0]) > words.index("</s>")  # after the system prompt
        assert words[int(probes.eoi_pos[i])] == ":" and words[int(probes.eoi_pos[i]) - 1] == "<unk>"  # "assistant :"


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """The detect CLI in a fresh process: two templates with shots, a chat run on Phi-3's tokenizer, bad inputs."""
    tmp = tmp_path_factory.mktemp("cli13")
    plain = tmp / "plain"
    tiny_model("gpt2").save_pretrained(plain)
    text_tokenizer().save_pretrained(plain)
    out = tmp / "out"

    def d(*args: str) -> list[str]:
        return ["detect", *args]

    cases = {
        "templates": d(str(plain), "--n", "4", "--lengths", "4-5", "--shots", "1", "--template", "{inputs} -> {states}",
                       "--template", "the answer is : {inputs:,} -> {states:,}", "--ablate", "--output-dir", str(out / "templates")),
        "nochat": d(str(plain), "--chat", "--output-dir", str(out / "nochat")),
        "shots": d(str(plain), "--shots", "-1", "--output-dir", str(out / "shots")),
    }
    if (REAL_TOKENIZERS / "phi3").is_dir():
        from transformers import AutoTokenizer

        chat = tmp / "phi3-tiny"
        tok = AutoTokenizer.from_pretrained(REAL_TOKENIZERS / "phi3")
        tiny_model_for("phi3", len(tok)).save_pretrained(chat)
        tok.save_pretrained(chat)
        cases["chat"] = d(str(chat), "--n", "4", "--lengths", "4-5", "--chat", "--shots", "2", "--task", "polynomial",
                          "--output-dir", str(out / "chat"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", CLI_SCRIPT, json.dumps(list(cases.values()))], env=env, capture_output=True,
                          text=True, timeout=300, check=False, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(zip(cases, json.loads(proc.stdout.strip().splitlines()[-1]))), out


def test_cli_templates_and_shots(cli_runs):
    runs, out = cli_runs
    assert runs["templates"]["rc"] == 0, runs["templates"]["stderr"]
    d = json.loads((out / "templates" / "scores.json").read_text())
    assert len(d["templates"]) == 2 and d["shots"] == 1 and len(d["iteration_score_by_template"]) == 2
    assert d["example_probe"].count("\n") == 1 and "clean_accuracy" in d and "note" in d["ablation"]
    assert "spread" in runs["templates"]["stdout"] and "clean accuracy on the probes" in runs["templates"]["stdout"]


@pytest.mark.parametrize("case, needle", [("nochat", "has no chat template"), ("shots", "--shots must be 0 or more")])
def test_cli_bad_inputs_one_line(cli_runs, case, needle):
    runs, out = cli_runs
    lines = runs[case]["stderr"].strip().splitlines()
    assert runs[case]["rc"] == 2 and len(lines) == 1 and needle in lines[0], runs[case]["stderr"]
    assert not (out / case).exists()


def test_cli_chat_on_a_real_chat_template(cli_runs):
    runs, out = cli_runs
    if "chat" not in runs:
        pytest.skip(f"no real tokenizers at {REAL_TOKENIZERS}")
    assert runs["chat"]["rc"] == 0, runs["chat"]["stderr"]
    d = json.loads((out / "chat" / "scores.json").read_text())
    assert d["chat"] and d["shots"] == 2 and d["example_probe"].count("<|assistant|>") == 3
    assert np.isfinite(np.asarray(d["iteration_score"])).all()
