//! Arbitrary text as an import config (TOML): parsed and checked; must return `Ok` or `Err`,
//! never panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mgkd::data::import::config::ImportConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = ImportConfig::parse(text, Path::new("import.toml"));
});
