//! Arbitrary bytes as `dataset.json`: parsed and checked for consistency; must return `Ok`
//! or `Err`, never panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mgkd::data::{check_manifest, Manifest};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("dataset.json");
    if let Ok(m) = Manifest::from_json(path, text) {
        let _ = check_manifest(path, &m);
    }
});
