"""Loading a causal LM the Hub way (local folder, bundled checkpoint or repo id), with one-line errors."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import IterHeadsError
from ..modeling import bundled_path, is_load_error, load_error_message
from .criteria import DTYPE_NAMES

DTYPES = dict(zip(DTYPE_NAMES, ("auto", torch.float32, torch.float16, torch.bfloat16, "fast")))


def fast_dtype(device: str) -> torch.dtype:
    """Half precision where the device runs it faster (bf16 on CUDA that has it, else fp16; bf16 on a CPU with AMX
    tiles), float32 elsewhere: AVX-512 bf16 alone runs a 2048 x 5632 matmul slower than float32 (measured).
    Scores in half precision match float32 within 0.02 (tested)."""
    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if str(device).startswith("mps"):
        return torch.float16
    return torch.bfloat16 if _cpu_has_amx() else torch.float32


def _cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (torch's own probe, which also asks the kernel for them)."""
    probe = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    return bool(probe()) if probe is not None else False


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model_name(name: str) -> str:
    """A local folder, a checkpoint shipped with the package (by short name), or a Hub repo id."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if bundled_path(name):
        return str(bundled_path(name))
    if not _HUB_ID.fullmatch(name):
        raise IterHeadsError(f"{name!r}: no such folder, not a bundled checkpoint, and not a valid Hub id (ORG/NAME)")
    return name


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise IterHeadsError(f"--device {device}: this torch build sees no CUDA device (use cpu or auto)")
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise IterHeadsError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto") from None
    return device


def load_model(
    name: str,
    revision: str | None = None,
    dtype: str = "float32",
    device: str | None = "cpu",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
):
    """(model, tokenizer) the Hub way, with eager attention so weights exist; clear one-line errors."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if dtype not in DTYPES:
        raise IterHeadsError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    path = resolve_model_name(name)
    common = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(path, **common)
    except (OSError, ValueError) as err:
        hint = (
            "HF_HUB_OFFLINE=1 is set, so only models already in the Hub cache ($HF_HOME/hub) or local folders load"
            if _offline()
            else "if this machine is offline, set HF_HUB_OFFLINE=1 and put the model in the Hub cache, or pass a local folder"
        )
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise IterHeadsError(f"cannot load model {name!r}{f' at revision {revision}' if revision else ''}: {first} ({hint})") from None
    auto_map = getattr(config, "auto_map", None) or {}
    if getattr(config, "is_encoder_decoder", False) or (
        type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not (trust_remote_code and "AutoModelForCausalLM" in auto_map)
    ):
        raise IterHeadsError(f"{name!r} is not a causal language model ({type(config).__name__}); the detector needs a decoder-only LM")
    chosen = DTYPES[dtype]
    if chosen == "fast":
        chosen = fast_dtype("cuda" if device_map is not None and torch.cuda.is_available() else _resolve_device(device))
    kwargs: dict[str, Any] = {**common, "dtype": chosen, "attn_implementation": "eager"}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
    except Exception as err:  # noqa: BLE001 -- every broken checkpoint is one line; anything else is re-raised
        if not (isinstance(err, RuntimeError) or is_load_error(err)):
            raise
        raise IterHeadsError(load_error_message(name, err)) from None
    if device_map is None:
        model.to(_resolve_device(device))
    model.eval()
    return model, tokenizer


def context_length(model) -> int | None:
    cfg = model.config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@torch.no_grad()
def check_causal(model, name: str) -> None:
    """Refuse a model whose earlier positions see later tokens (e.g. BERT loaded as a bidirectional
    ``BertLMHeadModel``): the iteration head is a causal mechanism, and scores would mean nothing."""
    vocab = int(model.get_input_embeddings().num_embeddings)
    device = next(model.parameters()).device
    ids = (torch.arange(3, 11, device=device) % vocab)[None]
    changed = ids.clone()
    changed[0, 4:] = (changed[0, 4:] + 1) % vocab  # the later half changes; a causal model's first half cannot see it
    a, b = (model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, :4].float() for x in (ids, changed))
    dtype = next(model.parameters()).dtype
    noise = 64 * torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps * (1 + a.abs().max())
    if (a - b).abs().max() > noise:
        raise IterHeadsError(f"{name!r} is not a causal LM: its predictions at earlier positions change with a later "
                             "token (a bidirectional encoder?); the detector needs a decoder-only causal LM")
