//! Batch assembly throughput: writes a ~50,000-row dataset with the reference schema of
//! docs/model.md §8 (4 categorical event fields of vocab 64, 1024, 16, 168 + 2 numeric; 16
//! categorical profile fields of vocab 100 + 32 numeric; in-service limit 128, pre-service 32;
//! heavy-tailed log-normal sequence lengths), then times `Dataset::gather` on shuffled batches of
//! 1024 train rows and prints rows/s and GB/s (bytes of the produced `Batch` per second).
//!
//! Run: `cargo bench --bench batch_assembly` (`MGKD_BENCH_ROWS` overrides the row count,
//! `MGKD_BENCH_EPOCHS` the number of timed passes over the train split).

use std::time::Instant;

use mgkd::data::{
    Batch, CatField, Dataset, DatasetWriter, EpochOrder, NumField, RowData, Schema, WriterOptions,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal, StandardNormal};

fn schema() -> Schema {
    let cat = |name: String, vocab| CatField { name, vocab };
    let num = |name: String| NumField {
        name,
        mean: 0.0,
        std: 1.0,
        log1p: false,
    };
    Schema {
        profile_num: (0..32).map(|j| num(format!("pnum{j}"))).collect(),
        profile_cat: (0..16).map(|j| cat(format!("pcat{j}"), 100)).collect(),
        event_cat: [64, 1024, 16, 168]
            .iter()
            .enumerate()
            .map(|(j, &v)| cat(format!("ecat{j}"), v))
            .collect(),
        event_num: vec![num("amount".into()), num("gap".into())],
        pre_len: 32,
        in_len: 128,
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Bytes held by a batch's buffers.
fn batch_bytes(b: &Batch) -> usize {
    let ev = |e: &mgkd::data::EventBatch| 4 * (e.lens.len() + e.cat.len() + e.num.len());
    8 * b.row_index.len()
        + b.labels.as_ref().map_or(0, |l| l.len())
        + 4 * (b.profile_num.len() + b.profile_cat.len())
        + ev(&b.pre)
        + ev(&b.in_service)
}

fn main() -> mgkd::Result<()> {
    let n_rows = env_usize("MGKD_BENCH_ROWS", 50_000);
    let epochs = env_usize("MGKD_BENCH_EPOCHS", 10);
    let s = schema();
    let tmp = tempfile::tempdir().map_err(|e| mgkd::Error::io(std::env::temp_dir(), e))?;
    let dir = tmp.path().join("bench-ds");

    let t0 = Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    // Heavy-tailed lengths: log-normal, medians 8 (pre) and 60 (in), long right tails.
    let pre_len = LogNormal::new(8f64.ln(), 1.0).expect("valid log-normal");
    let in_len = LogNormal::new(60f64.ln(), 1.1).expect("valid log-normal");
    let mut w = DatasetWriter::create(
        &dir,
        s.clone(),
        WriterOptions {
            shard_bytes: 32 << 20,
            ..Default::default()
        },
    )?;
    let (mut pnum, mut pcat) = (Vec::new(), Vec::new());
    let (mut pre_cat, mut pre_num, mut in_cat, mut in_num) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let events = |n: usize, cat: &mut Vec<u32>, num: &mut Vec<f32>, rng: &mut ChaCha8Rng| {
        cat.clear();
        num.clear();
        for _ in 0..n {
            for f in &s.event_cat {
                cat.push(rng.gen_range(0..f.vocab));
            }
            for _ in &s.event_num {
                num.push(StandardNormal.sample(rng));
            }
        }
    };
    for _ in 0..n_rows {
        pnum.clear();
        pcat.clear();
        pnum.extend((0..s.f_num()).map(|_| -> f32 { StandardNormal.sample(&mut rng) }));
        pcat.extend(s.profile_cat.iter().map(|f| rng.gen_range(0..f.vocab)));
        let n_pre = (pre_len.sample(&mut rng) as usize).min(2000);
        let n_in = if rng.gen_bool(0.1) {
            0
        } else {
            (in_len.sample(&mut rng) as usize).min(5000)
        };
        events(n_pre, &mut pre_cat, &mut pre_num, &mut rng);
        events(n_in, &mut in_cat, &mut in_num, &mut rng);
        w.push(&RowData {
            label: Some(u8::from(rng.gen_bool(0.05))),
            split: if rng.gen_bool(0.7) {
                0
            } else {
                rng.gen_range(1..=2)
            },
            user_id: None,
            profile_num: &pnum,
            profile_cat: &pcat,
            pre_cat: &pre_cat,
            pre_num: &pre_num,
            in_cat: &in_cat,
            in_num: &in_num,
        })?;
    }
    let m = w.finish()?;
    let written: u64 = m.shards.iter().map(|s| s.bytes).sum();
    println!(
        "wrote {n_rows} rows in {} shards ({:.1} MiB) in {:.2} s",
        m.shards.len(),
        written as f64 / (1u64 << 20) as f64,
        t0.elapsed().as_secs_f64()
    );

    let t0 = Instant::now();
    let ds = Dataset::open(&dir)?;
    println!(
        "open + validate: {:.3} s ({:.2} GB/s of shard bytes)",
        t0.elapsed().as_secs_f64(),
        written as f64 / t0.elapsed().as_secs_f64() / 1e9
    );

    let train = ds.rows_of_split(0);
    // Warm-up pass (page cache, allocator).
    let warm = EpochOrder::new(&train, 1, 999);
    for b in warm.batches(1024)? {
        std::hint::black_box(ds.gather(b)?);
    }
    let (mut rows, mut bytes) = (0usize, 0usize);
    let t0 = Instant::now();
    for epoch in 0..epochs as u64 {
        let order = EpochOrder::new(&train, 7, epoch);
        for b in order.batches(1024)? {
            let batch = ds.gather(b)?;
            rows += batch.rows;
            bytes += batch_bytes(&batch);
            std::hint::black_box(&batch);
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "gather, batch 1024, {} threads: {rows} rows in {secs:.3} s = {:.0} rows/s, {:.2} GB/s of batch ({:.2} MB per batch)",
        rayon::current_num_threads(),
        rows as f64 / secs,
        bytes as f64 / secs / 1e9,
        bytes as f64 / rows as f64 * 1024.0 / 1e6
    );
    Ok(())
}
