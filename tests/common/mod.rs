//! Shared helpers of the data-layer tests: a small schema, seeded random rows, and writing
//! them with `DatasetWriter`.
#![allow(dead_code)]

use std::path::Path;

use mgkd::data::{CatField, DatasetWriter, Manifest, NumField, RowData, Schema, WriterOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A generated row, owned.
#[derive(Debug, Clone)]
pub struct GenRow {
    pub label: u8,
    pub split: u8,
    pub user_id: String,
    pub profile_num: Vec<f32>,
    pub profile_cat: Vec<u32>,
    pub pre_cat: Vec<u32>,
    pub pre_num: Vec<f32>,
    pub in_cat: Vec<u32>,
    pub in_num: Vec<f32>,
}

/// Small test schema: 2 + 2 profile fields, 2 + 2 event fields, limits 4 (pre) and 6 (in).
pub fn schema() -> Schema {
    let cat = |name: &str, vocab| CatField {
        name: name.into(),
        vocab,
    };
    let num = |name: &str| NumField {
        name: name.into(),
        mean: 0.5,
        std: 2.0,
        log1p: false,
    };
    Schema {
        profile_num: vec![num("income"), num("age")],
        profile_cat: vec![cat("region", 5), cat("product", 7)],
        event_cat: vec![cat("event_type", 11), cat("merchant", 13)],
        event_num: vec![num("amount"), num("gap")],
        pre_len: 4,
        in_len: 6,
    }
}

/// A non-zero random f32 in ±[0.1, 10).
fn nonzero(rng: &mut ChaCha8Rng) -> f32 {
    let v: f32 = rng.gen_range(0.1..10.0);
    if rng.gen_bool(0.5) {
        v
    } else {
        -v
    }
}

fn events(rng: &mut ChaCha8Rng, s: &Schema, n: usize) -> (Vec<u32>, Vec<f32>) {
    let mut cat = Vec::new();
    let mut num = Vec::new();
    for _ in 0..n {
        for f in &s.event_cat {
            cat.push(rng.gen_range(1..f.vocab));
        }
        for _ in &s.event_num {
            num.push(nonzero(rng));
        }
    }
    (cat, num)
}

/// `n` random rows: lengths 0..=9 (some empty, some longer than the limits), non-zero values.
pub fn gen_rows(n: usize, seed: u64) -> Vec<GenRow> {
    let s = schema();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let n_pre = if rng.gen_bool(0.2) {
                0
            } else {
                rng.gen_range(1..=9)
            };
            let n_in = if rng.gen_bool(0.2) {
                0
            } else {
                rng.gen_range(1..=9)
            };
            let (pre_cat, pre_num) = events(&mut rng, &s, n_pre);
            let (in_cat, in_num) = events(&mut rng, &s, n_in);
            GenRow {
                label: rng.gen_range(0..=1),
                split: rng.gen_range(0..=2),
                user_id: format!("user-{i}-é{}", rng.gen_range(0..1000)),
                profile_num: s.profile_num.iter().map(|_| nonzero(&mut rng)).collect(),
                profile_cat: s
                    .profile_cat
                    .iter()
                    .map(|f| rng.gen_range(1..f.vocab))
                    .collect(),
                pre_cat,
                pre_num,
                in_cat,
                in_num,
            }
        })
        .collect()
}

/// Writes `rows` as a dataset in `dir`.
pub fn write(dir: &Path, rows: &[GenRow], opts: WriterOptions) -> Manifest {
    let (has_label, has_user_id) = (opts.has_label, opts.has_user_id);
    let mut w = DatasetWriter::create(dir, schema(), opts).expect("create writer");
    for r in rows {
        w.push(&RowData {
            label: has_label.then_some(r.label),
            split: r.split,
            user_id: has_user_id.then_some(r.user_id.as_str()),
            profile_num: &r.profile_num,
            profile_cat: &r.profile_cat,
            pre_cat: &r.pre_cat,
            pre_num: &r.pre_num,
            in_cat: &r.in_cat,
            in_num: &r.in_num,
        })
        .expect("push row");
    }
    w.finish().expect("finish writer")
}

/// Options: labels and user ids, `shard_rows` rows per shard.
pub fn opts(shard_rows: usize) -> WriterOptions {
    WriterOptions {
        shard_rows: Some(shard_rows),
        has_label: true,
        has_user_id: true,
        ..Default::default()
    }
}
