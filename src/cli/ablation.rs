//! `mgkd-train ablation --data DIR --out REPORT_DIR [--seeds 5]`: the paired ablation of
//! docs/model.md §6.8 ([`crate::train::ablation`]) and its report: `results.json` (every run),
//! `report.md` (per variant mean ± std of test AUC and KS, and of the paired difference to
//! the plain student with the count of seeds improved; the teacher's row; the command),
//! SVG plots (`roc.svg`, `ks.svg`, `training.svg`) and the checkpoints of every run under
//! `REPORT_DIR/checkpoints/` (unless `--no-checkpoints`).

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::cli::gbm::{gbm_markdown, GbmResults};
use crate::cli::train::{
    in_pool, resolve, CoefArgs, FileConfig, HyperArgs, Resolved, SwitchArgs, Widths,
};
use crate::data::writer::write_atomic;
use crate::data::Dataset;
use crate::io::output::{Input, OutputKind, OutputPath};
use crate::metrics;
use crate::train::ablation::{
    run_ablation, summarize, AblationConfig, AblationOutcome, AblationResume, PlainSettings,
    RunResult, Variant, VariantSummary, TEACHER,
};
use crate::{Error, Result};

/// Arguments of `mgkd-train ablation`.
#[derive(Debug, Clone, Args)]
pub struct AblationArgs {
    /// Dataset directory (its own train/valid/test split is used by every run).
    #[arg(long)]
    pub data: PathBuf,
    /// Report directory (created): results.json, report.md, plots, checkpoints/.
    #[arg(long)]
    pub out: PathBuf,
    /// Number of seeds (0, 1, …, N−1); each trains one teacher and a student per variant.
    #[arg(long, default_value_t = 5)]
    pub seeds: u64,
    /// Student variants to train, comma-separated, from plain, soft, coarse, fine, self,
    /// full, full-no-reweight (default: all seven); plain, the baseline of every paired
    /// difference, is always trained (added when not listed).
    #[arg(long, value_delimiter = ',', value_parser = parse_variant)]
    pub variants: Vec<Variant>,
    /// First seed.
    #[arg(long, default_value_t = 0)]
    pub first_seed: u64,
    /// Do not keep the checkpoints (such an ablation writes no resume checkpoints and cannot
    /// be resumed).
    #[arg(long)]
    pub no_checkpoints: bool,
    /// Continue the interrupted ablation in `--out`: the runs it finished (listed in
    /// `runs.jsonl`) are kept, an unfinished one continues from its resume checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// How often, within an epoch, each run writes its resume checkpoint
    /// (`checkpoints/seed{S}-{variant}.safetensors.resume.safetensors`): N optimiser steps,
    /// or a time of training (90s, 5m, 1h); also at every epoch end.
    #[arg(long, value_name = "N|TIME", default_value_t = crate::train::resume::DEFAULT_EVERY)]
    pub checkpoint_every: crate::train::resume::Every,
    /// Memory budget, in MiB, for each seed's teacher outputs on the train rows, computed
    /// once and shared by every student of that seed (see `student --help`); 0 turns the
    /// cache off (results are the same either way).
    #[arg(long, value_name = "MIB", default_value_t = crate::train::teacher_cache::DEFAULT_BUDGET_MIB)]
    pub teacher_cache_mib: u64,
    /// A `tools/gbm.py` result file made on this dataset (LightGBM on per-user aggregates
    /// of the student's or the teacher's inputs): shown beside the students in report.md
    /// and results.json. Repeatable; checked before any training.
    #[arg(long, value_name = "FILE")]
    pub gbm: Vec<PathBuf>,
    /// TOML file with the plain student's own settings (`[model]`, `[train]`, `[loss]` ρ),
    /// e.g. `tune`'s `tuned-plain.toml` beside `--config tuned.toml`: every paired
    /// difference is then against a plain student tuned on its own (same seeds and split).
    /// Flags override it as they override --config; its `[teacher]` section is not read.
    #[arg(long, value_name = "FILE")]
    pub plain_config: Option<PathBuf>,
    /// Print the summary as JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// Model and training settings (as for `teacher`/`student`).
    #[command(flatten)]
    pub hyper: HyperArgs,
    /// Loss coefficients (the loss switches are set by each variant).
    #[command(flatten)]
    pub coefs: CoefArgs,
}

/// A variant from its name (`--variants`).
fn parse_variant(name: &str) -> std::result::Result<Variant, String> {
    Variant::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = Variant::ALL.iter().map(|v| v.name()).collect();
        format!("unknown variant '{name}' (one of: {})", names.join(", "))
    })
}

/// The content of `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultsFile {
    /// The command line that produced it.
    pub command: String,
    /// The dataset directory, as given.
    pub data: String,
    /// Seeds run.
    pub seeds: Vec<u64>,
    /// Wall-clock seconds of the whole ablation.
    pub seconds: f64,
    /// One row per run (per seed: teacher, then the students).
    pub runs: Vec<RunResult>,
    /// The summary (as in report.md).
    pub summary: Vec<VariantSummary>,
    /// The `--gbm` result files shown beside the students.
    #[serde(default)]
    pub gbm: Vec<GbmResults>,
    /// The `--plain-config` file the plain student's settings came from, as given (absent:
    /// the plain student trained with the other students' settings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plain_config: Option<String>,
}

/// `arg` as one POSIX shell word: unchanged when it is made of safe characters, else in
/// single quotes.
pub fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,+".contains(c))
    {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// The command line, shell-quoted where needed.
pub fn command_line() -> String {
    std::env::args()
        .map(|a| shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The resolved settings: the same defaults ← file ← flags rules as `teacher`/`student`.
fn settings(args: &AblationArgs) -> Result<Resolved> {
    settings_of(&FileConfig::from_flag(args.hyper.config.as_deref())?, args)
}

/// `file`'s settings under the command line's flags (flags over the file over the defaults).
fn settings_of(file: &FileConfig, args: &AblationArgs) -> Result<Resolved> {
    resolve(
        file,
        &args.hyper,
        None,
        false,
        SwitchArgs::default(),
        &args.coefs,
        Widths::defaults(),
    )
}

/// The plain student's settings from `--plain-config`, by the same rules as [`settings`];
/// `None` without the flag.
fn plain_settings(args: &AblationArgs) -> Result<Option<PlainSettings>> {
    let Some(path) = &args.plain_config else {
        return Ok(None);
    };
    let file = FileConfig {
        flag: Some("--plain-config"),
        ..FileConfig::load(path)?
    };
    let r = settings_of(&file, args)?;
    Ok(Some(PlainSettings {
        widths: r.widths,
        train: r.train,
        loss: r.loss,
    }))
}

/// A p-value to three decimals, or in scientific notation below 0.001.
fn fmt_p(p: f64) -> String {
    if p >= 1e-3 {
        format!("{p:.3}")
    } else {
        format!("{p:.1e}")
    }
}

fn fmt_pm(mean: f64, std: f64) -> String {
    format!("{mean:.4} ± {std:.4}")
}

fn fmt_diff(variant: &str, m: &crate::train::ablation::MetricSummary, seeds: usize) -> String {
    if variant == Variant::Plain.name() {
        return "baseline".to_string();
    }
    match (m.diff_mean, m.diff_std, m.improved) {
        (Some(d), Some(s), Some(k)) => format!("{d:+.4} ± {s:.4} ({k}/{seeds})"),
        _ => "—".to_string(),
    }
}

/// The table label of a run (`teacher` or a [`Variant::name`]).
pub fn label_of(name: &str) -> &str {
    if name == TEACHER {
        "teacher (in-service)"
    } else {
        Variant::from_name(name).map_or(name, |v| v.label())
    }
}

/// The summary table as Markdown; its last column counts the seeds on which a student's
/// test AUC is above / below the plain student's by DeLong's paired test.
pub fn summary_markdown(summary: &[VariantSummary]) -> String {
    let mut s = String::new();
    s.push_str("| model | seeds | test AUC | ΔAUC vs plain (improved) | test KS | ΔKS vs plain (improved) | seeds above / below plain, DeLong p < 0.05 | valid AUC, best epoch | Δvalid AUC vs plain (improved) |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for v in summary {
        let significant = match (v.variant == Variant::Plain.name(), v.significant) {
            (true, _) => "baseline".to_string(),
            (false, Some([above, below])) => format!("{above} / {below}"),
            (false, None) => "—".to_string(),
        };
        let (valid, valid_diff) = match &v.valid_auc {
            Some(m) => (fmt_pm(m.mean, m.std), fmt_diff(&v.variant, m, v.seeds)),
            None => ("—".to_string(), "—".to_string()),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {significant} | {valid} | {valid_diff} |",
            label_of(&v.variant),
            v.seeds,
            fmt_pm(v.auc.mean, v.auc.std),
            fmt_diff(&v.variant, &v.auc, v.seeds),
            fmt_pm(v.ks.mean, v.ks.std),
            fmt_diff(&v.variant, &v.ks, v.seeds),
        );
    }
    s
}

fn report_markdown(file: &ResultsFile, ds: &Dataset) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# MGKD ablation\n");
    let _ = writeln!(s, "Command:\n\n```sh\n{}\n```\n", file.command);
    let m = ds.manifest();
    let _ = writeln!(
        s,
        "Dataset `{}`: {} rows; test split {} rows. Seeds {:?}; {:.0} s in all.\n",
        file.data,
        m.rows,
        ds.rows_of_split(crate::train::TEST).len(),
        file.seeds,
        file.seconds
    );
    // The teachers' settings and the students' (the last student of the first seed: its
    // switches are that variant's).
    fn json<T: Serialize>(v: &T) -> String {
        serde_json::to_string(v).unwrap_or_default()
    }
    let seed = file.runs.first().map(|r| r.seed);
    let first_seed: Vec<&RunResult> = file.runs.iter().filter(|r| Some(r.seed) == seed).collect();
    let teacher = first_seed.iter().find(|r| r.variant == TEACHER);
    let student = first_seed.iter().rev().find(|r| r.variant != TEACHER);
    if let Some(r) = teacher.or(student) {
        let _ = writeln!(
            s,
            "Settings (seed per run): model {}; activations in {} (docs/model.md §7).\n",
            json(&r.config.model),
            r.config.precision,
        );
    }
    if let Some(t) = teacher {
        let _ = writeln!(
            s,
            "- teachers: train {}, ρ {}, re-weighting {};",
            json(&t.config.train),
            t.config.loss.rho,
            if t.config.loss.reweight { "on" } else { "off" },
        );
    }
    let plain = first_seed
        .iter()
        .find(|r| r.variant == Variant::Plain.name());
    if let Some(r) = student {
        let _ = writeln!(
            s,
            "- students: train {}, loss {} (the {} student's; the switches are set per \
             variant){}",
            json(&r.config.train),
            json(&r.config.loss),
            r.variant,
            if file.plain_config.is_some() {
                ";"
            } else {
                ".\n"
            },
        );
    }
    if let (Some(path), Some(p)) = (&file.plain_config, plain) {
        let _ = writeln!(
            s,
            "- the plain student, from `{path}`: model {}, train {}, ρ {}, re-weighting {}.\n",
            json(&p.config.model),
            json(&p.config.train),
            p.config.loss.rho,
            if p.config.loss.reweight { "on" } else { "off" },
        );
    }
    let baseline = match file.plain_config {
        None => "same split, teacher, initialisation seed and batch order",
        Some(_) => {
            "trained with its own settings, given above; same split and initialisation seed, \
             and the same batch order where its batch size is the others'"
        }
    };
    let _ = writeln!(
        s,
        "Test-split metrics, mean ± sample std over seeds. Δ columns: the paired difference to \
         the plain student of the same seed ({baseline}), mean ± sample std over seeds, and in \
         brackets the number of seeds on which the variant beat plain.\n"
    );
    s.push_str(
        "The last column tests each seed's difference on the test rows themselves: DeLong's \
         paired test of the two AUCs (the student's and the plain student's scores of the \
         same rows), two-sided, p < 0.05; per run below. The validation columns read each \
         run's best epoch, the one early stopping kept (so they lean a little high).\n\n",
    );
    s.push_str(&summary_markdown(&file.summary));
    s.push_str(&gbm_markdown(&file.gbm, &file.summary));
    s.push_str("\nPer run:\n\n| model | seed | AUC | KS | log-loss | PR-AUC | best epoch | epochs | s | AUC − plain ± SE (DeLong), p |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for r in &file.runs {
        let vs_plain = r.vs_plain.map_or("—".to_string(), |c| {
            format!("{:+.4} ± {:.4}, p {}", c.diff, c.se, fmt_p(c.p))
        });
        let _ = writeln!(
            s,
            "| {} | {} | {:.4} | {:.4} | {:.4} | {:.4} | {} | {} | {:.1} | {vs_plain} |",
            r.variant,
            r.seed,
            r.test_auc,
            r.test_ks,
            r.test_log_loss,
            r.test_pr_auc,
            r.best_epoch,
            r.epochs_run,
            r.seconds
        );
    }
    s.push_str("\nPlots: `roc.svg`, `ks.svg` (teacher, plain and full students, first seed, test split), `training.svg` (validation AUC per epoch, first seed).\n");
    s
}

fn plot_err(file: &Path, e: impl std::fmt::Display) -> Error {
    Error::invalid(format!("{}: plotting failed: {e}", file.display()))
}

const COLORS: [RGBColor; 8] = [
    RGBColor(0, 0, 0),
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];

/// Draws `series` (name, points) into an SVG file at `path`.
fn line_plot(
    path: &Path,
    title: &str,
    (xl, yl): (&str, &str),
    (x0, x1, y0, y1): (f64, f64, f64, f64),
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 540)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| plot_err(path, e))?;
        chart
            .configure_mesh()
            .x_desc(xl)
            .y_desc(yl)
            .draw()
            .map_err(|e| plot_err(path, e))?;
        for (k, (name, pts)) in series.iter().enumerate() {
            let color = COLORS[k % COLORS.len()];
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(|e| plot_err(path, e))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(|e| plot_err(path, e))?;
        root.present().map_err(|e| plot_err(path, e))?;
    }
    write_atomic(path, svg.as_bytes())
}

fn write_plots(dir: &Path, outcome: &AblationOutcome) -> Result<()> {
    let c = &outcome.curves;
    let mut roc = Vec::new();
    let mut ks = Vec::new();
    for (name, p) in &c.models {
        let r = metrics::roc_curve(p, &c.labels)?;
        roc.push((
            format!(
                "{} (AUC {:.3})",
                label_of(name),
                metrics::auc(p, &c.labels)?
            ),
            r.fpr.iter().copied().zip(r.tpr.iter().copied()).collect(),
        ));
        let k = metrics::ks_curve(p, &c.labels)?;
        ks.push((
            format!("{} (KS {:.3})", label_of(name), k.ks),
            k.flagged_share
                .iter()
                .zip(k.tpr.iter().zip(&k.fpr))
                .map(|(&x, (&t, &f))| (x, t - f))
                .collect(),
        ));
    }
    roc.push(("chance".to_string(), vec![(0.0, 0.0), (1.0, 1.0)]));
    line_plot(
        &dir.join("roc.svg"),
        &format!("ROC, test split, seed {}", c.seed),
        ("false-positive rate", "true-positive rate"),
        (0.0, 1.0, 0.0, 1.0),
        &roc,
    )?;
    line_plot(
        &dir.join("ks.svg"),
        &format!("KS curve (TPR − FPR), test split, seed {}", c.seed),
        ("share flagged (highest scores)", "TPR − FPR"),
        (0.0, 1.0, 0.0, 1.0),
        &ks,
    )?;
    let first: Vec<&RunResult> = outcome.runs.iter().filter(|r| r.seed == c.seed).collect();
    let max_epochs = first
        .iter()
        .map(|r| r.valid_auc.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let series: Vec<(String, Vec<(f64, f64)>)> = first
        .iter()
        .map(|r| {
            (
                label_of(&r.variant).to_string(),
                r.valid_auc
                    .iter()
                    .enumerate()
                    .map(|(e, &a)| ((e + 1) as f64, a))
                    .collect(),
            )
        })
        .collect();
    let lo = first
        .iter()
        .flat_map(|r| r.valid_auc.iter().copied())
        .fold(1.0f64, f64::min);
    let hi = first
        .iter()
        .flat_map(|r| r.valid_auc.iter().copied())
        .fold(0.0f64, f64::max);
    line_plot(
        &dir.join("training.svg"),
        &format!("Validation AUC per epoch, seed {}", c.seed),
        ("epoch", "validation AUC"),
        (
            1.0,
            max_epochs as f64,
            (lo - 0.01).max(0.0),
            (hi + 0.01).min(1.0),
        ),
        &series,
    )
}

/// Runs the ablation and writes the report (library entry of `mgkd-train ablation`).
pub fn ablation_in(args: &AblationArgs) -> Result<ResultsFile> {
    let start = Instant::now();
    let r = settings(args)?;
    crate::cli::bounds::check("--seeds", args.seeds, 1..=crate::cli::bounds::MAX_SEEDS, "")?;
    let seeds: Vec<u64> = (0..args.seeds)
        .map(|k| {
            args.first_seed
                .checked_add(k)
                .ok_or_else(|| Error::invalid("--first-seed + --seeds overflows"))
        })
        .collect::<Result<_>>()?;
    let mut variants = if args.variants.is_empty() {
        Variant::ALL.to_vec()
    } else {
        args.variants.clone()
    };
    if !variants.contains(&Variant::Plain) {
        variants.insert(0, Variant::Plain);
    }
    let ck = (!args.no_checkpoints).then(|| args.out.join("checkpoints"));
    let cfg = AblationConfig {
        seeds: seeds.clone(),
        variants,
        widths: r.widths,
        train: r.train,
        loss: r.loss,
        teacher_train: r.teacher_train,
        teacher_loss: r.teacher_loss,
        checkpoints: ck,
        data: args.data.clone(),
        progress: !args.quiet && std::io::stderr().is_terminal(),
        resume: None,
        teacher_cache: crate::cli::train::mib_bytes("--teacher-cache-mib", args.teacher_cache_mib)?,
        plain: plain_settings(args)?,
    };
    cfg.validate()?;
    let ds = Dataset::open(&args.data)?;
    let gbm = args
        .gbm
        .iter()
        .map(|f| GbmResults::read(f, &ds))
        .collect::<Result<Vec<_>>>()?;
    crate::cli::train::require_in_service(
        &ds,
        "the ablation (its teachers read in-service events)",
    )?;
    let runs_file = args.out.join(RUNS_FILE);
    let finished = finished_runs(&runs_file, args.resume, args.no_checkpoints)?;
    if !finished.is_empty() {
        crate::noteln!(
            "ablation: resuming; {} run(s) finished earlier are kept",
            finished.len()
        );
    }
    let cfg = AblationConfig {
        resume: (!args.no_checkpoints).then_some(AblationResume {
            every: args.checkpoint_every,
            resume: args.resume,
            finished,
        }),
        ..cfg
    };
    std::fs::create_dir_all(&args.out).map_err(|e| Error::io(&args.out, e))?;
    if let Some(d) = &cfg.checkpoints {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    // The finished runs, one JSON line each, appended as they finish (kept for `--resume`
    // until the report is written).
    let mut runs_log = match cfg.resume {
        None => None,
        Some(_) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&runs_file)
                .map_err(|e| Error::io(&runs_file, e))?,
        ),
    };
    let outcome = in_pool(args.hyper.threads, || {
        crate::with_backend!(args.hyper.device, args.hyper.precision, be => run_ablation(be, &ds, &cfg, |r| {
            if let Some(f) = runs_log.as_mut() {
                use std::io::Write as _;
                let line = serde_json::to_string(r)
                    .map_err(|e| Error::invalid(format!("run result to JSON: {e}")))?;
                writeln!(f, "{line}")
                    .and_then(|()| f.sync_data())
                    .map_err(|e| Error::io(&runs_file, e))?;
            }
            crate::noteln!(
                "ablation: seed {} {:<18} test AUC {:.4} KS {:.4} (best epoch {}/{}) {:.1} s, {:.0} samples/s{}",
                r.seed,
                r.variant,
                r.test_auc,
                r.test_ks,
                r.best_epoch,
                r.epochs_run,
                r.seconds,
                r.samples_per_s,
                r.vs_plain.map_or(String::new(), |c| format!(
                    "; − plain {:+.4} ± {:.4} (DeLong p {})",
                    c.diff,
                    c.se,
                    fmt_p(c.p)
                ))
            );
            Ok(())
        }))
    })?;
    let file = ResultsFile {
        command: command_line(),
        data: args.data.display().to_string(),
        seeds,
        seconds: start.elapsed().as_secs_f64(),
        summary: summarize(&outcome.runs)?,
        runs: outcome.runs.clone(),
        gbm,
        plain_config: args.plain_config.as_ref().map(|p| p.display().to_string()),
    };
    let json = serde_json::to_string_pretty(&file)
        .map_err(|e| Error::invalid(format!("results to JSON: {e}")))?;
    write_atomic(&args.out.join("results.json"), json.as_bytes())?;
    write_atomic(
        &args.out.join("report.md"),
        report_markdown(&file, &ds).as_bytes(),
    )?;
    write_plots(&args.out, &outcome)?;
    match std::fs::remove_file(&runs_file) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&runs_file, e)),
        _ => Ok(file),
    }
}

/// The file of an unfinished ablation's finished runs, in its report directory.
pub const RUNS_FILE: &str = "runs.jsonl";

/// The runs an interrupted ablation finished, from its `runs.jsonl` at `path`: needed with
/// `resume` (which needs the checkpoints), refused without it (a fresh ablation would
/// throw them away). A last line cut short by a kill is dropped (and cut from the file);
/// any other line that does not parse is an error naming the file and line.
fn finished_runs(path: &Path, resume: bool, no_checkpoints: bool) -> Result<Vec<RunResult>> {
    let exists = path.exists();
    if resume && no_checkpoints {
        return Err(Error::invalid(
            "--resume: an ablation with --no-checkpoints keeps no resume checkpoints and \
             cannot be resumed",
        ));
    }
    if !resume {
        if exists {
            return Err(Error::invalid(format!(
                "{} lists the finished runs of an interrupted ablation in this directory: \
                 continue it with --resume, or remove the file (or choose another --out) to \
                 start afresh",
                path.display()
            )));
        }
        return Ok(Vec::new());
    }
    if !exists {
        return Err(Error::invalid(format!(
            "--resume: there is no interrupted ablation to continue ({} is missing: it is \
             removed when the report is written)",
            path.display()
        )));
    }
    read_log_lines(path)
}

/// The JSON lines of the append-only log `path` (one finished unit of work each, synced as it
/// was written): a last line cut short by a kill is dropped, and cut from the file; any other
/// line that does not parse is an error naming the file and line.
pub fn read_log_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let whole = text.rfind('\n').map_or(0, |i| i + 1);
    if whole < text.len() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        f.set_len(whole as u64).map_err(|e| Error::io(path, e))?;
    }
    text[..whole]
        .lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::format(path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

/// `mgkd-train ablation`.
pub fn run(args: &AblationArgs) -> Result<()> {
    let mut inputs = vec![Input::dataset("--data", &args.data)];
    inputs.extend(args.gbm.iter().map(|f| Input::file("--gbm", f)));
    inputs.extend(
        args.plain_config
            .iter()
            .map(|f| Input::file("--plain-config", f)),
    );
    let _out = OutputPath::prepare("--out", &args.out, OutputKind::Dir, &inputs)?;
    let file = ablation_in(args)?;
    if args.json {
        let json = serde_json::to_string_pretty(&file.summary)
            .map_err(|e| Error::invalid(format!("summary to JSON: {e}")))?;
        crate::outln!("{json}")?;
    } else {
        crate::out!(
            "{}{}",
            summary_markdown(&file.summary),
            gbm_markdown(&file.gbm, &file.summary)
        )?;
        crate::outln!(
            "{:.0} s; report in {}",
            file.seconds,
            args.out.join("report.md").display()
        )?;
    }
    Ok(())
}
