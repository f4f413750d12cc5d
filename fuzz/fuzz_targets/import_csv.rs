//! Arbitrary bytes as the two CSV files of a long-layout import (users, then events, split at
//! the first 0xFF byte, which UTF-8 text never holds) under a fixed config: `import` must
//! return `Ok` or `Err` — never panic — and a successful import must be a dataset that opens.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mgkd::data::import::import;
use mgkd::data::Dataset;
use mgkd_fuzz::{import_config_text, scratch_dir};

fuzz_target!(|data: &[u8]| {
    let Some(cut) = data.iter().position(|&b| b == 0xFF) else {
        return;
    };
    let dir = scratch_dir("import_csv");
    let write =
        |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).expect("scratch file");
    write("users.csv", &data[..cut]);
    write("events.csv", &data[cut + 1..]);
    write("import.toml", import_config_text().as_bytes());
    let out = dir.join("out");
    let _ = std::fs::remove_dir_all(&out);
    if import(&dir.join("import.toml"), &out, Some(7)).is_ok() {
        Dataset::open(&out).expect("an imported dataset opens");
    }
});
