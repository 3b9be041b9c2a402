import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from hf_iterheads import IterHeadsError, get_task
from hf_iterheads.tokenizer import (
    EOI,
    EOS,
    Layout,
    build_tokenizer,
    check_vocabulary,
    is_native_tokenizer,
    save_tokenizer,
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_vocabulary_holds_every_task(tok):
    vocab = tok.get_vocab()
    assert all(vocab[str(v)] == v for v in range(16))  # value v has id v
    for name in ("binary_copy", "parity", "polynomial", "cumsum", "s3_product"):
        assert f"<{name}>" in vocab
    assert tok.pad_token_id != tok.eos_token_id and tok.model_max_length == 35


@pytest.mark.parametrize("task", ["parity", "polynomial", "s3_product"])
@pytest.mark.parametrize("cot", [True, False])
def test_round_trip_text_ids_text(tok, task, cot):
    t = get_task(task)
    x = t.sample_inputs(5, 7, np.random.default_rng(0))
    s = t.run(x)
    layout = Layout(tok, task, cot=cot)
    ids = layout.ids(x, s)
    for row, (xi, si) in enumerate(zip(x, s)):
        text = layout.text(xi, si)
        assert tok(text)["input_ids"] == ids[row].tolist()
        assert tok.decode(ids[row]) == text
    assert ids.shape[1] == (2 * 7 + 3 if cot else 7 + 4)


def test_layout_positions(tok):
    layout = Layout(tok, "polynomial")
    ids = layout.ids(np.array([[3, 4, 10]]), np.array([[3, 2, 10]]))[0]
    vocab = tok.get_vocab()
    assert ids[0] == vocab["<polynomial>"] and ids[Layout.eoi_index(3)] == vocab[EOI] and ids[-1] == vocab[EOS]
    assert ids[1:4].tolist() == [3, 4, 10] and ids[5:8].tolist() == [3, 2, 10]
    no_cot = Layout(tok, "polynomial", cot=False).ids(np.array([[3, 4, 10]]), np.array([[3, 2, 10]]))[0]
    assert tok.decode(no_cot) == "<polynomial> 3 4 10 <eoi> 10 <eos>"


def test_saved_tokenizer_loads_with_autotokenizer(tok, tmp_path):
    save_tokenizer(tok, tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 4.x can load it too
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<parity> 1 0 1 <eoi> 1 1 0 <eos>"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.pad_token == "<pad>" and loaded.eos_token == EOS and loaded.model_max_length == 35
    assert is_native_tokenizer(loaded)


def test_missing_vocabulary_is_refused():
    small = build_tokenizer(tasks=["parity"])
    check_vocabulary(small, "parity")
    with pytest.raises(IterHeadsError, match="<polynomial>"):
        Layout(small, "polynomial")
    with pytest.raises(IterHeadsError, match="too small"):
        build_tokenizer(tasks=["cumsum_mod20"], n_values=16)
    assert len(build_tokenizer(tasks=["cumsum_mod20"]).get_vocab()) >= 20
