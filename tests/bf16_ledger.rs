//! The bf16 scheme's CPU reference reports as its memory the bytes its buffers occupy in
//! their storage types (src/backend/cpu_bf16.rs): 2 per bf16 element, 4 per f32 one, from a
//! buffer's making to its drop, clones included. One test in its own process, so that no
//! other test's buffers move the process-wide ledger while it reads it.

use mgkd::backend::cpu_bf16::CpuBf16Backend;
use mgkd::backend::Backend;

#[test]
fn peak_memory_counts_each_buffer_in_its_storage_type() {
    let be = CpuBf16Backend::new();
    be.reset_peak_memory();
    assert_eq!(be.peak_memory(), Some(0), "nothing is held yet");
    let act = be.scratch(1000).expect("bf16 scratch");
    assert_eq!(act.stored_bytes(), 2000);
    assert_eq!(be.peak_memory(), Some(2000));
    let full = be.uninit(1000).expect("f32 buffer");
    assert_eq!(full.stored_bytes(), 4000);
    assert_eq!(be.peak_memory(), Some(6000));
    drop(act);
    // The peak stays; a reset starts the window at what is held now.
    assert_eq!(be.peak_memory(), Some(6000));
    be.reset_peak_memory();
    assert_eq!(be.peak_memory(), Some(4000));
    let copy = full.clone();
    assert_eq!(be.peak_memory(), Some(8000), "a clone is a buffer too");
    drop((full, copy));
    let upload = be.upload(&[1.5; 10]).expect("upload");
    assert_eq!(upload.stored_bytes(), 40, "uploads are f32");
    drop(upload);
    be.reset_peak_memory();
    assert_eq!(be.peak_memory(), Some(0), "every buffer was given back");
}
