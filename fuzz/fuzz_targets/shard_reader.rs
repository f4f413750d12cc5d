//! Arbitrary bytes as a shard file, validated against a fixed small manifest: must return
//! `Ok` or `Err`, never panic or touch memory out of bounds.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mgkd::data::validate_shard_bytes;
use mgkd_fuzz::{manifest, shard_input};

fuzz_target!(|data: &[u8]| {
    let Some((info, bytes)) = shard_input(data) else {
        return;
    };
    let m = manifest(info.clone());
    if let Ok(view) = validate_shard_bytes(Path::new("fuzz.safetensors"), bytes, &info, &m) {
        // A shard that validates must be fully readable.
        for row in 0..view.rows {
            assert!(view.pre.range(row).is_some());
            assert!(view.in_service.range(row).is_some());
            assert!(view.user_id.and_then(|u| u.get(row)).is_some());
        }
    }
});
