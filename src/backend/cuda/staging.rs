//! Page-locked host staging for batch uploads ([`crate::backend::Backend::Staging`]), and
//! the fences that order the uploads' copy stream with the compute stream
//! ([`crate::backend::Backend::Fence`]).
//!
//! A copy from pageable memory goes through the driver's own bounce buffer, and a copy
//! larger than that buffer waits for the work queued before it: every batch upload then
//! stalls the host until the device has finished the previous step. From page-locked memory
//! the copy is a DMA queued on a stream like a kernel, and the host goes on at once. The
//! memory is reused batch after batch; an event recorded after each copy out of it tells the
//! thread that writes the next batch when it may.
//!
//! The copies run on a stream of their own, so that the next batch's upload overlaps the
//! step before it instead of waiting for it and then making the next step wait in turn:
//! - each uploaded buffer is allocated in the compute stream's order, and the copy stream
//!   waits for that point before writing it (so the allocation never reuses memory that
//!   work queued before it still reads);
//! - the compute stream waits for a [`CudaFence`] recorded on the copy stream after a
//!   batch's copies before the first work that reads the batch;
//! - the buffers are freed in the compute stream's order after that work; a fence dropped
//!   unwaited is waited for then, so a batch dropped unused is never freed while its copies
//!   may still run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaStream};

use crate::backend::HostStaging;
use crate::Result;

/// `len` elements of page-locked host memory.
struct Pinned<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: the memory is owned by this value alone (a plain host allocation); access goes
// through `&mut self`, and copies out of it are ordered by the staging's event.
unsafe impl<T: Send> Send for Pinned<T> {}

impl<T> Pinned<T> {
    /// Allocates `len` elements (at least one, the driver refuses zero bytes); the context
    /// must be current on the calling thread.
    fn new(len: usize) -> std::result::Result<Self, String> {
        let bytes = len
            .max(1)
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| format!("{len} elements overflow the address space"))?;
        // SAFETY: a plain allocation of `bytes` (flags 0: page-locked, not write-combined,
        // so that reading it back stays fast).
        let ptr = unsafe { result::malloc_host(bytes, 0) }.map_err(|e| e.to_string())?;
        Ok(Pinned {
            ptr: ptr.cast(),
            len,
        })
    }

    fn as_slice(&self) -> &[T] {
        // SAFETY: `ptr` holds `len` initialised elements (zeroed by `CudaStaging::new` before
        // any use) and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as `as_slice`, and `&mut self` makes the access exclusive on the host.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T> Drop for Pinned<T> {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `malloc_host` and is freed once; the owner synchronised
        // the copies out of it first (`CudaStaging`'s drop). A failure cannot be reported
        // from a destructor, and leaves nothing in use.
        let _ = unsafe { result::free_host(self.ptr.cast()) };
    }
}

/// A batch's floats and ids in page-locked memory, with the event that marks the last copy
/// queued out of them.
pub struct CudaStaging {
    floats: Pinned<f32>,
    ids: Pinned<u32>,
    copied: CudaEvent,
    ctx: Arc<CudaContext>,
}

impl CudaStaging {
    /// Page-locked room for `floats` floats and `ids` ids, zero-filled.
    pub(super) fn new(ctx: &Arc<CudaContext>, floats: usize, ids: usize) -> Result<Self> {
        let err = |e: String| crate::Error::device(format!("page-locked staging: {e}"));
        ctx.bind_to_thread().map_err(|e| err(e.to_string()))?;
        let mut staging = CudaStaging {
            floats: Pinned::new(floats).map_err(err)?,
            ids: Pinned::new(ids).map_err(err)?,
            copied: ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC))
                .map_err(|e| err(e.to_string()))?,
            ctx: ctx.clone(),
        };
        staging.floats.as_mut_slice().fill(0.0);
        staging.ids.as_mut_slice().fill(0);
        Ok(staging)
    }

    /// The floats, for a copy to the device.
    pub(super) fn floats(&self) -> &[f32] {
        self.floats.as_slice()
    }

    /// The ids, for a copy to the device.
    pub(super) fn ids(&self) -> &[u32] {
        self.ids.as_slice()
    }

    /// The event to record after each copy queued out of this staging.
    pub(super) fn copied(&self) -> &CudaEvent {
        &self.copied
    }
}

impl HostStaging<f32> for CudaStaging {
    fn regions(&mut self) -> Result<(&mut [f32], &mut [u32])> {
        let err = |e: cudarc::driver::DriverError| {
            crate::Error::device(format!("waiting for a batch upload: {e}"))
        };
        self.ctx.bind_to_thread().map_err(err)?;
        self.copied.synchronize().map_err(err)?;
        Ok((self.floats.as_mut_slice(), self.ids.as_mut_slice()))
    }
}

impl Drop for CudaStaging {
    fn drop(&mut self) {
        // The memory is freed after this: no copy may still be reading it.
        let _ = self.ctx.bind_to_thread();
        let _ = self.copied.synchronize();
    }
}

/// A fence after the staged uploads queued so far: an event recorded on the copy stream.
pub struct CudaFence {
    event: CudaEvent,
    /// The compute stream, which waits for the fence when it is dropped unwaited.
    compute: Arc<CudaStream>,
    waited: AtomicBool,
}

impl CudaFence {
    /// A fence after everything queued on `copies` so far, for `compute` to wait for.
    pub(super) fn after(
        copies: &Arc<CudaStream>,
        compute: &Arc<CudaStream>,
    ) -> std::result::Result<CudaFence, cudarc::driver::DriverError> {
        Ok(CudaFence {
            event: copies.record_event(None)?,
            compute: compute.clone(),
            waited: AtomicBool::new(false),
        })
    }

    /// Makes `compute` wait (queued) for the copies before the fence.
    pub(super) fn wait(
        &self,
        compute: &CudaStream,
    ) -> std::result::Result<(), cudarc::driver::DriverError> {
        compute.wait(&self.event)?;
        self.waited.store(true, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for CudaFence {
    fn drop(&mut self) {
        // Unwaited, the buffers it covers may be freed next (in the compute stream's
        // order): the compute stream waits for their copies first. A failure cannot be
        // reported from a destructor; the next synchronisation waits for both streams.
        if !self.waited.load(Ordering::Relaxed) {
            let _ = self.compute.wait(&self.event);
        }
    }
}
