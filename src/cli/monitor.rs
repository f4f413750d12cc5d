//! `mgkd-train monitor --reference DIR --data NEW [--model student.safetensors] [--json]
//! [--svg chart.svg]`: how far new applicants have moved from the reference population (the
//! training cohort): the characteristic stability index of every profile field and of the
//! pre-service sequence lengths and, with a model, the population stability index of its
//! scores with a score-band table and a chart of the two score distributions (definitions:
//! [`crate::monitor`], docs/deploy.md).

use std::path::{Path, PathBuf};

use clap::Args;
use plotters::prelude::*;
use serde::Serialize;

use crate::backend::Backend;
use crate::cli::eval::Split;
use crate::cli::train::{check_schema, in_pool, require_in_service, Device};
use crate::data::import::{Vocabularies, VOCAB_FILE};
use crate::data::writer::write_atomic;
use crate::data::Dataset;
use crate::model::{checkpoint, Role};
use crate::monitor::{self, Flag, ScoreBand, Stability, ACT, WATCH};
use crate::train::{score_rows, sigmoid};
use crate::{Error, Result};

/// Arguments of `mgkd-train monitor`.
#[derive(Debug, Clone, Args)]
pub struct MonitorArgs {
    /// Reference dataset directory (the training cohort).
    #[arg(long)]
    pub reference: PathBuf,
    /// Dataset directory of the new applicants (encoded like the reference: same schema,
    /// e.g. imported with `encoding_from`).
    #[arg(long)]
    pub data: PathBuf,
    /// Checkpoint whose scores are compared (PSI, score-band table, chart).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Use only this split of the reference (default: every row).
    #[arg(long, value_enum)]
    pub reference_split: Option<Split>,
    /// Use only this split of the new data (default: every row).
    #[arg(long, value_enum)]
    pub split: Option<Split>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Write an SVG chart of the two score distributions here (needs --model), atomically.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Worker threads.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Backend for scoring: auto (CUDA when one works, else CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: Device,
}

/// One population in the report.
#[derive(Debug, Clone, Serialize)]
pub struct Population {
    /// Dataset directory.
    pub path: String,
    /// Split used, or `None` for every row.
    pub split: Option<Split>,
    /// Rows compared.
    pub rows: usize,
    /// Whether the dataset has labels (then bad rates are reported).
    pub labelled: bool,
    /// Defaulters' share, when labelled.
    pub bad_rate: Option<f64>,
    /// Mean predicted probability of default, with a model.
    pub mean_score: Option<f64>,
}

/// The score part of the report.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreReport {
    /// The checkpoint.
    pub model: String,
    /// Population stability index of the scores (probabilities of default).
    pub psi: f64,
    /// Its flag.
    pub flag: Flag,
    /// The ten score bands cut at the reference's deciles.
    pub bands: Vec<ScoreBand>,
}

/// Counts of flags over the characteristics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FlagCounts {
    /// Index below the watch threshold.
    pub stable: usize,
    /// Index in [watch, act).
    pub watch: usize,
    /// Index at or above the act threshold.
    pub act: usize,
}

/// What `monitor --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct MonitorReport {
    /// The reference population.
    pub reference: Population,
    /// The new population.
    pub new: Population,
    /// The watch and act thresholds.
    pub thresholds: [f64; 2],
    /// The scores' stability and band table, with a model.
    pub score: Option<ScoreReport>,
    /// Characteristic stability of every profile field (schema order), then of the kept
    /// pre-service sequence length (`pre_service_length`).
    pub characteristics: Vec<Stability>,
    /// How many characteristics carry each flag.
    pub flags: FlagCounts,
}

/// Per-row inputs of one population: numeric profile columns, categorical profile columns,
/// kept pre-service lengths, labels.
struct Columns {
    num: Vec<Vec<f64>>,
    cat: Vec<Vec<u32>>,
    lens: Vec<f64>,
    labels: Option<Vec<u8>>,
}

/// Rows gathered at a time when reading the columns.
const READ_ROWS: usize = 4096;

fn columns(ds: &Dataset, rows: &[u64]) -> Result<Columns> {
    let s = ds.schema();
    let (fd, fc) = (s.f_num(), s.f_cat());
    let mut c = Columns {
        num: vec![Vec::with_capacity(rows.len()); fd],
        cat: vec![Vec::with_capacity(rows.len()); fc],
        lens: Vec::with_capacity(rows.len()),
        labels: ds.manifest().has_label.then(Vec::new),
    };
    for chunk in rows.chunks(READ_ROWS) {
        let b = ds.gather(chunk)?;
        for i in 0..b.rows {
            for (f, col) in c.num.iter_mut().enumerate() {
                col.push(f64::from(b.profile_num[i * fd + f]));
            }
            for (f, col) in c.cat.iter_mut().enumerate() {
                col.push(b.profile_cat[i * fc + f]);
            }
            c.lens.push(f64::from(b.pre.lens[i]));
        }
        if let (Some(l), Some(bl)) = (c.labels.as_mut(), b.labels.as_ref()) {
            l.extend_from_slice(bl);
        }
    }
    Ok(c)
}

fn rows_of(ds: &Dataset, split: Option<Split>) -> Result<Vec<u64>> {
    let rows: Vec<u64> = match split {
        Some(s) => ds.rows_of_split(s.id()),
        None => (0..ds.rows()).collect(),
    };
    if rows.is_empty() {
        return Err(Error::invalid(format!(
            "{}: no rows{}",
            ds.dir().display(),
            split.map_or_else(String::new, |s| format!(" in the {} split", s.name()))
        )));
    }
    Ok(rows)
}

fn population(
    ds: &Dataset,
    split: Option<Split>,
    c: &Columns,
    scores: Option<&[f64]>,
) -> Population {
    let n = c.lens.len();
    Population {
        path: ds.dir().display().to_string(),
        split,
        rows: n,
        labelled: c.labels.is_some(),
        bad_rate: c
            .labels
            .as_ref()
            .map(|l| l.iter().map(|&y| f64::from(y)).sum::<f64>() / n.max(1) as f64),
        mean_score: scores.map(|s| s.iter().sum::<f64>() / n.max(1) as f64),
    }
}

/// Builds the report on backend `be` (which scores when a model is given).
pub fn monitor_on<B: Backend>(be: &B, args: &MonitorArgs) -> Result<MonitorReport> {
    let rds = Dataset::open(&args.reference)?;
    let nds = Dataset::open(&args.data)?;
    let diff = nds.schema().diff(rds.schema());
    if !diff.is_empty() {
        return Err(Error::invalid(format!(
            "the new data {} is encoded with another schema than the reference {} (new here, \
             reference wanted): {}; import new applicants with `encoding_from` pointing at the \
             reference so that both are encoded alike",
            nds.dir().display(),
            rds.dir().display(),
            diff.join("; ")
        )));
    }
    let (rrows, nrows) = (
        rows_of(&rds, args.reference_split)?,
        rows_of(&nds, args.split)?,
    );
    let (rc, nc) = (columns(&rds, &rrows)?, columns(&nds, &nrows)?);
    let schema = rds.schema();
    let vocab = if rds.dir().join(VOCAB_FILE).exists() {
        Some(Vocabularies::load(rds.dir())?)
    } else {
        None
    };
    let mut characteristics = Vec::new();
    for (f, field) in schema.profile_num.iter().enumerate() {
        characteristics.push(monitor::numeric(&field.name, &rc.num[f], &nc.num[f])?);
    }
    for (f, field) in schema.profile_cat.iter().enumerate() {
        let v = vocab.as_ref().and_then(|v| v.profile_cat.get(f));
        let names = |id: u32| {
            v.and_then(|v| v.ids.iter().find(|(_, &i)| i == id))
                .map_or_else(|| format!("#{id}"), |(n, _)| n.clone())
        };
        characteristics.push(monitor::categorical(
            &field.name,
            field.vocab,
            &rc.cat[f],
            &nc.cat[f],
            &names,
        )?);
    }
    characteristics.push(monitor::numeric("pre_service_length", &rc.lens, &nc.lens)?);
    let mut flags = FlagCounts::default();
    for c in &characteristics {
        match c.flag {
            Flag::Stable => flags.stable += 1,
            Flag::Watch => flags.watch += 1,
            Flag::Act => flags.act += 1,
        }
    }

    let (mut rscores, mut nscores, mut score) = (None, None, None);
    if let Some(path) = &args.model {
        let ck = checkpoint::read(path)?;
        check_schema(path, &ck.config, &rds)?;
        if ck.config.role == Role::Teacher {
            require_in_service(&rds, "scoring with a teacher")?;
            require_in_service(&nds, "scoring with a teacher")?;
        }
        let model = ck.into_model(be)?;
        let prob = |ds: &Dataset, rows: &[u64]| -> Result<Vec<f64>> {
            Ok(score_rows(be, ds, &model, rows)?
                .into_iter()
                .map(sigmoid)
                .collect())
        };
        let (r, n) = (prob(&rds, &rrows)?, prob(&nds, &nrows)?);
        let st = monitor::numeric("score", &r, &n)?;
        let bands =
            monitor::score_bands(&st, (&r, rc.labels.as_deref()), (&n, nc.labels.as_deref()));
        score = Some(ScoreReport {
            model: path.display().to_string(),
            psi: st.index,
            flag: st.flag,
            bands,
        });
        rscores = Some(r);
        nscores = Some(n);
    }
    if let (Some(svg), Some(r), Some(n), Some(s)) = (&args.svg, &rscores, &nscores, &score) {
        chart(svg, r, n, s)?;
    }
    Ok(MonitorReport {
        reference: population(&rds, args.reference_split, &rc, rscores.as_deref()),
        new: population(&nds, args.split, &nc, nscores.as_deref()),
        thresholds: [WATCH, ACT],
        score,
        characteristics,
        flags,
    })
}

fn plot_err(file: &Path, e: impl std::fmt::Display) -> Error {
    Error::invalid(format!("{}: plotting failed: {e}", file.display()))
}

/// Bins of the chart's score histograms.
const CHART_BINS: usize = 40;

/// An SVG chart of the two score distributions: the share of each population per score
/// bin (40 equal bins between the 0.5th and the 99.5th percentile of both populations'
/// scores, the tails counted in the end bins), with the reference's decile cuts (the PSI
/// bands) as vertical lines.
fn chart(path: &Path, reference: &[f64], new: &[f64], s: &ScoreReport) -> Result<()> {
    let mut all: Vec<f64> = reference.iter().chain(new).copied().collect();
    all.sort_by(f64::total_cmp);
    let at = |q: f64| all[((all.len() - 1) as f64 * q) as usize];
    let bottom = at(0.005);
    let top = at(0.995).max(bottom + 1e-6);
    let width = (top - bottom) / CHART_BINS as f64;
    let hist = |v: &[f64]| -> Vec<(f64, f64)> {
        let mut c = vec![0u64; CHART_BINS];
        for &x in v {
            // Scores beyond the 0.5th and 99.5th percentiles fall into the end bins.
            let b = ((x - bottom) / width).max(0.0) as usize;
            c[b.min(CHART_BINS - 1)] += 1;
        }
        let n = v.len().max(1) as f64;
        let mut pts = Vec::with_capacity(2 * CHART_BINS);
        for (b, &k) in c.iter().enumerate() {
            let y = k as f64 / n;
            pts.push((bottom + b as f64 * width, y));
            pts.push((bottom + (b + 1) as f64 * width, y));
        }
        pts
    };
    let (hr, hn) = (hist(reference), hist(new));
    let ymax = hr.iter().chain(&hn).map(|p| p.1).fold(0.0, f64::max) * 1.1 + 1e-9;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
        let title = format!("Score distributions: PSI {:.3} ({})", s.psi, s.flag.name());
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(bottom..top, 0.0..ymax)
            .map_err(|e| plot_err(path, e))?;
        chart
            .configure_mesh()
            .x_desc("predicted probability of default")
            .y_desc("share of applicants per bin")
            .draw()
            .map_err(|e| plot_err(path, e))?;
        let grey = RGBColor(190, 190, 190);
        for b in &s.bands {
            if let Some(h) = b.hi.filter(|&h| (bottom..=top).contains(&h)) {
                chart
                    .draw_series(LineSeries::new([(h, 0.0), (h, ymax)], grey.stroke_width(1)))
                    .map_err(|e| plot_err(path, e))?;
            }
        }
        let series = [
            ("reference", RGBColor(31, 119, 180), hr),
            ("new", RGBColor(214, 39, 40), hn),
        ];
        for (name, color, pts) in series {
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(|e| plot_err(path, e))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| plot_err(path, e))?;
        root.present().map_err(|e| plot_err(path, e))?;
    }
    write_atomic(path, svg.as_bytes())
}

fn pct(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{:.2}%", 100.0 * v))
}

/// Prints the report as tables.
pub fn print_report(r: &MonitorReport) {
    let pop = |p: &Population| {
        format!(
            "{} ({} rows{}{})",
            p.path,
            p.rows,
            p.split
                .map_or_else(String::new, |s| format!(", {} split", s.name())),
            p.bad_rate
                .map_or_else(String::new, |b| format!(", bad rate {:.2}%", 100.0 * b))
        )
    };
    println!("reference {}", pop(&r.reference));
    println!("new       {}", pop(&r.new));
    println!(
        "flags: watch at {:.2}, act at {:.2}",
        r.thresholds[0], r.thresholds[1]
    );
    if let Some(s) = &r.score {
        println!(
            "\nscore PSI {:.4}  {}   (mean probability of default: reference {}, new {})",
            s.psi,
            s.flag.name().to_uppercase(),
            pct(r.reference.mean_score),
            pct(r.new.mean_score)
        );
        println!(
            "band  score range            ref %   new %  ref approve  new approve  ref bad  new bad  PSI part"
        );
        for b in &s.bands {
            let range = match (b.lo, b.hi) {
                (None, Some(h)) => format!("≤ {h:.4}"),
                (Some(l), None) => format!("> {l:.4}"),
                (Some(l), Some(h)) => format!("{l:.4} .. {h:.4}"),
                (None, None) => "all".into(),
            };
            println!(
                "{:>4}  {:<20} {:>6.2} {:>7.2} {:>11.1}% {:>11.1}% {:>8} {:>8} {:>9.4}",
                b.band,
                range,
                100.0 * b.reference_share,
                100.0 * b.new_share,
                100.0 * b.reference_approval,
                100.0 * b.new_approval,
                pct(b.reference_bad_rate),
                pct(b.new_bad_rate),
                b.contribution
            );
        }
    }
    println!(
        "\ncharacteristic stability (CSI), {} inputs: {} act, {} watch, {} stable",
        r.characteristics.len(),
        r.flags.act,
        r.flags.watch,
        r.flags.stable
    );
    println!("input                          kind           CSI  flag   bands");
    let mut sorted: Vec<&Stability> = r.characteristics.iter().collect();
    sorted.sort_by(|a, b| b.index.total_cmp(&a.index));
    for c in sorted {
        println!(
            "{:<30} {:<11} {:>8.4}  {:<6} {}",
            c.name,
            c.kind,
            c.index,
            c.flag.name(),
            c.bands.len()
        );
    }
}

/// `mgkd-train monitor`.
pub fn run(args: &MonitorArgs) -> Result<()> {
    if args.svg.is_some() && args.model.is_none() {
        return Err(Error::invalid(
            "--svg charts the score distributions: it needs --model",
        ));
    }
    let report = if args.model.is_some() {
        in_pool(
            args.threads,
            || crate::with_backend!(args.device, be => monitor_on(be, args)),
        )?
    } else {
        let be = crate::backend::cpu::CpuBackend::<f32>::new();
        in_pool(args.threads, || monitor_on(&be, args))?
    };
    if args.json {
        let j = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::invalid(format!("report to JSON: {e}")))?;
        println!("{j}");
    } else {
        print_report(&report);
    }
    if let Some(svg) = &args.svg {
        if !args.json {
            println!("\nchart: {}", svg.display());
        }
    }
    Ok(())
}
