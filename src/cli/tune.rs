//! `mgkd-train tune --data DIR --out TUNE_DIR [--trials 20] [--time 30m]`: random search of
//! the student's settings on the validation split ([`crate::train::tune`]). Writes, in
//! `TUNE_DIR`: `trials.jsonl` (one line per finished trial, synced as it finishes: what
//! `--resume` continues from), `teachers/` (one teacher checkpoint per width and seed),
//! `tuned.toml` (the settings of the full student with the best mean validation AUC, for
//! `student`/`ablation --config`), `tuned-plain.toml` (the same for the plain student),
//! `tune.json` and `report.md` (every trial, best first). Nothing reads the test split.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::cli::ablation::{command_line, read_log_lines};
use crate::cli::train::{in_pool, resolve, CoefArgs, FileConfig, HyperArgs, SwitchArgs, Widths};
use crate::data::writer::write_atomic;
use crate::data::Dataset;
use crate::io::output::{Input, OutputKind, OutputPath};
use crate::loss::LossConfig;
use crate::train::ablation::mean_std;
use crate::train::resume::Every;
use crate::train::tune::{run_tune, Range, SearchSpace, TrialResult, TuneConfig};
use crate::train::TrainConfig;
use crate::{Error, Result};

/// Arguments of `mgkd-train tune`.
#[derive(Debug, Clone, Args)]
pub struct TuneArgs {
    /// Dataset directory (its train split trains, its valid split scores; its test split is
    /// never read).
    #[arg(long)]
    pub data: PathBuf,
    /// Tuning directory (created): trials.jsonl, teachers/, tuned.toml, tuned-plain.toml,
    /// tune.json, report.md.
    #[arg(long)]
    pub out: PathBuf,
    /// Trials to run (the budget); each trains a plain and a full student per seed.
    #[arg(long, default_value_t = 20)]
    pub trials: u64,
    /// Time budget: start no trial after this much time (90s, 30m, 2h).
    #[arg(long, value_name = "TIME")]
    pub time: Option<Every>,
    /// Seeds per trial (0, 1, … N−1 after --first-seed); the trial's score is the mean of
    /// its students' best validation AUC over them.
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 0)]
    pub first_seed: u64,
    /// Seed of the draws (trial k draws the same settings whatever ran before it).
    #[arg(long, default_value_t = 0)]
    pub search_seed: u64,
    /// Widths d searched, comma-separated (one teacher per width and seed).
    #[arg(long, value_delimiter = ',', default_values_t = [16usize, 32])]
    pub widths: Vec<usize>,
    /// Learning-rate range of the students, `LO,HI` (log scale).
    #[arg(long, value_name = "LO,HI", default_value = "3e-4,3e-3")]
    pub lr_range: String,
    /// Range of the students' maximum epochs, `LO,HI` (early stopping on the valid split
    /// picks the epoch within it).
    #[arg(long, value_name = "LO,HI", default_value = "4,16")]
    pub epochs_range: String,
    /// Continue the interrupted search in `--out`: its finished trials are kept.
    #[arg(long)]
    pub resume: bool,
    /// Memory budget, in MiB, of each teacher's output cache (see `student --help`).
    #[arg(long, value_name = "MIB", default_value_t = crate::train::teacher_cache::DEFAULT_BUDGET_MIB)]
    pub teacher_cache_mib: u64,
    /// Print the chosen settings as JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// Settings of the teachers (every one) and the students' other settings (batch,
    /// patience, heads, blocks, d_cat, bucketing, device, threads); the students' d, lr,
    /// epochs, ρ and α…τ are searched (`--d` is refused: use --widths).
    #[command(flatten)]
    pub hyper: HyperArgs,
}

/// The file of finished trials, in the tuning directory.
pub const TRIALS_FILE: &str = "trials.jsonl";

/// The content of `tune.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuneFile {
    /// The dataset directory, as given.
    pub data: String,
    /// The search space.
    pub space: SearchSpace,
    /// Seed of the draws.
    pub search_seed: u64,
    /// Every finished trial, in trial order.
    pub trials: Vec<TrialResult>,
    /// The trial whose full student has the best mean validation AUC.
    pub best_full: u64,
    /// The trial whose plain student has the best mean validation AUC.
    pub best_plain: u64,
}

/// `LO,HI` of `flag`.
fn pair<T: std::str::FromStr>(flag: &str, s: &str) -> Result<(T, T)> {
    let bad = || Error::invalid(format!("{flag} {s}: expected LO,HI"));
    let (a, b) = s.split_once(',').ok_or_else(bad)?;
    Ok((
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    ))
}

/// The TOML `student`/`ablation --config` read: the base widths with `d`, the base
/// training settings with the trial's lr and epochs, the trial's coefficients, and in
/// `[teacher]` the settings the search trained its teachers with (`teacher`: optimisation and
/// loss), so that `ablation --config` trains the same teachers.
pub fn config_toml(
    w: &Widths,
    train: &TrainConfig,
    loss: &LossConfig,
    teacher: (&TrainConfig, &LossConfig),
    comment: &str,
) -> String {
    let (tt, tl) = teacher;
    let student = format!(
        "# {comment}\n\
         [model]\nd = {}\nheads = {}\nblocks = {}\nd_cat = {}\n\n\
         [train]\nepochs = {}\nbatch = {}\nlr = {:?}\npatience = {}\nbucket = {}\nwarmup = {:?}\n\
         weight_decay = {:?}\nclip = {:?}\n\n\
         [loss]\nalpha = {:?}\nbeta = {:?}\ngamma = {:?}\ndelta = {:?}\ntau = {:?}\nrho = {:?}\n\
         coarse_cosine = {}\n",
        w.d,
        w.heads,
        w.blocks,
        w.d_cat,
        train.epochs,
        train.batch,
        train.lr,
        train.patience,
        train.bucket,
        train.warmup,
        train.weight_decay,
        train.clip,
        loss.alpha,
        loss.beta,
        loss.gamma,
        loss.delta,
        loss.tau,
        loss.rho,
        loss.coarse_cosine
    );
    format!(
        "{student}\n# The settings this search trained its teachers with.\n\
         [teacher]\nepochs = {}\nbatch = {}\nlr = {:?}\npatience = {}\nbucket = {}\n\
         warmup = {:?}\nweight_decay = {:?}\nclip = {:?}\nrho = {:?}\nreweight = {}\n",
        tt.epochs,
        tt.batch,
        tt.lr,
        tt.patience,
        tt.bucket,
        tt.warmup,
        tt.weight_decay,
        tt.clip,
        tl.rho,
        tl.reweight
    )
}

/// Index of the trial with the largest `score`.
fn best_by(trials: &[TrialResult], score: impl Fn(&TrialResult) -> f64) -> usize {
    let mut best = 0;
    for (i, t) in trials.iter().enumerate() {
        if score(t) > score(&trials[best]) {
            best = i;
        }
    }
    best
}

/// The `ablation` command that measures the two chosen settings on the test split, the full
/// student against the plain student tuned on its own, paired by seed (`out`: the tuning
/// directory).
fn ablation_command(data: &str, out: &Path) -> String {
    let quote = |p: &Path| crate::cli::ablation::shell_quote(&p.display().to_string());
    format!(
        "mgkd-train ablation --data {} --out REPORT --variants full --config {} --plain-config {}",
        crate::cli::ablation::shell_quote(data),
        quote(&out.join("tuned.toml")),
        quote(&out.join("tuned-plain.toml"))
    )
}

/// `report.md` of a search: the command, every trial best first, and the `ablation` command
/// that measures the choice.
fn report_markdown(file: &TuneFile, command: &str, ablation: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# MGKD tuning (validation split only)\n");
    let _ = writeln!(s, "Command:\n\n```sh\n{command}\n```\n");
    let _ = writeln!(
        s,
        "Trials best first by the full student's mean best validation AUC over the seeds; \
         gain = full − plain, paired by seed (mean ± sample std, seeds improved). Chosen: \
         full trial {} (`tuned.toml`), plain trial {} (`tuned-plain.toml`).\n",
        file.best_full, file.best_plain
    );
    s.push_str("| trial | d | lr | epochs | ρ | α | β | γ | δ | τ | plain valid AUC | full valid AUC | gain | s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let mut order: Vec<&TrialResult> = file.trials.iter().collect();
    order.sort_by(|a, b| b.full_mean().total_cmp(&a.full_mean()));
    for t in order {
        let p = &t.params;
        let g = t.gains();
        let (gm, gs) = mean_std(&g);
        let _ = writeln!(
            s,
            "| {} | {} | {:.2e} | {} | {:.2} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} | {:.4} | {:.4} | {gm:+.4} ± {gs:.4} ({}/{}) | {:.0} |",
            t.trial,
            p.d,
            p.lr,
            p.epochs,
            p.rho,
            p.alpha,
            p.beta,
            p.gamma,
            p.delta,
            p.tau,
            t.plain_mean(),
            t.full_mean(),
            g.iter().filter(|&&x| x > 0.0).count(),
            g.len(),
            t.seconds
        );
    }
    let _ = writeln!(
        s,
        "\nThe two choices, measured by `ablation` on the rows this search never read: the \
         full student against the plain student tuned on its own, paired by seed (add \
         `--gbm` files of `tools/gbm.py` for the GBM rows):\n\n```sh\n{ablation}\n```"
    );
    s
}

/// `mgkd-train tune`.
pub fn run(args: &TuneArgs) -> Result<()> {
    let _out = OutputPath::prepare(
        "--out",
        &args.out,
        OutputKind::Dir,
        &[Input::dataset("--data", &args.data)],
    )?;
    if args.hyper.d.is_some() {
        return Err(Error::invalid(
            "tune searches the width: give the candidates with --widths, not --d",
        ));
    }
    crate::cli::bounds::check("--seeds", args.seeds, 1..=crate::cli::bounds::MAX_SEEDS, "")?;
    crate::cli::bounds::check("--trials", args.trials, 1..=100_000, "")?;
    let time = match args.time {
        None => None,
        Some(Every::Seconds(s)) => Some(std::time::Duration::from_secs(s)),
        Some(Every::Steps(_)) => {
            return Err(Error::invalid(
                "--time takes a time with its unit (90s, 30m, 2h)",
            ))
        }
    };
    let r = resolve(
        &FileConfig::from_flag(args.hyper.config.as_deref())?,
        &args.hyper,
        None,
        false,
        SwitchArgs::default(),
        &CoefArgs::default(),
        Widths::defaults(),
    )?;
    let (lr_lo, lr_hi) = pair("--lr-range", &args.lr_range)?;
    let space = SearchSpace {
        widths: args.widths.clone(),
        lr: Range {
            lo: lr_lo,
            hi: lr_hi,
            log: true,
        },
        epochs: pair("--epochs-range", &args.epochs_range)?,
        ..SearchSpace::default()
    };
    space.validate()?;
    let seeds: Vec<u64> = (0..args.seeds)
        .map(|k| {
            args.first_seed
                .checked_add(k)
                .ok_or_else(|| Error::invalid("--first-seed + --seeds overflows"))
        })
        .collect::<Result<_>>()?;
    let ds = Dataset::open(&args.data)?;
    crate::cli::train::require_in_service(&ds, "tuning (its teachers read in-service events)")?;
    let trials_file = args.out.join(TRIALS_FILE);
    let finished: Vec<TrialResult> = match (args.resume, trials_file.exists()) {
        (false, true) => {
            return Err(Error::invalid(format!(
                "{} lists the finished trials of an earlier search in this directory: continue \
                 it with --resume, or choose another --out",
                trials_file.display()
            )))
        }
        (true, false) => {
            return Err(Error::invalid(format!(
                "--resume: there is no search to continue ({} is missing)",
                trials_file.display()
            )))
        }
        (true, true) => read_log_lines(&trials_file)?,
        (false, false) => Vec::new(),
    };
    let teachers = args.out.join("teachers");
    std::fs::create_dir_all(&teachers).map_err(|e| Error::io(&teachers, e))?;
    let cfg = TuneConfig {
        space,
        trials: args.trials,
        time,
        seeds,
        search_seed: args.search_seed,
        widths: r.widths,
        train: r.train.clone(),
        loss: r.loss.clone(),
        teacher_train: r.teacher_train.clone(),
        teacher_loss: r.teacher_loss.clone(),
        teachers,
        data: args.data.clone(),
        teacher_cache: crate::cli::train::mib_bytes("--teacher-cache-mib", args.teacher_cache_mib)?,
        progress: !args.quiet && std::io::stderr().is_terminal(),
    };
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&trials_file)
        .map_err(|e| Error::io(&trials_file, e))?;
    let trials = in_pool(args.hyper.threads, || {
        crate::with_backend!(args.hyper.device, args.hyper.precision, be => run_tune(be, &ds, &cfg, &finished, |t| {
            use std::io::Write as _;
            let line = serde_json::to_string(t)
                .map_err(|e| Error::invalid(format!("trial to JSON: {e}")))?;
            writeln!(log, "{line}")
                .and_then(|()| log.sync_data())
                .map_err(|e| Error::io(&trials_file, e))?;
            crate::noteln!(
                "tune: trial {} (d {}, lr {:.2e}, {} epochs): valid AUC plain {:.4}, full {:.4}, {:.0} s",
                t.trial,
                t.params.d,
                t.params.lr,
                t.params.epochs,
                t.plain_mean(),
                t.full_mean(),
                t.seconds
            );
            Ok(())
        }))
    })?;
    if trials.is_empty() {
        return Err(Error::invalid(
            "tune: no trial finished within --time: give it more time",
        ));
    }
    write_outputs(args, &cfg, trials)
}

/// Writes tuned.toml, tuned-plain.toml, tune.json and report.md, and prints the choice.
fn write_outputs(args: &TuneArgs, cfg: &TuneConfig, trials: Vec<TrialResult>) -> Result<()> {
    use crate::train::ablation::Variant;
    use crate::train::tune::student_settings;
    let full = best_by(&trials, TrialResult::full_mean);
    let plain = best_by(&trials, TrialResult::plain_mean);
    let file = TuneFile {
        data: args.data.display().to_string(),
        space: cfg.space.clone(),
        search_seed: cfg.search_seed,
        best_full: trials[full].trial,
        best_plain: trials[plain].trial,
        trials,
    };
    let write_config = |name: &str, t: &TrialResult, variant: Variant| -> Result<()> {
        let (train, loss) = student_settings(cfg, &t.params, cfg.train.seed, variant);
        let w = Widths {
            d: t.params.d,
            ..cfg.widths
        };
        let comment = format!(
            "mgkd-train tune: trial {} ({} student), mean best validation AUC {:.4} over {} seeds",
            t.trial,
            variant.name(),
            match variant {
                Variant::Plain => t.plain_mean(),
                _ => t.full_mean(),
            },
            t.seeds.len()
        );
        let teacher = (&cfg.teacher_train, &cfg.teacher_loss);
        let text = config_toml(&w, &train, &loss, teacher, &comment);
        write_atomic(&args.out.join(name), text.as_bytes())
    };
    write_config("tuned.toml", &file.trials[full], Variant::Full)?;
    write_config("tuned-plain.toml", &file.trials[plain], Variant::Plain)?;
    let json = serde_json::to_string_pretty(&file)
        .map_err(|e| Error::invalid(format!("tune results to JSON: {e}")))?;
    write_atomic(&args.out.join("tune.json"), json.as_bytes())?;
    let command = command_line();
    let ablation = ablation_command(&file.data, &args.out);
    write_atomic(
        &args.out.join("report.md"),
        report_markdown(&file, &command, &ablation).as_bytes(),
    )?;
    let (f, p) = (&file.trials[full], &file.trials[plain]);
    if args.json {
        let v = serde_json::json!({"best_full": f, "best_plain": p});
        crate::outln!("{v}")?;
    } else {
        crate::outln!(
            "{} trials; full student: trial {} (valid AUC {:.4}) → {}; plain student: trial {} \
             (valid AUC {:.4}) → {}; report in {}; measure them with: {}",
            file.trials.len(),
            f.trial,
            f.full_mean(),
            args.out.join("tuned.toml").display(),
            p.trial,
            p.plain_mean(),
            args.out.join("tuned-plain.toml").display(),
            args.out.join("report.md").display(),
            ablation
        )?;
    }
    Ok(())
}
