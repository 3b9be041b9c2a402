"""Probe sequences for the detector: teacher-forced CoT chains with the index of every token that matters.

A probe is one task instance written out with its chain of states. For each probe we record

* ``x_pos[t]``     -- the (first) token of input ``x_t``;
* ``state_pos[t]`` -- the (first) token of state ``s_t``;
* ``pred_pos[t]``  -- the token that predicts ``s_t`` (the one just before it; for ``t = 1`` that is EoI);
* ``eoi_pos``      -- the end-of-input marker, i.e. ``pred_pos[1]`` (paper: EoI plays the role of ``s_0``).

Two renderings:

* ``native``: the project's tokenizer and layout (``<task> x_1..x_L <eoi> s_1..s_L <eos>``), exact by construction;
* ``text``: any tokenizer, through a template such as ``"{inputs} -> {states}"`` (the default) or
  ``"<polynomial> {inputs} <eoi> {states} <eos>"``. ``{inputs:SEP}`` / ``{states:SEP}`` set the string
  that joins values (a space by default). Positions come from the tokenizer's offset mapping, so a BOS
  token the tokenizer adds, digits split into pieces (score the first piece, or refuse with
  ``multi_token="refuse"``), and values merged with their neighbours (refused) are all handled explicitly.

Lengths are mixed (4..16 by default) so a head that looks a fixed distance back cannot pass as an
iteration head; bits repeat a lot, so a head that matches content cannot either.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..circuit import circuit_pairs, native_positions
from ..errors import IterHeadsError
from ..tasks import IterativeTask, get_task
from ..tasks import parse_lengths as tasks_parse_lengths
from ..tokenizer import Layout, is_native_tokenizer
from . import prompts
from .prompts import DEFAULT_TEMPLATE, render


def parse_lengths(spec: str | int | Sequence[int]) -> list[int]:
    """Probe lengths: at least 2, since the x_(t-1) and x_(t+1) controls need neighbours."""
    return tasks_parse_lengths(spec, minimum=2)


@dataclass
class Probes:
    """A batch of probes, right-padded; index tensors are (N, L_max) with -1 where t > L."""

    task: str
    rendering: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: np.ndarray
    inputs: np.ndarray  # (N, L_max) values, -1 padded
    states: np.ndarray
    x_pos: torch.Tensor
    state_pos: torch.Tensor
    pred_pos: torch.Tensor
    eoi_pos: torch.Tensor
    target_ids: torch.Tensor  # (N, L_max) id of the (first) token of s_t, -1 padded
    template: str | None = None
    texts: list[str] | None = None
    bos: bool = False
    multi_token: bool = False
    shots: int = 0  # worked examples before each probe (text rendering)
    chat: bool = False  # wrapped in the tokenizer's chat template
    seq_lens: np.ndarray = field(default=None)  # tokens per probe
    informative: np.ndarray = field(default=None)  # (N, L_max) True where s_t depends on x_t

    def __post_init__(self) -> None:
        if self.seq_lens is None:
            self.seq_lens = self.attention_mask.sum(1).numpy()
        if self.informative is None:
            self.informative = self.x_pos.numpy() >= 0

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def max_tokens(self) -> int:
        return int(self.seq_lens.max())

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Index arrays of probes of similar token count (little padding), longest first."""
        order = np.argsort(-self.seq_lens, kind="stable")
        for i in range(0, len(order), max(1, int(batch_size))):
            yield np.sort(order[i : i + batch_size])

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Model inputs for the probes ``idx``, trimmed to their longest sequence."""
        width = int(self.seq_lens[idx].max())
        return {"input_ids": self.input_ids[idx, :width], "attention_mask": self.attention_mask[idx, :width]}

    def pairs(self, idx: np.ndarray) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(queries, keys) of the circuit (``circuit.circuit_pairs``) for the probes ``idx``.

        ``iteration`` and its controls use only the informative steps (see ``IterativeTask.informative``);
        ``iteration_all`` keeps every step.
        """
        return circuit_pairs(self.x_pos[idx], self.state_pos[idx], self.pred_pos[idx], self.eoi_pos[idx],
                             torch.from_numpy(self.informative[idx]))


def concat_probes(parts: Sequence[Probes]) -> Probes:
    """Several renderings (e.g. one per template) as one batch, so ablation runs once over all of them."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.input_ids.shape[1] for p in parts)

    def widen(t: torch.Tensor) -> torch.Tensor:  # right padding is masked out; id 0 exists in every vocabulary
        return torch.nn.functional.pad(t, (0, width - t.shape[1]))

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(p, name) for p in parts])

    def stack(name: str) -> np.ndarray:
        return np.concatenate([getattr(p, name) for p in parts])

    first = parts[0]
    return Probes(
        task=first.task, rendering=first.rendering,
        input_ids=torch.cat([widen(p.input_ids) for p in parts]), attention_mask=torch.cat([widen(p.attention_mask) for p in parts]),
        lengths=stack("lengths"), inputs=stack("inputs"), states=stack("states"), x_pos=cat("x_pos"), state_pos=cat("state_pos"),
        pred_pos=cat("pred_pos"), eoi_pos=cat("eoi_pos"), target_ids=cat("target_ids"), template=first.template,
        texts=[t for p in parts for t in (p.texts or [])] or None, bos=any(p.bos for p in parts),
        multi_token=any(p.multi_token for p in parts), shots=first.shots, chat=first.chat,
        seq_lens=stack("seq_lens"), informative=stack("informative"),
    )


def select_probes(probes: Probes, idx: np.ndarray) -> Probes:
    """The probes ``idx`` only (e.g. those a sequential verdict ran), trimmed to their longest sequence."""
    idx = np.asarray(idx, dtype=np.int64)
    if len(idx) == len(probes) and (idx == np.arange(len(probes))).all():
        return probes
    width, t = int(probes.seq_lens[idx].max()), torch.from_numpy(idx)
    texts = [probes.texts[i] for i in idx] if probes.texts else None
    return Probes(
        task=probes.task, rendering=probes.rendering, input_ids=probes.input_ids[t, :width],
        attention_mask=probes.attention_mask[t, :width], lengths=probes.lengths[idx], inputs=probes.inputs[idx],
        states=probes.states[idx], x_pos=probes.x_pos[t], state_pos=probes.state_pos[t], pred_pos=probes.pred_pos[t],
        eoi_pos=probes.eoi_pos[t], target_ids=probes.target_ids[t], template=probes.template, texts=texts, bos=probes.bos,
        multi_token=probes.multi_token, shots=probes.shots, chat=probes.chat, seq_lens=probes.seq_lens[idx],
        informative=probes.informative[idx],
    )


def _pad(rows: list[np.ndarray], width: int, fill: int = -1) -> np.ndarray:
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def sample_chains(task: IterativeTask, lengths: list[int], n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` (inputs, states) chains, lengths taken in turn so every length is equally represented."""
    rng = np.random.default_rng(seed)
    per = {L: sum(1 for i in range(n) if lengths[i % len(lengths)] == L) for L in lengths}
    chains = []
    for L, count in per.items():
        if count:
            xs = task.sample_inputs(count, L, rng)
            chains.extend(zip(xs, task.run(xs)))
    return chains


def native_probes(tokenizer, task: str | IterativeTask, lengths, n: int = 64, seed: int = 0) -> Probes:
    """Probes in the project's own layout: positions are known without looking at any text."""
    task = get_task(task)
    if not is_native_tokenizer(tokenizer):
        raise IterHeadsError("the native rendering needs the project's tokenizer (<eoi>, <eos>, value tokens); use --rendering text")
    layout = Layout(tokenizer, task, cot=True)
    chains = sample_chains(task, parse_lengths(lengths), n, seed)
    ids, xp, sp, tg = [], [], [], []
    for xs, ss in chains:
        L = len(xs)
        row = layout.ids(xs[None], ss[None])[0]
        ids.append(row)
        x_pos, state_pos, _, _ = native_positions(L)
        xp.append(x_pos.numpy())
        sp.append(state_pos.numpy())
        tg.append(row[L + 2 : 2 * L + 2])
    return _assemble(task, "native", chains, ids, xp, sp, tg, layout.pad_id)


def _assemble(task, rendering, chains, ids, xp, sp, tg, pad_id, **extra) -> Probes:
    lmax = max(len(c[0]) for c in chains)
    width = max(len(r) for r in ids)
    input_ids = _pad(ids, width, pad_id)
    mask = _pad([np.ones(len(r)) for r in ids], width, 0)
    state_pos = torch.from_numpy(_pad(sp, lmax))
    pred_pos = torch.where(state_pos >= 0, state_pos - 1, -1)
    return Probes(
        task=task.name,
        rendering=rendering,
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(mask),
        lengths=np.array([len(c[0]) for c in chains]),
        inputs=_pad([c[0] for c in chains], lmax),
        states=_pad([c[1] for c in chains], lmax),
        x_pos=torch.from_numpy(_pad(xp, lmax)),
        state_pos=state_pos,
        pred_pos=pred_pos,
        eoi_pos=pred_pos[:, 0].clone(),
        target_ids=torch.from_numpy(_pad(tg, lmax)),
        informative=_pad([task.informative(c[0][None], c[1][None])[0] for c in chains], lmax, 0).astype(bool),
        **extra,
    )


class _Visible:
    """Whether a token, decoded on its own, shows any character (cached per id).

    SentencePiece tokenizers (Mistral, Llama, Phi-3, Gemma) prepend a lone ``▁`` token whose offset is the
    first character's, the same as the digit after it: by offsets alone it looks like part of the value.
    It decodes to nothing, so it carries no character of the value and must never be the value's token.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> bool:
        if token_id not in self.cache:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            self.cache[token_id] = bool(text.strip())
        return self.cache[token_id]


def _locate(
    text: str, offsets: list[tuple[int, int]], special: list[int], span: tuple[int, int], unk: int | None, ids,
    visible=None,
) -> tuple[int, int]:
    """(first token index, number of tokens) of the value at ``span``; refuses values merged with neighbours.

    A token counts only if its offsets overlap the value and (given ``visible``) it decodes to some character.
    """
    a, b = span
    hits = [
        i for i, (s, e) in enumerate(offsets)
        if not special[i] and e > s and e > a and s < b and (visible is None or visible(int(ids[i])))
    ]
    value = text[a:b]
    if not hits:
        raise IterHeadsError(f"the tokenizer gives value {value!r} no token of its own (offset mapping) in {text!r}")
    s0, _ = offsets[hits[0]]
    _, e1 = offsets[hits[-1]]
    if text[s0:a].strip() or e1 > b:
        merged = text[min(s0, a) : max(e1, b)]
        raise IterHeadsError(
            f"the tokenizer merges value {value!r} with neighbouring text into {merged!r}; "
            "change --template (e.g. put spaces between values) so each value starts its own token"
        )
    if unk is not None and any(ids[i] == unk for i in hits):
        raise IterHeadsError(f"the tokenizer has no token for value {value!r} (it becomes the unknown token)")
    return hits[0], len(hits)


def _check_text_args(tokenizer, template: str, multi_token: str, shots: int, chat: bool) -> None:
    """One-line errors for a text rendering that cannot work, before any probe is built."""
    if int(shots) < 0:
        raise IterHeadsError(f"--shots must be 0 or more, got {shots}")
    if chat and not prompts.has_chat_template(tokenizer):
        prompts.chat(tokenizer, DEFAULT_TEMPLATE, [], [0], [0])  # raises the one-line error
    if multi_token not in ("first", "refuse"):
        raise IterHeadsError(f"multi_token must be 'first' or 'refuse', got {multi_token!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise IterHeadsError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: the text rendering needs its offset mapping"
        )
    render(template, [0], [0])  # placeholder errors first
    between = template[template.index("}") + 1 : template.index("{states")]
    if not between.strip():
        raise IterHeadsError(f"template {template!r} needs a marker between {{inputs}} and {{states}} (it plays EoI), e.g. ' -> '")


def _value_tokens(text: str, enc, spans: list[tuple[int, int]], unk, visible, multi_token: str) -> tuple[list[int], bool]:
    """(first token of each value at ``spans``, whether any value is split into several tokens)."""
    row, offsets, special = enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]], enc["special_tokens_mask"]
    firsts, split = [], False
    for span in spans:
        first, count = _locate(text, offsets, special, span, unk, row, visible)
        if count > 1:
            split = True
            if multi_token == "refuse":
                raise IterHeadsError(
                    f"the tokenizer splits value {text[span[0]:span[1]]!r} into {count} tokens "
                    "(multi_token='refuse'); use multi_token='first' to score the first token"
                )
        firsts.append(first)
    return firsts, split


def text_probes(
    tokenizer,
    task: str | IterativeTask,
    lengths,
    n: int = 64,
    seed: int = 0,
    template: str | None = None,
    multi_token: str = "first",
    shots: int = 0,
    chat: bool = False,
) -> Probes:
    """Probes rendered as text for any fast tokenizer, positions aligned through the offset mapping.

    ``shots`` worked examples of the task come before each probe, and ``chat`` wraps them all in the
    tokenizer's chat template (:mod:`hf_iterheads.detect.prompts`); only the probe's own values are scored.
    """
    task = get_task(task)
    template = template or DEFAULT_TEMPLATE
    _check_text_args(tokenizer, template, multi_token, shots, chat)
    chains = sample_chains(task, parse_lengths(lengths), n, seed)
    examples = prompts.shot_chains(task, parse_lengths(lengths), chains, int(shots), seed)
    unk, visible = getattr(tokenizer, "unk_token_id", None), _Visible(tokenizer)
    ids, xp, sp, tg, texts = [], [], [], [], []
    bos = split = False
    for (xs, ss), shot in zip(chains, examples):
        render_fn = (lambda *a: prompts.chat(tokenizer, *a)) if chat else prompts.few_shot
        text, in_spans, st_spans = render_fn(template, shot, xs.tolist(), ss.tolist())
        # a chat template writes its own special tokens (BOS included), as apply_chat_template(tokenize=True) does
        enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True, add_special_tokens=not chat)
        x_first, x_split = _value_tokens(text, enc, in_spans, unk, visible, multi_token)
        s_first, s_split = _value_tokens(text, enc, st_spans, unk, visible, multi_token)
        split = split or x_split or s_split
        bos = bos or bool(enc["special_tokens_mask"][0])
        ids.append(np.asarray(enc["input_ids"]))
        xp.append(np.asarray(x_first))
        sp.append(np.asarray(s_first))
        tg.append(ids[-1][s_first])
        texts.append(text)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return _assemble(
        task, "text", chains, ids, xp, sp, tg, pad, template=template, texts=texts, bos=bos, multi_token=split,
        shots=int(shots), chat=bool(chat),
    )


def make_probes(
    tokenizer,
    task: str | IterativeTask = "parity",
    lengths="4-16",
    n: int = 64,
    seed: int = 0,
    rendering: str = "auto",
    template: str | None = None,
    multi_token: str = "first",
    shots: int = 0,
    chat: bool = False,
) -> Probes:
    """Native probes for the project's tokenizer, text probes otherwise (or as forced by ``rendering``)."""
    task = get_task(task)
    if int(n) < 1:
        raise IterHeadsError(f"--n must be at least 1, got {n}")
    textual = template is not None or int(shots) != 0 or bool(chat)
    if rendering == "auto":
        rendering = "native" if not textual and is_native_tokenizer(tokenizer) else "text"
    if rendering == "native":
        if textual:
            raise IterHeadsError("--template, --shots and --chat apply to the text rendering only")
        return native_probes(tokenizer, task, lengths, n, seed)
    if rendering == "text":
        return text_probes(tokenizer, task, lengths, n, seed, template, multi_token, shots, chat)
    raise IterHeadsError(f"unknown rendering {rendering!r}: use auto, native or text")
