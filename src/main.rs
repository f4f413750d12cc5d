//! `mgkd-train`: the command-line front end of the MGKD engine.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The system allocator, counting the bytes of large allocations so that the CPU backends
/// can report their peak memory (`mgkd-train bench`).
#[global_allocator]
static HOST_MEMORY: mgkd::backend::host_memory::CountingAllocator =
    mgkd::backend::host_memory::CountingAllocator;

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
    /// Synthesise a small cohort, train teacher, plain and MGKD students, compare them.
    Quickstart(mgkd::cli::quickstart::QuickstartArgs),
    /// Generate a synthetic dataset in the §8 reference schema (model: docs/synth.md).
    Synth(mgkd::cli::synth::SynthArgs),
    /// Import CSV files (long or wide layout) into a dataset directory.
    Import(mgkd::cli::import::ImportArgs),
    /// Describe a dataset: splits, default rates, schema, sequence lengths, shards.
    Inspect(mgkd::cli::inspect::InspectArgs),
    /// Train a teacher on in-service behaviour (keeps the best validation-AUC checkpoint).
    Teacher(mgkd::cli::train::TeacherArgs),
    /// Train a student on pre-service data under a frozen teacher (MGKD, docs/model.md §5).
    Student(mgkd::cli::train::StudentArgs),
    /// Evaluate a checkpoint on a split: AUC, KS, log-loss, PR-AUC, approval and lift tables.
    Eval(mgkd::cli::eval::EvalArgs),
    /// Score a dataset with a checkpoint into a CSV (user_id, probability, logit).
    Predict(mgkd::cli::predict::PredictArgs),
    /// Compare two score files (predict's CSV) on a split's rows: both AUCs and DeLong's
    /// paired test of their difference.
    Compare(mgkd::cli::compare::CompareArgs),
    /// Export a student as an ONNX model (opset 17) for scoring outside the engine
    /// (docs/deploy.md).
    Export(mgkd::cli::export::ExportArgs),
    /// Population stability of new applicants against the training cohort: CSI of every
    /// profile field and of pre-service lengths, PSI and score bands with a model.
    Monitor(mgkd::cli::monitor::MonitorArgs),
    /// Paired ablation: per seed a teacher and seven students (or `--variants`), report with plots
    /// (docs/model.md §6.8).
    Ablation(mgkd::cli::ablation::AblationArgs),
    /// Search the student's settings (d, lr, epochs, ρ, α…τ) on the validation split, paired
    /// plain against full, and write the chosen ones as a --config TOML (docs/train.md).
    Tune(mgkd::cli::tune::TuneArgs),
    /// Time the training step (student, teacher) on padded and bucketed batches (docs/model.md §8
    /// by default).
    Bench(mgkd::cli::bench::BenchArgs),
    /// List the compute devices (CPU, CUDA) and why a CUDA device cannot be used.
    Devices(mgkd::cli::devices::DevicesArgs),
    /// Compile the CUDA kernels for an architecture into the on-disk kernel cache (needs NVRTC,
    /// not a GPU), so that later starts load them instead of compiling them.
    Kernels(mgkd::cli::kernels::KernelsArgs),
}

fn main() -> ExitCode {
    // SIGINT/SIGTERM remove the run's temporary files and exit 130/143 (mgkd::io::cleanup).
    if let Err(e) = mgkd::io::cleanup::install_signal_handler() {
        mgkd::noteln!("warning: {e}");
    }
    let cli = Cli::parse();
    let result: mgkd::Result<()> = match cli.command {
        Command::Quickstart(args) => mgkd::cli::quickstart::run(&args),
        Command::Synth(args) => mgkd::cli::synth::run(&args),
        Command::Import(args) => mgkd::cli::import::run(&args),
        Command::Inspect(args) => mgkd::cli::inspect::run(&args),
        Command::Teacher(args) => mgkd::cli::train::run_teacher(&args),
        Command::Student(args) => mgkd::cli::train::run_student(&args),
        Command::Eval(args) => mgkd::cli::eval::run(&args),
        Command::Predict(args) => mgkd::cli::predict::run(&args),
        Command::Compare(args) => mgkd::cli::compare::run(&args),
        Command::Export(args) => mgkd::cli::export::run(&args),
        Command::Monitor(args) => mgkd::cli::monitor::run(&args),
        Command::Ablation(args) => mgkd::cli::ablation::run(&args),
        Command::Tune(args) => mgkd::cli::tune::run(&args),
        Command::Bench(args) => mgkd::cli::bench::run(&args),
        Command::Devices(args) => mgkd::cli::devices::run(&args),
        Command::Kernels(args) => mgkd::cli::kernels::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `mgkd-train … | head`: the reader went away; stop quietly, as a program killed by
        // SIGPIPE would (mgkd::io::stdout).
        Err(e) if e.is_broken_pipe() => ExitCode::from(mgkd::io::stdout::BROKEN_PIPE_STATUS),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {e}");
            ExitCode::FAILURE
        }
    }
}
