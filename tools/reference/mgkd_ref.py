#!/usr/bin/env python3
"""Independent NumPy reference of the MGKD forward pass and losses (docs/model.md §4-§5).

Written from the specification (docs/model.md) and the checkpoint / batch-dump layout only, in
float64 throughout, to check the engine against. Every sequence is processed row by row on its valid
slots only, so padded slots are never read: the key-padding mask is implicit and cannot leak.

    python3 tools/reference/mgkd_ref.py --teacher T.safetensors --student S.safetensors \
        --batch B.safetensors [--heads 4]

prints one JSON object (see README.md). Needs numpy only; uses the `safetensors` package to
read files when it is importable, a built-in parser otherwise.
"""

import argparse
import json
import math
import re
import struct
import sys

import numpy as np

LN_EPS = 1e-5


class RefError(Exception):
    """Bad input: the message names the file and the tensor or field."""


# ----------------------------------------------------------------------------- safetensors

_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}


def _read_safetensors_builtin(path):
    """Parse a safetensors file: u64 LE header length, JSON header, raw LE buffers."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise RefError(f"{path}: shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise RefError(f"{path}: header length {n} runs past the end of the file")
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", None) or {}
    base, tensors = 8 + n, {}
    for name, info in header.items():
        dtype, shape = info["dtype"], [int(s) for s in info["shape"]]
        start, end = (int(o) for o in info["data_offsets"])
        count = math.prod(shape)
        if dtype == "BF16":  # upper half of an f32
            bits = np.frombuffer(raw, "<u2", count, base + start).astype(np.uint32) << 16
            tensors[name] = bits.view(np.float32).reshape(shape)
            continue
        if dtype not in _DTYPES:
            raise RefError(f"{path}: tensor {name}: unsupported dtype {dtype}")
        dt = np.dtype(_DTYPES[dtype])
        if end - start != count * dt.itemsize or base + end > len(raw) or start > end:
            raise RefError(f"{path}: tensor {name}: data_offsets {start}..{end} do not fit "
                           f"shape {shape} {dtype} in a file of {len(raw)} bytes")
        tensors[name] = np.frombuffer(raw, dt, count, base + start).reshape(shape)
    return tensors, meta


def read_safetensors(path):
    """Return (tensors: name -> ndarray, metadata: str -> str) of a safetensors file."""
    try:
        from safetensors import safe_open
    except ImportError:
        return _read_safetensors_builtin(path)
    with safe_open(path, framework="np") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


# ----------------------------------------------------------------------------- primitives

try:  # faster, same function; the fallback keeps the script numpy-only
    from scipy.special import erf as _erf
except ImportError:
    _erf_scalar = np.frompyfunc(math.erf, 1, 1)

    def _erf(x):
        return _erf_scalar(x).astype(np.float64)


def gelu(x):
    """Exact GELU x·Φ(x) = x/2·(1 + erf(x/√2))."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def layer_norm(x, g, b):
    """LayerNorm over the last axis, biased variance, ε = 1e-5."""
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + LN_EPS) * g + b


def linear(x, w, b):
    """PyTorch convention: w is [out, in], y = x·wᵀ + b."""
    return x @ w.T + b


def softplus(x):
    """log(1 + eˣ), stable for any x."""
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def softmax(x):
    """Max-subtracted softmax over the last axis."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def bce_logits(y, z):
    """BCE(y, σ(z)) = softplus(z) − y·z."""
    return softplus(z) - y * z


def sigmoid(x):
    """σ(x) without overflow."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def kl_bern_logits(a, b):
    """KL(Bern(σ(a)) ‖ Bern(σ(b))) in log-sigmoid form, using log σ(x) = −softplus(−x):
    σ(a)·(softplus(−b) − softplus(−a)) + σ(−a)·(softplus(b) − softplus(a)); 0 when a = b."""
    return (sigmoid(a) * (softplus(-b) - softplus(-a))
            + sigmoid(-a) * (softplus(b) - softplus(a)))


# ----------------------------------------------------------------------------- parameters

class Params:
    """A checkpoint's tensors (as float64) with the structure inferred from names/shapes."""

    def __init__(self, path, tensors, meta, heads):
        self.path = path
        self.t = {k: np.asarray(v, dtype=np.float64) for k, v in tensors.items()}
        pos = self.need("encoder.embed.pos.weight", ndim=2)
        self.len_limit, self.d = pos.shape
        d = self.d
        self.blocks = self._count(r"encoder\.blocks\.(\d+)\.")
        if self.blocks == 0:
            raise RefError(f"{path}: no encoder.blocks.* tensors")
        self.e_c = self._count(r"encoder\.embed\.cat\.(\d+)\.weight$")
        self.f_c = self._count(r"profile\.cat\.(\d+)\.weight$")
        self.e_d = self.need("encoder.embed.num.weight", ndim=2).shape[1]
        self.d_cat = self.need("profile.cat.0.weight", ndim=2).shape[1] if self.f_c else 0
        self.f_d = self.need("profile.proj.weight", ndim=2).shape[1] - self.f_c * self.d_cat
        if self.f_d < 0:
            raise RefError(f"{path}: profile.proj.weight has fewer inputs than F_c·d_cat")
        self.heads = heads if heads is not None else self._config_heads(meta)
        if self.heads <= 0 or d % self.heads:
            raise RefError(f"{path}: heads = {self.heads} does not divide d = {d}")
        # shape checks of everything the forward reads
        for k in range(self.e_c):
            self.need(f"encoder.embed.cat.{k}.weight", ndim=2, cols=d)
        self.need("encoder.embed.num.weight", (d, self.e_d))
        self.need("encoder.embed.num.bias", (d,))
        for l in range(self.blocks):
            b = f"encoder.blocks.{l}."
            for ln in ("ln1", "ln2"):
                self.need(b + ln + ".weight", (d,))
                self.need(b + ln + ".bias", (d,))
            self.need(b + "attn.in_proj.weight", (3 * d, d))
            self.need(b + "attn.in_proj.bias", (3 * d,))
            self.need(b + "attn.out_proj.weight", (d, d))
            self.need(b + "attn.out_proj.bias", (d,))
            self.need(b + "ffn.fc1.weight", (4 * d, d))
            self.need(b + "ffn.fc1.bias", (4 * d,))
            self.need(b + "ffn.fc2.weight", (d, 4 * d))
            self.need(b + "ffn.fc2.bias", (d,))
        self.need("encoder.ln_f.weight", (d,))
        self.need("encoder.ln_f.bias", (d,))
        self.need("encoder.empty", (d,))
        for j in range(self.f_c):
            self.need(f"profile.cat.{j}.weight", ndim=2, cols=self.d_cat)
        self.need("profile.proj.bias", (d,))
        self.need("fuse.weight", (d, 2 * d))
        self.need("fuse.bias", (d,))
        self.need("head.weight", (1, d))
        self.need("head.bias", (1,))

    def _count(self, pattern):
        """Number of indices 0..n−1 matched by pattern's group; gaps are an error."""
        idx = {int(m.group(1)) for k in self.t if (m := re.match(pattern, k))}
        if idx != set(range(len(idx))):
            raise RefError(f"{self.path}: indices of /{pattern}/ are not 0..n-1: {sorted(idx)}")
        return len(idx)

    def _config_heads(self, meta):
        """`heads` from the `mgkd.config` JSON (searched at any depth, shallowest first)."""
        if "mgkd.config" not in meta:
            raise RefError(f"{self.path}: no mgkd.config metadata; pass --heads")
        level = [json.loads(meta["mgkd.config"])]
        while level:
            for obj in level:
                if isinstance(obj, dict) and isinstance(obj.get("heads"), int):
                    return obj["heads"]
            level = [v for o in level for v in (o.values() if isinstance(o, dict) else
                                                 o if isinstance(o, list) else [])]
        raise RefError(f"{self.path}: mgkd.config has no integer `heads`; pass --heads")

    def need(self, name, shape=None, ndim=None, cols=None):
        """The tensor `name`, checked against a full shape, a rank, or a column count."""
        if name not in self.t:
            raise RefError(f"{self.path}: missing tensor {name}")
        a = self.t[name]
        if (shape is not None and a.shape != tuple(shape)) or \
           (ndim is not None and a.ndim != ndim) or (cols is not None and a.shape[-1] != cols):
            want = shape if shape is not None else f"ndim {ndim}" + (f", {cols} cols" if cols else "")
            raise RefError(f"{self.path}: tensor {name} has shape {list(a.shape)}, want {want}")
        return a

    def __getitem__(self, name):
        return self.need(name)


# ----------------------------------------------------------------------------- model

def mhsa(P, pre, x):
    """Multi-head self-attention over the valid tokens x [len, d] of one sequence."""
    n, d, H = x.shape[0], P.d, P.heads
    dh = d // H
    qkv = linear(x, P[pre + "in_proj.weight"], P[pre + "in_proj.bias"])
    q, k, v = (qkv[:, i * d:(i + 1) * d].reshape(n, H, dh).transpose(1, 0, 2) for i in range(3))
    a = softmax(q @ k.transpose(0, 2, 1) / math.sqrt(dh))        # [H, len, len]
    o = (a @ v).transpose(1, 0, 2).reshape(n, d)
    return linear(o, P[pre + "out_proj.weight"], P[pre + "out_proj.bias"])


def encode(P, cat, num, what):
    """Sequence encoder on one row's valid events (cat [len,E_c] ints, num [len,E_d]).

    Returns (T [len,d], s [d], [s_l for every block l]) where s_l = masked mean of
    LN_f(block l output) (s_{N-1} = s), s_∅ for an empty sequence."""
    n = cat.shape[0]
    if n == 0:
        return np.zeros((0, P.d)), P["encoder.empty"], [P["encoder.empty"]] * P.blocks
    if n > P.len_limit:
        raise RefError(f"{what}: length {n} exceeds the encoder's position table {P.len_limit}")
    h = linear(num, P["encoder.embed.num.weight"], P["encoder.embed.num.bias"])
    for k in range(P.e_c):
        h = h + P[f"encoder.embed.cat.{k}.weight"][cat[:, k]]
    h = h + P["encoder.embed.pos.weight"][n - 1 - np.arange(n)]   # Pos[0] = most recent
    g, b = P["encoder.ln_f.weight"], P["encoder.ln_f.bias"]
    pooled = []
    for l in range(P.blocks):
        pre = f"encoder.blocks.{l}."
        h = h + mhsa(P, pre + "attn.", layer_norm(h, P[pre + "ln1.weight"], P[pre + "ln1.bias"]))
        f = layer_norm(h, P[pre + "ln2.weight"], P[pre + "ln2.bias"])
        f = gelu(linear(f, P[pre + "ffn.fc1.weight"], P[pre + "ffn.fc1.bias"]))
        h = h + linear(f, P[pre + "ffn.fc2.weight"], P[pre + "ffn.fc2.bias"])
        pooled.append(layer_norm(h, g, b).mean(axis=0))
    T = layer_norm(h, g, b)
    return T, pooled[-1], pooled


def profile(P, num, cat):
    """p = GELU(W_p·[num ; Emb_0[c_0] ; … ] + b_p) for a batch: num [B,F_d], cat [B,F_c]."""
    parts = [num] + [P[f"profile.cat.{j}.weight"][cat[:, j]] for j in range(P.f_c)]
    return gelu(linear(np.concatenate(parts, axis=1), P["profile.proj.weight"], P["profile.proj.bias"]))


def forward(P, num_p, cat_p, cat_seq, num_seq, lens, what):
    """Teacher or student forward on a batch. Returns a dict of z [B], H [B,d], p [B,d],
    tokens (list of T [len_i,d]) and pooled (list over blocks of [B,d])."""
    B = len(lens)
    p = profile(P, num_p, cat_p)
    tokens, s, pooled = [], np.zeros((B, P.d)), np.zeros((P.blocks, B, P.d))
    for i in range(B):
        n = int(lens[i])
        T, s[i], sl = encode(P, cat_seq[i, :n], num_seq[i, :n], f"{what} row {i}")
        tokens.append(T)
        pooled[:, i] = sl
    H = gelu(linear(np.concatenate([s, p], axis=1), P["fuse.weight"], P["fuse.bias"]))
    z = linear(H, P["head.weight"], P["head.bias"])[:, 0]
    return {"z": z, "H": H, "p": p, "tokens": tokens, "pooled": pooled}


# ----------------------------------------------------------------------------- losses

LOSS_KEYS = ("alpha", "beta", "gamma", "delta", "tau", "rho", "soft", "coarse", "fine",
             "self_distill", "reweight", "coarse_cosine", "class_counts")


def class_weights(cfg):
    """(w_0, w_1): (N/(2N_c))^ρ from train counts, scaled to average 1 over them; 1 if off."""
    if not cfg["reweight"]:
        return 1.0, 1.0
    n0, n1 = (float(c) for c in cfg["class_counts"])
    if n0 <= 0 or n1 <= 0:
        raise RefError(f"class_counts {cfg['class_counts']}: both classes must be present "
                       "when reweight is on")
    n, rho = n0 + n1, float(cfg["rho"])
    w0, w1 = (n / (2 * n0)) ** rho, (n / (2 * n1)) ** rho
    scale = (n0 * w0 + n1 * w1) / n
    return w0 / scale, w1 / scale


def losses(S, t, s, y, cfg):
    """Student-stage terms of docs/model.md §5 (None where switched off / absent) and the total."""
    w0, w1 = class_weights(cfg)
    w = np.where(y == 1, w1, w0)
    tau, d = float(cfg["tau"]), S.d
    out = {"hard": float(np.mean(w * bce_logits(y, s["z"])))}

    out["soft"] = None
    if cfg["soft"]:
        out["soft"] = float(tau ** 2 * np.mean(w * kl_bern_logits(t["z"] / tau, s["z"] / tau)))

    out["coarse"] = None
    if cfg["coarse"]:
        proj = linear(s["H"], S["coarse.weight"], S["coarse.bias"])
        if cfg["coarse_cosine"]:
            na = np.maximum(np.linalg.norm(proj, axis=1), 1e-8)
            nb = np.maximum(np.linalg.norm(t["H"], axis=1), 1e-8)
            e = 1.0 - (proj * t["H"]).sum(axis=1) / (na * nb)
        else:
            e = ((proj - t["H"]) ** 2).sum(axis=1) / d
        out["coarse"] = float(np.mean(w * e))

    out["fine"] = None
    if cfg["fine"]:
        total, rows = 0.0, 0
        for i, Tin in enumerate(t["tokens"]):
            if Tin.shape[0] == 0:
                continue
            Tq = s["tokens"][i] if s["tokens"][i].shape[0] else s["p"][i:i + 1]
            q = linear(Tq, S["fine.q.weight"], S["fine.q.bias"])
            k = linear(Tin, S["fine.k.weight"], S["fine.k.bias"])
            v = linear(Tq, S["fine.v.weight"], S["fine.v.bias"])
            A = softmax(q @ k.T / math.sqrt(d))
            e = ((v - A @ Tin) ** 2).sum(axis=1) / d
            total += w[i] * e.mean()
            rows += 1
        out["fine"] = float(total / rows) if rows else 0.0

    aux = [linear(np.concatenate([s["pooled"][l], s["p"]], axis=1),
                  S[f"aux.{l}.weight"], S[f"aux.{l}.bias"])[:, 0] for l in range(S.blocks - 1)]
    out["self"] = None
    if cfg["self_distill"] and aux:
        out["self"] = float(tau ** 2 * np.mean(
            [np.mean(kl_bern_logits(s["z"] / tau, zl / tau)) for zl in aux]))

    coef = {"soft": "alpha", "coarse": "beta", "fine": "gamma", "self": "delta"}
    out["total"] = out["hard"] + sum(float(cfg[c]) * out[k] for k, c in coef.items()
                                     if out[k] is not None)
    return out, aux, float(np.mean(w * bce_logits(y, t["z"])))


# ----------------------------------------------------------------------------- batch

def load_batch(path, T, S):
    """The dumped batch as float64/int64 arrays, checked against both models' shapes."""
    tens, meta = read_safetensors(path)
    need = ("profile_num", "profile_cat", "pre_cat", "pre_num", "pre_lens", "in_cat",
            "in_num", "in_lens", "labels")
    for k in need:
        if k not in tens:
            raise RefError(f"{path}: missing tensor {k}")
    b = {k: np.asarray(tens[k], dtype=np.int64 if ("cat" in k or "lens" in k or k == "labels")
                       else np.float64) for k in need}
    B = b["labels"].shape[0]
    shapes = {
        "profile_num": (B, T.f_d), "profile_cat": (B, T.f_c), "labels": (B,),
        "pre_lens": (B,), "in_lens": (B,),
    }
    for k, sh in shapes.items():
        if b[k].shape != sh:
            raise RefError(f"{path}: tensor {k} has shape {list(b[k].shape)}, want {list(sh)}")
    if (S.f_d, S.f_c) != (T.f_d, T.f_c):
        raise RefError(f"profile fields differ: teacher (F_d {T.f_d}, F_c {T.f_c}), "
                       f"student (F_d {S.f_d}, F_c {S.f_c})")
    for pfx, M in (("pre", S), ("in", T)):
        c, n = b[pfx + "_cat"], b[pfx + "_num"]
        if c.ndim != 3 or c.shape[0] != B or c.shape[2] != M.e_c:
            raise RefError(f"{path}: tensor {pfx}_cat has shape {list(c.shape)}, want [{B}, L, {M.e_c}]")
        if n.shape != (B, c.shape[1], M.e_d):
            raise RefError(f"{path}: tensor {pfx}_num has shape {list(n.shape)}, "
                           f"want [{B}, {c.shape[1]}, {M.e_d}]")
        lens = b[pfx + "_lens"]
        bad = np.nonzero((lens < 0) | (lens > c.shape[1]) | (lens > M.len_limit))[0]
        if bad.size:
            raise RefError(f"{path}: {pfx}_lens row {bad[0]} = {lens[bad[0]]} exceeds "
                           f"min(padded width {c.shape[1]}, length limit {M.len_limit})")
        for k in range(M.e_c):
            vocab = M.t[f"encoder.embed.cat.{k}.weight"].shape[0]
            for i in range(B):
                ids = c[i, :lens[i], k]
                if ids.size and (ids.min() < 0 or ids.max() >= vocab):
                    raise RefError(f"{path}: {pfx}_cat row {i} field {k}: id not in 0..{vocab - 1}")
    for M in (T, S):
        for j in range(M.f_c):
            vocab = M.t[f"profile.cat.{j}.weight"].shape[0]
            ids = b["profile_cat"][:, j]
            if ids.size and (ids.min() < 0 or ids.max() >= vocab):
                raise RefError(f"{path}: profile_cat field {j}: id not in 0..{vocab - 1} "
                               f"(vocabulary of {M.path})")
    if not np.isin(b["labels"], (0, 1)).all():
        raise RefError(f"{path}: labels must be 0 or 1")
    if "mgkd.loss" not in meta:
        raise RefError(f"{path}: no mgkd.loss metadata")
    cfg = json.loads(meta["mgkd.loss"])
    missing = [k for k in LOSS_KEYS if k not in cfg]
    if missing:
        raise RefError(f"{path}: mgkd.loss lacks {missing}")
    return b, cfg


def run(teacher_path, student_path, batch_path, heads=None):
    """Everything the CLI prints, as a dict."""
    T = Params(teacher_path, *read_safetensors(teacher_path), heads)
    S = Params(student_path, *read_safetensors(student_path), heads)
    for l in range(S.blocks - 1):
        S.need(f"aux.{l}.weight", (1, 2 * S.d))
        S.need(f"aux.{l}.bias", (1,))
    for name, shape in (("coarse.weight", (S.d, S.d)), ("coarse.bias", (S.d,))):
        S.need(name, shape)
    for x in "qkv":
        S.need(f"fine.{x}.weight", (S.d, S.d))
        S.need(f"fine.{x}.bias", (S.d,))
    if S.d != T.d:
        raise RefError(f"teacher d = {T.d} and student d = {S.d} differ")
    b, cfg = load_batch(batch_path, T, S)
    t = forward(T, b["profile_num"], b["profile_cat"], b["in_cat"], b["in_num"], b["in_lens"],
                f"{batch_path} in-service")
    s = forward(S, b["profile_num"], b["profile_cat"], b["pre_cat"], b["pre_num"], b["pre_lens"],
                f"{batch_path} pre-service")
    y = b["labels"].astype(np.float64)
    out, aux, lt = losses(S, t, s, y, cfg)
    return {
        "teacher_logits": t["z"].tolist(),
        "student_logits": s["z"].tolist(),
        "aux_logits": [a.tolist() for a in aux],
        "losses": out,
        "teacher_loss": lt,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True, help="teacher checkpoint (.safetensors)")
    ap.add_argument("--student", required=True, help="student checkpoint (.safetensors)")
    ap.add_argument("--batch", required=True, help="batch dump (.safetensors)")
    ap.add_argument("--heads", type=int, default=None,
                    help="attention heads (default: `heads` in the checkpoints' mgkd.config)")
    a = ap.parse_args(argv)
    try:
        res = run(a.teacher, a.student, a.batch, a.heads)
        print(json.dumps(res, allow_nan=False))
    except (RefError, ValueError, OSError, KeyError) as e:
        print(f"mgkd_ref: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
