"""Counterfactual activation patching: does a head carry x_t into the position that predicts s_t?

For each probe, one informative step t is picked and x_t is changed to a value x' that changes s_t (the later
states follow the new chain; teacher forcing). Both sequences run. Then the clean run is repeated with one
head's slice of the attention output-projection input, at the position predicting s_t only, taken from the
counterfactual run (a forward pre-hook on the projection, as ablation: every architecture the detector
supports). With LD = logit(s_t) - logit(s'_t) at that position,

    share = sum(LD_clean - LD_patched) / sum(LD_clean - LD_counterfactual)

is the part of the logit difference the head moves: about 1 when the head alone brings x_t there, about 0
when it carries nothing about x_t. Reported for the top-k heads, for k random heads of the same layers, for
the best EoI head as a contrast, and for whole layers (all heads patched at once: a bound for one head).

The counterfactual swaps token ids in place, so each value must be a single token whose id depends only on
the value and on whether it is the first of its list (true in the native layout and in text templates that
separate values); ids are read from the probes themselves, and probes whose new values never appear are
skipped. A mix of renderings that writes a value as different tokens (two templates, or few-shot, where
the probe's first value follows a newline in one template and a space in another) is patched in groups of
probes that agree on every value's token, and the sums are pooled.

A share is reported only when the model separates the two answers: on at least ``MIN_SEPARATED`` of the
probes, the clean logit difference logit(s_t) - logit(s'_t) is at least ``SEPARATION`` standard deviations of
that position's logits (over the vocabulary). Otherwise every share is ``None`` ("n/a") and ``rule`` says why:
a model that does not tell s_t from s'_t has no logit difference for a head to move, and a ratio of two
near-zero sums is noise (a random GPT-2 gives "shares" of -0.1 to 0.7).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import IterHeadsError
from ..tasks import get_task
from .ablation import Head, _device, _forward_kwargs, _projections, matched_heads
from .attention import head_counts
from .probes import Probes

MIN_DENOMINATOR = 1e-6
SEPARATION = 1.0  # clean logit(s_t) - logit(s'_t), in standard deviations of the position's logits
MIN_SEPARATED = 0.5  # share of the probes that must be separated for any share to be reported
RULE = (f"shares are reported when clean logit(s_t) - logit(s'_t) >= {SEPARATION:g} std of that position's logits "
        f"on at least {MIN_SEPARATED:.0%} of the probes")


def _probe_tokens(probes: Probes, i: int) -> dict | None:
    """{(kind, is_first, value): token id} of probe ``i``; None when the probe itself writes a value two ways."""
    found: dict = {}
    targets = probes.target_ids.numpy()
    for t in range(int(probes.lengths[i])):
        for kind, value, tok in (("x", probes.inputs[i, t], int(probes.input_ids[i, int(probes.x_pos[i, t])])),
                                 ("s", probes.states[i, t], int(targets[i, t]))):
            if found.setdefault((kind, t == 0, int(value)), tok) != tok:
                return None
    return found


def token_groups(probes: Probes) -> list[np.ndarray]:
    """Probe indices in groups whose probes write every value as the same token (one group for one template).

    Greedy, in probe order: a probe joins the first group it agrees with, else starts one. Probes that write a
    value two ways themselves are left out (they cannot be patched by swapping ids).
    """
    groups: list[tuple[dict, list[int]]] = []
    for i in range(len(probes)):
        mine = _probe_tokens(probes, i)
        if mine is None:
            continue
        for merged, members in groups:
            if all(merged.get(k, v) == v for k, v in mine.items()):
                merged.update(mine)
                members.append(i)
                break
        else:
            groups.append((dict(mine), [i]))
    return [np.array(members) for _, members in groups]


def _value_tokens(probes: Probes) -> tuple[dict, dict]:
    """{(is_first, value): token id} for inputs and for states, read from the probes; refuses ambiguous ones."""
    maps = []
    for pos_ids, values in ((None, probes.inputs), (probes.target_ids.numpy(), probes.states)):
        found: dict = {}
        for i in range(len(probes)):
            for t in range(int(probes.lengths[i])):
                tok = int(probes.input_ids[i, int(probes.x_pos[i, t])]) if pos_ids is None else int(pos_ids[i, t])
                key = (t == 0, int(values[i, t]))
                if found.setdefault(key, tok) != tok:
                    raise IterHeadsError(
                        f"value {key[1]} is written as different tokens in different probes; patching needs one token per value "
                        "(patch_heads patches such a mix in groups: token_groups)"
                    )
        maps.append(found)
    return maps[0], maps[1]


def check_patchable(probes: Probes) -> None:
    """Raises (one line) when patching cannot run on these probes at all: call it before any work starts."""
    if probes.multi_token:
        raise IterHeadsError("--patch needs every value to be one token; this tokenizer splits some values "
                             "(use a template or tokenizer that does not)")


def counterfactuals(probes: Probes, seed: int = 0, subset: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per probe: the changed step, the counterfactual ids, and the clean / counterfactual s_t tokens (-1 = skipped).

    ``subset``: only these probes (which must agree on every value's token, see :func:`token_groups`); the others
    are skipped."""
    check_patchable(probes)
    task = get_task(probes.task)
    n = len(probes)
    rows = np.arange(n) if subset is None else np.asarray(subset)
    x_tok, s_tok = _value_tokens(_select(probes, rows))
    rng = np.random.default_rng(seed)
    ids = probes.input_ids.clone()
    step, clean_tok, cf_tok = np.full(n, -1), np.full(n, -1), np.full(n, -1)
    for i in rows:
        L = int(probes.lengths[i])
        xs, ss = probes.inputs[i, :L], probes.states[i, :L]
        steps = np.flatnonzero(probes.informative[i, :L])
        for t in rng.permutation(steps):
            for value in rng.permutation(np.asarray(task.inputs)):
                new = xs.copy()
                new[t] = value
                chain = task.run(new[None])[0]
                if chain[t] == ss[t] or (t == 0, int(value)) not in x_tok:
                    continue
                toks = [s_tok.get((u == 0, int(chain[u]))) for u in range(t, L)]
                if any(tok is None for tok in toks):
                    continue
                ids[i, int(probes.x_pos[i, t])] = x_tok[(t == 0, int(value))]
                for u, tok in zip(range(t, L), toks):
                    ids[i, int(probes.state_pos[i, u])] = tok
                step[i], clean_tok[i], cf_tok[i] = t, int(probes.target_ids[i, t]), toks[0]
                break
            if step[i] >= 0:
                break
    return {"step": step, "input_ids": ids, "clean_token": clean_tok, "cf_token": cf_tok}


def _select(probes: Probes, rows: np.ndarray) -> Probes:
    """A view of the probes ``rows`` with what ``_value_tokens`` reads."""
    from dataclasses import replace

    idx = torch.as_tensor(rows, dtype=torch.long)
    return replace(probes, input_ids=probes.input_ids[idx], attention_mask=probes.attention_mask[idx],
                   lengths=probes.lengths[rows], inputs=probes.inputs[rows], states=probes.states[rows],
                   x_pos=probes.x_pos[idx], state_pos=probes.state_pos[idx], pred_pos=probes.pred_pos[idx],
                   eoi_pos=probes.eoi_pos[idx], target_ids=probes.target_ids[idx], texts=None,
                   seq_lens=probes.seq_lens[rows], informative=probes.informative[rows])


def pooled_counterfactuals(probes: Probes, seed: int = 0) -> tuple[dict[str, np.ndarray], int]:
    """``counterfactuals`` for a mix of renderings, one group of agreeing probes at a time; (result, groups)."""
    check_patchable(probes)
    groups = token_groups(probes)
    if len(groups) <= 1:
        return counterfactuals(probes, seed, groups[0] if groups else np.zeros(0, dtype=int)), len(groups)
    out = {"step": np.full(len(probes), -1), "input_ids": probes.input_ids.clone(),
           "clean_token": np.full(len(probes), -1), "cf_token": np.full(len(probes), -1)}
    for g, rows in enumerate(groups):
        part = counterfactuals(probes, seed + g, rows)
        for key in ("step", "clean_token", "cf_token"):
            out[key][rows] = part[key][rows]
        out["input_ids"][torch.as_tensor(rows)] = part["input_ids"][torch.as_tensor(rows)]
    return out, len(groups)


class _Patcher:
    """Pre-hooks on every output projection: record the rows at ``pos`` (B,), or overwrite some heads' slices there."""

    def __init__(self, model) -> None:
        self.projections = _projections(model)
        self.n_heads = head_counts(model)[0]
        self.pos: torch.Tensor | None = None
        self.record: dict[int, torch.Tensor] = {}
        self.patch: dict[int, list[int]] = {}  # layer -> heads to take from ``source``
        self.source: dict[int, torch.Tensor] = {}
        self.recording = False
        self.handles = [p.register_forward_pre_hook(self._hook(i)) for i, p in enumerate(self.projections)]

    def _hook(self, layer: int):
        def pre_hook(module, args):
            x = args[0]
            b = torch.arange(x.shape[0], device=x.device)
            pos = self.pos.to(x.device)
            if self.recording:
                self.record[layer] = x[b, pos].detach().clone()
            heads = self.patch.get(layer)
            if not heads:
                return None
            x = x.clone()
            rows = x[b, pos].view(x.shape[0], self.n_heads, -1)
            src = self.source[layer].to(x.device, x.dtype).view(x.shape[0], self.n_heads, -1)
            rows[:, heads] = src[:, heads]
            x[b, pos] = rows.view(x.shape[0], -1)
            return (x, *args[1:])

        return pre_hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _logit_diff(model, batch: dict, pos: torch.Tensor, a: torch.Tensor, c: torch.Tensor, keep: bool,
                spread: bool = False):
    """logit(a) - logit(c) at position ``pos`` of each sequence: (B,); with ``spread``, also the std of those
    positions' logits over the vocabulary (B,)."""
    device = batch["input_ids"].device
    if keep:
        cols = torch.unique(pos)
        logits = model(**batch, logits_to_keep=cols.to(device), use_cache=False).logits.float()
        lookup = torch.zeros(int(cols.max()) + 1, dtype=torch.long)
        lookup[cols] = torch.arange(len(cols))
        rows = lookup[pos]
    else:
        logits = model(**batch, use_cache=False).logits.float()
        rows = pos
    picked = logits[torch.arange(len(pos), device=logits.device), rows.to(logits.device)]
    diff = (picked.gather(1, a[:, None].to(logits.device)) - picked.gather(1, c[:, None].to(logits.device))).squeeze(1).cpu()
    return (diff, picked.std(1).cpu()) if spread else diff


@torch.no_grad()
def patch_heads(
    model, probes: Probes, groups: Sequence[Sequence[Head]], seed: int = 0, batch_size: int = 16
) -> dict:
    """Share of the logit difference moved by patching each group of heads (heads of one group together)."""
    n_layers, n_heads = len(_projections(model)), head_counts(model)[0]
    for group in groups:
        for layer, head in group:
            if not (0 <= layer < n_layers and 0 <= head < n_heads):
                raise IterHeadsError(f"no head ({layer}, {head}) in a model of {n_layers} layers x {n_heads} heads")
    cf, n_groups = pooled_counterfactuals(probes, seed)
    used = np.flatnonzero(cf["step"] >= 0)
    if not len(used):
        raise IterHeadsError("no probe has a counterfactual (no step where changing x_t changes s_t); cannot patch")
    device, keep = _device(model), "logits_to_keep" in _forward_kwargs(model)
    moved = np.zeros(len(groups))
    clean_sum = cf_sum = 0.0
    seconds, separated = 0.0, 0
    patcher = _Patcher(model)
    try:
        for idx in probes.batches(batch_size):
            idx = idx[cf["step"][idx] >= 0]
            if not len(idx):
                continue
            batch = {k: v.to(device) for k, v in probes.batch(idx).items()}
            cf_batch = {**batch, "input_ids": cf["input_ids"][idx, : batch["input_ids"].shape[1]].to(device)}
            pos = probes.pred_pos[torch.as_tensor(idx), torch.as_tensor(cf["step"][idx])]
            a, c = torch.as_tensor(cf["clean_token"][idx]), torch.as_tensor(cf["cf_token"][idx])
            patcher.pos, patcher.patch = pos, {}
            patcher.recording = True
            ld_cf = _logit_diff(model, cf_batch, pos, a, c, keep)
            patcher.recording = False
            patcher.source = dict(patcher.record)
            ld_clean, std = _logit_diff(model, batch, pos, a, c, keep, spread=True)
            separated += int((ld_clean >= SEPARATION * std).sum())
            clean_sum += float(ld_clean.sum())
            cf_sum += float(ld_cf.sum())
            start = time.perf_counter()
            for g, group in enumerate(groups):
                patcher.patch = {}
                for layer, head in group:
                    patcher.patch.setdefault(layer, []).append(head)
                ld = _logit_diff(model, batch, pos, a, c, keep)
                moved[g] += float((ld_clean - ld).sum())
            seconds += time.perf_counter() - start
    finally:
        patcher.remove()
    denominator = clean_sum - cf_sum
    shares = [float(m / denominator) if abs(denominator) / len(used) > MIN_DENOMINATOR else None for m in moved]
    return {
        "n": len(used),
        "skipped": int(len(probes) - len(used)),
        "token_groups": n_groups,  # renderings that write values as different tokens, patched apart and pooled
        "separated": separated,  # probes whose clean logit difference is >= SEPARATION std of the logits
        "clean_logit_diff": clean_sum / len(used),
        "counterfactual_logit_diff": cf_sum / len(used),
        "shares": shares,
        "seconds_per_group": seconds / max(len(groups), 1),
    }


def run_patching(
    model, probes: Probes, heads: Sequence[Head], seed: int = 0, batch_size: int = 16, contrast: Head | None = None
) -> dict:
    """The ``--patch`` report: top-k heads, k random heads of the same layers, a contrast head, whole layers."""
    heads = [tuple(map(int, h)) for h in heads]
    n_heads = head_counts(model)[0]
    matched = matched_heads(heads, n_heads, np.random.default_rng(seed))
    layers = sorted({layer for layer, _ in heads})
    groups: list[list[Head]] = [[h] for h in heads] + [[h] for h in matched]
    extra = [contrast] if contrast is not None and tuple(contrast) not in heads else []
    groups += [[tuple(map(int, h))] for h in extra] + [[(layer, h) for h in range(n_heads)] for layer in layers]
    try:
        out = patch_heads(model, probes, groups, seed, batch_size)
    except IterHeadsError as err:  # scores and ablation are already computed: say why, and let them be written
        return {"refused": str(err), "rule": RULE}
    raw = out.pop("shares")
    out["separates"] = out["separated"] >= MIN_SEPARATED * out["n"] and out["clean_logit_diff"] > out["counterfactual_logit_diff"]
    out["rule"] = RULE
    out["raw_shares"] = raw  # before the rule: for debugging only, never a finding
    shares = iter(raw if out["separates"] else [None] * len(raw))

    def row(h: Head) -> dict:
        return {"layer": h[0], "head": h[1], "share": next(shares)}

    out["heads"] = [row(h) for h in heads]
    out["random"] = [row(h) for h in matched]
    out["contrast"] = row(tuple(extra[0])) if extra else None
    out["layers"] = [{"layer": layer, "share": next(shares)} for layer in layers]
    out["seconds_per_head"] = out.pop("seconds_per_group")  # one patched forward pass over all probes
    return out


def _fmt(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.3f}"


def patch_lines(p: dict) -> list[str]:
    """The ``--patch`` lines of the terminal table."""
    if p.get("refused"):
        return [f"patching not run: {p['refused']}"]
    groups = f"; {p['token_groups']} token groups patched apart" if p.get("token_groups", 1) > 1 else ""
    lines = [
        (
            f"patching x_t (counterfactual x_t changes s_t) on {p['n']} probes ({p['skipped']} without a counterfactual): "
            f"logit diff clean {p['clean_logit_diff']:.3f}, counterfactual {p['counterfactual_logit_diff']:.3f}{groups}; share moved:"
        ),
        "  found: " + ", ".join(f"L{r['layer']}H{r['head']} {_fmt(r['share'])}" for r in p["heads"]),
        "  random same layer: "
        + (", ".join(f"L{r['layer']}H{r['head']} {_fmt(r['share'])}" for r in p["random"]) or "none (one head per layer)"),
    ]
    if p.get("contrast"):
        r = p["contrast"]
        lines.append(f"  best EoI head L{r['layer']}H{r['head']}: {_fmt(r['share'])}")
    lines.append("  whole layer: " + ", ".join(f"L{r['layer']} {_fmt(r['share'])}" for r in p["layers"]))
    if "separated" in p:
        verdict = "" if p.get("separates") else " -> n/a: the model does not separate s_t from s'_t"
        lines.append(f"  rule: {p.get('rule', RULE)}; separated on {p['separated']} of {p['n']}{verdict}")
    return lines
