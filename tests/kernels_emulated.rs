//! The bf16 instances of the kernels, run on the CPU through the kernel lab
//! (`tests/kernel_emu`: their own source compiled by g++ against an emulation of the CUDA
//! execution model), launched as `src/backend/cuda/mod.rs` launches them, against the
//! scheme's CPU reference ([`CpuBf16Backend`]) on the same bf16 inputs. Both compute in f32
//! and round the same stores; the emulated kernels sum in the device's order (warp shuffles,
//! column chunks), so a stored value may differ by one bf16 ulp where its f32 value lies
//! within f32 noise of a rounding boundary: each output within 4e-3 (u = 2⁻⁸) in norm, and
//! the share of bit-identical elements printed. What runs on a GPU is checked there
//! (`tests/cuda_bf16_ops.rs`); this checks the kernels' logic before a GPU is available.

mod kernel_emu;
mod skip;

use cudarc::driver::LaunchConfig;
use kernel_emu::{emulable, Arg, Data, Emulator, Launch};
use mgkd::backend::cpu_bf16::CpuBf16Backend;
use mgkd::backend::cuda::embedding::{EmbBackwardPlan, EmbFields};
use mgkd::backend::cuda::{
    chunk_grid, col_chunks, fine_cfg, grid1, reduce_cfg, row_chunks, rows_cfg, ROW_CHUNK_ROWS,
};
use mgkd::backend::{Backend, EmbMode, EmbTable, FineGrads, FineShape, Float, Mut, Ref};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Bound on each output's distance from the reference, in norm (module documentation).
const REL: f64 = 4e-3;

/// Pass 2 of a column sum (`col_finish_f32` in copy.cu): `out0 + Σ_c partial[c·n + j]`, as
/// the backend finishes every two-pass sum.
fn finish_columns(
    copy: &Emulator,
    partial: &Data,
    out0: Vec<f32>,
    n: usize,
    chunks: usize,
) -> Data {
    let mut bufs = vec![partial.clone(), Data::F32(out0)];
    copy.run(
        &mut bufs,
        &[launch(
            "col_finish_f32",
            chunk_grid(n, 1),
            vec![int(n), int(chunks), Arg::Buf(0), Arg::Buf(1)],
        )],
    );
    bufs.pop().expect("the output")
}

/// A launch of `kernel` with the backend's configuration `cfg` (grid x and y, block x, shared
/// memory).
fn launch(kernel: &'static str, cfg: LaunchConfig, args: Vec<Arg>) -> Launch {
    Launch {
        kernel,
        grid: (cfg.grid_dim.0, cfg.grid_dim.1),
        block: cfg.block_dim.0,
        smem: cfg.shared_mem_bytes,
        args,
    }
}

fn int(x: usize) -> Arg {
    Arg::Int(x as i64)
}

/// `n` values uniform in (−scale, scale), rounded to bf16 (the inputs every side sees).
fn bf16_values(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| half::bf16::from_f32(scale * r.gen_range(-1.0f32..1.0)).to_f32())
        .collect()
}

fn f32_values(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| scale * r.gen_range(-1.0f32..1.0)).collect()
}

/// A bf16 buffer of the reference holding `v` (exact: already bf16 values).
fn act(be: &CpuBf16Backend, v: &[f32]) -> <CpuBf16Backend as Backend>::Buf {
    let mut b = be.scratch(v.len()).expect("scratch");
    be.write(v, Mut::whole(&mut b)).expect("write");
    b
}

/// An f32 buffer of the reference holding `v`.
fn full(be: &CpuBf16Backend, v: &[f32]) -> <CpuBf16Backend as Backend>::Buf {
    let mut b = be.scratch_full(v.len()).expect("scratch");
    be.write(v, Mut::whole(&mut b)).expect("write");
    b
}

fn down(be: &CpuBf16Backend, b: &<CpuBf16Backend as Backend>::Buf) -> Vec<f64> {
    be.download(b)
        .expect("download")
        .iter()
        .map(|&x| x as f64)
        .collect()
}

/// Checks an emulated output against the reference's, within [`REL`].
fn check(label: &str, got: &Data, want: &[f64]) {
    check_within(label, got, want, REL)
}

/// Checks an emulated output against the reference's: every element written (finite), and
/// the relative distance in norm at most `rel`.
fn check_within(label: &str, got: &Data, want: &[f64], rel: f64) {
    let got = got.to_f64();
    assert_eq!(got.len(), want.len(), "{label}: length");
    if let Some(i) = got.iter().position(|x| !x.is_finite()) {
        panic!(
            "{label}: element {i} = {} (not written?), reference {}",
            got[i], want[i]
        );
    }
    let (mut num, mut den, mut same) = (0.0f64, 0.0f64, 0usize);
    for (g, w) in got.iter().zip(want) {
        num += (g - w) * (g - w);
        den += w * w;
        same += (g.to_bits() == w.to_bits()) as usize;
    }
    assert!(
        den > 0.0,
        "{label}: the reference is all zeros (a case that checks nothing)"
    );
    let e = (num / den).sqrt();
    println!(
        "{label}: {e:.2e} from the reference, {same} of {} elements bit-identical",
        want.len()
    );
    assert!(e <= rel, "{label}: {e:e} from the reference");
}

/// LayerNorm of the f32 stream with bf16 γ|β into bf16 (f32 statistics), and its backward from
/// bf16 dy accumulated into the f32 stream gradient and dγ|dβ (two-pass column sums).
#[test]
fn layernorm_bf16() {
    let Some(emu) = Emulator::of("layernorm.cu") else {
        return;
    };
    let copy = Emulator::of("copy.cu").expect("the emulator of copy.cu");
    for (rows, d) in [(37, 40), (300, 128)] {
        let mut r = ChaCha8Rng::seed_from_u64(rows as u64);
        let x = f32_values(&mut r, rows * d, 2.0);
        let mut gb = bf16_values(&mut r, 2 * d, 0.5);
        for v in &mut gb[..d] {
            *v = half::bf16::from_f32(1.0 + *v).to_f32();
        }
        let dy = bf16_values(&mut r, rows * d, 1.0);
        let dx0 = f32_values(&mut r, rows * d, 1.0);
        let dgb0 = f32_values(&mut r, 2 * d, 1.0);

        let be = CpuBf16Backend::new();
        let (xb, gbb) = (full(&be, &x), act(&be, &gb));
        let mut y = be.scratch(rows * d).expect("y");
        let mut stats = be.scratch_full(2 * rows).expect("stats");
        be.layernorm(
            rows,
            d,
            Ref::whole(&xb),
            Ref::whole(&gbb),
            Mut::whole(&mut y),
            Mut::whole(&mut stats),
        );
        let (mut dx, mut dgb) = (full(&be, &dx0), full(&be, &dgb0));
        be.layernorm_backward(
            rows,
            d,
            Ref::whole(&xb),
            Ref::whole(&gbb),
            Ref::whole(&stats),
            Ref::whole(&act(&be, &dy)),
            Mut::whole(&mut dx),
            Mut::whole(&mut dgb),
        );

        // 0 x, 1 γβ, 2 y, 3 stats, 4 dy, 5 dx, 6 partial.
        let (per, chunks) = col_chunks(rows);
        let mut bufs = vec![
            Data::F32(x),
            Data::bf16(&gb),
            Data::bf16_nan(rows * d),
            Data::f32_nan(2 * rows),
            Data::bf16(&dy),
            Data::F32(dx0),
            Data::f32_nan(chunks * 2 * d),
        ];
        emu.run(
            &mut bufs,
            &[
                launch(
                    "layernorm_bf16",
                    rows_cfg(rows),
                    vec![
                        int(rows),
                        int(d),
                        Arg::Buf(0),
                        Arg::Buf(1),
                        Arg::Buf(2),
                        Arg::Buf(3),
                    ],
                ),
                launch(
                    "layernorm_backward_dx_bf16",
                    rows_cfg(rows),
                    vec![
                        int(rows),
                        int(d),
                        Arg::Buf(0),
                        Arg::Buf(1),
                        Arg::Buf(3),
                        Arg::Buf(4),
                        Arg::Buf(5),
                    ],
                ),
                launch(
                    "layernorm_param_partial_bf16",
                    chunk_grid(d, chunks),
                    vec![
                        int(rows),
                        int(d),
                        int(per),
                        Arg::Buf(0),
                        Arg::Buf(3),
                        Arg::Buf(4),
                        Arg::Buf(6),
                    ],
                ),
            ],
        );
        let fin = finish_columns(&copy, &bufs[6], dgb0, 2 * d, chunks);
        let label = format!("layernorm {rows}×{d}");
        check(&format!("{label}: y"), &bufs[2], &down(&be, &y));
        check(&format!("{label}: stats"), &bufs[3], &down(&be, &stats));
        check(&format!("{label}: dx"), &bufs[5], &down(&be, &dx));
        check(&format!("{label}: dγ|dβ"), &fin, &down(&be, &dgb));
    }
}

/// GELU on bf16 and its backward fused with the first pass of the bias gradient, then the
/// second pass (the bias gradient f32, accumulated).
#[test]
fn gelu_bf16() {
    let Some(emu) = Emulator::of("gelu.cu") else {
        return;
    };
    let copy = Emulator::of("copy.cu").expect("the emulator of copy.cu");
    // Rows fewer than a thread's group of 8, and chunks of rows that end inside one.
    for (rows, n) in [(3, 7), (300, 96), (1001, 5)] {
        let mut r = ChaCha8Rng::seed_from_u64(n as u64);
        let x = bf16_values(&mut r, rows * n, 3.0);
        let dy = bf16_values(&mut r, rows * n, 1.0);
        let db0 = f32_values(&mut r, n, 1.0);
        let be = CpuBf16Backend::new();
        let xb = act(&be, &x);
        let mut y = be.scratch(rows * n).expect("y");
        be.gelu(rows * n, Ref::whole(&xb), Mut::whole(&mut y));
        let mut dx = act(&be, &dy);
        let mut db = full(&be, &db0);
        be.gelu_bias_backward(
            rows,
            n,
            Ref::whole(&xb),
            Mut::whole(&mut dx),
            Mut::whole(&mut db),
        );

        let (per, chunks) = col_chunks(rows);
        // 0 x, 1 y, 2 dy then dx (in place), 3 partial.
        let mut bufs = vec![
            Data::bf16(&x),
            Data::bf16_nan(rows * n),
            Data::bf16(&dy),
            Data::f32_nan(chunks * n),
        ];
        emu.run(
            &mut bufs,
            &[
                launch(
                    "gelu_bf16",
                    grid1(rows * n),
                    vec![Arg::Int((rows * n) as i64), Arg::Buf(0), Arg::Buf(1)],
                ),
                launch(
                    "gelu_backward_bias_partial_bf16",
                    chunk_grid(n, chunks),
                    vec![
                        int(rows),
                        int(n),
                        int(per),
                        Arg::Buf(0),
                        Arg::Buf(2),
                        Arg::Buf(3),
                    ],
                ),
            ],
        );
        let fin = finish_columns(&copy, &bufs[3], db0, n, chunks);
        let label = format!("gelu {rows}×{n}");
        check(&format!("{label}: y"), &bufs[1], &down(&be, &y));
        check(&format!("{label}: dx"), &bufs[2], &down(&be, &dx));
        check(&format!("{label}: db"), &fin, &down(&be, &db));
    }
}

/// The composed attention's masked softmax on bf16 scores, in place, and its backward.
#[test]
fn masked_softmax_bf16() {
    let Some(emu) = Emulator::of("softmax.cu") else {
        return;
    };
    for (batch, heads, l) in [(3, 2, 5), (4, 4, 33)] {
        let mut r = ChaCha8Rng::seed_from_u64(l as u64);
        let rows = batch * heads * l;
        let mut lens: Vec<u32> = (0..batch).map(|_| r.gen_range(0..=l as u32)).collect();
        lens[0] = l as u32;
        lens[1] = 0;
        let s = bf16_values(&mut r, rows * l, 8.0);
        let dp = bf16_values(&mut r, rows * l, 1.0);
        let scale = 0.25f32;
        let be = CpuBf16Backend::new();
        let ids = be.upload_ids(&lens).expect("lens");
        let mut p = act(&be, &s);
        be.masked_softmax(batch, heads, l, l, &ids, 0, scale, Mut::whole(&mut p));
        let mut ds = be.scratch(rows * l).expect("ds");
        be.masked_softmax_backward(
            batch,
            heads,
            l,
            l,
            &ids,
            scale,
            Ref::whole(&p),
            Ref::whole(&act(&be, &dp)),
            Mut::whole(&mut ds),
        );

        // 0 lens, 1 scores → p, 2 dp, 3 ds, 4 err.
        let mut bufs = vec![
            Data::U32(lens),
            Data::bf16(&s),
            Data::bf16(&dp),
            Data::bf16_nan(rows * l),
            Data::U32(vec![0]),
        ];
        let head = vec![
            int(rows),
            int(heads * l),
            int(l),
            Arg::Buf(0),
            Arg::F32(scale),
        ];
        emu.run(
            &mut bufs,
            &[
                launch(
                    "masked_softmax_bf16",
                    rows_cfg(rows),
                    [head.clone(), vec![Arg::Buf(1), Arg::Buf(4)]].concat(),
                ),
                launch(
                    "masked_softmax_backward_bf16",
                    rows_cfg(rows),
                    [
                        head,
                        vec![Arg::Buf(1), Arg::Buf(2), Arg::Buf(3), Arg::Buf(4)],
                    ]
                    .concat(),
                ),
            ],
        );
        assert_eq!(bufs[4], Data::U32(vec![0]), "error flag");
        let label = format!("masked softmax b={batch} h={heads} l={l}");
        check(&format!("{label}: p"), &bufs[1], &down(&be, &p));
        check(&format!("{label}: ds"), &bufs[3], &down(&be, &ds));
    }
}

/// One fine-loss case: lengths (row 0 full, row 1 without keys, row 2 without queries, the
/// others random), queries (already in the teacher tokens' space), values, teacher tokens, row
/// weights and the gradients' initial contents, every activation passed through `round` (bf16
/// rounding, or none).
struct FineCase {
    shape: FineShape,
    ql: Vec<u32>,
    kl: Vec<u32>,
    q: Vec<f32>,
    v: Vec<f32>,
    t: Vec<f32>,
    w: Vec<f32>,
    dq0: Vec<f32>,
    dv0: Vec<f32>,
}

fn fine_case(batch: usize, lq: usize, lk: usize, d: usize, round: fn(f32) -> f32) -> FineCase {
    let mut r = ChaCha8Rng::seed_from_u64(lq as u64);
    let mut ql: Vec<u32> = (0..batch).map(|_| r.gen_range(0..=lq as u32)).collect();
    let mut kl: Vec<u32> = (0..batch).map(|_| r.gen_range(0..=lk as u32)).collect();
    ql[0] = lq as u32;
    kl[0] = lk as u32;
    kl[1] = 0;
    ql[2] = 0;
    let (nq, nk) = (batch * lq * d, batch * lk * d);
    let mut values = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| round(scale * r.gen_range(-1.0f32..1.0)))
            .collect()
    };
    let (q, v, t) = (values(nq, 2.0), values(nq, 1.0), values(nk, 1.0));
    let (dq0, dv0) = (values(nq, 1e-4), values(nq, 1e-4));
    let w: Vec<f32> = (0..batch).map(|_| r.gen_range(0.2f32..2.0)).collect();
    FineCase {
        shape: FineShape { batch, lq, lk, d },
        ql,
        kl,
        q,
        v,
        t,
        w,
        dq0,
        dv0,
    }
}

/// Coefficient of the fine loss in these cases.
const FINE_COEF: f32 = 0.9;

/// The fine kernel `kernel` on `c` (activations as `data` makes them), launched as the backend
/// launches it, then the loss terms' reduction: (value, dq, dv).
fn fine_emulated(
    emu: &Emulator,
    c: &FineCase,
    kernel: &'static str,
    data: fn(&[f32]) -> Data,
) -> [Data; 3] {
    let FineShape { batch, lq, lk, d } = c.shape;
    let (cfg, tile) = fine_cfg(batch, lq, lk, d).expect("a shape the fine kernel takes");
    // 0 q, 1 v, 2 t, 3 q_lens, 4 k_lens, 5 w, 6 dq, 7 dv, 8 terms, 9 err, 10 out.
    let mut bufs = vec![
        data(&c.q),
        data(&c.v),
        data(&c.t),
        Data::U32(c.ql.clone()),
        Data::U32(c.kl.clone()),
        Data::F32(c.w.clone()),
        data(&c.dq0),
        data(&c.dv0),
        Data::F64(vec![f64::NAN; batch]),
        Data::U32(vec![0]),
        Data::f32_nan(1),
    ];
    let mut args: Vec<Arg> = [batch, lq, lk, d, tile].into_iter().map(int).collect();
    args.extend((0..6).map(Arg::Buf));
    args.push(Arg::F32(FINE_COEF));
    args.extend([6, 7, 8, 9].map(Arg::Buf));
    emu.run(
        &mut bufs,
        &[
            launch(kernel, cfg, args),
            launch(
                "reduce_terms",
                reduce_cfg(),
                vec![
                    int(batch),
                    Arg::Buf(8),
                    Arg::F64(1.0),
                    Arg::Buf(4),
                    int(batch),
                    Arg::Buf(10),
                ],
            ),
        ],
    );
    assert_eq!(bufs[9], Data::U32(vec![0]), "error flag");
    let out = bufs.swap_remove(10);
    let dv = bufs.swap_remove(7);
    let dq = bufs.swap_remove(6);
    [out, dq, dv]
}

/// The reference's (value, dq, dv) on `c`.
fn fine_reference<B: Backend>(
    be: &B,
    c: &FineCase,
    up: impl Fn(&B, &[f32]) -> B::Buf,
    full: impl Fn(&B, &[f32]) -> B::Buf,
) -> (f64, [Vec<f64>; 2]) {
    let (qb, vb, tb) = (up(be, &c.q), up(be, &c.v), up(be, &c.t));
    let (mut dq, mut dv) = (up(be, &c.dq0), up(be, &c.dv0));
    let (qli, kli) = (
        be.upload_ids(&c.ql).expect("ql"),
        be.upload_ids(&c.kl).expect("kl"),
    );
    let value = be
        .fine_loss(
            c.shape,
            Ref::whole(&qb),
            Ref::whole(&vb),
            Ref::whole(&tb),
            &qli,
            &kli,
            Ref::whole(&full(be, &c.w)),
            <B::F as Float>::from_f64(FINE_COEF as f64),
            Some(FineGrads {
                dq: Mut::whole(&mut dq),
                dv: Mut::whole(&mut dv),
            }),
        )
        .expect("fine");
    let down = |b: &B::Buf| -> Vec<f64> {
        be.download(b)
            .expect("download")
            .iter()
            .map(|&x| Float::to_f64(x))
            .collect()
    };
    (Float::to_f64(value), [down(&dq), down(&dv)])
}

/// The fine alignment loss on bf16 tokens (gradients accumulated into bf16 windows) and its
/// value, through the loss terms' reduction, at a small shape and at the §8 teacher lengths.
#[test]
fn fine_loss_bf16() {
    let Some(emu) = Emulator::of("losses.cu") else {
        return;
    };
    let bf16 = |x: f32| half::bf16::from_f32(x).to_f32();
    for (batch, lq, lk, d) in [(3, 5, 9, 8), (4, 80, 128, 128)] {
        let c = fine_case(batch, lq, lk, d, bf16);
        let be = CpuBf16Backend::new();
        let (value, [dq, dv]) = fine_reference(&be, &c, act, full);
        let got = fine_emulated(&emu, &c, "fine_bf16", Data::bf16);
        let tile = fine_cfg(batch, lq, lk, d).expect("shape").1;
        let label = format!("fine b={batch} lq={lq} lk={lk} d={d} (tile {tile})");
        check(&format!("{label}: value"), &got[0], &[value]);
        check(&format!("{label}: dq"), &got[1], &dq);
        check(&format!("{label}: dv"), &got[2], &dv);
    }
}

/// The f32 instance of the fine kernel against the f32 CPU backend, within 1e-5 in norm (the
/// bound the GPU parity test holds it to; only the order of the sums differs), at the §8
/// student and teacher lengths (one tile of query tokens), past one tile (several tiles of 48
/// queries), and with keys so long that the block has 2 warps and then 1 warp with a tile of
/// 4 queries. The digest of every output's bits is printed, so that a rewritten kernel can be
/// compared bit for bit with the version before it.
#[test]
fn fine_loss_f32() {
    let Some(emu) = Emulator::of("losses.cu") else {
        return;
    };
    let shapes = [
        (3, 5, 9, 8),
        (4, 32, 128, 128),
        (4, 80, 128, 128),
        (3, 100, 700, 64),
        (3, 9, 1000, 128),
        (3, 5, 3003, 64),
    ];
    for (batch, lq, lk, d) in shapes {
        let c = fine_case(batch, lq, lk, d, |x| x);
        let be = mgkd::backend::cpu::CpuBackend::<f32>::new();
        let upload =
            |be: &mgkd::backend::cpu::CpuBackend<f32>, v: &[f32]| be.upload(v).expect("upload");
        let (value, [dq, dv]) = fine_reference(&be, &c, upload, upload);
        let got = fine_emulated(&emu, &c, "fine_f32", |v| Data::F32(v.to_vec()));
        let (cfg, tile) = fine_cfg(batch, lq, lk, d).expect("shape");
        let warps = cfg.block_dim.0 / 32;
        let label =
            format!("fine f32 b={batch} lq={lq} lk={lk} d={d} ({warps} warps, tile {tile})");
        let mut digest = 0xcbf2_9ce4_8422_2325u64;
        for (what, out, want) in [
            ("value", &got[0], &[value][..]),
            ("dq", &got[1], &dq[..]),
            ("dv", &got[2], &dv[..]),
        ] {
            check_within(&format!("{label}: {what}"), out, want, 1e-5);
            for x in out.to_f64() {
                digest = (digest ^ x.to_bits()).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        println!("{label}: bits digest {digest:016x}");
    }
}

/// The masked mean over bf16 sequences (the learned empty vector for rows without tokens), its
/// backward (bf16 dx; the empty vector's f32 gradient in two passes over chunks of rows), and
/// the empty-row substitution of the fine loss.
#[test]
fn pooling_bf16() {
    let Some(emu) = Emulator::of("pooling.cu") else {
        return;
    };
    let copy = Emulator::of("copy.cu").expect("the emulator of copy.cu");
    for (batch, l, d) in [(3, 4, 8), (70, 32, 128)] {
        let mut r = ChaCha8Rng::seed_from_u64(batch as u64);
        let mut lens: Vec<u32> = (0..batch).map(|_| r.gen_range(0..=l as u32)).collect();
        lens[0] = l as u32;
        lens[1] = 0;
        let x = bf16_values(&mut r, batch * l * d, 1.0);
        let empty = bf16_values(&mut r, d, 1.0);
        let dout = bf16_values(&mut r, batch * d, 1.0);
        let dempty0 = f32_values(&mut r, d, 1.0);
        let vec_ = bf16_values(&mut r, batch * d, 1.0);
        let seq0 = bf16_values(&mut r, batch * l * d, 1.0);
        let be = CpuBf16Backend::new();
        let ids = be.upload_ids(&lens).expect("lens");
        let mut out = be.scratch(batch * d).expect("out");
        be.masked_mean(
            batch,
            l,
            d,
            &ids,
            Ref::whole(&act(&be, &x)),
            Ref::whole(&act(&be, &empty)),
            Mut::whole(&mut out),
        );
        let mut dx = be.scratch(batch * l * d).expect("dx");
        let mut dempty = full(&be, &dempty0);
        be.masked_mean_backward(
            batch,
            l,
            d,
            &ids,
            Ref::whole(&act(&be, &dout)),
            Mut::whole(&mut dx),
            Mut::whole(&mut dempty),
        );
        let mut seq = act(&be, &seq0);
        be.put_empty_rows(
            batch,
            l,
            d,
            &ids,
            Ref::whole(&act(&be, &vec_)),
            Mut::whole(&mut seq),
        );

        let (per, chunks) = row_chunks(batch, ROW_CHUNK_ROWS);
        // 0 lens, 1 x, 2 empty, 3 out, 4 err, 5 dout, 6 dx, 7 partial, 8 vec, 9 seq.
        let mut bufs = vec![
            Data::U32(lens),
            Data::bf16(&x),
            Data::bf16(&empty),
            Data::bf16_nan(batch * d),
            Data::U32(vec![0]),
            Data::bf16(&dout),
            Data::bf16_nan(batch * l * d),
            Data::f32_nan(chunks * d),
            Data::bf16(&vec_),
            Data::bf16(&seq0),
        ];
        let shape = vec![int(batch), int(l), int(d), Arg::Buf(0)];
        emu.run(
            &mut bufs,
            &[
                launch(
                    "masked_mean_bf16",
                    grid1(batch * d),
                    [
                        shape.clone(),
                        vec![Arg::Buf(1), Arg::Buf(2), Arg::Buf(3), Arg::Buf(4)],
                    ]
                    .concat(),
                ),
                launch(
                    "masked_mean_backward_bf16",
                    grid1(batch * l * d),
                    [shape.clone(), vec![Arg::Buf(5), Arg::Buf(6), Arg::Buf(4)]].concat(),
                ),
                launch(
                    "masked_mean_dempty_partial_bf16",
                    chunk_grid(d, chunks),
                    vec![
                        int(batch),
                        int(d),
                        int(per),
                        Arg::Buf(0),
                        Arg::Buf(5),
                        Arg::Buf(7),
                    ],
                ),
                launch(
                    "put_empty_rows_bf16",
                    grid1(batch * d),
                    [shape, vec![Arg::Buf(8), Arg::Buf(9)]].concat(),
                ),
            ],
        );
        assert_eq!(bufs[4], Data::U32(vec![0]), "error flag");
        let fin = finish_columns(&copy, &bufs[7], dempty0, d, chunks);
        let label = format!("pooling b={batch} l={l} d={d}");
        check(&format!("{label}: mean"), &bufs[3], &down(&be, &out));
        check(&format!("{label}: dx"), &bufs[6], &down(&be, &dx));
        check(&format!("{label}: dempty"), &fin, &down(&be, &dempty));
        check(&format!("{label}: seq"), &bufs[9], &down(&be, &seq));
    }
}

/// The coarse loss (MSE and cosine) on bf16 representations, gradient accumulated into a bf16
/// window, and its value through the terms' reduction.
#[test]
fn coarse_loss_bf16() {
    let Some(emu) = Emulator::of("losses.cu") else {
        return;
    };
    for (n, d) in [(3, 8), (200, 128)] {
        for cosine in [false, true] {
            let mut r = ChaCha8Rng::seed_from_u64(n as u64);
            let p = bf16_values(&mut r, n * d, 1.0);
            let t = bf16_values(&mut r, n * d, 1.0);
            let w: Vec<f32> = (0..n).map(|_| r.gen_range(0.2f32..2.0)).collect();
            let dp0 = bf16_values(&mut r, n * d, 1e-3);
            let coef = 0.7f32;
            let be = CpuBf16Backend::new();
            let mut dp = act(&be, &dp0);
            let value = be
                .coarse_loss(
                    n,
                    d,
                    Ref::whole(&act(&be, &p)),
                    Ref::whole(&act(&be, &t)),
                    Ref::whole(&full(&be, &w)),
                    cosine,
                    coef,
                    Some(Mut::whole(&mut dp)),
                )
                .expect("coarse");
            // 0 p, 1 t, 2 w, 3 dp, 4 terms, 5 out.
            let mut bufs = vec![
                Data::bf16(&p),
                Data::bf16(&t),
                Data::F32(w),
                Data::bf16(&dp0),
                Data::F64(vec![f64::NAN; n]),
                Data::f32_nan(1),
            ];
            emu.run(
                &mut bufs,
                &[
                    launch(
                        "coarse_bf16",
                        rows_cfg(n),
                        vec![
                            int(n),
                            int(d),
                            Arg::Buf(0),
                            Arg::Buf(1),
                            Arg::Buf(2),
                            Arg::Int(cosine as i64),
                            Arg::F32(coef * (1.0 / n as f32)),
                            Arg::Buf(3),
                            Arg::Buf(4),
                        ],
                    ),
                    launch(
                        "reduce_terms",
                        reduce_cfg(),
                        vec![
                            int(n),
                            Arg::Buf(4),
                            Arg::F64(1.0 / n as f64),
                            Arg::Null,
                            int(0),
                            Arg::Buf(5),
                        ],
                    ),
                ],
            );
            let label = format!("coarse n={n} d={d} cosine={cosine}");
            check(&format!("{label}: value"), &bufs[5], &[value as f64]);
            check(&format!("{label}: dpred"), &bufs[3], &down(&be, &dp));
        }
    }
}

/// Conversions and copies of the bf16 scheme: f32 → bf16 (rounding), bf16 → f32, a bf16 bias
/// added to bf16 and to f32 rows, a 2-D copy (and accumulation) of bf16 windows.
#[test]
fn conversions_and_copies_bf16() {
    let (Some(copy), Some(gelu)) = (Emulator::of("copy.cu"), Emulator::of("gelu.cu")) else {
        return;
    };
    let mut r = ChaCha8Rng::seed_from_u64(11);
    let (rows, n) = (37, 24);
    let x = f32_values(&mut r, rows * n, 3.0);
    let b = bf16_values(&mut r, n, 1.0);
    let ya = bf16_values(&mut r, rows * n, 1.0);
    let yf = f32_values(&mut r, rows * n, 1.0);
    let be = CpuBf16Backend::new();
    // f32 → bf16 and back, through the reference's copy.
    let mut xr = be.scratch(rows * n).expect("x");
    be.copy(rows * n, Ref::whole(&full(&be, &x)), Mut::whole(&mut xr));
    let mut back = be.scratch_full(rows * n).expect("back");
    be.copy(rows * n, Ref::whole(&xr), Mut::whole(&mut back));
    let (mut ya_r, mut yf_r) = (act(&be, &ya), full(&be, &yf));
    be.add_bias(rows, n, Ref::whole(&act(&be, &b)), Mut::whole(&mut ya_r));
    be.add_bias(rows, n, Ref::whole(&act(&be, &b)), Mut::whole(&mut yf_r));

    // 0 x, 1 x as bf16, 2 back as f32, 3 b, 4 ya, 5 yf, 6 a 2-D copy, 7 a 2-D accumulation.
    let acc0 = bf16_values(&mut r, rows * n, 1.0);
    let mut bufs = vec![
        Data::F32(x.clone()),
        Data::bf16_nan(rows * n),
        Data::f32_nan(rows * n),
        Data::bf16(&b),
        Data::bf16(&ya),
        Data::F32(yf),
        Data::bf16_nan(rows * n),
        Data::bf16(&acc0),
    ];
    let len = (rows * n) as i64;
    copy.run(
        &mut bufs,
        &[
            launch(
                "convert_f32_bf16",
                grid1(rows * n),
                vec![Arg::Int(len), Arg::Buf(0), Arg::Buf(1)],
            ),
            launch(
                "convert_bf16_f32",
                grid1(rows * n),
                vec![Arg::Int(len), Arg::Buf(1), Arg::Buf(2)],
            ),
            // Rows of the first n − 5 columns, row stride n on both sides.
            launch(
                "copy_2d_bf16",
                grid1(rows * (n - 5)),
                vec![
                    int(rows),
                    int(n - 5),
                    Arg::Buf(1),
                    int(n),
                    Arg::Buf(6),
                    int(n),
                    Arg::Int(0),
                ],
            ),
            launch(
                "copy_2d_bf16",
                grid1(rows * (n - 5)),
                vec![
                    int(rows),
                    int(n - 5),
                    Arg::Buf(1),
                    int(n),
                    Arg::Buf(7),
                    int(n),
                    Arg::Int(1),
                ],
            ),
        ],
    );
    gelu.run(
        &mut bufs,
        &[
            launch(
                "add_bias_bf16",
                grid1(rows * n),
                vec![int(rows), int(n), Arg::Buf(3), Arg::Buf(4)],
            ),
            launch(
                "add_bias_bf16_f32",
                grid1(rows * n),
                vec![int(rows), int(n), Arg::Buf(3), Arg::Buf(5)],
            ),
        ],
    );
    let rounded = down(&be, &xr);
    check("convert f32 → bf16", &bufs[1], &rounded);
    // Bit for bit: rounding is exact arithmetic.
    assert_eq!(
        bufs[1].to_f64(),
        rounded,
        "f32 → bf16 rounds as the host does"
    );
    check("convert bf16 → f32", &bufs[2], &down(&be, &back));
    check("bias into bf16", &bufs[4], &down(&be, &ya_r));
    check("bias into f32", &bufs[5], &down(&be, &yf_r));
    // The 2-D copy: the window's columns, NaN elsewhere; the accumulation: sums there.
    let (copied, summed) = (bufs[6].to_f64(), bufs[7].to_f64());
    for i in 0..rows {
        for j in 0..n {
            let k = i * n + j;
            if j < n - 5 {
                assert_eq!(copied[k], rounded[k], "copy ({i}, {j})");
                let want = half::bf16::from_f64(acc0[k] as f64 + rounded[k]).to_f64();
                assert_eq!(summed[k], want, "accumulation ({i}, {j})");
            } else {
                assert!(copied[k].is_nan(), "copy ({i}, {j}) outside the window");
                assert_eq!(
                    summed[k], acc0[k] as f64,
                    "accumulation ({i}, {j}) outside the window"
                );
            }
        }
    }
}

/// `EmbFields` as embedding.cu lays it out: two ints, 33 u32, 4 bytes of padding, 32 i64,
/// 32 ints.
fn emb_fields_bytes(g: &EmbFields) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(g.count.to_le_bytes());
    b.extend(g.first.to_le_bytes());
    for k in g.key0 {
        b.extend(k.to_le_bytes());
    }
    b.extend([0u8; 4]);
    for o in g.offset {
        b.extend(o.to_le_bytes());
    }
    for c in g.col0 {
        b.extend(c.to_le_bytes());
    }
    assert_eq!(b.len(), std::mem::size_of::<EmbFields>());
    b
}

/// Embedding tables of `vocabs` rows of `width` laid out from element `first` with `gap`
/// elements between them, and the elements they span with their gaps.
fn tables_of(vocabs: &[usize], width: usize, first: usize, gap: usize) -> (Vec<EmbTable>, usize) {
    let mut off = first;
    let tables = vocabs
        .iter()
        .map(|&vocab| {
            let t = EmbTable { offset: off, vocab };
            off += vocab * width + gap;
            t
        })
        .collect();
    (tables, off)
}

/// Gathers from bf16 tables (the weights' copy, at an element offset off 16 bytes): summed
/// into the f32 residual stream (one launch per group of fields, the later ones accumulating)
/// and concatenated into a bf16 row; bf16 positions added to the f32 stream.
#[test]
fn embedding_gather_and_positions_bf16() {
    let Some(emu) = Emulator::of("embedding.cu") else {
        return;
    };
    // 35 fields: two groups of at most 32.
    let (n, width) = (37, 8);
    let mut r = ChaCha8Rng::seed_from_u64(12);
    let vocabs: Vec<usize> = (0..35).map(|f| 2 + (f * 7) % 13).collect();
    let (tables, off) = tables_of(&vocabs, width, 3, 0);
    let params = bf16_values(&mut r, off, 1.0);
    let fields = vocabs.len();
    let ids: Vec<u32> = (0..n * fields)
        .map(|k| r.gen_range(0..vocabs[k % fields] as u32))
        .collect();
    let be = CpuBf16Backend::new();
    let (pb, idb) = (act(&be, &params), be.upload_ids(&ids).expect("ids"));
    let mut sum = be.scratch_full(n * width).expect("sum");
    be.embedding(
        n,
        width,
        &tables,
        &idb,
        &pb,
        EmbMode::Sum,
        Mut::whole(&mut sum),
        width,
    );
    let cw = fields * width;
    let mut cat = be.scratch(n * cw).expect("cat");
    be.embedding(
        n,
        width,
        &tables,
        &idb,
        &pb,
        EmbMode::Concat,
        Mut::whole(&mut cat),
        cw,
    );

    // 0 ids, 1 params, 2 sum (f32), 3 concat (bf16), 4 err, 5.. the groups' descriptors.
    let mut bufs = vec![
        Data::U32(ids),
        Data::bf16(&params),
        Data::f32_nan(n * width),
        Data::bf16_nan(n * cw),
        Data::U32(vec![0]),
    ];
    let mut launches = Vec::new();
    for (mode, out, ld, kernel) in [
        (EmbMode::Sum, 2, width, "emb_gather_bf16_f32"),
        (EmbMode::Concat, 3, cw, "emb_gather_bf16"),
    ] {
        let sum = mode == EmbMode::Sum;
        for (gi, g) in EmbFields::groups(&tables, width, mode, false)
            .iter()
            .enumerate()
        {
            let per_token = if sum { width } else { g.count as usize * width };
            bufs.push(Data::Bytes(emb_fields_bytes(g)));
            launches.push(launch(
                kernel,
                grid1(n * per_token),
                vec![
                    int(n),
                    int(width),
                    int(fields),
                    Arg::Buf(bufs.len() - 1),
                    Arg::Buf(0),
                    Arg::Buf(1),
                    Arg::Buf(out),
                    int(ld),
                    Arg::Int(sum as i64),
                    Arg::Int((sum && gi > 0) as i64),
                    Arg::Buf(4),
                ],
            ));
        }
    }
    assert_eq!(launches.len(), 4, "two groups in each mode");
    emu.run(&mut bufs, &launches);
    assert_eq!(bufs[4], Data::U32(vec![0]), "error flag");
    check(
        "embedding sum (bf16 tables → f32)",
        &bufs[2],
        &down(&be, &sum),
    );
    check("embedding concat (bf16)", &bufs[3], &down(&be, &cat));

    // Positions: bf16 table into the f32 stream, rows of lengths 0..=max_len.
    let (batch, max_len, d) = (5, 7, 16);
    let lens: Vec<u32> = vec![7, 0, 3, 1, 6];
    let pos = bf16_values(&mut r, max_len * d, 1.0);
    let x = f32_values(&mut r, batch * max_len * d, 1.0);
    let lid = be.upload_ids(&lens).expect("lens");
    let mut xr = full(&be, &x);
    be.add_positions(
        batch,
        max_len,
        d,
        &lid,
        Ref::whole(&act(&be, &pos)),
        Mut::whole(&mut xr),
    );
    let mut pbufs = vec![
        Data::U32(lens),
        Data::bf16(&pos),
        Data::F32(x),
        Data::U32(vec![0]),
    ];
    emu.run(
        &mut pbufs,
        &[launch(
            "add_positions_bf16",
            grid1(batch * max_len * d),
            vec![
                int(batch),
                int(max_len),
                int(d),
                Arg::Buf(0),
                Arg::Buf(1),
                Arg::Buf(2),
                Arg::Buf(3),
            ],
        )],
    );
    assert_eq!(pbufs[3], Data::U32(vec![0]), "error flag");
    check("positions (bf16 into f32)", &pbufs[2], &down(&be, &xr));
}

/// The embedding backward, all five passes of its counting sort as the backend launches them
/// (`EmbBackwardPlan`), for f32 and bf16 gradients of the output into the f32 tables'
/// gradient, in both modes, over padded rows (only valid tokens count) and over every token.
/// Each gradient element receives its tokens' terms in token order, the CPU reference's
/// order, so the result must equal the reference's bit for bit. Three fields, one with 3
/// ids (thousands of tokens per id, past the row loop's unrolling); 18 chunks of the sort
/// (past the chunk scan's batches of 16).
#[test]
fn embedding_backward_counting_sort() {
    let Some(emu) = Emulator::of("embedding.cu") else {
        return;
    };
    let (batch, max_len, width) = (200, 30, 20);
    let n = batch * max_len;
    let mut r = ChaCha8Rng::seed_from_u64(31);
    let vocabs = [3usize, 40, 7];
    let (tables, off) = tables_of(&vocabs, width, 5, 3);
    let fields = vocabs.len();
    let ids: Vec<u32> = (0..n * fields)
        .map(|k| r.gen_range(0..vocabs[k % fields] as u32))
        .collect();
    let lens: Vec<u32> = (0..batch)
        .map(|_| r.gen_range(0..=max_len as u32))
        .collect();
    let grads0 = f32_values(&mut r, off, 1.0);
    let round = |v: Vec<f32>| -> Vec<f32> {
        v.into_iter()
            .map(|x| half::bf16::from_f32(x).to_f32())
            .collect()
    };
    for mode in [EmbMode::Sum, EmbMode::Concat] {
        let ld = mode.row_width(fields, width);
        let dout = round(f32_values(&mut r, n * ld, 1.0));
        for valid in [true, false] {
            for bf16 in [false, true] {
                let label = format!(
                    "embedding backward {mode:?}, {} tokens, dout {}",
                    if valid { "valid" } else { "all" },
                    if bf16 { "bf16" } else { "f32" }
                );
                // The reference: the f32 CPU backend (the bf16 one differs only in how dout is
                // stored, and these values are bf16-exact).
                let be = mgkd::backend::cpu::CpuBackend::<f32>::new();
                let (idb, lb) = (
                    be.upload_ids(&ids).expect("ids"),
                    be.upload_ids(&lens).expect("lens"),
                );
                let mut g = be.upload(&grads0).expect("grads");
                let vt = valid.then_some(mgkd::backend::ValidTokens { lens: &lb, max_len });
                be.embedding_backward(
                    n,
                    width,
                    &tables,
                    &idb,
                    mode,
                    Ref::whole(&be.upload(&dout).expect("dout")),
                    ld,
                    &mut g,
                    vt,
                );
                let want: Vec<f64> = be
                    .download(&g)
                    .expect("download")
                    .iter()
                    .map(|&x| x as f64)
                    .collect();

                // 0 ids, 1 lens, 2 dout, 3 grads, 4 err; per group: descriptor, scratch.
                let mut bufs = vec![
                    Data::U32(ids.clone()),
                    Data::U32(lens.clone()),
                    if bf16 {
                        Data::bf16(&dout)
                    } else {
                        Data::F32(dout.clone())
                    },
                    Data::F32(grads0.clone()),
                    Data::U32(vec![0]),
                ];
                let (vl, vlen) = if valid {
                    (Arg::Buf(1), int(max_len))
                } else {
                    (Arg::Null, int(1))
                };
                let mut launches = Vec::new();
                let groups = EmbFields::groups(&tables, width, mode, true);
                for group in &groups {
                    let plan = EmbBackwardPlan::new(group, n, width);
                    bufs.push(Data::Bytes(emb_fields_bytes(group)));
                    let gi = bufs.len() - 1;
                    bufs.push(Data::U32(vec![0xDEAD_BEEF; plan.scratch]));
                    let sc = bufs.len() - 1;
                    let (hist, starts) = (Arg::Buf(sc), plan.chunks * plan.keys);
                    let sorted = starts + plan.keys + 1;
                    // The arguments emb_hist and emb_place share (their signatures' start).
                    let (ni, fi, ci) = (int(n), int(fields), int(plan.chunk));
                    let items = [ni, fi, Arg::Buf(gi), Arg::Buf(0), vl, vlen, ci, hist];
                    let with = |rest: &[Arg]| [&items[..], rest].concat();
                    launches.push(launch("emb_hist", plan.hist, with(&[Arg::Buf(4)])));
                    launches.push(launch(
                        "emb_col_scan",
                        plan.col_scan,
                        vec![
                            int(plan.chunks),
                            int(plan.keys),
                            hist,
                            Arg::BufAt(sc, starts + 1),
                        ],
                    ));
                    launches.push(launch(
                        "emb_key_scan",
                        plan.key_scan,
                        vec![int(plan.keys), Arg::BufAt(sc, starts)],
                    ));
                    let placed = [Arg::BufAt(sc, starts), Arg::BufAt(sc, sorted)];
                    launches.push(launch("emb_place", plan.place, with(&placed)));
                    launches.push(launch(
                        if bf16 {
                            "emb_rows_bf16"
                        } else {
                            "emb_rows_f32"
                        },
                        plan.rows,
                        vec![
                            int(width),
                            Arg::Buf(gi),
                            Arg::BufAt(sc, starts),
                            Arg::BufAt(sc, sorted),
                            Arg::Buf(2),
                            Arg::Int(ld as i64),
                            Arg::Buf(3),
                        ],
                    ));
                }
                emu.run(&mut bufs, &launches);
                assert_eq!(bufs[4], Data::U32(vec![0]), "{label}: error flag");
                let got = bufs[3].to_f64();
                let same = got
                    .iter()
                    .zip(&want)
                    .filter(|(a, b)| a.to_bits() == b.to_bits())
                    .count();
                println!(
                    "{label}: {} group(s), {} chunks, {same} of {} gradient elements \
                     bit-identical",
                    groups.len(),
                    EmbBackwardPlan::new(&groups[0], n, width).chunks,
                    want.len()
                );
                assert_eq!(same, want.len(), "{label}: not bit-identical to the CPU");
            }
        }
    }
}

/// A kernel source the emulation cannot take is an error naming what, not a panic.
#[test]
fn unemulable_sources_are_errors() {
    let ok = "extern __shared__ float sm[];\nvoid k() {}";
    assert_eq!(
        emulable(ok).as_deref(),
        Ok("float* sm = (float*)emu_shared();\nvoid k() {}")
    );
    for (src, says) in [
        ("#if __CUDA_ARCH__ >= 800\nasm(\"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32\");", "without its `#endif`"),
        ("#if __CUDA_ARCH__ >= 800\nasm(\"wgmma\");\n#endif", "does not know"),
        ("asm(\"nop;\");", "does not replace"),
        ("extern __shared__ float sm[]", "without its `;`"),
        ("extern __shared__ sm;", "a type and a name"),
    ] {
        let e = emulable(src).expect_err(src);
        assert!(e.contains(says), "{src}: {e}");
    }
}
