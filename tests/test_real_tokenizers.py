"""Text probes on the real tokenizers of eight pretrained LM families (../shared/tokenizers), each paired with a
random tiny model of the matching architecture and vocabulary size.

Every located position is checked by decoding its token on its own: ``x_pos`` / ``state_pos`` hold the
first token of the value (nothing of the value before it, the whole value from it on), ``pred_pos`` is the
token just before ``state_pos`` and ``eoi_pos`` is ``pred_pos`` at t = 1. The folder is not part of a user's
clone: these tests skip then (``HF_ITERHEADS_TOKENIZERS`` points elsewhere).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_iterheads.detect.detection import detect_iteration_heads
from hf_iterheads.detect.probes import make_probes
from hf_iterheads.errors import IterHeadsError

ROOT = Path(os.environ.get("HF_ITERHEADS_TOKENIZERS", Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers"))
NAMES = ("falcon", "gpt2", "mistral", "olmo2", "phi2", "phi3", "pythia", "qwen2")
CHAT = ("phi3", "qwen2")  # the folders whose tokenizer_config.json carries a chat template
TEMPLATES = ("{inputs} -> {states}", "Q: {inputs}\nA: {states}", "x = {inputs:, }; s = {states:, }")

pytestmark = pytest.mark.skipif(not ROOT.is_dir(), reason=f"no real tokenizers at {ROOT} (../shared/tokenizers is not in a user's clone)")


def load_tokenizer(name: str):
    folder = ROOT / name
    if not folder.is_dir():
        pytest.skip(f"no tokenizer folder {folder}")
    return _load(folder)


@functools.cache
def _load(folder: Path):
    """Loaded once per session: building Qwen2's fast tokenizer from vocab.json + merges.txt takes seconds."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def tiny_model_for(name: str, vocab: int, seed: int = 0):
    """A random 2-layer model of the family's architecture with the tokenizer's vocabulary size."""
    from transformers import (
        AutoModelForCausalLM,
        FalconConfig,
        GPT2Config,
        GPTNeoXConfig,
        MistralConfig,
        Olmo2Config,
        Phi3Config,
        PhiConfig,
        Qwen2Config,
    )

    small = {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "max_position_embeddings": 512, "initializer_range": 0.3}
    configs = {
        "gpt2": lambda: GPT2Config(vocab_size=vocab, n_layer=2, n_head=4, n_embd=32, n_positions=512, initializer_range=0.3),
        "phi2": lambda: PhiConfig(partial_rotary_factor=0.5, **small),
        "pythia": lambda: GPTNeoXConfig(**small),
        "qwen2": lambda: Qwen2Config(num_key_value_heads=2, **small),
        "mistral": lambda: MistralConfig(num_key_value_heads=1, sliding_window=64, **small),
        "phi3": lambda: Phi3Config(num_key_value_heads=2, pad_token_id=0, **small),
        "falcon": lambda: FalconConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       new_decoder_architecture=False, multi_query=True, initializer_range=0.3),
        "olmo2": lambda: Olmo2Config(pad_token_id=0, **small),
    }
    torch.manual_seed(seed)
    # eager at construction: Falcon cannot switch its attention implementation afterwards
    return AutoModelForCausalLM.from_config(configs[name](), attn_implementation="eager").eval()


def _text(tok, token_id) -> str:
    return tok.decode([int(token_id)], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def check_alignment(probes, tok) -> None:
    """Decode every located token independently and compare it with the value it claims to be."""
    for i in range(len(probes)):
        L, ids = int(probes.lengths[i]), probes.input_ids[i, : int(probes.seq_lens[i])].tolist()
        x, s = probes.x_pos[i, :L].tolist(), probes.state_pos[i, :L].tolist()
        pred = probes.pred_pos[i, :L].tolist()
        assert pred == [p - 1 for p in s] and int(probes.eoi_pos[i]) == pred[0]
        assert x == sorted(x) and s == sorted(s) and x[-1] < pred[0] < s[0]
        assert (probes.x_pos[i, L:] == -1).all() and (probes.state_pos[i, L:] == -1).all()
        for positions, values in ((x, probes.inputs[i, :L]), (s, probes.states[i, :L])):
            for p, v in zip(positions, values.tolist()):
                raw = _text(tok, ids[p])
                value, first = str(v), raw.strip()
                assert first and value.startswith(first), (probes.texts[i], p, first, value)
                before = _text(tok, ids[p - 1]) if p > 0 else ""
                glued = before[-1:].isdigit() and not raw[:1].isspace()
                assert not glued, (probes.texts[i], p, before, value)  # nothing of the value before it
                whole, end = "", p
                while len(whole.strip()) < len(value):
                    whole, end = whole + _text(tok, ids[end]), end + 1
                assert whole.strip() == value, (probes.texts[i], p, whole, value)
                after = _text(tok, ids[end]) if end < len(ids) else ""
                assert not after[:1].isdigit(), (probes.texts[i], p, after, value)
        assert (probes.target_ids[i, :L] == probes.input_ids[i, s]).all()


@pytest.mark.parametrize("name", NAMES)
def test_every_position_decodes_to_its_value(name):
    tok = load_tokenizer(name)
    two_digit = 0
    for template in TEMPLATES:
        for task in ("parity", "polynomial"):
            probes = make_probes(tok, task, "4-7", n=8, seed=3, template=template)
            check_alignment(probes, tok)
            two_digit += int((probes.inputs == 10).sum() + (probes.states == 10).sum())
    assert two_digit > 0  # the two-digit value 10 was really probed
    probes = make_probes(tok, "polynomial", "4-5", n=4, seed=1, shots=2)  # shots before the probe
    check_alignment(probes, tok)
    assert probes.texts[0].count("->") == 3 and probes.texts[0].endswith(probes.texts[0].splitlines()[-1])
    assert probes.x_pos[:, 0].min() > len(tok(probes.texts[0].splitlines()[0])["input_ids"])


def test_sentencepiece_first_value_is_the_digit_not_the_lone_prefix():
    """The bug that started it: Mistral prepends '▁' with the same offset (0, 1) as the digit."""
    tok = load_tokenizer("mistral")
    probes = make_probes(tok, "parity", "4", n=2, seed=0)
    assert tok.convert_ids_to_tokens(int(probes.input_ids[0, 1])) == "▁"
    assert int(probes.x_pos[0, 0]) == 2 and not probes.multi_token


@pytest.mark.parametrize("name", CHAT)
def test_chat_rendering_aligns(name):
    tok = load_tokenizer(name)
    probes = make_probes(tok, "polynomial", "4-6", n=6, seed=2, chat=True, shots=2)
    check_alignment(probes, tok)
    marker = {"phi3": "<|assistant|>", "qwen2": "<|im_start|>assistant"}[name]
    for i in range(len(probes)):
        ids = probes.input_ids[i].tolist()
        before = tok.decode(ids[: int(probes.x_pos[i, 0])], skip_special_tokens=False)
        upto_eoi = tok.decode(ids[: int(probes.eoi_pos[i]) + 1], skip_special_tokens=False)
        assert before.count(marker) == 2 and upto_eoi.count(marker) == 3  # two worked turns, then the probe
        assert upto_eoi.rstrip().endswith(marker)  # s_1 is predicted from the end of the assistant header
    assert probes.chat and probes.shots == 2


def test_which_tokenizers_have_a_chat_template():
    have = [n for n in NAMES if getattr(load_tokenizer(n), "chat_template", None)]
    assert have == list(CHAT)
    with pytest.raises(IterHeadsError, match="has no chat template"):
        make_probes(load_tokenizer("mistral"), "parity", "4", n=2, chat=True)
@pytest.mark.parametrize("name", NAMES)
def test_detect_end_to_end_complete_finite_tables(name):
    tok = load_tokenizer(name)
    model = tiny_model_for(name, len(tok))
    kwargs = {"chat": True} if name in CHAT else {"shots": 1}
    ablate = name in ("mistral", "phi3")  # the SentencePiece pair; ablation is tokenizer-independent otherwise
    result = detect_iteration_heads(model, tok, task="polynomial", lengths="4-6", n=6, batch_size=4,
                                    template=list(TEMPLATES[:2]), ablate=ablate, n_random=1, **kwargs)
    d = result.to_dict()
    assert (d["n_layers"], d["n_heads"]) == (2, 4)
    for key in ("iteration_score", "iteration_all_score", "eoi_score", "peakiness", "prev_score", "next_score", "baseline",
                "iteration_score_spread"):
        arr = np.asarray(d[key], dtype=float)
        assert arr.shape == (2, 4) and np.isfinite(arr).all(), key
    assert len(d["iteration_score_by_template"]) == 2 and d["templates"] == list(TEMPLATES[:2])
    assert 0 <= d["clean_accuracy"]["token_accuracy"] <= 1
    assert not ablate or np.isfinite(d["ablation"]["zero"]["top"]["token_accuracy"])
