#!/usr/bin/env python3
"""PyTorch twin of one MGKD training step, for benchmarking the engine against PyTorch.

Builds the same teacher and student as the engine (docs/model.md §4 with the engine's conventions,
the parameter names and shapes of src/model/params.rs), the same losses (docs/model.md §5 with the
library default coefficients of src/loss/mod.rs) and the same optimiser (global-norm clipping at
1.0, then AdamW with weight decay on linear weight matrices only), and times

  student step = frozen teacher forward (no grad) + student forward/backward with all five
                 losses + clipping + AdamW,
  teacher step = teacher forward/backward with weighted BCE + clipping + AdamW,

in eager mode, under torch.compile, and under torch.compile(mode="reduce-overhead") (CUDA
graphs), in f32 and in bf16 autocast (f32 master weights), on batches drawn like the reference
configuration of docs/model.md §8. Writes the same JSON fields as `mgkd-train bench --json`; compare
the two with tools/bench_table.py.

    python3 tools/torch_twin.py --json twin.json              # the §8 configuration
    python3 tools/torch_twin.py --device cpu --batch 16 --d 16 --heads 2 \\
        --in-len 8 --pre-len 4 --steps 3 --warmup 1           # a CPU smoke test

Each (stage, mode, precision) row runs on fresh seeded models, in the order --rows gives
(default: every stage, mode and precision asked for); a row that fails is written as
{"error": ...} and the others go on (exit status 1 only when every row failed). The JSON file
is rewritten after every row, so a run stopped by a time limit keeps the rows it finished. CPU
timings are a smoke test only: on a small machine the OpenMP pools of ATen and of the
compiled kernels contend, and OMP_NUM_THREADS=1 gives steadier numbers there.

Needs torch and numpy only. Not part of the test suite.
"""

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import time
import traceback

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- configuration

# The data schema of docs/model.md §8 (fixed; the CLI changes widths, lengths and batch size).
EVENT_VOCABS = (64, 1024, 16, 168)  # E_c = 4 categorical event fields
EVENT_NUM = 2                       # E_d numeric event fields
PROFILE_VOCABS = (100,) * 16        # F_c = 16 categorical profile fields
PROFILE_NUM = 32                    # F_d dense profile fields
EMPTY_PRE_SHARE = 0.10              # share of rows with an empty pre-service sequence
DEFAULT_RATE = 0.10                 # P(label = 1)
POOL_BATCHES = 8                    # batches drawn once, moved to the device, cycled through


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """Widths and length limits shared by the teacher and the student."""

    d: int
    heads: int
    blocks: int
    d_cat: int
    in_len: int   # L, the teacher's (in-service) length limit
    pre_len: int  # Lp, the student's (pre-service) length limit


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The engine's library defaults (src/loss/mod.rs, `LossConfig::default`): every term and
    class re-weighting on, MSE form of L_coarse."""

    alpha: float = 2.0
    beta: float = 0.1
    gamma: float = 0.1
    delta: float = 0.1
    tau: float = 1.0
    rho: float = 0.5


@dataclasses.dataclass(frozen=True)
class AdamWConfig:
    """docs/model.md §6.1 / src/optim.rs defaults; the benchmark's learning rate is constant."""

    lr: float = 1e-4
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip: float = 1.0


# ----------------------------------------------------------------------------- parameter table

def engine_param_table(shape, role):
    """The engine's parameter table (src/model/params.rs, `ParamTable::new`) as a list of
    (name, shape, decay) in table order, for `role` "teacher" or "student". Used to check
    that the twin has exactly the engine's tensors, and to count its parameters."""
    d = shape.d
    table = []

    def linear(prefix, out, inp):
        table.append((f"{prefix}.weight", (out, inp), True))
        table.append((f"{prefix}.bias", (out,), False))

    def layernorm(prefix):
        table.append((f"{prefix}.weight", (d,), False))
        table.append((f"{prefix}.bias", (d,), False))

    for k, v in enumerate(EVENT_VOCABS):
        table.append((f"encoder.embed.cat.{k}.weight", (v, d), False))
    linear("encoder.embed.num", d, EVENT_NUM)
    len_limit = shape.in_len if role == "teacher" else shape.pre_len
    table.append(("encoder.embed.pos.weight", (len_limit, d), False))
    for l in range(shape.blocks):
        p = f"encoder.blocks.{l}"
        layernorm(f"{p}.ln1")
        linear(f"{p}.attn.in_proj", 3 * d, d)
        linear(f"{p}.attn.out_proj", d, d)
        layernorm(f"{p}.ln2")
        linear(f"{p}.ffn.fc1", 4 * d, d)
        linear(f"{p}.ffn.fc2", d, 4 * d)
    layernorm("encoder.ln_f")
    table.append(("encoder.empty", (d,), False))
    for j, v in enumerate(PROFILE_VOCABS):
        table.append((f"profile.cat.{j}.weight", (v, shape.d_cat), False))
    linear("profile.proj", d, PROFILE_NUM + len(PROFILE_VOCABS) * shape.d_cat)
    linear("fuse", d, 2 * d)
    linear("head", 1, d)
    if role == "student":
        for l in range(shape.blocks - 1):
            linear(f"aux.{l}", 1, 2 * d)
        linear("coarse", d, d)
        for x in "qkv":
            linear(f"fine.{x}", d, d)
    return table


def table_count(table):
    """Number of scalars of a parameter table."""
    return sum(math.prod(s) for _, s, _ in table)


# ----------------------------------------------------------------------------- analytic FLOPs

def step_flops(stage, batch, d, blocks, in_len, pre_len, e_num=EVENT_NUM, f_num=PROFILE_NUM,
               f_cat=len(PROFILE_VOCABS), d_cat=16):
    """GEMM FLOPs of one training step (2·m·n·k per product, every sequence padded to its
    limit); the engine's `bench` uses the same formula.

    encoder_fwd(ℓ) = 2·B·ℓ·d·E_d                         numeric event projection
                   + N·(24·B·ℓ·d² + 4·B·ℓ²·d)            per block: QKV 6, out-proj 2, FFN 16
                                                         (·T·d², T = B·ℓ); scores + P·V
                   + 2·B·d·(F_d + F_c·d_cat)             profile projection
                   + 2·B·2d·d + 2·B·d                    fusion, head
    teacher_fwd = encoder_fwd(L)
    student_fwd = encoder_fwd(lq) + (N−1)·2·B·2d         auxiliary heads
                + 2·B·d²                                 coarse projection
                + 2·(2·B·lq·d²) + 2·B·L·d²               fine q, v (student tokens), k (teacher)
                + 4·B·lq·L·d                             fine scores + weighted sum
    with lq = max(Lp, 1). A step costs forward + backward ≈ 3 forwards for the trained network:
    student step = teacher_fwd + 3·student_fwd, teacher step = 3·teacher_fwd.
    """
    B, N, L, lq = batch, blocks, in_len, max(pre_len, 1)

    def encoder_fwd(ell):
        return (2 * B * ell * d * e_num
                + N * (24 * B * ell * d * d + 4 * B * ell * ell * d)
                + 2 * B * d * (f_num + f_cat * d_cat)
                + 2 * B * 2 * d * d + 2 * B * d)

    teacher_fwd = encoder_fwd(L)
    if stage == "teacher":
        return 3 * teacher_fwd
    student_fwd = (encoder_fwd(lq) + (N - 1) * 2 * B * 2 * d + 2 * B * d * d
                   + 2 * (2 * B * lq * d * d) + 2 * B * L * d * d + 4 * B * lq * L * d)
    return teacher_fwd + 3 * student_fwd


# ----------------------------------------------------------------------------- model

def masked_valid(lens, length):
    """[B, length] bool: slot t of row b holds an event (t < lens[b])."""
    return torch.arange(length, device=lens.device)[None, :] < lens[:, None]


class Embed(nn.Module):
    """e_t = Σ_k Emb_k[cat_tk] + W_num·num_t + b_num + Pos[len−1−t] (positions on valid slots
    only; Pos[0] belongs to the most recent event)."""

    def __init__(self, d, len_limit):
        super().__init__()
        self.cat = nn.ModuleList(nn.Embedding(v, d) for v in EVENT_VOCABS)
        self.num = nn.Linear(EVENT_NUM, d)
        self.pos = nn.Embedding(len_limit, d)

    def forward(self, cat, num, lens, valid):
        h = self.num(num)
        for k, emb in enumerate(self.cat):
            h = h + emb(cat[..., k])
        t = torch.arange(cat.shape[1], device=cat.device)
        back = (lens[:, None] - 1 - t[None, :]).clamp(min=0)  # ℓ−1−t, clamped on padding
        return h + self.pos(back) * valid[..., None].to(h.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a key-padding mask, Q/K/V fused in one projection
    (columns [Q | K | V], head h at h·dh inside each). A row with no valid key (an empty
    sequence) gives zero output and zero gradient, as in the engine: its keys are all let in
    (so the softmax is finite) and its output is multiplied by 0."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x, key_ok, nonempty):
        B, ell, d = x.shape
        qkv = self.in_proj(x).view(B, ell, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)           # each [B, H, ℓ, dh]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_ok)  # scale 1/√dh
        o = o * nonempty.to(o.dtype)[:, None, None, None]
        return self.out_proj(o.transpose(1, 2).reshape(B, ell, d))


class FFN(nn.Module):
    """W2·GELU(W1·x), width 4d, exact (erf) GELU."""

    def __init__(self, d):
        super().__init__()
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN Transformer block: h ← h + MHSA(LN1(h)); h ← h + FFN(LN2(h))."""

    def __init__(self, d, heads):
        super().__init__()
        self.ln1 = nn.LayerNorm(d, eps=1e-5)
        self.attn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d, eps=1e-5)
        self.ffn = FFN(d)

    def forward(self, h, key_ok, nonempty):
        h = h + self.attn(self.ln1(h), key_ok, nonempty)
        return h + self.ffn(self.ln2(h))


class SeqEncoder(nn.Module):
    """Event embedding, N blocks, final LN; s = masked mean of the tokens, s_∅ when empty.
    With `aux`, also the pooled LN_f outputs of blocks 0 … N−2 (the auxiliary heads' s_l)."""

    def __init__(self, d, heads, blocks, len_limit):
        super().__init__()
        self.embed = Embed(d, len_limit)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(blocks))
        self.ln_f = nn.LayerNorm(d, eps=1e-5)
        self.empty = nn.Parameter(torch.empty(d))

    def pool(self, h, valid, lens):
        t = self.ln_f(h)
        s = (t * valid[..., None].to(t.dtype)).sum(1) / lens.clamp(min=1)[:, None].to(t.dtype)
        return t, torch.where((lens > 0)[:, None], s, self.empty.to(s.dtype))

    def forward(self, cat, num, lens, aux):
        valid = masked_valid(lens, cat.shape[1])
        nonempty = lens > 0
        key_ok = (valid | ~nonempty[:, None])[:, None, None, :]  # [B, 1, 1, ℓ]
        h = self.embed(cat, num, lens, valid)
        pooled = []
        for l, block in enumerate(self.blocks):
            h = block(h, key_ok, nonempty)
            if aux and l + 1 < len(self.blocks):
                pooled.append(self.pool(h, valid, lens)[1])
        tokens, s = self.pool(h, valid, lens)
        return tokens, s, pooled


class ProfileEncoder(nn.Module):
    """p = GELU(W_p·[profile_num ; concat_j Emb_j[profile_cat_j]] + b_p), d_cat-wide tables."""

    def __init__(self, d, d_cat):
        super().__init__()
        self.cat = nn.ModuleList(nn.Embedding(v, d_cat) for v in PROFILE_VOCABS)
        self.proj = nn.Linear(PROFILE_NUM + len(PROFILE_VOCABS) * d_cat, d)

    def forward(self, num, cat):
        parts = [num] + [emb(cat[:, j]) for j, emb in enumerate(self.cat)]
        return F.gelu(self.proj(torch.cat(parts, dim=1)))


class Net(nn.Module):
    """Teacher (in-service encoder) or student (pre-service encoder plus the auxiliary heads,
    the coarse projection P_c and the fine projections W_q, W_k, W_v). Parameter names are the
    engine's checkpoint names."""

    def __init__(self, shape, role):
        super().__init__()
        self.role = role
        d = shape.d
        len_limit = shape.in_len if role == "teacher" else shape.pre_len
        self.encoder = SeqEncoder(d, shape.heads, shape.blocks, len_limit)
        self.profile = ProfileEncoder(d, shape.d_cat)
        self.fuse = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, 1)
        if role == "student":
            self.aux = nn.ModuleList(nn.Linear(2 * d, 1) for _ in range(shape.blocks - 1))
            self.coarse = nn.Linear(d, d)
            self.fine = nn.ModuleDict({x: nn.Linear(d, d) for x in "qkv"})
        self.reset_parameters()

    def reset_parameters(self):
        """docs/model.md §4.7: normal(0, 0.02) for matrices, embeddings, positions and s_∅;
        zero biases; LayerNorm scale 1, shift 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.encoder.empty, 0.0, 0.02)

    def forward(self, b):
        """Forward on batch dict `b`: logits z, fused H, profile p, tokens T, and the
        auxiliary logits z_l (student)."""
        pfx = "in" if self.role == "teacher" else "pre"
        want_aux = self.role == "student"
        tokens, s, pooled = self.encoder(b[pfx + "_cat"], b[pfx + "_num"], b[pfx + "_lens"],
                                         want_aux)
        p = self.profile(b["profile_num"], b["profile_cat"])
        hidden = F.gelu(self.fuse(torch.cat([s, p], dim=1)))
        out = {"z": self.head(hidden)[:, 0], "H": hidden, "p": p, "T": tokens}
        if want_aux:
            out["aux"] = [head(torch.cat([sl, p], dim=1))[:, 0]
                          for head, sl in zip(self.aux, pooled)]
        return out


def checked_param_count(shape, role):
    """Builds the twin's `role` network and checks its tensors (names and shapes) against the
    engine's table; raises on a difference. Returns the parameter count."""
    model = Net(shape, role)
    want = {n: s for n, s, _ in engine_param_table(shape, role)}
    have = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))
        raise RuntimeError(f"{role}: parameters differ from the engine's table: {diff}")
    count = sum(p.numel() for p in model.parameters())
    assert count == table_count(engine_param_table(shape, role))
    return count


# ----------------------------------------------------------------------------- losses

def bern_kl(a, b):
    """KL(Bern(σ(a)) ‖ Bern(σ(b))) on logits, log-sigmoid form; ∂/∂b = σ(b) − σ(a)."""
    pa = torch.sigmoid(a)
    return (pa * (F.logsigmoid(a) - F.logsigmoid(b))
            + (1 - pa) * (F.logsigmoid(-a) - F.logsigmoid(-b)))


def weighted_bce(z, y, w):
    """mean_i w_i·BCE(y_i, σ(z_i)) (softplus form)."""
    return F.binary_cross_entropy_with_logits(z.float(), y, weight=w)


def fine_loss(student, s, t, b, w, d):
    """L_fine (src/loss/mod.rs `fine_term`, backend `fine_loss`): student tokens are T_pre, with
    slot 0 replaced by p on rows whose pre-service sequence is empty (those rows then have one
    token, `lens_or_one`); keys W_k·T_in and values T_in over valid in-service slots;
    e_j = ‖W_v·tok_j − Σ_k A_jk·T_in,k‖²/d; L = Σ_{i∈R} w_i·mean_j e_ij / |R|, R = rows with
    a non-empty in-service sequence (0 when R is empty). T_in carries no gradient."""
    pre_lens, in_lens = b["pre_lens"], b["in_lens"]
    tp = s["T"]
    first = torch.where((pre_lens == 0)[:, None], s["p"].to(tp.dtype), tp[:, 0])
    tok = torch.cat([first[:, None], tp[:, 1:]], dim=1)
    q_lens = pre_lens.clamp(min=1)
    t_in = t["T"].detach()
    q = student.fine["q"](tok)[:, None]                      # [B, 1, lq, d]
    k = student.fine["k"](t_in)[:, None]                     # [B, 1, L, d]
    v = student.fine["v"](tok)
    in_ok = in_lens > 0
    key_ok = (masked_valid(in_lens, t_in.shape[1]) | ~in_ok[:, None])[:, None, None, :]
    ctx = F.scaled_dot_product_attention(q, k, t_in[:, None].to(q.dtype), attn_mask=key_ok)
    e = (v.float() - ctx[:, 0].float()).pow(2).sum(-1) / d  # [B, lq]
    q_valid = masked_valid(q_lens, tok.shape[1]).float()
    row = (e * q_valid).sum(1) / q_lens.float()
    r = in_ok.float()
    return (w * row * r).sum() / r.sum().clamp(min=1.0)


def student_loss(student, s, t, b, cfg, d):
    """L = L_hard + α·L_soft + β·L_coarse + γ·L_fine + δ·L_self (docs/model.md §5)."""
    y, w, tau = b["labels"], b["weights"], cfg.tau
    zs, zt = s["z"].float(), t["z"].float()
    hard = weighted_bce(zs, y, w)
    soft = tau ** 2 * (w * bern_kl(zt / tau, zs / tau)).mean()
    pred = student.coarse(s["H"]).float()
    coarse = (w * (pred - t["H"].float()).pow(2).sum(-1) / d).mean()
    fine = fine_loss(student, s, t, b, w, d)
    total = hard + cfg.alpha * soft + cfg.beta * coarse + cfg.gamma * fine
    if s["aux"]:
        zs_sg = zs.detach() / tau
        self_d = tau ** 2 * torch.stack(
            [bern_kl(zs_sg, zl.float() / tau).mean() for zl in s["aux"]]).mean()
        total = total + cfg.delta * self_d
    return total


# ----------------------------------------------------------------------------- data

def class_weights(n_neg, n_pos, rho):
    """w_c = (N/(2·N_c))^ρ, scaled to average 1 over the counted rows (src/loss/mod.rs)."""
    n = n_neg + n_pos
    raw = [(n / (2 * c)) ** rho if c else 1.0 for c in (n_neg, n_pos)]
    mean = (n_neg * raw[0] + n_pos * raw[1]) / n
    return raw[0] / mean, raw[1] / mean


def draw_events(rng, rows, limit, lens):
    """Padded event fields of `rows` sequences: ids uniform in [1, vocab), numbers standard
    normal, id 0 and 0.0 on padded slots."""
    valid = np.arange(limit)[None, :] < lens[:, None]
    cat = np.stack([rng.integers(1, v, size=(rows, limit)) for v in EVENT_VOCABS], axis=-1)
    num = rng.standard_normal((rows, limit, EVENT_NUM)).astype(np.float32)
    return cat * valid[..., None], num * valid[..., None]


def draw_pool(seed, batch, shape):
    """POOL_BATCHES batches drawn like the §8 reference: in-service length uniform in 1..L,
    pre-service length uniform in 1..Lp with EMPTY_PRE_SHARE of rows empty, label 1 with
    probability DEFAULT_RATE; padded to the limits."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(POOL_BATCHES):
        in_lens = rng.integers(1, shape.in_len + 1, size=batch)
        pre_lens = rng.integers(1, shape.pre_len + 1, size=batch)
        pre_lens[rng.random(batch) < EMPTY_PRE_SHARE] = 0
        in_cat, in_num = draw_events(rng, batch, shape.in_len, in_lens)
        pre_cat, pre_num = draw_events(rng, batch, shape.pre_len, pre_lens)
        pool.append({
            "in_cat": in_cat, "in_num": in_num, "in_lens": in_lens,
            "pre_cat": pre_cat, "pre_num": pre_num, "pre_lens": pre_lens,
            "profile_num": rng.standard_normal((batch, PROFILE_NUM)).astype(np.float32),
            "profile_cat": np.stack([rng.integers(1, v, size=batch) for v in PROFILE_VOCABS], 1),
            "labels": (rng.random(batch) < DEFAULT_RATE).astype(np.float32),
        })
    return pool


def pool_to_device(pool, rho, device):
    """Adds per-row class weights (from the whole pool's label counts) and moves every array
    to `device` (ids int64, numbers float32)."""
    labels = np.concatenate([b["labels"] for b in pool])
    n_pos = int(labels.sum())
    w0, w1 = class_weights(len(labels) - n_pos, n_pos, rho)
    out = []
    for b in pool:
        b = dict(b, weights=np.where(b["labels"] == 1, w1, w0).astype(np.float32))
        out.append({k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in b.items()})
    return out


def padding_share(pool, batch_ids):
    """Share of padded in-service slots over the batches `batch_ids` of the host pool (the
    timed steps', as the engine's bench counts it)."""
    filled = sum(int(pool[i]["in_lens"].sum()) for i in batch_ids)
    slots = sum(pool[i]["in_cat"].shape[0] * pool[i]["in_cat"].shape[1] for i in batch_ids)
    return 1.0 - filled / slots


def quantile(sorted_values, q):
    """Nearest-rank quantile of sorted values, index round((n−1)·q) (the engine's rule)."""
    return sorted_values[int(math.floor((len(sorted_values) - 1) * q + 0.5))]


# ----------------------------------------------------------------------------- one step

def make_optimizer(model, table, hp):
    """AdamW with two groups: linear weight matrices (decay, the table's flags) and everything
    else (no decay). Fused (one kernel per group on CUDA; fused on CPU too, so that a CPU
    smoke test runs the same code path)."""
    decay = {n for n, _, dec in table if dec}
    params = dict(model.named_parameters())
    groups = [
        {"params": [p for n, p in params.items() if n in decay], "weight_decay": hp.weight_decay},
        {"params": [p for n, p in params.items() if n not in decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=hp.lr, betas=hp.betas, eps=hp.eps, fused=True)


class Trainer:
    """One stage's models, optimiser and step functions. `step(batch)` zeroes the gradients,
    runs forward + losses + backward, clips and takes one AdamW step; returns the loss."""

    def __init__(self, stage, shape, precision, device, seed, loss_cfg, hp):
        torch.manual_seed(seed)
        self.stage, self.shape, self.loss_cfg, self.hp = stage, shape, loss_cfg, hp
        self.bf16 = precision == "bf16"  # autocast around forward + losses
        self.device = device
        self.teacher = Net(shape, "teacher").to(device)
        if stage == "student":
            self.student = Net(shape, "student").to(device)
            self.teacher.requires_grad_(False)  # frozen: its forward runs under no_grad
            self.trained = self.student
        else:
            self.trained = self.teacher
        self.params = list(self.trained.parameters())
        table = engine_param_table(shape, self.trained.role)
        self.opt = make_optimizer(self.trained, table, hp)

    def forward_backward(self, b):
        """Forward, loss and backward; returns the detached loss."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if self.stage == "student":
                with torch.no_grad():
                    t = self.teacher(b)
                s = self.student(b)
                loss = student_loss(self.student, s, t, b, self.loss_cfg, self.shape.d)
            else:
                loss = weighted_bce(self.teacher(b)["z"], b["labels"], b["weights"])
        loss.backward()
        return loss.detach()

    def optimizer_step(self):
        """Global-norm clipping, then AdamW."""
        torch.nn.utils.clip_grad_norm_(self.params, self.hp.clip)
        self.opt.step()

    def whole_step(self, b):
        """Forward, loss, backward, clipping and AdamW; returns the detached loss."""
        loss = self.forward_backward(b)
        self.optimizer_step()
        return loss

    def build(self, mode, compile_optimizer):
        """The step function of `mode` and what it compiles. With `compile_optimizer` the
        whole step is compiled (dynamo breaks the graph at `backward()` and compiles each
        side); without, only forward+loss+backward, with clipping and AdamW eager."""
        cmode = "reduce-overhead" if mode == "graphs" else "default"
        if mode == "eager":
            body, what = self.whole_step, "none"
        elif compile_optimizer:
            body = torch.compile(self.whole_step, mode=cmode, dynamic=False)
            what = "whole step (forward+backward+clip+AdamW)"
        else:
            forward_backward = torch.compile(self.forward_backward, mode=cmode, dynamic=False)

            def body(b):
                loss = forward_backward(b)
                self.optimizer_step()
                return loss

            what = "forward+loss+backward (clip and fused AdamW eager)"
        # CUDA graphs: each call starts a new step, whose replay may reuse the memory of the
        # previous step's outputs (the caller reads only the last step's loss).
        mark_step = mode == "graphs" and self.device.type == "cuda"

        def step(b):
            self.opt.zero_grad(set_to_none=True)
            if mark_step:
                torch.compiler.cudagraph_mark_step_begin()
            return body(b)

        return step, what


# ----------------------------------------------------------------------------- timing

def sync(device):
    """Waits for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device):
    """Drops compiled code, CUDA graphs and cached memory between rows."""
    torch.compiler.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_row(args, shape, stage, mode, precision, host_pool, pool, device):
    """Warm-up and timed steps of one (stage, mode, precision); the result row. A compiled
    mode first compiles the whole step; if that fails during warm-up, it starts again from
    fresh models with only forward+loss+backward compiled."""
    loss_cfg, hp = LossConfig(), AdamWConfig(lr=args.lr)
    attempts = [True, False] if mode != "eager" else [True]
    for compile_optimizer in attempts:
        trainer = Trainer(stage, shape, precision, device, args.seed, loss_cfg, hp)
        step, what = trainer.build(mode, compile_optimizer)
        t0 = time.perf_counter()
        try:
            for i in range(args.warmup):
                loss = step(pool[i % len(pool)])
            sync(device)
            warmup_s = time.perf_counter() - t0
            break
        except Exception as e:
            if compile_optimizer and len(attempts) > 1:
                print(f"  {stage}/{mode}/{precision}: compiling the whole step failed "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                      "retrying with the optimizer eager", file=sys.stderr)
                del trainer, step
                free(device)
                continue
            raise
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    timed_ids = [(args.warmup + i) % len(pool) for i in range(args.steps)]
    for i in timed_ids:
        b = pool[i]
        sync(device)
        t0 = time.perf_counter()
        loss = step(b)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    last_loss = float(loss)
    if not math.isfinite(last_loss):
        raise RuntimeError(f"the last step gave a non-finite loss {last_loss}")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del trainer, step, loss
    times.sort()
    median = quantile(times, 0.5)
    flops = step_flops(stage, args.batch, shape.d, shape.blocks, shape.in_len, shape.pre_len,
                       d_cat=shape.d_cat)
    return {
        "ms_per_step": median,
        "ms_p10": quantile(times, 0.1),
        "ms_p90": quantile(times, 0.9),
        "samples_per_s": args.batch * 1000.0 / median,
        "flops_per_step": flops,
        "tflops": flops / (median / 1000.0) / 1e12,
        "peak_mem_bytes": peak,
        "padding": padding_share(host_pool, timed_ids),
        "loss": last_loss,
        "compiled": what,
        "warmup_s": warmup_s,
    }


# ----------------------------------------------------------------------------- CLI

def csv_choice(allowed):
    def parse(text):
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)} (got {text!r})")
        return items
    return parse


def row_list(text):
    """`stage:mode:precision` triples, comma-separated, each checked; order kept."""
    allowed = (("student", "teacher"), ("eager", "compile", "graphs"), ("f32", "bf16"))
    rows = []
    for item in (x.strip() for x in text.split(",")):
        parts = item.split(":")
        if len(parts) != 3 or any(p not in a for p, a in zip(parts, allowed)):
            raise argparse.ArgumentTypeError(
                f"{item!r} is not stage:mode:precision with stage in {'/'.join(allowed[0])}, "
                f"mode in {'/'.join(allowed[1])}, precision in {'/'.join(allowed[2])}")
        if tuple(parts) in rows:
            raise argparse.ArgumentTypeError(f"{item!r} is given twice")
        rows.append(tuple(parts))
    return rows


def positive(text):
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {v})")
    return v


def non_negative(text):
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0 (got {v})")
    return v


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="PyTorch twin of one MGKD training step (benchmark against the engine).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"),
                    default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device to run on")
    ap.add_argument("--stages", type=csv_choice(("student", "teacher")),
                    default="student,teacher", help="comma-separated stages to time")
    ap.add_argument("--modes", type=csv_choice(("eager", "compile", "graphs")),
                    default="eager,compile,graphs",
                    help="eager; torch.compile; torch.compile(mode='reduce-overhead') = CUDA graphs")
    ap.add_argument("--precisions", type=csv_choice(("f32", "bf16")), default="f32,bf16",
                    help="f32, or bf16 autocast with f32 master weights (no TF32 either way)")
    ap.add_argument("--rows", type=row_list, metavar="STAGE:MODE:PRECISION,...",
                    help="the rows to run, in this order (e.g. student:graphs:bf16,"
                    "teacher:eager:f32); replaces --stages, --modes and --precisions")
    ap.add_argument("--batch", type=positive, default=1024, help="rows per batch")
    ap.add_argument("--d", type=positive, default=128, help="model width")
    ap.add_argument("--heads", type=positive, default=4, help="attention heads")
    ap.add_argument("--blocks", type=positive, default=2, help="Transformer blocks per encoder")
    ap.add_argument("--d-cat", type=positive, default=16, help="profile embedding width")
    ap.add_argument("--in-len", type=positive, default=128, help="in-service length limit L")
    ap.add_argument("--pre-len", type=positive, default=32, help="pre-service length limit Lp")
    ap.add_argument("--steps", type=positive, default=30, help="timed steps per row")
    ap.add_argument("--warmup", type=positive, default=5,
                    help="unmeasured steps per row (compilation happens in the first ones)")
    ap.add_argument("--seed", type=non_negative, default=0, help="seed of the data and the models")
    ap.add_argument("--lr", type=float, default=1e-4,
                    help="AdamW learning rate (constant, as in the engine's bench)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    a = ap.parse_args(argv)
    if a.d % a.heads:
        ap.error(f"--d {a.d} must be a multiple of --heads {a.heads}")
    return a


def fmt_row(r):
    """One line of the stdout table."""
    head = f"{r['stage']:<8} {r['mode']:<8} {r['precision']:<5}"
    if "error" in r:
        return f"{head} error: {r['error']}"
    peak = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.0f}"
    return (f"{head} {r['ms_per_step']:9.3f} {r['ms_p10']:8.3f} {r['ms_p90']:8.3f} "
            f"{r['samples_per_s']:11.0f} {r['tflops']:7.2f} {peak:>9} {r['loss']:9.5f} "
            f"{r['warmup_s']:8.1f}  {r['compiled']}")


def main(argv=None):
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False  # the engine does not use TF32
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("torch_twin: error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    shape = ModelShape(args.d, args.heads, args.blocks, args.d_cat, args.in_len, args.pre_len)
    params = {role: checked_param_count(shape, role) for role in ("teacher", "student")}
    dev_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"cpu ({torch.get_num_threads()} threads)")
    print(f"torch {torch.__version__} on {dev_name}")
    print(f"parameters (same names and shapes as the engine's ParamTable): "
          f"teacher {params['teacher']}, student {params['student']}")
    for stage in args.stages:
        f = step_flops(stage, args.batch, args.d, args.blocks, args.in_len, args.pre_len,
                       d_cat=args.d_cat)
        print(f"analytic GEMM FLOPs per {stage} step: {f:.4e}")
    host_pool = draw_pool(args.seed, args.batch, shape)
    pool = pool_to_device(host_pool, LossConfig().rho, device)
    print(f"{'stage':<8} {'mode':<8} {'prec':<5} {'ms/step':>9} {'p10':>8} {'p90':>8} "
          f"{'samples/s':>11} {'TFLOP/s':>7} {'peak MiB':>9} {'loss':>9} {'warmup s':>8}  "
          "compiled")
    plan = args.rows or [(stage, mode, precision) for stage in args.stages
                         for mode in args.modes for precision in args.precisions]
    out = {
        "engine": "pytorch",
        "version": torch.__version__,
        "device": dev_name,
        "config": {"batch": args.batch, "d": args.d, "heads": args.heads,
                   "blocks": args.blocks, "d_cat": args.d_cat, "in_len": args.in_len,
                   "pre_len": args.pre_len, "steps": args.steps, "warmup": args.warmup,
                   "seed": args.seed, "pool": POOL_BATCHES},
        "params": params,
        "results": [],
    }
    for stage, mode, precision in plan:
        row = {"stage": stage, "batching": "padded", "mode": mode, "precision": precision}
        try:
            row.update(run_row(args, shape, stage, mode, precision, host_pool, pool, device))
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            row["error"] = f"{type(e).__name__}: {e}".strip()[:2000]
        free(device)
        out["results"].append(row)
        print(fmt_row(row), flush=True)
        if args.json:
            # After every row, whole or not at all: a run stopped by a time limit keeps the
            # rows it finished.
            write_json_atomically(args.json, out)
    return 1 if all("error" in r for r in out["results"]) else 0


def write_json_atomically(path, obj):
    """Writes `obj` as JSON to a temporary file beside `path`, then renames it over `path`."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
