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
