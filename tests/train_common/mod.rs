//! Shared helpers of the training tests: a tiny schema and datasets with a planted signal
//! (the label shows in the in-service event types strongly, in the profile and the
//! pre-service event types weakly), written with `DatasetWriter`.
#![allow(dead_code)]

use std::path::Path;

use mgkd::data::{CatField, DatasetWriter, Manifest, NumField, RowData, Schema, WriterOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Tiny schema: 2 dense + 1 categorical profile fields, events with 2 categorical and 1
/// numeric field, limits 6 (pre) and 8 (in). `event_vocab` sets the event-type vocabulary
/// (change it to get a dataset of another schema).
pub fn schema_with(event_vocab: u32) -> Schema {
    let num = |name: &str| NumField {
        name: name.into(),
        mean: 0.0,
        std: 1.0,
        log1p: false,
    };
    let cat = |name: &str, vocab| CatField {
        name: name.into(),
        vocab,
    };
    Schema {
        profile_num: vec![num("income"), num("age")],
        profile_cat: vec![cat("region", 5)],
        event_cat: vec![cat("event_type", event_vocab), cat("channel", 4)],
        event_num: vec![num("amount")],
        pre_len: 6,
        in_len: 8,
    }
}

/// The default tiny schema (event-type vocabulary 6).
pub fn schema() -> Schema {
    schema_with(6)
}

/// What to write.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// Rows.
    pub rows: usize,
    /// Seed.
    pub seed: u64,
    /// Write labels.
    pub labels: bool,
    /// Write in-service events.
    pub in_service: bool,
    /// Write user ids.
    pub user_ids: bool,
    /// Event-type vocabulary (6 is the default schema).
    pub event_vocab: u32,
}

impl Spec {
    /// `rows` labelled rows with in-service events and no user ids, default schema.
    pub fn labelled(rows: usize, seed: u64) -> Spec {
        Spec {
            rows,
            seed,
            labels: true,
            in_service: true,
            user_ids: false,
            event_vocab: 6,
        }
    }
}

fn events(
    rng: &mut ChaCha8Rng,
    n: usize,
    y: u8,
    p_signal: f64,
    vocab: u32,
) -> (Vec<u32>, Vec<f32>) {
    let (mut cat, mut num) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let ty = if y == 1 && rng.gen_bool(p_signal) {
            vocab - 1
        } else {
            rng.gen_range(1..vocab - 1)
        };
        cat.push(ty);
        cat.push(rng.gen_range(0..4));
        let z: f64 = StandardNormal.sample(rng);
        num.push(z as f32);
    }
    (cat, num)
}

/// Writes a planted-signal dataset in `dir`: default rate ≈ 30 %, splits 70/15/15 (by row
/// index, so every split holds both classes), heavy-tailed lengths (some empty, some over
/// the limits).
pub fn write(dir: &Path, spec: Spec) -> Manifest {
    let schema = schema_with(spec.event_vocab);
    let opts = WriterOptions {
        shard_rows: Some(97),
        has_label: spec.labels,
        has_user_id: spec.user_ids,
        ..Default::default()
    };
    let mut w = DatasetWriter::create(dir, schema, opts).expect("create writer");
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    for i in 0..spec.rows {
        let y = u8::from(rng.gen_bool(0.3));
        let len = |rng: &mut ChaCha8Rng, m: f64| {
            if rng.gen_bool(0.15) {
                0
            } else {
                let z: f64 = StandardNormal.sample(rng);
                ((m + 0.8 * z).exp().ceil() as usize).min(12)
            }
        };
        let n_pre = len(&mut rng, 1.0);
        let n_in = if spec.in_service {
            len(&mut rng, 1.5)
        } else {
            0
        };
        let (pre_cat, pre_num) = events(&mut rng, n_pre, y, 0.3, spec.event_vocab);
        let (in_cat, in_num) = events(&mut rng, n_in, y, 0.8, spec.event_vocab);
        let z0: f64 = StandardNormal.sample(&mut rng);
        let z1: f64 = StandardNormal.sample(&mut rng);
        let profile_num = [(z0 + 0.8 * f64::from(y)) as f32, z1 as f32];
        let profile_cat = [rng.gen_range(0..5u32)];
        let split = match i % 20 {
            0..=13 => 0,
            14..=16 => 1,
            _ => 2,
        };
        let uid = format!("u{i:05}");
        w.push(&RowData {
            label: spec.labels.then_some(y),
            split,
            user_id: spec.user_ids.then_some(uid.as_str()),
            profile_num: &profile_num,
            profile_cat: &profile_cat,
            pre_cat: &pre_cat,
            pre_num: &pre_num,
            in_cat: &in_cat,
            in_num: &in_num,
        })
        .expect("push row");
    }
    w.finish().expect("finish writer")
}

/// What [`resumed_runs_match`] checked: per stage, the steps of the resume checkpoints it
/// resumed from (a mid-epoch one and one written at an epoch's end).
pub type ResumedFrom = Vec<(&'static str, Vec<u64>)>;

/// Trains a teacher, then a student under it, on `be` (tiny model, 4 epochs of 132 steps
/// over `ds` = `write(…, Spec::labelled(3000, _))`), with a resume checkpoint every 50
/// steps; meanwhile a second thread copies two of the resume checkpoints the run writes
/// (what a run killed there would leave): one at step 40 or later within an epoch, and one
/// written at the end of epoch 1, 2 or 3. Then, for each copy, a fresh model resumes from it and must end
/// with parameters bit-identical to the uninterrupted run's. Files go to `dir`.
pub fn resumed_runs_match<B: mgkd::backend::Backend>(
    be: &B,
    ds: &mgkd::data::Dataset,
    dir: &Path,
) -> ResumedFrom {
    use mgkd::backend::Float;
    use mgkd::loss::LossConfig;
    use mgkd::model::{Model, ModelConfig, Role, Teacher};
    use mgkd::train::resume::{read_progress, Every, Progress, ResumeOptions};
    use mgkd::train::{train, RunOptions, Stage, TrainConfig};
    use std::sync::atomic::{AtomicBool, Ordering};

    let tc = TrainConfig {
        epochs: 4,
        batch: 16,
        lr: 5e-3,
        seed: 3,
        ..TrainConfig::default()
    };
    let loss = LossConfig::default();
    let widths = |role| ModelConfig::new(role, ds.schema(), 8, 2, 2, 4).expect("config");
    let bits = |m: &Model<B>| -> Vec<u64> {
        let v = be.download(&m.params.values).expect("download");
        v.iter().map(|&x| Float::to_f64(x).to_bits()).collect()
    };
    type Point = (&'static str, fn(&Progress) -> bool);
    let points: [Point; 2] = [
        ("mid-epoch", |p| p.batch > 0 && p.step >= 40),
        ("epoch end", |p| p.batch == 0 && (2..=4).contains(&p.epoch)),
    ];
    let mut teacher: Option<Model<B>> = None;
    let mut checked = Vec::new();
    for (role, name) in [(Role::Teacher, "teacher"), (Role::Student, "student")] {
        let state = dir.join(format!("{name}.resume.safetensors"));
        let opts = |resume: bool| RunOptions {
            resume: Some(ResumeOptions {
                path: state.clone(),
                every: Every::Steps(50),
                resume,
            }),
            ..RunOptions::default()
        };
        let run = |model: &mut Model<B>, resume: bool| {
            let stage = match &teacher {
                None => Stage::Teacher,
                Some(t) => Stage::Student(Teacher::live(t)),
            };
            train(be, ds, model, &stage, &loss, &tc, &opts(resume)).expect("train");
        };
        let snaps: Vec<std::path::PathBuf> = (0..points.len())
            .map(|k| dir.join(format!("{name}.snapshot{k}")))
            .collect();
        let mut model = Model::new(be, widths(role), 7).expect("model");
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let tmp = dir.join(format!("{name}.copying"));
                let mut left: Vec<usize> = (0..points.len()).collect();
                while !left.is_empty() && !done.load(Ordering::Relaxed) {
                    if std::fs::copy(&state, &tmp).is_ok() {
                        if let Ok(p) = read_progress(&tmp) {
                            if let Some(i) = left.iter().position(|&k| points[k].1(&p)) {
                                std::fs::rename(&tmp, &snaps[left[i]]).expect("rename");
                                left.remove(i);
                            }
                        }
                    }
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            });
            // Stops the copier however the run ends (a panicking run would otherwise leave
            // it polling forever, and the scope waiting for it).
            let _stop = StopOnDrop(&done);
            run(&mut model, false);
        });
        assert!(
            !state.exists(),
            "{name}: the resume checkpoint stays after the run"
        );
        let want = bits(&model);
        let mut steps = Vec::new();
        for ((what, _), snap) in points.iter().zip(&snaps) {
            assert!(
                snap.exists(),
                "{name}: no {what} resume checkpoint was caught"
            );
            steps.push(read_progress(snap).expect("snapshot").step);
            std::fs::copy(snap, &state).expect("copy");
            let mut resumed = Model::new(be, widths(role), 7).expect("model");
            run(&mut resumed, true);
            assert!(
                bits(&resumed) == want,
                "{name}: resumed from the {what} resume checkpoint, the parameters differ"
            );
        }
        checked.push((name, steps));
        if role == Role::Teacher {
            teacher = Some(model);
        }
    }
    checked
}

/// The run the arena tests repeat (`tests/cuda_arena.rs`, `tests/arena_emulated.rs`): two
/// epochs of length-bucketed batches of 40 (several batch shapes).
pub fn bucketed_run_config() -> mgkd::train::TrainConfig {
    mgkd::train::TrainConfig {
        epochs: 2,
        batch: 40,
        lr: 5e-3,
        seed: 11,
        bucket: true,
        ..mgkd::train::TrainConfig::default()
    }
}

/// Trains a teacher (d = 8, 2 heads, 2 blocks, seed 1), then a student under it (seed 2),
/// on `be` with `tc` and `opts`; returns both parameter vectors as bit patterns (f64 bits of
/// each value, exact for f32) and the number of batch shapes each run recorded as a graph.
pub fn teacher_then_student<B: mgkd::backend::Backend>(
    be: &B,
    ds: &mgkd::data::Dataset,
    tc: &mgkd::train::TrainConfig,
    opts: &mgkd::train::RunOptions,
) -> (Vec<u64>, Vec<u64>, [usize; 2]) {
    use mgkd::backend::Float;
    use mgkd::loss::LossConfig;
    use mgkd::model::{Model, ModelConfig, Role, Teacher};
    use mgkd::train::{train, Stage};

    let loss = LossConfig::default();
    let widths = |role| ModelConfig::new(role, ds.schema(), 8, 2, 2, 4).expect("config");
    let mut teacher = Model::new(be, widths(Role::Teacher), 1).expect("teacher");
    let t = train(be, ds, &mut teacher, &Stage::Teacher, &loss, tc, opts).expect("teacher run");
    let mut student = Model::new(be, widths(Role::Student), 2).expect("student");
    let stage = Stage::Student(Teacher::live(&teacher));
    let s = train(be, ds, &mut student, &stage, &loss, tc, opts).expect("student run");
    let bits = |m: &Model<B>| -> Vec<u64> {
        let v = be.download(&m.params.values).expect("download");
        v.iter().map(|&x| x.to_f64().to_bits()).collect()
    };
    (bits(&teacher), bits(&student), [t.graphs, s.graphs])
}

/// Sets its flag when dropped: the end of a run, however it ends.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
