"""Probes: every index points at the token it claims to, in both renderings, for awkward tokenizers too."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from hf_iterheads.detect.probes import make_probes, parse_lengths, render
from hf_iterheads.errors import IterHeadsError
from hf_iterheads.tokenizer import build_tokenizer
from tests.test_detection import text_tokenizer


@pytest.fixture(scope="module")
def native_tok():
    return build_tokenizer()


def _check_positions(probes, tok, value_token=str):
    ids = probes.input_ids
    for i in range(len(probes)):
        L = int(probes.lengths[i])
        x, s, pred = probes.x_pos[i, :L], probes.state_pos[i, :L], probes.pred_pos[i, :L]
        assert (probes.x_pos[i, L:] == -1).all() and (pred == s - 1).all() and probes.eoi_pos[i] == pred[0]
        assert x[-1] < probes.eoi_pos[i] < s[0]
        got_x = tok.convert_ids_to_tokens(ids[i, x].tolist())
        got_s = tok.convert_ids_to_tokens(ids[i, s].tolist())
        assert got_x == [value_token(v) for v in probes.inputs[i, :L]]
        assert got_s == [value_token(v) for v in probes.states[i, :L]]
        assert (probes.target_ids[i, :L] == ids[i, s]).all()
        assert int(probes.attention_mask[i].sum()) == probes.seq_lens[i]


def test_parse_lengths():
    assert parse_lengths("4-16") == list(range(4, 17))
    assert parse_lengths("4,8, 12") == [4, 8, 12] and parse_lengths(6) == [6]
    for bad in ("16-4", "x", "1-3", ""):
        with pytest.raises(IterHeadsError):
            parse_lengths(bad)


def test_native_layout_positions(native_tok):
    probes = make_probes(native_tok, "polynomial", "4-16", n=39, seed=1)
    assert probes.rendering == "native" and sorted(set(probes.lengths)) == list(range(4, 17))
    assert np.bincount(probes.lengths)[4:].tolist() == [3] * 13  # lengths equally represented
    _check_positions(probes, native_tok)
    i = int(np.argmax(probes.lengths == 4))
    assert probes.x_pos[i, :4].tolist() == [1, 2, 3, 4] and probes.eoi_pos[i] == 5  # paper: EoI at L + 1
    assert native_tok.convert_ids_to_tokens(int(probes.input_ids[i, 5])) == "<eoi>"


def test_text_template_reproduces_native_layout(native_tok):
    native = make_probes(native_tok, "parity", "4-9", n=12)
    text = make_probes(native_tok, "parity", "4-9", n=12, rendering="text", template="<parity> {inputs} <eoi> {states} <eos>")
    for key in ("input_ids", "x_pos", "pred_pos", "state_pos", "eoi_pos", "target_ids"):
        assert (getattr(native, key) == getattr(text, key)).all(), key


def test_text_rendering_with_bos_accounts_for_it():
    tok = text_tokenizer()
    probes = make_probes(tok, "polynomial", "4-8", n=10)
    assert probes.rendering == "text" and probes.bos and probes.texts[0].count("->") == 1
    assert (probes.input_ids[:, 0] == tok.bos_token_id).all()
    assert (probes.x_pos[:, 0] == 1).all()  # BOS shifts x_1 to index 1
    _check_positions(probes, tok)
    assert tok.convert_ids_to_tokens(int(probes.input_ids[0, probes.eoi_pos[0]])) == "->"


def test_custom_separator_and_words():
    tok = text_tokenizer(bos=False)
    probes = make_probes(tok, "parity", "5", n=3, template="{inputs:,} the answer is : {states:,}")
    assert probes.texts[0].count(",") == 8 and not probes.bos
    _check_positions(probes, tok)
    assert tok.convert_ids_to_tokens(int(probes.input_ids[0, probes.eoi_pos[0]])) == ":"


def test_multi_token_values_score_first_token_or_refuse():
    tok = text_tokenizer(split_digits=True)
    rng_states = make_probes(tok, "polynomial", "8", n=16, seed=3)
    assert rng_states.multi_token  # some state is 10 -> "1" "0"
    first = lambda v: str(v)[0]  # noqa: E731
    _check_positions(rng_states, tok, value_token=first)
    with pytest.raises(IterHeadsError, match="splits value '10' into 2 tokens"):
        make_probes(tok, "polynomial", "8", n=16, seed=3, multi_token="refuse")


def test_merged_and_unknown_values_are_refused():
    tok = text_tokenizer()
    with pytest.raises(IterHeadsError, match="merges value"):
        make_probes(tok, "parity", "4", n=2, template="{inputs:} -> {states}")  # "1011" is one word
    backend = Tokenizer(WordLevel({"<unk>": 0, "->": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    bare = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(IterHeadsError, match="no token for value"):
        make_probes(bare, "parity", "4", n=2)


@pytest.mark.parametrize(
    "template, needle",
    [("{states} -> {inputs}", "exactly once"), ("{inputs} -> ", "exactly once"), ("{inputs} {x} {states}", "unknown placeholder"), ("{inputs} {states}", "marker between")],
)
def test_template_errors(template, needle):
    with pytest.raises(IterHeadsError, match=needle):
        make_probes(text_tokenizer(), "parity", "4", n=2, template=template)


def test_native_rendering_needs_native_tokenizer(native_tok):
    with pytest.raises(IterHeadsError, match="project's tokenizer"):
        make_probes(text_tokenizer(), "parity", rendering="native")
    with pytest.raises(IterHeadsError, match="text rendering only"):
        make_probes(native_tok, "parity", rendering="native", template="{inputs} -> {states}")
    with pytest.raises(IterHeadsError, match="unknown task"):
        make_probes(native_tok, "sorting")


def test_render_spans():
    text, xs, ss = render("a {inputs:, } = {states}", [1, 10], [3, 4])
    assert text == "a 1, 10 = 3 4"
    assert [text[a:b] for a, b in xs] == ["1", "10"] and [text[a:b] for a, b in ss] == ["3", "4"]
