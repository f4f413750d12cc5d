//! The CUDA backend's float buffer ([`CudaBuf`]) and its activation arena ([`Arena`]): the
//! memory behind [`crate::backend::Backend::scratch`], planned by
//! [`crate::backend::arena::ArenaPlan`]. A buffer either owns an allocation from the
//! stream-ordered pool (parameters, optimizer state, uploads: anything that outlives a step)
//! or is a window of the arena's slab (a step's activations, gradients and scratch), which
//! costs no driver call to hand out or to give back.

use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{CudaGraph, CudaSlice, CudaStream, DevicePtr};

use super::launch::DevPtr;
use crate::backend::arena::{ArenaPlan, ArenaStats};

/// The slab: one device allocation, shared by the windows carved from it and by the graphs
/// recorded against it (which keep it alive after it has been replaced by a larger one).
type Slab = Arc<CudaSlice<u8>>;

/// The arena's plan and its current slab, under one lock.
struct ArenaState {
    plan: ArenaPlan,
    slab: Option<Slab>,
}

/// The activation arena of one backend (see the module documentation).
pub(super) struct Arena {
    state: Arc<Mutex<ArenaState>>,
}

/// A held window of the arena: gives it back when dropped (the last one ends the round).
struct Lease(Arc<Mutex<ArenaState>>);

impl Drop for Lease {
    fn drop(&mut self) {
        lock(&self.0).plan.give_back();
    }
}

/// Locks `state`, recovering from a panic elsewhere (the plan is updated in one step).
fn lock(state: &Mutex<ArenaState>) -> MutexGuard<'_, ArenaState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// What keeps a [`CudaBuf`]'s memory alive (its fields are only ever dropped).
#[allow(dead_code)]
enum Hold {
    /// An allocation of its own.
    Own(CudaSlice<f32>),
    /// A window of an arena slab.
    Slab(Slab, Lease),
    /// A scratch request the slab could not serve (a miss): an allocation of its own that
    /// still counts as held by the arena's round.
    Missed(CudaSlice<f32>, Lease),
}

/// A float buffer on the device: an allocation of its own, or a window of the activation
/// arena. `ptr` is the address of element 0.
pub struct CudaBuf {
    ptr: u64,
    len: usize,
    hold: Hold,
}

impl std::fmt::Debug for CudaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.hold {
            Hold::Own(_) => "own",
            Hold::Slab(..) => "arena",
            Hold::Missed(..) => "arena miss",
        };
        write!(f, "CudaBuf({} f32, {kind})", self.len)
    }
}

impl CudaBuf {
    /// A buffer owning `slice`.
    pub(super) fn own(slice: CudaSlice<f32>, stream: &Arc<CudaStream>) -> CudaBuf {
        let ptr = slice.device_ptr(stream).0;
        CudaBuf {
            ptr,
            len: slice.len(),
            hold: Hold::Own(slice),
        }
    }

    /// Device address of element 0.
    pub fn ptr(&self) -> DevPtr<f32> {
        DevPtr::new(self.ptr)
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the buffer is a window of the activation arena's slab.
    pub fn in_arena(&self) -> bool {
        matches!(self.hold, Hold::Slab(..))
    }
}

/// A recorded graph and the arena slab it was recorded against (kept alive while the graph
/// is, since its kernels address it).
pub struct RecordedGraph {
    pub(super) graph: CudaGraph,
    generation: u64,
    _slab: Option<Slab>,
}

impl Arena {
    /// An arena with an empty slab: the first step measures what the largest needs.
    pub(super) fn new() -> Arena {
        Arena {
            state: Arc::new(Mutex::new(ArenaState {
                plan: ArenaPlan::new(),
                slab: None,
            })),
        }
    }

    /// A window of `len` f32 for one step. When no window is held and an earlier round
    /// asked for more than the slab holds, the slab is first replaced by one of that size
    /// (not while `recording`: a graph cannot own memory the backend keeps; the request then
    /// misses and the graph records an allocation of its own). A request that does not fit
    /// is served by an allocation of its own (a miss).
    pub(super) fn take(
        &self,
        stream: &Arc<CudaStream>,
        len: usize,
        recording: bool,
    ) -> std::result::Result<CudaBuf, cudarc::driver::DriverError> {
        let bytes = len.saturating_mul(std::mem::size_of::<f32>());
        let mut st = lock(&self.state);
        if !recording {
            Self::resize(&mut st, stream)?;
        }
        let at = st.plan.take(bytes);
        let lease = Lease(self.state.clone());
        match (at, st.slab.clone()) {
            (Some(off), Some(slab)) => {
                let ptr = slab.device_ptr(stream).0 + off as u64;
                Ok(CudaBuf {
                    ptr,
                    len,
                    hold: Hold::Slab(slab, lease),
                })
            }
            _ => {
                drop(st);
                // SAFETY: f32 has no invalid bit patterns (the `scratch` contract as above);
                // on failure the lease is dropped, which gives the window back.
                let own = unsafe { stream.alloc::<f32>(len) }?;
                let ptr = own.device_ptr(stream).0;
                Ok(CudaBuf {
                    ptr,
                    len,
                    hold: Hold::Missed(own, lease),
                })
            }
        }
    }

    /// Replaces the slab by a larger one now if a finished round asked for more than it
    /// holds and no window is held (before a graph is recorded, so that the recording
    /// addresses the slab its steps need).
    pub(super) fn settle(
        &self,
        stream: &Arc<CudaStream>,
    ) -> std::result::Result<(), cudarc::driver::DriverError> {
        Self::resize(&mut lock(&self.state), stream)
    }

    /// [`Arena::settle`] under the lock.
    fn resize(
        st: &mut ArenaState,
        stream: &Arc<CudaStream>,
    ) -> std::result::Result<(), cudarc::driver::DriverError> {
        if let Some(cap) = st.plan.wanted() {
            // The old slab is freed (in stream order) unless a recorded graph keeps it.
            st.slab = None;
            // SAFETY: u8 has no invalid bit patterns; windows are written before being read
            // (the `scratch` contract) or zero-filled by the caller.
            let slab = unsafe { stream.alloc::<u8>(cap) }.inspect_err(|_| st.plan.resized(0))?;
            st.slab = Some(Arc::new(slab));
            st.plan.resized(cap);
        }
        Ok(())
    }

    /// `graph`, tied to the slab it was recorded against.
    pub(super) fn keep(&self, graph: CudaGraph) -> RecordedGraph {
        let st = lock(&self.state);
        RecordedGraph {
            graph,
            generation: st.plan.generation(),
            _slab: st.slab.clone(),
        }
    }

    /// Whether `graph` was recorded against the current slab.
    pub(super) fn current(&self, graph: &RecordedGraph) -> bool {
        lock(&self.state).plan.generation() == graph.generation
    }

    /// Size and service so far.
    pub(super) fn stats(&self) -> ArenaStats {
        lock(&self.state).plan.stats()
    }
}
