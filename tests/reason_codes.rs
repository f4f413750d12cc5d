//! `predict --reasons K`: reason codes by occlusion against a baseline (src/explain.rs).
//!
//! - **Planted effects rank first.** A cohort whose default risk is driven by one numeric
//!   profile field (`debt`) and by one pre-service event type (`missed`), every other input
//!   being noise: a student trained on it must name `debt` as the first reason of the
//!   applicants whose risk comes from a high debt alone, and the `missed` events as the first
//!   reason of those whose risk comes from missed payments alone.
//! - **Contributions are what they say.** Each contribution must equal the drop of the logit
//!   when the applicant is scored again by `predict` with that input at its baseline
//!   (numeric field 0, categorical id 0, the events of that value removed), written out as a
//!   dataset of its own: within 1e-5.
//! - Refusals: `--reasons 0`, an unknown `--reason-events` field, a teacher.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use mgkd::data::import::{FieldVocab, Vocabularies, VOCAB_FILE};
use mgkd::data::{CatField, Dataset, DatasetWriter, NumField, RowData, Schema, WriterOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Event type ids: 1 purchase, 2 payment, 3 login, 4 missed (the planted one).
const MISSED: u32 = 4;
const TYPES: [&str; 4] = ["purchase", "payment", "login", "missed"];

fn schema() -> Schema {
    let num = |name: &str| NumField {
        name: name.into(),
        mean: 0.0,
        std: 1.0,
        log1p: false,
    };
    let cat = |name: &str, vocab| CatField {
        name: name.into(),
        vocab,
    };
    Schema {
        profile_num: vec![num("debt"), num("noise_a"), num("noise_b")],
        profile_cat: vec![cat("region", 6)],
        event_cat: vec![cat("event_type", 5), cat("channel", 3)],
        event_num: vec![num("amount")],
        pre_len: 6,
        in_len: 6,
    }
}

fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let z: f64 = StandardNormal.sample(rng);
    z as f32
}

/// One generated applicant.
struct Row {
    label: u8,
    profile_num: [f32; 3],
    region: u32,
    pre_cat: Vec<u32>,
    pre_num: Vec<f32>,
}

/// Risk logit `−2.5 + 2.2·debt + 2.5·[any missed event]`; every other input is noise.
fn gen(rng: &mut ChaCha8Rng) -> Row {
    let debt = normal(rng);
    let n_pre = rng.gen_range(0..=6usize);
    let missed = n_pre > 0 && rng.gen_bool(0.25);
    let (mut pre_cat, mut pre_num) = (Vec::new(), Vec::new());
    for t in 0..n_pre {
        let ty = if missed && t == n_pre / 2 {
            MISSED
        } else {
            rng.gen_range(1..MISSED)
        };
        pre_cat.extend([ty, rng.gen_range(0..3)]);
        pre_num.push(normal(rng));
    }
    let z = -2.5 + 2.2 * debt + if missed { 2.5 } else { 0.0 };
    let p = 1.0 / (1.0 + (-z).exp());
    Row {
        label: u8::from(rng.gen_bool(f64::from(p))),
        profile_num: [debt, normal(rng), normal(rng)],
        region: rng.gen_range(0..6),
        pre_cat,
        pre_num,
    }
}

/// Writes `rows` (in-service events: a copy of the pre-service ones) with splits 70/15/15
/// and a vocab.json naming the event types.
fn write(dir: &Path, rows: &[Row]) {
    let opts = WriterOptions {
        shard_rows: Some(500),
        has_label: true,
        has_user_id: false,
        ..Default::default()
    };
    let mut w = DatasetWriter::create(dir, schema(), opts).expect("create writer");
    for (i, r) in rows.iter().enumerate() {
        w.push(&RowData {
            label: Some(r.label),
            split: match i % 20 {
                0..=13 => 0,
                14..=16 => 1,
                _ => 2,
            },
            user_id: None,
            profile_num: &r.profile_num,
            profile_cat: &[r.region],
            pre_cat: &r.pre_cat,
            pre_num: &r.pre_num,
            in_cat: &r.pre_cat,
            in_num: &r.pre_num,
        })
        .expect("push row");
    }
    w.finish().expect("finish writer");
    let ids = |names: &[&str]| -> BTreeMap<String, u32> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), i as u32 + 1))
            .collect()
    };
    let vocab = Vocabularies {
        profile_cat: vec![FieldVocab {
            name: "region".into(),
            vocab: 6,
            ids: ids(&["north", "south", "east", "west", "centre"]),
        }],
        event_cat: vec![
            FieldVocab {
                name: "event_type".into(),
                vocab: 5,
                ids: ids(&TYPES),
            },
            FieldVocab {
                name: "channel".into(),
                vocab: 3,
                ids: ids(&["web", "app"]),
            },
        ],
    };
    let text = serde_json::to_string(&vocab).expect("vocab JSON");
    std::fs::write(dir.join(VOCAB_FILE), text).expect("write vocab.json");
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mgkd-train"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(args: &[&str]) -> String {
    let o = bin().args(args).output().expect("run mgkd-train");
    assert!(o.status.success(), "{args:?} failed:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn refused(args: &[&str], needles: &[&str]) {
    let o = bin().args(args).output().expect("run mgkd-train");
    let t = text(&o);
    assert!(!o.status.success(), "{args:?} should fail:\n{t}");
    assert!(!t.contains("panicked"), "{args:?} panicked:\n{t}");
    for n in needles {
        assert!(t.contains(n), "{args:?}: message lacks {n:?}:\n{t}");
    }
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// predict's CSV: per row the key, the logit and the (reason, contribution) pairs.
type Scored = Vec<(String, f64, Vec<(String, f64)>)>;

fn read_reasons(path: &Path) -> Scored {
    let mut r = csv::Reader::from_path(path).expect("csv");
    let header: Vec<String> = r
        .headers()
        .expect("header")
        .iter()
        .map(String::from)
        .collect();
    assert_eq!(
        header[..5],
        ["row", "probability", "logit", "reason_1", "contribution_1"]
    );
    r.records()
        .map(|rec| {
            let rec = rec.expect("record");
            let mut reasons = Vec::new();
            for j in (3..rec.len()).step_by(2) {
                if !rec[j].is_empty() {
                    reasons.push((rec[j].to_string(), rec[j + 1].parse().expect("number")));
                }
            }
            (rec[0].to_string(), rec[2].parse().expect("logit"), reasons)
        })
        .collect()
}

#[test]
fn reasons_rank_planted_effects_first_and_equal_rescoring_differences() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let rows: Vec<Row> = (0..6000).map(|_| gen(&mut rng)).collect();
    write(&data, &rows);
    let t = tmp.path().join("teacher.safetensors");
    let s = tmp.path().join("student.safetensors");
    let common = [
        "--d", "16", "--heads", "2", "--blocks", "1", "--d-cat", "4", "--batch", "128", "--lr",
        "5e-3", "--device", "cpu",
    ];
    let mut a = vec![
        "teacher",
        "--data",
        p(&data),
        "--out",
        p(&t),
        "--epochs",
        "2",
    ];
    a.extend(common);
    ok(&a);
    let mut a = vec![
        "student",
        "--data",
        p(&data),
        "--teacher",
        p(&t),
        "--out",
        p(&s),
        "--epochs",
        "8",
    ];
    a.extend(common);
    ok(&a);
    let out = tmp.path().join("reasons.csv");
    ok(&[
        "predict",
        "--data",
        p(&data),
        "--model",
        p(&s),
        "--out",
        p(&out),
        "--split",
        "test",
        "--device",
        "cpu",
        "--reasons",
        "12",
    ]);
    let scored = read_reasons(&out);

    // Planted effects rank first.
    let first = |i: usize| scored[i].2.first().map(|r| r.0.as_str());
    let (mut debt_rows, mut debt_first, mut missed_rows, mut missed_first) = (0, 0, 0, 0);
    for (i, (key, _, _)) in scored.iter().enumerate() {
        let r = &rows[key.parse::<usize>().expect("row index")];
        let kept = &r.pre_cat[r.pre_cat.len().saturating_sub(2 * 6)..];
        let has_missed = kept.chunks(2).any(|e| e[0] == MISSED);
        let debt = r.profile_num[0];
        if debt > 1.0 && !has_missed {
            debt_rows += 1;
            debt_first += usize::from(first(i) == Some("debt"));
        }
        if debt < 0.0 && has_missed {
            missed_rows += 1;
            missed_first += usize::from(first(i) == Some("events:event_type=missed"));
        }
    }
    eprintln!(
        "debt first on {debt_first}/{debt_rows} high-debt rows; missed first on \
         {missed_first}/{missed_rows} low-debt rows with a missed payment"
    );
    assert!(
        debt_rows >= 20 && missed_rows >= 20,
        "too few rows to judge"
    );
    assert!(
        debt_first * 100 >= debt_rows * 95,
        "debt first on only {debt_first}/{debt_rows} high-debt rows"
    );
    assert!(
        missed_first * 100 >= missed_rows * 95,
        "missed first on only {missed_first}/{missed_rows} rows with a missed payment"
    );

    // Every contribution equals the logit drop when the occluded applicant is rescored.
    let ds = Dataset::open(&data).expect("open");
    let sch = schema();
    let occluded_dir = tmp.path().join("occluded");
    let opts = WriterOptions {
        shard_rows: None,
        has_label: false,
        has_user_id: false,
        ..Default::default()
    };
    let mut w = DatasetWriter::create(&occluded_dir, sch.clone(), opts).expect("writer");
    let mut expected: Vec<(f64, String)> = Vec::new();
    for (key, z, reasons) in scored.iter().take(40) {
        let b = ds.gather(&[key.parse().expect("row")]).expect("gather");
        let l = b.pre.lens[0] as usize;
        for (input, c) in reasons {
            let mut num = b.profile_num.clone();
            let mut cat = b.profile_cat.clone();
            let (mut pc, mut pn) = (b.pre.cat[..2 * l].to_vec(), b.pre.num[..l].to_vec());
            if let Some(f) = sch.profile_num.iter().position(|f| &f.name == input) {
                num[f] = 0.0;
            } else if input.starts_with("region=") {
                cat[0] = 0;
            } else {
                let (field, value) = input
                    .strip_prefix("events:")
                    .and_then(|x| x.split_once('='))
                    .expect("an event group");
                let k = sch.event_cat.iter().position(|f| f.name == field).unwrap();
                let id = TYPES.iter().position(|&n| n == value).unwrap() as u32 + 1;
                assert_eq!(k, 0, "events are grouped by event_type");
                let keep: Vec<usize> = (0..l).filter(|&t| pc[2 * t] != id).collect();
                pc = keep
                    .iter()
                    .flat_map(|&t| [pc[2 * t], pc[2 * t + 1]])
                    .collect();
                pn = keep.iter().map(|&t| pn[t]).collect();
            }
            w.push(&RowData {
                label: None,
                split: 2,
                user_id: None,
                profile_num: &num,
                profile_cat: &cat,
                pre_cat: &pc,
                pre_num: &pn,
                in_cat: &[],
                in_num: &[],
            })
            .expect("push");
            expected.push((z - c, format!("row {key}, {input}")));
        }
    }
    w.finish().expect("finish");
    assert!(expected.len() >= 40, "too few reasons to check");
    let rescored = tmp.path().join("rescored.csv");
    ok(&[
        "predict",
        "--data",
        p(&occluded_dir),
        "--model",
        p(&s),
        "--out",
        p(&rescored),
        "--device",
        "cpu",
    ]);
    let mut r = csv::Reader::from_path(&rescored).expect("csv");
    let got: Vec<f64> = r
        .records()
        .map(|rec| rec.expect("record")[2].parse().expect("logit"))
        .collect();
    assert_eq!(got.len(), expected.len());
    let mut worst = 0.0f64;
    for (g, (want, what)) in got.iter().zip(&expected) {
        let d = (g - want).abs();
        worst = worst.max(d);
        assert!(d <= 1e-5, "{what}: rescored logit {g}, z − c = {want}");
    }
    eprintln!(
        "{} contributions match rescoring within {worst:.2e}",
        expected.len()
    );

    // Refusals.
    let o = p(&out);
    refused(
        &[
            "predict",
            "--data",
            p(&data),
            "--model",
            p(&s),
            "--out",
            o,
            "--reasons",
            "0",
        ],
        &["--reasons must be at least 1"],
    );
    refused(
        &[
            "predict",
            "--data",
            p(&data),
            "--model",
            p(&s),
            "--out",
            o,
            "--reasons",
            "2",
            "--reason-events",
            "colour",
        ],
        &["colour", "event_type, channel"],
    );
    refused(
        &[
            "predict",
            "--data",
            p(&data),
            "--model",
            p(&t),
            "--out",
            o,
            "--reasons",
            "2",
        ],
        &["teacher.safetensors", "explains a student"],
    );
}
