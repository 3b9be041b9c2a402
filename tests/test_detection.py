"""The detector on random tiny models of many architectures, a hand-built iteration head, and the CLI.

Everything is built from configs (no network). Helpers here (``tiny_model``, ``text_tokenizer``) are
reused by test_ablation.py.
"""

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
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.processors import TemplateProcessing
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PhiConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from hf_iterheads.circuit import eager_attentions, mass_on
from hf_iterheads.detect.detection import (
    IterationHeadDetector,
    detect_iteration_heads,
    score_heads,
    write_outputs,
)
from hf_iterheads.detect.gating import gated_cells
from hf_iterheads.detect.probes import make_probes
from hf_iterheads.errors import IterHeadsError
from hf_iterheads.tokenizer import Layout, build_tokenizer

VOCAB = 64
ARCHS = ("gpt2", "llama_gqa", "gpt_neox", "qwen2", "gemma2", "mistral", "phi")


def text_tokenizer(split_digits: bool = False, bos: bool = True) -> PreTrainedTokenizerFast:
    """A pretrained-LM-like tokenizer: words, digits, '->', a BOS it adds itself; optionally digit by digit."""
    words = ["<pad>", "<unk>", "<s>", "</s>", "->", ",", "the", "answer", "is", ":"]
    digits = [str(d) for d in range(10)] + ([] if split_digits else [str(d) for d in range(10, 16)])
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words + digits)}, unk_token="<unk>"))
    splitters = [pre_tokenizers.Whitespace()] + ([pre_tokenizers.Digits(individual_digits=True)] if split_digits else [])
    backend.pre_tokenizer = pre_tokenizers.Sequence(splitters)
    if bos:
        backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_model(arch: str, seed: int = 0, vocab: int = VOCAB, layers: int = 2, init: float = 0.3):
    """A random tiny causal LM; ``init`` is large enough that attention patterns are far from uniform."""
    common = dict(vocab_size=vocab, initializer_range=init, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=128)
    configs = {
        "gpt2": lambda: GPT2Config(n_layer=layers, n_head=4, n_embd=32, n_positions=128, **common),
        "llama_gqa": lambda: LlamaConfig(num_key_value_heads=2, **small, **common),
        "gpt_neox": lambda: GPTNeoXConfig(**small, **common),
        "qwen2": lambda: Qwen2Config(num_key_value_heads=2, **small, **common),
        "gemma2": lambda: Gemma2Config(
            num_key_value_heads=2, head_dim=8, sliding_window=6, attn_logit_softcapping=5.0, query_pre_attn_scalar=8, **small, **common
        ),
        "mistral": lambda: MistralConfig(num_key_value_heads=1, sliding_window=10, **small, **common),
        "phi": lambda: PhiConfig(partial_rotary_factor=0.5, **small, **common),
    }
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(configs[arch]()).eval()


@pytest.fixture(scope="module")
def native_tok():
    return build_tokenizer()


def _naive_scores(model, probes):
    """Reference: keep every layer's eager pattern (output_attentions=True) and score afterwards."""
    its = []
    for idx in probes.batches(len(probes)):
        with torch.no_grad():
            atts = eager_attentions(model, **probes.batch(idx))
        pairs = probes.pairs(idx)
        its.append([mass_on(a, *pairs["iteration"]) for a in atts])
    out = []
    for layer in range(len(its[0])):
        mass, valid = its[0][layer]
        v = valid[:, None, :]
        out.append(((mass * v).sum((0, 2)) / valid.sum()).numpy())
    return np.stack(out)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rendering", ["native", "text"])
def test_complete_finite_tables_every_architecture(arch, rendering, native_tok):
    model = tiny_model(arch)
    before = model.config._attn_implementation
    tok = native_tok if rendering == "native" else text_tokenizer()
    result = detect_iteration_heads(model, tok, task="polynomial", lengths="4-8", n=12, rendering=rendering, batch_size=5)
    d = result.to_dict()
    assert (d["n_layers"], d["n_heads"]) == (2, 4)
    for key in ("iteration_score", "eoi_score", "peakiness", "prev_score", "next_score", "baseline"):
        arr = np.asarray(d[key])
        assert arr.shape == (2, 4) and np.isfinite(arr).all() and (arr >= 0).all() and (arr <= 1 + 1e-6).all(), key
    assert len(d["top_heads"]) == 8
    scores = [h["score"] for h in d["top_heads"]]
    assert scores == sorted(scores, reverse=True)
    assert d["rendering"] == rendering and d["bos"] == (rendering == "text")
    n_kv = {"llama_gqa": 2, "qwen2": 2, "gemma2": 2, "mistral": 1}.get(arch, 4)
    assert d["n_kv_heads"] == n_kv
    assert d["kv_group"][0] == [h // (4 // n_kv) for h in range(4)]
    # captured inside the model's own attention = what output_attentions gives (softcap, windows, GQA)
    probes = make_probes(tok, "polynomial", "4-8", 12, 0, rendering)
    np.testing.assert_allclose(score_heads(model, probes, 5)["iteration_score"], _naive_scores(model, probes), atol=1e-5)
    assert model.config._attn_implementation == before  # the user's choice is restored afterwards


def test_sliding_window_baseline_counts_only_visible_keys(native_tok):
    model = tiny_model("gemma2")  # layer 0 slides over 6 keys, layer 1 is global
    d = detect_iteration_heads(model, native_tok, task="parity", lengths="8", n=4).to_dict()
    assert d["baseline"][0][0] > d["baseline"][1][0]
    assert d["baseline"][0][0] == pytest.approx(1 / 6, abs=1e-5)


# --- a hand-built circuit: the scorer must rank exactly the right heads -------------------------------


def plant_circuit(monkeypatch, skip=None):
    """GPT-2 whose layer 1 head 2 puts all mass on x_t and layer 0 head 3 on EoI (native layout). ``skip(ids, b,
    t)``: True where the look-up is left out (the head then attends the first token), for a content-gated head."""
    import transformers.models.gpt2.modeling_gpt2 as gpt2

    original = gpt2.eager_attention_forward
    seen: dict[str, torch.Tensor] = {}

    def planted(module, query, key, value, attention_mask, **kwargs):
        out, weights = original(module, query, key, value, attention_mask, **kwargs)
        B, H, T, _ = weights.shape
        n_tok = (attention_mask[:, 0, -1] == 0).sum(-1) if attention_mask is not None else torch.full((B,), T)
        w = weights.clone()
        for b in range(B):
            L = (int(n_tok[b]) - 3) // 2
            for q in range(T):
                row = torch.zeros(T)
                if module.layer_idx == 1 and L + 1 <= q <= 2 * L:
                    gated = skip is not None and skip(seen["ids"][b], L, q - L)
                    row[0 if gated else q - L] = 1.0  # position predicting s_t -> x_t (t = q - L)
                elif module.layer_idx == 0 and L + 2 <= q <= 2 * L + 1:
                    row[L + 1] = 1.0  # s_t -> EoI
                else:
                    continue
                w[b, 2 if module.layer_idx == 1 else 3, q] = row
        return torch.matmul(w, value).transpose(1, 2), w

    monkeypatch.setattr(gpt2, "eager_attention_forward", planted)
    model = tiny_model("gpt2", init=0.02)
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.update(ids=kwargs["input_ids"]), with_kwargs=True)
    return model


@pytest.fixture
def planted_gpt2(monkeypatch, native_tok):
    return plant_circuit(monkeypatch)


def test_planted_iteration_head_ranks_first(planted_gpt2, native_tok):
    # the plant lives in GPT-2's eager attention function, so capture inside it
    result = detect_iteration_heads(planted_gpt2, native_tok, task="parity", lengths="4-12", n=24, batch_size=7, capture="eager")
    top = result.top_heads(2)
    assert (top[0]["layer"], top[0]["head"]) == (1, 2)
    assert top[0]["score"] == pytest.approx(1.0) and top[0]["peakiness"] == pytest.approx(1.0)
    assert top[0]["entropy"] == pytest.approx(0.0, abs=1e-6)  # one-hot rows
    assert top[0]["detected"] and not top[1]["detected"]
    assert top[0]["prev_score"] == pytest.approx(0.0) and top[0]["next_score"] == pytest.approx(0.0)
    eoi = result.top_heads(1, key="eoi_score")[0]
    assert (eoi["layer"], eoi["head"], eoi["detected"]) == (0, 3, True)
    assert result.detected().sum() == 1
    assert (result.pattern_marks["layer"], result.pattern_marks["head"]) == (1, 2)
    assert "   1     1    2" in result.table()
    circuit = result.circuit()
    assert circuit["label"] == "iteration head" and "EoI head layer 0 head 3, iteration head layer 1 head 2" in circuit["text"]
    assert result.to_dict()["circuit"] == circuit and f"circuit: {circuit['text']}" in result.table()
    assert not result.gating["gated"] and {c["mass"] for c in result.gating["cells"]} == {1.0}  # never skips x_t
    # the same scores without the look-up, then without either half: named for what is left
    import dataclasses

    no_lookup = dataclasses.replace(result, scores={**result.scores, "iteration_score": 0 * result.scores["iteration_score"]})
    assert no_lookup.circuit()["label"] == "EoI head, no look-up"
    neither = dataclasses.replace(no_lookup, scores={**no_lookup.scores, "eoi_score": 0 * result.scores["eoi_score"]})
    other = neither.circuit()
    assert other["label"] == "other circuit" and other["text"].startswith("other circuit: strongest pattern per layer: layer 0")
    late_eoi = {**result.scores, "eoi_score": result.scores["eoi_score"][::-1].copy()}  # EoI head after the look-up
    assert dataclasses.replace(result, scores=late_eoi).circuit()["label"] == "look-up without an EoI head"


def test_a_content_gated_iteration_head_is_named_for_what_it_skips(monkeypatch, native_tok):
    # Parity from scratch formed a head that skips x_t exactly when x_t = s_(t-1) = 1. Planted here:
    # the detector still flags it (3 of 4 cells), and the cells say where it looks away.
    one = Layout(native_tok, "parity").value_ids[1]

    def skip(ids, L, t):  # parity: s_(t-1) = 1 iff x_1..x_(t-1) hold an odd number of ones
        x = ids[1 : L + 1]
        return t >= 2 and int(x[t - 1]) == one and int((x[: t - 1] == one).sum()) % 2 == 1

    model = plant_circuit(monkeypatch, skip)
    result = detect_iteration_heads(model, native_tok, task="parity", lengths="4-12", n=24, batch_size=7, capture="eager")
    gating = result.gating
    assert (gating["layer"], gating["head"], gating["gated"], gating["skipped"]) == (1, 2, True, [[1, 1]])
    mass = {(c["x_t"], c["s_prev"]): c["mass"] for c in gating["cells"]}
    assert mass[(1, 1)] == pytest.approx(0.0) and all(mass[c] == pytest.approx(1.0) for c in mass if c != (1, 1))
    assert "content-gated: looks x_t up except when (x_t, s_(t-1)) is (1, 1)" in result.circuit()["text"]
    assert result.to_dict()["gating"]["skipped"] == [[1, 1]]
    cells = gating["cells"]
    assert gated_cells([{**c, "mass": 0.95} for c in cells]) is None  # a head that always looks x_t up
    assert gated_cells([{**c, "mass": 0.6} for c in cells]) is None  # soft everywhere: a partial head, not gated


def test_random_model_detects_nothing(native_tok):
    result = detect_iteration_heads(tiny_model("gpt2", init=0.02), native_tok, task="parity", n=32)
    assert not result.detected().any() and not result.eoi_detected().any()
    assert result.circuit()["label"] == "other circuit"
    s = result.scores
    assert (s["iteration_score"] < 2 * s["baseline"]).all()


def test_model_without_weights_is_refused(monkeypatch, native_tok):
    import transformers.models.gpt2.modeling_gpt2 as gpt2

    original = gpt2.eager_attention_forward
    monkeypatch.setattr(gpt2, "eager_attention_forward", lambda *a, **k: (original(*a, **k)[0], None))
    with pytest.raises(IterHeadsError, match="no attention weights"):
        detect_iteration_heads(tiny_model("gpt2"), native_tok, n=4, lengths="4", capture="eager")


def test_context_and_tokenizer_checks(native_tok):
    model = tiny_model("gpt2")
    model.config.n_positions = 16
    with pytest.raises(IterHeadsError, match="context is 16"):
        IterationHeadDetector(model, native_tok).detect("parity", "4-16", 8)
    with pytest.raises(IterHeadsError, match="tokenizer"):
        IterationHeadDetector(tiny_model("gpt2"), None)


def test_write_outputs_files(tmp_path, native_tok):
    result = detect_iteration_heads(tiny_model("llama_gqa"), native_tok, task="parity", lengths="4-6", n=6, ablate=True)
    write_outputs(result, tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["best_head_attention.png", "heads.png", "report.html", "scores.json"]
    d = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert {"model", "task", "n_layers", "n_heads", "iteration_score", "eoi_score", "peakiness", "top_heads", "ablation"} <= set(d)
    assert set(d["top_heads"][0]) >= {"layer", "head", "score"}
    assert list(tmp_path.iterdir()) == [tmp_path / "out"]  # no temp folder left behind


# --- the CLI in a fresh process: Hub cache by repo id, offline, and one-line errors --------------------

CLI_SCRIPT = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from hf_iterheads.cli import main
    results = []
    for argv in json.loads(sys.argv[1]):
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(argv)
        results.append({"rc": rc, "stderr": err.getvalue(), "stdout": out.getvalue()})
    print(json.dumps(results))
    """
)


def _lay_into_hub_cache(folder: Path, hub: Path, repo_id: str, rev: str = "0123456789abcdef0123456789abcdef01234567") -> None:
    """Write ``folder``'s files as the Hub cache does: blobs, refs/main, snapshots/REV symlinked to blobs."""
    import hashlib

    root = hub / ("models--" + repo_id.replace("/", "--"))
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, native_tok):
    tmp = tmp_path_factory.mktemp("cli")
    hub = tmp / "hf_home" / "hub"
    good = tmp / "good"
    model = tiny_model("gpt2")
    model.save_pretrained(good)
    native_tok.save_pretrained(good)
    _lay_into_hub_cache(good, hub, "tiny-org/tiny-iter")
    short = tmp / "short"  # context 16: probes of length 16 do not fit
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=64)).save_pretrained(short)
    native_tok.save_pretrained(short)
    from transformers import DistilBertConfig

    notcausal = tmp / "notcausal"
    DistilBertConfig(vocab_size=64, dim=32, hidden_dim=64, n_layers=1, n_heads=2).save_pretrained(notcausal)
    nodigits = tmp / "nodigits"  # a tokenizer that has no tokens for values
    model.save_pretrained(nodigits)
    backend = Tokenizer(WordLevel({"<unk>": 0, "->": 1, "a": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(nodigits)
    out = tmp / "out"
    d = lambda *a: ["detect", *a]  # noqa: E731
    cases = {
        "hub": d("tiny-org/tiny-iter", "--n", "8", "--lengths", "4-6", "--ablate", "--output-dir", str(out / "hub")),
        "text": d(str(good), "--n", "6", "--lengths", "4-5", "--rendering", "text", "--template", "<parity> {inputs} <eoi> {states} <eos>", "--output-dir", str(out / "text")),
        "missing": d("no-such-org/no-such-model", "--output-dir", str(out / "missing")),
        "task": d(str(good), "--task", "sorting", "--output-dir", str(out / "task")),
        "context": d(str(short), "--output-dir", str(out / "context")),
        "notcausal": d(str(notcausal), "--output-dir", str(out / "notcausal")),
        "nodigits": d(str(nodigits), "--output-dir", str(out / "nodigits")),
    }
    env = {**os.environ, "HF_HOME": str(tmp / "hf_home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run(
        [sys.executable, "-c", CLI_SCRIPT, json.dumps(list(cases.values()))], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(zip(cases, json.loads(proc.stdout.strip().splitlines()[-1]))), out


def test_cli_detects_by_repo_id_from_offline_hub_cache(cli_runs):
    runs, out = cli_runs
    run = runs["hub"]
    assert run["rc"] == 0, run["stderr"]
    assert "rank layer head" in run["stdout"] and "ablation of" in run["stdout"]
    d = json.loads((out / "hub" / "scores.json").read_text())
    assert d["model"] == "tiny-org/tiny-iter" and d["task"] == "parity" and d["rendering"] == "native"
    assert d["ablation"]["zero"]["top"]["token_accuracy"] >= 0
    assert (out / "hub" / "heads.png").is_file() and (out / "hub" / "best_head_attention.png").is_file()
    assert runs["text"]["rc"] == 0 and json.loads((out / "text" / "scores.json").read_text())["rendering"] == "text"


@pytest.mark.parametrize(
    "case, needle",
    [
        ("missing", "HF_HUB_OFFLINE=1"),
        ("task", "unknown task 'sorting'"),
        ("context", "context is 16"),
        ("notcausal", "not a causal language model"),
        ("nodigits", "no token for value"),
    ],
)
def test_cli_bad_inputs_one_line_exit_2_no_output(cli_runs, case, needle):
    runs, out = cli_runs
    run = runs[case]
    assert run["rc"] == 2
    lines = run["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-iterheads detect: error:") and needle in lines[0], run["stderr"]
    assert not (out / case).exists()


def test_without_matplotlib_scores_json_still_written(tmp_path, monkeypatch, native_tok):
    result = detect_iteration_heads(tiny_model("gpt2"), native_tok, task="parity", lengths="4", n=2)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    monkeypatch.delitem(sys.modules, "hf_iterheads.detect.plots", raising=False)
    notes = write_outputs(result, tmp_path / "out")
    assert len(notes) == 1 and "matplotlib" in notes[0] and "pip install" in notes[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "scores.json"]  # no matplotlib needed


def test_only_steps_where_x_t_matters_count_for_the_iteration_score(native_tok):
    from hf_iterheads.tasks import get_task

    poly = get_task("polynomial")
    inputs = np.array([[3, 5, 2, 7], [4, 8, 1, 9]])
    states = poly.run(inputs)
    mask = poly.informative(inputs, states)
    assert mask[:, 0].all()  # s_1 = x_1
    assert (mask[:, 1:] == (states[:, :-1] != 0)).all()  # after a 0 state, s_t = 1 whatever x_t is
    parity = get_task("parity")
    assert parity.informative(inputs % 2, parity.run(inputs % 2)).all()
    probes = make_probes(native_tok, "polynomial", "4-16", n=64, seed=0)
    assert 0 < probes.informative[probes.x_pos.numpy() >= 0].mean() < 1
    pairs = probes.pairs(np.arange(len(probes)))
    skipped = torch.from_numpy(~probes.informative) & (probes.x_pos >= 0)
    assert (pairs["iteration"][0][skipped] == -1).all() and (pairs["iteration_all"][0][skipped] >= 0).all()
    assert (pairs["prev"][0][skipped] == -1).all()  # the controls use the same steps
