//! Peak host memory, for the CPU backends' [`crate::backend::Backend::peak_memory`]: a
//! global allocator ([`CountingAllocator`], installed by the `mgkd-train` binary) that
//! forwards every call to the system allocator and counts the bytes of large allocations
//! (at least [`COUNTED_BYTES`]). Every buffer of the CPU backends is one such allocation,
//! made when the model asks for it and freed when the model drops it, so the peak of the
//! counted bytes is what a step held at once: the CPU's counterpart of a device's pool and
//! arena high-water marks (it also counts the process's other large allocations, such as
//! uploaded batches and parameters, as the device's pool does). Where the allocator is not
//! installed (the library in another program, the unit tests) nothing is counted and
//! [`peak_bytes`] is `None`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// Allocations of at least this many bytes are counted (buffers; smaller ones are the
/// host's own bookkeeping).
pub const COUNTED_BYTES: usize = 4096;

/// Bytes of counted allocations held now.
static LIVE: AtomicU64 = AtomicU64::new(0);
/// The most bytes held at once since the last [`reset_peak`].
static PEAK: AtomicU64 = AtomicU64::new(0);
/// Whether [`CountingAllocator`] has served an allocation (it is the global allocator).
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// The system allocator, counting the live bytes of allocations of at least
/// [`COUNTED_BYTES`] and their peak (two relaxed atomic operations per such allocation).
pub struct CountingAllocator;

/// Records `bytes` more held (for a counted size).
fn held(bytes: usize) {
    let now = LIVE.fetch_add(bytes as u64, Relaxed) + bytes as u64;
    PEAK.fetch_max(now, Relaxed);
    INSTALLED.store(true, Relaxed);
}

/// Records `bytes` fewer held (for a counted size).
fn released(bytes: usize) {
    LIVE.fetch_sub(bytes as u64, Relaxed);
}

// SAFETY: every call is forwarded to the system allocator with its own arguments; the
// counting reads only sizes and whether the system call succeeded.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() && layout.size() >= COUNTED_BYTES {
            held(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() && layout.size() >= COUNTED_BYTES {
            held(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        if layout.size() >= COUNTED_BYTES {
            released(layout.size());
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            if layout.size() >= COUNTED_BYTES {
                released(layout.size());
            }
            if new_size >= COUNTED_BYTES {
                held(new_size);
            }
        }
        p
    }
}

/// The most bytes of counted allocations held at once since the last [`reset_peak`]
/// (since the start before the first), or `None` where [`CountingAllocator`] is not the
/// global allocator.
pub fn peak_bytes() -> Option<u64> {
    INSTALLED.load(Relaxed).then(|| PEAK.load(Relaxed))
}

/// Bytes of counted allocations held now, or `None` where [`CountingAllocator`] is not the
/// global allocator.
pub fn live_bytes() -> Option<u64> {
    INSTALLED.load(Relaxed).then(|| LIVE.load(Relaxed))
}

/// Starts a new window for [`peak_bytes`] at the bytes held now.
pub fn reset_peak() {
    PEAK.store(LIVE.load(Relaxed), Relaxed);
}
