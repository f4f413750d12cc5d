//! Tests of the synthetic generator (`mgkd-train synth`, `mgkd::data::synth`).

use std::fs;
use std::path::Path;
use std::process::Command;

use mgkd::data::manifest::{Manifest, MANIFEST_FILE};
use mgkd::data::synth::{expected_rate, solve_bias, synthesize, SynthConfig, LABEL_SLOPE};
use safetensors::SafeTensors;

const BIN: &str = env!("CARGO_BIN_EXE_mgkd-train");

/// All rows of a dataset, shards concatenated.
#[derive(Default)]
struct Rows {
    label: Vec<u8>,
    split: Vec<u8>,
    profile_num: Vec<f32>,
    pre_lens: Vec<u64>,
    in_lens: Vec<u64>,
    pre_cat: Vec<u32>,
    in_cat: Vec<u32>,
    pre_num: Vec<f32>,
    in_num: Vec<f32>,
}

fn u32s(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    u32s(b).into_iter().map(f32::from_bits).collect()
}

fn lens(b: &[u8]) -> Vec<u64> {
    let offs: Vec<u64> = b
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    offs.windows(2).map(|w| w[1] - w[0]).collect()
}

fn load(dir: &Path) -> (Manifest, Rows) {
    let manifest = Manifest::load(dir).unwrap();
    let mut rows = Rows::default();
    for shard in &manifest.shards {
        let bytes = fs::read(dir.join(&shard.file)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let t = |name: &str| st.tensor(name).unwrap().data().to_vec();
        rows.label.extend(t("label"));
        rows.split.extend(t("split"));
        rows.profile_num.extend(f32s(&t("profile_num")));
        rows.pre_lens.extend(lens(&t("pre_offsets")));
        rows.in_lens.extend(lens(&t("in_offsets")));
        rows.pre_cat.extend(u32s(&t("pre_cat")));
        rows.in_cat.extend(u32s(&t("in_cat")));
        rows.pre_num.extend(f32s(&t("pre_num")));
        rows.in_num.extend(f32s(&t("in_num")));
    }
    assert_eq!(rows.label.len() as u64, manifest.rows);
    (manifest, rows)
}

fn synth(dir: &Path, users: u64, seed: u64, rate: f64) -> Manifest {
    let cfg = SynthConfig {
        users,
        seed,
        default_rate: rate,
        ..SynthConfig::default()
    };
    synthesize(dir, &cfg).unwrap()
}

fn run_bin(out: &Path, threads: &str, extra: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("synth")
        .arg("--out")
        .arg(out)
        .args(extra)
        .env("RAYON_NUM_THREADS", threads)
        .output()
        .unwrap()
}

#[test]
fn same_seed_gives_identical_bytes_whatever_the_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    // More users than one wave of chunks, several shards.
    let args = ["--users", "70001", "--seed", "11", "--shard-rows", "25000"];
    let (a, b) = (tmp.path().join("t1"), tmp.path().join("t2"));
    for (dir, threads) in [(&a, "1"), (&b, "2")] {
        let out = run_bin(dir, threads, &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("70001 users"), "summary: {stdout}");
        assert!(stdout.contains("users/s"), "summary: {stdout}");
    }
    let manifest = Manifest::load(&a).unwrap();
    assert_eq!(manifest.shards.len(), 3);
    let mut names: Vec<String> = manifest.shards.iter().map(|s| s.file.clone()).collect();
    names.push(MANIFEST_FILE.to_string());
    for name in &names {
        let (x, y) = (
            fs::read(a.join(name)).unwrap(),
            fs::read(b.join(name)).unwrap(),
        );
        assert!(x == y, "{name} differs between 1 and 2 threads");
    }
    assert_eq!(fs::read_dir(&a).unwrap().count(), names.len());
}

#[test]
fn different_seeds_give_different_data() {
    let tmp = tempfile::tempdir().unwrap();
    let m1 = synth(&tmp.path().join("s1"), 3000, 1, 0.04);
    let m2 = synth(&tmp.path().join("s2"), 3000, 2, 0.04);
    assert_ne!(m1.shards[0].sha256, m2.shards[0].sha256);
    let (_, r1) = load(&tmp.path().join("s1"));
    let (_, r2) = load(&tmp.path().join("s2"));
    let same = r1
        .profile_num
        .iter()
        .zip(&r2.profile_num)
        .filter(|(x, y)| x == y)
        .count();
    assert!(same < 10, "{same} identical profile values across seeds");
}

#[test]
fn default_rate_matches_the_request() {
    let tmp = tempfile::tempdir().unwrap();
    let n = 20_000u64;
    for (i, rate) in [0.04, 0.25].into_iter().enumerate() {
        let m = synth(&tmp.path().join(format!("r{i}")), n, 5 + i as u64, rate);
        let positives: u64 = m.splits.iter().map(|s| s.positives).sum();
        let observed = positives as f64 / n as f64;
        let sd = (rate * (1.0 - rate) / n as f64).sqrt();
        assert!(
            (observed - rate).abs() < 4.0 * sd,
            "rate {rate}: observed {observed}, 4 sd = {}",
            4.0 * sd
        );
    }
}

#[test]
fn the_bias_solver_hits_the_rate() {
    for rate in [1e-4, 0.04, 0.5, 0.9] {
        let b = solve_bias(LABEL_SLOPE, rate).unwrap();
        assert!((expected_rate(LABEL_SLOPE, b) - rate).abs() < 1e-9 * rate.max(0.01));
    }
    assert!(solve_bias(LABEL_SLOPE, 0.0).is_err());
    assert!(solve_bias(LABEL_SLOPE, 1.0).is_err());
}

#[test]
fn splits_are_80_10_10_and_stratified() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let m = synth(&dir, 20_000, 3, 0.1);
    let (_, rows) = load(&dir);
    for class in [0u8, 1] {
        let members: Vec<u8> = rows
            .split
            .iter()
            .zip(&rows.label)
            .filter(|(_, &l)| l == class)
            .map(|(&s, _)| s)
            .collect();
        let n = members.len() as f64;
        for (split, share) in [(0u8, 0.8), (1, 0.1), (2, 0.1)] {
            let k = members.iter().filter(|&&s| s == split).count() as f64;
            // Exact to within one block of 10 per class.
            assert!(
                (k - share * n).abs() <= 10.0,
                "class {class} split {split}: {k} of {n}"
            );
        }
    }
    // The manifest's per-split rates agree with the rows and with each other.
    for s in &m.splits {
        let pos = rows
            .split
            .iter()
            .zip(&rows.label)
            .filter(|(&sp, &l)| sp == s.split && l == 1)
            .count() as u64;
        assert_eq!(pos, s.positives);
        assert!((s.default_rate - 0.1).abs() < 0.02, "{s:?}");
    }
    // The split is not a fixed pattern of the user index.
    let first_block: Vec<u8> = rows.split[..40].to_vec();
    let second: Vec<u8> = rows.split[40..80].to_vec();
    assert_ne!(first_block, second);
}

#[test]
fn custom_split_is_stratified_and_leaves_the_users_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let (dflt, custom) = (tmp.path().join("d"), tmp.path().join("c"));
    synth(&dflt, 20_000, 3, 0.1);
    let out = run_bin(
        &custom,
        "2",
        &[
            "--users",
            "20000",
            "--seed",
            "3",
            "--default-rate",
            "0.1",
            "--split",
            "20,5,75",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let ((_, a), (m, b)) = (load(&dflt), load(&custom));
    // The same users; only the split column differs.
    assert_eq!(a.label, b.label);
    assert_eq!(a.pre_cat, b.pre_cat);
    assert_eq!(a.in_num, b.in_num);
    assert_ne!(a.split, b.split);
    for class in [0u8, 1] {
        let members: Vec<u8> = b
            .split
            .iter()
            .zip(&b.label)
            .filter(|(_, &l)| l == class)
            .map(|(&s, _)| s)
            .collect();
        let n = members.len() as f64;
        for (split, share) in [(0u8, 0.2), (1, 0.05), (2, 0.75)] {
            let k = members.iter().filter(|&&s| s == split).count() as f64;
            // Exact to within one block of 20 (4 train, 1 valid, 15 test) per class.
            assert!(
                (k - share * n).abs() <= 20.0,
                "class {class} split {split}: {k} of {n}"
            );
        }
    }
    assert!(m.source.contains("--split 20,5,75"), "{}", m.source);
}

#[test]
fn lengths_stay_within_the_limits_with_heavy_tails_and_empty_pre() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let out = run_bin(
        &dir,
        "2",
        &["--users", "20000", "--in-len", "40", "--pre-len", "6"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (m, rows) = load(&dir);
    assert_eq!((m.schema.in_len, m.schema.pre_len), (40, 6));
    let n = rows.label.len() as f64;
    let max_in = *rows.in_lens.iter().max().unwrap();
    let max_pre = *rows.pre_lens.iter().max().unwrap();
    assert_eq!(max_in, 40);
    assert_eq!(max_pre, 6);
    let empty_pre = rows.pre_lens.iter().filter(|&&l| l == 0).count() as f64 / n;
    assert!(
        (0.10..=0.20).contains(&empty_pre),
        "empty pre share {empty_pre}"
    );
    // Heavy tail: some sequences reach the limit, most are far shorter.
    let at_limit = rows.in_lens.iter().filter(|&&l| l == 40).count() as f64 / n;
    let short = rows.in_lens.iter().filter(|&&l| l <= 20).count() as f64 / n;
    assert!(
        at_limit > 0.05 && short > 0.5,
        "at limit {at_limit}, short {short}"
    );
}

#[test]
fn stored_numbers_are_standardised_as_the_manifest_says() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let m = synth(&dir, 20_000, 4, 0.04);
    let (_, rows) = load(&dir);
    let fd = m.schema.f_num();
    let train: Vec<usize> = (0..rows.label.len())
        .filter(|&i| rows.split[i] == 0)
        .collect();
    for j in 0..fd {
        let v: Vec<f64> = train
            .iter()
            .map(|&i| rows.profile_num[i * fd + j] as f64)
            .collect();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let sd = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        assert!(
            mean.abs() < 0.05 && (sd - 1.0).abs() < 0.05,
            "profile {j}: {mean} {sd}"
        );
    }
    for (name, num) in [("pre", &rows.pre_num), ("in", &rows.in_num)] {
        for j in 0..2 {
            let v: Vec<f64> = num.iter().skip(j).step_by(2).map(|&x| x as f64).collect();
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let sd = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
            assert!(
                mean.abs() < 0.03 && (sd - 1.0).abs() < 0.03,
                "{name} {j}: {mean} {sd}"
            );
        }
    }
}

#[test]
fn in_service_behaviour_separates_the_classes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    synth(&dir, 20_000, 8, 0.1);
    let (_, rows) = load(&dir);
    // Share of late/missed payments (types 4, 5) among in-service events, per class.
    let (mut start, mut share) = (0usize, [[0.0f64; 2]; 2]);
    for (i, &len) in rows.in_lens.iter().enumerate() {
        let len = len as usize;
        let ev = &rows.in_cat[start * 4..(start + len) * 4];
        let late = ev
            .chunks_exact(4)
            .filter(|e| e[0] == 4 || e[0] == 5)
            .count();
        if len > 0 {
            let c = rows.label[i] as usize;
            share[c][0] += late as f64 / len as f64;
            share[c][1] += 1.0;
        }
        start += len;
    }
    let (good, bad) = (share[0][0] / share[0][1], share[1][0] / share[1][1]);
    assert!(bad > 2.0 * good, "late share good {good}, bad {bad}");
    // Hour ids stay in 1..168, the event types in 1..64.
    for cat in [&rows.pre_cat, &rows.in_cat] {
        assert!(cat.chunks_exact(4).all(|e| (1..64).contains(&e[0])));
        assert!(cat.chunks_exact(4).all(|e| (1..168).contains(&e[3])));
    }
}

#[test]
fn shards_are_exactly_what_safetensors_serialises() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let cfg = SynthConfig {
        users: 5000,
        seed: 9,
        shard_rows: Some(2000),
        ..SynthConfig::default()
    };
    let m = synthesize(&dir, &cfg).unwrap();
    assert_eq!(m.shards.len(), 3);
    for shard in &m.shards {
        let bytes = fs::read(dir.join(&shard.file)).unwrap();
        assert_eq!(bytes.len() as u64, shard.bytes);
        assert_eq!(mgkd::data::writer::sha256_hex(&bytes), shard.sha256);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let again = safetensors::tensor::serialize(st.tensors(), meta.metadata()).unwrap();
        assert!(again == bytes, "{} differs from serialize()", shard.file);
    }
}

#[test]
fn invalid_arguments_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, args) in [
        vec!["--users", "0"],
        vec!["--users", "10", "--default-rate", "0"],
        vec!["--users", "10", "--default-rate", "1"],
        vec!["--users", "10", "--default-rate", "1.5"],
        vec!["--users", "10", "--default-rate", "-0.1"],
        vec!["--users", "10", "--default-rate", "NaN"],
        vec!["--users", "10", "--in-len", "0"],
        vec!["--users", "10", "--shard-mib", "0"],
        vec!["--users", "10", "--split", "80,10"],
        vec!["--users", "10", "--split", "80,10,20"],
        vec!["--users", "10", "--split", "0,50,50"],
        vec!["--users", "10", "--split", "80,10,x"],
        vec!["--users", "10", "--risk-shift", "6"],
        vec!["--users", "10", "--activity-shift", "NaN"],
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tmp.path().join(format!("bad{i}"));
        let out = run_bin(&dir, "2", &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains("error"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(!dir.join(MANIFEST_FILE).exists());
    }
    // A directory that already holds a dataset is refused too.
    let dir = tmp.path().join("full");
    synth(&dir, 100, 1, 0.04);
    let out = run_bin(&dir, "2", &["--users", "100"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a dataset"));
}

#[test]
fn a_shifted_cohort_keeps_the_schema_and_moves_risk_and_activity() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let zero = tmp.path().join("zero");
    let shifted = tmp.path().join("shifted");
    let cfg = |risk_shift, activity_shift| SynthConfig {
        users: 20_000,
        seed: 4,
        risk_shift,
        activity_shift,
        ..SynthConfig::default()
    };
    let mb = synthesize(&base, &cfg(0.0, 0.0)).unwrap();
    // A shift of 0 is the standard cohort, bit for bit (same draws).
    let mz = synthesize(&zero, &cfg(0.0, 0.0)).unwrap();
    assert_eq!(mb.shards[0].sha256, mz.shards[0].sha256);
    let ms = synthesize(&shifted, &cfg(1.0, 1.0)).unwrap();
    // Same schema and normalisation: a model of the standard cohort scores this one.
    assert_eq!(ms.schema, mb.schema);
    assert!(
        ms.source.contains("--risk-shift 1 --activity-shift 1"),
        "{}",
        ms.source
    );
    let (_, rb) = load(&base);
    let (_, rs) = load(&shifted);
    let rate = |r: &Rows| r.label.iter().map(|&y| f64::from(y)).sum::<f64>() / r.label.len() as f64;
    assert!(
        rate(&rs) > 2.5 * rate(&rb),
        "{} vs {}",
        rate(&rs),
        rate(&rb)
    );
    let mean_len = |r: &Rows| r.pre_lens.iter().sum::<u64>() as f64 / r.pre_lens.len() as f64;
    assert!(
        mean_len(&rs) > 1.3 * mean_len(&rb),
        "{} vs {}",
        mean_len(&rs),
        mean_len(&rb)
    );
    // txn_count_90d (profile field 18) loads 0.6 on activity: its stored mean moves by 0.6.
    let mean_field = |r: &Rows, f: usize| {
        let v: Vec<f64> = r.profile_num.chunks(32).map(|p| f64::from(p[f])).collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    let moved = mean_field(&rs, 18) - mean_field(&rb, 18);
    assert!((moved - 0.6).abs() < 0.05, "txn_count_90d moved by {moved}");
    assert_eq!(mb.schema.profile_num[18].name, "txn_count_90d");
}

/// Rank AUC of `score` for the positive `label`s (ties count half).
fn rank_auc(score: &[f32], label: &[u8]) -> f64 {
    let mut order: Vec<usize> = (0..score.len()).collect();
    order.sort_by(|&a, &b| score[a].total_cmp(&score[b]));
    let (mut rank_sum, mut i) = (0.0f64, 0usize);
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && score[order[j + 1]] == score[order[i]] {
            j += 1;
        }
        let mid = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += (i..=j).filter(|&k| label[order[k]] == 1).count() as f64 * mid;
        i = j + 1;
    }
    let pos = label.iter().filter(|&&y| y == 1).count() as f64;
    let neg = label.len() as f64 - pos;
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

#[test]
fn the_latents_file_holds_each_rows_hidden_truth_and_leaves_the_data_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let (with, without) = (tmp.path().join("with"), tmp.path().join("without"));
    let latents = tmp.path().join("latents.csv");
    let args = ["--users", "6000", "--seed", "5", "--default-rate", "0.1"];
    let lat = latents.to_str().unwrap();
    let mut with_args = args.to_vec();
    with_args.extend(["--latents", lat, "--shard-rows", "2500"]);
    let mut without_args = args.to_vec();
    without_args.extend(["--shard-rows", "2500"]);
    for (dir, extra) in [(&with, &with_args), (&without, &without_args)] {
        let out = run_bin(dir, "2", extra);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            said.contains("latents in"),
            extra.contains(&"--latents"),
            "{said}"
        );
    }
    // The dataset is the same with or without the latents file.
    let manifest = Manifest::load(&with).expect("the manifest written with --latents");
    for shard in &manifest.shards {
        let read = |dir: &Path| fs::read(dir.join(&shard.file)).expect("a shard synth wrote");
        assert_eq!(read(&with), read(&without), "{}", shard.file);
    }
    let (_, rows) = load(&with);
    let text = fs::read_to_string(&latents).expect("the --latents file");
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("row,split,label,risk,style,activity,default_probability")
    );
    let bias = solve_bias(LABEL_SLOPE, 0.1).unwrap() as f32;
    let (mut risk, mut prob) = (Vec::new(), Vec::new());
    for (i, line) in lines.enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 7, "line {}: {line}", i + 2);
        assert_eq!(f[0], i.to_string());
        assert_eq!(f[1], ["train", "valid", "test"][rows.split[i] as usize]);
        assert_eq!(f[2], rows.label[i].to_string());
        let v: Vec<f32> = f[3..]
            .iter()
            .map(|x| {
                x.parse()
                    .unwrap_or_else(|e| panic!("line {}: {x}: {e}", i + 2))
            })
            .collect();
        assert!(v.iter().all(|x| x.is_finite()), "line {}: {line}", i + 2);
        let expect = 1.0 / (1.0 + (-(LABEL_SLOPE as f32 * v[0] + bias)).exp());
        assert_eq!(v[3], expect, "line {}: σ(A·r + b)", i + 2);
        risk.push(v[0]);
        prob.push(v[3]);
    }
    assert_eq!(risk.len(), rows.label.len());
    // The risk is what drives the label: the mean probability is the default rate, and
    // the risk ranks defaulters far better than any input can (Bayes AUC ≈ 0.93).
    let mean = prob.iter().map(|&p| p as f64).sum::<f64>() / prob.len() as f64;
    assert!((mean - 0.1).abs() < 0.01, "mean default probability {mean}");
    let auc = rank_auc(&risk, &rows.label);
    assert!(auc > 0.88 && auc < 0.97, "AUC of the latent risk {auc}");
}

#[test]
fn a_latents_file_inside_the_dataset_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let inside = dir.join("latents.csv");
    let out = run_bin(
        &dir,
        "2",
        &["--users", "100", "--latents", inside.to_str().unwrap()],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--latents") && stderr.contains("inside"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!dir.join(MANIFEST_FILE).exists());
    assert!(!inside.exists());
}
