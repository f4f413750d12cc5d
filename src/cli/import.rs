//! `mgkd-train import`: builds a dataset directory from CSV files described by a TOML config
//! (format in `docs/import.md`).

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use crate::data::import;
use crate::io::output::{Input, OutputKind, OutputPath};
use crate::Result;

/// Arguments of `mgkd-train import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The import config (TOML); relative paths inside it are resolved against its directory.
    #[arg(long)]
    pub config: PathBuf,
    /// Output dataset directory (created if missing; must not already hold a dataset).
    #[arg(long)]
    pub out: PathBuf,
    /// Close a shard after this many rows (default: shards of about 256 MiB).
    #[arg(long)]
    pub shard_rows: Option<usize>,
}

/// Runs the import and prints a summary.
pub fn run(args: &ImportArgs) -> Result<()> {
    let start = Instant::now();
    let config = import::ImportConfig::load(&args.config)?;
    let inputs: Vec<Input<'_>> = config
        .encoding_from
        .iter()
        .map(|d| Input::dataset("encoding_from", d))
        .collect();
    let _out = OutputPath::prepare("--out", &args.out, OutputKind::Dir, &inputs)?;
    let summary = import::import_config(&config, &args.out, args.shard_rows)?;
    for w in &summary.warnings {
        eprintln!("warning: {w}");
    }
    let m = &summary.manifest;
    let events = |f: fn(&crate::data::ShardInfo) -> u64| m.shards.iter().map(f).sum::<u64>();
    crate::outln!(
        "imported {} rows into {} ({} shard(s)): {} pre-service and {} in-service events",
        m.rows,
        args.out.display(),
        m.shards.len(),
        events(|s| s.pre_events),
        events(|s| s.in_events),
    )?;
    for s in &m.splits {
        if m.has_label {
            crate::outln!(
                "  {:<5} {:>9} rows, {:>8} defaults ({:.2}%)",
                s.name,
                s.rows,
                s.positives,
                100.0 * s.default_rate
            )?;
        } else {
            crate::outln!("  {:<5} {:>9} rows", s.name, s.rows)?;
        }
    }
    if summary.dropped_events > 0 {
        crate::outln!(
            "  {} events after the in-service window were dropped",
            summary.dropped_events
        )?;
    }
    crate::outln!("done in {:.2} s", start.elapsed().as_secs_f64())?;
    Ok(())
}
