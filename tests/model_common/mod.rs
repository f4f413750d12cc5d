//! Shared fixtures of the model tests: a small schema, hand-shaped batches, models with
//! randomised (not initial) parameters so every path carries a sizeable gradient.
#![allow(dead_code)]

use mgkd::backend::cpu::CpuBackend;
use mgkd::backend::Float;
use mgkd::data::{Batch, CatField, EventBatch, NumField, Schema};
use mgkd::model::params::Init;
use mgkd::model::{DeviceBatch, Model, ModelConfig, ParamTable, Role};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// Pre-service limit 4, in-service limit 6; 3 + 2 profile fields, 2 + 2 event fields.
pub fn schema() -> Schema {
    let num = |n: &str| NumField {
        name: n.into(),
        mean: 0.0,
        std: 1.0,
        log1p: false,
    };
    let cat = |n: &str, v| CatField {
        name: n.into(),
        vocab: v,
    };
    Schema {
        profile_num: vec![num("age"), num("income"), num("limit")],
        profile_cat: vec![cat("edu", 5), cat("region", 4)],
        event_cat: vec![cat("type", 6), cat("channel", 3)],
        event_num: vec![num("amount"), num("gap")],
        pre_len: 4,
        in_len: 6,
    }
}

fn events(rng: &mut ChaCha8Rng, s: &Schema, lens: &[u32]) -> EventBatch {
    let max_len = lens.iter().copied().max().unwrap_or(0) as usize;
    let rows = lens.len();
    let mut cat = vec![0u32; rows * max_len * s.e_cat()];
    let mut num = vec![0f32; rows * max_len * s.e_num()];
    for (r, &l) in lens.iter().enumerate() {
        for t in 0..l as usize {
            for (k, f) in s.event_cat.iter().enumerate() {
                cat[(r * max_len + t) * s.e_cat() + k] = rng.gen_range(0..f.vocab);
            }
            for k in 0..s.e_num() {
                num[(r * max_len + t) * s.e_num() + k] = rng.gen_range(-1.5..1.5);
            }
        }
    }
    EventBatch {
        max_len,
        lens: lens.to_vec(),
        cat,
        num,
    }
}

/// A batch with the given sequence lengths and labels (random contents from `seed`).
pub fn batch(seed: u64, pre: &[u32], ins: &[u32], labels: &[u8]) -> Batch {
    let s = schema();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let rows = labels.len();
    let profile_num = (0..rows * s.f_num())
        .map(|_| rng.gen_range(-1.5..1.5))
        .collect();
    let profile_cat = (0..rows)
        .flat_map(|_| s.profile_cat.iter().map(|f| f.vocab).collect::<Vec<_>>())
        .map(|v| rng.gen_range(0..v))
        .collect();
    Batch {
        rows,
        row_index: (0..rows as u64).collect(),
        labels: Some(labels.to_vec()),
        profile_num,
        profile_cat,
        pre: events(&mut rng, &s, pre),
        in_service: events(&mut rng, &s, ins),
    }
}

/// Five rows: an empty pre-service row, an empty in-service row, a full-length row of each.
pub fn batch5(seed: u64) -> Batch {
    batch(seed, &[0, 3, 4, 2, 1], &[5, 0, 6, 3, 2], &[1, 0, 1, 0, 0])
}

/// Randomised values for `table` (table order) around each tensor's initial kind:
/// weights/embeddings N(0, 0.35²), biases N(0, 0.1²), LN scales 1 + N(0, 0.2²). Values are
/// rounded through f32 so that f32 and f64 copies hold the same numbers.
pub fn random_values(table: &ParamTable, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    table.flat(|e, w: &mut [f64]| {
        let (mean, sd) = match e.init {
            Init::Normal => (0.0, 0.35),
            Init::Zeros => (0.0, 0.1),
            Init::Ones => (1.0, 0.2),
        };
        let nd = Normal::new(mean, sd).expect("normal");
        w.iter_mut()
            .for_each(|x| *x = nd.sample(&mut rng) as f32 as f64);
    })
}

/// A model of `role` (d = 8, 2 heads) with the parameters of [`random_values`].
pub fn model<F: Float>(
    role: Role,
    blocks: usize,
    seed: u64,
) -> (CpuBackend<F>, Model<CpuBackend<F>>) {
    let be = CpuBackend::<F>::new();
    let cfg = ModelConfig::new(role, &schema(), 8, 2, blocks, 3).expect("config");
    let mut m = Model::new(&be, cfg, seed).expect("model");
    let v: Vec<F> = random_values(&m.params.table, seed)
        .into_iter()
        .map(<F as Float>::from_f64)
        .collect();
    m.params.set_values(&be, &v).expect("values");
    (be, m)
}

/// The batch on the device.
pub fn upload<F: Float>(be: &CpuBackend<F>, b: &Batch) -> DeviceBatch<CpuBackend<F>> {
    DeviceBatch::upload(be, b, &schema()).expect("upload")
}
