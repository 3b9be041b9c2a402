"""The paper's model as a stock ``GPT2LMHeadModel``, its ablation presets, and checkpoint loading.

Why stock GPT-2: a checkpoint must load with plain ``AutoModelForCausalLM.from_pretrained(dir)``, no remote
code. The paper's transformer (paper.md section 5) is 2 layers, 1 head, d = 128, MLP 512, learned absolute
positions, untied output layer, dropout 0.1 on the embeddings only, context ``2 * n_len + 3``. GPT-2 adds
biases and uses a standard pre-norm; both are documented differences.

What the config cannot say in GPT-2's own words (the preset, CoT or not, the training lengths, whether the
positional embeddings are frozen) is stored as metadata in ``config.iterheads``: it survives ``save_pretrained``
and lets training re-freeze positions when a checkpoint is loaded again (e.g. for fine-tuning).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
)

# the bundled checkpoints are found torch-free (bundled.py); these names stay importable from here
from .bundled import BUNDLED as BUNDLED
from .bundled import bundled_checkpoints, bundled_path
from .errors import IterHeadsError
from .presets import PRESETS  # torch-free, so the CLI checks a preset fast; modeling.PRESETS keeps working
from .tasks import get_task
from .tokenizer import EOI, EOS, PAD, is_native_tokenizer

GPT2_INIT_RANGE = 0.02  # GPT-2's own initializer_range, when none is given; the training recipes set their own


def max_sequence_length(n_len: int) -> int:
    """Longest sequence for training lengths 1..n_len: the CoT layout, ``2 * n_len + 3`` (no-CoT is shorter)."""
    return 2 * int(n_len) + 3


def build_config(
    tokenizer,
    n_len: int = 16,
    preset: str = "paper",
    cot: bool = True,
    tasks: list[str] | None = None,
    **overrides,
) -> GPT2Config:
    """A GPT2Config for ``preset`` with the tokenizer's special ids; ``overrides`` (n_layer, n_embd, ...) win.

    ``freeze_positions`` may be passed as an override; it is stored in ``config.iterheads``.
    """
    if preset not in PRESETS:
        raise IterHeadsError(f"unknown model preset {preset!r}; known presets: {', '.join(PRESETS)}")
    if int(n_len) < 1:
        raise IterHeadsError(f"n_len must be at least 1, got {n_len}")
    spec = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    freeze = bool(spec.pop("freeze_positions", False))
    init_range = float(spec.pop("initializer_range", None) or GPT2_INIT_RANGE)
    embed_std = float(spec.pop("embed_init_std", None) or 0.0)
    query_scale = spec.pop("query_init_scale", None)
    query_scale = 1.0 if query_scale is None else float(query_scale)
    if query_scale < 0:
        raise IterHeadsError(f"query_init_scale must be 0 or more, got {query_scale}")
    n_embd, n_head = int(spec.pop("n_embd")), int(spec.pop("n_head"))
    if n_embd < 1 or n_head < 1 or n_embd % n_head:
        raise IterHeadsError(f"n_embd ({n_embd}) must be a positive multiple of n_head ({n_head})")
    n_layer = int(spec.pop("n_layer"))
    if n_layer < 1:
        raise IterHeadsError(f"n_layer must be at least 1, got {n_layer}")
    n_inner = int(spec.pop("n_inner", None) or 4 * n_embd)
    if spec:
        raise IterHeadsError(f"unknown model option(s): {', '.join(spec)}")
    vocab = tokenizer.get_vocab()
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=max_sequence_length(n_len),
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        n_inner=n_inner,
        activation_function="gelu",  # exact GELU, as in the reference MLP
        embd_pdrop=0.1,  # the paper's only dropout
        resid_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,  # the paper's output layer is untied
        initializer_range=init_range,
        bos_token_id=vocab[EOS],  # there is no BoS token: GPT-2 itself uses one id for both
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[PAD],
        iterheads={
            "preset": preset,
            "n_len": int(n_len),
            "cot": bool(cot),
            "freeze_positions": freeze,
            "embed_init_std": embed_std,
            "query_init_scale": query_scale,
            "tasks": list(tasks or []),
            "eoi_token_id": vocab[EOI],
        },
    )


def iterheads_meta(config) -> dict:
    """The project metadata of a config ({} for models not trained by this project)."""
    meta = getattr(config, "iterheads", None)
    meta = dict(meta) if isinstance(meta, dict) else {}
    for source in (meta.get("task_sources") or {}).values():  # tasks from a user's module: import them again
        get_task(source)
    return meta


def freeze_positions(model: GPT2LMHeadModel) -> None:
    """Keep the random initial positional embeddings: no gradient, so Adam never touches them."""
    model.transformer.wpe.weight.requires_grad_(False)


def build_model(config: GPT2Config, seed: int = 0) -> GPT2LMHeadModel:
    """A freshly initialised model (seeded), with frozen positions when the config asks for it."""
    torch.manual_seed(int(seed))
    model = GPT2LMHeadModel(config)
    embed_std = iterheads_meta(config).get("embed_init_std")
    if embed_std:  # an init choice only: the checkpoint stays a stock GPT-2
        with torch.no_grad():
            model.transformer.wte.weight.normal_(0.0, embed_std)
            model.transformer.wpe.weight.normal_(0.0, embed_std)
    query_scale = iterheads_meta(config).get("query_init_scale", 1.0)
    if query_scale != 1.0:  # the attention temperature at init (0: uniform attention at step 0); still stock GPT-2
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_attn.weight[:, : config.n_embd].mul_(query_scale)  # Conv1D: columns q | k | v
                block.attn.c_attn.bias[: config.n_embd].mul_(query_scale)
    if iterheads_meta(config).get("freeze_positions"):
        freeze_positions(model)
    return model


# --- the training loss, computing only what it depends on ---------------------------------------------------


def supports_loss_after_eoi(model) -> bool:
    """Whether :func:`loss_after_eoi` reproduces ``model(...).loss``: a plain GPT-2 self-attention stack."""
    return isinstance(model, GPT2LMHeadModel) and not model.config.add_cross_attention


def _block(block, h: torch.Tensor, start: int) -> torch.Tensor:
    """One ``GPT2Block`` (its own modules and scaling), returning only the positions ``start..``.

    Keys and values come from every position; queries, the output projection and the MLP only from ``start`` on.
    The causal mask is written here (not left to the attention backend), so the result does not depend on
    ``config._attn_implementation``."""
    attn = block.attn
    q, k, v = attn.c_attn(block.ln_1(h)).split(attn.split_size, dim=2)
    q = q[:, start:]
    B, T, Q = h.shape[0], h.shape[1], q.shape[1]
    q, k, v = (t.view(B, t.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2) for t in (q, k, v))
    # Query i sits at position start + i and sees keys 0..start + i (a lower-right aligned causal mask).
    mask = None if start == 0 else torch.ones(Q, T, dtype=torch.bool, device=h.device).tril(start)
    z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=start == 0, scale=attn.scaling,
                                       dropout_p=attn.attn_dropout.p if block.training else 0.0)
    h = h[:, start:] + attn.resid_dropout(attn.c_proj(z.transpose(1, 2).reshape(B, Q, -1)))
    return h + block.mlp(block.ln_2(h))


def loss_after_eoi(model: GPT2LMHeadModel, input_ids: torch.Tensor, labels: torch.Tensor,
                   position_ids: torch.Tensor | None = None):
    """``model(input_ids, labels=labels).loss`` for right-padded batches, without the work the loss ignores.

    The loss is only on the tokens after EoI (the states and EoS), so in the last layer nothing but the keys
    and values is needed at the positions before EoI (about half the sequence), and the last token (EoS)
    predicts nothing anywhere. The same modules run in the same order, so the gradients are those of the stock
    forward (tests compare the two). Padding is on the right, so causal attention never reads it and no mask
    is needed. Returns (loss, logits, targets) with ``logits[:, i]`` predicting ``targets[:, i]``.
    """
    scored = labels[:, 1:] != -100
    start = int(scored.int().argmax(1).min())  # the first position whose next token is scored (EoI)
    ids, targets = input_ids[:, :-1], labels[:, start + 1 :]
    tr = model.transformer
    positions = torch.arange(ids.shape[1], device=ids.device) if position_ids is None else position_ids[:, :-1]
    h = tr.drop(tr.wte(ids) + tr.wpe(positions))
    for i, block in enumerate(tr.h):
        h = _block(block, h, start if i == len(tr.h) - 1 else 0)
    logits = model.lm_head(tr.ln_f(h))
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
    return loss, logits, targets


def weights_damaged(err: BaseException) -> bool:
    """Whether a loading error says the safetensors file is truncated or corrupt (safetensors' own error)."""
    return type(err).__name__ == "SafetensorError" or "deserializing header" in str(err)


def is_load_error(err: BaseException) -> bool:
    """Whether ``err`` from ``from_pretrained`` on a local folder means a broken checkpoint (not a bug here):
    unreadable files, bad JSON, a config field of the wrong type (huggingface_hub's strict dataclasses)."""
    return isinstance(err, (OSError, ValueError, KeyError, TypeError)) or weights_damaged(err) or any(
        cls.__name__ == "StrictDataclassError" for cls in type(err).__mro__)


def load_error_message(path: str | Path, err: BaseException) -> str:
    """One line for a checkpoint that does not load: damaged weights said as such, else the first line."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if weights_damaged(err):
        return f"{path}: the weights file is damaged or incomplete ({first}); copy or download model.safetensors again"
    return f"cannot load a model and tokenizer from {path}: {first}"


def load_checkpoint(path: str | Path, for_training: bool = False):
    """(model, tokenizer) from a saved checkpoint directory, with one clear error when it is not one.

    ``for_training=True`` re-applies frozen positional embeddings (``requires_grad`` is not saved).
    """
    given = str(path)
    path = Path(path) if Path(path).is_dir() else (bundled_path(given) or Path(path))
    if not path.is_dir():
        if path.exists():
            raise IterHeadsError(f"{path} is a file; expected a checkpoint folder saved by hf-iterheads train")
        known = ", ".join(bundled_checkpoints()) or "none"
        raise IterHeadsError(f"{given} is not a directory: no such folder, and not a bundled checkpoint (bundled: {known})")
    missing = [f for f in ("config.json", "model.safetensors") if not (path / f).is_file()]
    if missing:
        raise IterHeadsError(f"{path} is not a model checkpoint: it has no {' or '.join(missing)}")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors, json and transformers raise many types; one line
        if not is_load_error(err):
            raise
        raise IterHeadsError(load_error_message(path, err)) from None
    if not is_native_tokenizer(tokenizer):
        raise IterHeadsError(f"{path} has a tokenizer without this project's <eoi>/<eos>/value tokens")
    if len(tokenizer) > model.config.vocab_size:
        raise IterHeadsError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}"
        )
    if for_training and iterheads_meta(model.config).get("freeze_positions"):
        freeze_positions(model)
    return model, tokenizer


def check_fits(config, seq_len: int, what: str = "sequence") -> None:
    """Refuse sequences longer than the model's learned positions (they would index past ``wpe``)."""
    n_positions = int(getattr(config, "n_positions", 0) or getattr(config, "max_position_embeddings", 0))
    if n_positions and seq_len > n_positions:
        raise IterHeadsError(
            f"a {what} of {seq_len} tokens does not fit the model's context of {n_positions} positions "
            f"(a CoT sequence of length L takes 2L+3 tokens)"
        )


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
