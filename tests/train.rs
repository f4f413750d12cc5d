//! The training library: schedule values, bucketed batches, a planted signal learned by the
//! teacher and the student, early stopping, best parameters kept, atomic checkpoints and
//! bit-identical results for 1 and 2 threads.

mod train_common;

use std::collections::BTreeMap;
use std::path::Path;

use mgkd::backend::cpu::CpuBackend;
use mgkd::data::Dataset;
use mgkd::loss::LossConfig;
use mgkd::metrics;
use mgkd::model::{checkpoint, Model, ModelConfig, Role, Teacher};
use mgkd::train::{
    epoch_batches, kept_lengths, labels_of, lr_at, score_rows, train, warmup_steps, RunOptions,
    Stage, TrainConfig, TrainReport, KEY_BEST, VALID,
};
use train_common::Spec;

type Cpu = CpuBackend<f32>;

fn tiny(role: Role, ds: &Dataset) -> ModelConfig {
    ModelConfig::new(role, ds.schema(), 8, 2, 2, 4).expect("config")
}

fn cfg(epochs: usize) -> TrainConfig {
    TrainConfig {
        epochs,
        batch: 32,
        lr: 5e-3,
        seed: 7,
        ..TrainConfig::default()
    }
}

fn run(
    ds: &Dataset,
    model: &mut Model<Cpu>,
    stage: &Stage<'_, Cpu>,
    loss: &LossConfig,
    tc: &TrainConfig,
    out: Option<&Path>,
) -> TrainReport {
    let opts = RunOptions {
        checkpoint: out.map(Path::to_path_buf),
        metadata: BTreeMap::from([("test.key".to_string(), "v".to_string())]),
        log: None,
        progress: false,
        eager: false,
        resume: None,
    };
    train(&Cpu::new(), ds, model, stage, loss, tc, &opts).expect("train")
}

#[test]
fn schedule_warms_up_linearly_then_decays_by_cosine_to_zero() {
    // 105 steps: W = round(5.25) = 5 warm-up steps, then cosine over 100 steps.
    assert_eq!(warmup_steps(105, 0.05), 5);
    let lr = |s| lr_at(s, 105, 2.0, 0.05);
    assert_eq!(lr(0), 0.0);
    assert!((lr(1) - 0.4).abs() < 1e-12);
    assert!((lr(3) - 1.2).abs() < 1e-12);
    assert!((lr(5) - 2.0).abs() < 1e-12);
    assert!(
        (lr(55) - 1.0).abs() < 1e-12,
        "half-way through the decay: {}",
        lr(55)
    );
    let q = 2.0 * 0.5 * (1.0 + (std::f64::consts::PI * 0.25).cos());
    assert!((lr(30) - q).abs() < 1e-12);
    assert!(lr(105).abs() < 1e-12);
    assert_eq!(lr(106), 0.0);
    for s in 5..105 {
        assert!(lr(s + 1) < lr(s), "not decreasing at step {s}");
    }
    // Tiny runs still get one warm-up step.
    assert_eq!(warmup_steps(3, 0.05), 1);
    assert!((lr_at(1, 3, 1.0, 0.05) - 1.0).abs() < 1e-12);
}

#[test]
fn bucketed_batches_are_a_seeded_permutation_with_less_padding() {
    let rows: Vec<u64> = (0..5000).map(|r| r * 3 + 1).collect();
    // Heavy-tailed keys.
    let keys: Vec<u64> = rows
        .iter()
        .map(|r| (r * 2654435761) % 97 % 40 / 3 + r % 2)
        .collect();
    let a = epoch_batches(&rows, Some(&keys), 16, 5, 1).expect("batches");
    let b = epoch_batches(&rows, Some(&keys), 16, 5, 1).expect("batches");
    assert_eq!(a, b, "same seed and epoch, same batches");
    assert_ne!(
        a,
        epoch_batches(&rows, Some(&keys), 16, 5, 2).expect("batches")
    );
    assert_ne!(
        a,
        epoch_batches(&rows, Some(&keys), 16, 6, 1).expect("batches")
    );
    let mut all: Vec<u64> = a.iter().flatten().copied().collect();
    all.sort_unstable();
    assert_eq!(all, rows, "every row exactly once");
    assert!(a.iter().all(|b| !b.is_empty() && b.len() <= 16));
    let key_of: std::collections::HashMap<u64, u64> =
        rows.iter().copied().zip(keys.iter().copied()).collect();
    let padded = |batches: &[Vec<u64>]| -> u64 {
        batches
            .iter()
            .map(|b| {
                let m = b.iter().map(|r| key_of[r]).max().unwrap_or(0);
                b.iter().map(|r| m - key_of[r]).sum::<u64>()
            })
            .sum()
    };
    let plain = epoch_batches(&rows, None, 16, 5, 1).expect("batches");
    assert!(
        padded(&a) * 4 < padded(&plain),
        "bucketed padding {} vs plain {}",
        padded(&a),
        padded(&plain)
    );
    assert!(epoch_batches(&rows, Some(&keys[1..]), 16, 5, 1).is_err());
    assert!(epoch_batches(&rows, None, 0, 5, 1).is_err());
}

#[test]
fn teacher_and_student_learn_the_planted_signal_and_keep_the_best() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    train_common::write(&data, Spec::labelled(800, 1));
    let ds = Dataset::open(&data).expect("open");
    let be = Cpu::new();
    let tout = tmp.path().join("teacher.safetensors");
    let mut teacher = Model::new(&be, tiny(Role::Teacher, &ds), 7).expect("model");
    let loss = LossConfig::default();
    let rep = run(
        &ds,
        &mut teacher,
        &Stage::Teacher,
        &loss,
        &cfg(6),
        Some(&tout),
    );
    assert!(
        rep.best.valid_auc > 0.85,
        "teacher valid AUC {}",
        rep.best.valid_auc
    );
    // The model holds the best epoch's parameters, and so does the checkpoint.
    let rows = ds.rows_of_split(VALID);
    let labels = labels_of(&ds, &rows, "test").expect("labels");
    let auc_of = |m: &Model<Cpu>| {
        let z = score_rows(&be, &ds, m, &rows).expect("score");
        metrics::auc(&z, &labels).expect("auc")
    };
    assert!((auc_of(&teacher) - rep.best.valid_auc).abs() < 1e-12);
    let ck = checkpoint::read(&tout).expect("checkpoint");
    assert_eq!(ck.metadata.get("test.key").map(String::as_str), Some("v"));
    let best: mgkd::train::BestEpoch =
        serde_json::from_str(&ck.metadata[KEY_BEST]).expect("best JSON");
    // (serde_json's float parsing may differ from the value in the last bit.)
    assert_eq!(best.epoch, rep.best.epoch);
    assert!((best.valid_auc - rep.best.valid_auc).abs() < 1e-15);
    assert!((best.valid_ks - rep.best.valid_ks).abs() < 1e-15);
    let reloaded = ck.into_model(&be).expect("model");
    assert!((auc_of(&reloaded) - rep.best.valid_auc).abs() < 1e-12);
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    assert_eq!(rep.history.len(), 6);
    assert!(rep
        .history
        .iter()
        .all(|e| e.padding >= 0.0 && e.padding < 1.0));

    let mut student = Model::new(&be, tiny(Role::Student, &ds), 7).expect("model");
    let srep = run(
        &ds,
        &mut student,
        &Stage::Student(Teacher::live(&teacher)),
        &loss,
        &cfg(6),
        None,
    );
    assert!(
        srep.best.valid_auc > 0.7,
        "student valid AUC {}",
        srep.best.valid_auc
    );
    let terms = srep.history[0].terms.clone().expect("student terms");
    for (name, t) in [
        ("hard", terms.hard),
        ("soft", terms.soft),
        ("coarse", terms.coarse),
        ("fine", terms.fine),
        ("self", terms.self_distill),
    ] {
        assert!(t.is_some_and(|v| v.is_finite() && v > 0.0), "{name}: {t:?}");
    }
    // The wrong model for the stage is refused.
    let mut t2 = Model::new(&be, tiny(Role::Teacher, &ds), 1).expect("model");
    let opts = RunOptions::default();
    let err = train(
        &be,
        &ds,
        &mut t2,
        &Stage::Student(Teacher::live(&teacher)),
        &loss,
        &cfg(1),
        &opts,
    );
    assert!(err.is_err());
}

#[test]
fn early_stopping_ends_a_run_that_stops_improving() {
    let tmp = tempfile::tempdir().expect("tempdir");
    train_common::write(tmp.path(), Spec::labelled(300, 2));
    let ds = Dataset::open(tmp.path()).expect("open");
    let be = Cpu::new();
    let mut teacher = Model::new(&be, tiny(Role::Teacher, &ds), 3).expect("model");
    // A learning rate so small that no f32 parameter moves: validation AUC never improves
    // after the first epoch, so the run stops after 1 + patience epochs.
    let tc = TrainConfig {
        lr: 1e-30,
        patience: 2,
        ..cfg(10)
    };
    let rep = run(
        &ds,
        &mut teacher,
        &Stage::Teacher,
        &LossConfig::default(),
        &tc,
        None,
    );
    assert!(rep.stopped_early);
    assert_eq!(rep.history.len(), 3);
    assert_eq!(rep.best.epoch, 1);
    assert!(rep.history[0].best && !rep.history[1].best && !rep.history[2].best);
    // With patience above the epochs, every epoch runs.
    let tc = TrainConfig { patience: 20, ..tc };
    let mut teacher = Model::new(&be, tiny(Role::Teacher, &ds), 3).expect("model");
    let rep = run(
        &ds,
        &mut teacher,
        &Stage::Teacher,
        &LossConfig::default(),
        &tc,
        None,
    );
    assert!(!rep.stopped_early);
    assert_eq!(rep.history.len(), 10);
}

#[test]
fn same_seed_gives_bit_identical_checkpoints_on_1_and_2_threads() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    train_common::write(&data, Spec::labelled(300, 3));
    let ds = Dataset::open(&data).expect("open");
    let teach = |threads: usize, seed: u64| -> Vec<u8> {
        let out = tmp.path().join(format!("t{threads}-{seed}.safetensors"));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        pool.install(|| {
            let be = Cpu::new();
            let mut t = Model::new(&be, tiny(Role::Teacher, &ds), seed).expect("model");
            let tc = TrainConfig { seed, ..cfg(2) };
            let _ = run(
                &ds,
                &mut t,
                &Stage::Teacher,
                &LossConfig::default(),
                &tc,
                Some(&out),
            );
            let mut s = Model::new(&be, tiny(Role::Student, &ds), seed).expect("model");
            let sout = tmp.path().join(format!("s{threads}-{seed}.safetensors"));
            let _ = run(
                &ds,
                &mut s,
                &Stage::Student(Teacher::live(&t)),
                &LossConfig::default(),
                &tc,
                Some(&sout),
            );
            let mut bytes = std::fs::read(&out).expect("read");
            bytes.extend(std::fs::read(&sout).expect("read"));
            bytes
        })
    };
    let one = teach(1, 11);
    assert_eq!(one, teach(2, 11), "1 vs 2 threads");
    assert_ne!(one, teach(2, 12), "another seed gives another model");
}

#[test]
fn kept_lengths_follow_the_schema_limits() {
    let tmp = tempfile::tempdir().expect("tempdir");
    train_common::write(tmp.path(), Spec::labelled(200, 4));
    let ds = Dataset::open(tmp.path()).expect("open");
    let rows: Vec<u64> = (0..ds.rows()).collect();
    let lens = kept_lengths(&ds, &rows).expect("lengths");
    let batch = ds.gather(&rows).expect("gather");
    let pre: Vec<u32> = lens.iter().map(|l| l.0).collect();
    let ins: Vec<u32> = lens.iter().map(|l| l.1).collect();
    assert_eq!(pre, batch.pre.lens);
    assert_eq!(ins, batch.in_service.lens);
    assert!(
        ins.contains(&8) && ins.contains(&0),
        "limits and empties are exercised"
    );
}
