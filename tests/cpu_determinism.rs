//! The CPU backend gives bit-identical results whatever the number of threads: a sequence
//! touching every op (forward and backward, every reduction) runs inside rayon pools of 1
//! and 3 threads and the outputs are compared bit for bit.

use mgkd::backend::cpu::CpuBackend;
use mgkd::backend::{
    AdamW, Backend, EmbMode, EmbTable, FineGrads, FineShape, Float, Gemm, Mut, Ref,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn randv<F: Float>(rng: &mut ChaCha8Rng, n: usize) -> Vec<F> {
    (0..n)
        .map(|_| <F as Float>::from_f64(rng.gen_range(-1.0..1.0)))
        .collect()
}

/// Runs every op on sizes spanning many parallel chunks; returns every output and gradient.
fn op_sequence<F: Float>() -> Vec<Vec<F>> {
    let b = CpuBackend::<F>::new();
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let mut outs: Vec<Vec<F>> = Vec::new();
    let (batch, len, d, heads) = (24, 33, 64, 4);
    let rows = batch * len;
    let lens: Vec<u32> = (0..batch).map(|i| ((i * 7) % (len + 1)) as u32).collect();

    // Dense layer forward/backward: big enough for the parallel gemm path.
    let x = randv::<F>(&mut rng, rows * d);
    let w = randv::<F>(&mut rng, 4 * d * d);
    let bias = randv::<F>(&mut rng, 4 * d);
    let mut h = vec![F::nan(); rows * 4 * d];
    b.gemm(
        &Gemm::new(rows, 4 * d, d, false, true),
        F::one(),
        Ref::whole(&x),
        Ref::whole(&w),
        F::zero(),
        Mut::whole(&mut h),
    );
    b.add_bias(rows, 4 * d, Ref::whole(&bias), Mut::whole(&mut h));
    let mut g = vec![F::nan(); rows * 4 * d];
    b.gelu(rows * 4 * d, Ref::whole(&h), Mut::whole(&mut g));
    let dy = randv::<F>(&mut rng, rows * 4 * d);
    let mut dh = vec![F::nan(); rows * 4 * d];
    b.gelu_backward(
        rows * 4 * d,
        Ref::whole(&h),
        Ref::whole(&dy),
        Mut::whole(&mut dh),
    );
    let mut dw = vec![F::zero(); 4 * d * d + 4 * d];
    b.gemm(
        &Gemm::new(4 * d, d, rows, true, false),
        F::one(),
        Ref::whole(&dh),
        Ref::whole(&x),
        F::one(),
        Mut::whole(&mut dw),
    );
    b.bias_backward(rows, 4 * d, Ref::whole(&dh), Mut::at(&mut dw, 4 * d * d));
    let mut dx = vec![F::nan(); rows * d];
    b.gemm(
        &Gemm::new(rows, d, 4 * d, false, false),
        F::one(),
        Ref::whole(&dh),
        Ref::whole(&w),
        F::zero(),
        Mut::whole(&mut dx),
    );
    outs.extend([h, g, dh, dw, dx.clone()]);

    // LayerNorm.
    let gb = randv::<F>(&mut rng, 2 * d);
    let mut y = vec![F::nan(); rows * d];
    let mut st = vec![F::nan(); rows * 2];
    b.layernorm(
        rows,
        d,
        Ref::whole(&x),
        Ref::whole(&gb),
        Mut::whole(&mut y),
        Mut::whole(&mut st),
    );
    let mut dgb = vec![F::zero(); 2 * d];
    b.layernorm_backward(
        rows,
        d,
        Ref::whole(&x),
        Ref::whole(&gb),
        Ref::whole(&st),
        Ref::whole(&dx),
        Mut::whole(&mut dx.clone()),
        Mut::whole(&mut dgb),
    );
    let mut dx2 = dx.clone();
    b.layernorm_backward(
        rows,
        d,
        Ref::whole(&x),
        Ref::whole(&gb),
        Ref::whole(&st),
        Ref::whole(&y),
        Mut::whole(&mut dx2),
        Mut::whole(&mut dgb),
    );
    outs.extend([y, st, dgb, dx2]);

    // Embeddings (sum and concat) and positions.
    let vocabs = [5usize, 40, 3];
    let mut tables = Vec::new();
    let mut off = 0;
    for &v in &vocabs {
        tables.push(EmbTable {
            offset: off,
            vocab: v,
        });
        off += v * d;
    }
    let params = randv::<F>(&mut rng, off);
    let ids: Vec<u32> = (0..rows * 3)
        .map(|i| rng.gen_range(0..vocabs[i % 3]) as u32)
        .collect();
    let mut e = vec![F::nan(); rows * d];
    b.embedding(
        rows,
        d,
        &tables,
        &ids,
        &params,
        EmbMode::Sum,
        Mut::whole(&mut e),
        d,
    );
    let mut ec = vec![F::nan(); rows * 3 * d];
    b.embedding(
        rows,
        d,
        &tables,
        &ids,
        &params,
        EmbMode::Concat,
        Mut::whole(&mut ec),
        3 * d,
    );
    let mut gp = vec![F::zero(); off];
    b.embedding_backward(
        rows,
        d,
        &tables,
        &ids,
        EmbMode::Sum,
        Ref::whole(&dx),
        d,
        &mut gp,
        None,
    );
    let dxc = randv::<F>(&mut rng, rows * 3 * d);
    b.embedding_backward(
        rows,
        d,
        &tables,
        &ids,
        EmbMode::Concat,
        Ref::whole(&dxc),
        3 * d,
        &mut gp,
        None,
    );
    let pos = randv::<F>(&mut rng, len * d);
    b.add_positions(batch, len, d, &lens, Ref::whole(&pos), Mut::whole(&mut e));
    let mut dpos = vec![F::zero(); len * d];
    b.add_positions_backward(batch, len, d, &lens, Ref::whole(&dx), Mut::whole(&mut dpos));
    outs.extend([e, ec, gp, dpos]);

    // Attention probabilities and pooling.
    let n_s = batch * heads * len * len;
    let mut p = randv::<F>(&mut rng, n_s);
    let scale = <F as Float>::from_f64(0.25);
    b.masked_softmax(batch, heads, len, len, &lens, 0, scale, Mut::whole(&mut p));
    let dp = randv::<F>(&mut rng, n_s);
    let mut ds = vec![F::nan(); n_s];
    b.masked_softmax_backward(
        batch,
        heads,
        len,
        len,
        &lens,
        scale,
        Ref::whole(&p),
        Ref::whole(&dp),
        Mut::whole(&mut ds),
    );
    let empty = randv::<F>(&mut rng, d);
    let mut pooled = vec![F::nan(); batch * d];
    b.masked_mean(
        batch,
        len,
        d,
        &lens,
        Ref::whole(&x),
        Ref::whole(&empty),
        Mut::whole(&mut pooled),
    );
    let mut dxm = vec![F::nan(); rows * d];
    let mut dempty = vec![F::zero(); d];
    b.masked_mean_backward(
        batch,
        len,
        d,
        &lens,
        Ref::whole(&pooled),
        Mut::whole(&mut dxm),
        Mut::whole(&mut dempty),
    );
    outs.extend([p, ds, pooled, dxm, dempty]);

    // Losses over long vectors (many chunks).
    let n = 70_000;
    let z = randv::<F>(&mut rng, n);
    let t = randv::<F>(&mut rng, n);
    let labels: Vec<F> = (0..n)
        .map(|i| <F as Float>::from_f64((i % 3 == 0) as u8 as f64))
        .collect();
    let wts: Vec<F> = (0..n)
        .map(|i| <F as Float>::from_f64(0.5 + (i % 5) as f64 * 0.25))
        .collect();
    let coef = <F as Float>::from_f64(0.7);
    let mut dz = vec![F::zero(); n];
    let l1 = b
        .bce_loss(
            n,
            Ref::whole(&z),
            Ref::whole(&labels),
            Ref::whole(&wts),
            coef,
            Some(Mut::whole(&mut dz)),
        )
        .unwrap();
    let tau = <F as Float>::from_f64(2.0);
    let l2 = b
        .bernoulli_kl_loss(
            n,
            Ref::whole(&z),
            Ref::whole(&t),
            Some(Ref::whole(&wts)),
            tau,
            coef,
            Some(Mut::whole(&mut dz)),
        )
        .unwrap();
    let nr = n / d;
    let l3 = b
        .coarse_loss(
            nr,
            d,
            Ref::whole(&z),
            Ref::whole(&t),
            Ref::whole(&wts),
            false,
            coef,
            Some(Mut::whole(&mut dz)),
        )
        .unwrap();
    let l4 = b
        .coarse_loss(
            nr,
            d,
            Ref::whole(&t),
            Ref::whole(&z),
            Ref::whole(&wts),
            true,
            coef,
            Some(Mut::whole(&mut dz)),
        )
        .unwrap();
    let shape = FineShape {
        batch,
        lq: len,
        lk: len,
        d,
    };
    let (mut dq, mut dv) = (vec![F::zero(); rows * d], vec![F::zero(); rows * d]);
    let qlens: Vec<u32> = lens.iter().map(|&l| l.max(1)).collect();
    let l5 = b
        .fine_loss(
            shape,
            Ref::whole(&e_like(&x)),
            Ref::whole(&dx),
            Ref::whole(&y_like(&x)),
            &qlens,
            &lens,
            Ref::whole(&wts),
            coef,
            Some(FineGrads {
                dq: Mut::whole(&mut dq),
                dv: Mut::whole(&mut dv),
            }),
        )
        .unwrap();
    let l6 = b.sum_squares(n, Ref::whole(&dz)).unwrap();
    let grad = dz.clone();
    outs.extend([dz, dq, dv, vec![l1, l2, l3, l4, l5, l6]]);

    // Optimizer.
    let mut prm = randv::<F>(&mut rng, n);
    let mut m = vec![F::zero(); n];
    let mut v = vec![F::zero(); n];
    let mask: Vec<F> = (0..n)
        .map(|i| <F as Float>::from_f64((i % 2) as f64))
        .collect();
    let hp = AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 1,
        grad_scale: 0.9,
    };
    b.adamw(&hp, &mut prm, &grad, &mut m, &mut v, &mask);
    outs.extend([prm, m, v]);
    outs
}

/// A second tensor derived from `x` (reversed), standing in for queries.
fn e_like<F: Float>(x: &[F]) -> Vec<F> {
    x.iter().rev().copied().collect()
}

/// A third tensor derived from `x` (scaled), standing in for teacher tokens.
fn y_like<F: Float>(x: &[F]) -> Vec<F> {
    x.iter().map(|&v| v * <F as Float>::from_f64(0.5)).collect()
}

fn in_pool<F: Float>(threads: usize) -> Vec<Vec<F>> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(op_sequence::<F>)
}

fn assert_same_bits<F: Float>(a: &[Vec<F>], b: &[Vec<F>]) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.len(), y.len(), "output {i}: length");
        let xb: &[u8] = bytemuck::cast_slice(x);
        let yb: &[u8] = bytemuck::cast_slice(y);
        assert!(xb == yb, "output {i} differs between thread counts");
        assert!(
            x.iter().all(|v| v.is_finite()),
            "output {i} has a non-finite value"
        );
    }
}

#[test]
fn bit_identical_across_thread_counts_f32() {
    let one = in_pool::<f32>(1);
    let three = in_pool::<f32>(3);
    assert_same_bits(&one, &three);
}

#[test]
fn bit_identical_across_thread_counts_f64() {
    let one = in_pool::<f64>(1);
    let three = in_pool::<f64>(3);
    assert_same_bits(&one, &three);
}

/// GELU in place gives [`Backend::gelu`]'s bits on every CPU backend (the training forward
/// and the inference pass run it in place; the backward recomputes with the out-of-place
/// op and must see the same values).
#[test]
fn gelu_in_place_gives_gelus_bits() {
    fn check<B: Backend>(be: &B) {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let n = 100_003;
        let host: Vec<B::F> = (0..n)
            .map(|_| <B::F as Float>::from_f64(rng.gen_range(-6.0..6.0)))
            .collect();
        let x = be.upload(&host).expect("upload");
        let mut y = be
            .upload(&vec![<B::F as Float>::from_f64(f64::NAN); n])
            .expect("upload");
        be.gelu(n, Ref::whole(&x), Mut::whole(&mut y));
        let mut xy = be.upload(&host).expect("upload");
        be.gelu_in_place(n, Mut::whole(&mut xy));
        let bits = |b: &B::Buf| -> Vec<u64> {
            let v = be.download(b).expect("download");
            v.iter().map(|x| Float::to_f64(*x).to_bits()).collect()
        };
        let (want, got) = (bits(&y), bits(&xy));
        assert!(want.iter().all(|b| !f64::from_bits(*b).is_nan()));
        assert!(
            got == want,
            "{}: gelu_in_place differs from gelu",
            be.name()
        );
    }
    check(&CpuBackend::<f32>::new());
    check(&CpuBackend::<f64>::new());
    check(&mgkd::backend::cpu_bf16::CpuBf16Backend::new());
}
