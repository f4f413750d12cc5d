//! Throughput of the synthetic generator: users/s for generation alone (chunks generated in
//! parallel, kept in memory) and for generation + writing a dataset (shards, hashes,
//! manifest), at the §8 reference schema.
//!
//! `cargo bench --bench synth [-- USERS]` (default 200,000 users).

use std::time::Instant;

use mgkd::data::synth::{synthesize, Generator, SynthConfig, CHUNK_USERS};
use rayon::prelude::*;

fn main() {
    let users: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200_000);
    let cfg = SynthConfig {
        users,
        seed: 7,
        ..SynthConfig::default()
    };
    let gen = Generator::new(&cfg).expect("valid configuration");
    let chunk = CHUNK_USERS as u64;
    let start = Instant::now();
    let events: usize = (0..users.div_ceil(chunk))
        .into_par_iter()
        .map(|c| {
            let first = c * chunk;
            let ch = gen.generate_chunk(first, (users - first).min(chunk) as usize);
            ch.pre_offsets[ch.len()] + ch.in_offsets[ch.len()]
        })
        .sum();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "generation alone:   {users} users, {events} events in {secs:.3} s: {:.0} users/s ({} threads)",
        users as f64 / secs,
        rayon::current_num_threads()
    );

    let dir = tempfile::tempdir().expect("temporary directory");
    let out = dir.path().join("synth");
    let start = Instant::now();
    let manifest = synthesize(&out, &cfg).expect("synthesize");
    let secs = start.elapsed().as_secs_f64();
    let bytes: u64 = manifest.shards.iter().map(|s| s.bytes).sum();
    println!(
        "generation + write: {users} users, {} shards, {:.1} MiB in {secs:.3} s: {:.0} users/s",
        manifest.shards.len(),
        bytes as f64 / (1 << 20) as f64,
        users as f64 / secs
    );
}
