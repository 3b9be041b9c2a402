"""One word-level tokenizer for every task, and the paper's sequence layout.

Layout (paper section 3), positions in brackets for a length-L chain::

    CoT:     <task>[0] x_1[1] .. x_L[L] <eoi>[L+1] s_1[L+2] .. s_L[2L+1] <eos>[2L+2]   (2L + 3 tokens)
    no CoT:  <task>[0] x_1[1] .. x_L[L] <eoi>[L+1] s_L[L+2] <eos>[L+3]                (L + 4 tokens)

Vocabulary: value ``v`` is the token ``"v"`` with id ``v`` (0 .. n_values-1, 16 by default), then
``<pad> <unk> <eoi> <eos>``, then one ``<name>`` token per task. Since all tasks share one vocabulary, one
model can be trained on a mixture and transferred from task to task. The tokenizer is a stock
``PreTrainedTokenizerFast`` saved so that ``AutoTokenizer.from_pretrained`` loads it in transformers 4 and 5.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from .errors import IterHeadsError
from .tasks import IterativeTask, get_task, task_names

PAD, UNK, EOI, EOS = "<pad>", "<unk>", "<eoi>", "<eos>"
DEFAULT_N_VALUES = 16


def task_token(task: str | IterativeTask) -> str:
    return f"<{get_task(task).name}>"


def build_tokenizer(
    tasks: Iterable[str | IterativeTask] | None = None, n_values: int | None = None, model_max_length: int = 35
) -> PreTrainedTokenizerFast:
    """The shared tokenizer: all registered tasks by default; ``model_max_length`` = 2 * n_len + 3."""
    task_objs = [get_task(t) for t in (task_names() if tasks is None else tasks)]
    needed = max([DEFAULT_N_VALUES] + [t.n_values for t in task_objs])
    n_values = needed if n_values is None else int(n_values)
    if n_values < needed:
        raise IterHeadsError(f"n_values={n_values} is too small: the tasks use values up to {needed - 1}")
    tokens = [str(v) for v in range(n_values)] + [PAD, UNK, EOI, EOS] + [f"<{t.name}>" for t in task_objs]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    backend = Tokenizer(WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=EOS,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tok.add_special_tokens({"additional_special_tokens": [EOI] + [f"<{t.name}>" for t in task_objs]})
    return tok


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> None:
    """``save_pretrained`` plus a class name that transformers 4.x also understands."""
    tokenizer.save_pretrained(str(directory))
    cfg_path = Path(directory) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(cfg.get("extra_special_tokens"), list):  # transformers 4.x reads the older key
        cfg["additional_special_tokens"] = cfg["extra_special_tokens"]
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def is_native_tokenizer(tokenizer) -> bool:
    """True when ``tokenizer`` speaks this project's vocabulary (value tokens, ``<eoi>``, ``<eos>``)."""
    vocab = tokenizer.get_vocab()
    return all(t in vocab for t in (EOI, EOS, PAD)) and all(str(v) in vocab for v in range(2))


def check_vocabulary(tokenizer, task: str | IterativeTask) -> None:
    """Refuse clearly when the tokenizer lacks a token that ``task`` needs."""
    task = get_task(task)
    vocab = tokenizer.get_vocab()
    needed = [task_token(task), EOI, EOS] + [str(v) for v in sorted(set(task.inputs + task.states))]
    missing = [t for t in needed if t not in vocab]
    if missing:
        raise IterHeadsError(f"the tokenizer has no token for {', '.join(missing)} needed by task {task.name!r}")


class Layout:
    """Turns (inputs, states) arrays into token ids, vectorised, for one tokenizer and one task.

    ``ids(...)`` builds whole equal-length batches with numpy, so training and evaluation never call
    the tokenizer per example; ``text(...)`` gives the same sequence as a space-separated string.
    """

    def __init__(self, tokenizer, task: str | IterativeTask, cot: bool = True) -> None:
        self.task = get_task(task)
        check_vocabulary(tokenizer, self.task)
        vocab = tokenizer.get_vocab()
        self.cot = cot
        self.value_ids = np.full(self.task.n_values, -1, dtype=np.int64)
        for v in set(self.task.inputs + self.task.states):
            self.value_ids[v] = vocab[str(v)]
        self.task_id, self.eoi_id, self.eos_id = vocab[task_token(self.task)], vocab[EOI], vocab[EOS]
        self.pad_id = vocab.get(PAD, self.eos_id)

    def seq_len(self, length: int) -> int:
        return 2 * length + 3 if self.cot else length + 4

    def ids(self, inputs: np.ndarray, states: np.ndarray) -> np.ndarray:
        """Token ids of shape (n, seq_len(L)) for inputs/states of shape (n, L)."""
        inputs, states = np.asarray(inputs), np.asarray(states)
        n, length = inputs.shape
        targets = states if self.cot else states[:, -1:]
        out = np.empty((n, self.seq_len(length)), dtype=np.int64)
        out[:, 0] = self.task_id
        out[:, 1 : length + 1] = self.value_ids[inputs]
        out[:, length + 1] = self.eoi_id
        out[:, length + 2 : -1] = self.value_ids[targets]
        out[:, -1] = self.eos_id
        return out

    def text(self, inputs: Iterable[int], states: Iterable[int]) -> str:
        inputs, states = list(inputs), list(states)
        targets = states if self.cot else states[-1:]
        return " ".join([task_token(self.task), *map(str, inputs), EOI, *map(str, targets), EOS])

    @staticmethod
    def eoi_index(length: int) -> int:
        """Index of ``<eoi>``; the position predicting ``s_t`` is ``eoi_index + t - 1`` and ``x_t`` is at ``t``."""
        return length + 1
