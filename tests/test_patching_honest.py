"""Honest patching: a share is n/a unless the model separates the answers, and a probe mix that writes values as
different tokens is patched per group of agreeing probes, with scores and ablation written whatever happens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_iterheads.detect.patching import RULE, patch_lines, run_patching, token_groups
from hf_iterheads.detect.probes import concat_probes, make_probes

ROOT = Path(os.environ.get("HF_ITERHEADS_TOKENIZERS", Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers"))
GPT2 = ROOT / "gpt2"
needs_gpt2 = pytest.mark.skipif(not GPT2.is_dir(), reason=f"no GPT-2 tokenizer at {GPT2} (../shared is not in a user's clone)")


def _random_gpt2(folder: Path) -> Path:
    """A random 2-layer GPT-2 with the real GPT-2 tokenizer, saved as a checkpoint folder."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_layer=2, n_head=2, n_embd=16, n_positions=256))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(GPT2).save_pretrained(folder)
    return folder


@needs_gpt2
def test_patch_prints_n_a_on_a_random_model(tmp_path):
    model_dir = _random_gpt2(tmp_path / "random-gpt2")
    out = tmp_path / "det"
    run = subprocess.run(
        [sys.executable, "-m", "hf_iterheads.cli", "detect", str(model_dir), "--task", "parity", "--lengths", "4-6",
         "--n", "12", "--patch", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "found: L" in run.stdout and "n/a" in run.stdout and "does not separate" in run.stdout, run.stdout
    assert "rule:" in run.stdout
    patch = json.loads((out / "scores.json").read_text())["patch"]
    assert not patch["separates"] and patch["rule"] == RULE
    assert all(r["share"] is None for r in patch["heads"] + patch["layers"])


@needs_gpt2
def test_a_mixed_token_probe_set_is_patched_per_group_and_everything_is_written(tmp_path):
    """Two templates with few-shot write the probe's first value as `1` in one and ` 1` in the other."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(GPT2)
    sets = [make_probes(tok, "parity", "4-5", n=6, template=t, shots=1) for t in ("{inputs} -> {states}", "Input: {inputs:, }\nOutput: {states:, }")]
    probes = concat_probes(sets)
    assert len(token_groups(probes)) == 2
    model_dir = _random_gpt2(tmp_path / "random-gpt2")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    p = run_patching(model, probes, [(1, 0)], seed=0, batch_size=4)
    assert p["token_groups"] == 2 and p["n"] >= 8 and "refused" not in p
    assert any("2 token groups" in line for line in patch_lines(p))
    out = tmp_path / "det"
    run = subprocess.run(
        [sys.executable, "-m", "hf_iterheads.cli", "detect", str(model_dir), "--task", "parity", "--lengths", "4-5",
         "--n", "6", "--shots", "2", "--template", "{inputs} -> {states}", "--template", "Input: {inputs:, }\nOutput: {states:, }",
         "--ablate", "--patch", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    scores = json.loads((out / "scores.json").read_text())
    assert "ablation" in scores and "patch" in scores and "iteration_score" in scores


def test_a_refused_patch_keeps_the_result():
    """A probe set with no counterfactual at all: patching says why instead of raising."""
    from transformers import AutoModelForCausalLM

    from hf_iterheads.modeling import bundled_path
    from hf_iterheads.tokenizer import build_tokenizer

    native_tok = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(bundled_path("polynomial-cot"))
    probes = make_probes(native_tok, "polynomial", "4-5", n=4)
    probes.informative[:] = False  # no step where x_t matters
    p = run_patching(model, probes, [(1, 0)])
    assert "refused" in p and patch_lines(p)[0].startswith("patching not run:")


def test_a_model_that_separates_gets_its_shares():
    from hf_iterheads.detect.detection import IterationHeadDetector

    detector = IterationHeadDetector("polynomial-cot")
    probes = detector.probes("polynomial", "4-8", 16)
    p = run_patching(detector.model, probes, [(1, 0)], batch_size=16)
    assert p["separates"] and p["separated"] >= 0.9 * p["n"] and p["heads"][0]["share"] >= 0.9
