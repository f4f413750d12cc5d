//! The dataset reader (docs/model.md §3): round trips through `DatasetWriter` → `Dataset::open` →
//! `gather`, determinism across thread counts, epoch ordering, and one test per kind of
//! malformed dataset, each checking that the error names the file, tensor/field and row.

mod common;

use std::path::{Path, PathBuf};

use common::{gen_rows, opts, write, GenRow};
use mgkd::data::writer::sha256_hex;
use mgkd::data::{Batch, Dataset, EpochOrder, EventBatch, WriterOptions};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::Value;

// ---------------------------------------------------------------- helpers

fn shard(dir: &Path, k: usize) -> PathBuf {
    dir.join(format!("shard-{k:05}.safetensors"))
}

/// A dataset of `n` rows, `per_shard` rows per shard, with labels and user ids.
fn dataset(n: usize, per_shard: usize, seed: u64) -> (tempfile::TempDir, PathBuf, Vec<GenRow>) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    let rows = gen_rows(n, seed);
    write(&dir, &rows, opts(per_shard));
    (tmp, dir, rows)
}

fn open_err(dir: &Path) -> String {
    match Dataset::open(dir) {
        Ok(_) => panic!("opening {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} should mention {p:?}");
    }
}

fn edit_manifest(dir: &Path, f: impl FnOnce(&mut Value)) {
    let path = dir.join("dataset.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Writes new bytes for shard `k` and records their size and sha256 in the manifest, so that
/// only the intended defect remains.
fn replace_shard(dir: &Path, k: usize, bytes: &[u8]) {
    std::fs::write(shard(dir, k), bytes).unwrap();
    edit_manifest(dir, |m| {
        m["shards"][k]["bytes"] = Value::from(bytes.len() as u64);
        m["shards"][k]["sha256"] = Value::from(sha256_hex(bytes));
    });
}

type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;
/// Picks one sequence (categorical, numeric) of a generated row.
type PickSeq<'a> = &'a dyn Fn(&GenRow) -> (&[u32], &[f32]);
/// Edits a manifest.
type ManifestEdit = Box<dyn Fn(&mut Value)>;

fn load_tensors(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| (name, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect()
}

/// Re-serialises shard `k` with the safetensors crate after `f` edits its tensors.
fn rewrite_tensors(dir: &Path, k: usize, f: impl FnOnce(&mut Tensors)) {
    let mut t = load_tensors(&shard(dir, k));
    f(&mut t);
    let views: Vec<(String, TensorView<'_>)> = t
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let bytes = safetensors::tensor::serialize(views, &None).unwrap();
    replace_shard(dir, k, &bytes);
}

fn tensor_mut<'a>(t: &'a mut Tensors, name: &str) -> &'a mut (String, Dtype, Vec<usize>, Vec<u8>) {
    t.iter_mut().find(|x| x.0 == name).unwrap()
}

fn get_u64(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap())
}
fn set_u64(b: &mut [u8], i: usize, v: u64) {
    b[8 * i..8 * i + 8].copy_from_slice(&v.to_le_bytes());
}

/// Splits a shard file into (header JSON, data bytes).
fn split_file(bytes: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// Joins a header (padded with spaces to `pad_to` bytes modulo 8) and data into a file.
fn join_file(header: &Value, data: &[u8], pad_to: usize) -> Vec<u8> {
    let mut h = serde_json::to_vec(header).unwrap();
    while h.len() % 8 != pad_to {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

/// Edits the JSON header of shard `k` in place (the data bytes stay as they are).
fn edit_header(dir: &Path, k: usize, f: impl FnOnce(&mut Value)) {
    let (mut header, data) = split_file(&std::fs::read(shard(dir, k)).unwrap());
    f(&mut header);
    replace_shard(dir, k, &join_file(&header, &data, 0));
}

/// The expected batch, computed directly from the generated rows.
fn expected_batch(rows: &[GenRow], idx: &[u64], labels: bool) -> Batch {
    let s = common::schema();
    let seq = |pick: PickSeq<'_>, limit: usize| {
        let kept: Vec<usize> = idx
            .iter()
            .map(|&r| (pick(&rows[r as usize]).0.len() / s.e_cat()).min(limit))
            .collect();
        let max_len = kept.iter().copied().max().unwrap_or(0);
        let mut cat = vec![0u32; idx.len() * max_len * s.e_cat()];
        let mut num = vec![0f32; idx.len() * max_len * s.e_num()];
        for (i, &r) in idx.iter().enumerate() {
            let (c, n) = pick(&rows[r as usize]);
            let total = c.len() / s.e_cat();
            let start = total - kept[i];
            for t in 0..kept[i] {
                for j in 0..s.e_cat() {
                    cat[(i * max_len + t) * s.e_cat() + j] = c[(start + t) * s.e_cat() + j];
                }
                for j in 0..s.e_num() {
                    num[(i * max_len + t) * s.e_num() + j] = n[(start + t) * s.e_num() + j];
                }
            }
        }
        EventBatch {
            max_len,
            lens: kept.iter().map(|&k| k as u32).collect(),
            cat,
            num,
        }
    };
    Batch {
        rows: idx.len(),
        row_index: idx.to_vec(),
        labels: labels.then(|| idx.iter().map(|&r| rows[r as usize].label).collect()),
        profile_num: idx
            .iter()
            .flat_map(|&r| rows[r as usize].profile_num.clone())
            .collect(),
        profile_cat: idx
            .iter()
            .flat_map(|&r| rows[r as usize].profile_cat.clone())
            .collect(),
        pre: seq(&|r| (&r.pre_cat, &r.pre_num), s.pre_len),
        in_service: seq(&|r| (&r.in_cat, &r.in_num), s.in_len),
    }
}

// ---------------------------------------------------------------- round trips

#[test]
fn round_trip_every_value_across_shards() {
    let (_tmp, dir, rows) = dataset(300, 37, 1);
    let ds = Dataset::open(&dir).unwrap();
    assert_eq!(ds.manifest().shards.len(), 300usize.div_ceil(37));
    assert_eq!(ds.rows(), 300);
    let all: Vec<u64> = (0..300).collect();
    let batch = ds.gather(&all).unwrap();
    let want = expected_batch(&rows, &all, true);
    assert_eq!(batch, want);
    // The data exercises truncation, empty sequences and the limits.
    assert!(rows.iter().any(|r| r.pre_cat.is_empty()));
    assert!(rows.iter().any(|r| r.in_cat.len() / 2 > 6));
    assert_eq!(batch.pre.max_len, 4);
    assert_eq!(batch.in_service.max_len, 6);
    assert!(batch.pre.lens.contains(&0));
    // A row longer than the limit keeps its most recent events, oldest first.
    let long = rows.iter().position(|r| r.in_num.len() / 2 == 9).unwrap();
    let b = ds.gather(&[long as u64]).unwrap();
    assert_eq!(b.in_service.num, rows[long].in_num[3 * 2..].to_vec());

    // Accessors.
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(ds.label(i as u64).unwrap(), Some(r.label));
        assert_eq!(ds.user_id(i as u64).unwrap(), Some(r.user_id.as_str()));
    }
    for split in 0..3u8 {
        let want: Vec<u64> = (0..300)
            .filter(|&i| rows[i as usize].split == split)
            .collect();
        assert_eq!(ds.rows_of_split(split), want);
    }
    assert!(ds.label(300).unwrap_err().to_string().contains("row 300"));
    let report = ds.verify().unwrap();
    assert_eq!((report.shards, report.rows), (9, 300));
}

#[test]
fn round_trip_shuffled_subset_with_repeats_and_no_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    let rows = gen_rows(150, 2);
    write(
        &dir,
        &rows,
        WriterOptions {
            shard_rows: Some(40),
            has_label: false,
            has_user_id: false,
            ..Default::default()
        },
    );
    let ds = Dataset::open(&dir).unwrap();
    let idx: Vec<u64> = vec![149, 0, 77, 77, 40, 39, 120, 3];
    assert_eq!(ds.gather(&idx).unwrap(), expected_batch(&rows, &idx, false));
    assert_eq!(ds.label(5).unwrap(), None);
    assert_eq!(ds.user_id(5).unwrap(), None);
    assert_eq!(ds.gather(&[]).unwrap().rows, 0);
    assert!(ds.gather(&[150]).is_err());
}

#[test]
fn gather_is_independent_of_thread_count() {
    let (_tmp, dir, _rows) = dataset(700, 128, 3);
    let ds = Dataset::open(&dir).unwrap();
    let order = EpochOrder::new(&(0..700).collect::<Vec<_>>(), 9, 0);
    let run = |threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| ds.gather(order.order()).unwrap())
    };
    let one = run(1);
    let two = run(2);
    assert_eq!(one, two);
    assert_eq!(one.rows, 700);
}

#[test]
fn epoch_order_is_a_seeded_permutation() {
    let rows: Vec<u64> = (0..1000).map(|i| i * 3 + 1).collect();
    let a = EpochOrder::new(&rows, 42, 0);
    assert_eq!(a, EpochOrder::new(&rows, 42, 0));
    assert_ne!(a.order(), EpochOrder::new(&rows, 42, 1).order());
    assert_ne!(a.order(), EpochOrder::new(&rows, 43, 0).order());
    assert_ne!(a.order(), &rows[..]);
    let mut sorted = a.order().to_vec();
    sorted.sort_unstable();
    assert_eq!(sorted, rows);
    let batches: Vec<&[u64]> = a.batches(300).unwrap().collect();
    assert_eq!(batches.len(), 4);
    assert_eq!(a.num_batches(300), 4);
    assert_eq!(batches[3].len(), 100);
    assert_eq!(batches.concat(), a.order());
    assert!(a.batches(0).is_err());
}

// ---------------------------------------------------------------- malformed shards

const S0: &str = "shard-00000.safetensors";
const S1: &str = "shard-00001.safetensors";

#[test]
fn truncated_file() {
    let (_tmp, dir, _) = dataset(60, 30, 10);
    let p = shard(&dir, 1);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
    assert_has(
        &open_err(&dir),
        &[S1, "tensor `", "outside the data region", "truncated"],
    );
    std::fs::write(&p, &bytes[..5]).unwrap();
    assert_has(&open_err(&dir), &[S1, "too short"]);
    std::fs::write(&p, &bytes[..100]).unwrap();
    assert_has(&open_err(&dir), &[S1, "header", "past the end"]);
}

#[test]
fn header_lying_about_shapes() {
    let (_tmp, dir, _) = dataset(60, 30, 11);
    // Header shape disagrees with its own data_offsets.
    edit_header(&dir, 0, |h| {
        h["profile_num"]["shape"] = serde_json::json!([30, 3])
    });
    assert_has(
        &open_err(&dir),
        &[
            S0,
            "tensor `profile_num`",
            "shape [30, 3]",
            "expected [30, 2]",
        ],
    );

    // A consistent file whose shapes disagree with the manifest (written by safetensors).
    let (_tmp2, dir, _) = dataset(60, 30, 11);
    rewrite_tensors(&dir, 0, |t| {
        let x = tensor_mut(t, "profile_cat");
        x.2 = vec![60];
    });
    assert_has(
        &open_err(&dir),
        &[S0, "tensor `profile_cat`", "shape [60]", "expected [30, 2]"],
    );
}

#[test]
fn header_lying_about_data_offsets() {
    let (_tmp, dir, _) = dataset(60, 30, 12);
    edit_header(&dir, 1, |h| {
        h["in_num"]["data_offsets"][1] = Value::from(1u64 << 40)
    });
    assert_has(
        &open_err(&dir),
        &[
            S1,
            "tensor `in_num`",
            "data_offsets",
            "outside the data region",
        ],
    );

    let (_tmp2, dir, _) = dataset(60, 30, 12);
    edit_header(&dir, 0, |h| {
        let end = h["split"]["data_offsets"][1].as_u64().unwrap();
        h["split"]["data_offsets"] = serde_json::json!([end - 30 + 1, end + 1]);
    });
    assert_has(&open_err(&dir), &[S0, "tensor `"]);
}

#[test]
fn misaligned_buffers_are_an_error() {
    let (_tmp, dir, _) = dataset(60, 30, 13);
    let (header, data) = split_file(&std::fs::read(shard(&dir, 0)).unwrap());
    replace_shard(&dir, 0, &join_file(&header, &data, 3));
    assert_has(&open_err(&dir), &[S0, "tensor `", "aligned"]);
}

#[test]
fn offsets_not_monotone() {
    let (_tmp, dir, rows) = dataset(60, 30, 14);
    // Find a row r (in shard 0) such that offsets[r+1] can be raised above offsets[r+2].
    let mut r = 0;
    while rows[r + 1].pre_cat.is_empty() || rows[r + 2].pre_cat.is_empty() {
        r += 1;
    }
    rewrite_tensors(&dir, 0, |t| {
        let o = &mut tensor_mut(t, "pre_offsets").3;
        let next = get_u64(o, r + 2);
        set_u64(o, r + 1, next + 1);
    });
    assert_has(
        &open_err(&dir),
        &[
            S0,
            "tensor `pre_offsets`",
            "not monotone",
            &format!("row {}", r + 1),
        ],
    );
}

#[test]
fn offsets_past_the_end() {
    let (_tmp, dir, _) = dataset(60, 30, 15);
    rewrite_tensors(&dir, 1, |t| {
        let o = &mut tensor_mut(t, "in_offsets").3;
        let last = get_u64(o, 30);
        set_u64(o, 30, last + 3);
    });
    assert_has(
        &open_err(&dir),
        &[S1, "tensor `in_offsets`", "row 29", "past the"],
    );

    let (_tmp2, dir, _) = dataset(60, 30, 15);
    rewrite_tensors(&dir, 0, |t| {
        set_u64(&mut tensor_mut(t, "pre_offsets").3, 0, 1)
    });
    assert_has(
        &open_err(&dir),
        &[S0, "tensor `pre_offsets`", "row 0", "start at 0"],
    );
}

#[test]
fn category_id_not_below_vocabulary() {
    let (_tmp, dir, rows) = dataset(60, 30, 16);
    // Row 30 + r of the dataset = row r of shard 1; pick one with in-service events.
    let r = (0..30).find(|&r| rows[30 + r].in_cat.len() >= 4).unwrap();
    let first_event: usize = (0..r).map(|i| rows[30 + i].in_cat.len() / 2).sum();
    rewrite_tensors(&dir, 1, |t| {
        let c = &mut tensor_mut(t, "in_cat").3;
        // Event `first_event + 1` of the shard, field 1 (merchant, vocab 13).
        let at = 4 * ((first_event + 1) * 2 + 1);
        c[at..at + 4].copy_from_slice(&13u32.to_le_bytes());
    });
    assert_has(
        &open_err(&dir),
        &[
            S1,
            "tensor `in_cat`",
            &format!("row {r} "),
            "field 1 (merchant)",
            "id 13",
            "vocabulary size 13",
        ],
    );

    let (_tmp2, dir, _) = dataset(60, 30, 16);
    rewrite_tensors(&dir, 0, |t| {
        let c = &mut tensor_mut(t, "profile_cat").3;
        c[4 * 5..4 * 6].copy_from_slice(&7u32.to_le_bytes()); // row 2, field 1 (product, vocab 7)
    });
    assert_has(
        &open_err(&dir),
        &[S0, "tensor `profile_cat`", "row 2", "field 1 (product)"],
    );
}

#[test]
fn wrong_dtype() {
    let (_tmp, dir, _) = dataset(60, 30, 17);
    rewrite_tensors(&dir, 0, |t| tensor_mut(t, "pre_cat").1 = Dtype::I32);
    assert_has(
        &open_err(&dir),
        &[S0, "tensor `pre_cat`", "dtype I32", "expected U32"],
    );
}

#[test]
fn bad_split_label_and_nan() {
    let (_tmp, dir, _) = dataset(60, 30, 18);
    rewrite_tensors(&dir, 0, |t| tensor_mut(t, "split").3[7] = 3);
    assert_has(&open_err(&dir), &[S0, "tensor `split`", "row 7"]);

    let (_tmp, dir, _) = dataset(60, 30, 18);
    rewrite_tensors(&dir, 1, |t| tensor_mut(t, "label").3[4] = 2);
    assert_has(&open_err(&dir), &[S1, "tensor `label`", "row 4"]);

    let (_tmp, dir, rows) = dataset(60, 30, 18);
    let r = (0..30).find(|&r| !rows[r].pre_num.is_empty()).unwrap();
    let first_event: usize = (0..r).map(|i| rows[i].pre_num.len() / 2).sum();
    rewrite_tensors(&dir, 0, |t| {
        let at = 4 * (first_event * 2);
        tensor_mut(t, "pre_num").3[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    assert_has(
        &open_err(&dir),
        &[
            S0,
            "tensor `pre_num`",
            &format!("row {r} "),
            "field 0 (amount)",
            "not finite",
        ],
    );
}

#[test]
fn missing_and_unexpected_tensors() {
    let (_tmp, dir, _) = dataset(60, 30, 19);
    rewrite_tensors(&dir, 0, |t| t.retain(|x| x.0 != "in_num"));
    assert_has(&open_err(&dir), &[S0, "tensor `in_num` is missing"]);

    let (_tmp, dir, _) = dataset(60, 30, 19);
    rewrite_tensors(&dir, 0, |t| {
        t.push(("extra".into(), Dtype::U8, vec![2], vec![1, 2]))
    });
    assert_has(&open_err(&dir), &[S0, "unexpected tensor `extra`"]);

    // A label tensor in a dataset that says it has none.
    let (_tmp, dir, _) = dataset(60, 30, 19);
    edit_manifest(&dir, |m| {
        m["has_label"] = Value::Bool(false);
        for s in m["splits"].as_array_mut().unwrap() {
            s["positives"] = Value::from(0);
            s["default_rate"] = Value::from(0.0);
        }
    });
    assert_has(&open_err(&dir), &[S0, "unexpected tensor `label`"]);
}

#[test]
fn invalid_utf8_user_id() {
    let (_tmp, dir, _) = dataset(60, 30, 20);
    rewrite_tensors(&dir, 1, |t| {
        let o = tensor_mut(t, "user_id_offsets").3.clone();
        let start = get_u64(&o, 5) as usize;
        tensor_mut(t, "user_id_bytes").3[start] = 0xff;
    });
    assert_has(
        &open_err(&dir),
        &[S1, "tensor `user_id_bytes`", "row 5", "UTF-8"],
    );
}

// ---------------------------------------------------------------- manifest / shard mismatch

#[test]
fn manifest_rows_disagree_with_shard() {
    let (_tmp, dir, rows) = dataset(60, 30, 21);
    let sp = rows[0].split as usize;
    edit_manifest(&dir, |m| {
        m["rows"] = Value::from(61);
        m["shards"][0]["rows"] = Value::from(31);
        m["splits"][sp]["rows"] = Value::from(m["splits"][sp]["rows"].as_u64().unwrap() + 1);
        let (p, r) = (
            m["splits"][sp]["positives"].as_f64().unwrap(),
            m["splits"][sp]["rows"].as_f64().unwrap(),
        );
        m["splits"][sp]["default_rate"] = Value::from(p / r);
    });
    assert_has(
        &open_err(&dir),
        &[S0, "tensor `", "expected [31", "rows from the manifest"],
    );

    // Split counts that disagree with the data.
    let (_tmp, dir, _) = dataset(60, 30, 21);
    edit_manifest(&dir, |m| {
        let a = m["splits"][0]["rows"].as_u64().unwrap();
        let b = m["splits"][1]["rows"].as_u64().unwrap();
        m["splits"][0]["rows"] = Value::from(a + 1);
        m["splits"][1]["rows"] = Value::from(b - 1);
        for i in 0..2 {
            let (p, r) = (
                m["splits"][i]["positives"].as_f64().unwrap(),
                m["splits"][i]["rows"].as_f64().unwrap(),
            );
            m["splits"][i]["default_rate"] = Value::from(p / r);
        }
    });
    assert_has(
        &open_err(&dir),
        &["dataset.json", "splits[0]", "the shards hold"],
    );
}

#[test]
fn manifest_events_disagree_with_shard() {
    let (_tmp, dir, _) = dataset(60, 30, 22);
    edit_manifest(&dir, |m| {
        let e = m["shards"][1]["in_events"].as_u64().unwrap();
        m["shards"][1]["in_events"] = Value::from(e + 1);
    });
    assert_has(
        &open_err(&dir),
        &[S1, "tensor `in_", "in_events from the manifest"],
    );
}

#[test]
fn manifest_bytes_disagree_with_shard() {
    let (_tmp, dir, _) = dataset(60, 30, 23);
    edit_manifest(&dir, |m| {
        let b = m["shards"][0]["bytes"].as_u64().unwrap();
        m["shards"][0]["bytes"] = Value::from(b + 8);
    });
    assert_has(&open_err(&dir), &[S0, "the manifest records", "bytes"]);
}

#[test]
fn verify_detects_changed_content() {
    let (_tmp, dir, _) = dataset(60, 30, 24);
    // Change one numeric value to another finite value: the shard stays valid.
    let mut t = load_tensors(&shard(&dir, 1));
    let x = tensor_mut(&mut t, "profile_num");
    x.3[0..4].copy_from_slice(&1.25f32.to_le_bytes());
    let views: Vec<(String, TensorView<'_>)> = t
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "mgkd-dataset".to_string());
    let bytes = safetensors::tensor::serialize(views, &Some(meta)).unwrap();
    assert_eq!(
        bytes.len() as u64,
        std::fs::metadata(shard(&dir, 1)).unwrap().len()
    );
    std::fs::write(shard(&dir, 1), &bytes).unwrap();
    let ds = Dataset::open(&dir).unwrap();
    assert_eq!(ds.gather(&[30]).unwrap().profile_num[0], 1.25);
    assert_has(
        &ds.verify().unwrap_err().to_string(),
        &[S1, "sha256", "the manifest records"],
    );
}

#[test]
fn missing_shard() {
    let (_tmp, dir, _) = dataset(90, 30, 25);
    std::fs::remove_file(shard(&dir, 1)).unwrap();
    assert_has(&open_err(&dir), &[S1]);
}

#[test]
fn garbage_manifest() {
    let (_tmp, dir, _) = dataset(30, 30, 26);
    std::fs::write(
        dir.join("dataset.json"),
        b"{\"format\": \"mgkd-dataset\", \x00garbage",
    )
    .unwrap();
    assert_has(&open_err(&dir), &["dataset.json", "not a valid manifest"]);
    let tmp = tempfile::tempdir().unwrap();
    assert_has(&open_err(tmp.path()), &["dataset.json"]);
}

#[test]
fn manifest_with_escaping_shard_name() {
    let (_tmp, dir, _) = dataset(30, 30, 27);
    edit_manifest(&dir, |m| {
        m["shards"][0]["file"] = Value::from("../shard-00000.safetensors")
    });
    assert_has(
        &open_err(&dir),
        &["dataset.json", "shards[0].file", "plain file name"],
    );
    edit_manifest(&dir, |m| {
        m["shards"][0]["file"] = Value::from("/etc/passwd")
    });
    assert_has(&open_err(&dir), &["dataset.json", "shards[0].file"]);
}

#[test]
fn manifest_inconsistencies() {
    let cases: Vec<(ManifestEdit, &str)> = vec![
        (Box::new(|m| m["rows"] = Value::from(31)), "field `rows`"),
        (
            Box::new(|m| {
                m["splits"].as_array_mut().unwrap().pop();
            }),
            "3 (train, valid, test)",
        ),
        (
            Box::new(|m| m["schema"]["event_cat"][1]["vocab"] = Value::from(0)),
            "schema.event_cat[1]",
        ),
        (
            Box::new(|m| m["schema"]["profile_num"][0]["std"] = Value::from(0.0)),
            "schema.profile_num[0]",
        ),
        (
            Box::new(|m| m["schema"]["in_len"] = Value::from(0)),
            "length limits",
        ),
        (
            Box::new(|m| m["shards"][0]["sha256"] = Value::from("xyz")),
            "shards[0].sha256",
        ),
        (
            Box::new(|m| m["splits"][2]["default_rate"] = Value::from(0.99)),
            "splits[2].default_rate",
        ),
    ];
    for (edit, want) in cases {
        let (_tmp, dir, _) = dataset(30, 30, 28);
        edit_manifest(&dir, edit);
        assert_has(&open_err(&dir), &["dataset.json", want]);
    }
}
