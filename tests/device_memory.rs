//! What a device running the bf16 scheme holds for the §8 student step at batch 1 024,
//! measured through the scheme's CPU reference ([`CpuBf16Backend`]): its ledger counts every
//! buffer in its storage type and places the step's scratch in an emulated activation arena,
//! the CUDA backend's own plan (src/backend/cpu_bf16.rs), so its peak is the device's pool
//! figure without the libraries' own memory. Issue 15's target for the step is half of
//! PyTorch's 564 MiB (bf16, compile), 282 MiB; the CUDA backend's one addition is the
//! cuBLAS workspace (32 MiB), so the ledger must stay at or under 250 MiB. Also checked: the
//! timed step, after a warm-up step of the same shape, makes no request the arena cannot
//! serve (no allocation inside a step). One test in its own process: the ledger is
//! process-wide.

use mgkd::backend::cpu_bf16::CpuBf16Backend;
use mgkd::train::bench::{run, Batching, BenchConfig, BenchMode, BenchStage};

/// The ledger's bound for the step, in bytes: 282 MiB less the 32 MiB cuBLAS workspace.
const STUDENT_STEP_BOUND: u64 = (282 - 32) << 20;

#[test]
fn the_reference_student_step_fits_half_of_pytorchs_memory_with_no_miss() {
    let be = CpuBf16Backend::new();
    let cfg = BenchConfig {
        batch: 1024,
        steps: 1,
        warmup: 1,
        pool: 1,
        ..BenchConfig::default()
    };
    let (stage, batching) = (BenchStage::Student, Batching::Padded);
    let row = run(&be, &cfg, stage, batching, BenchMode::Eager, &mut |_, _| {}).expect("step");
    let peak = row.peak_mem_bytes.expect("the scheme's ledger reports");
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!(
        "bf16 student step, batch 1024: {:.1} MiB ({:.1} MiB slab)",
        mib(peak),
        mib(row.arena_bytes.expect("the emulated arena reports"))
    );
    assert_eq!(row.arena_misses, Some(0), "the timed step allocated");
    assert!(
        peak <= STUDENT_STEP_BOUND,
        "the bf16 student step holds {:.1} MiB, over the {:.0} MiB bound",
        mib(peak),
        mib(STUDENT_STEP_BOUND)
    );
}
