//! Timings of the CPU backend's hot ops at the reference shapes of docs/model.md §8 (f32):
//! matrix products (GFLOP/s), LayerNorm, GELU and the masked softmax (GB/s of memory
//! traffic: bytes read + written once). Run with `cargo bench --bench cpu_ops`; the best of a
//! few repetitions is reported. `RAYON_NUM_THREADS` sets the thread count.

use std::hint::black_box;
use std::time::Instant;

use mgkd::backend::cpu::CpuBackend;
use mgkd::backend::{Backend, Gemm, Mut, Ref};

/// Best wall time in seconds of `reps` runs of `f` (after one warm-up run).
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn data(n: usize, seed: u32) -> Vec<f32> {
    // A cheap deterministic pattern in [-1, 1).
    (0..n)
        .map(|i| {
            let h = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
            (h >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

fn bench_gemm(b: &CpuBackend<f32>, label: &str, s: Gemm) {
    let (ar, ac) = if s.trans_a { (s.k, s.m) } else { (s.m, s.k) };
    let (br, bc) = if s.trans_b { (s.n, s.k) } else { (s.k, s.n) };
    let a = data(s.batch.max(1) * ar * ac, 1);
    let bm = data(s.batch.max(1) * br * bc, 2);
    let mut c = vec![0.0f32; s.batch.max(1) * s.m * s.n];
    let t = best(3, || {
        b.gemm(
            &s,
            1.0,
            Ref::whole(&a),
            Ref::whole(&bm),
            0.0,
            Mut::whole(&mut c),
        );
        black_box(&c);
    });
    let flops = 2.0 * (s.batch * s.m * s.n * s.k) as f64;
    println!(
        "gemm {label:<34} {:>9.3} ms {:>8.1} GFLOP/s",
        t * 1e3,
        flops / t / 1e9
    );
}

fn batched(batch: usize, m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Gemm {
    let mut s = Gemm::new(m, n, k, ta, tb);
    s.batch = batch;
    s.stride_a = m * k;
    s.stride_b = k * n;
    s.stride_c = m * n;
    s
}

fn main() {
    let b = CpuBackend::<f32>::new();
    println!(
        "mgkd cpu_ops, f32, {} rayon threads",
        rayon::current_num_threads()
    );

    // Dense layers over 8192 tokens of width d = 128 (FFN 4d = 512, in_proj 3d = 384).
    let rows = 8192;
    bench_gemm(
        &b,
        "8192x512x128 fc1 fwd (X·Wᵀ)",
        Gemm::new(rows, 512, 128, false, true),
    );
    bench_gemm(
        &b,
        "8192x128x512 fc2 fwd (X·Wᵀ)",
        Gemm::new(rows, 128, 512, false, true),
    );
    bench_gemm(
        &b,
        "8192x384x128 in_proj fwd",
        Gemm::new(rows, 384, 128, false, true),
    );
    bench_gemm(
        &b,
        "8192x128x512 fc1 dX (dY·W)",
        Gemm::new(rows, 128, 512, false, false),
    );
    bench_gemm(
        &b,
        "512x128x8192 fc1 dW (dYᵀ·X)",
        Gemm::new(512, 128, rows, true, false),
    );
    // Attention: batch 256 × 4 heads, L = 128, dh = 32.
    bench_gemm(
        &b,
        "1024 x (128x128x32) Q·Kᵀ",
        batched(1024, 128, 128, 32, false, true),
    );
    bench_gemm(
        &b,
        "1024 x (128x32x128) P·V",
        batched(1024, 128, 32, 128, false, false),
    );

    // LayerNorm forward + backward, 8192 × 128.
    let d = 128;
    let x = data(rows * d, 3);
    let mut gb = vec![1.0f32; 2 * d];
    gb[d..].fill(0.0);
    let mut y = vec![0.0f32; rows * d];
    let mut st = vec![0.0f32; rows * 2];
    let t = best(5, || {
        b.layernorm(
            rows,
            d,
            Ref::whole(&x),
            Ref::whole(&gb),
            Mut::whole(&mut y),
            Mut::whole(&mut st),
        );
    });
    let bytes = 4.0 * (2 * rows * d + 2 * rows) as f64;
    println!(
        "layernorm fwd 8192x128 {:>22.3} ms {:>8.1} GB/s",
        t * 1e3,
        bytes / t / 1e9
    );
    let dy = data(rows * d, 4);
    let mut dx = vec![0.0f32; rows * d];
    let mut dgb = vec![0.0f32; 2 * d];
    let t = best(5, || {
        b.layernorm_backward(
            rows,
            d,
            Ref::whole(&x),
            Ref::whole(&gb),
            Ref::whole(&st),
            Ref::whole(&dy),
            Mut::whole(&mut dx),
            Mut::whole(&mut dgb),
        );
    });
    let bytes = 4.0 * (4 * rows * d + 2 * rows) as f64;
    println!(
        "layernorm bwd 8192x128 {:>22.3} ms {:>8.1} GB/s",
        t * 1e3,
        bytes / t / 1e9
    );

    // GELU forward + backward, 8192 × 512.
    let n = rows * 512;
    let h = data(n, 5);
    let mut g = vec![0.0f32; n];
    let t = best(5, || b.gelu(n, Ref::whole(&h), Mut::whole(&mut g)));
    println!(
        "gelu fwd 8192x512 {:>28.3} ms {:>8.1} GB/s",
        t * 1e3,
        8.0 * n as f64 / t / 1e9
    );
    let dg = data(n, 6);
    let t = best(5, || {
        b.gelu_backward(n, Ref::whole(&h), Ref::whole(&dg), Mut::whole(&mut g))
    });
    println!(
        "gelu bwd 8192x512 {:>28.3} ms {:>8.1} GB/s",
        t * 1e3,
        12.0 * n as f64 / t / 1e9
    );

    // Masked softmax, batch 256 × 4 heads × 128 × 128 (lengths 1..=128).
    let (batch, heads, l) = (256, 4, 128);
    let lens: Vec<u32> = (0..batch).map(|i| (1 + (i * 37) % l) as u32).collect();
    let ns = batch * heads * l * l;
    let s0 = data(ns, 7);
    let mut s = s0.clone();
    let t = best(3, || {
        s.copy_from_slice(&s0);
        b.masked_softmax(
            batch,
            heads,
            l,
            l,
            &lens,
            0,
            0.176_776_7,
            Mut::whole(&mut s),
        );
    });
    let bytes = 8.0 * ns as f64;
    println!(
        "masked_softmax fwd 256x4x128x128 {:>13.3} ms {:>8.1} GB/s (incl. a copy)",
        t * 1e3,
        (bytes + bytes) / t / 1e9
    );
    let dp = data(ns, 8);
    let mut ds = vec![0.0f32; ns];
    let t = best(3, || {
        b.masked_softmax_backward(
            batch,
            heads,
            l,
            l,
            &lens,
            0.176_776_7,
            Ref::whole(&s),
            Ref::whole(&dp),
            Mut::whole(&mut ds),
        );
    });
    println!(
        "masked_softmax bwd 256x4x128x128 {:>13.3} ms {:>8.1} GB/s",
        t * 1e3,
        12.0 * ns as f64 / t / 1e9
    );
}
