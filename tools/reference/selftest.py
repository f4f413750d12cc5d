#!/usr/bin/env python3
"""Self-test of mgkd_ref.py: builds tiny random checkpoints and batches with a built-in
safetensors writer, runs the reference and checks invariants that hold for any correct
implementation of docs/model.md §4-§5. Exit status 0 when every check passes.

    python3 tools/reference/selftest.py
"""

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mgkd_ref as ref  # noqa: E402

_ST_DTYPE = {np.dtype("<f4"): "F32", np.dtype("<f8"): "F64", np.dtype("<u4"): "U32",
             np.dtype("u1"): "U8", np.dtype("<u8"): "U64", np.dtype("<i8"): "I64"}


def write_safetensors(path, tensors, metadata=None):
    """Write name -> ndarray (+ str metadata) in the safetensors layout: u64 LE header length,
    JSON header padded with spaces to a multiple of 8, then the raw little-endian buffers."""
    header, bufs, off = {}, [], 0
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        raw = a.tobytes()
        header[name] = {"dtype": _ST_DTYPE[a.dtype], "shape": list(a.shape),
                        "data_offsets": [off, off + len(raw)]}
        bufs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b"".join(bufs))


# ----------------------------------------------------------------------------- builders

D, HEADS, DCAT = 8, 2, 3
EV_VOCAB, PROF_VOCAB, E_D, F_D = (5, 7), (4, 6, 3), 2, 3


def make_params(rng, student, blocks, len_limit, scale=0.3):
    """Random parameters of a teacher or student (float32, engine.md names)."""
    n = lambda *s: (rng.normal(0.0, scale, s)).astype(np.float32)  # noqa: E731
    one = lambda *s: (1.0 + rng.normal(0.0, 0.1, s)).astype(np.float32)  # noqa: E731
    p = {f"encoder.embed.cat.{k}.weight": n(v, D) for k, v in enumerate(EV_VOCAB)}
    p.update({"encoder.embed.num.weight": n(D, E_D), "encoder.embed.num.bias": n(D),
              "encoder.embed.pos.weight": n(len_limit, D)})
    for l in range(blocks):
        b = f"encoder.blocks.{l}."
        p.update({b + "ln1.weight": one(D), b + "ln1.bias": n(D),
                  b + "attn.in_proj.weight": n(3 * D, D), b + "attn.in_proj.bias": n(3 * D),
                  b + "attn.out_proj.weight": n(D, D), b + "attn.out_proj.bias": n(D),
                  b + "ln2.weight": one(D), b + "ln2.bias": n(D),
                  b + "ffn.fc1.weight": n(4 * D, D), b + "ffn.fc1.bias": n(4 * D),
                  b + "ffn.fc2.weight": n(D, 4 * D), b + "ffn.fc2.bias": n(D)})
    p.update({"encoder.ln_f.weight": one(D), "encoder.ln_f.bias": n(D), "encoder.empty": n(D)})
    p.update({f"profile.cat.{j}.weight": n(v, DCAT) for j, v in enumerate(PROF_VOCAB)})
    p.update({"profile.proj.weight": n(D, F_D + len(PROF_VOCAB) * DCAT), "profile.proj.bias": n(D),
              "fuse.weight": n(D, 2 * D), "fuse.bias": n(D),
              "head.weight": n(1, D) * 3, "head.bias": n(1)})
    if student:
        p.update({f"aux.{l}.weight": n(1, 2 * D) for l in range(blocks - 1)})
        p.update({f"aux.{l}.bias": n(1) for l in range(blocks - 1)})
        p.update({"coarse.weight": n(D, D), "coarse.bias": n(D)})
        for x in "qkv":
            p.update({f"fine.{x}.weight": n(D, D), f"fine.{x}.bias": n(D)})
    return p


def ckpt_meta(role, blocks, len_limit):
    cfg = {"role": role, "d": D, "heads": HEADS, "blocks": blocks, "d_cat": DCAT,
           "len_limit": len_limit}
    return {"mgkd.format": "mgkd-checkpoint", "mgkd.version": "1", "mgkd.config": json.dumps(cfg)}


LOSS = {"alpha": 1.0, "beta": 1.0, "gamma": 1.0, "delta": 0.5, "tau": 2.0, "rho": 0.5,
        "soft": True, "coarse": True, "fine": True, "self_distill": True, "reweight": True,
        "coarse_cosine": False, "class_counts": [90, 10]}


def make_batch(rng, B, Lp, L, pre_lens=None, in_lens=None):
    """Random padded batch; padded slots hold garbage (huge ids, big numbers)."""
    def seq(lens, width):
        cat = np.stack([rng.integers(0, v, (B, width)) for v in EV_VOCAB], axis=2).astype(np.uint32)
        num = rng.normal(0, 1, (B, width, E_D)).astype(np.float32)
        return cat, num, np.asarray(lens, dtype=np.uint32)
    pre_lens = rng.integers(0, Lp + 1, B) if pre_lens is None else pre_lens
    in_lens = rng.integers(0, L + 1, B) if in_lens is None else in_lens
    pc, pn, pl = seq(pre_lens, Lp)
    ic, inn, il = seq(in_lens, L)
    b = {"profile_num": rng.normal(0, 1, (B, F_D)).astype(np.float32),
         "profile_cat": np.stack([rng.integers(0, v, B) for v in PROF_VOCAB], 1).astype(np.uint32),
         "pre_cat": pc, "pre_num": pn, "pre_lens": pl, "in_cat": ic, "in_num": inn, "in_lens": il,
         "labels": rng.integers(0, 2, B).astype(np.uint8)}
    scramble_padding(rng, b)
    return b


def scramble_padding(rng, b):
    """Overwrite every padded slot with different garbage, in place."""
    for pfx in ("pre", "in"):
        for i, n in enumerate(b[pfx + "_lens"]):
            w = b[pfx + "_cat"].shape[1] - int(n)
            b[pfx + "_cat"][i, n:] = rng.integers(10**6, 2**32 - 1, (w, len(EV_VOCAB)))
            b[pfx + "_num"][i, n:] = rng.normal(0, 1e6, (w, E_D))


class Case:
    """A teacher, a student and a batch written to a temporary directory."""

    def __init__(self, tmp, name, teacher, student, batch, loss, t_blocks, s_blocks, Lp, L):
        self.t, self.s, self.b = (os.path.join(tmp, f"{name}.{x}.safetensors") for x in "tsb")
        write_safetensors(self.t, teacher, ckpt_meta("teacher", t_blocks, L))
        write_safetensors(self.s, student, ckpt_meta("student", s_blocks, Lp))
        write_safetensors(self.b, batch, {"mgkd.loss": json.dumps(loss)})

    def run(self):
        return ref.run(self.t, self.s, self.b)


# ----------------------------------------------------------------------------- checks

FAILS = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        FAILS.append(what)


def close(a, b, tol=1e-10):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= tol * (1 + np.abs(b))))


def same_losses(x, y, tol=1e-10):
    return all((x[k] is None) == (y[k] is None) and (x[k] is None or close(x[k], y[k], tol))
               for k in x)


def main():
    rng = np.random.default_rng(20260525)
    with tempfile.TemporaryDirectory(prefix="mgkd-ref-selftest-") as tmp:
        return checks(rng, tmp)


def checks(rng, tmp):
    B, Lp, L, TB, SB = 7, 4, 6, 2, 3
    teacher = make_params(rng, False, TB, L)
    student = make_params(rng, True, SB, Lp)
    pre_lens = np.array([0, 1, 4, 2, 3, 4, 0])
    in_lens = np.array([3, 0, 6, 1, 5, 0, 2])  # rows with empty pre and/or in sequences
    batch = make_batch(rng, B, Lp, L, pre_lens, in_lens)
    base = Case(tmp, "base", teacher, student, batch, LOSS, TB, SB, Lp, L)
    r = base.run()

    # 1. shape and finiteness
    vals = r["teacher_logits"] + r["student_logits"] + sum(r["aux_logits"], [])
    check(len(r["teacher_logits"]) == B and len(r["student_logits"]) == B
          and len(r["aux_logits"]) == SB - 1 and all(len(a) == B for a in r["aux_logits"]),
          "output shapes: B logits each, blocks-1 aux heads")
    check(all(math.isfinite(v) for v in vals), "logits finite")
    check(all(v is not None and math.isfinite(v) for v in r["losses"].values())
          and math.isfinite(r["teacher_loss"]), "every loss present and finite")
    check(len(set(np.round(r["student_logits"], 12))) == B, "logits differ between rows")

    # 2. CLI prints the same JSON; the built-in parser agrees with the safetensors package
    out = subprocess.run([sys.executable, os.path.join(HERE, "mgkd_ref.py"), "--teacher", base.t,
                          "--student", base.s, "--batch", base.b], capture_output=True, text=True)
    check(out.returncode == 0 and json.loads(out.stdout) == r, "CLI JSON equals run()")
    if importlib.util.find_spec("safetensors") is not None:
        for path in (base.t, base.s, base.b):
            t1, m1 = ref.read_safetensors(path)
            t2, m2 = ref._read_safetensors_builtin(path)
            check(m1 == m2 and t1.keys() == t2.keys()
                  and all(t1[k].dtype == t2[k].dtype and np.array_equal(t1[k], t2[k]) for k in t1),
                  f"built-in parser == safetensors package on {os.path.basename(path)}")
    else:
        print("skip  safetensors package not installed: parser cross-check")

    # 3. permuting rows permutes logits, losses unchanged
    perm = rng.permutation(B)
    pb = {k: v[perm] for k, v in batch.items()}
    rp = Case(tmp, "perm", teacher, student, pb, LOSS, TB, SB, Lp, L).run()
    check(close(rp["teacher_logits"], np.array(r["teacher_logits"])[perm])
          and close(rp["student_logits"], np.array(r["student_logits"])[perm])
          and close(rp["aux_logits"], np.array(r["aux_logits"])[:, perm]),
          "permuting rows permutes teacher, student and aux logits")
    check(same_losses(rp["losses"], r["losses"]) and close(rp["teacher_loss"], r["teacher_loss"]),
          "permuting rows leaves every loss unchanged")

    # 4. padded slots: other garbage, and a wider padding, change nothing
    gb = copy.deepcopy(batch)
    scramble_padding(rng, gb)
    rg = Case(tmp, "garbage", teacher, student, gb, LOSS, TB, SB, Lp, L).run()
    check(rg == r, "different garbage in padded slots changes nothing")
    wb = copy.deepcopy(batch)
    for pfx in ("pre", "in"):
        for k in ("_cat", "_num"):
            a = wb[pfx + k]
            wb[pfx + k] = np.concatenate([a, np.full_like(a[:, :2], 7)], axis=1)
    tw = make_params(np.random.default_rng(1), False, TB, L + 2)
    sw = make_params(np.random.default_rng(1), True, SB, Lp + 2)
    tw.update({k: v for k, v in teacher.items() if k != "encoder.embed.pos.weight"})
    sw.update({k: v for k, v in student.items() if k != "encoder.embed.pos.weight"})
    tw["encoder.embed.pos.weight"][:L] = teacher["encoder.embed.pos.weight"]
    sw["encoder.embed.pos.weight"][:Lp] = student["encoder.embed.pos.weight"]
    rw = Case(tmp, "wide", tw, sw, wb, LOSS, TB, SB, Lp + 2, L + 2).run()
    check(same_losses(rw["losses"], r["losses"]) and close(rw["student_logits"], r["student_logits"]),
          "wider padding + longer position table (unused rows) changes nothing")

    # 5. each row alone gives the same logits (rows are independent)
    alone = [Case(tmp, f"row{i}", teacher, student, {k: v[i:i + 1] for k, v in batch.items()},
                  LOSS, TB, SB, Lp, L).run() for i in range(B)]
    check(close([a["teacher_logits"][0] for a in alone], r["teacher_logits"])
          and close([a["student_logits"][0] for a in alone], r["student_logits"]),
          "a row scored alone gets the same logits as in the batch")

    # 6. positions count back from the most recent event: prepending events to a row changes
    #    which position the last event gets only if the convention were oldest-first
    pos_t = dict(teacher)
    for l in range(TB):  # blocks reduced to identity: the tokens stay per-event
        for w in ("attn.out_proj", "ffn.fc2"):
            pos_t[f"encoder.blocks.{l}.{w}.weight"] = np.zeros_like(teacher[f"encoder.blocks.{l}.{w}.weight"])
            pos_t[f"encoder.blocks.{l}.{w}.bias"] = np.zeros_like(teacher[f"encoder.blocks.{l}.{w}.bias"])
    P = ref.Params("pos", pos_t, ckpt_meta("teacher", TB, L), None)
    cat = np.array([[1, 2], [3, 4], [0, 6]])
    num = rng.normal(0, 1, (3, E_D))
    T3, _, _ = ref.encode(P, cat, num, "pos")
    T1, _, _ = ref.encode(P, cat[2:], num[2:], "pos")
    check(close(T3[2], T1[0], 1e-12), "the most recent event's token is the same at every length")

    # 6b. attention == a second, loop-by-loop formulation on a padded sequence with a key mask
    x = rng.normal(0, 1, (5, D))
    n_valid, pre = 3, "encoder.blocks.1.attn."
    P = ref.Params("teacher", teacher, ckpt_meta("teacher", TB, L), None)
    W, bias = P[pre + "in_proj.weight"], P[pre + "in_proj.bias"]
    dh, o = D // HEADS, np.zeros((5, D))
    for h in range(HEADS):
        sl = slice(h * dh, (h + 1) * dh)
        for qi in range(5):
            q = W[sl] @ x[qi] + bias[sl]
            sc = [(q @ (W[D:2 * D][sl] @ x[k] + bias[D:2 * D][sl])) / math.sqrt(dh) if k < n_valid
                  else -math.inf for k in range(5)]
            m = max(sc)
            ex = [math.exp(c - m) for c in sc]
            for k in range(n_valid):
                o[qi, sl] += ex[k] / sum(ex) * (W[2 * D:][sl] @ x[k] + bias[2 * D:][sl])
    o = o @ P[pre + "out_proj.weight"].T + P[pre + "out_proj.bias"]
    check(close(ref.mhsa(P, pre, x[:n_valid]), o[:n_valid], 1e-12),
          "attention matches an explicit per-head, per-query loop with a key mask")

    # 6c. LayerNorm: biased variance, eps = 1e-5 (shows on a tiny-variance input)
    xs = np.array([[1e-3, -1e-3, 1e-3, -1e-3]])
    check(close(ref.layer_norm(xs, 1.0, 0.0), xs / math.sqrt(1e-6 + 1e-5), 1e-14),
          "LayerNorm uses the biased variance and eps = 1e-5")

    # 6d. rows with an empty in-service sequence leave L_fine unchanged (|R| normalisation)
    keep = np.nonzero(batch["in_lens"] > 0)[0]
    rk = Case(tmp, "keep", teacher, student, {k: v[keep] for k, v in batch.items()},
              LOSS, TB, SB, Lp, L).run()
    check(keep.size < B and close(rk["losses"]["fine"], r["losses"]["fine"], 1e-12),
          "rows with an empty in-service sequence do not change L_fine")

    # 7. class weights average 1 over the train counts, ratio (N0/N1)^rho
    w0, w1 = ref.class_weights(LOSS)
    n0, n1 = LOSS["class_counts"]
    check(close((n0 * w0 + n1 * w1) / (n0 + n1), 1.0, 1e-14) and close(w1 / w0, (n0 / n1) ** 0.5, 1e-14),
          "class weights average 1 and have ratio (N0/N1)^rho")
    check(ref.class_weights(dict(LOSS, reweight=False)) == (1.0, 1.0), "reweight off: weights 1")

    # 8. coefficients zero: total = hard; switches off: null and excluded from the total
    r0 = Case(tmp, "zero", teacher, student, batch,
              dict(LOSS, alpha=0.0, beta=0.0, gamma=0.0, delta=0.0), TB, SB, Lp, L).run()
    check(r0["losses"]["total"] == r0["losses"]["hard"] == r["losses"]["hard"],
          "alpha=beta=gamma=delta=0: total == hard")
    l = r["losses"]
    check(close(l["total"], l["hard"] + l["soft"] + l["coarse"] + l["fine"] + 0.5 * l["self"], 1e-14),
          "total = hard + alpha soft + beta coarse + gamma fine + delta self")
    roff = Case(tmp, "off", teacher, student, batch,
                dict(LOSS, soft=False, fine=False, self_distill=False), TB, SB, Lp, L).run()
    lo = roff["losses"]
    check(lo["soft"] is None and lo["fine"] is None and lo["self"] is None
          and close(lo["total"], lo["hard"] + lo["coarse"], 1e-14) and close(lo["coarse"], l["coarse"]),
          "switched-off terms are null and left out of the total")
    rnw = Case(tmp, "nowt", teacher, student, batch, dict(LOSS, reweight=False), TB, SB, Lp, L).run()
    y = batch["labels"].astype(float)
    zs = np.array(r["student_logits"])
    naive = -np.mean(y * np.log(1 / (1 + np.exp(-zs))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-zs))))
    check(close(rnw["losses"]["hard"], naive, 1e-12), "unweighted hard loss == naive BCE")
    check(rnw["losses"]["self"] == l["self"], "L_self is unweighted (same with reweight off)")
    rcos = Case(tmp, "cos", teacher, student, batch, dict(LOSS, coarse_cosine=True, reweight=False), TB, SB, Lp, L).run()
    check(0.0 <= rcos["losses"]["coarse"] <= 2.0 and rcos["losses"]["coarse"] != l["coarse"],
          "cosine coarse loss (unweighted) in [0, 2]")

    # 9. KL terms >= 0 and exactly their definition on moderate logits
    a, b = rng.normal(0, 3, 1000), rng.normal(0, 3, 1000)
    kl = ref.kl_bern_logits(a, b)
    pa, pb_ = 1 / (1 + np.exp(-a)), 1 / (1 + np.exp(-b))
    naive = pa * np.log(pa / pb_) + (1 - pa) * np.log((1 - pa) / (1 - pb_))
    check(close(kl, naive, 1e-9) and kl.min() >= 0, "KL(Bern) matches the naive form, >= 0")
    big = np.array([-800.0, -40.0, 0.0, 40.0, 800.0])
    kb = ref.kl_bern_logits(big[:, None], big[None, :])
    check(np.isfinite(kb).all() and kb.min() >= 0 and np.all(np.diag(kb) == 0),
          "KL finite, >= 0 at extreme logits, exactly 0 on the diagonal")
    check(np.isfinite(ref.bce_logits(np.array([0.0, 1.0, 0.0, 1.0]), np.array([-800, -800, 800, 800.0]))).all(),
          "BCE finite at extreme logits")
    check(l["soft"] >= 0 and l["self"] >= 0, "L_soft, L_self >= 0 on the random case")

    # 10. student = teacher (copied): equal logits, L_soft = L_coarse = 0, and L_fine = 0 when
    #     every row has one in-service event equal to its one pre-service event and W_v = I
    st = make_params(rng, True, TB, L)
    st.update(teacher)
    st["coarse.weight"] = np.eye(D, dtype=np.float32)
    st["coarse.bias"] = np.zeros(D, np.float32)
    st["fine.v.weight"] = np.eye(D, dtype=np.float32)
    st["fine.v.bias"] = np.zeros(D, np.float32)
    cb = make_batch(rng, B, L, L, in_lens=np.array([1, 1, 0, 1, 1, 1, 1]))
    cb["pre_lens"] = cb["in_lens"].copy()
    cb["pre_cat"], cb["pre_num"] = cb["in_cat"].copy(), cb["in_num"].copy()
    rc = Case(tmp, "copy", teacher, st, cb, LOSS, TB, TB, L, L).run()
    lc = rc["losses"]
    check(rc["student_logits"] == rc["teacher_logits"], "student = teacher copy: equal logits")
    check(lc["soft"] == 0.0 and lc["coarse"] == 0.0, "student = teacher copy: L_soft = L_coarse = 0")
    check(abs(lc["fine"]) < 1e-28, "one equal token each and W_v = I: L_fine = 0")
    check(close(lc["hard"], rc["teacher_loss"], 1e-14), "student = teacher copy: L_hard = L_T")

    # 11. one block: no aux head, L_self null
    t1 = make_params(rng, False, 1, L)
    s1 = make_params(rng, True, 1, Lp)
    r1 = Case(tmp, "oneblock", t1, s1, batch, LOSS, 1, 1, Lp, L).run()
    check(r1["aux_logits"] == [] and r1["losses"]["self"] is None
          and close(r1["losses"]["total"], sum(r1["losses"][k] for k in ("hard", "soft", "coarse", "fine"))),
          "one block: no aux logits, self null, total without it")

    # 12. stability: huge head weights still give finite losses
    sh = dict(student, **{"head.weight": student["head.weight"] * 1e4})
    rh = Case(tmp, "huge", teacher, sh, batch, LOSS, TB, SB, Lp, L).run()
    check(all(v is None or math.isfinite(v) for v in rh["losses"].values()), "finite with |z| ~ 1e4")

    # 13. bad input is refused with a message naming the tensor
    bad = copy.deepcopy(batch)
    bad["in_cat"][2, 0, 1] = EV_VOCAB[1]
    try:
        Case(tmp, "bad", teacher, student, bad, LOSS, TB, SB, Lp, L).run()
        check(False, "out-of-vocabulary id in a valid slot is refused")
    except ref.RefError as e:
        check("in_cat row 2 field 1" in str(e), f"out-of-vocabulary id refused: {e}")
    miss = {k: v for k, v in student.items() if k != "fine.q.bias"}
    try:
        Case(tmp, "miss", teacher, miss, batch, LOSS, TB, SB, Lp, L).run()
        check(False, "missing tensor is refused")
    except ref.RefError as e:
        check("fine.q.bias" in str(e), f"missing tensor refused: {e}")

    print(f"FAILED {len(FAILS)} check(s)" if FAILS else "all checks passed")
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
