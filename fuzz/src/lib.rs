//! Shared pieces of the fuzz targets: the fixed small manifest that fuzzed shards are
//! validated against, the fixed import config of the CSV target, and per-process scratch
//! directories (in /dev/shm where it exists: the file targets write every input).

use mgkd::data::manifest::{FORMAT_NAME, FORMAT_VERSION, SPLIT_NAMES};
use mgkd::data::{CatField, Manifest, NumField, Schema, ShardInfo, SplitStats};

/// The schema of fuzzed shards: 2 + 2 profile fields, 2 + 2 event fields.
pub fn schema() -> Schema {
    let cat = |name: &str, vocab| CatField {
        name: name.into(),
        vocab,
    };
    let num = |name: &str| NumField {
        name: name.into(),
        mean: 0.0,
        std: 1.0,
        log1p: false,
    };
    Schema {
        profile_num: vec![num("income"), num("age")],
        profile_cat: vec![cat("region", 5), cat("product", 7)],
        event_cat: vec![cat("event_type", 11), cat("merchant", 13)],
        event_num: vec![num("amount"), num("gap")],
        pre_len: 4,
        in_len: 6,
    }
}

/// A manifest with labels and user ids around one shard entry.
pub fn manifest(info: ShardInfo) -> Manifest {
    Manifest {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        schema: schema(),
        rows: info.rows,
        has_label: true,
        has_user_id: true,
        splits: (0..3)
            .map(|i| SplitStats {
                split: i as u8,
                name: SPLIT_NAMES[i].into(),
                rows: if i == 0 { info.rows } else { 0 },
                positives: 0,
                default_rate: 0.0,
            })
            .collect(),
        shards: vec![info],
        source: "fuzz".into(),
        times: None,
    }
}

/// Splits a fuzz input into the shard's manifest entry and the shard bytes: the first three
/// bytes give rows, pre-service events and in-service events; the rest is the file.
pub fn shard_input(data: &[u8]) -> Option<(ShardInfo, &[u8])> {
    let (head, bytes) = data.split_at_checked(3)?;
    let info = ShardInfo {
        file: "shard-00000.safetensors".into(),
        rows: u64::from(head[0]),
        pre_events: u64::from(head[1]),
        in_events: u64::from(head[2]),
        bytes: bytes.len() as u64,
        sha256: "0".repeat(64),
    };
    Some((info, bytes))
}

/// A scratch directory of this process for `target` (created once; the target rewrites its
/// files at every input).
pub fn scratch_dir(target: &str) -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("mgkd-fuzz-{target}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// The import config of the CSV target: the long layout of `tests/fixtures/import` (users
/// with a label, activation time and split column; events with two categorical and two
/// numeric fields, a 30-unit window).
pub fn import_config_text() -> &'static str {
    include_str!("../../tests/fixtures/import/long.toml")
}
