//! The activation arena on the GPU (its own test binary: the arena's counts belong to the
//! process's one backend, which no other test may use meanwhile). A teacher and a student
//! trained with length-bucketed batches (several shapes) size the arena in the first run;
//! a second run on the same backend then takes every activation, gradient and scratch buffer
//! from it (no miss, no growth), and ends with bit-identical parameters, so where a buffer
//! lies changes no result; a run with graphs recorded on the sized arena matches too.
//!
//! Without a usable GPU the test prints that it skipped and passes; with
//! `MGKD_REQUIRE_GPU=1` a missing GPU is a failure.

mod cuda_common;
mod kernel_emu;
mod skip;
mod train_common;

use mgkd::backend::cuda::CudaBackend;
use mgkd::backend::Backend;
use mgkd::data::Dataset;
use mgkd::train::RunOptions;
use train_common::Spec;

/// Trains a teacher, then a student under it, with bucketed batches (several shapes), op
/// by op when `eager`; returns both parameter vectors as bit patterns.
fn teacher_then_student(be: &CudaBackend, ds: &Dataset, eager: bool) -> (Vec<u64>, Vec<u64>) {
    let opts = RunOptions {
        eager,
        ..RunOptions::default()
    };
    let tc = train_common::bucketed_run_config();
    let (t, s, _) = train_common::teacher_then_student(be, ds, &tc, &opts);
    (t, s)
}

#[test]
fn once_sized_the_arena_serves_every_step_and_moves_no_result() {
    let Some(be) = cuda_common::gpu() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    train_common::write(tmp.path(), Spec::labelled(500, 4));
    let ds = Dataset::open(tmp.path()).expect("open");
    let before = be.arena_stats().expect("the CUDA backend keeps an arena");
    assert_eq!(before.capacity, 0, "a fresh backend's arena is empty");
    let first = teacher_then_student(be, &ds, true);
    let sized = be.arena_stats().expect("arena");
    println!("after the first run: {sized:?}");
    assert!(
        sized.capacity >= sized.high_water && sized.high_water > 0,
        "{sized:?}"
    );
    assert!(
        sized.misses > 0,
        "the first round can only measure: {sized:?}"
    );
    let second = teacher_then_student(be, &ds, true);
    let again = be.arena_stats().expect("arena");
    assert_eq!(
        (again.misses, again.generation),
        (sized.misses, sized.generation),
        "a run after the arena was sized allocated inside a step or grew it"
    );
    assert!(first == second, "the same run from the sized arena differs");
    let graphs = teacher_then_student(be, &ds, false);
    let last = be.arena_stats().expect("arena");
    assert_eq!(last.misses, sized.misses, "a recorded run missed the arena");
    assert!(
        graphs == first,
        "graph replays on the arena differ from eager steps"
    );
}
