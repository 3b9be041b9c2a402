"""Ablation hooks do exactly what weight surgery would; the trained checkpoint's circuit is causal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hf_iterheads.detect.ablation import (
    ablate_heads,
    head_means,
    random_heads,
    run_ablation,
    teacher_forced_metrics,
)
from hf_iterheads.detect.attention import find_attention_modules, find_output_projection
from hf_iterheads.detect.probes import make_probes
from hf_iterheads.errors import IterHeadsError
from hf_iterheads.tokenizer import build_tokenizer
from tests.test_detection import tiny_model

CHECKPOINTS = Path(__file__).resolve().parents[1] / "hf_iterheads" / "checkpoints"


@pytest.fixture(scope="module")
def native_tok():
    return build_tokenizer()


def _surgery(model, layer: int, head: int, mean: torch.Tensor | None = None):
    """Copy of ``model`` whose projection ignores ``head`` (and adds the head's mean output, if given)."""
    import copy

    clone = copy.deepcopy(model)
    proj = find_output_projection(find_attention_modules(clone)[layer][1])
    n_heads = 4
    with torch.no_grad():
        is_conv1d = type(proj).__name__ == "Conv1D"  # GPT-2 stores (in, out)
        w = proj.weight if is_conv1d else proj.weight.T  # (in, out)
        d = w.shape[0] // n_heads
        block = w[head * d : (head + 1) * d].clone()
        w[head * d : (head + 1) * d] = 0
        if mean is not None:
            shift = mean @ block
            if proj.bias is None:
                proj.bias = torch.nn.Parameter(torch.zeros(w.shape[1]))
            proj.bias += shift
    return clone


@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa", "gpt_neox", "gemma2"])
def test_hooks_equal_weight_surgery(arch, native_tok):
    model = tiny_model(arch)
    probes = make_probes(native_tok, "polynomial", "4-6", n=6)
    batch = probes.batch(np.arange(len(probes)))
    with torch.no_grad():
        clean = model(**batch).logits
        with ablate_heads(model, [(1, 2)], "zero"):
            zeroed = model(**batch).logits
        np.testing.assert_allclose(zeroed, _surgery(model, 1, 2)(**batch).logits, atol=1e-5)
        assert not torch.allclose(clean, zeroed, atol=1e-4)
        means = head_means(model, probes, batch_size=4)
        with ablate_heads(model, [(1, 2)], "mean", means):
            meaned = model(**batch).logits
        np.testing.assert_allclose(meaned, _surgery(model, 1, 2, means[1][2])(**batch).logits, atol=1e-4)
        assert torch.allclose(model(**batch).logits, clean)  # hooks removed


def test_run_ablation_report_and_errors(native_tok):
    model = tiny_model("qwen2")
    probes = make_probes(native_tok, "parity", "4-8", n=10)
    report = run_ablation(model, probes, [(1, 0)], seed=0, batch_size=4, n_random=3)
    assert report["heads"] == [[1, 0]] and len(report["zero"]["random"]) == 3
    assert all([1, 0] not in r["heads"] for r in report["zero"]["random"])
    for mode in ("zero", "mean"):
        assert 0 <= report[mode]["top"]["token_accuracy"] <= 1 and np.isfinite(report[mode]["top"]["log_prob"])
    assert report["clean"]["chance_token_accuracy"] == 0.5
    with pytest.raises(IterHeadsError, match="no head"):
        with ablate_heads(model, [(5, 0)]):
            pass
    assert random_heads(1, 2, 1, [(0, 0)], np.random.default_rng(0)) == [(0, 1)]


def test_metrics_on_text_rendering_use_first_token():
    from tests.test_detection import text_tokenizer

    tok = text_tokenizer(split_digits=True)
    probes = make_probes(tok, "polynomial", "4-6", n=8)
    m = teacher_forced_metrics(tiny_model("llama_gqa"), probes, batch_size=3)
    assert 0 <= m["token_accuracy"] <= 1 and m["log_prob"] < 0 and m["chance_token_accuracy"] == pytest.approx(1 / 11)


# (bundled checkpoint, task, minimum iteration score = mean attention mass on x_t over the steps where s_t depends
# on x_t). The contract: the released polynomial-CoT checkpoint's layer-2 head ranks first with >= 0.9.
TRAINED = [("polynomial-cot", "polynomial", 0.9), ("parity-cot", "parity", 0.9)]


@pytest.mark.parametrize("name, task, min_score", TRAINED)
def test_trained_checkpoint_circuit_is_found_and_causal(name, task, min_score):
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_iterheads.detect.detection import (
        IterationHeadDetector,
        detect_iteration_heads,
    )

    checkpoint = CHECKPOINTS / name
    assert (checkpoint / "config.json").is_file(), f"bundled checkpoint {name} is missing"
    detector = IterationHeadDetector(str(checkpoint))
    result = detector.detect(task, "4-16", n=64, ablate=True, top_k=1)
    top = result.top_heads(1)[0]
    n_layers = result.n_layers
    assert top["layer"] == n_layers - 1 and top["score"] >= min_score and top["detected"], result.table()
    scores = result.to_dict()
    assert scores["peakiness"][top["layer"]][top["head"]] >= 0.9, result.table()
    # counting every step (also those where x_t cannot matter) moves the score by at most the uninformative steps'
    # share: all = share * informative + (1 - share) * uninformative, both in [0, 1]
    gap = abs(scores["iteration_all_score"][top["layer"]][top["head"]] - top["score"])
    assert gap <= 1 - scores["informative_share"] + 1e-6
    eoi = result.top_heads(1, key="eoi_score")[0]
    assert eoi["layer"] == 0 and eoi["detected"], result.table()
    ab = result.ablation
    assert ab["clean"]["token_accuracy"] >= 0.9
    chance = ab["clean"]["chance_token_accuracy"]
    assert ab["zero"]["top"]["token_accuracy"] <= chance + 0.2, result.table()
    # a head outside the circuit (neither the iteration nor the EoI head), where the model has one
    circuit = {(top["layer"], top["head"]), (eoi["layer"], eoi["head"])}
    others = [(l, h) for l in range(n_layers) for h in range(result.n_heads) if (l, h) not in circuit]
    if others:
        probes = detector.probes(task, "4-16", 64)
        with ablate_heads(detector.model, others[:1]):
            kept = teacher_forced_metrics(detector.model, probes)
        assert kept["token_accuracy"] >= ab["clean"]["token_accuracy"] - 0.2
    # same architecture, untrained: nothing above chance
    torch.manual_seed(0)
    untrained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint)).eval()
    fresh = detect_iteration_heads(untrained, detector.tokenizer, task=task, n=64)
    assert not fresh.detected().any() and not fresh.eoi_detected().any(), fresh.table()


def test_the_no_cot_control_checkpoint_has_no_iteration_head():
    from hf_iterheads.detect.detection import detect_iteration_heads

    result = detect_iteration_heads(str(CHECKPOINTS / "polynomial-nocot"), task="polynomial", n=64)
    assert not result.detected()[-1].any(), result.table()
    assert result.top_heads(1)[0]["score"] < 0.5, result.table()


def test_ablating_every_head_says_there_is_no_random_control():
    from hf_iterheads.detect.detection import NO_CONTROL, detect_iteration_heads

    result = detect_iteration_heads("polynomial-cot", task="polynomial", lengths="4-6", n=8, ablate=True, top_k=2)
    assert result.ablation["control_note"] == NO_CONTROL and f"note: {NO_CONTROL}" in result.table()
