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

/// The weekday of `days` after 1970-01-01 (a Thursday).
fn weekday_name(days: f64) -> String {
    ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days as i64).rem_euclid(7) as usize].into()
}

/// The month of `days` after 1970-01-01.
fn month_name(days: f64) -> String {
    let m = civil(days.floor() as i64).1 as usize;
    [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][m - 1]
        .into()
}

/// `log1p` of the seconds between event `k` of a user's whole history (pre then in) and
/// the one before (0 for the first); times in days.
fn derived_since_previous(seqs: &(Vec<Ev>, Vec<Ev>), k: usize) -> f64 {
    let all: Vec<f64> = seqs.0.iter().chain(&seqs.1).map(|e| e.t).collect();
    if k == 0 {
        0.0
    } else {
        slog1p((all[k] - all[k - 1]) * 86_400.0)
    }
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
    let mut weekday_counts = HashMap::new();
    let mut month_counts = HashMap::new();
    let (mut amounts, mut balances, mut incomes) = (vec![], vec![], vec![]);
    let (mut since_prev, mut since_act) = (vec![], vec![]);
    for u in (0..n).filter(|&u| fx.split[u] == 0) {
        *region_counts.entry(fx.region[u].clone()).or_insert(0) += 1;
        *month_counts.entry(month_name(fx.act[u])).or_insert(0) += 1;
        incomes.push(slog1p(fx.income[u]));
        for (k, e) in fx.seqs[u].0.iter().chain(&fx.seqs[u].1).enumerate() {
            *kind_counts.entry(e.kind.clone()).or_insert(0) += 1;
            *channel_counts.entry(e.channel.clone()).or_insert(0) += 1;
            *weekday_counts.entry(weekday_name(e.t)).or_insert(0) += 1;
            amounts.push(slog1p(e.amount));
            balances.push(e.balance);
            since_prev.push(derived_since_previous(&fx.seqs[u], k));
            since_act.push(slog1p((e.t - fx.act[u]).abs() * 86_400.0));
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

    // The derived fields (docs/import.md, "Derived time fields"): the fixture's times are
    // days (no time of day: no hour_of_day), so day of week, the two log durations and the
    // activation month.
    let event_cat: Vec<&str> = m.schema.event_cat.iter().map(|f| f.name.as_str()).collect();
    let event_num: Vec<&str> = m.schema.event_num.iter().map(|f| f.name.as_str()).collect();
    let profile_cat: Vec<&str> = m
        .schema
        .profile_cat
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(event_cat, ["kind", "channel", "day_of_week"]);
    assert_eq!(
        event_num,
        [
            "amount",
            "bal",
            "log_seconds_since_previous",
            "log_seconds_since_activation"
        ]
    );
    assert_eq!(profile_cat, ["region", "activation_month"]);
    let weekday_ids = expected_vocab(&weekday_counts, 1);
    let month_ids = expected_vocab(&month_counts, 1);
    assert_eq!(vocab_map(&vocab, true, "day_of_week"), weekday_ids);
    assert_eq!(vocab_map(&vocab, false, "activation_month"), month_ids);
    let (pm, psd) = mean_std(&since_prev);
    let (sm, ssd) = mean_std(&since_act);
    assert!(ev[2].log1p && ev[3].log1p);
    assert!(
        close(ev[2].mean, pm) && close(ev[2].std, psd),
        "{:?}",
        ev[2]
    );
    assert!(
        close(ev[3].mean, sm) && close(ev[3].std, ssd),
        "{:?}",
        ev[3]
    );

    // Every stored event, in order: ids and standardised numbers.
    let f32_eq = |a: f32, b: f64| (a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs());
    for u in 0..n {
        let n_pre = fx.seqs[u].0.len();
        for (evs, off, cat, num, first) in [
            (&fx.seqs[u].0, &d.pre_offsets, &d.pre_cat, &d.pre_num, 0),
            (&fx.seqs[u].1, &d.in_offsets, &d.in_cat, &d.in_num, n_pre),
        ] {
            for (k, e) in evs.iter().enumerate() {
                let j = off[u] as usize + k;
                assert_eq!(cat[3 * j], kind_ids.get(&e.kind).copied().unwrap_or(0));
                assert_eq!(
                    cat[3 * j + 1],
                    channel_ids.get(&e.channel).copied().unwrap_or(0)
                );
                assert_eq!(cat[3 * j + 2], weekday_ids[&weekday_name(e.t)]);
                assert!(
                    f32_eq(num[4 * j], (slog1p(e.amount) - am) / asd),
                    "user {u} event {k}"
                );
                assert!(f32_eq(num[4 * j + 1], (e.balance - bm) / bsd));
                let prev = derived_since_previous(&fx.seqs[u], first + k);
                assert!(
                    f32_eq(num[4 * j + 2], (prev - pm) / psd),
                    "user {u} event {k}"
                );
                let act = slog1p((e.t - fx.act[u]).abs() * 86_400.0);
                assert!(f32_eq(num[4 * j + 3], (act - sm) / ssd));
            }
        }
        assert_eq!(
            d.profile_cat[2 * u],
            region_ids.get(&fx.region[u]).copied().unwrap_or(0)
        );
        assert_eq!(
            d.profile_cat[2 * u + 1],
            month_ids.get(&month_name(fx.act[u])).copied().unwrap_or(0)
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
    // a1's events sorted by time: amounts 40 (t=20) then 20 (t=50). Each event holds the
    // amount then the two derived durations.
    let f = &m.schema.event_num[0];
    let stride = m.schema.e_num();
    assert_eq!(stride, 3);
    let raw: Vec<f64> = d
        .pre_num
        .iter()
        .step_by(stride)
        .map(|&v| v as f64 * f.std + f.mean)
        .collect();
    assert!(
        (raw[0] - 40.0).abs() < 1e-3 && (raw[1] - 20.0).abs() < 1e-3,
        "{raw:?}"
    );
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

fn replace_line(
    i: usize,
    from: &'static str,
    to: impl Into<String>,
) -> impl FnOnce(&mut Vec<String>) {
    let to = to.into();
    move |l: &mut Vec<String>| {
        assert!(l[i].contains(from), "{} lacks {from}", l[i]);
        l[i] = l[i].replacen(from, &to, 1);
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
    // Rows hold region then activation month (a derived field).
    assert_eq!(
        [d.profile_cat[0], d.profile_cat[2]],
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

// ---------------------------------------------------------------------------------------
// Times in every form.

/// Asserts that two dataset directories hold the same files with the same bytes, except
/// `dataset.json`'s `source` (free text naming the input files), which may differ.
fn assert_same_dataset(a: &Path, b: &Path) {
    let names = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(a), names(b));
    for name in names(a) {
        let (x, y) = (
            std::fs::read(a.join(&name)).unwrap(),
            std::fs::read(b.join(&name)).unwrap(),
        );
        if name == "dataset.json" {
            let strip = |bytes: &[u8]| {
                let mut v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
                v.as_object_mut().unwrap().remove("source");
                v
            };
            assert_eq!(strip(&x), strip(&y), "{name}");
        } else {
            assert!(
                x == y,
                "{name} differs between {} and {}",
                a.display(),
                b.display()
            );
        }
    }
}

/// A line editor rewriting the time column (the second) of every record with `f`.
fn map_times(f: impl Fn(i64) -> String + Copy) -> impl FnOnce(&mut Vec<String>) {
    move |l: &mut Vec<String>| {
        for line in l.iter_mut().skip(1) {
            let mut cells: Vec<String> = line.split(',').map(str::to_string).collect();
            cells[1] = f(cells[1].parse().unwrap());
            *line = cells.join(",");
        }
    }
}

/// The civil date `days` after 1970-01-01.
fn civil(days: i64) -> (i64, u32, u32) {
    // Howard Hinnant's days-to-civil, independent of the importer's jiff.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn iso_date(days: i64) -> String {
    let (y, m, d) = civil(days);
    format!("{y:04}-{m:02}-{d:02}")
}

#[test]
fn times_in_every_form_give_the_same_dataset() {
    // The fixture's times are whole days since 1970-01-01; written in each form (and the
    // window in a matching way), they must give the bytes of the plain-number import.
    let base = fixture_config();
    let (d0, p0) = case(&base, |_| {}, |_| {});
    let reference = d0.path().join("out");
    import::import(&p0, &reference, Some(7)).unwrap();
    type Writer = fn(i64) -> String;
    let forms: Vec<(&str, Writer, Writer)> = vec![
        ("time_form = \"days\"", |d| d.to_string(), |d| d.to_string()),
        (
            "time_form = \"unix_s\"",
            |d| (d * 86_400).to_string(),
            |d| (d * 86_400).to_string(),
        ),
        (
            "time_form = \"unix_ms\"",
            |d| (d * 86_400_000).to_string(),
            |d| (d * 86_400_000).to_string(),
        ),
        ("time_form = \"date\"", iso_date, iso_date),
        (
            "time_form = \"datetime\"",
            |d| format!("{} 00:00:00", iso_date(d)),
            // The same instants with an offset: 02:00 at +02:00.
            |d| format!("{}T02:00:00+02:00", iso_date(d)),
        ),
        (
            "time_format = \"%d/%m/%Y\"",
            |d| {
                let (y, m, dd) = civil(d);
                format!("{dd:02}/{m:02}/{y}")
            },
            |d| {
                let (y, m, dd) = civil(d);
                format!("{dd:02}/{m:02}/{y}")
            },
        ),
    ];
    for (form, users_f, events_f) in forms {
        let window = match form {
            "time_form = \"unix_s\"" => "window = 2592000",
            "time_form = \"days\"" => "window = 30",
            _ => "window = \"30d\"",
        };
        let cfg = base
            .replace(
                "time = \"activated_at\"",
                &format!("time = \"activated_at\"\n{form}"),
            )
            .replace("time = \"ts\"", &format!("time = \"ts\"\n{form}"))
            .replace("window = 30", window)
            // Hour of day exists only for the forms with a time of day: off, so that
            // every form gives the same fields (the other derived fields must agree).
            + "\n[features]\nhour_of_day = false\n";
        let (d, p) = case(&cfg, map_times(users_f), map_times(events_f));
        let out = d.path().join("out");
        import::import(&p, &out, Some(7)).unwrap_or_else(|e| panic!("{form}: {e}"));
        assert_same_dataset(&reference, &out);
    }
    // Time-split cut-offs as numbers (days) and as dates give the same split.
    let timed = |cfg: &str, valid: &str, test: &str| {
        cfg.replace(
            "method = \"column\"\ncolumn = \"fold\"",
            &format!("method = \"time\"\nvalid_from = {valid}\ntest_from = {test}"),
        )
    };
    let (d1, p1) = case(&timed(&base, "150", "180"), |_| {}, |_| {});
    import::import(&p1, &d1.path().join("out"), None).unwrap();
    let dated = timed(
        &base
            .replace(
                "time = \"activated_at\"",
                "time = \"activated_at\"\ntime_form = \"date\"",
            )
            .replace("time = \"ts\"", "time = \"ts\"\ntime_form = \"date\"")
            .replace("window = 30", "window = \"30d\""),
        "\"1970-05-31\"",
        "\"1970-06-30T00:00:00Z\"",
    );
    let (d2, p2) = case(&dated, map_times(iso_date), map_times(iso_date));
    import::import(&p2, &d2.path().join("out"), None).unwrap();
    assert_same_dataset(&d1.path().join("out"), &d2.path().join("out"));
    let (_, data) = read_dataset(&d2.path().join("out"));
    assert!(data.split.contains(&1) && data.split.contains(&2));
}

#[test]
fn naive_times_are_read_in_the_configured_zone() {
    // One user activated at 01:00 local time on 1 July; the test split starts at
    // 2023-07-01T00:00Z. In UTC the user is in test; in Paris (UTC+2) 01:00 is 23:00Z on
    // 30 June, before the cut-off: valid.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("u.csv"),
        "id,at,y\na,2023-06-01T10:00:00,0\nb,2023-07-01T01:00:00,1\nc,2023-07-02T10:00:00+02:00,0\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("e.csv"), "id,t\na,2023-05-01T00:00:00Z\n").unwrap();
    let cfg = |tz: &str| {
        format!(
            r#"layout = "long"
{tz}
[users]
file = "u.csv"
id = "id"
label = "y"
time = "at"
time_form = "datetime"
[events]
file = "e.csv"
id = "id"
time = "t"
time_form = "datetime"
window = "90d"
[split]
method = "time"
valid_from = "2023-06-15"
test_from = "2023-07-01T00:00:00Z"
"#
        )
    };
    let splits = |tz: &str| {
        let path = dir.path().join("t.toml");
        std::fs::write(&path, cfg(tz)).unwrap();
        let out = dir.path().join(format!("out{}", tz.len()));
        import::import(&path, &out, None).unwrap();
        read_dataset(&out).1.split
    };
    assert_eq!(splits(""), [0, 2, 2]);
    assert_eq!(splits("timezone = \"Europe/Paris\""), [0, 1, 2]);
}

#[test]
fn bad_times_name_file_line_column_and_form() {
    let base = fixture_config();
    let with_form = |form: &str| {
        base.replace(
            "time = \"activated_at\"",
            &format!("time = \"activated_at\"\n{form}"),
        )
        .replace("time = \"ts\"", &format!("time = \"ts\"\n{form}"))
        .replace("window = 30", "window = \"30d\"")
    };
    // (form, bad events cell, what the message must say)
    let cases: Vec<(&str, &str, Vec<&str>)> = vec![
        (
            "time_form = \"days\"",
            "soon",
            vec!["days since 1970-01-01"],
        ),
        (
            "time_form = \"unix_s\"",
            "1.7e9x",
            vec!["unix_s", "seconds"],
        ),
        (
            "time_form = \"unix_ms\"",
            "12:00",
            vec!["unix_ms", "milliseconds"],
        ),
        (
            "time_form = \"date\"",
            "1970-13-01",
            vec!["YYYY-MM-DD", "time_form = \"date\""],
        ),
        ("time_form = \"date\"", "12/04/1970", vec!["YYYY-MM-DD"]),
        (
            "time_form = \"datetime\"",
            "yesterday",
            vec!["ISO 8601", "datetime"],
        ),
        (
            "time_format = \"%d/%m/%Y\"",
            "1970-04-12",
            vec!["%d/%m/%Y", "time_format"],
        ),
        ("time_form = \"date\"", "", vec!["empty cell", "YYYY-MM-DD"]),
    ];
    for (form, cell, parts) in cases {
        // events.csv line 3: `u03,102,refund,…`; the users' times are left as they are, so
        // only the plain-number forms get past the users file: put the error first there.
        // Both files valid in this form (every time the same instant), but for one cell.
        let ok = match form {
            f if f.contains("days") => "100",
            f if f.contains("unix") => "0",
            f if f.contains("datetime") => "1970-04-16T00:00:00",
            f if f.contains("%d") => "16/04/1970",
            _ => "1970-04-16",
        };
        let (_d, p) = case(&with_form(form), map_times(move |_| ok.to_string()), |l| {
            map_times(move |_| ok.to_string())(l);
            let mut cells: Vec<&str> = l[2].split(',').collect();
            cells[1] = cell;
            l[2] = cells.join(",");
        });
        let msg = fails(&p);
        let mut want = vec!["events.csv", "line 3", "column `ts`"];
        want.extend(parts.iter().copied());
        if !cell.is_empty() {
            want.push(cell);
        }
        assert_names(&msg, &want);
    }
    // A bad activation time names the users file.
    let (_d, p) = case(
        &with_form("time_form = \"date\""),
        |l| {
            map_times(iso_date)(l);
            l[4] = l[4].replacen(",1970-05-01,", ",1970-04-31,", 1);
            assert!(l[4].contains("1970-04-31"));
        },
        map_times(iso_date),
    );
    assert_names(
        &fails(&p),
        &[
            "users.csv",
            "line 5",
            "column `activated_at`",
            "1970-04-31",
            "YYYY-MM-DD",
        ],
    );
    // Config errors name the key.
    let cfg_cases: Vec<(String, Vec<&str>)> = vec![
        (
            format!("timezone = \"Mars/Olympus\"\n{base}"),
            vec!["import.toml", "timezone", "Mars/Olympus"],
        ),
        (
            with_form("time_form = \"date\"").replace("window = \"30d\"", "window = 30"),
            vec!["import.toml", "events.window", "180d"],
        ),
        (
            base.replace("window = 30", "window = \"6mo\""),
            vec!["import.toml", "events.window", "6mo"],
        ),
        (
            base.replace("window = 30", "window = \"soon\""),
            vec!["import.toml", "events.window", "soon"],
        ),
        (
            base.replace("window = 30", "window = -3"),
            vec!["import.toml", "events.window", "positive"],
        ),
        (
            base.replace(
                "time = \"ts\"",
                "time = \"ts\"\ntime_form = \"date\"\ntime_format = \"%Y\"",
            ),
            vec!["import.toml", "events.time_format", "not both"],
        ),
        (
            base.replace("time = \"ts\"", "time = \"ts\"\ntime_form = \"weeks\""),
            vec!["import.toml", "weeks"],
        ),
        (
            base.replace(
                "method = \"column\"\ncolumn = \"fold\"",
                "method = \"time\"\nvalid_from = \"July\"\ntest_from = 180",
            ),
            vec!["import.toml", "split.valid_from", "July"],
        ),
        (
            with_form("time_form = \"date\"").replace(
                "method = \"column\"\ncolumn = \"fold\"",
                "method = \"time\"\nvalid_from = 150\ntest_from = 180",
            ),
            vec!["import.toml", "split.valid_from", "2023-07-01"],
        ),
        (
            base.replace(
                "method = \"column\"\ncolumn = \"fold\"",
                "method = \"time\"\nvalid_from = \"1970-07-01\"\ntest_from = 150",
            ),
            vec!["import.toml", "split.test_from", "valid_from <= test_from"],
        ),
    ];
    for (text, parts) in cfg_cases {
        let (_d, p) = case(&text, |_| {}, |_| {});
        assert_names(&fails(&p), &parts);
    }
}

// ---------------------------------------------------------------------------------------
// Parquet input.

/// The Arrow type a CSV column is written as.
#[derive(Clone, Copy)]
enum PqType {
    Text,
    Int,
    Float,
    /// A whole number of days, written as a date.
    Date,
    /// A whole number of days, written as milliseconds since the epoch in this time zone
    /// (`None`: a timestamp without zone).
    Millis(Option<&'static str>),
}

/// Writes the CSV file `csv_path` as Parquet at `out`: each column as `types` says (text
/// when unnamed), empty cells as nulls, `group` rows per row group, compressed with `codec`.
fn csv_to_parquet(
    csv_path: &Path,
    out: &Path,
    types: &[(&str, PqType)],
    group: usize,
    codec: parquet::basic::Compression,
) {
    use arrow_array::{
        ArrayRef, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
        TimestampMillisecondArray,
    };
    use arrow_schema::{DataType, Field, Schema, TimeUnit};
    use std::sync::Arc;
    let mut r = csv::Reader::from_path(csv_path).unwrap();
    let headers: Vec<String> = r.headers().unwrap().iter().map(str::to_string).collect();
    let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
    let mut fields = Vec::new();
    let mut arrays: Vec<ArrayRef> = Vec::new();
    for (j, name) in headers.iter().enumerate() {
        let ty = types
            .iter()
            .find(|(n, _)| n == name)
            .map_or(PqType::Text, |t| t.1);
        let cells: Vec<Option<&str>> = rows
            .iter()
            .map(|rec| Some(&rec[j]).filter(|s| !s.is_empty()))
            .collect();
        let day = |s: &str| s.parse::<i64>().unwrap();
        let (dt, array): (DataType, ArrayRef) = match ty {
            PqType::Text => (DataType::Utf8, Arc::new(StringArray::from(cells))),
            PqType::Int => (
                DataType::Int64,
                Arc::new(Int64Array::from(
                    cells
                        .iter()
                        .map(|c| c.map(|s| s.parse().unwrap()))
                        .collect::<Vec<_>>(),
                )),
            ),
            PqType::Float => (
                DataType::Float64,
                Arc::new(Float64Array::from(
                    cells
                        .iter()
                        .map(|c| c.map(|s| s.parse().unwrap()))
                        .collect::<Vec<_>>(),
                )),
            ),
            PqType::Date => (
                DataType::Date32,
                Arc::new(Date32Array::from(
                    cells
                        .iter()
                        .map(|c| c.map(|s| day(s) as i32))
                        .collect::<Vec<_>>(),
                )),
            ),
            PqType::Millis(tz) => {
                let v: Vec<Option<i64>> = cells
                    .iter()
                    .map(|c| c.map(|s| day(s) * 86_400_000))
                    .collect();
                let a = TimestampMillisecondArray::from(v);
                match tz {
                    Some(tz) => (
                        DataType::Timestamp(TimeUnit::Millisecond, Some(tz.into())),
                        Arc::new(a.with_timezone(tz)),
                    ),
                    None => (
                        DataType::Timestamp(TimeUnit::Millisecond, None),
                        Arc::new(a),
                    ),
                }
            }
        };
        fields.push(Field::new(name, dt, true));
        arrays.push(array);
    }
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), arrays).unwrap();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(codec)
        .set_max_row_group_row_count(Some(group))
        .build();
    let file = std::fs::File::create(out).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, schema, Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

const USERS_TYPES: [(&str, PqType); 4] = [
    ("activated_at", PqType::Int),
    ("defaulted", PqType::Int),
    ("income", PqType::Float),
    ("age", PqType::Int),
];
const EVENTS_TYPES: [(&str, PqType); 3] = [
    ("ts", PqType::Float),
    ("amount", PqType::Float),
    ("balance", PqType::Float),
];

/// The fixture case with `users.parquet` / `events.parquet` written beside the CSV files,
/// and the config pointed at them.
fn parquet_case(
    cfg: &str,
    users_types: &[(&str, PqType)],
    events_types: &[(&str, PqType)],
    codec: parquet::basic::Compression,
) -> (tempfile::TempDir, PathBuf) {
    let (d, p) = case(cfg, |_| {}, |_| {});
    csv_to_parquet(
        &d.path().join("users.csv"),
        &d.path().join("users.parquet"),
        users_types,
        7,
        codec,
    );
    csv_to_parquet(
        &d.path().join("events.csv"),
        &d.path().join("events.parquet"),
        events_types,
        10,
        codec,
    );
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"users.csv\"", "\"users.parquet\"")
        .replace("\"events.csv\"", "\"events.parquet\"");
    std::fs::write(&p, text).unwrap();
    (d, p)
}

#[test]
fn parquet_and_csv_give_the_same_dataset() {
    use parquet::basic::{Compression, GzipLevel, ZstdLevel};
    let base = fixture_config();
    let (d0, p0) = case(&base, |_| {}, |_| {});
    let reference = d0.path().join("out");
    import::import(&p0, &reference, Some(7)).unwrap();
    // The fixture's empty cells (income, balance) become nulls: filled like empty cells.
    for codec in [
        Compression::SNAPPY,
        Compression::ZSTD(ZstdLevel::default()),
        Compression::GZIP(GzipLevel::default()),
        Compression::UNCOMPRESSED,
    ] {
        let (d, p) = parquet_case(&base, &USERS_TYPES, &EVENTS_TYPES, codec);
        let out = d.path().join("out");
        import::import(&p, &out, Some(7)).unwrap_or_else(|e| panic!("{codec:?}: {e}"));
        assert_same_dataset(&reference, &out);
    }
    // Parquet dates and timestamps against the same instants written as text.
    let dated = base
        .replace(
            "time = \"activated_at\"",
            "time = \"activated_at\"\ntime_form = \"date\"",
        )
        .replace("time = \"ts\"", "time = \"ts\"\ntime_form = \"datetime\"")
        .replace("window = 30", "window = \"30d\"");
    for (tz, events_ts, text_ts) in [
        (
            "",
            PqType::Millis(Some("+02:00")),
            (|d| format!("{}T02:00:00+02:00", iso_date(d))) as fn(i64) -> String,
        ),
        ("", PqType::Millis(Some("UTC")), |d| {
            format!("{}T00:00:00Z", iso_date(d))
        }),
        // A timestamp without zone is a wall-clock time, like a naive ISO time.
        ("timezone = \"Europe/Paris\"\n", PqType::Millis(None), |d| {
            format!("{}T00:00:00", iso_date(d))
        }),
    ] {
        let cfg = format!("{tz}{dated}");
        let (dc, pc) = case(&cfg, map_times(iso_date), map_times(text_ts));
        let from_text = dc.path().join("out");
        import::import(&pc, &from_text, Some(7)).unwrap();
        let users_types = [
            ("activated_at", PqType::Date),
            ("defaulted", PqType::Int),
            ("income", PqType::Float),
            ("age", PqType::Int),
        ];
        let events_types = [
            ("ts", events_ts),
            ("amount", PqType::Float),
            ("balance", PqType::Float),
        ];
        let (d, p) = parquet_case(&cfg, &users_types, &events_types, Compression::SNAPPY);
        let out = d.path().join("out");
        import::import(&p, &out, Some(7)).unwrap();
        assert_same_dataset(&from_text, &out);
    }
}

#[test]
fn parquet_wide_layout() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("w.csv"),
        "ID,y,P1,P2,A1,A2\n1,0,0,1,5,6\n2,1,1,1,7,\n3,0,2,,8,9\n",
    )
    .unwrap();
    let cfg = r#"
layout = "wide"
skip_empty_steps = true
[users]
file = "w.csv"
id = "ID"
label = "y"
[split]
fractions = [0.34, 0.33, 0.33]
[[event_cat]]
name = "P"
fill = "none"
[[event_num]]
name = "A"
fill = -1
[[steps]]
phase = "pre"
columns = { P = "P1", A = "A1" }
[[steps]]
phase = "in"
columns = { P = "P2", A = "A2" }
"#;
    std::fs::write(dir.path().join("w.toml"), cfg).unwrap();
    import::import(&dir.path().join("w.toml"), &dir.path().join("csv"), None).unwrap();
    csv_to_parquet(
        &dir.path().join("w.csv"),
        &dir.path().join("w.parquet"),
        &[
            ("ID", PqType::Int),
            ("y", PqType::Int),
            ("P1", PqType::Int),
            ("P2", PqType::Int),
            ("A1", PqType::Float),
            ("A2", PqType::Int),
        ],
        2,
        parquet::basic::Compression::SNAPPY,
    );
    std::fs::write(dir.path().join("p.toml"), cfg.replace("w.csv", "w.parquet")).unwrap();
    import::import(&dir.path().join("p.toml"), &dir.path().join("pq"), None).unwrap();
    assert_same_dataset(&dir.path().join("csv"), &dir.path().join("pq"));
    let (_, d) = read_dataset(&dir.path().join("pq"));
    assert_eq!(d.user_ids, ["1", "2", "3"]);
    assert_eq!(d.in_offsets, [0, 1, 2, 3]);
}

#[test]
fn parquet_type_mismatches_and_nulls_are_errors() {
    let base = fixture_config();
    let snappy = parquet::basic::Compression::SNAPPY;
    // A string column where a number is expected: the column and its Parquet type.
    let (d, p) = parquet_case(
        &base,
        &[
            ("activated_at", PqType::Int),
            ("defaulted", PqType::Int),
            ("age", PqType::Int),
        ],
        &EVENTS_TYPES,
        snappy,
    );
    assert_names(
        &fails(&p),
        &[
            "users.parquet",
            "column `income`",
            "BYTE_ARRAY",
            "Utf8",
            "profile_num[0]",
            "numbers",
        ],
    );
    drop(d);
    // A float where a category is expected.
    let (_d, p) = case(&base, |_| {}, |_| {});
    let dir = p.parent().unwrap();
    csv_to_parquet(
        &dir.join("users.csv"),
        &dir.join("users.parquet"),
        &USERS_TYPES,
        7,
        snappy,
    );
    std::fs::write(
        dir.join("events.csv"),
        "uid,ts,kind,channel,amount,balance\nu01,100,1.5,web,3,4\n",
    )
    .unwrap();
    csv_to_parquet(
        &dir.join("events.csv"),
        &dir.join("events.parquet"),
        &[
            ("ts", PqType::Float),
            ("kind", PqType::Float),
            ("amount", PqType::Float),
        ],
        7,
        snappy,
    );
    std::fs::write(
        &p,
        base.replace("\"users.csv\"", "\"users.parquet\"")
            .replace("\"events.csv\"", "\"events.parquet\""),
    )
    .unwrap();
    assert_names(
        &fails(&p),
        &[
            "events.parquet",
            "column `kind`",
            "DOUBLE",
            "Float64",
            "event_cat[0]",
        ],
    );
    // A number where a date is expected.
    let dated = base
        .replace("time = \"ts\"", "time = \"ts\"\ntime_form = \"date\"")
        .replace("window = 30", "window = \"30d\"");
    let (_d, p) = parquet_case(&dated, &USERS_TYPES, &EVENTS_TYPES, snappy);
    assert_names(
        &fails(&p),
        &["events.parquet", "column `ts`", "DOUBLE", "YYYY-MM-DD"],
    );
    // Nulls are empty cells: an error without `fill`, naming the row (data rows, 1-based).
    // users.csv line 5 is data row 4 (u04); `age` has no fill.
    let (_d, p) = case(&base, replace_line(4, ",44", ","), |_| {});
    let dir = p.parent().unwrap();
    csv_to_parquet(
        &dir.join("users.csv"),
        &dir.join("users.parquet"),
        &USERS_TYPES,
        3,
        snappy,
    );
    std::fs::write(&p, base.replace("\"users.csv\"", "\"users.parquet\"")).unwrap();
    assert_names(
        &fails(&p),
        &["users.parquet", "row 4", "column `age`", "empty cell"],
    );
    // A null time, and a null categorical value.
    let (_d, p) = case(&base, |_| {}, replace_line(2, ",102,", ",,"));
    let dir = p.parent().unwrap();
    csv_to_parquet(
        &dir.join("events.csv"),
        &dir.join("events.parquet"),
        &EVENTS_TYPES,
        3,
        snappy,
    );
    std::fs::write(&p, base.replace("\"events.csv\"", "\"events.parquet\"")).unwrap();
    assert_names(
        &fails(&p),
        &["events.parquet", "row 2", "column `ts`", "empty cell"],
    );
    let (_d, p) = case(&base, |_| {}, replace_line(2, ",web,", ",,"));
    let dir = p.parent().unwrap();
    csv_to_parquet(
        &dir.join("events.csv"),
        &dir.join("events.parquet"),
        &EVENTS_TYPES,
        3,
        snappy,
    );
    std::fs::write(&p, base.replace("\"events.csv\"", "\"events.parquet\"")).unwrap();
    assert_names(
        &fails(&p),
        &[
            "events.parquet",
            "row 2",
            "column `channel`",
            "empty categorical",
        ],
    );
    // Not a Parquet file at all.
    let (_d, p) = case(&base, |_| {}, |_| {});
    let dir = p.parent().unwrap();
    std::fs::copy(dir.join("users.csv"), dir.join("users.parquet")).unwrap();
    std::fs::write(&p, base.replace("\"users.csv\"", "\"users.parquet\"")).unwrap();
    assert_names(
        &fails(&p),
        &["users.parquet", "not a readable Parquet file"],
    );
}

// ---------------------------------------------------------------------------------------
// Fields derived from the times.

#[test]
fn derived_time_fields_in_the_configured_zone() {
    // Two users; times with a time of day, read in Paris (UTC+2 in summer).
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("u.csv"),
        "id,at,y,fold\na,2023-07-01T10:00:00Z,0,train\nb,2023-03-31T23:30:00Z,1,train\n",
    )
    .unwrap();
    // a: one pre-service event on Saturday 1 July 00:30 Paris (= 30 June 22:30Z), one
    // in-service 90 s after activation (12:01:30 Paris); b: one event at activation.
    std::fs::write(
        dir.path().join("e.csv"),
        "id,t,k\na,2023-07-01T10:01:30Z,x\na,2023-06-30T22:30:00Z,x\nb,2023-03-31T23:30:00Z,y\n",
    )
    .unwrap();
    let cfg = r#"layout = "long"
timezone = "Europe/Paris"
[users]
file = "u.csv"
id = "id"
label = "y"
time = "at"
time_form = "datetime"
[events]
file = "e.csv"
id = "id"
time = "t"
time_form = "datetime"
[split]
method = "column"
column = "fold"
[[event_cat]]
column = "k"
"#;
    let path = dir.path().join("d.toml");
    std::fs::write(&path, cfg).unwrap();
    let out = dir.path().join("good");
    import::import(&path, &out, None).unwrap();
    let (m, d) = read_dataset(&out);
    let names = |v: Vec<&str>| v.into_iter().map(String::from).collect::<Vec<_>>();
    assert_eq!(
        m.schema
            .event_cat
            .iter()
            .map(|f| f.name.clone())
            .collect::<Vec<_>>(),
        names(vec!["k", "hour_of_day", "day_of_week"])
    );
    let vocab = Vocabularies::load(&out).unwrap();
    let hour = vocab_map(&vocab, true, "hour_of_day");
    let day = vocab_map(&vocab, true, "day_of_week");
    let month = vocab_map(&vocab, false, "activation_month");
    // a's pre event: 00:30 Saturday in Paris; in event: 12:01 Saturday; b: 01:30 Saturday
    // 1 April in Paris (23:30Z on Friday 31 March): activation month April, not March.
    assert_eq!((d.pre_cat[1], d.pre_cat[2]), (hour["00"], day["Sat"]));
    assert_eq!((d.in_cat[1], d.in_cat[2]), (hour["12"], day["Sat"]));
    assert_eq!((d.in_cat[4], d.in_cat[5]), (hour["01"], day["Sat"]));
    assert_eq!(
        [d.profile_cat[0], d.profile_cat[1]],
        [month["Jul"], month["Apr"]]
    );
    assert!(!month.contains_key("Mar"));
    // The durations, unstandardised: a's in-service event is 90 s after activation and
    // 11.5 h + 90 s after the pre-service one (its previous event); b's first event is 0 s
    // from both.
    let raw = |k: usize, v: f32| {
        let f = &m.schema.event_num[k];
        assert!(f.log1p);
        (v as f64 * f.std + f.mean).exp_m1()
    };
    let close = |a: f64, b: f64| (a - b).abs() < 1e-3 * (1.0 + b);
    // in_num rows: [since previous, since activation] for a's event then b's.
    assert!(
        close(raw(0, d.in_num[0]), 11.5 * 3600.0 + 90.0),
        "{}",
        raw(0, d.in_num[0])
    );
    assert!(close(raw(1, d.in_num[1]), 90.0));
    assert!(close(raw(0, d.in_num[2]), 0.0));
    assert!(close(raw(1, d.in_num[3]), 0.0));
    // a's pre-service event: the first (0 since previous), 11.5 h before activation.
    assert!(close(raw(0, d.pre_num[0]), 0.0));
    assert!(close(raw(1, d.pre_num[1]), 11.5 * 3600.0));

    // Every derived field switched off: the dataset of the configured fields alone.
    let off = format!(
        "{cfg}[features]\ntime_since_previous = false\ntime_since_activation = false\n\
         hour_of_day = false\nday_of_week = false\nactivation_month = false\n"
    );
    std::fs::write(&path, &off).unwrap();
    let out2 = dir.path().join("out2");
    import::import(&path, &out2, None).unwrap();
    let (m2, _) = read_dataset(&out2);
    assert_eq!(
        (m2.schema.e_cat(), m2.schema.e_num(), m2.schema.f_cat()),
        (1, 0, 0)
    );

    // Switching one on where it cannot apply, or a name clash, is a config error.
    let errors: Vec<(String, Vec<&str>)> = vec![
        (
            cfg.replace(
                "time_form = \"datetime\"\n[split]",
                "time_form = \"date\"\n[split]",
            ) + "[features]\nhour_of_day = true\n",
            vec!["d.toml", "features.hour_of_day", "time of day"],
        ),
        (
            cfg.replace("column = \"k\"", "column = \"k\"\nname = \"day_of_week\""),
            vec!["d.toml", "features.day_of_week", "event_cat[0]"],
        ),
        (
            format!("{cfg}[features]\nweekday = true\n"),
            vec!["d.toml", "weekday"],
        ),
    ];
    for (text, parts) in errors {
        std::fs::write(&path, text).unwrap();
        assert_names(&fails(&path), &parts);
    }
    // Wide layout: no event times.
    std::fs::write(dir.path().join("w.csv"), "ID,y,A1\n1,0,5\n2,1,7\n").unwrap();
    let wide = r#"layout = "wide"
[users]
file = "w.csv"
id = "ID"
label = "y"
[[event_num]]
name = "A"
[[steps]]
phase = "in"
columns = { A = "A1" }
"#;
    let wpath = dir.path().join("w.toml");
    std::fs::write(
        &wpath,
        format!("{wide}[features]\ntime_since_previous = true\n"),
    )
    .unwrap();
    assert_names(
        &fails(&wpath),
        &["w.toml", "features.time_since_previous", "event times"],
    );
    std::fs::write(
        &wpath,
        format!("{wide}[features]\nactivation_month = true\n"),
    )
    .unwrap();
    assert_names(
        &fails(&wpath),
        &["w.toml", "features.activation_month", "users.time"],
    );
    std::fs::write(&wpath, wide).unwrap();
    import::import(&wpath, &dir.path().join("w"), None).unwrap();
}

#[test]
fn derived_fields_reach_training_inspect_and_predict() {
    // No special case: the derived fields are schema fields like any other.
    let bin = env!("CARGO_BIN_EXE_mgkd-train");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ds");
    import::import(&fixtures().join("long.toml"), &data, None).unwrap();
    let run = |args: &[&str]| {
        let o = Command::new(bin).args(args).output().unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let p = |x: &Path| x.display().to_string();
    let dp = p(&data);
    let inspect = run(&["inspect", &dp]);
    for field in [
        "day_of_week",
        "log_seconds_since_previous",
        "activation_month",
    ] {
        assert!(inspect.contains(field), "inspect lacks {field}:\n{inspect}");
    }
    let tp = p(&dir.path().join("t.safetensors"));
    let sp = p(&dir.path().join("s.safetensors"));
    let small = ["--epochs", "1", "--batch", "8", "--device", "cpu"];
    let mut a = vec!["teacher", "--data", &dp, "--out", &tp, "--d", "8"];
    a.extend(small);
    run(&a);
    let mut a = vec!["student", "--data", &dp, "--teacher", &tp, "--out", &sp];
    a.extend(small);
    run(&a);
    let scores = dir.path().join("scores.csv");
    run(&[
        "predict",
        "--data",
        &p(&data),
        "--model",
        &sp,
        "--out",
        &p(&scores),
    ]);
    let text = std::fs::read_to_string(&scores).unwrap();
    assert_eq!(text.lines().count(), 21, "{text}");
}

#[test]
fn features_off_give_the_bytes_of_earlier_versions() {
    // The fixture imported by the importer before time forms and derived fields existed
    // (commit 97a8e27, `import --config long.toml --shard-rows 7`): its shards' and
    // vocab.json's SHA-256. The same config with every derived field off gives those bytes.
    let cfg = fixture_config()
        + "\n[features]\ntime_since_previous = false\ntime_since_activation = false\n\
           hour_of_day = false\nday_of_week = false\nactivation_month = false\n";
    let (d, p) = case(&cfg, |_| {}, |_| {});
    let out = d.path().join("ds");
    let summary = import::import(&p, &out, Some(7)).unwrap();
    let shas: Vec<&str> = summary
        .manifest
        .shards
        .iter()
        .map(|s| s.sha256.as_str())
        .collect();
    assert_eq!(
        shas,
        [
            "163e18a2a8004c4693a0ce826114f486ea60f53dca73c0870d109d45f518d3d1",
            "f2f4c001ed2e4b827c4a6ea545987efde83dadaa7bc77f88529a2a59b7bd05f7",
            "d25d7cf31abec3a96c49d8647b7357425711297db062fed50841cf90c4b63dd3",
        ]
    );
    use sha2::Digest;
    let vocab = std::fs::read(out.join("vocab.json")).unwrap();
    let hex: String = sha2::Sha256::digest(&vocab)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        hex,
        "4687bbea8b784aba5b8e2dd133f6823f9d544489cc338cd618ef9f5b8de6c528"
    );
}

// ---------------------------------------------------------------------------------------
// Checks on the times.

#[test]
fn misread_times_are_warned_about() {
    let base = fixture_config();
    let unix = |cfg: &str| {
        cfg.replace(
            "time = \"activated_at\"",
            "time = \"activated_at\"\ntime_form = \"unix_s\"",
        )
        .replace("time = \"ts\"", "time = \"ts\"\ntime_form = \"unix_s\"")
        .replace("window = 30", "window = \"30d\"")
    };
    let secs = |d: i64| (d * 86_400).to_string();
    let millis = |d: i64| (d * 86_400_000).to_string();
    // The control: both columns in seconds, no warning.
    let (d, p) = case(&unix(&base), map_times(secs), map_times(secs));
    let summary = import::import(&p, &d.path().join("ok"), None).unwrap();
    assert!(summary.warnings.is_empty(), "{:?}", summary.warnings);
    // The events exported in milliseconds but declared as seconds: every event lands
    // decades after its activation (and past the window).
    let (d, p) = case(&unix(&base), map_times(secs), map_times(millis));
    let summary = import::import(&p, &d.path().join("ms"), None).unwrap();
    assert_eq!(summary.warnings.len(), 1, "{:?}", summary.warnings);
    // The median |event − activation| over the independent reading, in days.
    let fx = read_fixture(f64::INFINITY);
    let mut dist: Vec<f64> = Vec::new();
    let mut r = csv::Reader::from_path(fixtures().join("events.csv")).unwrap();
    for rec in r.records() {
        let rec = rec.unwrap();
        let u = fx.ids.iter().position(|i| i == &rec[0]).unwrap();
        let t: f64 = rec[1].parse().unwrap();
        dist.push((t * 1000.0 - fx.act[u]).abs());
    }
    dist.sort_by(f64::total_cmp);
    let median = dist[dist.len() / 2];
    assert_names(
        &summary.warnings[0],
        &[
            "events.csv",
            "column `ts`",
            "column `activated_at`",
            "median distance",
            &format!("{median:.0} days"),
            "years",
        ],
    );
    // Plain seconds read as the default days form: also decades away.
    let (d, p) = case(
        &base.replace("window = 30", "window = 2592000"),
        map_times(secs),
        map_times(secs),
    );
    let summary = import::import(&p, &d.path().join("s"), None).unwrap();
    assert_eq!(summary.warnings.len(), 1, "{:?}", summary.warnings);
    // The command prints it on stderr and still imports.
    let (d, p) = case(&unix(&base), map_times(secs), map_times(millis));
    let o = Command::new(env!("CARGO_BIN_EXE_mgkd-train"))
        .args(["import", "--config"])
        .arg(&p)
        .arg("--out")
        .arg(d.path().join("bin"))
        .output()
        .unwrap();
    assert!(o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_names(&stderr, &["warning: ", "column `ts`", "median distance"]);
}

#[test]
fn time_spans_are_recorded_and_inspected() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    import::import(&fixtures().join("long.toml"), &out, None).unwrap();
    let m = Manifest::load(&out).unwrap();
    let t = m.times.as_ref().expect("times in the manifest");
    let fx = read_fixture(30.0);
    // Independent: days before / after activation of the stored events.
    let (mut before, mut after) = (vec![], vec![]);
    for (u, (pre, inn)) in fx.seqs.iter().enumerate() {
        before.extend(pre.iter().map(|e| fx.act[u] - e.t));
        after.extend(inn.iter().map(|e| e.t - fx.act[u]));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    let pre = t.pre.as_ref().unwrap();
    let inn = t.in_service.as_ref().unwrap();
    assert_eq!(pre.events as usize, before.len());
    assert_eq!(inn.events as usize, after.len());
    assert_eq!(pre.median_days, Some(median(&mut before)));
    assert_eq!(inn.median_days, Some(median(&mut after)));
    assert_eq!(
        (pre.min_days, pre.max_days),
        (Some(before[0]), before.last().copied())
    );
    assert_eq!(
        (inn.min_days, inn.max_days),
        (Some(after[0]), after.last().copied())
    );
    assert_eq!(t.window_days, Some(30.0));
    let first = fx.act.iter().copied().fold(f64::INFINITY, f64::min) as i64;
    assert_eq!(t.activation_first, format!("{}T00:00:00Z", iso_date(first)));
    // `inspect` prints them, text and JSON.
    let bin = env!("CARGO_BIN_EXE_mgkd-train");
    let o = Command::new(bin).arg("inspect").arg(&out).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert_names(
        &text,
        &[
            &format!("times: activations from {}", t.activation_first),
            "pre-service",
            "in-service",
            "30.00",
            &format!("{:.2}", inn.median_days.unwrap()),
        ],
    );
    let o = Command::new(bin)
        .args(["inspect", "--json"])
        .arg(&out)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["times"]["in"]["events"], serde_json::json!(after.len()));
}

#[test]
fn parquet_batches_and_row_groups_are_stitched_in_order() {
    // 20 000 rows: several 8192-row batches and 3000-row groups, whose boundaries fall
    // apart; with activation dates (a Parquet date column) for the activation month.
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("ID,y,at,P1,A1,A2\n");
    for i in 0..20_000u64 {
        let a2 = if i % 7 == 0 {
            String::new()
        } else {
            (i % 13).to_string()
        };
        text.push_str(&format!(
            "id{i},{},{},{},{}.5,{a2}\n",
            i % 5 == 0,
            19_000 + i % 400,
            i % 11,
            i % 97,
        ));
    }
    let text = text.replace(",true,", ",1,").replace(",false,", ",0,");
    std::fs::write(dir.path().join("w.csv"), text).unwrap();
    let cfg = r#"
layout = "wide"
[users]
file = "w.csv"
id = "ID"
label = "y"
time = "at"
[split]
method = "time"
valid_from = 19200
test_from = 19300
[[event_cat]]
name = "P"
[[event_num]]
name = "A"
fill = -1
[[steps]]
phase = "pre"
columns = { P = "P1", A = "A1" }
[[steps]]
phase = "in"
columns = { P = "P1", A = "A2" }
"#;
    std::fs::write(dir.path().join("w.toml"), cfg).unwrap();
    import::import(&dir.path().join("w.toml"), &dir.path().join("csv"), None).unwrap();
    csv_to_parquet(
        &dir.path().join("w.csv"),
        &dir.path().join("w.parquet"),
        &[
            ("y", PqType::Int),
            ("at", PqType::Date),
            ("P1", PqType::Int),
            ("A1", PqType::Float),
            ("A2", PqType::Int),
        ],
        3000,
        parquet::basic::Compression::ZSTD(parquet::basic::ZstdLevel::default()),
    );
    std::fs::write(
        dir.path().join("p.toml"),
        cfg.replace("w.csv", "w.parquet")
            .replace("time = \"at\"", "time = \"at\"\ntime_form = \"date\"")
            .replace(
                "valid_from = 19200",
                &format!("valid_from = \"{}\"", iso_date(19_200)),
            )
            .replace(
                "test_from = 19300",
                &format!("test_from = \"{}T00:00:00Z\"", iso_date(19_300)),
            ),
    )
    .unwrap();
    import::import(&dir.path().join("p.toml"), &dir.path().join("pq"), None).unwrap();
    let (m, d) = read_dataset(&dir.path().join("pq"));
    assert_eq!(m.rows, 20_000);
    assert_eq!(d.user_ids[12_345], "id12345");
    assert!(m
        .schema
        .profile_cat
        .iter()
        .any(|f| f.name == "activation_month"));
    // The CSV import read the days as numbers, the Parquet one as dates with a time split
    // on dates; the datasets agree but for the activation span's text (same instants).
    let (mc, dc) = read_dataset(&dir.path().join("csv"));
    assert_eq!(dc.split, d.split);
    assert!((0..3).all(|k| d.split.contains(&k)));
    assert_eq!(dc.pre_num, d.pre_num);
    assert_eq!(dc.in_num, d.in_num);
    assert_eq!(dc.in_cat, d.in_cat);
    assert_eq!(dc.profile_cat, d.profile_cat);
    assert_eq!(mc.schema, m.schema);
    assert_eq!(mc.times, m.times);
}
