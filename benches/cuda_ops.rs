//! CUDA microbenchmarks of what the model runs, one function per kernel family, at the
//! reference configuration of docs/model.md §8 (batch 1024, in-service L = 128, pre-service
//! Lp = 32, d = 128, 4 heads, the §8 vocabularies): the teacher's shapes (`batch·L` tokens)
//! and the student's (`batch·Lp`), called exactly as the model calls them — the linear maps
//! through `linear_forward`/`linear_residual`, attention as one operation (fused on CUDA)
//! beside its composition's parts (the products as one `gemm_outer` over heads × rows, the
//! masked softmax), the fused GELU + bias backward beside its unfused pair, one encoder
//! block through the model's own `Block` forward and backward.
//!
//! Reported per op: time per call (median of several batches of calls, between stream
//! synchronisations), achieved GB/s (the bytes the op must move — each input read once, each
//! output written once — over its time) against the measured device-to-device copy
//! bandwidth, and TFLOP/s for the products. Prints `skipped: no CUDA device` without a GPU
//! (an error under `MGKD_REQUIRE_GPU=1`). Run with `cargo bench --bench cuda_ops`.

use std::time::Instant;

use mgkd::backend::cuda::{AttentionKernels, CudaBackend, CudaBuf};
use mgkd::backend::{
    AdamW, AttnShape, Backend, EmbMode, EmbTable, FineGrads, FineShape, Gemm, Mut, Ref, ValidTokens,
};
use mgkd::model::layers::{Block, SeqShape};
use mgkd::model::{ModelConfig, ParamTable, Role};
use mgkd::train::bench::{reference_schema, EVENT_VOCABS, PROFILE_CAT, PROFILE_VOCAB};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Rows of a batch.
const B: usize = 1024;
/// In-service (teacher) length limit.
const L: usize = 128;
/// Pre-service (student) length limit.
const LP: usize = 32;
/// Model width.
const D: usize = 128;
/// Attention heads.
const H: usize = 4;
/// Width of a categorical profile embedding.
const D_CAT: usize = 16;
/// Calls per timed batch.
const REPS: usize = 10;
/// Timed batches (the median is reported).
const BATCHES: usize = 7;
/// Bytes of one f32.
const F32: f64 = std::mem::size_of::<f32>() as f64;

/// One measured op.
struct Row {
    family: &'static str,
    op: String,
    us: f64,
    bytes: f64,
    flops: f64,
}

/// The device, the random inputs' generator and the rows measured so far.
struct Bench {
    be: CudaBackend,
    rng: ChaCha8Rng,
    rows: Vec<Row>,
}

impl Bench {
    /// Median time per call in seconds of `f` (after a warm-up).
    fn time(&self, mut f: impl FnMut()) -> f64 {
        for _ in 0..3 {
            f();
        }
        self.be.synchronize().expect("warm-up");
        let mut t: Vec<f64> = (0..BATCHES)
            .map(|_| {
                let t0 = Instant::now();
                for _ in 0..REPS {
                    f();
                }
                self.be.synchronize().expect("timed batch");
                t0.elapsed().as_secs_f64() / REPS as f64
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t[BATCHES / 2]
    }

    /// Records one op: `floats` elements moved (each read or write counted once), `flops`.
    fn push(&mut self, family: &'static str, op: String, secs: f64, floats: f64, flops: f64) {
        self.rows.push(Row {
            family,
            op,
            us: secs * 1e6,
            bytes: F32 * floats,
            flops,
        });
    }

    /// A buffer of `n` uniform values in [-1, 1).
    fn rand(&mut self, n: usize) -> CudaBuf {
        let v: Vec<f32> = (0..n).map(|_| self.rng.gen_range(-1.0f32..1.0)).collect();
        self.be.upload(&v).expect("upload")
    }

    /// A buffer of `n` elements (contents unspecified: every op below writes its output).
    fn out(&self, n: usize) -> CudaBuf {
        self.be.uninit(n).expect("output buffer")
    }

    /// `rows` lengths uniform in 1..=max (in-service) or 0..=max (pre-service, 10 % empty).
    fn lens(&mut self, rows: usize, max: usize, empty: bool) -> mgkd::backend::cuda::CudaIds {
        let v: Vec<u32> = (0..rows)
            .map(|_| {
                if empty && self.rng.gen_bool(0.1) {
                    0
                } else {
                    self.rng.gen_range(1..=max as u32)
                }
            })
            .collect();
        self.be.upload_ids(&v).expect("lens")
    }
}

/// Device-to-device copy bandwidth (the ceiling of the memory-bound kernels), fill, axpy.
fn memory(b: &mut Bench) -> f64 {
    let big = 64 << 20;
    let src = b.rand(big);
    let mut dst = b.out(big);
    let t = b.time(|| b.be.copy(big, Ref::whole(&src), Mut::whole(&mut dst)));
    let copy_bw = 2.0 * F32 * big as f64 / t;
    let mib = (F32 as usize * big) >> 20;
    b.push(
        "memory",
        format!("copy {mib} MiB (ceiling)"),
        t,
        2.0 * big as f64,
        0.0,
    );
    let t = b.time(|| b.be.fill(big, 0.5, Mut::whole(&mut dst)));
    b.push("memory", format!("fill {big}"), t, big as f64, 0.0);
    let t = b.time(|| b.be.axpy(big, 0.5, Ref::whole(&src), Mut::whole(&mut dst)));
    b.push("memory", format!("axpy {big}"), t, 3.0 * big as f64, 0.0);
    copy_bw
}

/// The linear maps of one block at the teacher's and the student's token counts, as the
/// model runs them (bias in the product's epilogue, residual read by the product), and the
/// two products of their backward.
fn linear(b: &mut Bench) {
    for (who, tok) in [("teacher", B * L), ("student", B * LP)] {
        let x = b.rand(tok * 4 * D);
        let w = b.rand(4 * D * D);
        let bias = b.rand(4 * D);
        let resid = b.rand(tok * D);
        let mut y = b.out(tok * 4 * D);
        for (name, inp, out, residual) in [
            ("in_proj", D, 3 * D, false),
            ("out_proj + residual", D, D, true),
            ("fc1", D, 4 * D, false),
            ("fc2 + residual", 4 * D, D, true),
        ] {
            let (xr, wr, br) = (Ref::whole(&x), Ref::whole(&w), Ref::whole(&bias));
            let t = b.time(|| {
                if residual {
                    let r = Ref::whole(&resid);
                    b.be.linear_residual(tok, inp, out, xr, wr, br, r, Mut::whole(&mut y));
                } else {
                    b.be.linear_forward(tok, inp, out, xr, wr, br, Mut::whole(&mut y), false);
                }
            });
            let floats = tok * inp + out * inp + out + tok * out * if residual { 2 } else { 1 };
            let flops = 2.0 * (tok * inp * out) as f64;
            let op = format!("{who} {name} {tok}x{inp}->{out}");
            b.push("linear", op, t, floats as f64, flops);
        }
        // Backward of fc1: dW += dyᵀ·x (β = 1) and dx = dy·W (β = 0).
        let (inp, out) = (D, 4 * D);
        let mut dw = b.rand(out * inp);
        let dw_g = Gemm::new(out, inp, tok, true, false);
        let t = b.time(|| {
            let (dy, xr) = (Ref::whole(&x), Ref::whole(&resid));
            b.be.gemm(&dw_g, 1.0, dy, xr, 1.0, Mut::whole(&mut dw))
        });
        let floats = tok * out + tok * inp + 2 * out * inp;
        let flops = 2.0 * (tok * inp * out) as f64;
        b.push(
            "linear",
            format!("{who} fc1 dW {out}x{inp}x{tok}"),
            t,
            floats as f64,
            flops,
        );
        let dx_g = Gemm::new(tok, inp, out, false, false);
        let t = b.time(|| {
            let (dy, wr) = (Ref::whole(&x), Ref::whole(&w));
            b.be.gemm(&dx_g, 1.0, dy, wr, 0.0, Mut::whole(&mut y))
        });
        let floats = tok * out + out * inp + tok * inp;
        b.push(
            "linear",
            format!("{who} fc1 dx {tok}x{out}->{inp}"),
            t,
            floats as f64,
            flops,
        );
    }
}

/// Attention as the model runs it: the whole operation (`Backend::attention` and its
/// backward, which the model calls), then its parts — the products as one `gemm_outer` over
/// heads × rows with Q, K and V inside the fused projection's output, and the masked
/// softmax — at the teacher's and the student's lengths.
fn attention(b: &mut Bench) {
    let dh = D / H;
    for (who, l, empty) in [("teacher", L, false), ("student", LP, true)] {
        let tok = B * l;
        let s = AttnShape {
            batch: B,
            len: l,
            heads: H,
            d: D,
        };
        let lens = b.lens(B, l, empty);
        let qkv = b.rand(tok * 3 * D);
        let mut probs = b.rand(s.probs_len());
        let mut ctx = b.out(tok * D);
        let mut dqkv = b.out(tok * 3 * D);
        let dctx = b.rand(tok * D);
        let scale = 1.0 / (dh as f32).sqrt();
        let products = B * H;
        let qk_flops = 2.0 * (products * l * l * dh) as f64;
        // The whole operation in each implementation: the composition, then the fused
        // kernels (MGKD_CUDA_ATTENTION picks between them for training).
        let chosen = b.be.attention_kernels();
        for (kind, name) in [
            (AttentionKernels::Composed, "composed"),
            (AttentionKernels::Fused, "fused"),
        ] {
            b.be.set_attention_kernels(kind);
            let saved_len = b.be.attention_saved_len(&s);
            let mut saved = b.out(saved_len);
            let t = b.time(|| {
                let q = Ref::whole(&qkv);
                let (c, sv) = (Mut::whole(&mut ctx), Mut::whole(&mut saved));
                b.be.attention(&s, &lens, scale, q, c, sv)
            });
            // Q, K, V in, C out; what is saved written once.
            let floats = 4 * tok * D + saved_len;
            let op = format!("{who} attention ({name}) {B}x{H} of {l}x{l}x{dh}");
            b.push("attention", op, t, floats as f64, 2.0 * qk_flops);
            let t = b.time(|| {
                b.be.attention_backward(
                    &s,
                    &lens,
                    scale,
                    Ref::whole(&qkv),
                    Ref::whole(&saved),
                    Ref::whole(&dctx),
                    Mut::whole(&mut dqkv),
                )
                .expect("attention backward")
            });
            let floats = 8 * tok * D + saved_len;
            let op = format!("{who} attention backward ({name}) {B}x{H} of {l}x{l}x{dh}");
            b.push("attention", op, t, floats as f64, 4.0 * qk_flops);
        }
        b.be.set_attention_kernels(chosen);
        let (scores, heads_qk) = s.scores_product(3 * D, 3 * D);
        let (pv, heads_pv) = s.probs_product(false, 3 * D, D);
        let (dv, heads_dv) = s.probs_product(true, D, 3 * D);
        let t = b.time(|| {
            let (q, k) = (Ref::whole(&qkv), Ref::at(&qkv, D));
            b.be.gemm_outer(&scores, &heads_qk, 1.0, q, k, 0.0, Mut::whole(&mut probs))
        });
        let floats = 2 * tok * D + products * l * l;
        let op = format!("{who} Q·Kᵀ {B}x{H} of {l}x{l}x{dh}");
        b.push("attention", op, t, floats as f64, qk_flops);
        let t = b.time(|| {
            let (p, v) = (Ref::whole(&probs), Ref::at(&qkv, 2 * D));
            b.be.gemm_outer(&pv, &heads_pv, 1.0, p, v, 0.0, Mut::whole(&mut ctx))
        });
        let floats = products * l * l + 2 * tok * D;
        let op = format!("{who} P·V {B}x{H} of {l}x{dh}x{l}");
        b.push("attention", op, t, floats as f64, qk_flops);
        let t = b.time(|| {
            let (p, dc) = (Ref::whole(&probs), Ref::whole(&ctx));
            b.be.gemm_outer(&dv, &heads_dv, 1.0, p, dc, 0.0, Mut::at(&mut dqkv, 2 * D))
        });
        let op = format!("{who} dV = Pᵀ·dC {B}x{H} of {l}x{dh}x{l}");
        b.push("attention", op, t, floats as f64, qk_flops);
        let t = b.time(|| {
            b.be.masked_softmax(B, H, l, l, &lens, 0, scale, Mut::whole(&mut probs))
        });
        let n = products * l * l;
        b.push(
            "attention",
            format!("{who} softmax {B}x{H}x{l}x{l}"),
            t,
            2.0 * n as f64,
            0.0,
        );
        let dp = b.rand(n);
        let mut ds = b.out(n);
        let t = b.time(|| {
            let (p, g) = (Ref::whole(&probs), Ref::whole(&dp));
            b.be.masked_softmax_backward(B, H, l, l, &lens, scale, p, g, Mut::whole(&mut ds))
        });
        let op = format!("{who} softmax backward {B}x{H}x{l}x{l}");
        b.push("attention", op, t, 3.0 * n as f64, 0.0);
    }
}

/// GELU and the bias gradient: forward, backward, the column sum, and the fused backward
/// beside the unfused pair it replaces (the FFN's `4d` columns).
fn bias_gelu(b: &mut Bench) {
    for (who, tok) in [("teacher", B * L), ("student", B * LP)] {
        let n = 4 * D;
        let len = tok * n;
        let x = b.rand(len);
        let dy = b.rand(len);
        let mut y = b.out(len);
        let mut db = b.rand(n);
        let t = b.time(|| b.be.gelu(len, Ref::whole(&x), Mut::whole(&mut y)));
        b.push(
            "gelu",
            format!("{who} gelu {tok}x{n}"),
            t,
            2.0 * len as f64,
            0.0,
        );
        let t = b.time(|| {
            let (xr, g) = (Ref::whole(&x), Ref::whole(&dy));
            b.be.gelu_backward(len, xr, g, Mut::whole(&mut y))
        });
        b.push(
            "gelu",
            format!("{who} gelu_backward {tok}x{n}"),
            t,
            3.0 * len as f64,
            0.0,
        );
        let t = b.time(|| {
            b.be.bias_backward(tok, n, Ref::whole(&dy), Mut::whole(&mut db))
        });
        b.push(
            "gelu",
            format!("{who} bias_backward {tok}x{n}"),
            t,
            len as f64,
            0.0,
        );
        // In place on `y` (x read, the gradient read and written: the same traffic as the
        // unfused gelu_backward); repeated, its values shrink towards 0, which a GPU's f32
        // arithmetic handles at full speed.
        let t = b.time(|| {
            let (xr, g) = (Ref::whole(&x), Mut::whole(&mut y));
            b.be.gelu_bias_backward(tok, n, xr, g, Mut::whole(&mut db))
        });
        let op = format!("{who} gelu_bias_backward (fused, in place) {tok}x{n}");
        b.push("gelu", op, t, 3.0 * len as f64, 0.0);
    }
}

/// LayerNorm forward and backward (rows × d).
fn layernorm(b: &mut Bench) {
    for (who, tok) in [("teacher", B * L), ("student", B * LP)] {
        let n = tok * D;
        let x = b.rand(n);
        let dy = b.rand(n);
        let gb = b.rand(2 * D);
        let mut y = b.out(n);
        let mut stats = b.out(2 * tok);
        let t = b.time(|| {
            let (xr, g) = (Ref::whole(&x), Ref::whole(&gb));
            b.be.layernorm(tok, D, xr, g, Mut::whole(&mut y), Mut::whole(&mut stats))
        });
        b.push(
            "layernorm",
            format!("{who} forward {tok}x{D}"),
            t,
            2.0 * n as f64,
            0.0,
        );
        let mut dx = b.rand(n);
        let mut dgb = b.rand(2 * D);
        let t = b.time(|| {
            let (xr, g, s, d) = (
                Ref::whole(&x),
                Ref::whole(&gb),
                Ref::whole(&stats),
                Ref::whole(&dy),
            );
            b.be.layernorm_backward(
                tok,
                D,
                xr,
                g,
                s,
                d,
                Mut::whole(&mut dx),
                Mut::whole(&mut dgb),
            )
        });
        b.push(
            "layernorm",
            format!("{who} backward {tok}x{D}"),
            t,
            4.0 * n as f64,
            0.0,
        );
    }
}

/// The embeddings at the §8 vocabularies: the event fields summed per token (teacher tokens
/// and, with the valid tokens only, the student's backward) and the profile fields
/// concatenated per row; the positions, forward and backward.
fn embedding(b: &mut Bench) {
    let mut off = 0;
    let mut tables = |vocabs: &[u32], width: usize| -> Vec<EmbTable> {
        vocabs
            .iter()
            .map(|&v| {
                let t = EmbTable {
                    offset: off,
                    vocab: v as usize,
                };
                off += v as usize * width;
                t
            })
            .collect()
    };
    let events = tables(&EVENT_VOCABS, D);
    let profile = tables(&[PROFILE_VOCAB; PROFILE_CAT], D_CAT);
    let params = b.rand(off);
    let mut grads = b.rand(off);
    for (who, l, empty) in [("teacher", L, false), ("student", LP, true)] {
        let tok = B * l;
        let lens = b.lens(B, l, empty);
        let ids_h: Vec<u32> = (0..tok)
            .flat_map(|_| EVENT_VOCABS.map(|v| 1 + (v - 1) / 2))
            .collect();
        let ids = b.be.upload_ids(&ids_h).expect("ids");
        let mut h = b.out(tok * D);
        let fields = EVENT_VOCABS.len();
        let t = b.time(|| {
            let o = Mut::whole(&mut h);
            b.be.embedding(tok, D, &events, &ids, &params, EmbMode::Sum, o, D)
        });
        let floats = tok * fields + (fields + 1) * tok * D;
        let op = format!("{who} events gather {tok}x{fields}x{D}");
        b.push("embedding", op, t, floats as f64, 0.0);
        let dh = b.rand(tok * D);
        let valid = ValidTokens {
            lens: &lens,
            max_len: l,
        };
        let t = b.time(|| {
            let g = Ref::whole(&dh);
            b.be.embedding_backward(
                tok,
                D,
                &events,
                &ids,
                EmbMode::Sum,
                g,
                D,
                &mut grads,
                Some(valid),
            )
        });
        let floats = tok * fields + tok * D + 2 * fields * tok * D;
        let op = format!("{who} events backward (valid) {tok}x{fields}x{D}");
        b.push("embedding", op, t, floats as f64, 0.0);
        let pos = b.rand(l * D);
        let t = b.time(|| {
            b.be.add_positions(B, l, D, &lens, Ref::whole(&pos), Mut::whole(&mut h))
        });
        b.push(
            "embedding",
            format!("{who} positions {B}x{l}x{D}"),
            t,
            2.0 * (tok * D) as f64,
            0.0,
        );
        let mut dpos = b.rand(l * D);
        let t = b.time(|| {
            b.be.add_positions_backward(B, l, D, &lens, Ref::whole(&dh), Mut::whole(&mut dpos))
        });
        let op = format!("{who} positions backward {B}x{l}x{D}");
        b.push("embedding", op, t, (tok * D) as f64, 0.0);
    }
    let ids_h: Vec<u32> = (0..B * PROFILE_CAT)
        .map(|i| 1 + i as u32 % (PROFILE_VOCAB - 1))
        .collect();
    let ids = b.be.upload_ids(&ids_h).expect("profile ids");
    let w = PROFILE_CAT * D_CAT;
    let mut x = b.out(B * w);
    let t = b.time(|| {
        let o = Mut::whole(&mut x);
        b.be.embedding(B, D_CAT, &profile, &ids, &params, EmbMode::Concat, o, w)
    });
    let floats = B * PROFILE_CAT + 2 * B * w;
    b.push(
        "embedding",
        format!("profile gather {B}x{PROFILE_CAT}x{D_CAT}"),
        t,
        floats as f64,
        0.0,
    );
}

/// Masked mean pooling (forward, and backward with the empty-sequence vector's gradient).
fn pooling(b: &mut Bench) {
    for (who, l, empty) in [("teacher", L, false), ("student", LP, true)] {
        let n = B * l * D;
        let lens = b.lens(B, l, empty);
        let x = b.rand(n);
        let vec = b.rand(D);
        let mut pooled = b.out(B * D);
        let t = b.time(|| {
            let (xr, e) = (Ref::whole(&x), Ref::whole(&vec));
            b.be.masked_mean(B, l, D, &lens, xr, e, Mut::whole(&mut pooled))
        });
        b.push(
            "pooling",
            format!("{who} masked_mean {B}x{l}x{D}"),
            t,
            (n + B * D) as f64,
            0.0,
        );
        let mut dx = b.out(n);
        let mut dempty = b.rand(D);
        let t = b.time(|| {
            let g = Ref::whole(&pooled);
            b.be.masked_mean_backward(
                B,
                l,
                D,
                &lens,
                g,
                Mut::whole(&mut dx),
                Mut::whole(&mut dempty),
            )
        });
        let op = format!("{who} masked_mean backward {B}x{l}x{D}");
        b.push("pooling", op, t, (n + 2 * B * D) as f64, 0.0);
    }
}

/// The losses as the student step queues them (value kept on the device, gradients).
fn losses(b: &mut Bench) {
    let z = b.rand(B);
    let labels_h: Vec<f32> = (0..B).map(|i| (i % 10 == 0) as u8 as f32).collect();
    let labels = b.be.upload(&labels_h).expect("labels");
    let w = b.rand(B);
    let mut dz = b.out(B);
    let mut slot = b.out(1);
    let t = b.time(|| {
        let g = Some(Mut::whole(&mut dz));
        let (zr, y, wr) = (Ref::whole(&z), Ref::whole(&labels), Ref::whole(&w));
        b.be.bce_loss_into(B, zr, y, wr, 1.0, g, Mut::whole(&mut slot))
            .expect("bce")
    });
    b.push("losses", format!("bce {B}"), t, 4.0 * B as f64, 0.0);
    let pred = b.rand(B * D);
    let target = b.rand(B * D);
    let mut dpred = b.out(B * D);
    let t = b.time(|| {
        let g = Some(Mut::whole(&mut dpred));
        let (p, tr, wr) = (Ref::whole(&pred), Ref::whole(&target), Ref::whole(&w));
        b.be.coarse_loss_into(B, D, p, tr, wr, false, 1.0, g, Mut::whole(&mut slot))
            .expect("coarse")
    });
    b.push(
        "losses",
        format!("coarse mse {B}x{D}"),
        t,
        3.0 * (B * D) as f64,
        0.0,
    );
    // The fine loss reads the pre-service lengths with an empty row counted as one slot.
    let qlens_or_one: Vec<u32> = (0..B).map(|_| b.rng.gen_range(1..=LP as u32)).collect();
    let qlens1 = b.be.upload_ids(&qlens_or_one).expect("qlens");
    let klens = b.lens(B, L, false);
    let q = b.rand(B * LP * D);
    let v = b.rand(B * LP * D);
    let tk = b.rand(B * L * D);
    let (mut dq, mut dv) = (b.out(B * LP * D), b.out(B * LP * D));
    let shape = FineShape {
        batch: B,
        lq: LP,
        lk: L,
        d: D,
    };
    let t = b.time(|| {
        let grads = Some(FineGrads {
            dq: Mut::whole(&mut dq),
            dv: Mut::whole(&mut dv),
        });
        let (qr, vr, tr, wr) = (
            Ref::whole(&q),
            Ref::whole(&v),
            Ref::whole(&tk),
            Ref::whole(&w),
        );
        b.be.fine_loss_into(
            shape,
            qr,
            vr,
            tr,
            &qlens1,
            &klens,
            wr,
            1.0,
            grads,
            Mut::whole(&mut slot),
        )
        .expect("fine")
    });
    // q, v and the teacher tokens read once, dq and dv read and written; four products of
    // LP×L×D per row (scores, the mix, dS, dq).
    let floats = 6 * B * LP * D + B * L * D;
    let flops = 2.0 * (B * LP * L * D * 4) as f64;
    b.push(
        "losses",
        format!("fine {B}x{LP}x{L}x{D}"),
        t,
        floats as f64,
        flops,
    );
}

/// AdamW with the clipping factor on the device, over the §8 student's flat parameter buffer
/// (its parameters and alignment gaps: the length one optimiser step runs over).
fn optimizer(b: &mut Bench) {
    let schema = reference_schema(L, LP);
    let cfg = ModelConfig::with_defaults(Role::Student, &schema).expect("§8 student");
    let np = ParamTable::new(&cfg).total();
    let mut p = b.rand(np);
    let g = b.rand(np);
    let (mut m, mut v) = (b.rand(np), b.rand(np));
    let mask = b.rand(np);
    let hp = AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 1,
        grad_scale: 1.0,
    };
    let mut sum_sq = b.out(1);
    let t = b.time(|| {
        b.be.sum_squares_into(np, Ref::whole(&g), Mut::whole(&mut sum_sq))
            .expect("sum_squares")
    });
    b.push("optimizer", format!("sum_squares {np}"), t, np as f64, 0.0);
    let t = b.time(|| b.be.adamw(&hp, &mut p, &g, &mut m, &mut v, &mask));
    b.push("optimizer", format!("adamw {np}"), t, 8.0 * np as f64, 0.0);
}

/// One encoder block of the §8 teacher through the model's own `Block`: forward (with the
/// cache the backward needs) and forward + backward.
fn block(b: &mut Bench) {
    let schema = reference_schema(L, LP);
    let cfg = ModelConfig::with_defaults(Role::Teacher, &schema).expect("§8 teacher");
    let table = ParamTable::new(&cfg);
    let blk = Block::from_table(&table, "encoder.blocks.0", cfg.heads).expect("block 0");
    let params = b.rand(table.total());
    let mut grads = b.rand(table.total());
    let sh = SeqShape {
        batch: B,
        len: L,
        d: cfg.d,
    };
    let lens = b.lens(B, L, false);
    let h = b.rand(sh.tokens() * cfg.d);
    let tok = sh.tokens();
    let dh = cfg.d / cfg.heads;
    let fwd_flops =
        2.0 * (tok * cfg.d * 12 * cfg.d) as f64 + 4.0 * (B * cfg.heads * L * L * dh) as f64;
    let t = b.time(|| {
        blk.forward(&b.be, &params, sh, &lens, &h)
            .expect("block forward");
    });
    b.push(
        "block",
        format!("teacher block forward {B}x{L}x{}", cfg.d),
        t,
        0.0,
        fwd_flops,
    );
    let mut dh_buf = b.rand(tok * cfg.d);
    let t = b.time(|| {
        let (_, cache) = blk
            .forward(&b.be, &params, sh, &lens, &h)
            .expect("block forward");
        blk.backward(
            &b.be,
            &params,
            &mut grads,
            sh,
            &lens,
            &h,
            &cache,
            &mut dh_buf,
        )
        .expect("block backward");
    });
    let op = format!("teacher block forward + backward {B}x{L}x{}", cfg.d);
    b.push("block", op, t, 0.0, 3.0 * fwd_flops);
}

fn main() {
    let be = match CudaBackend::new(0) {
        Ok(b) => b,
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            if std::env::var("MGKD_REQUIRE_GPU").as_deref() == Ok("1") {
                std::process::exit(1);
            }
            return;
        }
    };
    println!("device: {}", be.name());
    let mut b = Bench {
        be,
        rng: ChaCha8Rng::seed_from_u64(7),
        rows: Vec::new(),
    };
    let copy_bw = memory(&mut b);
    linear(&mut b);
    attention(&mut b);
    bias_gelu(&mut b);
    layernorm(&mut b);
    embedding(&mut b);
    pooling(&mut b);
    losses(&mut b);
    optimizer(&mut b);
    block(&mut b);
    b.be.synchronize()
        .expect("benchmarks ran without a device error");
    print_table(&b.rows, copy_bw);
}

/// The rows as a table: µs per call, GB/s and its share of the copy bandwidth, TFLOP/s.
fn print_table(rows: &[Row], copy_bw: f64) {
    println!();
    println!(
        "{:<10} {:<52} {:>10} {:>9} {:>7} {:>9}",
        "family", "op", "time µs", "GB/s", "% copy", "TFLOP/s"
    );
    let or_dash = |show: bool, s: String| if show { s } else { "-".into() };
    for row in rows {
        let secs = row.us * 1e-6;
        let gbs = row.bytes / secs / 1e9;
        let pct = 100.0 * row.bytes / secs / copy_bw;
        let tf = row.flops / secs / 1e12;
        println!(
            "{:<10} {:<52} {:>10.1} {:>9} {:>7} {:>9}",
            row.family,
            row.op,
            row.us,
            or_dash(row.bytes > 0.0, format!("{gbs:.0}")),
            or_dash(row.bytes > 0.0, format!("{pct:.0}")),
            or_dash(row.flops > 0.0, format!("{tf:.2}")),
        );
    }
}
