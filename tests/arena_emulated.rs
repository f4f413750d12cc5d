//! The activation arena's plan in a real training run, on the CPU: the bf16 scheme's
//! reference ([`CpuBf16Backend`]) places every scratch request of a step with the CUDA
//! backend's own plan ([`mgkd::backend::arena::ArenaPlan`]), resized at the same moments
//! (src/backend/cpu_bf16.rs), so the run below makes the plan's decisions a device run
//! makes, without a GPU (`tests/cuda_arena.rs` is the same check on one). A teacher and a
//! student trained with length-bucketed batches (several shapes, so several kept request
//! sequences) size the arena in a first run; a second run on the same backend then misses
//! the arena nowhere, never grows it, follows a kept placement in every round (it keeps no
//! new sequence), and ends with bit-identical parameters. One test in its own process: the
//! ledger is process-wide.

mod train_common;

use mgkd::backend::arena::MAX_PLANS;
use mgkd::backend::cpu_bf16::CpuBf16Backend;
use mgkd::backend::Backend;
use mgkd::data::Dataset;
use mgkd::train::RunOptions;
use train_common::Spec;

#[test]
fn once_sized_the_emulated_arena_serves_every_step_of_a_second_run() {
    let be = CpuBf16Backend::new();
    let tmp = tempfile::tempdir().expect("tempdir");
    train_common::write(tmp.path(), Spec::labelled(500, 4));
    let ds = Dataset::open(tmp.path()).expect("open");
    let tc = train_common::bucketed_run_config();
    let opts = RunOptions::default();
    let run = || train_common::teacher_then_student(&be, &ds, &tc, &opts);
    let before = be
        .arena_stats()
        .expect("the bf16 reference emulates an arena");
    assert_eq!(before.capacity, 0, "a fresh backend's arena is empty");
    let first = run();
    let sized = be.arena_stats().expect("arena");
    println!("after the first run: {sized:?}");
    assert!(
        sized.capacity >= sized.high_water && sized.high_water > 0,
        "{sized:?}"
    );
    assert!(sized.misses > 0, "the first rounds can only measure");
    assert!(
        (2..MAX_PLANS).contains(&sized.kept),
        "several request sequences (bucket shapes, stages, validation) are kept: {sized:?}"
    );
    let second = run();
    let again = be.arena_stats().expect("arena");
    assert_eq!(
        (again.misses, again.generation, again.capacity),
        (sized.misses, sized.generation, sized.capacity),
        "a run after the arena was sized allocated inside a step or grew it"
    );
    // Every round of the second run made a sequence of requests the first had made, and
    // followed its kept placement to the end: none was placed online (which keeps a new
    // sequence).
    assert_eq!(
        again.kept, sized.kept,
        "a round departed from its kept sequence"
    );
    assert!(
        first.0 == second.0 && first.1 == second.1,
        "the same run on the sized arena differs"
    );
}
