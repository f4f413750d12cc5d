//! One student training step on the CPU backend (f32) in the reference configuration of
//! docs/model.md §8: teacher forward + student forward/backward with all five losses + AdamW, batch
//! 256 of random rows with heavy-tailed (log-normal) sequence lengths. Prints the median of 5 timed
//! steps after 2 warm-up steps, in samples/s.
//!
//! Run: `RAYON_NUM_THREADS=2 cargo bench --bench cpu_step`.

use std::time::Instant;

use mgkd::backend::cpu::CpuBackend;
use mgkd::data::{Batch, CatField, EventBatch, NumField, Schema};
use mgkd::loss::{class_weights, student_objective, LossConfig};
use mgkd::model::{DeviceBatch, Model, ModelConfig, Role, Teacher};
use mgkd::optim::{AdamWConfig, Optimizer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal};

const BATCH: usize = 256;

fn schema() -> Schema {
    let num = |i: usize| NumField {
        name: format!("n{i}"),
        mean: 0.0,
        std: 1.0,
        log1p: false,
    };
    let cat = |i: usize, vocab: u32| CatField {
        name: format!("c{i}"),
        vocab,
    };
    Schema {
        profile_num: (0..32).map(num).collect(),
        profile_cat: (0..16).map(|i| cat(i, 100)).collect(),
        event_cat: [64, 1024, 16, 168]
            .iter()
            .enumerate()
            .map(|(i, &v)| cat(i, v))
            .collect(),
        event_num: (0..2).map(num).collect(),
        pre_len: 32,
        in_len: 128,
    }
}

/// Log-normal lengths (median `median`), capped at `limit`: many short sequences, a few
/// at the limit, some empty.
fn events(rng: &mut ChaCha8Rng, s: &Schema, median: f64, limit: usize) -> EventBatch {
    let dist = LogNormal::new(median.ln(), 1.0).expect("log-normal");
    let lens: Vec<u32> = (0..BATCH)
        .map(|_| (dist.sample(rng) as usize).min(limit) as u32)
        .collect();
    let max_len = lens.iter().copied().max().unwrap_or(0) as usize;
    let mut cat = vec![0u32; BATCH * max_len * s.e_cat()];
    let mut num = vec![0f32; BATCH * max_len * s.e_num()];
    for (r, &l) in lens.iter().enumerate() {
        for t in 0..l as usize {
            let slot = r * max_len + t;
            for (k, f) in s.event_cat.iter().enumerate() {
                cat[slot * s.e_cat() + k] = rng.gen_range(0..f.vocab);
            }
            for k in 0..s.e_num() {
                num[slot * s.e_num() + k] = rng.gen_range(-2.0..2.0);
            }
        }
    }
    EventBatch {
        max_len,
        lens,
        cat,
        num,
    }
}

fn batch(s: &Schema) -> Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let labels: Vec<u8> = (0..BATCH).map(|_| u8::from(rng.gen_bool(0.2))).collect();
    Batch {
        rows: BATCH,
        row_index: (0..BATCH as u64).collect(),
        labels: Some(labels),
        profile_num: (0..BATCH * 32).map(|_| rng.gen_range(-2.0..2.0)).collect(),
        profile_cat: (0..BATCH * 16).map(|_| rng.gen_range(0..100)).collect(),
        pre: events(&mut rng, s, 6.0, 32),
        in_service: events(&mut rng, s, 24.0, 128),
    }
}

fn main() -> mgkd::Result<()> {
    let be = CpuBackend::<f32>::new();
    let s = schema();
    let teacher = Model::new(&be, ModelConfig::with_defaults(Role::Teacher, &s)?, 1)?;
    let mut student = Model::new(&be, ModelConfig::with_defaults(Role::Student, &s)?, 2)?;
    let b = batch(&s);
    let db = DeviceBatch::upload(&be, &b, &s)?;
    let cw = class_weights(800, 200, 0.5, true)?;
    let loss = LossConfig::default();
    let mut opt = Optimizer::new(AdamWConfig::default());
    let mut times = Vec::new();
    for i in 0..7 {
        let t0 = Instant::now();
        student.params.zero_grads(&be);
        let l = student_objective(
            &be,
            &loss,
            cw,
            Teacher::live(&teacher),
            &mut student,
            &db,
            true,
        )?;
        opt.step(&be, &mut student.params, 1e-4)?;
        let dt = t0.elapsed().as_secs_f64();
        eprintln!("step {i}: {dt:.3} s, loss {:.4}", l.total);
        if i >= 2 {
            times.push(dt);
        }
    }
    times.sort_by(f64::total_cmp);
    let fill = |e: &EventBatch| {
        let valid: u64 = e.lens.iter().map(|&l| u64::from(l)).sum();
        valid as f64 / (BATCH * e.max_len.max(1)) as f64
    };
    let median = times[times.len() / 2];
    println!(
        "cpu_step (f32, batch {BATCH}, L=128, Lp=32, d=128, 4 heads, 2 blocks, {} threads): \
         median {median:.3} s/step, {:.1} samples/s (pre max_len {}, in max_len {}; \
         valid slots {:.0} % / {:.0} % of the padded pre / in tensors)",
        rayon::current_num_threads(),
        BATCH as f64 / median,
        b.pre.max_len,
        b.in_service.max_len,
        100.0 * fill(&b.pre),
        100.0 * fill(&b.in_service)
    );
    Ok(())
}
