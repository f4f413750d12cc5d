//! The input pipeline: batches are gathered from the shards, checked and laid out in the
//! backend's host staging memory on a background thread, while the calling thread queues the
//! device work of the batches before them. On CUDA the staging is page-locked and the
//! uploads run on a copy stream of their own: when batch `k + 1` is staged by the time step
//! `k` is to be queued, its upload is queued first and its copy runs beside step `k`
//! (double buffering on the device); step `k + 1` waits for it on the device, never on the
//! host. The steps wait for data only when the gathering thread falls behind.
//!
//! The wait is measured where it happens: the time the calling thread is blocked for a
//! batch, less the part of it in which the gathering thread was itself waiting for the device
//! to finish reading a staging (then the device is busy, not starved).
//!
//! Batch `k` reaches the step function as batch `k`, whatever the timing: determinism is
//! untouched. [`STAGINGS`] stagings circulate (one being uploaded, one being filled, one
//! ready), so at most that many batches are in host memory at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use crate::backend::{Backend, HostStaging};
use crate::data::{Dataset, Schema};
use crate::model::{DeviceBatch, PendingBatch, StagedBatch, TeacherIndex};
use crate::{Error, Result};

/// Stagings in circulation: double buffering plus one batch of slack for the gathering
/// thread.
pub const STAGINGS: usize = 3;

/// Reusable host staging for the batches of one dataset schema.
pub struct Pipeline<B: Backend> {
    stagings: Vec<B::Staging>,
    rows: usize,
}

/// What one [`Pipeline::run`] measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct PipelineStats {
    /// Seconds the steps waited for their data: blocked for a batch while the gathering
    /// thread was gathering (not while it waited for the device), plus queuing the uploads.
    pub wait_seconds: f64,
    /// Seconds the gathering thread spent gathering and staging batches.
    pub gather_seconds: f64,
}

impl<B: Backend> Pipeline<B> {
    /// Stagings for batches of at most `rows` rows of `schema` (allocated now, reused by
    /// every run).
    pub fn new(be: &B, schema: &Schema, rows: usize) -> Result<Self> {
        let (floats, ids) = StagedBatch::capacity(schema, rows);
        let stagings = (0..STAGINGS)
            .map(|_| be.alloc_staging(floats, ids))
            .collect::<Result<Vec<_>>>()?;
        Ok(Pipeline { stagings, rows })
    }

    /// Calls `step(k, batch)` for every batch `k` of `batches` (dataset row ids), in order,
    /// each gathered from `ds` and uploaded (with the ids that gather its rows from a teacher
    /// cache of index `teacher`); the gathering runs on a background thread up to
    /// [`STAGINGS`] − 1 batches ahead. Stops at the first error, of the gathering (a bad
    /// shard, a batch that fails its checks) or of `step`.
    pub fn run(
        &mut self,
        be: &B,
        ds: &Dataset,
        batches: &[Vec<u64>],
        teacher: Option<&TeacherIndex>,
        mut step: impl FnMut(usize, DeviceBatch<B>) -> Result<()>,
    ) -> Result<PipelineStats> {
        if let Some(b) = batches.iter().find(|b| b.len() > self.rows) {
            return Err(Error::invalid(format!(
                "a batch of {} rows exceeds the input pipeline's {} rows",
                b.len(),
                self.rows
            )));
        }
        if self.stagings.len() < STAGINGS {
            // A run that stopped early kept stagings in flight: make them again.
            let (floats, ids) = StagedBatch::capacity(ds.schema(), self.rows);
            while self.stagings.len() < STAGINGS {
                self.stagings.push(be.alloc_staging(floats, ids)?);
            }
        }
        let schema = ds.schema();
        let (full_tx, full_rx) = mpsc::sync_channel::<Result<(B::Staging, StagedBatch)>>(STAGINGS);
        let (free_tx, free_rx) = mpsc::channel::<B::Staging>();
        for s in self.stagings.drain(..) {
            // The receiver is alive: it is dropped only by the thread below.
            let _ = free_tx.send(s);
        }
        let mut stats = PipelineStats::default();
        // Nanoseconds the gathering thread has spent waiting for the device, and gathering.
        let (device_ns, gather_ns) = (AtomicU64::new(0), AtomicU64::new(0));
        let nanos = |t: Instant| u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let (outcome, returned) = std::thread::scope(|scope| {
            let (device_ns, gather_ns) = (&device_ns, &gather_ns);
            let gatherer = scope.spawn(move || {
                for ids in batches {
                    let Ok(mut staging) = free_rx.recv() else {
                        break;
                    };
                    let t = Instant::now();
                    let ready = staging.regions().map(|_| ());
                    device_ns.fetch_add(nanos(t), Ordering::Relaxed);
                    let t = Instant::now();
                    let staged = ready
                        .and_then(|()| ds.gather(ids))
                        .and_then(|b| StagedBatch::stage(&b, schema, teacher, &mut staging));
                    gather_ns.fetch_add(nanos(t), Ordering::Relaxed);
                    let failed = staged.is_err();
                    if full_tx.send(staged.map(|s| (staging, s))).is_err() || failed {
                        break;
                    }
                }
                free_rx
            });
            // Queues the upload of a batch received from the gathering thread (which waited
            // for it from `t`, the gathering thread having spent `device0` ns waiting for the
            // device by then). The time blocked counts as waiting for data, less the time
            // the gathering thread spent waiting for the device, and so does queuing.
            let mut upload = |received: Result<(B::Staging, StagedBatch)>,
                              t: Instant,
                              device0: u64|
             -> Result<PendingBatch<B>> {
                let device = device_ns.load(Ordering::Relaxed) - device0;
                let blocked = nanos(t).saturating_sub(device);
                let t = Instant::now();
                let pending = received.and_then(|(staging, staged)| {
                    let pending = DeviceBatch::queue_upload(be, &staging, &staged);
                    // The thread that fills it again waits for the copies just queued.
                    let _ = free_tx.send(staging);
                    pending
                });
                stats.wait_seconds += (blocked + nanos(t)) as f64 * 1e-9;
                pending
            };
            let started = || (Instant::now(), device_ns.load(Ordering::Relaxed));
            let outcome = (|| {
                // Batch k + 1 when it was there before step k was queued: its upload then
                // runs beside step k (an error of it is reported after step k).
                let mut ahead = None;
                for k in 0..batches.len() {
                    let pending = match ahead.take() {
                        Some(pending) => pending,
                        None => {
                            let (t, device0) = started();
                            let received = full_rx.recv().unwrap_or_else(|_| {
                                Err(Error::invalid(
                                    "the batch-gathering thread stopped unexpectedly",
                                ))
                            });
                            upload(received, t, device0)
                        }
                    }?;
                    if k + 1 < batches.len() {
                        let (t, device0) = started();
                        if let Ok(received) = full_rx.try_recv() {
                            ahead = Some(upload(received, t, device0));
                        }
                    }
                    step(k, pending.ready(be)?)?;
                }
                Ok(())
            })();
            // Unblock the gathering thread whatever happened, then take the stagings back.
            drop(full_rx);
            drop(free_tx);
            let returned = gatherer.join();
            (outcome, returned)
        });
        let free_rx =
            returned.map_err(|_| Error::invalid("the batch-gathering thread panicked"))?;
        self.stagings.extend(free_rx.try_iter());
        stats.gather_seconds = gather_ns.into_inner() as f64 * 1e-9;
        outcome.map(|()| stats)
    }
}
