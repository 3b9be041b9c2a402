"""The text organism's data pipeline: batches are detector probes with the loss on the states only, the compact
vocabulary round-trips through the full-size model, and a second stage continues the first exactly."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_iterheads.bundled import bundled_path
from hf_iterheads.training.text_data import TextData, TextRecipe, compact_model, continue_from, train_text_organism, vocabulary

TOKENIZER = str(bundled_path("text-organism"))  # GPT-2's tokenizer files ship inside the bundled organism


def _recipe(**kw) -> TextRecipe:
    base = dict(tokenizer=TOKENIZER, lengths="2-5", n_positions=64, n_embd=16, batch_size=4, max_steps=3, warmup_steps=1,
                shots=(0, 1), templates=("{inputs} -> {states}",))
    return TextRecipe(**{**base, **kw})


def test_batches_score_only_the_states():
    recipe = _recipe()
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    vocab = vocabulary(tok, recipe)
    batch = TextData(tok, recipe, vocab).batch(0)
    arrow = int(vocab.to_compact[tok(" ->")["input_ids"][0]])
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        scored = np.flatnonzero(labels.numpy() >= 0)
        last_arrow = int(np.flatnonzero(ids.numpy() == arrow).max())
        assert len(scored) >= 2 and scored.min() > last_arrow  # the probe's own states, never the shots or inputs
        assert (labels[scored] == ids[scored]).all()


def test_a_second_stage_continues_the_first_exactly(tmp_path):
    recipe = _recipe()
    first = train_text_organism(recipe, tmp_path / "stage1")
    full = AutoModelForCausalLM.from_pretrained(first, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(first)
    vocab = vocabulary(tok, recipe)
    compact = compact_model(recipe, vocab).eval()
    assert continue_from(compact, vocab, first) == {"continued_from": str(first)}
    ids = torch.tensor([tok("3 7 2 -> 3 9")["input_ids"]])
    with torch.no_grad():
        want = full(ids).logits[..., torch.from_numpy(vocab.ids[1:])]
        got = compact(vocab.map(ids)).logits[..., 1:]
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)  # bf16 on disk, float32 here: the same weights
    second = train_text_organism(_recipe(init_from=str(first), shots=(0, 0, 1)), tmp_path / "stage2")
    meta = AutoModelForCausalLM.from_pretrained(second).config.iterheads
    assert meta["init_from"] == str(first) and meta["shots"] == [0, 0, 1]  # the draw list as given: the recipe reruns
    assert AutoTokenizer.from_pretrained(second)("3 7")["input_ids"] == tok("3 7")["input_ids"]


def test_bad_runs_leave_nothing_and_never_replace_what_they_did_not_write(tmp_path):
    import pytest

    from hf_iterheads.errors import IterHeadsError

    with pytest.raises(IterHeadsError, match="not divisible by n-head"):
        train_text_organism(_recipe(n_head=3), tmp_path / "odd")
    with pytest.raises(IterHeadsError, match="more than n_positions"):  # found at the first batch, after the work began
        train_text_organism(_recipe(n_positions=8), tmp_path / "short")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no folder, no temporary sibling
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for overwrite, said in ((False, "exists and is not empty"), (True, "not written by hf-iterheads text_data")):
        with pytest.raises(IterHeadsError, match=said):
            train_text_organism(_recipe(), mine, overwrite=overwrite)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    out = train_text_organism(_recipe(), tmp_path / "run")
    again = train_text_organism(_recipe(seed=1), out, overwrite=True)  # its own folder: replaced whole
    assert AutoModelForCausalLM.from_pretrained(again).config.iterheads["seed"] == 1
