//! `mgkd-train inspect` run as a process on a good and on corrupted datasets.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{gen_rows, opts, write};
use serde_json::Value;

fn inspect(dir: &Path, flags: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mgkd-train"))
        .arg("inspect")
        .arg(dir)
        .args(flags)
        .output()
        .expect("run mgkd-train")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn inspect_good_dataset_human_and_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    let rows = gen_rows(200, 5);
    write(&dir, &rows, opts(64));

    let out = inspect(&dir, &["--verify"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    for want in [
        "train",
        "valid",
        "test",
        "merchant",
        "pre-service",
        "in-service",
        "verify: OK",
    ] {
        assert!(stdout.contains(want), "{want:?} missing from:\n{stdout}");
    }
    assert!(stdout.contains("shards: 4 files"), "{stdout}");

    let out = inspect(&dir, &["--json", "--verify"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let v: Value = serde_json::from_str(&text(&out.stdout)).expect("--json prints JSON");
    assert_eq!(v["rows"], 200);
    assert_eq!(v["shards"], 4);
    assert_eq!(v["verify"]["ok"], true);
    let train = rows.iter().filter(|r| r.split == 0).count() as u64;
    let train_pos = rows.iter().filter(|r| r.split == 0 && r.label == 1).count() as u64;
    assert_eq!(v["splits"][0]["rows"], train);
    assert_eq!(v["splits"][0]["positives"], train_pos);
    let n_in: Vec<u64> = rows.iter().map(|r| r.in_cat.len() as u64 / 2).collect();
    assert_eq!(v["in_lengths"]["max"], *n_in.iter().max().unwrap());
    let empty = n_in.iter().filter(|&&n| n == 0).count() as f64 / 200.0;
    assert!((v["in_lengths"]["share_empty"].as_f64().unwrap() - empty).abs() < 1e-12);
    assert_eq!(v["fields"].as_array().unwrap().len(), 8);
}

#[test]
fn inspect_corrupted_dataset_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    write(&dir, &gen_rows(100, 6), opts(50));
    let shard = dir.join("shard-00001.safetensors");
    let bytes = std::fs::read(&shard).unwrap();

    // Truncated shard: opening fails.
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    for flags in [&[][..], &["--json"][..]] {
        let out = inspect(&dir, flags);
        let stderr = text(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(stderr.contains("shard-00001.safetensors"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }

    // Same size, different finite value: opens, but --verify reports the hash mismatch.
    let mut changed = bytes.clone();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let at = 8 + n + header["profile_num"]["data_offsets"][0].as_u64().unwrap() as usize;
    changed[at..at + 4].copy_from_slice(&0.5f32.to_le_bytes());
    std::fs::write(&shard, &changed).unwrap();
    assert!(inspect(&dir, &[]).status.success());
    let out = inspect(&dir, &["--verify"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success());
    assert!(stdout.contains("verify: FAILED"), "{stdout}");
    assert!(stderr.contains("sha256"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let out = inspect(&dir, &["--verify", "--json"]);
    let v: Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    assert_eq!(v["verify"]["ok"], false);

    // Not a dataset at all.
    let out = inspect(tmp.path(), &[]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("dataset.json"));
}
