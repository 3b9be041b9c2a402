"""The paper's model as a stock GPT-2 config, its presets, frozen positions, and checkpoint loading."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_iterheads.errors import IterHeadsError
from hf_iterheads.modeling import (
    PRESETS,
    build_config,
    build_model,
    check_fits,
    load_checkpoint,
)
from hf_iterheads.tokenizer import EOS, PAD, build_tokenizer, save_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_paper_preset_is_the_paper_model(tok):
    c = build_config(tok, n_len=16, preset="paper", tasks=["polynomial"])
    assert (c.n_layer, c.n_head, c.n_embd, c.n_inner, c.n_positions) == (2, 1, 128, 512, 35)
    assert (c.embd_pdrop, c.resid_pdrop, c.attn_pdrop) == (0.1, 0.0, 0.0)
    assert c.tie_word_embeddings is False
    vocab = tok.get_vocab()
    assert c.eos_token_id == vocab[EOS] and c.pad_token_id == vocab[PAD] and c.vocab_size == len(tok)
    assert c.iterheads["cot"] is True and c.iterheads["n_len"] == 16 and c.iterheads["tasks"] == ["polynomial"]
    model = build_model(c)
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()  # untied


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_and_runs(tok, preset):
    c = build_config(tok, n_len=4, preset=preset, n_embd=32 if preset not in ("width16",) else None)
    model = build_model(c)
    ids = torch.randint(0, len(tok), (2, 11))
    assert model(input_ids=ids).logits.shape == (2, 11, c.vocab_size)
    assert c.n_layer == PRESETS[preset]["n_layer"] and c.n_head == PRESETS[preset]["n_head"]


def test_bad_model_options(tok):
    with pytest.raises(IterHeadsError, match="unknown model preset"):
        build_config(tok, preset="gpt5")
    with pytest.raises(IterHeadsError, match="multiple of n_head"):
        build_config(tok, preset="4head", n_embd=30)
    with pytest.raises(IterHeadsError, match="does not fit"):
        check_fits(build_config(tok, n_len=4), 2 * 5 + 3)
    with pytest.raises(IterHeadsError, match="query_init_scale must be 0 or more"):
        build_config(tok, query_init_scale=-1)


def test_query_init_scale_sets_the_attention_temperature_at_init(tok):
    """Scaling the initial query weights scales every attention logit; 0 gives uniform causal attention."""
    ids = torch.randint(0, len(tok), (2, 9))

    def run(scale):
        model = build_model(build_config(tok, n_len=4, preset="tiny", query_init_scale=scale), seed=5).eval()
        model.config._attn_implementation = "eager"
        return model, model(input_ids=ids, output_attentions=True).attentions

    (base, plain), (_, hot) = run(1.0), run(3.0)
    cold_model, cold = run(0.0)
    uniform = torch.tril(torch.ones(9, 9)) / torch.arange(1, 10).unsqueeze(1)
    for a in cold:
        torch.testing.assert_close(a[0, 0], uniform)
    for p, h in zip(plain, hot):  # hotter: farther from uniform
        assert (h - uniform).abs().sum() > (p - uniform).abs().sum()
    n = base.config.n_embd
    w, w0 = base.transformer.h[0].attn.c_attn.weight, cold_model.transformer.h[0].attn.c_attn.weight
    assert torch.equal(w[:, n:], w0[:, n:]) and not w0[:, :n].any()  # keys and values untouched
    assert cold_model.config.iterheads["query_init_scale"] == 0.0


def test_frozen_positions_survive_save_and_load(tok, tmp_path):
    model = build_model(build_config(tok, n_len=4, preset="frozen-pos", n_embd=32), seed=3)
    assert not model.transformer.wpe.weight.requires_grad
    model.save_pretrained(tmp_path)
    save_tokenizer(tok, tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # plain transformers, no remote code
    assert AutoTokenizer.from_pretrained(tmp_path).get_vocab() == tok.get_vocab()
    assert torch.equal(plain.transformer.wpe.weight, model.transformer.wpe.weight)
    again, _ = load_checkpoint(tmp_path, for_training=True)
    assert not again.transformer.wpe.weight.requires_grad  # re-frozen from config.iterheads
    assert again.transformer.wte.weight.requires_grad


def test_load_checkpoint_refuses_non_checkpoints(tmp_path):
    with pytest.raises(IterHeadsError, match="no such folder, and not a bundled checkpoint"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(IterHeadsError, match="not a model checkpoint"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("preset, cot, attn, offsets", [("paper", True, "sdpa", False), ("4head", True, "eager", False),
                                                      ("3layer", False, "sdpa", False), ("paper", True, "sdpa", True)])
def test_loss_after_eoi_matches_the_stock_loss_and_gradients(tok, preset, cot, attn, offsets):
    # Training computes the loss without the last layer's work before EoI; it must be the stock loss exactly,
    # on a right-padded batch of mixed lengths too (eval mode: the embedding dropout is the only random part).
    import numpy as np

    from hf_iterheads.modeling import loss_after_eoi
    from hf_iterheads.tasks import get_task
    from hf_iterheads.tokenizer import Layout
    from hf_iterheads.training.data import assemble, position_offsets

    model = build_model(build_config(tok, n_len=8, preset=preset, cot=cot, n_embd=32), seed=1).eval()
    model.set_attn_implementation(attn)
    task, rng, layout = get_task("parity"), np.random.default_rng(0), Layout(tok, "parity", cot)
    groups = []
    for L, n in ((3, 2), (8, 3), (5, 1)):
        x = task.sample_inputs(n, L, rng)
        groups.append((layout, x, task.run(x)))
    batch = assemble(groups, layout.pad_id)
    assert (batch["attention_mask"] == 0).any()  # padding present
    if offsets:  # --position-offsets: every row shifted inside the context
        batch["position_ids"] = position_offsets(batch["attention_mask"], model.config.n_positions, rng)
        assert (batch["position_ids"][:, 0] > 0).any() and int(batch["position_ids"].max()) < model.config.n_positions
    params = [p for p in model.parameters()]
    stock = model(**batch).loss
    ours, logits, targets = loss_after_eoi(model, batch["input_ids"], batch["labels"], batch.get("position_ids"))
    assert torch.allclose(stock, ours, atol=1e-6)
    assert logits.shape[:2] == targets.shape and (targets != -100).sum() == (batch["labels"] != -100).sum()
    for a, b in zip(torch.autograd.grad(stock, params), torch.autograd.grad(ours, params)):
        assert torch.allclose(a, b, atol=1e-6)
