//! `mgkd-train inspect DIR [--verify] [--json]`: what a dataset holds (splits, default rates,
//! schema, sequence-length distribution, shards), optionally re-hashing and re-validating
//! every shard.

use std::path::PathBuf;

use serde::Serialize;

use crate::data::{Dataset, ShardView, TimeSpans};
use crate::{Error, Result};

/// Arguments of `inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// Dataset directory (holding `dataset.json` and the shards).
    pub dir: PathBuf,
    /// Re-hash every shard (SHA-256 against the manifest) and re-validate it.
    #[arg(long)]
    pub verify: bool,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Rows and default rate of one split.
#[derive(Debug, Serialize)]
pub struct SplitReport {
    /// Split name.
    pub name: String,
    /// Rows in the split.
    pub rows: u64,
    /// Rows with label 1.
    pub positives: u64,
    /// positives / rows.
    pub default_rate: f64,
}

/// One schema field.
#[derive(Debug, Serialize)]
pub struct FieldReport {
    /// `profile` or `event`.
    pub group: &'static str,
    /// `categorical` or `numeric`.
    pub kind: &'static str,
    /// Field name.
    pub name: String,
    /// Vocabulary size (categorical fields).
    pub vocab: Option<u32>,
    /// Train-split mean before standardising (numeric fields).
    pub mean: Option<f64>,
    /// Train-split std before standardising (numeric fields).
    pub std: Option<f64>,
    /// Whether signed log1p was applied (numeric fields).
    pub log1p: Option<bool>,
}

/// Distribution of the raw (untruncated) sequence lengths of one kind over all rows.
/// Quantiles are nearest-rank: the `⌈q·n⌉`-th smallest length.
#[derive(Debug, Serialize)]
pub struct LengthReport {
    /// The schema's length limit for this kind.
    pub limit: usize,
    /// Shortest sequence.
    pub min: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Longest sequence.
    pub max: u64,
    /// Share of rows with no event.
    pub share_empty: f64,
    /// Share of rows longer than the limit (truncated in batches).
    pub share_truncated: f64,
    /// Mean length.
    pub mean: f64,
}

/// Result of `--verify`.
#[derive(Debug, Serialize)]
pub struct VerifyOutcome {
    /// Whether every shard matched its hash and validated.
    pub ok: bool,
    /// The error, when not ok.
    pub error: Option<String>,
}

/// Everything `inspect` reports.
#[derive(Debug, Serialize)]
pub struct InspectReport {
    /// The dataset directory.
    pub dir: String,
    /// Manifest format version.
    pub version: u32,
    /// The manifest's `source` text.
    pub source: String,
    /// Total rows.
    pub rows: u64,
    /// Whether rows carry labels.
    pub has_label: bool,
    /// Whether rows carry user ids.
    pub has_user_id: bool,
    /// Train, valid, test.
    pub splits: Vec<SplitReport>,
    /// Every schema field.
    pub fields: Vec<FieldReport>,
    /// Pre-service sequence lengths.
    pub pre_lengths: LengthReport,
    /// In-service sequence lengths.
    pub in_lengths: LengthReport,
    /// Number of shard files.
    pub shards: usize,
    /// Total bytes of the shard files.
    pub shard_bytes: u64,
    /// Outcome of `--verify` (absent without it).
    pub verify: Option<VerifyOutcome>,
    /// The time span of the activations and of each window's events (imported datasets
    /// with times).
    pub times: Option<TimeSpans>,
}

/// Length distribution of one sequence kind over `lens`.
fn length_report(mut lens: Vec<u64>, limit: usize) -> LengthReport {
    lens.sort_unstable();
    let n = lens.len();
    let q = |p: f64| -> u64 {
        if n == 0 {
            return 0;
        }
        let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
        lens[rank - 1]
    };
    let share = |c: usize| if n == 0 { 0.0 } else { c as f64 / n as f64 };
    LengthReport {
        limit,
        min: lens.first().copied().unwrap_or(0),
        p50: q(0.5),
        p90: q(0.9),
        p99: q(0.99),
        max: lens.last().copied().unwrap_or(0),
        share_empty: share(lens.iter().filter(|&&l| l == 0).count()),
        share_truncated: share(lens.iter().filter(|&&l| l > limit as u64).count()),
        mean: if n == 0 {
            0.0
        } else {
            lens.iter().map(|&l| l as f64).sum::<f64>() / n as f64
        },
    }
}

/// Builds the report of an open dataset (and runs the verification when asked).
pub fn report(ds: &Dataset, verify: bool) -> InspectReport {
    let m = ds.manifest();
    let s = ds.schema();
    let mut fields = Vec::new();
    let cat = |group, f: &crate::data::CatField| FieldReport {
        group,
        kind: "categorical",
        name: f.name.clone(),
        vocab: Some(f.vocab),
        mean: None,
        std: None,
        log1p: None,
    };
    let num = |group, f: &crate::data::NumField| FieldReport {
        group,
        kind: "numeric",
        name: f.name.clone(),
        vocab: None,
        mean: Some(f.mean),
        std: Some(f.std),
        log1p: Some(f.log1p),
    };
    fields.extend(s.profile_cat.iter().map(|f| cat("profile", f)));
    fields.extend(s.profile_num.iter().map(|f| num("profile", f)));
    fields.extend(s.event_cat.iter().map(|f| cat("event", f)));
    fields.extend(s.event_num.iter().map(|f| num("event", f)));
    let lens = |pick: for<'a> fn(&ShardView<'a>) -> &'a [u64]| -> Vec<u64> {
        ds.shards()
            .iter()
            .flat_map(|sh| {
                let v = sh.view();
                pick(&v)
                    .windows(2)
                    .map(|w| w[1].saturating_sub(w[0]))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let verify = verify.then(|| match ds.verify() {
        Ok(_) => VerifyOutcome {
            ok: true,
            error: None,
        },
        Err(e) => VerifyOutcome {
            ok: false,
            error: Some(e.to_string()),
        },
    });
    InspectReport {
        dir: ds.dir().display().to_string(),
        version: m.version,
        source: m.source.clone(),
        rows: m.rows,
        has_label: m.has_label,
        has_user_id: m.has_user_id,
        splits: m
            .splits
            .iter()
            .map(|sp| SplitReport {
                name: sp.name.clone(),
                rows: sp.rows,
                positives: sp.positives,
                default_rate: sp.default_rate,
            })
            .collect(),
        fields,
        pre_lengths: length_report(lens(|v| v.pre.offsets), s.pre_len),
        in_lengths: length_report(lens(|v| v.in_service.offsets), s.in_len),
        shards: m.shards.len(),
        shard_bytes: m.shards.iter().map(|sh| sh.bytes).sum(),
        verify,
        times: m.times.clone(),
    }
}

/// Formats rows of cells as a table: columns padded to their widest cell, text columns
/// left-aligned, the others right-aligned, two spaces between columns.
fn table(header: &[&str], rows: &[Vec<String>], left: &[bool]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| -> String {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(j, c)| {
                let w = width.get(j).copied().unwrap_or(0);
                if left.get(j).copied().unwrap_or(false) {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        format!("  {}\n", parts.join("  ").trim_end())
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

/// Human-readable rendering of a report.
pub fn render(r: &InspectReport) -> String {
    let mut out = format!(
        "dataset {} (format v{}): {} rows, labels: {}, user ids: {}\n",
        r.dir,
        r.version,
        r.rows,
        if r.has_label { "yes" } else { "no" },
        if r.has_user_id { "yes" } else { "no" }
    );
    if !r.source.is_empty() {
        out.push_str(&format!("source: {}\n", r.source));
    }
    out.push_str("\nsplits\n");
    let splits: Vec<Vec<String>> = r
        .splits
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.rows.to_string(),
                s.positives.to_string(),
                format!("{:.4}", s.default_rate),
            ]
        })
        .collect();
    out.push_str(&table(
        &["split", "rows", "defaults", "default rate"],
        &splits,
        &[true, false, false, false],
    ));
    out.push_str("\nschema\n");
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let fields: Vec<Vec<String>> = r
        .fields
        .iter()
        .map(|f| {
            vec![
                f.group.to_string(),
                f.kind.to_string(),
                f.name.clone(),
                opt(f.vocab.map(|v| v.to_string())),
                opt(f.mean.map(|v| format!("{v:.4}"))),
                opt(f.std.map(|v| format!("{v:.4}"))),
                opt(f.log1p.map(|v| if v { "yes".into() } else { "no".into() })),
            ]
        })
        .collect();
    out.push_str(&table(
        &["group", "kind", "field", "vocab", "mean", "std", "log1p"],
        &fields,
        &[true, true, true, false, false, false, true],
    ));
    out.push_str("\nsequence lengths (events per row, before truncation)\n");
    let lens: Vec<Vec<String>> = [
        ("pre-service", &r.pre_lengths),
        ("in-service", &r.in_lengths),
    ]
    .iter()
    .map(|(name, l)| {
        vec![
            name.to_string(),
            l.limit.to_string(),
            l.min.to_string(),
            l.p50.to_string(),
            l.p90.to_string(),
            l.p99.to_string(),
            l.max.to_string(),
            format!("{:.2}", l.mean),
            format!("{:.2}%", 100.0 * l.share_empty),
            format!("{:.2}%", 100.0 * l.share_truncated),
        ]
    })
    .collect();
    out.push_str(&table(
        &[
            "sequence",
            "limit",
            "min",
            "p50",
            "p90",
            "p99",
            "max",
            "mean",
            "empty",
            "truncated",
        ],
        &lens,
        &[
            true, false, false, false, false, false, false, false, false, false,
        ],
    ));
    if let Some(t) = &r.times {
        out.push_str(&render_times(t));
    }
    out.push_str(&format!(
        "\nshards: {} files, {} bytes ({:.1} MiB)\n",
        r.shards,
        r.shard_bytes,
        r.shard_bytes as f64 / (1u64 << 20) as f64
    ));
    if let Some(v) = &r.verify {
        match &v.error {
            None => out.push_str("verify: OK (every shard matches its sha256 and validates)\n"),
            Some(e) => out.push_str(&format!("verify: FAILED: {e}\n")),
        }
    }
    out
}

/// The "times" section: activations, then each window's events in days from activation.
fn render_times(t: &TimeSpans) -> String {
    let mut out = format!(
        "\ntimes: activations from {} to {}\n",
        t.activation_first, t.activation_last
    );
    let days = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |d| format!("{d:.2}"));
    let mut rows = Vec::new();
    for (name, side, span) in [
        ("pre-service", "before", &t.pre),
        ("in-service", "after", &t.in_service),
    ] {
        if let Some(s) = span {
            rows.push(vec![
                name.to_string(),
                match (name, t.window_days) {
                    ("in-service", Some(w)) => format!("{w:.2}"),
                    _ => "-".to_string(),
                },
                s.events.to_string(),
                side.to_string(),
                days(s.min_days),
                days(s.median_days),
                days(s.max_days),
            ]);
        }
    }
    if !rows.is_empty() {
        out.push_str(&table(
            &[
                "window",
                "length (days)",
                "events",
                "activation",
                "nearest (days)",
                "median",
                "farthest",
            ],
            &rows,
            &[true, false, false, true, false, false, false],
        ));
    }
    out
}

/// Runs `inspect`: opening the dataset validates it; a failed `--verify` is reported and
/// makes the command fail after printing the report.
pub fn run(args: &InspectArgs) -> Result<()> {
    let ds = Dataset::open(&args.dir)?;
    let r = report(&ds, args.verify);
    if args.json {
        let text = serde_json::to_string_pretty(&r)
            .map_err(|e| Error::invalid(format!("internal: report to JSON: {e}")))?;
        crate::outln!("{text}")?;
    } else {
        crate::out!("{}", render(&r))?;
    }
    match r.verify.and_then(|v| v.error) {
        Some(e) => Err(Error::invalid(format!("verification failed: {e}"))),
        None => Ok(()),
    }
}
