//! Deterministic robustness check of the validators (the CI-side complement of the
//! `fuzz/` targets, which need cargo-fuzz): thousands of seeded random mutations of a valid
//! shard and of a valid manifest go through `validate_shard_bytes`, `Manifest::from_json`
//! and `check_manifest`. Each must answer `Ok` or `Err`; a panic fails the test. Mutations
//! that keep a shard valid must still give a fully readable view.

mod common;

use std::path::Path;

use common::{gen_rows, write, GenRow};
use mgkd::data::{check_manifest, validate_shard_bytes, Manifest, ShardInfo, WriterOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

fn valid_dataset() -> (tempfile::TempDir, Manifest, Vec<u8>, String) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    let rows: Vec<GenRow> = gen_rows(12, 77);
    let m = write(
        &dir,
        &rows,
        WriterOptions {
            has_user_id: true,
            ..Default::default()
        },
    );
    let shard = std::fs::read(dir.join(&m.shards[0].file)).unwrap();
    let text = std::fs::read_to_string(dir.join("dataset.json")).unwrap();
    (tmp, m, shard, text)
}

/// One random edit: flip bits, overwrite, insert, delete or truncate.
fn mutate(rng: &mut ChaCha8Rng, bytes: &mut Vec<u8>) {
    if bytes.is_empty() {
        bytes.push(rng.gen());
        return;
    }
    let at = rng.gen_range(0..bytes.len());
    match rng.gen_range(0..6) {
        0 => bytes[at] ^= 1 << rng.gen_range(0..8),
        1 => bytes[at] = rng.gen(),
        2 => {
            bytes[at] = *[0u8, 0xff, b'9', b'-', b'"', b'{', b']']
                .get(rng.gen_range(0..7))
                .unwrap()
        }
        3 => bytes.insert(at, rng.gen()),
        4 => {
            bytes.remove(at);
        }
        _ => bytes.truncate(at),
    }
}

fn check_view(info: &ShardInfo, m: &Manifest, bytes: &[u8]) {
    if let Ok(v) = validate_shard_bytes(Path::new("x.safetensors"), bytes, info, m) {
        assert_eq!(v.rows as u64, info.rows);
        for row in 0..v.rows {
            assert!(v.pre.range(row).is_some());
            assert!(v.in_service.range(row).is_some());
            if m.has_user_id {
                assert!(v.user_id.and_then(|u| u.get(row)).is_some());
            }
        }
    }
}

#[test]
fn mutated_shards_never_panic() {
    let (_tmp, m, shard, _) = valid_dataset();
    let info = m.shards[0].clone();
    check_view(&info, &m, &shard);
    assert!(validate_shard_bytes(Path::new("x"), &shard, &info, &m).is_ok());
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (mut ok, mut err) = (0, 0);
    for _ in 0..4000 {
        let mut bytes = shard.clone();
        for _ in 0..rng.gen_range(1..=4) {
            mutate(&mut rng, &mut bytes);
        }
        let mut info = info.clone();
        info.bytes = bytes.len() as u64; // get past the size check to reach deeper ones
        match validate_shard_bytes(Path::new("x.safetensors"), &bytes, &info, &m) {
            Ok(_) => ok += 1,
            Err(e) => {
                assert!(e.to_string().starts_with("x.safetensors: "), "{e}");
                err += 1;
            }
        }
        check_view(&info, &m, &bytes);
    }
    // Most mutations break something; some (in numeric data) keep the shard valid.
    assert!(err > 2000 && ok > 0, "ok {ok}, err {err}");
}

/// Sets a random number in the JSON tree to an extreme value.
fn mutate_number(rng: &mut ChaCha8Rng, v: &mut Value) -> bool {
    match v {
        Value::Number(_) => {
            let choices = [
                Value::from(0),
                Value::from(1),
                Value::from(u64::MAX),
                Value::from(-1),
                Value::from(1e300),
                Value::from(u32::MAX),
                Value::from(rng.gen_range(0..400u64)),
            ];
            *v = choices[rng.gen_range(0..choices.len())].clone();
            true
        }
        Value::Array(a) if !a.is_empty() => {
            let i = rng.gen_range(0..a.len());
            mutate_number(rng, &mut a[i])
        }
        Value::Object(o) if !o.is_empty() => {
            let i = rng.gen_range(0..o.len());
            let key = o.keys().nth(i).unwrap().clone();
            mutate_number(rng, o.get_mut(&key).unwrap())
        }
        _ => false,
    }
}

#[test]
fn mutated_manifests_never_panic() {
    let (_tmp, _m, shard, text) = valid_dataset();
    let path = Path::new("dataset.json");
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut checked = 0;
    // Byte-level mutations of the text.
    for _ in 0..3000 {
        let mut bytes = text.clone().into_bytes();
        for _ in 0..rng.gen_range(1..=3) {
            mutate(&mut rng, &mut bytes);
        }
        if let Ok(t) = std::str::from_utf8(&bytes) {
            if let Ok(m) = Manifest::from_json(path, t) {
                let _ = check_manifest(path, &m);
                checked += 1;
            }
        }
    }
    // Value-level mutations: extreme numbers anywhere, then the shard against the result.
    let base: Value = serde_json::from_str(&text).unwrap();
    let mut consistent = 0;
    for _ in 0..3000 {
        let mut v = base.clone();
        for _ in 0..rng.gen_range(1..=2) {
            mutate_number(&mut rng, &mut v);
        }
        let t = serde_json::to_string(&v).unwrap();
        if let Ok(m) = Manifest::from_json(path, &t) {
            checked += 1;
            if check_manifest(path, &m).is_ok() && !m.shards.is_empty() {
                consistent += 1;
                check_view(&m.shards[0], &m, &shard);
            }
        }
    }
    assert!(
        checked > 1000 && consistent > 100,
        "checked {checked}, consistent {consistent}"
    );
}
