//! `mgkd-train`: the command-line front end of the MGKD engine.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Multi-Granularity Knowledge Distillation for credit-default risk models.
///
/// Typical flow: `synth` or `import` a dataset, `inspect` it, then train a teacher on
/// in-service behaviour and a student on pre-service data under the teacher's guidance.
#[derive(Parser)]
#[command(name = "mgkd-train", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Import CSV files (long or wide layout) into a dataset directory.
    Import(mgkd::cli::import::ImportArgs),
    /// Describe a dataset: splits, default rates, schema, sequence lengths, shards.
    Inspect(mgkd::cli::inspect::InspectArgs),
    /// Generate a synthetic dataset in the §8 reference schema (model: docs/synth.md).
    Synth(mgkd::cli::synth::SynthArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: mgkd::Result<()> = match cli.command {
        Command::Import(args) => mgkd::cli::import::run(&args),
        Command::Inspect(args) => mgkd::cli::inspect::run(&args),
        Command::Synth(args) => mgkd::cli::synth::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
