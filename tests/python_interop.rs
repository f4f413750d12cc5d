//! Shards are plain safetensors files: Python opens them with `safetensors.numpy.load_file`
//! and sees exactly the values the writer stored (docs/model.md §3).
//!
//! Uses the interpreter in `MGKD_PYTHON` (CI sets it to a venv with numpy and safetensors),
//! else `python3`. Without numpy/safetensors the test says it skipped, except under CI (env
//! `CI` set), where a missing package is a failure.

mod common;
mod skip;

use std::process::Command;

use mgkd::data::Dataset;

fn python() -> String {
    std::env::var("MGKD_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn python_has(modules: &str) -> bool {
    Command::new(python())
        .args(["-c", &format!("import {modules}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn python_reads_shards_with_safetensors_numpy() {
    if !python_has("numpy, safetensors.numpy") {
        skip::skip_unless_ci(&format!(
            "{} has no numpy/safetensors; set MGKD_PYTHON to an interpreter with them",
            python()
        ));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rows = common::gen_rows(37, 11);
    common::write(dir.path(), &rows, common::opts(16));
    let ds = Dataset::open(dir.path()).unwrap();
    assert_eq!(ds.shards().len(), 3);

    // Python sums each tensor (as f64) per shard and prints one JSON object per shard.
    let script = r#"
import json, sys, glob, os
import numpy as np
from safetensors.numpy import load_file
out = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "shard-*.safetensors"))):
    t = load_file(path)
    out.append({k: [str(v.dtype), list(v.shape), float(np.asarray(v, dtype=np.float64).sum())]
                for k, v in t.items()})
print(json.dumps(out))
"#;
    let output = Command::new(python())
        .args(["-c", script, dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let shards: Vec<serde_json::Map<String, serde_json::Value>> =
        serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(shards.len(), 3);

    let mut start = 0usize;
    for (s, tensors) in shards.iter().enumerate() {
        let part = &rows[start..start + ds.manifest().shards[s].rows as usize];
        start += part.len();
        let get = |name: &str| -> (String, Vec<u64>, f64) {
            let v = &tensors[name];
            let shape = v[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            (
                v[0].as_str().unwrap().to_string(),
                shape,
                v[2].as_f64().unwrap(),
            )
        };
        let n = part.len() as u64;
        let n_pre: usize = part.iter().map(|r| r.pre_cat.len() / 2).sum();
        let sum_f = |f: &dyn Fn(&common::GenRow) -> f64| part.iter().map(f).sum::<f64>();

        let (dtype, shape, total) = get("label");
        assert_eq!((dtype.as_str(), shape), ("uint8", vec![n]));
        assert_eq!(total, sum_f(&|r| r.label as f64));

        let (dtype, shape, total) = get("profile_num");
        assert_eq!((dtype.as_str(), shape), ("float32", vec![n, 2]));
        let want = sum_f(&|r| r.profile_num.iter().map(|&x| x as f64).sum());
        assert!((total - want).abs() <= 1e-9 * want.abs().max(1.0));

        let (dtype, shape, total) = get("pre_cat");
        assert_eq!((dtype.as_str(), shape), ("uint32", vec![n_pre as u64, 2]));
        assert_eq!(total, sum_f(&|r| r.pre_cat.iter().map(|&x| x as f64).sum()));

        let (dtype, shape, total) = get("in_offsets");
        assert_eq!((dtype.as_str(), shape), ("uint64", vec![n + 1]));
        let mut acc = 0u64;
        let mut want = 0u64;
        for r in part {
            acc += (r.in_cat.len() / 2) as u64;
            want += acc;
        }
        assert_eq!(total, want as f64);
    }
}
