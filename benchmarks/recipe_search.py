#!/usr/bin/env python
"""Recipe search: how fast does the iteration head form on CPU?

Trains ONE configuration of a 2-layer, 1-head transformer on an iterative task
with (or without) chain-of-thought and writes a JSONL learning curve:
step, wall seconds, train loss, teacher-forced test accuracy (mean over
L = 4..16) and the peakiness / mean mass of the two circuit heads
(attn0: layer-1 query e+t -> key e; attn1: layer-2 query e+t-1 -> key t).

Layout: [task] x_1..x_L [EoI] s_1..s_L [EoS]  (no CoT: [task] x_1..x_L [EoI] s_L [EoS]).
Token ids (study-local): values 0..15 -> 0..15, pad 16, unk 17, EoI 18, EoS 19,
binary_copy 20, parity 21, polynomial 22; vocab 25.

Depends only on numpy, torch, transformers.  Example (the winning recipe is in
benchmarks/results/recipe_search.md):

    python benchmarks/recipe_search.py --lr 1e-3 --batch 128 --bucket --out curve.jsonl
"""
import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PAD, UNK, EOI, EOS = 16, 17, 18, 19
TASK_ID = {"binary_copy": 20, "parity": 21, "polynomial": 22}
VOCAB = 25
NLEN = 16
CTX = 2 * NLEN + 3  # 35


# ----------------------------------------------------------------------------- data
def draw(task, n, L, rng):
    """Inputs x (n, L) and states s (n, L) of one task, vectorised over n."""
    if task == "polynomial":
        x = rng.integers(1, 11, size=(n, L))
    else:
        x = rng.integers(0, 2, size=(n, L))
    s = np.empty_like(x)
    s[:, 0] = x[:, 0]  # reference-code convention: s_1 = x_1
    for t in range(1, L):  # loop over the (<=16) time steps only, vectorised over n
        if task == "polynomial":
            s[:, t] = (s[:, t - 1] * x[:, t] + 1) % 11
        elif task == "parity":
            s[:, t] = s[:, t - 1] ^ x[:, t]
        else:
            s[:, t] = x[:, t]
    return x, s


def layout(task_ids, x, s, Ls, cot=True):
    """Build right-padded token ids and the loss mask for sequences of lengths Ls.

    x, s: (n, Lmax) arrays (entries beyond each sequence's L are ignored);
    task_ids: (n,) token ids; Ls: (n,) lengths.  Returns ids (n, T) int64 and
    tmask (n, T) bool where tmask[b, p] = position p's logits predict a target.
    """
    n, Lmax = x.shape
    Ls = np.asarray(Ls)[:, None]
    T = (2 * Lmax + 3) if cot else (Lmax + 4)
    T = min(T, int((2 * Ls.max() + 3) if cot else (Ls.max() + 4)))
    j = np.arange(T)[None, :]
    xi = np.take_along_axis(x, np.clip(j - 1, 0, Lmax - 1).repeat(n, 0), 1)
    ids = np.full((n, T), PAD, dtype=np.int64)
    ids = np.where(j == 0, np.asarray(task_ids)[:, None], ids)
    ids = np.where((j >= 1) & (j <= Ls), xi, ids)
    ids = np.where(j == Ls + 1, EOI, ids)
    if cot:
        si = np.take_along_axis(s, np.clip(j - Ls - 2, 0, Lmax - 1), 1)
        ids = np.where((j >= Ls + 2) & (j <= 2 * Ls + 1), si, ids)
        ids = np.where(j == 2 * Ls + 2, EOS, ids)
        tmask = (j >= Ls + 1) & (j <= 2 * Ls + 1)
    else:
        sL = np.take_along_axis(s, Ls - 1, 1)
        ids = np.where(j == Ls + 2, sL, ids)
        ids = np.where(j == Ls + 3, EOS, ids)
        tmask = (j >= Ls + 1) & (j <= Ls + 2)
    return torch.from_numpy(ids), torch.from_numpy(tmask)


def make_test(task, cot, n_per_len=128, seed=12345):
    rng = np.random.default_rng(seed)  # separate stream from training draws
    out = {}
    for L in range(4, NLEN + 1):
        x, s = draw(task, n_per_len, L, rng)
        out[L] = layout(np.full(n_per_len, TASK_ID[task]), x, s, np.full(n_per_len, L), cot)
    return out


class Sampler:
    """Yields (ids, tmask) batches: online fresh draws or a fixed dataset."""

    def __init__(self, a):
        self.a = a
        self.rng = np.random.default_rng(a.seed + 1_000_003)
        self.fixed = None
        if a.data == "fixed":
            frng = np.random.default_rng(a.seed + 7)
            self.fixed = {}
            for task in self._tasks():
                for L in range(1, NLEN + 1):
                    x, s = draw(task, a.n_per_len, L, frng)
                    xp = np.zeros((a.n_per_len, NLEN), np.int64); xp[:, :L] = x
                    sp = np.zeros((a.n_per_len, NLEN), np.int64); sp[:, :L] = s
                    self.fixed[(task, L)] = (xp, sp)

    def _tasks(self):
        return [self.a.task] + (["binary_copy"] if self.a.copy_mix > 0 else [])

    def max_len(self, step):
        a = self.a
        if a.curriculum_steps <= 0:
            return NLEN
        return int(min(NLEN, a.curriculum_start + (NLEN - a.curriculum_start) * step / a.curriculum_steps))

    def copy_p(self, step):
        a = self.a
        if a.copy_mix <= 0:
            return 0.0
        if a.copy_mix_steps <= 0:
            return a.copy_mix
        return a.copy_mix * max(0.0, 1 - step / a.copy_mix_steps)

    def _xs(self, task, n, L):
        if self.fixed is None:
            x, s = draw(task, n, NLEN, self.rng)
            return x, s
        xp, sp = self.fixed[(task, L)] if np.isscalar(L) else (None, None)
        idx = self.rng.integers(0, xp.shape[0], size=n)
        return xp[idx], sp[idx]

    def batch(self, step):
        a, B = self.a, self.a.batch
        Lmax = self.max_len(step)
        pc = self.copy_p(step)
        if a.bucket:  # one length (and one task) per batch: no padding at all
            L = int(self.rng.integers(1, Lmax + 1))
            task = "binary_copy" if self.rng.random() < pc else a.task
            x, s = self._xs(task, B, L)
            return layout(np.full(B, TASK_ID[task]), x[:, :L], s[:, :L], np.full(B, L), a.cot)
        Ls = self.rng.integers(1, Lmax + 1, size=B)
        is_copy = self.rng.random(B) < pc
        if self.fixed is None:
            xm, sm = draw(a.task, B, NLEN, self.rng)
            if is_copy.any():
                xc, sc = draw("binary_copy", B, NLEN, self.rng)
                xm = np.where(is_copy[:, None], xc, xm); sm = np.where(is_copy[:, None], sc, sm)
        else:
            xm = np.zeros((B, NLEN), np.int64); sm = np.zeros((B, NLEN), np.int64)
            idx = self.rng.integers(0, a.n_per_len, size=B)
            for task in self._tasks():
                for L in range(1, Lmax + 1):
                    sel = (Ls == L) & (is_copy == (task == "binary_copy"))
                    if sel.any():
                        xp, sp = self.fixed[(task, L)]
                        xm[sel] = xp[idx[sel]]; sm[sel] = sp[idx[sel]]
        tids = np.where(is_copy, TASK_ID["binary_copy"], TASK_ID[a.task])
        return layout(tids, xm, sm, Ls, a.cot)


# ----------------------------------------------------------------------------- models
class RefBlockModel(nn.Module):
    """Small faithful re-implementation of the reference code's architecture:
    no biases anywhere (LayerNorm without bias too), PyTorch default init
    (embeddings ~ N(0,1)), and its pre-norm block where the residual carries the
    NORMALISED input:  h = LN1(x); h = h + Attn(h); out = h + MLP(LN2(h))."""

    def __init__(self, d=128, n_layer=2, ffn=512, emb_drop=0.1):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(CTX, d)
        self.drop = emb_drop
        self.blocks = nn.ModuleList()
        for _ in range(n_layer):
            blk = nn.Module()
            blk.ln1 = nn.LayerNorm(d, bias=False)
            blk.qkv = nn.Linear(d, 3 * d, bias=False)
            blk.o = nn.Linear(d, d, bias=False)
            blk.ln2 = nn.LayerNorm(d, bias=False)
            blk.fc1 = nn.Linear(d, ffn, bias=False)
            blk.fc2 = nn.Linear(ffn, d, bias=False)
            self.blocks.append(blk)
        self.lnf = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, ids, want_attn=False):
        T = ids.shape[1]
        h = self.tok(ids) + self.pos.weight[:T]
        h = F.dropout(h, self.drop, self.training)
        atts = []
        for b in self.blocks:
            h = b.ln1(h)
            q, k, v = b.qkv(h).chunk(3, -1)
            if want_attn:
                sc = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
                sc = sc.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
                p = sc.softmax(-1)
                z = p @ v
                atts.append(p[:, None])
            else:
                z = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], is_causal=True)[:, 0]
            h = h + b.o(z)
            h = h + b.fc2(F.gelu(b.fc1(b.ln2(h))))
        logits = self.head(self.lnf(h))
        return logits, atts


class GPT2Wrap(nn.Module):
    """Stock transformers.GPT2LMHeadModel of the paper's size."""

    def __init__(self, a):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        kw = dict(vocab_size=VOCAB, n_positions=CTX, n_layer=2, n_head=1, n_embd=128, n_inner=512,
                  embd_pdrop=0.1, resid_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                  bos_token_id=EOI, eos_token_id=EOS, pad_token_id=PAD)
        if a.init_range is not None:
            kw["initializer_range"] = a.init_range
        cfg = GPT2Config(**kw)
        self.m = GPT2LMHeadModel(cfg)
        if a.emb_init_std is not None:  # optional: re-init embeddings only
            with torch.no_grad():
                self.m.transformer.wte.weight.normal_(0, a.emb_init_std)
                self.m.transformer.wpe.weight.normal_(0, a.emb_init_std)
        self.m.set_attn_implementation("sdpa")

    def forward(self, ids, want_attn=False):
        if want_attn:
            self.m.set_attn_implementation("eager")
            out = self.m(input_ids=ids, output_attentions=True)
            self.m.set_attn_implementation("sdpa")
            atts = list(out.attentions)
            assert len(atts) == 2, "no attention weights returned"
            return out.logits, atts
        return self.m(input_ids=ids).logits, []


# ----------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(model, test, cot):
    model.eval()
    acc, a0p, a0m, a1p, a1m, per_len = [], [], [], [], [], {}
    for L, (ids, tmask) in test.items():
        logits, atts = model(ids, want_attn=True)
        pred = logits[:, :-1].argmax(-1)
        tgt = ids[:, 1:]
        m = tmask[:, :-1]
        ok = ((pred == tgt) | ~m).all(-1).float().mean().item()
        acc.append(ok); per_len[L] = round(ok, 4)
        e = L + 1
        t = torch.arange(1, L + 1)
        if cot:
            A0 = atts[0][:, 0][:, e + t, e]          # (n, L)
            A1 = atts[1][:, 0][:, e + t - 1, t]      # (n, L)
        else:  # only EoI (predicting s_L) exists; report the analogous cells
            A0 = atts[0][:, 0][:, e:e + 1, e]
            A1 = atts[1][:, 0][:, e:e + 1, L]
        a0p.append((A0 > 0.5).float().mean().item()); a0m.append(A0.mean().item())
        a1p.append((A1 > 0.5).float().mean().item()); a1m.append(A1.mean().item())
    model.train()
    f = lambda v: round(float(np.mean(v)), 4)
    return dict(acc=f(acc), attn0=f(a0p), attn0_mass=f(a0m), attn1=f(a1p), attn1_mass=f(a1m), acc_per_len=per_len)


# ----------------------------------------------------------------------------- train
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="polynomial", choices=["polynomial", "parity", "binary_copy"])
    p.add_argument("--no-cot", dest="cot", action="store_false")
    p.add_argument("--arch", default="gpt2", choices=["gpt2", "ref"])
    p.add_argument("--init-range", type=float, default=None, help="GPT2Config.initializer_range (default 0.02)")
    p.add_argument("--emb-init-std", type=float, default=None, help="re-init GPT-2 wte/wpe with this std")
    p.add_argument("--data", default="online", choices=["online", "fixed"])
    p.add_argument("--n-per-len", type=int, default=1024, help="fixed dataset: sequences per length")
    p.add_argument("--bucket", action="store_true", help="one length per batch (no padding)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--decay", default="none", choices=["none", "cosine", "linear"])
    p.add_argument("--decay-steps", type=int, default=10000, help="horizon of cosine/linear decay")
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--wd", type=float, default=0.0, help="AdamW weight decay (0 = plain Adam)")
    p.add_argument("--clip", type=float, default=0.0, help="grad-norm clip (0 = off)")
    p.add_argument("--curriculum-start", type=int, default=4, help="max length at step 0")
    p.add_argument("--curriculum-steps", type=int, default=0, help="steps to grow max length to 16 (0 = off)")
    p.add_argument("--copy-mix", type=float, default=0.0, help="share of binary_copy sequences/batches")
    p.add_argument("--copy-mix-steps", type=int, default=0, help="linearly decay copy share to 0 over these steps (0 = constant)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=100000)
    p.add_argument("--max-minutes", type=float, default=15.0)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--stop-at-goal", action="store_true", help="stop once acc>=0.99 and attn1>=0.9")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads; on a shared, oversubscribed 2-core box 1 thread was ~6x faster per step")
    p.add_argument("--out", required=True)
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model = GPT2Wrap(a) if a.arch == "gpt2" else RefBlockModel()
    model.train()
    fwd = model
    if a.compile:
        fwd = torch.compile(model, dynamic=True)
    opt_cls = torch.optim.AdamW if a.wd > 0 else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=a.lr, betas=(a.beta1, a.beta2), weight_decay=a.wd)

    def lr_at(step):
        if a.warmup and step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        if a.decay == "none":
            return a.lr
        frac = min(1.0, (step - a.warmup) / max(1, a.decay_steps - a.warmup))
        if a.decay == "cosine":
            f = 0.5 * (1 + math.cos(math.pi * frac))
        else:
            f = 1 - frac
        return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * f)

    test = make_test(a.task, a.cot)
    sampler = Sampler(a)
    fout = open(a.out, "w")
    fout.write(json.dumps({"config": vars(a)}) + "\n")
    t0 = time.time(); t_eval = 0.0
    losses, goal = [], {}
    for step in range(a.max_steps + 1):
        if step % a.eval_every == 0 or step == a.max_steps:
            te = time.time()
            r = evaluate(model, test, a.cot)
            t_eval += time.time() - te
            wall = time.time() - t0
            rec = dict(step=step, wall_s=round(wall, 1), train_s=round(wall - t_eval, 1),
                       loss=round(float(np.mean(losses)), 4) if losses else None, lr=lr_at(step), **r)
            for k, th in (("acc", 0.99), ("attn1", 0.9)):
                if r[k] >= th and k not in goal:
                    goal[k] = (step, round(wall, 1))
            rec["goal"] = goal
            fout.write(json.dumps(rec) + "\n"); fout.flush()
            print(f"step {step:6d} wall {wall:7.1f}s loss {rec['loss']} acc {r['acc']:.3f} "
                  f"attn0 {r['attn0']:.2f}/{r['attn0_mass']:.2f} attn1 {r['attn1']:.2f}/{r['attn1_mass']:.2f} "
                  f"maxL {sampler.max_len(step)} copy {sampler.copy_p(step):.2f}", flush=True)
            losses = []
            if a.stop_at_goal and "acc" in goal and "attn1" in goal:
                break
            if wall > a.max_minutes * 60 or step == a.max_steps:
                break
        ids, tmask = sampler.batch(step)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits, _ = fwd(ids)
        lg = logits[:, :-1][tmask[:, :-1]]
        loss = F.cross_entropy(lg.float(), ids[:, 1:][tmask[:, :-1]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if a.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        losses.append(loss.item())
    fout.close()


if __name__ == "__main__":
    main()
