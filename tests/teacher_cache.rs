//! The teacher cache (src/model/teacher.rs, src/train/teacher_cache.rs): a student trained
//! with its teacher's outputs computed once is bit-identical, on the CPU, to one whose teacher
//! runs forward on every batch; the gathered outputs are the live ones bit for bit (zeros on
//! padded token slots); a batch copied into another (as a recorded graph's input is) carries
//! its gather ids along; the budget and the loss switches decide what is cached; a row the
//! cache does not hold is refused by name. On a GPU, a cached student trains with graphs
//! bit-identically to op-by-op steps, and the gathered outputs match the live ones.

mod cuda_common;
mod kernel_emu;
mod skip;
mod train_common;

use mgkd::backend::cpu::CpuBackend;
use mgkd::backend::{Backend, Float};
use mgkd::data::Dataset;
use mgkd::loss::LossConfig;
use mgkd::model::{DeviceBatch, Model, ModelConfig, Role, Teacher, TeacherCache};
use mgkd::train::{cache_teacher, train, CacheOutcome, RunOptions, Stage, TrainConfig, TRAIN};
use train_common::Spec;

type Cpu = CpuBackend<f32>;

const BIG: u64 = 1 << 30;

fn widths(role: Role, ds: &Dataset) -> ModelConfig {
    ModelConfig::new(role, ds.schema(), 8, 2, 2, 4).expect("config")
}

/// Bucketed batches of 40 (several shapes per epoch), 3 epochs.
fn config() -> TrainConfig {
    TrainConfig {
        epochs: 3,
        batch: 40,
        lr: 5e-3,
        seed: 9,
        bucket: true,
        ..TrainConfig::default()
    }
}

fn bits<B: Backend>(be: &B, m: &Model<B>) -> Vec<u64> {
    let v = be.download(&m.params.values).expect("download");
    v.iter().map(|&x| x.to_f64().to_bits()).collect()
}

/// A teacher trained for 2 epochs on `ds`.
fn teacher<B: Backend>(be: &B, ds: &Dataset) -> Model<B> {
    let mut t = Model::new(be, widths(Role::Teacher, ds), 1).expect("teacher");
    let tc = TrainConfig {
        epochs: 2,
        ..config()
    };
    let opts = RunOptions::default();
    train(
        be,
        ds,
        &mut t,
        &Stage::Teacher,
        &LossConfig::default(),
        &tc,
        &opts,
    )
    .expect("teacher");
    t
}

/// Trains a student (seed 2) under `teacher`, with the cache when given; returns its
/// parameters' bits and its per-epoch (train loss, valid AUC).
fn student<B: Backend>(
    be: &B,
    ds: &Dataset,
    teacher: Teacher<'_, B>,
    eager: bool,
) -> (Vec<u64>, Vec<(f64, f64)>) {
    let mut s = Model::new(be, widths(Role::Student, ds), 2).expect("student");
    let opts = RunOptions {
        eager,
        ..RunOptions::default()
    };
    let loss = LossConfig::default();
    let rep = train(
        be,
        ds,
        &mut s,
        &Stage::Student(teacher),
        &loss,
        &config(),
        &opts,
    )
    .expect("student run");
    let curve = rep
        .history
        .iter()
        .map(|e| (e.train_loss, e.valid_auc))
        .collect();
    (bits(be, &s), curve)
}

fn dataset(rows: usize) -> (tempfile::TempDir, Dataset) {
    let tmp = tempfile::tempdir().expect("tempdir");
    train_common::write(tmp.path(), Spec::labelled(rows, 6));
    let ds = Dataset::open(tmp.path()).expect("open");
    (tmp, ds)
}

#[test]
fn a_cached_teacher_trains_the_student_bit_identically() {
    cached_equals_live(&Cpu::new(), 4);
}

/// Under bf16 the cache holds the teacher's representations and tokens in bf16 (they are
/// bf16 activations): half the bytes, and still the live teacher's values exactly.
#[test]
fn a_bf16_run_caches_in_bf16_and_still_trains_bit_identically() {
    cached_equals_live(&mgkd::backend::cpu_bf16::CpuBf16Backend::new(), 2);
}

/// Trains a teacher and then a student under it live and from the cache on `be`, whose
/// activations take `act` bytes: the cache's size and the two students' bits agree.
fn cached_equals_live<B: Backend>(be: &B, act: usize) {
    let (_tmp, ds) = dataset(400);
    let t = teacher(be, &ds);
    let loss = LossConfig::default();
    let (cache, outcome) = cache_teacher(be, &t, &ds, [&loss], 40, BIG).expect("cache");
    let cache = cache.expect("built");
    let train_rows = ds.rows_of_split(TRAIN);
    let kept = mgkd::train::kept_lengths(&ds, &train_rows).expect("lengths");
    let tokens: usize = kept.iter().map(|l| l.1 as usize).sum();
    match outcome {
        CacheOutcome::Built {
            rows,
            tokens: got,
            bytes,
            ..
        } => {
            assert_eq!(rows, train_rows.len());
            assert_eq!(got, tokens);
            assert_eq!(
                bytes,
                (rows * 4 + (rows * 8 + (tokens + 1) * 8) * act) as u64
            );
        }
        other => panic!("not built: {other}"),
    }
    let live = student(be, &ds, Teacher::live(&t), false);
    let cached = student(be, &ds, Teacher::cached(&t, &cache), false);
    assert_eq!(live.1, cached.1, "per-epoch loss and validation AUC");
    assert!(live.0 == cached.0, "final parameters differ in their bits");
}

#[test]
fn gathered_outputs_are_the_live_ones_and_survive_a_batch_copy() {
    let (_tmp, ds) = dataset(300);
    let be = Cpu::new();
    let t = Model::new(&be, widths(Role::Teacher, &ds), 3).expect("teacher");
    let loss = LossConfig::default();
    let (cache, _) = cache_teacher(&be, &t, &ds, [&loss], 16, BIG).expect("cache");
    let cache = cache.expect("built");
    let index = Some(&cache.index);
    let rows = ds.rows_of_split(TRAIN);
    // Two batches of one shape, in an order unlike the cache's (by length) and the reverse.
    let a: Vec<u64> = rows.iter().copied().step_by(3).take(24).collect();
    let b: Vec<u64> = a.iter().rev().copied().collect();
    let up = |ids: &[u64]| {
        let batch = ds.gather(ids).expect("gather");
        DeviceBatch::upload_for(&be, &batch, ds.schema(), index).expect("upload")
    };
    let (da, mut db) = (up(&a), up(&b));
    let check = |dev: &DeviceBatch<Cpu>| {
        let live = Teacher::live(&t).outputs(&be, dev, true).expect("live");
        let got = Teacher::cached(&t, &cache)
            .outputs(&be, dev, true)
            .expect("cached");
        let host = |b: &Vec<f32>| b.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(host(&live.logits), host(&got.logits), "logits");
        assert_eq!(host(&live.hidden), host(&got.hidden), "representations");
        let (lt, gt) = (live.tokens.expect("tokens"), got.tokens.expect("tokens"));
        let (len, d) = (dev.in_service.len, 8);
        for (r, &l) in dev.in_service.lens_host.iter().enumerate() {
            for j in 0..len {
                let s = (r * len + j) * d..(r * len + j + 1) * d;
                if j < l as usize {
                    assert_eq!(host(&lt[s.clone()].to_vec()), host(&gt[s].to_vec()));
                } else {
                    assert!(gt[s].iter().all(|&x| x == 0.0), "padded slot of row {r}");
                }
            }
        }
    };
    check(&da);
    check(&db);
    assert_eq!(da.in_service.len, db.in_service.len, "one shape");
    db.copy_from(&be, &da).expect("copy");
    let (x, y) = (
        Teacher::cached(&t, &cache)
            .outputs(&be, &da, true)
            .expect("a"),
        Teacher::cached(&t, &cache)
            .outputs(&be, &db, true)
            .expect("b"),
    );
    assert_eq!(x.logits, y.logits);
    assert_eq!(x.tokens, y.tokens);
}

#[test]
fn the_budget_and_the_loss_switches_decide_what_is_cached() {
    let (_tmp, ds) = dataset(200);
    let be = Cpu::new();
    let t = Model::new(&be, widths(Role::Teacher, &ds), 3).expect("teacher");
    let full = LossConfig::default();
    let (c, outcome) = cache_teacher(&be, &t, &ds, [&full], 32, 1000).expect("cache");
    assert!(c.is_none());
    assert!(
        matches!(outcome, CacheOutcome::OverBudget { budget: 1000, .. }),
        "{outcome:?}"
    );
    assert!(outcome.to_string().contains("--teacher-cache-mib"));
    let (c, outcome) = cache_teacher(&be, &t, &ds, [&full], 32, 0).expect("cache");
    assert!(c.is_none() && outcome == CacheOutcome::Off);
    let plain = LossConfig {
        soft: false,
        coarse: false,
        fine: false,
        self_distill: false,
        ..full.clone()
    };
    let (c, outcome) = cache_teacher(&be, &t, &ds, [&plain], 32, BIG).expect("cache");
    assert!(c.is_none() && outcome == CacheOutcome::Off);
    // Without L_fine only logits and representations are kept.
    let no_fine = LossConfig {
        fine: false,
        ..full.clone()
    };
    let (c, _) = cache_teacher(&be, &t, &ds, [&no_fine], 32, BIG).expect("cache");
    let c: TeacherCache<Cpu> = c.expect("built");
    assert!(c.tokens.is_none() && !c.index.has_tokens());
    // Any objective with L_fine among several asks for the tokens.
    let (c, _) = cache_teacher(&be, &t, &ds, [&no_fine, &full], 32, BIG).expect("cache");
    assert!(c.expect("built").tokens.is_some());
}

#[test]
fn a_row_the_cache_does_not_hold_is_refused_by_name() {
    let (_tmp, ds) = dataset(200);
    let be = Cpu::new();
    let t = Model::new(&be, widths(Role::Teacher, &ds), 3).expect("teacher");
    let (cache, _) = cache_teacher(&be, &t, &ds, [&LossConfig::default()], 32, BIG).expect("c");
    let cache = cache.expect("built");
    let valid = ds.rows_of_split(mgkd::train::VALID);
    let batch = ds.gather(&valid[..4]).expect("gather");
    let err = DeviceBatch::upload_for(&be, &batch, ds.schema(), Some(&cache.index))
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("dataset row {}", valid[0])) && msg.contains("not cached"),
        "{msg}"
    );
    // A batch staged without the ids does not reach a cached teacher's gather.
    let plain =
        DeviceBatch::upload(&be, &ds.gather(&valid[..4]).expect("g"), ds.schema()).expect("upload");
    let err = Teacher::cached(&t, &cache)
        .outputs(&be, &plain, false)
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains("without the teacher cache"),
        "{err}"
    );
}

#[test]
fn on_the_gpu_a_cached_student_replays_graphs_bit_identically() {
    let Some(be) = cuda_common::gpu() else {
        return;
    };
    // Against the live teacher the cached outputs may differ in the GEMMs' last bits
    // (cuBLAS chooses its algorithm per shape), which 3 epochs amplify a little: the curves
    // agree to 1e-3 (loss, relative) and 5e-3 (AUC).
    cached_on_the_gpu(be, 1e-3, 5e-3);
}

/// The same on the GPU in bf16 (the cache in bf16). A last-bit difference of the teacher's
/// f32 accumulation moves a bf16 value by one ulp (2⁻⁸) where it sits near a rounding
/// boundary, so live and cached curves agree to 5e-3 (loss) and 1e-2 (AUC).
#[test]
fn on_the_gpu_a_bf16_cached_student_replays_graphs_bit_identically() {
    if cuda_common::gpu().is_none() {
        return;
    }
    let be = mgkd::backend::cuda::CudaBackend::with_precision(0, mgkd::backend::Precision::Bf16)
        .expect("a bf16 backend");
    cached_on_the_gpu(&be, 5e-3, 1e-2);
}

/// A student trained from the cache on `be` with recorded graphs and op by op, bit for bit
/// the same; against the live teacher within `loss_rel` (per-epoch loss) and `auc_abs`.
fn cached_on_the_gpu<B: Backend>(be: &B, loss_rel: f64, auc_abs: f64) {
    let (_tmp, ds) = dataset(400);
    let t = teacher(be, &ds);
    let loss = LossConfig::default();
    let (cache, _) = cache_teacher(be, &t, &ds, [&loss], 40, BIG).expect("cache");
    let cache = cache.expect("built");
    let eager = student(be, &ds, Teacher::cached(&t, &cache), true);
    let graphs = student(be, &ds, Teacher::cached(&t, &cache), false);
    assert!(eager.0 == graphs.0, "graphs and op-by-op steps differ");
    let live = student(be, &ds, Teacher::live(&t), true);
    for (k, ((l, a), (c, b))) in live.1.iter().zip(&eager.1).enumerate() {
        assert!(
            (l - c).abs() <= loss_rel * l.abs().max(1.0),
            "epoch {k} loss {l} vs {c}"
        );
        assert!((a - b).abs() <= auc_abs, "epoch {k} valid AUC {a} vs {b}");
    }
}
