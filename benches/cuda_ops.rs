//! CUDA microbenchmarks, one per kernel family, at the reference sizes of docs/model.md §8 (batch
//! 1024, L = 128, Lp = 32, d = 128, 4 heads): time per call (median of several batches of calls,
//! between stream synchronisations), achieved GB/s (the bytes the op must move — each input read
//! once, each output written once — over its time) against the measured device-to-device copy
//! bandwidth, and TFLOP/s for the dense products and one encoder-block forward. Prints `skipped: no
//! CUDA device` without a GPU. Run with `cargo bench --bench cuda_ops`.

use std::time::Instant;

use mgkd::backend::cuda::CudaBackend;
use mgkd::backend::{AdamW, Backend, EmbMode, EmbTable, FineGrads, FineShape, Gemm, Mut, Ref};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const B: usize = 1024;
const L: usize = 128;
const LP: usize = 32;
const D: usize = 128;
const H: usize = 4;
/// Calls per timed batch.
const REPS: usize = 10;
/// Timed batches (the median is reported).
const BATCHES: usize = 7;

struct Row {
    family: &'static str,
    op: String,
    us: f64,
    bytes: f64,
    flops: f64,
}

/// Median time per call in seconds of `f` (after a warm-up).
fn time(be: &CudaBackend, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    be.synchronize().expect("warm-up");
    let mut t: Vec<f64> = (0..BATCHES)
        .map(|_| {
            let t0 = Instant::now();
            for _ in 0..REPS {
                f();
            }
            be.synchronize().expect("timed batch");
            t0.elapsed().as_secs_f64() / REPS as f64
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[BATCHES / 2]
}

fn rand_buf(be: &CudaBackend, r: &mut ChaCha8Rng, n: usize) -> mgkd::backend::cuda::CudaBuf {
    let v: Vec<f32> = (0..n).map(|_| r.gen_range(-1.0f32..1.0)).collect();
    be.upload(&v).expect("upload")
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
    let mut r = ChaCha8Rng::seed_from_u64(7);
    let mut rows: Vec<Row> = Vec::new();
    let mut push = |family, op: String, secs: f64, bytes: f64, flops: f64| {
        rows.push(Row {
            family,
            op,
            us: secs * 1e6,
            bytes,
            flops,
        })
    };

    // Copy bandwidth (the ceiling for memory-bound kernels): 256 MiB, read + write.
    let big = 64 << 20;
    let src = rand_buf(&be, &mut r, big);
    let mut dst = be.zeros(big).expect("dst");
    let t = time(&be, || be.copy(big, Ref::whole(&src), Mut::whole(&mut dst)));
    let copy_bw = 8.0 * big as f64 / t;
    push(
        "memory",
        format!("copy {} MiB (ceiling)", (4 * big) >> 20),
        t,
        8.0 * big as f64,
        0.0,
    );

    let n = B * L * D;
    let x = rand_buf(&be, &mut r, 4 * n);
    let mut y = be.zeros(4 * n).expect("y");
    let t = time(&be, || be.fill(n, 0.5, Mut::whole(&mut y)));
    push("memory", format!("fill {n}"), t, 4.0 * n as f64, 0.0);
    let t = time(&be, || be.axpy(n, 0.5, Ref::whole(&x), Mut::whole(&mut y)));
    push("memory", format!("axpy {n}"), t, 12.0 * n as f64, 0.0);
    let t = time(&be, || {
        be.copy_2d(B * L, D, Ref::whole(&x), 3 * D, Mut::whole(&mut y), D, true)
    });
    push(
        "memory",
        format!("copy_2d acc {}x{D}", B * L),
        t,
        12.0 * n as f64,
        0.0,
    );

    // Dense: the encoder's products (cuBLAS).
    let tok = B * L;
    let w = rand_buf(&be, &mut r, 4 * D * D);
    let mut qkv = be.zeros(tok * 4 * D).expect("qkv");
    for (name, nout) in [("in_proj", 3 * D), ("fc1", 4 * D)] {
        let g = Gemm::new(tok, nout, D, false, true);
        let t = time(&be, || {
            be.gemm(
                &g,
                1.0,
                Ref::whole(&x),
                Ref::whole(&w),
                0.0,
                Mut::whole(&mut qkv),
            )
        });
        let bytes = 4.0 * (tok * D + nout * D + tok * nout) as f64;
        push(
            "gemm",
            format!("{name} {tok}x{nout}x{D}"),
            t,
            bytes,
            2.0 * (tok * nout * D) as f64,
        );
    }
    let dh = D / H;
    let scores_g = Gemm {
        m: L,
        n: L,
        k: dh,
        trans_a: false,
        trans_b: true,
        lda: 3 * D,
        ldb: 3 * D,
        ldc: L,
        batch: H,
        stride_a: dh,
        stride_b: dh,
        stride_c: L * L,
    };
    let mut scores = be.zeros(B * H * L * L).expect("scores");
    let t = time(&be, || {
        for b in 0..B {
            be.gemm(
                &scores_g,
                1.0,
                Ref::at(&qkv, b * L * 3 * D),
                Ref::at(&qkv, b * L * 3 * D + D),
                0.0,
                Mut::at(&mut scores, b * H * L * L),
            );
        }
    });
    push(
        "gemm",
        format!("scores {B}x{H} heads {L}x{L}x{dh}"),
        t,
        4.0 * (B * (2 * L * 3 * D + H * L * L)) as f64,
        2.0 * (B * H * L * L * dh) as f64,
    );

    // Element-wise and normalisation.
    let t = time(&be, || {
        be.add_bias(tok, 3 * D, Ref::whole(&w), Mut::whole(&mut qkv))
    });
    push(
        "bias/gelu",
        format!("add_bias {tok}x{}", 3 * D),
        t,
        8.0 * (tok * 3 * D) as f64,
        0.0,
    );
    let mut db = be.zeros(4 * D).expect("db");
    let t = time(&be, || {
        be.bias_backward(tok, 3 * D, Ref::whole(&qkv), Mut::whole(&mut db))
    });
    push(
        "bias/gelu",
        format!("bias_backward {tok}x{}", 3 * D),
        t,
        4.0 * (tok * 3 * D) as f64,
        0.0,
    );
    let t = time(&be, || be.gelu(4 * n, Ref::whole(&x), Mut::whole(&mut y)));
    push(
        "bias/gelu",
        format!("gelu {}", 4 * n),
        t,
        8.0 * (4 * n) as f64,
        0.0,
    );
    let mut dx = be.zeros(4 * n).expect("dx");
    let t = time(&be, || {
        be.gelu_backward(4 * n, Ref::whole(&x), Ref::whole(&y), Mut::whole(&mut dx))
    });
    push(
        "bias/gelu",
        format!("gelu_backward {}", 4 * n),
        t,
        12.0 * (4 * n) as f64,
        0.0,
    );
    let gb = rand_buf(&be, &mut r, 2 * D);
    let mut st = be.zeros(2 * tok).expect("stats");
    let t = time(&be, || {
        be.layernorm(
            tok,
            D,
            Ref::whole(&x),
            Ref::whole(&gb),
            Mut::whole(&mut y),
            Mut::whole(&mut st),
        )
    });
    push(
        "layernorm",
        format!("forward {tok}x{D}"),
        t,
        8.0 * n as f64,
        0.0,
    );
    let mut dgb = be.zeros(2 * D).expect("dgb");
    let t = time(&be, || {
        be.layernorm_backward(
            tok,
            D,
            Ref::whole(&x),
            Ref::whole(&gb),
            Ref::whole(&st),
            Ref::whole(&y),
            Mut::whole(&mut dx),
            Mut::whole(&mut dgb),
        )
    });
    push(
        "layernorm",
        format!("backward {tok}x{D}"),
        t,
        16.0 * n as f64,
        0.0,
    );

    // Embeddings and positions (§8 event fields: vocab 64, 1024, 16, 168).
    let vocabs = [64usize, 1024, 16, 168];
    let mut off = 0;
    let tables: Vec<EmbTable> = vocabs
        .iter()
        .map(|&v| {
            let t = EmbTable {
                offset: off,
                vocab: v,
            };
            off += v * D;
            t
        })
        .collect();
    let params = rand_buf(&be, &mut r, off);
    let mut grads = be.zeros(off).expect("grads");
    let ids_h: Vec<u32> = (0..tok)
        .flat_map(|_| {
            vocabs
                .iter()
                .map(|&v| r.gen_range(0..v as u32))
                .collect::<Vec<_>>()
        })
        .collect();
    let ids = be.upload_ids(&ids_h).expect("ids");
    let t = time(&be, || {
        be.embedding(
            tok,
            D,
            &tables,
            &ids,
            &params,
            EmbMode::Sum,
            Mut::whole(&mut y),
            D,
        )
    });
    push(
        "embedding",
        format!("gather sum {tok}x4x{D}"),
        t,
        4.0 * (tok * 4 + 5 * n) as f64,
        0.0,
    );
    let t = time(&be, || {
        be.embedding_backward(
            tok,
            D,
            &tables,
            &ids,
            EmbMode::Sum,
            Ref::whole(&x),
            D,
            &mut grads,
            None,
        )
    });
    push(
        "embedding",
        format!("scatter-add {tok}x4x{D}"),
        t,
        4.0 * (tok * 4 + n + 2 * off) as f64,
        0.0,
    );
    let lens_h: Vec<u32> = (0..B).map(|_| r.gen_range(0..=L as u32)).collect();
    let lens = be.upload_ids(&lens_h).expect("lens");
    let pos = rand_buf(&be, &mut r, L * D);
    let t = time(&be, || {
        be.add_positions(B, L, D, &lens, Ref::whole(&pos), Mut::whole(&mut y))
    });
    push(
        "embedding",
        format!("positions {B}x{L}x{D}"),
        t,
        8.0 * n as f64,
        0.0,
    );
    let mut dpos = be.zeros(L * D).expect("dpos");
    let t = time(&be, || {
        be.add_positions_backward(B, L, D, &lens, Ref::whole(&x), Mut::whole(&mut dpos))
    });
    push(
        "embedding",
        format!("positions backward {B}x{L}x{D}"),
        t,
        4.0 * n as f64,
        0.0,
    );

    // Attention softmax and pooling.
    let ns = B * H * L * L;
    let t = time(&be, || {
        be.masked_softmax(B, H, L, L, &lens, 0.17, Mut::whole(&mut scores))
    });
    push(
        "softmax",
        format!("forward {B}x{H}x{L}x{L}"),
        t,
        8.0 * ns as f64,
        0.0,
    );
    let dsc = rand_buf(&be, &mut r, ns);
    let mut ds = be.zeros(ns).expect("ds");
    let t = time(&be, || {
        be.masked_softmax_backward(
            B,
            H,
            L,
            L,
            &lens,
            0.17,
            Ref::whole(&scores),
            Ref::whole(&dsc),
            Mut::whole(&mut ds),
        )
    });
    push(
        "softmax",
        format!("backward {B}x{H}x{L}x{L}"),
        t,
        12.0 * ns as f64,
        0.0,
    );
    let empty = rand_buf(&be, &mut r, D);
    let mut pooled = be.zeros(B * D).expect("pooled");
    let t = time(&be, || {
        be.masked_mean(
            B,
            L,
            D,
            &lens,
            Ref::whole(&x),
            Ref::whole(&empty),
            Mut::whole(&mut pooled),
        )
    });
    push(
        "pooling",
        format!("masked_mean {B}x{L}x{D}"),
        t,
        4.0 * (n + B * D) as f64,
        0.0,
    );
    let mut dempty = be.zeros(D).expect("dempty");
    let t = time(&be, || {
        be.masked_mean_backward(
            B,
            L,
            D,
            &lens,
            Ref::whole(&pooled),
            Mut::whole(&mut dx),
            Mut::whole(&mut dempty),
        )
    });
    push(
        "pooling",
        format!("masked_mean backward {B}x{L}x{D}"),
        t,
        4.0 * (n + B * D) as f64,
        0.0,
    );

    // Losses (fused forward + backward, value downloaded: includes one synchronisation).
    let wts = rand_buf(&be, &mut r, B);
    let labels_h: Vec<f32> = (0..B).map(|_| r.gen_range(0..2) as f32).collect();
    let labels = be.upload(&labels_h).expect("labels");
    let mut dz = be.zeros(B * D).expect("dz");
    let t = time(&be, || {
        be.bce_loss(
            B,
            Ref::whole(&pooled),
            Ref::whole(&labels),
            Ref::whole(&wts),
            1.0,
            Some(Mut::whole(&mut dz)),
        )
        .expect("bce");
    });
    push("losses", format!("bce {B}"), t, 16.0 * B as f64, 0.0);
    let t = time(&be, || {
        be.coarse_loss(
            B,
            D,
            Ref::whole(&pooled),
            Ref::whole(&x),
            Ref::whole(&wts),
            false,
            1.0,
            Some(Mut::whole(&mut dz)),
        )
        .expect("coarse");
    });
    push(
        "losses",
        format!("coarse mse {B}x{D}"),
        t,
        16.0 * (B * D) as f64,
        0.0,
    );
    let qlens_h: Vec<u32> = (0..B).map(|_| r.gen_range(0..=LP as u32)).collect();
    let qlens = be.upload_ids(&qlens_h).expect("qlens");
    let qv = rand_buf(&be, &mut r, B * LP * D);
    let (mut dq, mut dk, mut dv) = (
        be.zeros(B * LP * D).expect("dq"),
        be.zeros(B * L * D).expect("dk"),
        be.zeros(B * LP * D).expect("dv"),
    );
    let shape = FineShape {
        batch: B,
        lq: LP,
        lk: L,
        d: D,
    };
    let t = time(&be, || {
        be.fine_loss(
            shape,
            Ref::whole(&qv),
            Ref::whole(&x),
            Ref::whole(&qv),
            Ref::whole(&x),
            &qlens,
            &lens,
            Ref::whole(&wts),
            1.0,
            Some(FineGrads {
                dq: Mut::whole(&mut dq),
                dk: Mut::whole(&mut dk),
                dv: Mut::whole(&mut dv),
            }),
        )
        .expect("fine");
    });
    let fine_bytes = 4.0 * (B * (2 * LP * D + 2 * L * D) * 2) as f64;
    let fine_flops = 2.0 * (B * LP * L * D * 5) as f64;
    push(
        "losses",
        format!("fine {B}x{LP}x{L}x{D}"),
        t,
        fine_bytes,
        fine_flops,
    );

    // Optimizer on 8M parameters.
    let np = 8 << 20;
    let mut p = rand_buf(&be, &mut r, np);
    let g = rand_buf(&be, &mut r, np);
    let (mut m, mut v) = (be.zeros(np).expect("m"), be.zeros(np).expect("v"));
    let mask = rand_buf(&be, &mut r, np);
    let hp = AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 1,
        grad_scale: 1.0,
    };
    let t = time(&be, || be.adamw(&hp, &mut p, &g, &mut m, &mut v, &mask));
    push("adamw", format!("adamw {np}"), t, 32.0 * np as f64, 0.0);
    let t = time(&be, || {
        be.sum_squares(np, Ref::whole(&g)).expect("sum_squares");
    });
    push(
        "adamw",
        format!("sum_squares {np}"),
        t,
        4.0 * np as f64,
        0.0,
    );

    // One encoder block forward (pre-LN, §8 shapes): LN, QKV, per-row head products,
    // softmax, P·V, out_proj, residual, LN, fc1, GELU, fc2, residual.
    let mut h = rand_buf(&be, &mut r, n);
    let mut hn = be.zeros(n).expect("hn");
    let mut attn = be.zeros(n).expect("attn");
    let mut ff = be.zeros(4 * n).expect("ff");
    let mut ffg = be.zeros(4 * n).expect("ffg");
    let mut proj = be.zeros(n).expect("proj");
    let pv_g = Gemm {
        m: L,
        n: dh,
        k: L,
        trans_a: false,
        trans_b: false,
        lda: L,
        ldb: 3 * D,
        ldc: D,
        batch: H,
        stride_a: L * L,
        stride_b: dh,
        stride_c: dh,
    };
    let block = |h: &mut mgkd::backend::cuda::CudaBuf,
                 hn: &mut mgkd::backend::cuda::CudaBuf,
                 qkv: &mut mgkd::backend::cuda::CudaBuf,
                 scores: &mut mgkd::backend::cuda::CudaBuf,
                 attn: &mut mgkd::backend::cuda::CudaBuf,
                 proj: &mut mgkd::backend::cuda::CudaBuf,
                 ff: &mut mgkd::backend::cuda::CudaBuf,
                 ffg: &mut mgkd::backend::cuda::CudaBuf,
                 st: &mut mgkd::backend::cuda::CudaBuf| {
        be.layernorm(
            tok,
            D,
            Ref::whole(h),
            Ref::whole(&gb),
            Mut::whole(hn),
            Mut::whole(st),
        );
        be.gemm(
            &Gemm::new(tok, 3 * D, D, false, true),
            1.0,
            Ref::whole(hn),
            Ref::whole(&w),
            0.0,
            Mut::whole(qkv),
        );
        be.add_bias(tok, 3 * D, Ref::whole(&w), Mut::whole(qkv));
        for b in 0..B {
            be.gemm(
                &scores_g,
                1.0,
                Ref::at(qkv, b * L * 3 * D),
                Ref::at(qkv, b * L * 3 * D + D),
                0.0,
                Mut::at(scores, b * H * L * L),
            );
        }
        be.masked_softmax(
            B,
            H,
            L,
            L,
            &lens,
            1.0 / (dh as f32).sqrt(),
            Mut::whole(scores),
        );
        for b in 0..B {
            be.gemm(
                &pv_g,
                1.0,
                Ref::at(scores, b * H * L * L),
                Ref::at(qkv, b * L * 3 * D + 2 * D),
                0.0,
                Mut::at(attn, b * L * D),
            );
        }
        be.gemm(
            &Gemm::new(tok, D, D, false, true),
            1.0,
            Ref::whole(attn),
            Ref::whole(&w),
            0.0,
            Mut::whole(proj),
        );
        be.axpy(n, 1.0, Ref::whole(proj), Mut::whole(h));
        be.layernorm(
            tok,
            D,
            Ref::whole(h),
            Ref::whole(&gb),
            Mut::whole(hn),
            Mut::whole(st),
        );
        be.gemm(
            &Gemm::new(tok, 4 * D, D, false, true),
            1.0,
            Ref::whole(hn),
            Ref::whole(&w),
            0.0,
            Mut::whole(ff),
        );
        be.gelu(4 * n, Ref::whole(ff), Mut::whole(ffg));
        be.gemm(
            &Gemm::new(tok, D, 4 * D, false, false),
            1.0,
            Ref::whole(ffg),
            Ref::whole(&w),
            0.0,
            Mut::whole(proj),
        );
        be.axpy(n, 1.0, Ref::whole(proj), Mut::whole(h));
    };
    let t = time(&be, || {
        block(
            &mut h,
            &mut hn,
            &mut qkv,
            &mut scores,
            &mut attn,
            &mut proj,
            &mut ff,
            &mut ffg,
            &mut st,
        )
    });
    let block_flops =
        2.0 * (tok * D * (3 * D + D + 8 * D)) as f64 + 4.0 * (B * H * L * L * dh) as f64;
    push(
        "encoder",
        format!("block forward {B}x{L}x{D}"),
        t,
        0.0,
        block_flops,
    );
    be.synchronize()
        .expect("benchmarks ran without a device error");

    println!();
    println!(
        "{:<10} {:<36} {:>10} {:>9} {:>7} {:>9}",
        "family", "op", "time µs", "GB/s", "% copy", "TFLOP/s"
    );
    for row in &rows {
        let gbs = row.bytes / (row.us * 1e-6) / 1e9;
        let pct = 100.0 * gbs * 1e9 / copy_bw;
        let tf = row.flops / (row.us * 1e-6) / 1e12;
        println!(
            "{:<10} {:<36} {:>10.1} {:>9} {:>7} {:>9}",
            row.family,
            row.op,
            row.us,
            if row.bytes > 0.0 {
                format!("{gbs:.0}")
            } else {
                "-".into()
            },
            if row.bytes > 0.0 {
                format!("{pct:.0}")
            } else {
                "-".into()
            },
            if row.flops > 0.0 {
                format!("{tf:.2}")
            } else {
                "-".into()
            },
        );
    }
}
