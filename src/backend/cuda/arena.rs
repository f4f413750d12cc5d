//! The CUDA backend's buffer ([`CudaBuf`], f32 or bf16 elements) and its activation arena
//! ([`Arena`]): the
//! memory behind [`crate::backend::Backend::scratch`], planned by
//! [`crate::backend::arena::ArenaPlan`]. A buffer either owns an allocation from the
//! stream-ordered pool (parameters, optimizer state, uploads: anything that outlives a step)
//! or is a window of the arena's slab (a step's activations, gradients and scratch), which
//! costs no driver call to hand out or to give back.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaGraph, CudaSlice, CudaStream, DevicePtr};

use half::bf16;

use super::launch::DevPtr;
use crate::backend::arena::{self, lock, ArenaPlan, ArenaStats, HoldsPlan};
use crate::backend::Precision;

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

impl HoldsPlan for ArenaState {
    fn plan_mut(&mut self) -> &mut ArenaPlan {
        &mut self.plan
    }
}

/// A held window of this backend's arena.
type Lease = arena::Lease<ArenaState>;

/// What keeps a [`CudaBuf`]'s memory alive (its fields are only ever dropped).
#[allow(dead_code)]
enum Hold {
    /// An allocation of its own (a `CudaSlice` of the buffer's element type).
    Own(Box<dyn std::any::Any + Send + Sync>),
    /// A window of an arena slab.
    Slab(Slab, Lease),
    /// A scratch request the slab could not serve (a miss): an allocation of its own that
    /// still counts as held by the arena's round.
    Missed(CudaSlice<u8>, Lease),
}

/// A buffer of f32 or bf16 elements on the device ([`CudaBuf::dtype`]): an allocation of its
/// own, or a window of the activation arena. `ptr` is the address of element 0.
pub struct CudaBuf {
    ptr: u64,
    len: usize,
    dtype: Precision,
    hold: Hold,
}

impl std::fmt::Debug for CudaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.hold {
            Hold::Own(_) => "own",
            Hold::Slab(..) => "arena",
            Hold::Missed(..) => "arena miss",
        };
        write!(f, "CudaBuf({} {}, {kind})", self.len, self.dtype.as_str())
    }
}

/// A buffer's element 0 with its type: what a kernel instance is chosen by.
#[derive(Debug, Clone, Copy)]
pub enum TypedPtr {
    /// f32 elements.
    F32(DevPtr<f32>),
    /// bf16 elements.
    Bf16(DevPtr<bf16>),
}

impl TypedPtr {
    /// The address `elems` elements further on.
    pub fn offset(self, elems: usize) -> TypedPtr {
        match self {
            TypedPtr::F32(p) => TypedPtr::F32(p.offset(elems)),
            TypedPtr::Bf16(p) => TypedPtr::Bf16(p.offset(elems)),
        }
    }

    /// The raw address.
    pub fn addr(self) -> u64 {
        match self {
            TypedPtr::F32(p) => p.addr(),
            TypedPtr::Bf16(p) => p.addr(),
        }
    }

    /// The element type.
    pub fn dtype(self) -> Precision {
        match self {
            TypedPtr::F32(_) => Precision::F32,
            TypedPtr::Bf16(_) => Precision::Bf16,
        }
    }

    /// The address when the elements are f32.
    pub fn f32(self) -> Option<DevPtr<f32>> {
        match self {
            TypedPtr::F32(p) => Some(p),
            TypedPtr::Bf16(_) => None,
        }
    }

    /// The address when the elements are bf16.
    pub fn bf16(self) -> Option<DevPtr<bf16>> {
        match self {
            TypedPtr::Bf16(p) => Some(p),
            TypedPtr::F32(_) => None,
        }
    }
}

/// Bytes of one element of `dtype` on the device.
pub fn elem_bytes(dtype: Precision) -> usize {
    dtype.act_bytes(std::mem::size_of::<f32>())
}

impl CudaBuf {
    /// A buffer owning `slice`, whose elements are of type `dtype` (`T` is f32 for f32, u16
    /// or bf16 for bf16).
    pub(super) fn own<T: 'static>(
        slice: CudaSlice<T>,
        dtype: Precision,
        stream: &Arc<CudaStream>,
    ) -> CudaBuf
    where
        CudaSlice<T>: Send + Sync,
    {
        debug_assert_eq!(std::mem::size_of::<T>(), elem_bytes(dtype));
        let ptr = slice.device_ptr(stream).0;
        CudaBuf {
            ptr,
            len: slice.len(),
            dtype,
            hold: Hold::Own(Box::new(slice)),
        }
    }

    /// Device address of element 0 of an f32 buffer.
    ///
    /// # Panics
    /// On a bf16 buffer (a kernel taking f32 handed a bf16 buffer is a backend bug).
    pub fn ptr(&self) -> DevPtr<f32> {
        assert_eq!(
            self.dtype,
            Precision::F32,
            "a bf16 buffer where an f32 one is needed"
        );
        DevPtr::new(self.ptr)
    }

    /// Device address of element 0, with its type.
    pub fn typed(&self) -> TypedPtr {
        match self.dtype {
            Precision::F32 => TypedPtr::F32(DevPtr::new(self.ptr)),
            Precision::Bf16 => TypedPtr::Bf16(DevPtr::new(self.ptr)),
        }
    }

    /// The element type.
    pub fn dtype(&self) -> Precision {
        self.dtype
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.len * elem_bytes(self.dtype)
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

    /// A window of `len` elements of `dtype` for one step. When no window is held and an
    /// earlier round reached above the slab, the slab is first replaced by one of that size
    /// (not while `recording`: a graph cannot own memory the backend keeps; the request then
    /// misses and the graph records an allocation of its own). A request that does not fit
    /// is served by an allocation of its own (a miss).
    pub(super) fn take(
        &self,
        stream: &Arc<CudaStream>,
        len: usize,
        dtype: Precision,
        recording: bool,
    ) -> std::result::Result<CudaBuf, cudarc::driver::DriverError> {
        let bytes = len.saturating_mul(elem_bytes(dtype));
        let mut st = lock(&self.state);
        if !recording {
            Self::resize(&mut st, stream)?;
        }
        let window = st.plan.take(bytes);
        let at = window.slab_offset();
        let lease = Lease::new(self.state.clone(), window);
        match (at, st.slab.clone()) {
            (Some(off), Some(slab)) => {
                let ptr = slab.device_ptr(stream).0 + off as u64;
                Ok(CudaBuf {
                    ptr,
                    len,
                    dtype,
                    hold: Hold::Slab(slab, lease),
                })
            }
            _ => {
                drop(st);
                // SAFETY: bytes have no invalid bit patterns (the `scratch` contract as
                // above); on failure the lease is dropped, which gives the window back.
                let own = unsafe { stream.alloc::<u8>(bytes) }?;
                let ptr = own.device_ptr(stream).0;
                Ok(CudaBuf {
                    ptr,
                    len,
                    dtype,
                    hold: Hold::Missed(own, lease),
                })
            }
        }
    }

    /// Replaces the slab by a larger one now if a finished round reached above it and no
    /// window is held (before a graph is recorded, so that the recording
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
