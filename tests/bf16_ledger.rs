//! The bf16 scheme's CPU reference reports as its memory what a device running the scheme
//! holds (src/backend/cpu_bf16.rs): a buffer of its own counts the bytes it occupies in its
//! storage type, 2 per bf16 element and 4 per f32 one, from its making to its drop, clones
//! included; a step's scratch goes to an emulated activation arena, where a window of the
//! slab counts nothing and the slab counts its whole capacity. One test in its own process,
//! so that no other test's buffers move the process-wide ledger while it reads it.

use mgkd::backend::cpu_bf16::CpuBf16Backend;
use mgkd::backend::cuda::AttentionKernels;
use mgkd::backend::{AttnShape, Backend, Gemm, Mut, Ref};

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

    // The arena: `act` above was its first round, a miss (no slab yet) counted like a
    // buffer of its own. The next request makes the slab that round needed (2 000 bytes,
    // rounded up to one 2 MiB granule); windows in it count nothing.
    let granule = 2u64 << 20;
    let first = be.scratch_full(100).expect("f32 scratch");
    assert!(first.in_arena());
    assert_eq!(be.peak_memory(), Some(granule), "the slab, whole");
    let second = be.scratch_zeros(100).expect("bf16 scratch");
    assert!(second.in_arena() && second.values().iter().all(|&v| v == 0.0));
    assert_eq!(be.peak_memory(), Some(granule));
    let stats = be.arena_stats().expect("the emulated arena reports");
    assert_eq!((stats.capacity as u64, stats.misses), (granule, 1));
    // A request past the slab is a miss: its bytes count until it is dropped.
    let big = be.scratch(granule as usize).expect("bf16 scratch");
    assert!(!big.in_arena());
    assert_eq!(be.peak_memory(), Some(granule + 2 * granule));
    drop((first, second, big));
    // That round needed more: the next request replaces the slab (the old one leaves the
    // ledger; the new one, the round's 4 MiB + 768 bytes rounded up to 6 MiB, enters it).
    be.reset_peak_memory();
    let again = be.scratch(granule as usize).expect("bf16 scratch");
    assert!(again.in_arena());
    assert_eq!(be.peak_memory(), Some(3 * granule));
    // The weights' compute copy outlives steps: a bf16 buffer of its own, not a window.
    let weights = be.act_zeros(1000).expect("compute copy");
    assert!(!weights.in_arena());
    assert_eq!(be.peak_memory(), Some(3 * granule + 2000));
    drop((again, weights));
    // The slab is the backend's: it leaves the ledger with it.
    drop(be);
    CpuBf16Backend::new().reset_peak_memory();
    assert_eq!(CpuBf16Backend::new().peak_memory(), Some(0));

    // A product of an f32 operand with a bf16 one holds, while it runs, the bf16 copy a
    // device makes of the f32 one (a miss here: the new backend has no slab yet).
    let be = CpuBf16Backend::new();
    let (m, n, k) = (4, 3, 5);
    let a = be.upload(&[0.5; 20]).expect("f32 A");
    let b = be.scratch(k * n).expect("bf16 B");
    let mut c = be.uninit(m * n).expect("f32 C");
    be.reset_peak_memory();
    let held = be.peak_memory().expect("ledger");
    let g = Gemm::new(m, n, k, false, false);
    be.gemm(
        &g,
        1.0,
        Ref::whole(&a),
        Ref::whole(&b),
        0.0,
        Mut::whole(&mut c),
    );
    assert_eq!(be.peak_memory(), Some(held + 2 * (m * k) as u64));
    drop((a, b, c));

    // Emulating the fused attention kernels, the saved state of a training forward counts
    // as their row statistics (f32, [batch, heads, len, 2]) rather than the probabilities
    // (bf16, [batch, heads, len, len]) this reference keeps in it.
    let s = AttnShape {
        batch: 2,
        len: 8,
        heads: 2,
        d: 32,
    };
    for (attention, bytes) in [
        (AttentionKernels::Composed, 2 * 2 * 2 * 8 * 8),
        (AttentionKernels::Fused, 4 * 2 * 2 * 8 * 2),
    ] {
        let be = CpuBf16Backend::emulating(attention);
        be.reset_peak_memory();
        let before = be.peak_memory().expect("ledger");
        let saved = be.attention_saved(&s).expect("saved");
        assert_eq!(
            saved.values().len(),
            2 * 2 * 8 * 8,
            "the probabilities, either way"
        );
        assert_eq!(be.peak_memory(), Some(before + bytes), "{attention:?}");
    }
}
