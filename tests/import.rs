//! Tests of `mgkd-train import` (src/data/import): the long-layout fixture read back from the
//! raw safetensors shards and checked against an independent reading of the CSV files, the
//! Taiwan file, an unlabelled import, and every kind of bad input.

mod skip;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use mgkd::data::import::{self, ImportConfig, Vocabularies};
use mgkd::data::Manifest;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

// ---------------------------------------------------------------------------------------
// Reading a dataset back, straight from the shards.

/// All shards of a dataset concatenated (offsets rebased).
#[derive(Debug, Default)]
struct Data {
    label: Option<Vec<u8>>,
    split: Vec<u8>,
    profile_num: Vec<f32>,
    profile_cat: Vec<u32>,
    pre_offsets: Vec<u64>,
    pre_cat: Vec<u32>,
    pre_num: Vec<f32>,
    in_offsets: Vec<u64>,
    in_cat: Vec<u32>,
    in_num: Vec<f32>,
    user_ids: Vec<String>,
}

fn tensor<T: bytemuck::Pod>(st: &SafeTensors<'_>, name: &str, dtype: Dtype) -> Vec<T> {
    let t = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("tensor {name}: {e:?}"));
    assert_eq!(t.dtype(), dtype, "dtype of {name}");
    bytemuck::pod_collect_to_vec(t.data())
}

fn append_offsets(all: &mut Vec<u64>, part: &[u64]) {
    let base = all.last().copied().unwrap_or(0);
    if all.is_empty() {
        all.push(0);
    }
    assert_eq!(part[0], 0);
    all.extend(part[1..].iter().map(|o| o + base));
}

fn read_dataset(dir: &Path) -> (Manifest, Data) {
    let m = Manifest::load(dir).unwrap();
    let mut d = Data {
        label: m.has_label.then(Vec::new),
        ..Data::default()
    };
    for shard in &m.shards {
        let bytes = std::fs::read(dir.join(&shard.file)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.names().iter().any(|n| *n == "label"), m.has_label);
        if let Some(l) = &mut d.label {
            l.extend(tensor::<u8>(&st, "label", Dtype::U8));
        }
        d.split.extend(tensor::<u8>(&st, "split", Dtype::U8));
        d.profile_num
            .extend(tensor::<f32>(&st, "profile_num", Dtype::F32));
        d.profile_cat
            .extend(tensor::<u32>(&st, "profile_cat", Dtype::U32));
        append_offsets(
            &mut d.pre_offsets,
            &tensor::<u64>(&st, "pre_offsets", Dtype::U64),
        );
        d.pre_cat.extend(tensor::<u32>(&st, "pre_cat", Dtype::U32));
        d.pre_num.extend(tensor::<f32>(&st, "pre_num", Dtype::F32));
        append_offsets(
            &mut d.in_offsets,
            &tensor::<u64>(&st, "in_offsets", Dtype::U64),
        );
        d.in_cat.extend(tensor::<u32>(&st, "in_cat", Dtype::U32));
        d.in_num.extend(tensor::<f32>(&st, "in_num", Dtype::F32));
        let off = tensor::<u64>(&st, "user_id_offsets", Dtype::U64);
        let bytes = tensor::<u8>(&st, "user_id_bytes", Dtype::U8);
        for w in off.windows(2) {
            let s = std::str::from_utf8(&bytes[w[0] as usize..w[1] as usize]).unwrap();
            d.user_ids.push(s.to_string());
        }
    }
    assert_eq!(d.split.len() as u64, m.rows);
    (m, d)
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/import")
}

fn slog1p(x: f64) -> f64 {
    x.signum() * x.abs().ln_1p()
}

/// Population mean and std (1 when 0), the importer's definition, computed directly.
fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    (mean, if var > 0.0 { var.sqrt() } else { 1.0 })
}

/// Ids by descending count then value, for counts ≥ `min`.
fn expected_vocab(counts: &HashMap<String, u64>, min: u64) -> HashMap<String, u32> {
    let mut kept: Vec<(&String, &u64)> = counts.iter().filter(|(_, &c)| c >= min).collect();
    kept.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    kept.iter()
        .enumerate()
        .map(|(i, (v, _))| ((*v).clone(), i as u32 + 1))
        .collect()
}

fn vocab_map(v: &Vocabularies, event: bool, name: &str) -> HashMap<String, u32> {
    let list = if event { &v.event_cat } else { &v.profile_cat };
    let f = list.iter().find(|f| f.name == name).unwrap();
    f.ids.iter().map(|(k, v)| (k.clone(), *v)).collect()
}

// ---------------------------------------------------------------------------------------
// The long-layout fixture.

/// One event of the fixture, as read independently of the importer.
#[derive(Debug, Clone)]
struct Ev {
    t: f64,
    kind: String,
    channel: String,
    amount: f64,
    balance: f64,
}

struct Fixture {
    ids: Vec<String>,
    act: Vec<f64>,
    label: Vec<u8>,
    split: Vec<u8>,
    income: Vec<f64>,
    age: Vec<f64>,
    region: Vec<String>,
    /// Per user: (pre events, in events), time order, ties in file order.
    seqs: Vec<(Vec<Ev>, Vec<Ev>)>,
    dropped: u64,
}

fn read_fixture(window: f64) -> Fixture {
    let dir = fixtures();
    let mut r = csv::Reader::from_path(dir.join("users.csv")).unwrap();
    let mut f = Fixture {
        ids: vec![],
        act: vec![],
        label: vec![],
        split: vec![],
        income: vec![],
        age: vec![],
        region: vec![],
        seqs: vec![],
        dropped: 0,
    };
    for rec in r.records() {
        let rec = rec.unwrap();
        f.ids.push(rec[0].to_string());
        f.act.push(rec[1].parse().unwrap());
        f.label.push(rec[2].parse().unwrap());
        f.split.push(match &rec[3] {
            "train" | "0" => 0,
            "valid" | "1" => 1,
            "test" | "2" => 2,
            s => panic!("fold {s}"),
        });
        f.income.push(rec[4].parse().unwrap_or(0.0));
        f.region.push(rec[5].to_string());
        f.age.push(rec[6].parse().unwrap());
    }
    let mut per_user: Vec<Vec<Ev>> = vec![vec![]; f.ids.len()];
    let mut r = csv::Reader::from_path(dir.join("events.csv")).unwrap();
    for rec in r.records() {
        let rec = rec.unwrap();
        let u = f.ids.iter().position(|i| i == &rec[0]).unwrap();
        per_user[u].push(Ev {
            t: rec[1].parse().unwrap(),
            kind: rec[2].to_string(),
            channel: rec[3].to_string(),
            amount: rec[4].parse().unwrap(),
            balance: rec[5].parse().unwrap_or(0.0),
        });
    }
    for (u, mut evs) in per_user.into_iter().enumerate() {
        evs.sort_by(|a, b| a.t.partial_cmp(&b.t).unwrap()); // stable
        let a = f.act[u];
        let pre: Vec<Ev> = evs.iter().filter(|e| e.t < a).cloned().collect();
        let inn: Vec<Ev> = evs
            .iter()
            .filter(|e| e.t >= a && e.t < a + window)
            .cloned()
            .collect();
        f.dropped += (evs.len() - pre.len() - inn.len()) as u64;
        f.seqs.push((pre, inn));
    }
    f
}

#[test]
fn long_fixture_round_trip() {
    let out = tempfile::tempdir().unwrap();
    let out = out.path().join("ds");
    // Rows per shard 7: three shards, so offsets and ids cross shard boundaries.
    let summary = import::import(&fixtures().join("long.toml"), &out, Some(7)).unwrap();
    let (m, d) = read_dataset(&out);
    let fx = read_fixture(30.0);
    let n = fx.ids.len();
    assert_eq!(n, 20);
    assert_eq!(m.rows, 20);
    assert_eq!(m.shards.len(), 3);
    assert!(m.has_user_id && m.has_label);
    assert_eq!(d.user_ids, fx.ids);
    assert_eq!(d.label.as_ref().unwrap(), &fx.label);
    assert_eq!(d.split, fx.split);
    assert_eq!(summary.dropped_events, fx.dropped);
    assert!(fx.dropped >= 2);

    // Event assignment: counts per user match the independent reading.
    for u in 0..n {
        let pre = (d.pre_offsets[u + 1] - d.pre_offsets[u]) as usize;
        let inn = (d.in_offsets[u + 1] - d.in_offsets[u]) as usize;
        assert_eq!(pre, fx.seqs[u].0.len(), "pre events of {}", fx.ids[u]);
        assert_eq!(inn, fx.seqs[u].1.len(), "in events of {}", fx.ids[u]);
    }
    let idx = |id: &str| fx.ids.iter().position(|i| i == id).unwrap();
    // The special users of the fixture.
    let (u05, u07, u09, u12) = (idx("u05"), idx("u07"), idx("u09"), idx("u12"));
    assert_eq!(
        fx.seqs[u05].0.len() + fx.seqs[u05].1.len(),
        0,
        "u05 has no events"
    );
    assert!(fx.seqs[u07].0.is_empty() && !fx.seqs[u07].1.is_empty());
    assert!(!fx.seqs[u09].0.is_empty() && fx.seqs[u09].1.is_empty());
    // u12: an event exactly at activation is in-service, one at activation + window is not.
    assert!(fx.seqs[u12].1.iter().any(|e| e.t == fx.act[u12]));
    assert!(fx.seqs[u12].1.iter().all(|e| e.t < fx.act[u12] + 30.0));
    assert_eq!(
        m.schema.pre_len,
        fx.seqs.iter().map(|s| s.0.len()).max().unwrap()
    );
    assert_eq!(
        m.schema.in_len,
        fx.seqs.iter().map(|s| s.1.len()).max().unwrap()
    );

    // Vocabularies: from the train split only, descending frequency then value.
    let vocab = Vocabularies::load(&out).unwrap();
    let mut kind_counts = HashMap::new();
    let mut channel_counts = HashMap::new();
    let mut region_counts = HashMap::new();
    let (mut amounts, mut balances, mut incomes) = (vec![], vec![], vec![]);
    for u in (0..n).filter(|&u| fx.split[u] == 0) {
        *region_counts.entry(fx.region[u].clone()).or_insert(0) += 1;
        incomes.push(slog1p(fx.income[u]));
        for e in fx.seqs[u].0.iter().chain(&fx.seqs[u].1) {
            *kind_counts.entry(e.kind.clone()).or_insert(0) += 1;
            *channel_counts.entry(e.channel.clone()).or_insert(0) += 1;
            amounts.push(slog1p(e.amount));
            balances.push(e.balance);
        }
    }
    let kind_ids = expected_vocab(&kind_counts, 1);
    let channel_ids = expected_vocab(&channel_counts, 2);
    let region_ids = expected_vocab(&region_counts, 1);
    assert_eq!(vocab_map(&vocab, true, "kind"), kind_ids);
    assert_eq!(vocab_map(&vocab, true, "channel"), channel_ids);
    assert_eq!(vocab_map(&vocab, false, "region"), region_ids);
    // The fixture's traps: "fee" only in test users, "phone" once in train (min_count 2),
    // "island" only in a valid user.
    assert!(!kind_ids.contains_key("fee") && !channel_ids.contains_key("phone"));
    assert!(!region_ids.contains_key("island"));
    assert_eq!(m.schema.event_cat[0].vocab as usize, kind_ids.len() + 1);
    assert_eq!(m.schema.event_cat[1].vocab as usize, channel_ids.len() + 1);
    assert_eq!(m.schema.profile_cat[0].vocab as usize, region_ids.len() + 1);

    // Standardisation statistics.
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * (1.0 + b.abs());
    let (am, asd) = mean_std(&amounts);
    let (bm, bsd) = mean_std(&balances);
    let (im, isd) = mean_std(&incomes);
    let ev = &m.schema.event_num;
    assert!(ev[0].log1p && !ev[1].log1p);
    assert_eq!(ev[1].name, "bal");
    assert!(
        close(ev[0].mean, am) && close(ev[0].std, asd),
        "{:?}",
        ev[0]
    );
    assert!(
        close(ev[1].mean, bm) && close(ev[1].std, bsd),
        "{:?}",
        ev[1]
    );
    let pn = &m.schema.profile_num;
    assert!(
        close(pn[0].mean, im) && close(pn[0].std, isd),
        "{:?}",
        pn[0]
    );

    // Every stored event, in order: ids and standardised numbers.
    let f32_eq = |a: f32, b: f64| (a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs());
    for u in 0..n {
        for (evs, off, cat, num) in [
            (&fx.seqs[u].0, &d.pre_offsets, &d.pre_cat, &d.pre_num),
            (&fx.seqs[u].1, &d.in_offsets, &d.in_cat, &d.in_num),
        ] {
            for (k, e) in evs.iter().enumerate() {
                let j = off[u] as usize + k;
                assert_eq!(cat[2 * j], kind_ids.get(&e.kind).copied().unwrap_or(0));
                assert_eq!(
                    cat[2 * j + 1],
                    channel_ids.get(&e.channel).copied().unwrap_or(0)
                );
                assert!(
                    f32_eq(num[2 * j], (slog1p(e.amount) - am) / asd),
                    "user {u} event {k}"
                );
                assert!(f32_eq(num[2 * j + 1], (e.balance - bm) / bsd));
            }
        }
        assert_eq!(
            d.profile_cat[u],
            region_ids.get(&fx.region[u]).copied().unwrap_or(0)
        );
        assert!(f32_eq(
            d.profile_num[2 * u],
            (slog1p(fx.income[u]) - im) / isd
        ));
        assert!(f32_eq(
            d.profile_num[2 * u + 1],
            (fx.age[u] - pn[1].mean) / pn[1].std
        ));
    }
    // Ties keep file order: u01's two extra events at the same time, amounts 11 then 22.
    let u01 = idx("u01");
    let all: Vec<f64> = fx.seqs[u01]
        .0
        .iter()
        .chain(&fx.seqs[u01].1)
        .map(|e| e.amount)
        .collect();
    let (p11, p22) = (
        all.iter().position(|&a| a == 11.0).unwrap(),
        all.iter().position(|&a| a == 22.0).unwrap(),
    );
    assert_eq!(p22, p11 + 1);
    // Time order of every stored sequence (checked on the independent reading's times).
    for (pre, inn) in &fx.seqs {
        assert!(pre.windows(2).all(|w| w[0].t <= w[1].t));
        assert!(inn.windows(2).all(|w| w[0].t <= w[1].t));
    }
}

/// Writes `text` as a config into a fresh temp dir next to copies of the fixture CSVs,
/// after `edit_users` / `edit_events` changed their lines (index 0 = header = line 1).
fn case(
    config: &str,
    edit_users: impl FnOnce(&mut Vec<String>),
    edit_events: impl FnOnce(&mut Vec<String>),
) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    for (name, edit) in [
        (
            "users.csv",
            Box::new(edit_users) as Box<dyn FnOnce(&mut Vec<String>)>,
        ),
        ("events.csv", Box::new(edit_events)),
    ] {
        let text = std::fs::read_to_string(fixtures().join(name)).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        edit(&mut lines);
        std::fs::write(dir.path().join(name), lines.join("\n") + "\n").unwrap();
    }
    let path = dir.path().join("import.toml");
    std::fs::write(&path, config).unwrap();
    (dir, path)
}

fn fixture_config() -> String {
    std::fs::read_to_string(fixtures().join("long.toml")).unwrap()
}

#[test]
fn long_time_split_and_relative_paths() {
    let cfg = fixture_config()
        .replace(
            "method = \"column\"\ncolumn = \"fold\"",
            "method = \"time\"\nvalid_from = 150\ntest_from = 180",
        )
        .replace("window = 30\n", "");
    let (dir, path) = case(&cfg, |_| {}, |_| {});
    let out = dir.path().join("out");
    // Relative file names in the config are found next to it, whatever the cwd.
    let summary = import::import(&path, &out, None).unwrap();
    assert_eq!(summary.dropped_events, 0);
    let (m, d) = read_dataset(&out);
    let fx = read_fixture(f64::INFINITY);
    for u in 0..fx.ids.len() {
        let want = if fx.act[u] >= 180.0 {
            2
        } else if fx.act[u] >= 150.0 {
            1
        } else {
            0
        };
        assert_eq!(d.split[u], want);
        assert_eq!(
            (d.in_offsets[u + 1] - d.in_offsets[u]) as usize,
            fx.seqs[u].1.len()
        );
    }
    assert_eq!(
        m.splits[0].rows,
        d.split.iter().filter(|&&s| s == 0).count() as u64
    );
    assert!(m.splits.iter().all(|s| s.rows > 0));
}

#[test]
fn unlabelled_import_without_in_service_events() {
    // New applicants: no label column, activation = application time, only earlier events.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("apps.csv"),
        "id,applied,region,income\na1,100,north,5000\na2,200,south,\na3,300,north,7000\na4,400,east,100\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("ev.csv"),
        "id,t,kind,amount\na3,250,buy,10\na1,50,pay,20\na3,200,buy,30\na1,20,buy,40\n",
    )
    .unwrap();
    let cfg = r#"
layout = "long"
has_label = false
pre_len = 8
[users]
file = "apps.csv"
id = "id"
time = "applied"
[events]
file = "ev.csv"
id = "id"
time = "t"
[split]
seed = 3
[[profile_num]]
column = "income"
fill = 1000
[[profile_cat]]
column = "region"
[[event_cat]]
column = "kind"
[[event_num]]
column = "amount"
"#;
    let path = dir.path().join("apps.toml");
    std::fs::write(&path, cfg).unwrap();
    let out = dir.path().join("out");
    import::import(&path, &out, None).unwrap();
    let (m, d) = read_dataset(&out);
    assert!(!m.has_label && d.label.is_none());
    assert!(m.splits.iter().all(|s| s.positives == 0));
    assert_eq!(d.user_ids, ["a1", "a2", "a3", "a4"]);
    assert_eq!(d.pre_offsets, [0, 2, 2, 4, 4]);
    assert_eq!(d.in_offsets, [0, 0, 0, 0, 0]);
    assert_eq!((m.schema.pre_len, m.schema.in_len), (8, 1));
    // a1's events sorted by time: amounts 40 (t=20) then 20 (t=50).
    let f = &m.schema.event_num[0];
    let raw: Vec<f64> = d
        .pre_num
        .iter()
        .map(|&v| v as f64 * f.std + f.mean)
        .collect();
    let train: Vec<usize> = (0..4).filter(|&u| d.split[u] == 0).collect();
    if train.contains(&0) {
        assert!(
            (raw[0] - 40.0).abs() < 1e-3 && (raw[1] - 20.0).abs() < 1e-3,
            "{raw:?}"
        );
    }
    assert_eq!(d.split.iter().filter(|&&s| s == 0).count(), 3); // round(4 · 0.8)
}

// ---------------------------------------------------------------------------------------
// The Taiwan file.

fn shared_dir() -> PathBuf {
    match std::env::var_os("MGKD_SHARED") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"),
    }
}

#[test]
fn taiwan() {
    let csv_path = shared_dir().join("data/taiwan-credit/UCI_Credit_Card.csv");
    if !csv_path.exists() {
        skip::skip_unless_ci(&format!(
            "{} not found (the shared data: ../shared beside the repository, or MGKD_SHARED)",
            csv_path.display()
        ));
        return;
    }
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/import/taiwan.toml");
    let tmp = tempfile::tempdir().unwrap();
    let config = if std::env::var_os("MGKD_SHARED").is_some() {
        // The shipped config with its `../../../shared` pointed at MGKD_SHARED.
        let text = std::fs::read_to_string(&shipped)
            .unwrap()
            .replace("../../../shared", &shared_dir().display().to_string());
        ImportConfig::parse(&text, &tmp.path().join("taiwan.toml")).unwrap()
    } else {
        ImportConfig::load(&shipped).unwrap()
    };
    let out = tmp.path().join("taiwan");
    let start = std::time::Instant::now();
    import::import_config(&config, &out, None).unwrap();
    println!("Taiwan import: {:.3} s", start.elapsed().as_secs_f64());
    let (m, d) = read_dataset(&out);
    assert_eq!(m.rows, 30_000);
    let labels = d.label.as_ref().unwrap();
    assert_eq!(labels.iter().map(|&l| l as u64).sum::<u64>(), 6_636);
    let rows: Vec<u64> = m.splits.iter().map(|s| s.rows).collect();
    assert_eq!(rows, [24_000, 3_000, 3_000]);
    let overall = 6_636.0 / 30_000.0;
    for s in &m.splits {
        // Stratified: each split's rate within one default of the overall rate.
        assert!(
            (s.default_rate - overall).abs() <= 1.0 / s.rows as f64,
            "{s:?}"
        );
        let count = (0..30_000)
            .filter(|&i| d.split[i] == s.split && labels[i] == 1)
            .count() as u64;
        assert_eq!(count, s.positives);
    }
    assert!(d.pre_offsets.windows(2).all(|w| w[1] - w[0] == 1));
    assert!(d.in_offsets.windows(2).all(|w| w[1] - w[0] == 5));
    assert_eq!((m.schema.pre_len, m.schema.in_len), (1, 5));
    assert_eq!((m.schema.f_num(), m.schema.f_cat()), (2, 3));
    assert_eq!((m.schema.e_cat(), m.schema.e_num()), (1, 2));

    // Spot-check rows against the CSV: ids, PAY_6 (pre) then PAY_5..PAY_0 (in), amounts.
    let vocab = Vocabularies::load(&out).unwrap();
    let pay = vocab_map(&vocab, true, "PAY");
    let [bill, paid] = [&m.schema.event_num[0], &m.schema.event_num[1]];
    let mut r = csv::Reader::from_path(&csv_path).unwrap();
    let h = r.headers().unwrap().clone();
    let col = |name: &str| h.iter().position(|c| c == name).unwrap();
    for (i, rec) in r.records().enumerate().step_by(997) {
        let rec = rec.unwrap();
        assert_eq!(d.user_ids[i], &rec[col("ID")]);
        for (k, (p, b)) in [
            ("PAY_6", 6),
            ("PAY_5", 5),
            ("PAY_4", 4),
            ("PAY_3", 3),
            ("PAY_2", 2),
            ("PAY_0", 1),
        ]
        .iter()
        .enumerate()
        {
            let (cat, num, j) = if k == 0 {
                (&d.pre_cat, &d.pre_num, i)
            } else {
                (&d.in_cat, &d.in_num, 5 * i + k - 1)
            };
            assert_eq!(cat[j], pay[&rec[col(p)]], "row {i} {p}");
            let x: f64 = rec[col(&format!("BILL_AMT{b}"))].parse().unwrap();
            let y: f64 = rec[col(&format!("PAY_AMT{b}"))].parse().unwrap();
            assert!((num[2 * j] as f64 - (slog1p(x) - bill.mean) / bill.std).abs() < 1e-5);
            assert!((num[2 * j + 1] as f64 - (slog1p(y) - paid.mean) / paid.std).abs() < 1e-5);
        }
    }

    // Deterministic: a second import gives identical shards.
    let out2 = tmp.path().join("taiwan2");
    import::import_config(&config, &out2, None).unwrap();
    let m2 = Manifest::load(&out2).unwrap();
    assert_eq!(m.shards, m2.shards);
}

// ---------------------------------------------------------------------------------------
// Bad input.

/// Runs the library import of a broken case; returns the message. The output directory
/// must not exist afterwards.
fn fails(path: &Path) -> String {
    let out = path.parent().unwrap().join("out");
    let err = import::import(path, &out, None).expect_err("import should fail");
    assert!(!out.exists(), "output left behind");
    err.to_string()
}

fn replace_line(i: usize, from: &'static str, to: &'static str) -> impl FnOnce(&mut Vec<String>) {
    move |l: &mut Vec<String>| {
        assert!(l[i].contains(from), "{} lacks {from}", l[i]);
        l[i] = l[i].replacen(from, to, 1);
    }
}

fn assert_names(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} lacks {p:?}");
    }
    assert!(!msg.contains("panicked"));
}

#[test]
fn bad_cells_name_file_line_and_column() {
    let cfg = fixture_config();
    // users.csv line 5 = u04: `u04,120,0,train,23420,south,44`.
    let (_d, p) = case(&cfg, replace_line(4, ",23420,", ",12x,"), |_| {});
    assert_names(
        &fails(&p),
        &["users.csv", "line 5", "column `income`", "12x"],
    );
    let (_d, p) = case(&cfg, replace_line(4, ",44", ",NaN"), |_| {});
    assert_names(&fails(&p), &["users.csv", "line 5", "column `age`", "fill"]);
    let (_d, p) = case(&cfg, replace_line(4, ",44", ",inf"), |_| {});
    assert_names(
        &fails(&p),
        &["users.csv", "line 5", "column `age`", "not finite"],
    );
    let (_d, p) = case(&cfg, replace_line(4, "120,0,", "120,2,"), |_| {});
    assert_names(
        &fails(&p),
        &["users.csv", "line 5", "column `defaulted`", "not 0 or 1"],
    );
    let (_d, p) = case(&cfg, replace_line(4, "u04,", "u02,"), |_| {});
    assert_names(
        &fails(&p),
        &[
            "users.csv",
            "line 5",
            "column `user_id`",
            "duplicate",
            "line 3",
        ],
    );
    let (_d, p) = case(&cfg, replace_line(4, ",south,", ",,"), |_| {});
    assert_names(
        &fails(&p),
        &[
            "users.csv",
            "line 5",
            "column `region`",
            "empty categorical",
        ],
    );
    let (_d, p) = case(&cfg, replace_line(4, ",train,", ",training,"), |_| {});
    assert_names(&fails(&p), &["users.csv", "line 5", "column `fold`"]);
    let (_d, p) = case(&cfg, replace_line(4, "u04,120,", "u04,,"), |_| {});
    assert_names(
        &fails(&p),
        &["users.csv", "line 5", "column `activated_at`"],
    );
    let (_d, p) = case(&cfg, replace_line(4, ",44", ",44,9"), |_| {});
    assert_names(&fails(&p), &["users.csv", "line 5", "fields"]);
    // events.csv line 3, an event of u03 at t=102.
    let (_d, p) = case(&cfg, |_| {}, replace_line(2, "u03,", "nobody,"));
    assert_names(
        &fails(&p),
        &["events.csv", "line 3", "column `uid`", "nobody"],
    );
    let (_d, p) = case(&cfg, |_| {}, replace_line(2, ",102,", ",soon,"));
    assert_names(&fails(&p), &["events.csv", "line 3", "column `ts`"]);
    let (_d, p) = case(&cfg, |_| {}, replace_line(2, ",web,", ",,"));
    assert_names(&fails(&p), &["events.csv", "line 3", "column `channel`"]);
    let (_d, p) = case(&cfg, |_| {}, replace_line(2, ",-2029,", ",,"));
    assert_names(&fails(&p), &["events.csv", "line 3", "column `amount`"]);
    // An empty balance is filled (config `fill = 0`), NaN too: not errors.
    let (d, p) = case(&cfg, |_| {}, replace_line(2, ",13038", ",NaN"));
    import::import(&p, &d.path().join("ok"), None).unwrap();
    // A quoted cell spanning two lines: the error is on the record's first line.
    let (_d, p) = case(
        &cfg,
        |l| {
            l[3] = "u03,115,0,0,15910,\"we\nst\",25".into();
            l[4] = l[4].replacen(",44", ",x", 1);
        },
        |_| {},
    );
    assert_names(&fails(&p), &["users.csv", "line 6", "column `age`"]);
}

/// Moves the users file's `region` column (a categorical text column) to the end, where a
/// runaway quote makes a record of full length: the case that imported with exit 0.
#[allow(clippy::ptr_arg)] // the shape of `case`'s line editors
fn region_last(l: &mut Vec<String>) {
    for line in l.iter_mut() {
        let mut f: Vec<&str> = line.split(',').collect();
        let region = f.remove(5);
        f.push(region);
        *line = f.join(",");
    }
}

#[test]
fn stray_quotes_name_the_opening_quote() {
    let cfg = fixture_config();
    // The control: the reordered file imports.
    let (d, p) = case(&cfg, region_last, |_| {});
    let summary = import::import(&p, &d.path().join("ok"), None).unwrap();
    assert_eq!(summary.manifest.rows, 20);
    // A quote opened on the last line (u20) and never closed: was imported silently.
    let (_d, p) = case(
        &cfg,
        |l| {
            region_last(l);
            l[20] = l[20].replacen(",north", ",\"north", 1);
        },
        |_| {},
    );
    assert_names(
        &fails(&p),
        &[
            "users.csv",
            "line 21",
            "column `region`",
            "character 25",
            "never closed",
        ],
    );
    // One line earlier (u19): u20 was swallowed into u19's cell, and the error blamed the
    // events file (u20's events had no user).
    let (_d, p) = case(
        &cfg,
        |l| {
            region_last(l);
            l[19] = l[19].replacen(",west", ",\"west", 1);
        },
        |_| {},
    );
    let msg = fails(&p);
    assert_names(
        &msg,
        &[
            "users.csv",
            "line 20",
            "column `region`",
            "character 22",
            "lines 20–21",
        ],
    );
    assert!(!msg.contains("events.csv"), "{msg}");
    // In the original order the runaway cell makes a short record; the quote is still named
    // rather than the field count.
    let (_d, p) = case(&cfg, replace_line(2, ",east,", ",\"east,"), |_| {});
    assert_names(
        &fails(&p),
        &["users.csv", "line 3", "column `region`", "never closed"],
    );
    // A stray quote that a later quoted cell "closes": text after the closing quote.
    let (_d, p) = case(
        &cfg,
        |l| {
            region_last(l);
            l[3] = l[3].replacen(",west", ",\"west", 1);
            l[6] = l[6].replacen(",east", ",\"east\"", 1);
            l[8] = l[8].replacen(",south", ",\"so\"uth", 1);
        },
        |_| {},
    );
    assert_names(
        &fails(&p),
        &["users.csv", "line 4", "column `region`", "followed by"],
    );
    // A quote in the events file names the events file.
    let (_d, p) = case(&cfg, |_| {}, replace_line(40, ",", ",\""));
    assert_names(&fails(&p), &["events.csv", "line 41", "never closed"]);
    // A quote in the header line.
    let (_d, p) = case(&cfg, replace_line(0, "fold", "\"fold"), |_| {});
    assert_names(&fails(&p), &["users.csv", "line 1", "never closed"]);
    // Well-formed quoting still imports: quoted cells, "" inside them, a multi-line cell.
    let (d, p) = case(
        &cfg,
        |l| {
            region_last(l);
            l[2] = l[2].replacen(",east", ",\"east\"", 1);
            l[3] = l[3].replacen(",west", ",\"we\nst\"", 1);
            l[4] = l[4].replacen(",south", ",\"so\"\"uth\"", 1);
        },
        |_| {},
    );
    let summary = import::import(&p, &d.path().join("ok"), None).unwrap();
    assert_eq!(summary.manifest.rows, 20);
    let vocab = Vocabularies::load(&d.path().join("ok")).unwrap();
    let region = vocab_map(&vocab, false, "region");
    assert!(region.contains_key("we\nst") && region.contains_key("so\"uth"));
}

#[test]
fn unreadable_and_empty_files() {
    let cfg = fixture_config().replace("events.csv", "missing-events.csv");
    let (_d, p) = case(&cfg, |_| {}, |_| {});
    assert_names(&fails(&p), &["missing-events.csv"]);
    let (_d, p) = case(&fixture_config(), |l| l.clear(), |_| {});
    assert_names(&fails(&p), &["users.csv", "line 1"]);
    let (_d, p) = case(
        &fixture_config(),
        |l| l[2] = "u02,110,1,train,\u{0}".into(),
        |_| {},
    );
    assert_names(&fails(&p), &["users.csv", "line 3"]);
    let missing = Path::new("/nonexistent/dir/import.toml");
    let err = import::import(missing, Path::new("/nonexistent/out"), None).unwrap_err();
    assert_names(&err.to_string(), &["/nonexistent/dir/import.toml"]);
}

#[test]
fn config_errors_name_file_and_key() {
    let base = fixture_config();
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            base.replace("window = 30", "windw = 30"),
            vec!["import.toml", "windw"],
        ),
        (
            base.replace("column = \"age\"", "column = \"agee\""),
            vec!["import.toml", "profile_num[1].column", "agee", "users.csv"],
        ),
        (
            base.replace("column = \"balance\"", "column = \"bal_x\""),
            vec!["import.toml", "event_num[1].column", "events.csv"],
        ),
        (
            base.replace("label = \"defaulted\"\n", ""),
            vec!["import.toml", "users.label"],
        ),
        (
            base.replace("time = \"activated_at\"\n", ""),
            vec!["import.toml", "users.time"],
        ),
        (
            base.replace("layout = \"long\"", "layout = \"tall\""),
            vec!["import.toml", "tall"],
        ),
        (
            base.replace("min_count = 1", "min_count = 0"),
            vec!["import.toml", "min_count"],
        ),
        (
            base.replace("column = \"fold\"", "column = \"fold\"\nseed = 1"),
            vec!["import.toml", "split.seed"],
        ),
        (
            base.replace(
                "fill = 0\n\n[[profile_num]]",
                "fill = nan\n\n[[profile_num]]",
            ),
            vec!["import.toml", "profile_num[0].fill"],
        ),
    ];
    for (text, parts) in cases {
        let (_d, p) = case(&text, |_| {}, |_| {});
        assert_names(&fails(&p), &parts);
    }
}

#[test]
fn wide_config_errors() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/import/taiwan.toml");
    let text = std::fs::read_to_string(shipped).unwrap();
    let p = Path::new("/x/taiwan.toml");
    let err = |t: String| ImportConfig::parse(&t, p).unwrap_err().to_string();
    let e = err(text.replacen("PAY_AMT = \"PAY_AMT6\"", "PAY_AMNT = \"PAY_AMT6\"", 1));
    assert_names(&e, &["/x/taiwan.toml", "steps[0].columns.PAY_AMNT"]);
    let e = err(text
        .replacen("phase = \"in\"", "phase = \"pre\"", 2)
        .replacen("phase = \"pre\"", "phase = \"in\"", 1));
    assert_names(&e, &["steps[1].phase"]);
    // The columns themselves are checked against the header when the file is read.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("w.csv"),
        "ID,y,P1,P2,A1,A2\n1,0,0,1,5,6\n2,1,1,1,7,\n",
    )
    .unwrap();
    let cfg = r#"
layout = "wide"
[users]
file = "w.csv"
id = "ID"
label = "y"
[[event_cat]]
name = "P"
[[event_num]]
name = "A"
[[steps]]
phase = "pre"
columns = { P = "P1", A = "A1" }
[[steps]]
phase = "in"
columns = { P = "P2", A = "A3" }
"#;
    let path = dir.path().join("w.toml");
    std::fs::write(&path, cfg).unwrap();
    assert_names(
        &fails(&path),
        &["w.toml", "steps[1].columns.A", "A3", "w.csv"],
    );
    std::fs::write(&path, cfg.replace("\"A3\"", "\"A2\"")).unwrap();
    assert_names(&fails(&path), &["w.csv", "line 3", "column `A2`"]);
    std::fs::write(
        &path,
        cfg.replace("\"A3\"", "\"A2\"")
            .replace("name = \"A\"", "name = \"A\"\nfill = -1"),
    )
    .unwrap();
    import::import(&path, &dir.path().join("ok"), None).unwrap();
}

#[test]
fn binary_reports_errors_and_leaves_nothing() {
    let bin = env!("CARGO_BIN_EXE_mgkd-train");
    let cfg = fixture_config();
    let cases: Vec<(tempfile::TempDir, PathBuf, Vec<&str>)> = vec![
        {
            let (d, p) = case(&cfg, replace_line(7, ",train,", ",train,x"), |_| {});
            (d, p, vec!["users.csv", "line 8", "column `income`"])
        },
        {
            let (d, p) = case(&cfg, |_| {}, replace_line(9, "u", "zz"));
            (d, p, vec!["events.csv", "line 10", "column `uid`"])
        },
        {
            let (d, p) = case(&cfg.replace("[split]", "[split]\nsed = 4"), |_| {}, |_| {});
            (d, p, vec!["import.toml", "sed"])
        },
    ];
    for (dir, path, parts) in cases {
        // An existing, empty output directory stays empty.
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let o = Command::new(bin)
            .args(["import", "--config"])
            .arg(&path)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert_names(&stderr, &parts);
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "{stderr}");
    }
    // And a good run through the binary.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    let o = Command::new(bin)
        .args(["import", "--config"])
        .arg(fixtures().join("long.toml"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("dataset.json").exists() && out.join("vocab.json").exists());
    // A second import into the same directory is refused and keeps the dataset.
    let o = Command::new(bin)
        .args(["import", "--config"])
        .arg(fixtures().join("long.toml"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    Manifest::load(&out).unwrap();
}

#[test]
fn scoring_data_reuses_the_training_encoding() {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train");
    import::import(&fixtures().join("long.toml"), &train, None).unwrap();
    let (tm, _) = read_dataset(&train);
    let tv = Vocabularies::load(&train).unwrap();
    // New applicants with the training columns, minus label and fold.
    std::fs::write(
        dir.path().join("users.csv"),
        "user_id,activated_at,income,region,age\nn1,500,3000,east,33\nn2,510,70000,mars,51\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("events.csv"),
        "uid,ts,kind,channel,amount,balance\nn1,400,buy,web,10,100\nn2,515,teleport,branch,-5,\n",
    )
    .unwrap();
    let cfg = fixture_config()
        .replace(
            "layout = \"long\"",
            "layout = \"long\"\nhas_label = false\nencoding_from = \"train\"",
        )
        .replace("label = \"defaulted\"\n", "")
        .replace("method = \"column\"\ncolumn = \"fold\"", "seed = 1");
    let path = dir.path().join("import.toml");
    std::fs::write(&path, &cfg).unwrap();
    // A per-field min_count makes no sense when the vocabulary is reused.
    assert_names(&fails(&path), &["import.toml", "event_cat[1].min_count"]);
    std::fs::write(&path, cfg.replace("min_count = 2\n", "")).unwrap();
    let out = dir.path().join("new");
    import::import(&path, &out, None).unwrap();
    let (m, d) = read_dataset(&out);
    assert_eq!(
        m.schema, tm.schema,
        "same fields, vocabularies, statistics and limits"
    );
    assert_eq!(Vocabularies::load(&out).unwrap(), tv);
    let region = vocab_map(&tv, false, "region");
    let kind = vocab_map(&tv, true, "kind");
    assert_eq!(
        d.profile_cat,
        [region["east"], 0],
        "unseen `mars` is unknown"
    );
    assert_eq!(d.pre_cat[0], kind["buy"]);
    assert_eq!(d.in_cat[0], 0, "unseen `teleport` is unknown");
    let f = &tm.schema.event_num[0];
    assert!((d.pre_num[0] as f64 - (slog1p(10.0) - f.mean) / f.std).abs() < 1e-5);
    // A field list that differs from the reference is refused.
    std::fs::write(
        &path,
        cfg.replace("min_count = 2\n", "")
            .replace("log1p = true\nfill = 0", "fill = 0"),
    )
    .unwrap();
    assert_names(&fails(&path), &["import.toml", "profile_num[0].log1p"]);
}
