"""Training data on the text path: the tasks rendered as text, through a real tokenizer, for a model organism.

The detector probes a pretrained LM with text (``detect --template/--shots``): ``3 7 2 -> 3 9 2``, rendered by
:func:`hf_iterheads.detect.probes.text_probes` and :mod:`hf_iterheads.detect.prompts`. A model trained on the
project's own token layout says nothing about whether that path finds a head that is really there. This module
trains a small GPT-2 on exactly what the text path feeds an LLM: every batch *is* a set of detector probes
(``text_probes``: one template, K worked examples before each probe), with the loss on the probe's states. It
is a data pipeline for the training package's own pieces (``loop.make_accelerator``, ``loop.step_function``,
``schedule.make_scheduler``, ``callbacks.Progress``, ``data.position_offsets``), not a second trainer.

Vocabulary. The model keeps the tokenizer's ids (GPT-2: 50,257), so ``from_pretrained`` plus the tokenizer works
like any Hub model. Training only ever sees a few dozen of them, so it runs on a *compact* vocabulary (the ids
the rendered probes use, plus one shared row, ``OTHER``, for every other id) and :func:`expand` writes the
full-size model: row ``i`` of the embedding is the compact row of id ``i`` (``OTHER``'s for ids never seen).
Embeddings are tied, so the expanded model computes exactly the compact model's logits on the ids it knows, and
every unseen id gets ``OTHER``'s logit, which training pushes below the answers (it is never a target).
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..detect.probes import DEFAULT_TEMPLATE, text_probes
from ..errors import IterHeadsError
from ..outputs import atomic_output_dir
from ..tasks import get_task

# what `detect --template` renders: the default, and the two wordings the README shows for LLMs
TRAIN_TEMPLATES = (DEFAULT_TEMPLATE, "Input: {inputs:, }\nOutput: {states:, }", "{inputs:, } = {states:, }")
# a wording never trained on (its marker `=>` and the `;` are unseen ids): how much the score drops off-distribution
HELD_OUT_TEMPLATES = ("{inputs} => {states} ;",)
OTHER = 0  # compact id shared by every token id training never shows


@dataclass
class TextRecipe:
    """Everything that defines a text organism's training run (written into its config as ``iterheads``)."""

    task: str = "polynomial"
    templates: tuple[str, ...] = TRAIN_TEMPLATES
    shots: tuple[int, ...] = (0, 0, 1, 2)  # K worked examples, drawn per batch from this list
    lengths: str = "2-16"
    n_positions: int = 512
    n_layer: int = 2
    n_head: int = 1
    n_embd: int = 128
    embed_init_std: float = 0.3
    init_range: float = 0.05
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 200
    max_steps: int = 4000
    seed: int = 0
    threads: int = 1
    tie: bool = True  # tied embeddings (half the file); a warm start keeps the native untied read-out
    init_from: str = ""  # a native checkpoint to warm-start from (warm_start), or a text organism to continue
    position_offsets: bool = True  # random offsets per row (every position trained) or probes from position 0
    tokenizer: str = ""
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        """One clear error for a shape GPT-2 cannot take, before any work."""
        for name in ("n_layer", "n_head", "n_embd", "n_positions", "batch_size", "max_steps"):
            if int(getattr(self, name)) < 1:
                raise IterHeadsError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise IterHeadsError(f"n-embd {self.n_embd} is not divisible by n-head {self.n_head}")
        if not self.shots or min(self.shots) < 0:
            raise IterHeadsError(f"shots must be counts of 0 or more, got {list(self.shots)}")

    def meta(self) -> dict:
        out = asdict(self)
        out.pop("extra")
        out.pop("tokenizer")
        out["templates"] = list(self.templates)
        out["shots"] = list(self.shots)  # as drawn: a repeated count is drawn more often
        return {"text_organism": True, "tasks": [self.task], "cot": True, **out}


class CompactVocab:
    """full id <-> compact id; compact 0 is ``OTHER``."""

    def __init__(self, ids: list[int], full_size: int) -> None:
        self.ids = np.array([-1, *sorted(set(int(i) for i in ids))], dtype=np.int64)  # compact -> full (-1: OTHER)
        self.to_compact = np.zeros(full_size, dtype=np.int64)
        self.to_compact[self.ids[1:]] = np.arange(1, len(self.ids))

    def __len__(self) -> int:
        return len(self.ids)

    def map(self, full: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.to_compact[full.numpy()])


def vocabulary(tokenizer, recipe: TextRecipe) -> CompactVocab:
    """The ids the training probes can contain: every template, every value, with and without shots."""
    seen: set[int] = set()
    for template in recipe.templates:
        for k in sorted(set(recipe.shots)):
            probes = text_probes(tokenizer, recipe.task, recipe.lengths, n=64, seed=1000 + k, template=template, shots=k)
            seen.update(int(i) for i in probes.input_ids[probes.attention_mask.bool()].unique())
    # every value, also where the sample above missed it (as the first value or after a separator)
    task = get_task(recipe.task)
    for template in recipe.templates:
        for v in sorted(set(task.inputs) | set(task.states)):
            text = template.replace("{inputs:, }", f"{v}, {v}").replace("{states:, }", f"{v}, {v}")
            text = text.replace("{inputs}", f"{v} {v}").replace("{states}", f"{v} {v}")
            seen.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seen.add(int(pad))
    return CompactVocab(sorted(seen), len(tokenizer))


class TextData:
    """Batch ``b`` is a pure function of (seed, b): ``batch_size`` detector probes under one template and one
    shot count, compact ids, labels on the probe's states only, random position offsets (every position trained,
    so a probe after four worked examples sits where the model has been)."""

    def __init__(self, tokenizer, recipe: TextRecipe, vocab: CompactVocab) -> None:
        self.tokenizer, self.recipe, self.vocab = tokenizer, recipe, vocab

    def batch(self, b: int) -> dict[str, torch.Tensor]:
        from .data import position_offsets

        r = self.recipe
        rng = np.random.default_rng([r.seed, 7, int(b)])
        template = r.templates[int(rng.integers(len(r.templates)))]
        shots = int(r.shots[int(rng.integers(len(r.shots)))])
        probes = text_probes(self.tokenizer, r.task, r.lengths, n=r.batch_size, seed=int(rng.integers(2**31)),
                             template=template, shots=shots)
        ids, mask = probes.input_ids, probes.attention_mask
        labels = torch.full_like(ids, -100)
        rows = torch.arange(len(ids))[:, None].expand_as(probes.state_pos)
        ok = probes.state_pos >= 0
        labels[rows[ok], probes.state_pos[ok]] = ids[rows[ok], probes.state_pos[ok]]
        if int(mask.sum(1).max()) > r.n_positions:
            raise IterHeadsError(f"a training probe has {int(mask.sum(1).max())} tokens, more than n_positions={r.n_positions}")
        compact = self.vocab.map(ids)
        batch = {"input_ids": compact, "attention_mask": mask, "labels": torch.where(labels >= 0, compact, -100)}
        if r.position_offsets:
            batch["position_ids"] = position_offsets(mask, r.n_positions, rng)
        return batch


def compact_model(recipe: TextRecipe, vocab: CompactVocab):
    """A fresh GPT-2 on the compact vocabulary (tied embeddings, the paper's dropout and init)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(vocab), n_positions=recipe.n_positions, n_layer=recipe.n_layer, n_head=recipe.n_head,
        n_embd=recipe.n_embd, n_inner=4 * recipe.n_embd, activation_function="gelu", embd_pdrop=0.1, resid_pdrop=0.0,
        attn_pdrop=0.0, tie_word_embeddings=recipe.tie, initializer_range=recipe.init_range, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(recipe.seed)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0.0, recipe.embed_init_std)
        model.transformer.wpe.weight.normal_(0.0, recipe.embed_init_std)
    return model


# which native token plays each text token's role when a run starts from a native checkpoint
_ROLES = {"->": "<eoi>", "=": "<eoi>", ":": "<eoi>", "<|endoftext|>": "<eos>"}


@torch.no_grad()
def continue_from(model, vocab: CompactVocab, path: Path) -> dict:
    """Start from a text organism already trained (its full-vocabulary model, same shape): every weight, with the
    embedding rows of the compact ids taken from their tokenizer ids and ``OTHER`` from an id training never shows.
    A second stage of training (more shots, another template) resumes the first instead of starting over."""
    from transformers import GPT2LMHeadModel

    full = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32)
    c, m = full.config, model.config
    if (c.n_layer, c.n_head, c.n_embd, c.n_positions) != (m.n_layer, m.n_head, m.n_embd, m.n_positions):
        raise IterHeadsError(f"{path}: {c.n_layer} layers x {c.n_head} heads x {c.n_embd} wide, {c.n_positions} positions; "
                             f"the recipe asks for {m.n_layer} x {m.n_head} x {m.n_embd}, {m.n_positions}")
    unseen = int(np.setdiff1d(np.arange(c.vocab_size), vocab.ids[1:])[0])
    rows = torch.from_numpy(np.where(vocab.ids < 0, unseen, vocab.ids))
    state = full.state_dict()
    state.setdefault("lm_head.weight", full.get_output_embeddings().weight)  # a tied source may list it once
    for key in ("transformer.wte.weight", "lm_head.weight"):
        state[key] = state[key][rows]
    if m.tie_word_embeddings:
        state.pop("lm_head.weight")
    model.load_state_dict(state, strict=not m.tie_word_embeddings)
    return {"continued_from": str(path)}


def _is_text_organism(path: str) -> Path | None:
    """The folder of ``path`` (a folder or a bundled name) when it holds a text organism, else None."""
    import json

    from ..bundled import bundled_path

    folder = Path(path) if Path(path).is_dir() else bundled_path(path)
    if folder is None or not (folder / "config.json").is_file():
        return None
    return folder if json.loads((folder / "config.json").read_text()).get("iterheads", {}).get("text_organism") else None


@torch.no_grad()
def warm_start(model, vocab: CompactVocab, tokenizer, native_path: str) -> dict:
    """Copy a native checkpoint's blocks, final norm and positions into the compact model, and its token rows to the
    text tokens that play the same role: value ``v`` (``"3"`` and ``" 3"``) gets native ``3``, the marker before
    the states (``" ->"``, ``" ="``, ``":"``) gets ``<eoi>``, in the input embedding and (untied) in the read-out.
    Other rows (``Input``, ``,``, newline, ``OTHER``) keep their random init. Positions move by one: the native
    layout starts with a task token. Returns {text token: native token} for the record."""
    from ..modeling import load_checkpoint

    native, native_tok = load_checkpoint(native_path)
    c = native.config
    if (c.n_layer, c.n_head, c.n_embd) != (model.config.n_layer, model.config.n_head, model.config.n_embd):
        raise IterHeadsError(f"{native_path}: {c.n_layer} layers x {c.n_head} heads x {c.n_embd} wide; the recipe asks for "
                             f"{model.config.n_layer} x {model.config.n_head} x {model.config.n_embd}")
    src = native.state_dict()
    dst = model.state_dict()
    for k, v in src.items():
        if k.startswith("transformer.h.") or k.startswith("transformer.ln_f."):
            dst[k].copy_(v)
    # the native layout starts with a task token: text position i plays native position i + 1 (x_1 is native 1)
    n_pos = min(src["transformer.wpe.weight"].shape[0] - 1, dst["transformer.wpe.weight"].shape[0])
    dst["transformer.wpe.weight"][:n_pos] = src["transformer.wpe.weight"][1 : n_pos + 1]
    native_vocab, mapped = native_tok.get_vocab(), {}
    for compact, full in enumerate(vocab.ids):
        if full < 0:
            continue
        text = tokenizer.decode([int(full)]).strip()
        role = text if text in native_vocab and text.isdigit() else _ROLES.get(text)
        if role is not None:
            dst["transformer.wte.weight"][compact] = src["transformer.wte.weight"][native_vocab[role]]
            if not model.config.tie_word_embeddings:
                dst["lm_head.weight"][compact] = src["lm_head.weight"][native_vocab[role]]
            mapped[tokenizer.decode([int(full)])] = role
    return mapped


def expand(model, vocab: CompactVocab, tokenizer, recipe: TextRecipe):
    """The full-vocabulary model: the compact rows at their tokenizer ids, ``OTHER``'s row everywhere else."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    tie = c.tie_word_embeddings
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=c.n_positions, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
        n_inner=c.n_inner, activation_function=c.activation_function, embd_pdrop=c.embd_pdrop, resid_pdrop=0.0,
        attn_pdrop=0.0, tie_word_embeddings=tie, initializer_range=c.initializer_range, bos_token_id=eos,
        eos_token_id=eos, iterheads=recipe.meta(),
    )
    full = GPT2LMHeadModel(config)
    rows = torch.from_numpy(vocab.to_compact)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" or not tie}
    for key in ("transformer.wte.weight",) + (() if tie else ("lm_head.weight",)):
        state[key] = state[key][rows]
    missing, unexpected = full.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight" or not tie]:
        raise IterHeadsError(f"expanding the organism: missing {missing}, unexpected {unexpected}")
    if tie:
        full.tie_weights()
    return full.eval()


COMMAND = "text_data"  # the marker by which --overwrite knows a folder is a text organism this command wrote


def train_text_organism(recipe: TextRecipe, output_dir: str | Path, log_every: int = 100, overwrite: bool = False) -> Path:
    """Train on text probes with the training package's accelerator, step and schedule; write the full model,
    its tokenizer (the files it was loaded from) and ``train_log.jsonl`` to ``output_dir``.

    The folder is built beside ``output_dir`` and moved into place whole: a run that fails leaves nothing, and an
    existing folder is replaced only with ``overwrite`` and only when this command wrote it."""
    recipe.check()
    inputs = {"--tokenizer": recipe.tokenizer, "--init-from": recipe.init_from}
    with atomic_output_dir(output_dir, overwrite, command=COMMAND, inputs=inputs) as tmp:
        steps, seconds = _train_into(recipe, tmp, log_every)
    print(f"trained {steps} steps in {seconds:.0f} s -> {output_dir}", file=sys.stderr)
    return Path(output_dir)


def _train_into(recipe: TextRecipe, out: Path, log_every: int) -> tuple[int, float]:
    """The training run itself, written into ``out``: (steps, seconds)."""
    from transformers import AutoTokenizer

    from .artifacts import MetricsLog
    from .callbacks import Progress, Run, clock
    from .config import TrainConfig
    from .loop import make_accelerator, step_function
    from .schedule import make_scheduler

    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    tokenizer = AutoTokenizer.from_pretrained(recipe.tokenizer)
    vocab = vocabulary(tokenizer, recipe)
    data = TextData(tokenizer, recipe, vocab)
    model = compact_model(recipe, vocab)
    if recipe.init_from:
        organism = _is_text_organism(recipe.init_from)
        recipe.extra["warm_start"] = (continue_from(model, vocab, organism) if organism is not None
                                      else warm_start(model, vocab, tokenizer, recipe.init_from))
    cfg = TrainConfig(tasks=[recipe.task], output_dir=str(out), lr=recipe.lr, batch_size=recipe.batch_size,
                      warmup_steps=recipe.warmup_steps, schedule="cosine", max_steps=recipe.max_steps, report_to="none",
                      log_every=log_every, threads=recipe.threads, seed=recipe.seed)
    accelerator = make_accelerator(cfg, out)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler, _ = make_scheduler(cfg, optimizer, recipe.max_steps, can_form_head=False)
    run = Run(cfg, accelerator, model, out, recipe.max_steps, recipe.max_steps, recipe.max_steps)
    run.log = MetricsLog(out / "train_log.jsonl", None, True)
    progress = Progress(scheduler)
    step = step_function(accelerator, model, cfg)
    run.start = time.perf_counter()
    progress.on_start(run)
    model.train()
    while run.step < recipe.max_steps:
        batch = data.batch(run.step)
        loss, correct, batch = step(batch)
        if not math.isfinite(float(loss)):
            raise IterHeadsError(f"the loss is {float(loss)} at step {run.step}")
        optimizer.step()
        optimizer.zero_grad()
        progress.on_batch(run, batch, loss, correct)
        scheduler.step()
        run.step += 1
        clock(run)
        progress.on_step(run)
    progress.close()
    model = accelerator.unwrap_model(model).eval()
    full = expand(model, vocab, tokenizer, recipe)
    full.to(torch.bfloat16).save_pretrained(out)  # bf16 on disk (the detector loads float32): half the size
    tokenizer.save_pretrained(out)  # tokenizer.json, whatever files the tokenizer was read from
    for name in ("tokenizer_config.json", "special_tokens_map.json", "SOURCE.txt"):  # the originals, unchanged
        src = Path(recipe.tokenizer) / name
        if src.is_file():
            shutil.copyfile(src, out / name)
    return run.step, time.perf_counter() - run.start


def _shot_counts(spec: str) -> tuple[int, ...]:
    """``--shots 0,1,2,2``: the draw list as given (argparse turns a bad one into one usage line)."""
    import argparse

    try:
        return tuple(int(k) for k in spec.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected counts separated by commas, e.g. 0,0,1,2; got {spec!r}") from None


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m hf_iterheads.training.text_data",
                                description="train a text-path model organism (a small GPT-2 on detector probes)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder, e.g. ../shared/tokenizers/gpt2")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--task", default=TextRecipe.task)
    p.add_argument("--template", action="append", default=None, help="a training template (repeat it; default: TRAIN_TEMPLATES)")
    p.add_argument("--max-steps", type=int, default=TextRecipe.max_steps)
    p.add_argument("--n-embd", type=int, default=TextRecipe.n_embd)
    p.add_argument("--n-layer", type=int, default=TextRecipe.n_layer)
    p.add_argument("--n-head", type=int, default=TextRecipe.n_head)
    p.add_argument("--n-positions", type=int, default=TextRecipe.n_positions,
                   help="context length; the probes (shots included) must fit, and offsets spread over it")
    p.add_argument("--batch-size", type=int, default=TextRecipe.batch_size)
    p.add_argument("--lr", type=float, default=TextRecipe.lr)
    p.add_argument("--shots", type=_shot_counts, default=(0, 0, 1, 2), help="shot counts drawn per batch, e.g. 0,0,1,2")
    p.add_argument("--warmup-steps", type=int, default=TextRecipe.warmup_steps)
    p.add_argument("--init-from", default="",
                   help="a native checkpoint to warm-start from (e.g. polynomial-cot), or a text organism to continue")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder this command wrote before")
    p.add_argument("--untied", action="store_true", help="a separate read-out (twice the file; keeps a warm start's)")
    p.add_argument("--no-offsets", action="store_true", help="no random position offsets: every probe starts at 0")
    p.add_argument("--embed-init-std", type=float, default=TextRecipe.embed_init_std)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    recipe = TextRecipe(task=a.task, templates=tuple(a.template or TRAIN_TEMPLATES), tokenizer=a.tokenizer,
                        max_steps=a.max_steps, n_embd=a.n_embd, n_layer=a.n_layer, n_head=a.n_head,
                        n_positions=a.n_positions, batch_size=a.batch_size,
                        lr=a.lr, seed=a.seed, threads=a.threads, embed_init_std=a.embed_init_std,
                        shots=a.shots, warmup_steps=a.warmup_steps,
                        position_offsets=not a.no_offsets, init_from=a.init_from, tie=not a.untied)
    try:
        train_text_organism(recipe, a.output_dir, overwrite=a.overwrite)
    except IterHeadsError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
