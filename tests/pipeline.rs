//! The input pipeline (`mgkd::train::pipeline`): batches gathered, checked and staged on a
//! background thread reach the step function in order and equal to a direct upload, also
//! when each is uploaded ahead of the step before it; a bad batch or a failing step stops
//! the run with its error, and the pipeline can run again.

mod train_common;

use mgkd::backend::cpu::CpuBackend;
use mgkd::data::Dataset;
use mgkd::model::{DeviceBatch, DeviceSeq};
use mgkd::train::pipeline::Pipeline;
use train_common::Spec;

type Be = CpuBackend<f32>;

fn seq_eq(a: &DeviceSeq<Be>, b: &DeviceSeq<Be>) -> bool {
    a.len == b.len
        && a.lens == b.lens
        && a.lens_host == b.lens_host
        && a.lens_or_one == b.lens_or_one
        && a.cat == b.cat
        && a.num == b.num
}

fn batch_eq(a: &DeviceBatch<Be>, b: &DeviceBatch<Be>) -> bool {
    a.rows == b.rows
        && a.profile_num == b.profile_num
        && a.profile_cat == b.profile_cat
        && seq_eq(&a.pre, &b.pre)
        && seq_eq(&a.in_service, &b.in_service)
        && a.labels == b.labels
        && a.labels_host == b.labels_host
        && a.schema == b.schema
}

/// Batches of uneven sizes over a shuffled row order (the largest first, so that later,
/// smaller batches land in stagings holding a bigger batch's leftovers).
fn uneven_batches(rows: u64) -> Vec<Vec<u64>> {
    let order: Vec<u64> = (0..rows).map(|r| (r * 37 + 11) % rows).collect();
    let sizes = [64usize, 7, 33, 1, 50, 64, 31];
    let mut out = Vec::new();
    let mut at = 0;
    for &n in sizes.iter().cycle() {
        if at >= order.len() {
            break;
        }
        let end = (at + n).min(order.len());
        out.push(order[at..end].to_vec());
        at = end;
    }
    out
}

/// A labelled dataset of `rows` rows (seed `seed`) in a temporary directory, and a pipeline
/// for batches of at most `batch` rows on the CPU backend.
fn setup(rows: usize, seed: u64, batch: usize) -> (tempfile::TempDir, Dataset, Be, Pipeline<Be>) {
    let tmp = tempfile::tempdir().expect("tempdir");
    train_common::write(tmp.path(), Spec::labelled(rows, seed));
    let ds = Dataset::open(tmp.path()).expect("open");
    let be = Be::new();
    let pipeline = Pipeline::new(&be, ds.schema(), batch).expect("pipeline");
    (tmp, ds, be, pipeline)
}

#[test]
fn batches_arrive_in_order_and_equal_to_a_direct_upload() {
    let (_tmp, ds, be, mut pipeline) = setup(300, 3, 64);
    let batches = uneven_batches(ds.rows());
    assert!(batches.len() > 6);
    for pass in 0..2 {
        let mut seen = Vec::new();
        let stats = pipeline
            .run(&be, &ds, &batches, None, |k, got| {
                let direct =
                    DeviceBatch::upload(&be, &ds.gather(&batches[k])?, ds.schema()).expect("up");
                assert!(batch_eq(&got, &direct), "pass {pass}, batch {k} differs");
                seen.push(k);
                Ok(())
            })
            .expect("run");
        assert_eq!(seen, (0..batches.len()).collect::<Vec<_>>(), "pass {pass}");
        assert!(stats.gather_seconds > 0.0 && stats.wait_seconds >= 0.0);
    }
}

#[test]
fn a_bad_batch_stops_the_run_with_its_error_and_the_pipeline_runs_again() {
    let (_tmp, ds, be, mut pipeline) = setup(120, 5, 32);
    let mut batches: Vec<Vec<u64>> = (0..4).map(|k| (k * 30..k * 30 + 30).collect()).collect();
    batches[2][7] = ds.rows() + 5;
    let mut steps = 0;
    let err = pipeline
        .run(&be, &ds, &batches, None, |_, _| {
            steps += 1;
            Ok(())
        })
        .expect_err("a row beyond the dataset");
    assert_eq!(steps, 2, "the batches before the bad one ran, none after");
    assert!(
        err.to_string().contains(&format!("{}", ds.rows() + 5)),
        "{err}"
    );
    batches[2][7] = 7;
    let mut steps = 0;
    pipeline
        .run(&be, &ds, &batches, None, |_, _| {
            steps += 1;
            Ok(())
        })
        .expect("the same pipeline, good batches");
    assert_eq!(steps, 4);
}

/// With slow steps the next batch is always staged before a step is queued, so its upload
/// is queued ahead of the step: batches still arrive in order, equal to direct uploads, and
/// a bad batch received ahead stops the run only after the step before it has run.
#[test]
fn batches_uploaded_ahead_of_slow_steps_arrive_in_order_and_errors_after_the_step_before() {
    let (_tmp, ds, be, mut pipeline) = setup(120, 8, 32);
    let mut batches: Vec<Vec<u64>> = (0..4).map(|k| (k * 30..k * 30 + 30).collect()).collect();
    let slow = std::time::Duration::from_millis(30);
    let mut seen = Vec::new();
    pipeline
        .run(&be, &ds, &batches, None, |k, got| {
            std::thread::sleep(slow);
            let direct = DeviceBatch::upload(&be, &ds.gather(&batches[k])?, ds.schema())?;
            assert!(
                batch_eq(&got, &direct),
                "batch {k} differs from a direct upload"
            );
            seen.push(k);
            Ok(())
        })
        .expect("run");
    assert_eq!(seen, [0, 1, 2, 3]);
    batches[3][0] = ds.rows() + 9;
    let mut steps = 0;
    let err = pipeline
        .run(&be, &ds, &batches, None, |_, _| {
            std::thread::sleep(slow);
            steps += 1;
            Ok(())
        })
        .expect_err("a row beyond the dataset");
    assert_eq!(steps, 3, "the three batches before the bad one ran");
    assert!(
        err.to_string().contains(&format!("{}", ds.rows() + 9)),
        "{err}"
    );
}

#[test]
fn a_failing_step_stops_the_run() {
    let (_tmp, ds, be, mut pipeline) = setup(120, 6, 16);
    let batches: Vec<Vec<u64>> = (0..7).map(|k| (k * 16..k * 16 + 16).collect()).collect();
    let mut steps = 0;
    let err = pipeline
        .run(&be, &ds, &batches, None, |k, _| {
            steps += 1;
            if k == 1 {
                return Err(mgkd::Error::invalid("step 1 refuses"));
            }
            Ok(())
        })
        .expect_err("the step's error");
    assert_eq!(steps, 2);
    assert!(err.to_string().contains("step 1 refuses"), "{err}");
}

#[test]
fn a_batch_larger_than_the_pipeline_is_refused() {
    let (_tmp, ds, be, mut pipeline) = setup(60, 7, 8);
    let err = pipeline
        .run(&be, &ds, &[(0..9).collect()], None, |_, _| Ok(()))
        .expect_err("9 rows > 8");
    assert!(err.to_string().contains("9 rows"), "{err}");
}
