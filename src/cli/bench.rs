//! `mgkd-train bench`: times the whole training step (student and teacher) on the chosen
//! device in the reference configuration of docs/model.md §8 (or the flags'), on padded and
//! length-bucketed batches; prints a table, or with `--json` one JSON object with the fields that
//! `tools/torch_twin.py` writes, so `tools/bench_table.py` can set them side by side.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Precision};
use crate::cli::train::{in_pool, Device};
use crate::data::writer::write_atomic;
use crate::io::output::{OutputKind, OutputPath};
use crate::train::bench::{
    param_counts, run as run_bench, Batching, BenchConfig, BenchMode, BenchRow, BenchStage,
};
use crate::train::progress_bar;
use crate::{with_backend, Error, Result};

/// Arguments of `mgkd-train bench` (defaults: docs/model.md §8).
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Backend: auto (CUDA when one works, else CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// Storage type of activations and matrix inputs: f32 or bf16 (see `mgkd-train student
    /// --help`).
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    /// Steps to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "student,teacher")]
    pub stages: Vec<BenchStage>,
    /// How steps are issued, comma-separated: eager, graphs (CUDA graphs: each batch shape's
    /// step recorded once, then replayed). Default: eager,graphs on CUDA, eager on the CPU.
    #[arg(long, value_delimiter = ',')]
    pub modes: Option<Vec<BenchMode>>,
    /// Batch shapes, comma-separated: padded to the length limits, or length-bucketed.
    #[arg(long, value_delimiter = ',', default_value = "padded,bucketed")]
    pub batching: Vec<Batching>,
    /// Rows per batch.
    #[arg(long, default_value_t = 1024)]
    pub batch: usize,
    /// Model width d.
    #[arg(long, default_value_t = 128)]
    pub d: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Transformer blocks per encoder.
    #[arg(long, default_value_t = 2)]
    pub blocks: usize,
    /// Width of each profile embedding.
    #[arg(long, default_value_t = 16)]
    pub d_cat: usize,
    /// In-service length limit L.
    #[arg(long, default_value_t = 128)]
    pub in_len: usize,
    /// Pre-service length limit Lp.
    #[arg(long, default_value_t = 32)]
    pub pre_len: usize,
    /// Timed steps per row of the table.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Batches drawn and uploaded before timing (the steps cycle through them).
    #[arg(long, default_value_t = 8)]
    pub pool: usize,
    /// Seed of the batches and the initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Worker threads of the CPU backend (default: RAYON_NUM_THREADS or all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON object to this file (written whole, under a temporary name first).
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
}

/// The whole report (`--json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    /// `mgkd`.
    pub engine: String,
    /// The engine's version.
    pub version: String,
    /// The backend's name.
    pub device: String,
    /// The configuration measured.
    pub config: BenchConfig,
    /// Parameter counts.
    pub params: ParamCounts,
    /// One entry per (stage, batching).
    pub results: Vec<BenchRow>,
}

/// Parameter counts of the two networks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ParamCounts {
    /// Teacher.
    pub teacher: usize,
    /// Student.
    pub student: usize,
}

impl BenchArgs {
    /// Refuses sizes that could exhaust the machine, naming the flag.
    fn check_bounds(&self) -> Result<()> {
        use crate::cli::bounds::{check, MAX_BENCH_POOL, MAX_BENCH_STEPS};
        use crate::model::config::{MAX_BLOCKS, MAX_D, MAX_D_CAT, MAX_HEADS};
        check("--batch", self.batch, 1..=crate::train::MAX_BATCH, "")?;
        check("--d", self.d, 1..=MAX_D, "")?;
        check("--heads", self.heads, 1..=MAX_HEADS, "")?;
        check("--blocks", self.blocks, 1..=MAX_BLOCKS, "")?;
        check("--d-cat", self.d_cat, 1..=MAX_D_CAT, "")?;
        check("--in-len", self.in_len, 1..=4096, "")?;
        check("--pre-len", self.pre_len, 1..=4096, "")?;
        check("--steps", self.steps, 1..=MAX_BENCH_STEPS, "")?;
        check("--warmup", self.warmup, 0..=MAX_BENCH_STEPS, "")?;
        check("--pool", self.pool, 1..=MAX_BENCH_POOL, "")?;
        if let Some(n) = self.threads {
            crate::cli::bounds::check_threads(n)?;
        }
        Ok(())
    }

    fn config(&self) -> BenchConfig {
        BenchConfig {
            batch: self.batch,
            d: self.d,
            heads: self.heads,
            blocks: self.blocks,
            d_cat: self.d_cat,
            in_len: self.in_len,
            pre_len: self.pre_len,
            steps: self.steps,
            warmup: self.warmup,
            seed: self.seed,
            pool: self.pool,
        }
    }
}

fn measure<B: Backend>(be: &B, args: &BenchArgs, cfg: &BenchConfig) -> Result<BenchReport> {
    let (teacher, student) = param_counts(cfg)?;
    let show = !args.json && std::io::stderr().is_terminal();
    // Whether this backend records graphs: record nothing.
    let graphs_work = be.capture(&mut || Ok(()))?.is_some();
    let modes = match &args.modes {
        Some(m) => m.clone(),
        None if graphs_work => vec![BenchMode::Eager, BenchMode::Graphs],
        None => vec![BenchMode::Eager],
    };
    if modes.contains(&BenchMode::Graphs) && !graphs_work {
        return Err(Error::invalid(format!(
            "bench: {} cannot record graphs; use --modes eager",
            be.name()
        )));
    }
    let mut results = Vec::new();
    for &stage in &args.stages {
        for &batching in &args.batching {
            for &mode in &modes {
                let steps = (cfg.warmup + cfg.steps) as u64;
                let prefix = format!("{stage:?} {batching:?} {mode:?}").to_lowercase();
                let bar = progress_bar(show, steps, prefix);
                let mut tick = |done: usize, _total: usize| bar.set_position(done as u64);
                results.push(run_bench(be, cfg, stage, batching, mode, &mut tick)?);
                bar.finish_and_clear();
            }
        }
    }
    Ok(BenchReport {
        engine: "mgkd".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        device: be.name(),
        config: cfg.clone(),
        params: ParamCounts { teacher, student },
        results,
    })
}

/// Prints the report as a table.
fn print_table(r: &BenchReport) -> Result<()> {
    let c = &r.config;
    crate::outln!(
        "device {} · batch {} · d {} · {} heads · {} blocks · L {} · Lp {} · median of {} steps after {}",
        r.device, c.batch, c.d, c.heads, c.blocks, c.in_len, c.pre_len, c.steps, c.warmup
    )?;
    crate::outln!(
        "params: teacher {}, student {}",
        r.params.teacher,
        r.params.student
    )?;
    crate::outln!(
        "{:<8} {:<9} {:<7} {:>10} {:>9} {:>9} {:>9} {:>8} {:>10} {:>10} {:>7} {:>9} {:>8}",
        "step",
        "batches",
        "mode",
        "samples/s",
        "ms/step",
        "p10",
        "p90",
        "TFLOP/s",
        "peak MiB",
        "arena MiB",
        "allocs",
        "launches",
        "padding"
    )?;
    let mib = |b: Option<u64>| {
        b.map_or("—".to_string(), |b| {
            format!("{:.0}", b as f64 / 1048576.0)
        })
    };
    for x in &r.results {
        crate::outln!(
            "{:<8} {:<9} {:<7} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>8.2} {:>10} {:>10} {:>7} {:>9} {:>7.0}%",
            format!("{:?}", x.stage).to_lowercase(),
            format!("{:?}", x.batching).to_lowercase(),
            format!("{:?}", x.mode).to_lowercase(),
            x.samples_per_s,
            x.ms_per_step,
            x.ms_p10,
            x.ms_p90,
            x.tflops,
            mib(x.peak_mem_bytes),
            mib(x.arena_bytes),
            x.arena_misses.map_or("—".to_string(), |m| m.to_string()),
            x.launches_per_step
                .map_or("—".to_string(), |l| format!("{l:.0}")),
            100.0 * x.padding
        )?;
    }
    crate::outln!(
        "allocs: buffer requests of the timed steps that the activation arena could not serve; \
         launches: device operations per step (kernels, library products, copies, fills)"
    )?;
    Ok(())
}

/// `mgkd-train bench`.
pub fn run(args: &BenchArgs) -> Result<()> {
    let cfg = args.config();
    if args.stages.is_empty() || args.batching.is_empty() {
        return Err(Error::invalid("bench: no stage or no batching chosen"));
    }
    args.check_bounds()?;
    let _out = args
        .out
        .as_ref()
        .map(|p| OutputPath::prepare("--out", p, OutputKind::File, &[]))
        .transpose()?;
    let report = in_pool(
        args.threads,
        || with_backend!(args.device, args.precision, be => measure(be, args, &cfg)),
    )?;
    let json = serde_json::to_string_pretty(&report)
        .map_err(|e| Error::invalid(format!("bench report to JSON: {e}")))?;
    if let Some(p) = &args.out {
        write_atomic(p, json.as_bytes())?;
    }
    if args.json {
        crate::outln!("{json}")?;
    } else {
        print_table(&report)?;
    }
    Ok(())
}
