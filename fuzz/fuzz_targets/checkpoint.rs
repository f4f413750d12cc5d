//! Arbitrary bytes as a checkpoint file: `checkpoint::read` must return `Ok` or `Err` (a
//! damaged or corrupted file named), never panic; a checkpoint that reads must load into a
//! model on the CPU.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mgkd::backend::cpu::CpuBackend;
use mgkd::model::checkpoint;
use mgkd_fuzz::scratch_dir;

fuzz_target!(|data: &[u8]| {
    let path = scratch_dir("checkpoint").join("model.safetensors");
    std::fs::write(&path, data).expect("scratch file");
    if let Ok(ck) = checkpoint::read(&path) {
        // Only small models: a fuzzed config may ask for a huge one, which is allowed.
        if ck.values.len() <= 1 << 20 {
            ck.into_model(&CpuBackend::<f32>::new())
                .expect("a checkpoint that reads loads");
        }
    }
});
