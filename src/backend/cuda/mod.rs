//! The CUDA backend: [`CudaBackend`], `F = f32`, buffers [`CudaBuf`], ids
//! `CudaSlice<u32>`, all work on one stream of one device but the staged batch uploads,
//! which run on a copy stream beside it ([`staging`]).
//!
//! - Memory: buffers that outlive a step come from the stream-ordered pool; a step's
//!   activations, gradients and scratch ([`Backend::scratch`]) are windows of one activation
//!   arena ([`arena`]), sized by the first step of the largest batch shape, so that later
//!   steps make no allocation at all.
//! - Kernels: the project's own (`kernels/*.cu`, see [`nvrtc`]), compiled by NVRTC at start
//!   for the device's architecture and cached for the process; dense products through cuBLAS
//!   (row-major through the usual swap: `C = op(A)·op(B)` row-major is
//!   `Cᵀ = op(B)ᵀ·op(A)ᵀ` column-major, so cuBLAS gets B's buffer first; strided-batched for
//!   `Gemm::batch > 1` when the C matrices are disjoint, else one product per batch in
//!   order). cuBLAS runs in its default math mode (no TF32).
//! - Determinism: no floating-point atomics. Every reduction (bias, LayerNorm γ/β, embedding
//!   and position scatter-adds, loss sums, Σx²) has a launch shape that depends only on the
//!   problem's shape and a fixed summation order, so repeated runs give identical bits.
//!   Embedding and position gradients are added in token order, as on the CPU.
//! - Errors: the trait's element-wise ops return nothing, so a failed launch, or a fault a
//!   kernel detects (an id ≥ its vocabulary, a length beyond its padded extent, raised in a
//!   device flag word), is kept and reported as [`Error::Device`] by the next call that
//!   synchronises (a download, a loss, `sum_squares`). A bad id contributes nothing; a bad
//!   length is clamped; either way the error surfaces. Window extents that do not fit their
//!   buffers are caller bugs and panic with a message, as on the CPU backend.
//! - Losses compute per-row terms in double, sum them in a fixed order on the device and
//!   download one scalar.
//! - `fine_loss` is one block per batch row (a warp per four student tokens, their scores
//!   and their vectors in shared memory), which bounds `4·(lk + d) + 1` floats by 48 KiB of
//!   shared memory (12272 floats, 64 bytes being kept for its static shared memory:
//!   lk ≤ 2939 at d = 128); larger shapes are refused with an error.

pub mod arena;
pub mod attention;
pub mod embedding;
pub mod kernel_cache;
pub mod launch;
pub mod lt;
pub mod nvrtc;
pub mod staging;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::sys as drv_sys;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig};
use cudarc::nvrtc::Ptx;
use half::bf16;

use self::arena::{elem_bytes, Arena};
pub use self::arena::{CudaBuf, RecordedGraph, TypedPtr};
pub use self::attention::{AttentionKernels, ATTENTION_ENV};
use self::embedding::{check_tables, EmbBackwardPlan, EmbFields};
use self::launch::Kernels;
pub use self::launch::{DevPtr, KernelDecl, KERNELS};
use super::device::{probe_cuda, CudaDeviceInfo};
use super::{
    attention::{attention_backward_composed, attention_composed, attention_infer_composed},
    extent, sched_values, AdamW, ArenaStats, AttnShape, Backend, EmbMode, EmbTable, FineGrads,
    FineShape, Gemm, Mut, Outer, Precision, Ref, ValidTokens,
};
use crate::dist::{nccl, Comm};
use crate::{Error, Result};

/// The CUDA backend's id buffer.
pub type CudaIds = CudaSlice<u32>;

/// Bytes of cuBLAS's workspace (32 MiB).
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;
/// Threads per block of element-wise kernels.
const THREADS: u32 = 256;
/// Rows per block of the warp-per-row kernels (4 warps).
const ROW_WARPS: u32 = 4;
/// Minimum rows per chunk of the column reductions.
const COL_CHUNK_ROWS: usize = 128;
/// Batch rows per chunk (at least) of the two-pass sums over batch rows (the position
/// gradient, the empty-sequence vector's gradient).
pub const ROW_CHUNK_ROWS: usize = 32;
/// Warps per block of the fine-alignment kernel (at most).
const FINE_WARPS: usize = 4;
/// Student tokens a warp of the fine-alignment kernel takes at once (`FINE_G` in losses.cu).
const FINE_GROUP: usize = 4;
/// Dynamic shared memory the fine-alignment kernel may use, in floats: 48 KiB (a block's
/// limit without opting in) less 64 bytes kept for its static shared memory (16 bytes today,
/// as `tests/kernels_compile.rs` prints).
const FINE_SMEM_FLOATS: usize = (48 * 1024 - 64) / 4;
/// Blocks of the first pass of `sum_squares` (at most).
const SUMSQ_BLOCKS: usize = 1024;
/// Largest grid x-extent used by grid-stride kernels.
const MAX_GRID: usize = 1 << 20;

/// Scratch buffers and the device fault flag, used under one lock.
struct State {
    /// f32 partial sums of the column reductions.
    fscratch: CudaSlice<f32>,
    /// f64 loss terms: slot 0 the reduced value, slots 1.. the terms.
    dscratch: CudaSlice<f64>,
    /// u32 scratch of the embedding backward's counting sort.
    uscratch: CudaSlice<u32>,
    /// Device addresses of the products of a pointer-array batched GEMM.
    pscratch: CudaSlice<u64>,
    /// Fault bits raised by kernels (`MGKD_ERR_*` in common.cuh).
    err_flag: CudaSlice<u32>,
    /// Scratch buffers outgrown after a graph was recorded: a recorded graph keeps the
    /// addresses it was recorded with, so they live as long as the backend.
    retired: Vec<Box<dyn std::any::Any + Send>>,
}

/// The CUDA backend on one device (see the module documentation).
pub struct CudaBackend {
    info: CudaDeviceInfo,
    stream: Arc<CudaStream>,
    /// The staged uploads' stream ([`Backend::upload_staged`]): their copies run beside
    /// the steps queued on `stream`.
    copy_stream: Arc<CudaStream>,
    /// Recorded on `stream` after each staged upload's allocation, for `copy_stream` to
    /// wait for before it writes there.
    allocated: cudarc::driver::CudaEvent,
    blas: CudaBlas,
    /// Linear maps with the bias in the product's epilogue (shares the workspace below).
    lt: lt::LtLinear,
    /// cuBLAS's workspace, set once so that no cuBLAS call allocates (a graph being
    /// recorded cannot).
    _blas_workspace: CudaSlice<u8>,
    kernels: HashMap<&'static str, CudaFunction>,
    state: Mutex<State>,
    /// The activation arena of [`Backend::scratch`].
    arena: Arena,
    /// Which attention implementation runs ([`attention::AttentionKernels`]).
    attention: AttentionKernels,
    /// The element type of activations and matrix inputs ([`Backend::precision`]).
    precision: Precision,
    /// Device operations queued so far ([`Backend::launch_count`]).
    launches: std::sync::atomic::AtomicU64,
    error: Mutex<Option<String>>,
    /// Set while a graph is being recorded: the scratch buffers must not grow then.
    recording: std::sync::atomic::AtomicBool,
    /// Set once a graph has been recorded: from then on an outgrown scratch buffer is kept
    /// (in `State::retired`), not freed.
    recorded: std::sync::atomic::AtomicBool,
    // Dropped last: everything above lives in this context.
    ctx: Arc<CudaContext>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.info)
            .finish()
    }
}

/// `usize` → `i32` for a kernel or cuBLAS argument; a shape beyond 2³¹ is a caller bug.
fn int(x: usize, what: &str) -> i32 {
    i32::try_from(x)
        .unwrap_or_else(|_| panic!("{what} = {x} exceeds the CUDA backend's 2^31 limit"))
}

/// `usize` → `i64` (lossless on every supported target).
fn long(x: usize) -> i64 {
    i64::try_from(x).unwrap_or(i64::MAX)
}

// The launch shapes below are public so that the kernel lab (tests/kernel_emu) launches a
// kernel exactly as the backend does.

/// The fine-alignment kernel's launch for a batch of `batch` rows, `lq` student and `lk`
/// teacher tokens of width `d`, and its tile of student tokens per pass (whose errors are
/// summed in order at the tile's end): one block per row of `FINE_WARPS` warps (fewer where
/// the shared memory would not hold them), `warps·FINE_GROUP·(lk + d)` floats of shared
/// memory and one per student token of the tile; `None` when not one token fits beside one
/// warp.
pub fn fine_cfg(batch: usize, lq: usize, lk: usize, d: usize) -> Option<(LaunchConfig, usize)> {
    // FINE_WARPS, then half as many, down to one.
    let warps = std::iter::successors(Some(FINE_WARPS), |&w| (w > 1).then_some(w / 2))
        .find(|w| w * FINE_GROUP * (lk + d) < FINE_SMEM_FLOATS)?;
    let fixed = warps * FINE_GROUP * (lk + d);
    let tile = (FINE_SMEM_FLOATS - fixed).clamp(1, lq.max(1));
    let cfg = LaunchConfig {
        grid_dim: (
            u32::try_from(batch).expect("batch within the grid limit"),
            1,
            1,
        ),
        block_dim: (32 * warps as u32, 1, 1),
        shared_mem_bytes: (std::mem::size_of::<f32>() * (fixed + tile)) as u32,
    };
    Some((cfg, tile))
}

/// The launch of the one-block reduction of a loss's terms (`reduce_terms`).
pub fn reduce_cfg() -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A 1-D grid-stride launch over `n` items.
pub fn grid1(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, MAX_GRID);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A warp-per-row launch over `rows` rows.
pub fn rows_cfg(rows: usize) -> LaunchConfig {
    let blocks = rows.div_ceil(ROW_WARPS as usize).max(1);
    LaunchConfig {
        grid_dim: (
            u32::try_from(blocks).expect("row count within the grid limit"),
            1,
            1,
        ),
        block_dim: (32 * ROW_WARPS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Rows per chunk and chunk count of a column reduction over `rows` rows (shape-only, so
/// the summation order is fixed; at most 65535 chunks, the grid's y limit).
pub fn col_chunks(rows: usize) -> (usize, usize) {
    row_chunks(rows, COL_CHUNK_ROWS)
}

/// Rows per chunk and chunk count of a two-pass sum over `rows` rows in chunks of at least
/// `min_per` rows (shape-only, so the summation order is fixed; at most 65535 chunks, the
/// grid's y and z limit).
pub fn row_chunks(rows: usize, min_per: usize) -> (usize, usize) {
    let per = min_per.max(rows.div_ceil(65_535));
    (per, rows.div_ceil(per))
}

/// The launch of a column-wise pass: 128 threads per block over `cols` columns (x) and
/// `chunks` chunks (y; 1 for the second pass).
pub fn chunk_grid(cols: usize, chunks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (cols.div_ceil(128) as u32, chunks as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaBackend {
    /// Opens CUDA device `index`, compiles (or takes from the process cache) every kernel for
    /// its architecture and loads them. Fails with a one-line reason when CUDA, the device,
    /// NVRTC or cuBLAS is unavailable; never panics for a missing library.
    pub fn new(index: usize) -> Result<CudaBackend> {
        Self::with_precision(index, Precision::F32)
    }

    /// [`CudaBackend::new`] with activations and matrix inputs stored in `precision`
    /// (docs/model.md §7): under bf16 a step's activations, gradients and scratch and the
    /// weights' compute copy are bf16, products run on tensor cores with f32 accumulation,
    /// and parameters, gradients, optimizer state and statistics stay f32.
    pub fn with_precision(index: usize, precision: Precision) -> Result<CudaBackend> {
        let info = probe_cuda(index).map_err(|w| Error::device(format!("cuda:{index}: {w}")))?;
        nvrtc::quietly("CUDA backend", || Self::init(info, precision))
            .map_err(|w| Error::device(format!("cuda:{index}: {w}")))
    }

    fn init(
        info: CudaDeviceInfo,
        precision: Precision,
    ) -> std::result::Result<CudaBackend, String> {
        let attention = AttentionKernels::from_env()?;
        let ctx = CudaContext::new(info.index).map_err(|e| format!("context: {e}"))?;
        // The streams are ordered by the backend's own events (the copy stream only writes
        // staged uploads, between two explicit waits): cudarc's event tracking is not needed.
        // SAFETY: called before any allocation; every cross-stream use is ordered by the
        // events of `upload_pinned`, `upload_fence` and `wait_upload`.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| format!("stream: {e}"))?;
        let copy_stream = ctx.new_stream().map_err(|e| format!("copy stream: {e}"))?;
        let allocated = ctx.new_event(None).map_err(|e| format!("event: {e}"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| format!("cuBLAS: {e:?}"))?;
        let workspace: CudaSlice<u8> = stream
            .alloc_zeros(BLAS_WORKSPACE_BYTES)
            .map_err(|e| format!("cuBLAS workspace: {e}"))?;
        // SAFETY: a live handle and a device buffer of that many bytes, kept as long as the
        // handle (field order: the workspace is dropped after the handle).
        unsafe {
            blas_sys::cublasSetWorkspace_v2(
                *blas.handle(),
                workspace.device_ptr(&stream).0 as *mut std::ffi::c_void,
                BLAS_WORKSPACE_BYTES,
            )
        }
        .result()
        .map_err(|e| format!("cuBLAS workspace: {e:?}"))?;
        let lt = lt::LtLinear::new(workspace.device_ptr(&stream).0, BLAS_WORKSPACE_BYTES)?;
        let images = nvrtc::images(&info.arch())?;
        let mut kernels = HashMap::new();
        for (file, cubin) in images.iter() {
            let module = ctx
                .load_module(Ptx::from_binary(cubin.clone()))
                .map_err(|e| format!("loading {file}: {e}"))?;
            for k in KERNELS.iter().filter(|k| k.file == *file) {
                let func = module
                    .load_function(k.name)
                    .map_err(|e| format!("{file}: kernel {}: {e}", k.name))?;
                kernels.insert(k.name, func);
            }
        }
        let alloc = |what: &str, e: cudarc::driver::DriverError| format!("{what}: {e}");
        let state = State {
            fscratch: stream.alloc_zeros(1).map_err(|e| alloc("scratch", e))?,
            dscratch: stream.alloc_zeros(1).map_err(|e| alloc("scratch", e))?,
            uscratch: stream.alloc_zeros(1).map_err(|e| alloc("scratch", e))?,
            pscratch: stream.alloc_zeros(1).map_err(|e| alloc("scratch", e))?,
            err_flag: stream.alloc_zeros(1).map_err(|e| alloc("flag", e))?,
            retired: Vec::new(),
        };
        let backend = CudaBackend {
            info,
            stream,
            copy_stream,
            allocated,
            blas,
            lt,
            _blas_workspace: workspace,
            kernels,
            state: Mutex::new(state),
            arena: Arena::new(),
            attention,
            precision,
            launches: std::sync::atomic::AtomicU64::new(0),
            error: Mutex::new(None),
            recording: std::sync::atomic::AtomicBool::new(false),
            recorded: std::sync::atomic::AtomicBool::new(false),
            ctx,
        };
        backend.keep_pool_memory()?;
        Ok(backend)
    }

    /// Keeps freed memory in the default pool instead of returning it to the driver at each
    /// synchronisation (its release threshold is 0 by default): a step's buffers are then
    /// taken from memory the first step of the largest shape reserved, with no driver
    /// allocation in later steps.
    fn keep_pool_memory(&self) -> std::result::Result<(), String> {
        let pool = self
            .mem_pool()
            .ok_or("the device's default memory pool is unavailable")?;
        let keep = u64::MAX;
        let attr = drv_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
        // SAFETY: a valid pool; the release threshold is a u64.
        unsafe {
            drv_sys::cuMemPoolSetAttribute(pool, attr, (&keep as *const u64).cast_mut().cast())
        }
        .result()
        .map_err(|e| format!("memory pool release threshold: {e:?}"))
    }

    /// The device this backend runs on.
    pub fn device(&self) -> &CudaDeviceInfo {
        &self.info
    }

    /// Waits for all queued work and reports a kept launch or library error (kept for good:
    /// work queued after a failed launch cannot be trusted, so every later call reports it)
    /// or a fault a kernel raised (cleared once reported); see the module documentation.
    pub fn synchronize(&self) -> Result<()> {
        let mut st = self.lock_state();
        self.sync_check(&mut st)
    }

    /// The typed launchers ([`launch`]).
    fn k(&self) -> Kernels<'_> {
        Kernels(self)
    }

    fn kernel(&self, name: &str) -> &CudaFunction {
        self.kernels
            .get(name)
            .unwrap_or_else(|| panic!("kernel {name} is not in KERNELS"))
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the first error of a launch or library call.
    /// Counts `n` device operations queued (kernels, library products, copies, fills).
    fn count_launches(&self, n: usize) {
        self.launches
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn note<E: std::fmt::Debug>(&self, r: std::result::Result<(), E>, what: &str) {
        if let Err(e) = r {
            let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                *slot = Some(format!("{}: {what}: {e:?}", self.info.index));
            }
        }
    }

    /// Synchronises the stream, then reports a kept error or a raised fault flag (clearing
    /// the flag).
    fn sync_check(&self, st: &mut State) -> Result<()> {
        let synced = self.copy_stream.synchronize();
        self.note(synced, "synchronize the copy stream");
        let synced = self.stream.synchronize();
        self.note(synced, "synchronize");
        if let Some(e) = self
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return Err(Error::device(format!("cuda:{e}")));
        }
        let flag = self.stream.clone_dtoh(&st.err_flag).map_err(|e| {
            Error::device(format!(
                "cuda:{}: reading the fault flag: {e}",
                self.info.index
            ))
        })?;
        self.stream
            .synchronize()
            .map_err(|e| Error::device(format!("cuda:{}: {e}", self.info.index)))?;
        let bits = flag.first().copied().unwrap_or(0);
        if bits != 0 {
            self.stream
                .memset_zeros(&mut st.err_flag)
                .map_err(|e| Error::device(format!("cuda:{}: {e}", self.info.index)))?;
            if bits == 4 {
                // Not a fault of the input or the device: the model diverged, which the
                // trainer reports as such (keeping its best checkpoint).
                return Err(Error::Diverged(
                    "the gradient norm is not finite: training diverged (the step was skipped)"
                        .into(),
                ));
            }
            let mut what = Vec::new();
            if bits & 1 != 0 {
                what.push("an embedding id is not below its table's vocabulary");
            }
            if bits & 2 != 0 {
                what.push("a sequence length exceeds its padded length");
            }
            if bits & 4 != 0 {
                what.push(
                    "the gradient norm is not finite: training diverged (the step was skipped)",
                );
            }
            return Err(Error::device(format!(
                "cuda:{}: a kernel rejected its input: {}",
                self.info.index,
                what.join("; ")
            )));
        }
        Ok(())
    }

    /// Device address of element 0 of `s`.
    fn base<T>(&self, s: &CudaSlice<T>) -> DevPtr<T> {
        DevPtr::new(s.device_ptr(&self.stream).0)
    }

    /// Device address of a read window of `len` f32 elements (checked against the buffer).
    ///
    /// # Panics
    /// When the window does not fit, or the buffer is bf16 (a backend bug: the kernel
    /// taking it has only an f32 instance).
    fn rp(&self, r: Ref<CudaBuf>, len: usize, what: &str) -> DevPtr<f32> {
        f32_only(self.rt(r, len, what), what)
    }

    /// Device address of a write window of `len` f32 elements (see [`CudaBackend::rp`]).
    fn mp(&self, m: Mut<CudaBuf>, len: usize, what: &str) -> DevPtr<f32> {
        f32_only(self.mt(m, len, what), what)
    }

    /// Typed device address of a read window of `len` elements (checked against the buffer).
    fn rt(&self, r: Ref<CudaBuf>, len: usize, what: &str) -> TypedPtr {
        window(r.buf, r.off, len, what)
    }

    /// Typed device address of a write window of `len` elements (checked against the
    /// buffer).
    fn mt(&self, m: Mut<CudaBuf>, len: usize, what: &str) -> TypedPtr {
        window(m.buf, m.off, len, what)
    }

    /// Records that `op` has no kernel instance for its buffers' types (`types`), a backend
    /// bug reported by the next synchronising call; nothing is launched.
    fn no_instance(&self, op: &str, types: &[TypedPtr]) {
        let t: Vec<&str> = types.iter().map(|p| p.dtype().as_str()).collect();
        self.note::<String>(
            Err(format!(
                "no kernel instance for buffers of types ({})",
                t.join(", ")
            )),
            op,
        );
    }

    /// An f32 operand of a matrix product beside a bf16 one, rounded into a bf16 scratch
    /// window (tensor-core products take both operands in one type; the CPU reference rounds
    /// the same operand). Returns the window, to be held until the product is queued.
    fn as_bf16(&self, p: TypedPtr, len: usize) -> Result<(Option<CudaBuf>, DevPtr<bf16>)> {
        match p {
            TypedPtr::Bf16(b) => Ok((None, b)),
            TypedPtr::F32(f) => {
                let buf = self.scratch_typed(len, Precision::Bf16)?;
                let TypedPtr::Bf16(dst) = buf.typed() else {
                    unreachable!("a bf16 scratch window")
                };
                if len > 0 {
                    self.k().convert_f32_bf16(grid1(len), long(len), f, dst);
                }
                Ok((Some(buf), dst))
            }
        }
    }

    /// `addr` itself when it is 16-byte aligned, else a copy of its `len` elements of `dtype`
    /// in a scratch window (256-byte aligned), held by the returned buffer.
    fn aligned16(&self, addr: u64, len: usize, dtype: Precision) -> Result<(Option<CudaBuf>, u64)> {
        if addr.is_multiple_of(16) {
            return Ok((None, addr));
        }
        let aligned = self.scratch_typed(len, dtype)?;
        let to = aligned.typed().addr();
        match dtype {
            Precision::F32 => self.dtod(
                DevPtr::<f32>::new(to),
                DevPtr::new(addr),
                len,
                "aligned copy",
            ),
            Precision::Bf16 => self.dtod(
                DevPtr::<bf16>::new(to),
                DevPtr::new(addr),
                len,
                "aligned copy",
            ),
        }
        Ok((Some(aligned), to))
    }

    /// A scratch window of `len` elements of `dtype` (see [`Backend::scratch`]).
    fn scratch_typed(&self, len: usize, dtype: Precision) -> Result<CudaBuf> {
        if len == 0 {
            return self.own_uninit(0, dtype);
        }
        let recording = self.recording.load(std::sync::atomic::Ordering::Relaxed);
        self.arena
            .take(&self.stream, len, dtype, recording)
            .map_err(|e| self.dev_err(format!("activation arena: {e}")))
    }

    /// Zeroes the first `len` elements of `buf` (queued).
    fn memset_zero(&self, buf: &CudaBuf, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.note(self.ctx.bind_to_thread(), "bind context");
        let bytes = len * elem_bytes(buf.dtype());
        // SAFETY: the buffer holds at least `bytes` bytes, all of which are set.
        let r = unsafe {
            drv_sys::cuMemsetD8Async(buf.typed().addr(), 0, bytes, self.stream.cu_stream()).result()
        };
        self.count_launches(1);
        r.map_err(|e| self.dev_err(format!("zeroing a buffer: {e}")))
    }

    /// A buffer of its own of `len` elements of `dtype`, not initialised.
    fn own_uninit(&self, len: usize, dtype: Precision) -> Result<CudaBuf> {
        match dtype {
            Precision::F32 => self.own_alloc::<f32>(len, dtype, false),
            Precision::Bf16 => self.own_alloc::<bf16>(len, dtype, false),
        }
    }

    /// A zeroed buffer of its own of `len` elements of `dtype`.
    fn own_zeros(&self, len: usize, dtype: Precision) -> Result<CudaBuf> {
        match dtype {
            Precision::F32 => self.own_alloc::<f32>(len, dtype, true),
            Precision::Bf16 => self.own_alloc::<bf16>(len, dtype, true),
        }
    }

    /// A pool allocation of `len` elements of `T` (the storage of `dtype`), zeroed or not.
    fn own_alloc<T>(&self, len: usize, dtype: Precision, zeroed: bool) -> Result<CudaBuf>
    where
        T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + 'static,
        CudaSlice<T>: Send + Sync,
    {
        let s = match (len, zeroed) {
            (0, _) => self.stream.null::<T>(),
            (_, true) => self.stream.alloc_zeros::<T>(len),
            // SAFETY: f32 and bf16 have no invalid bit patterns; the caller writes every
            // element before reading any (the trait's contract, checked by the CPU backend's
            // NaN fill).
            (_, false) => unsafe { self.stream.alloc::<T>(len) },
        };
        s.map(|s| CudaBuf::own(s, dtype, &self.stream))
            .map_err(|e| self.dev_err(e))
    }

    /// Waits for queued work, then copies `len` elements of type `T` at `addr` to the host.
    fn download_as<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        addr: u64,
        len: usize,
    ) -> Result<Vec<T>> {
        self.synchronize()?;
        let mut v = vec![T::default(); len];
        if v.is_empty() {
            return Ok(v);
        }
        self.note(self.ctx.bind_to_thread(), "bind context");
        // SAFETY: the buffer at `addr` holds `len` elements of `T` (the caller's), and `v`
        // lives until the synchronisation below has waited for the copy.
        let r = unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut v, addr, self.stream.cu_stream())
        };
        self.count_launches(1);
        r.map_err(|e| self.dev_err(format!("download: {e}")))?;
        self.stream.synchronize().map_err(|e| self.dev_err(e))?;
        Ok(v)
    }

    /// Queues a copy of `host` to the window at `addr` (checked by the caller to hold
    /// `host.len()` elements of `T`).
    fn write_as<T: cudarc::driver::DeviceRepr>(&self, host: &[T], addr: u64) -> Result<()> {
        self.note(self.ctx.bind_to_thread(), "bind context");
        // SAFETY: the window was checked against its buffer; the host slice lives through the
        // call (a pageable copy is staged before the call returns).
        let r = unsafe {
            cudarc::driver::result::memcpy_htod_async(addr, host, self.stream.cu_stream())
        };
        self.count_launches(1);
        r.map_err(|e| self.dev_err(format!("write: {e}")))
    }

    /// The bf16 path of [`Backend::gemm`] (checked windows of `a_len`/`b_len` elements):
    /// an f32 operand is rounded into bf16 scratch first; tensor-core products with f32
    /// accumulation (`CUBLAS_COMPUTE_32F`) into C of its own type, f32 or bf16.
    fn gemm_bf16(
        &self,
        s: &Gemm,
        alpha: f32,
        (a, a_len): (TypedPtr, usize),
        (b, b_len): (TypedPtr, usize),
        beta: f32,
        c: TypedPtr,
    ) {
        let converted = self
            .as_bf16(a, a_len)
            .and_then(|a| Ok((a, self.as_bf16(b, b_len)?)));
        let ((_held_a, ap), (_held_b, bp)) = match converted {
            Ok(x) => x,
            Err(e) => return self.note(Err(e), "gemm operand"),
        };
        let (m, n, k) = (s.m, s.n, s.k);
        let disjoint = s.c_disjoint();
        self.note(self.ctx.bind_to_thread(), "bind context");
        let h = *self.blas.handle();
        let (cm, cn, ck) = (int(n, "n"), int(m, "m"), int(k, "k"));
        let (lda, ldb, ldc) = (int(s.ldb, "ldb"), int(s.lda, "lda"), int(s.ldc, "ldc"));
        let (bf, ct) = (cuda_type(Precision::Bf16), cuda_type(c.dtype()));
        let compute = blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let algo = blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
        let (alpha_p, beta_p) = ((&alpha as *const f32).cast(), (&beta as *const f32).cast());
        let one_by_one = !disjoint || s.batch == 1;
        // SAFETY: the caller checked the three windows for every batch entry (the converted
        // copies hold the same extents); device addresses of this context; alpha/beta are
        // host f32 values, the scale type of CUBLAS_COMPUTE_32F.
        let r = unsafe {
            if one_by_one {
                (0..s.batch).try_for_each(|bi| {
                    blas_sys::cublasGemmEx(
                        h,
                        op(s.trans_b),
                        op(s.trans_a),
                        cm,
                        cn,
                        ck,
                        alpha_p,
                        bp.offset(bi * s.stride_b).as_ptr().cast(),
                        bf,
                        lda,
                        ap.offset(bi * s.stride_a).as_ptr().cast(),
                        bf,
                        ldb,
                        beta_p,
                        c.offset(bi * s.stride_c).addr() as *mut std::ffi::c_void,
                        ct,
                        ldc,
                        compute,
                        algo,
                    )
                    .result()
                })
            } else {
                blas_sys::cublasGemmStridedBatchedEx(
                    h,
                    op(s.trans_b),
                    op(s.trans_a),
                    cm,
                    cn,
                    ck,
                    alpha_p,
                    bp.as_ptr().cast(),
                    bf,
                    lda,
                    long(s.stride_b),
                    ap.as_ptr().cast(),
                    bf,
                    ldb,
                    long(s.stride_a),
                    beta_p,
                    c.addr() as *mut std::ffi::c_void,
                    ct,
                    ldc,
                    long(s.stride_c),
                    int(s.batch, "batch"),
                    compute,
                    algo,
                )
                .result()
            }
        };
        self.count_launches(if one_by_one { s.batch } else { 1 });
        self.note(r, "cuBLAS bf16 product");
    }

    /// Device address of an id buffer holding at least `len` ids.
    fn ip(&self, ids: &CudaSlice<u32>, len: usize, what: &str) -> DevPtr<u32> {
        assert!(
            len <= ids.len(),
            "{what}: {len} ids needed, the buffer holds {}",
            ids.len()
        );
        self.base(ids)
    }

    /// Grows the f32 scratch to at least `len` elements; returns its address.
    fn fscratch(&self, st: &mut State, len: usize) -> Result<DevPtr<f32>> {
        self.grow(&mut st.fscratch, &mut st.retired, len, "f32 scratch")
    }

    /// Grows the u32 scratch to at least `len` elements; returns its address.
    fn uscratch(&self, st: &mut State, len: usize) -> Result<DevPtr<u32>> {
        self.grow(&mut st.uscratch, &mut st.retired, len, "u32 scratch")
    }

    /// One cuBLASLt call `y = C + x·Wᵀ + b` (bias in the epilogue), C being `resid`, or `y`
    /// itself with `accumulate`, or nothing; every window is checked first.
    #[allow(clippy::too_many_arguments)]
    fn lt_linear(
        &self,
        rows: usize,
        inp: usize,
        out: usize,
        x: Ref<CudaBuf>,
        w: Ref<CudaBuf>,
        b: Ref<CudaBuf>,
        resid: Option<Ref<CudaBuf>>,
        accumulate: bool,
        y: Mut<CudaBuf>,
    ) {
        let xp = self.rt(x, rows * inp, "linear x");
        let wp = self.rt(w, out * inp, "linear w");
        let bp = self.rt(b, out, "linear b");
        let rp = resid.map(|r| self.rt(r, rows * out, "linear residual"));
        let yp = self.mt(y, rows * out, "linear y");
        let output = yp.dtype();
        let operands = match (xp.dtype(), wp.dtype()) {
            (Precision::F32, Precision::F32) => Precision::F32,
            _ => Precision::Bf16,
        };
        // Not instantiated (and not used by the model): a residual in another type than the
        // output; two f32 operands into a bf16 output, or an f32 bias added to one (the
        // reference computes both in f32 and rounds once; the epilogue takes the bias in the
        // output's type).
        if rp.is_some_and(|r| r.dtype() != output)
            || (output == Precision::Bf16
                && (operands == Precision::F32 || bp.dtype() == Precision::F32))
        {
            let mut types = vec![xp, wp, bp, yp];
            types.extend(rp);
            return self.no_instance("linear", &types);
        }
        // Operands in one type (an f32 one beside a bf16 one is rounded, as on the CPU
        // reference), the bias in the output's type.
        let staged = (|| -> Result<_> {
            let (x, w) = match operands {
                Precision::F32 => ((None, xp.addr()), (None, wp.addr())),
                Precision::Bf16 => {
                    let (hx, x) = self.as_bf16(xp, rows * inp)?;
                    let (hw, w) = self.as_bf16(wp, out * inp)?;
                    // The model's weights start 16-byte aligned in the flat parameter store
                    // (`TENSOR_ALIGN`); a window off 16 bytes (another caller's) is copied to
                    // an aligned one so that the heuristic is offered the vectorised kernels.
                    let w = match hw {
                        Some(held) => (Some(held), w.addr()),
                        None => self.aligned16(w.addr(), out * inp, Precision::Bf16)?,
                    };
                    ((hx, x.addr()), w)
                }
            };
            let bias = match (bp, output) {
                (TypedPtr::Bf16(p), Precision::F32) => {
                    let wide = self.scratch_full(out)?;
                    let dst = wide.ptr();
                    self.k().convert_bf16_f32(grid1(out), long(out), p, dst);
                    (Some(wide), dst.addr())
                }
                (p, _) => (None, p.addr()),
            };
            // The bias epilogue of a bf16 product loads the bias vectorised: an address off
            // 16 bytes (never the model's, see `TENSOR_ALIGN`) is copied to an aligned window
            // first.
            let bias = match bias {
                (held, addr) if operands == Precision::F32 || addr.is_multiple_of(16) => {
                    (held, addr)
                }
                (_held, addr) => self.aligned16(addr, out, output)?,
            };
            Ok((x, w, bias))
        })();
        let ((_hx, xa), (_hw, wa), (_hb, ba)) = match staged {
            Ok(v) => v,
            Err(e) => return self.note(Err(e), "linear operands"),
        };
        let c = rp.or(accumulate.then_some(yp)).map(TypedPtr::addr);
        self.note(self.ctx.bind_to_thread(), "bind context");
        // SAFETY: every window was checked against its buffer above, and the converted
        // copies hold the same extents in the types passed (`resid` and `y` are distinct
        // buffers: one is borrowed shared, the other mutably); the context is current on
        // this thread.
        let r = unsafe {
            let stream = self.stream.cu_stream() as _;
            let types = (operands, output);
            self.lt
                .forward(stream, rows, inp, out, xa, wa, ba, c, yp.addr(), types)
        };
        self.count_launches(1);
        self.note(r, "linear");
    }

    /// Grows the pointer scratch to at least `len` entries; returns its address.
    fn pscratch(&self, st: &mut State, len: usize) -> Result<DevPtr<u64>> {
        self.grow(&mut st.pscratch, &mut st.retired, len, "pointer scratch")
    }

    /// Grows the f64 scratch to at least `1 + terms` elements; returns its address.
    fn dscratch(&self, st: &mut State, terms: usize) -> Result<DevPtr<f64>> {
        self.grow(&mut st.dscratch, &mut st.retired, terms + 1, "f64 scratch")
    }

    /// Replaces `buf` by a zeroed buffer of `len` elements when it is shorter (an error while
    /// a graph is being recorded: a recorded graph cannot own a buffer the backend keeps, so
    /// the same work must run once unrecorded first); returns its address. Once a graph has
    /// been recorded, the outgrown buffer goes to `retired` instead of being freed: the graph
    /// may still read it.
    fn grow<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + 'static>(
        &self,
        buf: &mut CudaSlice<T>,
        retired: &mut Vec<Box<dyn std::any::Any + Send>>,
        len: usize,
        what: &str,
    ) -> Result<DevPtr<T>> {
        if buf.len() < len {
            if self.recording.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(Error::device(format!(
                    "cuda:{}: the {what} would grow while recording a graph; run the same work \
                     once before recording it",
                    self.info.index
                )));
            }
            let grown = self
                .stream
                .alloc_zeros(len)
                .map_err(|e| Error::device(format!("cuda:{}: {what}: {e}", self.info.index)))?;
            let old = std::mem::replace(buf, grown);
            if self.recorded.load(std::sync::atomic::Ordering::Relaxed) {
                retired.push(Box::new(old));
            }
        }
        Ok(self.base(buf))
    }

    /// Column sums through the f32 scratch: `out[j] += Σ_r x[r·n + j]`, `rows×n`.
    fn column_sum(&self, rows: usize, n: usize, x: TypedPtr, out: DevPtr<f32>) {
        let (per, chunks) = col_chunks(rows);
        let (cfg, r, ni, pi) = (
            chunk_grid(n, chunks),
            int(rows, "rows"),
            int(n, "n"),
            int(per, "chunk"),
        );
        self.chunked_sum("column_sum", n, chunks, out, |part| match x {
            TypedPtr::F32(x) => self.k().col_partial_f32(cfg, r, ni, pi, x, part),
            TypedPtr::Bf16(x) => self.k().col_partial_bf16(cfg, r, ni, pi, x, part),
        });
    }

    /// A fixed-order sum in two passes: `first` (given the address of `chunks × n` f32
    /// partial sums in the scratch) queues the pass that writes them, then the chunks are
    /// added in order into `out` (`out[j] += Σ_c partial[c·n + j]`, `col_finish`).
    fn chunked_sum(
        &self,
        what: &str,
        n: usize,
        chunks: usize,
        out: DevPtr<f32>,
        first: impl FnOnce(DevPtr<f32>),
    ) {
        let part = {
            let mut st = self.lock_state();
            match self.fscratch(&mut st, chunks * n) {
                Ok(p) => p,
                Err(e) => return self.note(Err(e), &format!("{what} scratch")),
            }
        };
        first(part);
        self.col_finish(n, chunks, part, out);
    }

    /// Pass 2 of a column sum: `out[j] += Σ_c partial[c·n + j]`.
    fn col_finish(&self, n: usize, chunks: usize, part: DevPtr<f32>, out: DevPtr<f32>) {
        self.k().col_finish_f32(
            chunk_grid(n, 1),
            int(n, "n"),
            int(chunks, "chunks"),
            part,
            out,
        );
    }

    /// Sums `count` f64 terms at scratch slot 1.. times `scale` on the device and stores
    /// the value, as f32, at `out`; with `count_lens = (lens, n)` the scale is instead
    /// `1/|{b < n : lens[b] > 0}|` (0 when none). Nothing is read back.
    fn reduce_terms_into(
        &self,
        st: &mut State,
        count: usize,
        scale: f64,
        count_lens: Option<(DevPtr<u32>, usize)>,
        out: DevPtr<f32>,
    ) -> Result<()> {
        let base = self.dscratch(st, count)?;
        let cfg = reduce_cfg();
        let (lp, ln) = count_lens.unwrap_or((DevPtr::null(), 0));
        self.k().reduce_terms(
            cfg,
            int(count, "terms"),
            base.offset(1),
            scale,
            lp,
            int(ln, "rows"),
            out,
        );
        Ok(())
    }

    /// Queues a copy of `len` elements from `src` to `dst` (both checked against their
    /// buffers by the caller, in distinct buffers).
    fn dtod<T>(&self, dst: DevPtr<T>, src: DevPtr<T>, len: usize, what: &str) {
        let (dst, src, bytes) = (dst.addr(), src.addr(), len * std::mem::size_of::<T>());
        // Raw driver call: make the context current on this thread first.
        self.note(self.ctx.bind_to_thread(), "bind context");
        // SAFETY: the caller checked both ranges; distinct buffers (one is borrowed mutably).
        let r = unsafe {
            cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream())
        };
        self.count_launches(1);
        self.note(r, what);
    }

    /// The length and device addresses of AdamW's buffers (parameters, gradients, both
    /// moments, decay mask), which must be of one length; the step must be 1-based.
    fn adamw_buffers(
        &self,
        hp: &AdamW,
        params: &CudaBuf,
        grads: &CudaBuf,
        m: &CudaBuf,
        v: &CudaBuf,
        decay_mask: &CudaBuf,
    ) -> (usize, [DevPtr<f32>; 5]) {
        let len = params.len();
        assert!(
            grads.len() == len && m.len() == len && v.len() == len && decay_mask.len() == len,
            "adamw: parameter, gradient, moment and mask buffers differ in length"
        );
        assert!(hp.step >= 1, "adamw: the step number is 1-based");
        let bufs = [params, grads, m, v, decay_mask].map(CudaBuf::ptr);
        (len, bufs)
    }

    /// The driver's handle of this backend's device.
    fn cu_device(&self) -> Option<drv_sys::CUdevice> {
        let index = i32::try_from(self.info.index).ok()?;
        cudarc::driver::result::device::get(index).ok()
    }

    /// The device's default memory pool (where the stream-ordered allocations of every buffer
    /// come from), or `None` when the driver cannot give it.
    fn mem_pool(&self) -> Option<drv_sys::CUmemoryPool> {
        self.note(self.ctx.bind_to_thread(), "bind context");
        let dev = self.cu_device()?;
        let mut pool = std::ptr::null_mut();
        // SAFETY: `dev` is a valid device handle; the driver writes one pool handle.
        let r = unsafe { drv_sys::cuDeviceGetDefaultMemPool(&mut pool, dev).result() };
        r.ok().map(|_| pool)
    }

    /// The device's graph-memory high-water mark (`read`), or resets it (`!read`).
    fn graph_mem_attribute(&self, read: bool) -> Option<u64> {
        let dev = self.cu_device()?;
        let attr = drv_sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_USED_MEM_HIGH;
        let mut v = 0u64;
        let p = (&mut v as *mut u64).cast();
        // SAFETY: a valid device; the attribute is a u64 (setting it to 0 resets the mark).
        let r = unsafe {
            if read {
                drv_sys::cuDeviceGetGraphMemAttribute(dev, attr, p)
            } else {
                drv_sys::cuDeviceSetGraphMemAttribute(dev, attr, p)
            }
        };
        r.result().ok().map(|_| v)
    }

    /// A u64 attribute of the default memory pool.
    fn pool_attribute(&self, attr: drv_sys::CUmemPool_attribute) -> Option<u64> {
        let pool = self.mem_pool()?;
        let mut v = 0u64;
        // SAFETY: a valid pool; the byte-count attributes are u64.
        let r = unsafe { drv_sys::cuMemPoolGetAttribute(pool, attr, (&mut v as *mut u64).cast()) };
        r.result().ok().map(|_| v)
    }

    /// Stores 0.0 at the f32 slot `out` (a loss over nothing).
    fn store_zero(&self, out: DevPtr<f32>) -> Result<()> {
        self.k().fill_f32(grid1(1), out, 1i64, 0.0f32);
        Ok(())
    }

    fn dev_err(&self, e: impl std::fmt::Display) -> Error {
        Error::device(format!("cuda:{}: {e}", self.info.index))
    }

    /// A new buffer holding `staged[off..off + len]` (page-locked memory of `from`), copied
    /// by a DMA queued on the copy stream, beside the work queued before it; `from`'s event
    /// is recorded after it. Kernels may read the buffer after `wait_upload` on a fence taken
    /// after this call. On failure the compute stream first waits for every copy queued so
    /// far: the buffers of the batch uploaded before are dropped unfenced with the error.
    fn upload_pinned<T: cudarc::driver::DeviceRepr>(
        &self,
        from: &staging::CudaStaging,
        staged: &[T],
        off: usize,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        self.copy_on_the_side(from, staged, off, len)
            .inspect_err(|_| self.copies_before_frees())
    }

    /// Makes the compute stream wait (queued) for every copy queued on the copy stream so
    /// far, so that buffers freed after this are freed after their copies.
    fn copies_before_frees(&self) {
        let r = self.stream.join(&self.copy_stream);
        self.note(r, "ordering the copy stream before frees");
    }

    /// [`CudaBackend::upload_pinned`] without the wait on failure.
    fn copy_on_the_side<T: cudarc::driver::DeviceRepr>(
        &self,
        from: &staging::CudaStaging,
        staged: &[T],
        off: usize,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        let host = off
            .checked_add(len)
            .and_then(|end| staged.get(off..end))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "staged upload [{off}, +{len}) beyond the staging's {} elements",
                    staged.len()
                ))
            })?;
        if host.is_empty() {
            return self.stream.null().map_err(|e| self.dev_err(e));
        }
        // Allocated in the compute stream's order (and freed in it when dropped, after the
        // work that reads it); the copy stream writes it once that allocation is reached.
        // SAFETY: the buffer is written in full by the copy below before any kernel reads it
        // (kernels read it only after `wait_upload` on a fence taken after this copy).
        let buf = unsafe { self.stream.alloc::<T>(len) }.map_err(|e| self.dev_err(e))?;
        let err = |e| self.dev_err(format!("staged upload: {e}"));
        self.allocated.record(&self.stream).map_err(err)?;
        self.copy_stream.wait(&self.allocated).map_err(err)?;
        self.note(self.ctx.bind_to_thread(), "bind context");
        // SAFETY: `host` is page-locked and is not rewritten before the event recorded
        // below has completed (`HostStaging::regions` waits for it); `buf` holds `len`
        // elements, allocated before the point of `stream` that `copy_stream` waits for.
        let r = unsafe {
            cudarc::driver::result::memcpy_htod_async(
                self.base(&buf).addr(),
                host,
                self.copy_stream.cu_stream(),
            )
        };
        self.count_launches(1);
        r.map_err(err)?;
        // The copy into `buf` is queued: on failure `buf` is freed (on return) only after it.
        from.copied().record(&self.copy_stream).map_err(|e| {
            self.copies_before_frees();
            err(e)
        })?;
        Ok(buf)
    }
}

/// The address of elements `[off, off + len)` of `buf`.
///
/// # Panics
/// When they exceed the buffer (a caller bug, as on the CPU backend).
fn window(buf: &CudaBuf, off: usize, len: usize, what: &str) -> TypedPtr {
    assert!(
        off + len <= buf.len(),
        "{what}: window of {len} at {off} exceeds the buffer of {}",
        buf.len()
    );
    buf.typed().offset(off)
}

/// `p` as an f32 address.
///
/// # Panics
/// When `p` addresses bf16 elements (see [`CudaBackend::rp`]).
fn f32_only(p: TypedPtr, what: &str) -> DevPtr<f32> {
    p.f32()
        .unwrap_or_else(|| panic!("{what}: a bf16 buffer where the kernel takes f32"))
}

/// The fine loss's addresses (q, v, t_in, then dq, dv when there are gradients), all of one
/// element type.
enum FineAddrs {
    F32(Vec<DevPtr<f32>>),
    Bf16(Vec<DevPtr<bf16>>),
}

/// Gradient `i` of the fine loss's addresses (q, v, t_in, then dq, dv when there are
/// gradients), or null without gradients.
fn grad_or_null<T>(ptrs: &[DevPtr<T>], i: usize) -> DevPtr<T> {
    ptrs.get(3 + i).copied().unwrap_or(DevPtr::null())
}

/// cuBLAS's data type of elements of `dtype`.
fn cuda_type(dtype: Precision) -> blas_sys::cudaDataType {
    match dtype {
        Precision::F32 => blas_sys::cudaDataType::CUDA_R_32F,
        Precision::Bf16 => blas_sys::cudaDataType::CUDA_R_16BF,
    }
}

/// cuBLAS operation for a transpose flag.
fn op(t: bool) -> blas_sys::cublasOperation_t {
    if t {
        blas_sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        blas_sys::cublasOperation_t::CUBLAS_OP_N
    }
}

impl Backend for CudaBackend {
    type F = f32;
    type Buf = CudaBuf;
    type Ids = CudaSlice<u32>;
    type Graph = RecordedGraph;
    type Staging = staging::CudaStaging;
    type Fence = staging::CudaFence;

    fn name(&self) -> String {
        format!(
            "cuda:{} {} ({})",
            self.info.index,
            self.info.name,
            self.info.arch()
        )
    }

    // ---- memory ------------------------------------------------------------------------

    fn zeros(&self, len: usize) -> Result<CudaBuf> {
        self.own_zeros(len, Precision::F32)
    }

    fn uninit(&self, len: usize) -> Result<CudaBuf> {
        self.own_uninit(len, Precision::F32)
    }

    fn scratch(&self, len: usize) -> Result<CudaBuf> {
        self.scratch_typed(len, self.precision)
    }

    fn scratch_zeros(&self, len: usize) -> Result<CudaBuf> {
        let buf = self.scratch(len)?;
        self.memset_zero(&buf, len)?;
        Ok(buf)
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    fn act_zeros(&self, len: usize) -> Result<CudaBuf> {
        self.own_zeros(len, self.precision)
    }

    fn scratch_full(&self, len: usize) -> Result<CudaBuf> {
        self.scratch_typed(len, Precision::F32)
    }

    fn scratch_full_zeros(&self, len: usize) -> Result<CudaBuf> {
        let buf = self.scratch_full(len)?;
        self.memset_zero(&buf, len)?;
        Ok(buf)
    }

    fn arena_stats(&self) -> Option<ArenaStats> {
        Some(self.arena.stats())
    }

    fn launch_count(&self) -> Option<u64> {
        Some(self.launches.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn upload(&self, host: &[f32]) -> Result<CudaBuf> {
        let buf = if host.is_empty() {
            self.stream.null()
        } else {
            self.stream.clone_htod(host)
        };
        Ok(CudaBuf::own(
            buf.map_err(|e| self.dev_err(e))?,
            Precision::F32,
            &self.stream,
        ))
    }

    fn upload_ids(&self, host: &[u32]) -> Result<CudaSlice<u32>> {
        if host.is_empty() {
            return self.stream.null().map_err(|e| self.dev_err(e));
        }
        self.stream.clone_htod(host).map_err(|e| self.dev_err(e))
    }

    /// A bf16 buffer's values are widened to f32 (exactly) on the host.
    fn download(&self, buf: &CudaBuf) -> Result<Vec<f32>> {
        match buf.typed() {
            TypedPtr::F32(p) => self.download_as::<f32>(p.addr(), buf.len()),
            TypedPtr::Bf16(p) => Ok(self
                .download_as::<bf16>(p.addr(), buf.len())?
                .into_iter()
                .map(f32::from)
                .collect()),
        }
    }

    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len()
    }

    fn alloc_staging(&self, floats: usize, ids: usize) -> Result<staging::CudaStaging> {
        staging::CudaStaging::new(&self.ctx, floats, ids)
    }

    fn upload_staged(
        &self,
        staging: &staging::CudaStaging,
        off: usize,
        len: usize,
    ) -> Result<CudaBuf> {
        let buf = self.upload_pinned(staging, staging.floats(), off, len)?;
        Ok(CudaBuf::own(buf, Precision::F32, &self.stream))
    }

    fn upload_staged_ids(
        &self,
        staging: &staging::CudaStaging,
        off: usize,
        len: usize,
    ) -> Result<CudaSlice<u32>> {
        self.upload_pinned(staging, staging.ids(), off, len)
    }

    fn upload_fence(&self) -> Result<staging::CudaFence> {
        staging::CudaFence::after(&self.copy_stream, &self.stream).map_err(|e| {
            self.copies_before_frees();
            self.dev_err(format!("upload fence: {e}"))
        })
    }

    fn wait_upload(&self, fence: &staging::CudaFence) -> Result<()> {
        fence
            .wait(&self.stream)
            .map_err(|e| self.dev_err(format!("waiting for an upload: {e}")))
    }

    fn attach_comm(&self, comm: &Comm) -> Result<()> {
        let mut slot = comm.device_slot();
        if slot.is_some() {
            return Ok(());
        }
        // Rank 0 makes the unique id; it reaches the others over the rendezvous links.
        let mine = match comm.rank() {
            0 => nccl::unique_id()?.internal.map(|c| c as u8).to_vec(),
            _ => Vec::new(),
        };
        let bytes = comm.broadcast(&mine)?;
        let internal: [u8; 128] = bytes.as_slice().try_into().map_err(|_| {
            Error::Distributed(format!("rank 0 sent an NCCL id of {} bytes", bytes.len()))
        })?;
        let id = nccl::UniqueId {
            internal: internal.map(|b| b as std::ffi::c_char),
        };
        self.note(self.ctx.bind_to_thread(), "bind context");
        let c = nccl::NcclComm::init(comm.rank(), comm.world(), id)?;
        *slot = Some(Box::new(c));
        Ok(())
    }

    fn all_reduce_sum(&self, comm: &Comm, len: usize, x: Mut<CudaBuf>) -> Result<()> {
        let slot = comm.device_slot();
        let Some(c) = slot
            .as_ref()
            .and_then(|c| c.downcast_ref::<nccl::NcclComm>())
        else {
            drop(slot);
            return super::all_reduce_via_host(self, comm, len, x);
        };
        if len == 0 {
            return Ok(());
        }
        let p = self.mp(x, len, "all_reduce_sum");
        self.count_launches(1);
        let stream = self.stream.cu_stream() as *mut std::ffi::c_void;
        // SAFETY: the window was checked against its buffer (f32, `len` elements); the
        // stream is this backend's, in the context the communicator was made in.
        unsafe { c.all_reduce_sum(p.addr(), len, nccl::NCCL_FLOAT32, stream) }
    }

    fn all_reduce_in_graphs(&self, comm: &Comm) -> bool {
        comm.device_slot()
            .as_ref()
            .is_some_and(|c| c.is::<nccl::NcclComm>())
    }

    fn capture(&self, queue: &mut dyn FnMut() -> Result<()>) -> Result<Option<RecordedGraph>> {
        // Whatever was queued before runs first; a kept error stops here.
        CudaBackend::synchronize(self)?;
        // The graph's temporaries come from the device's graph memory, not the default
        // pool: give back what the pool keeps unused (`keep_pool_memory`) so that the two
        // do not each hold a step's worth.
        if let Some(pool) = self.mem_pool() {
            // SAFETY: a valid pool; nothing is queued (synchronised above).
            let r = unsafe { drv_sys::cuMemPoolTrimTo(pool, 0) }.result();
            self.note(r, "trimming the memory pool");
        }
        // The recording addresses the activation arena at the size the steps before it
        // asked for.
        self.arena
            .settle(&self.stream)
            .map_err(|e| self.dev_err(format!("activation arena: {e}")))?;
        let mode = drv_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        self.stream
            .begin_capture(mode)
            .map_err(|e| self.dev_err(format!("starting a graph capture: {e}")))?;
        self.recording
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let queued = queue();
        self.recording
            .store(false, std::sync::atomic::Ordering::Relaxed);
        // End the capture whatever happened, so the stream is usable again.
        let flags =
            drv_sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH;
        let graph = self.stream.end_capture(flags);
        queued?;
        if let Some(e) = self
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return Err(Error::device(format!("cuda:{e} (while recording a graph)")));
        }
        let graph = graph.map_err(|e| self.dev_err(format!("recording a graph: {e}")))?;
        self.recorded
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(g) = &graph {
            g.upload()
                .map_err(|e| self.dev_err(format!("uploading a graph: {e}")))?;
        }
        Ok(graph.map(|g| self.arena.keep(g)))
    }

    fn replay(&self, graph: &RecordedGraph) -> Result<()> {
        graph
            .graph
            .launch()
            .map_err(|e| self.dev_err(format!("replaying a graph: {e}")))
    }

    fn graph_current(&self, graph: &RecordedGraph) -> bool {
        self.arena.current(graph)
    }

    /// Into a bf16 buffer the values are rounded to bf16 on the host (`half`, to nearest,
    /// ties to even, as the kernels round).
    fn write(&self, host: &[f32], dst: Mut<CudaBuf>) -> Result<()> {
        if host.is_empty() {
            return Ok(());
        }
        match self.mt(dst, host.len(), "write dst") {
            TypedPtr::F32(d) => self.write_as(host, d.addr()),
            TypedPtr::Bf16(d) => {
                let rounded: Vec<bf16> = host.iter().map(|&x| bf16::from_f32(x)).collect();
                self.write_as(&rounded, d.addr())
            }
        }
    }

    fn copy_ids(&self, len: usize, src: &CudaSlice<u32>, dst: &mut CudaSlice<u32>) {
        if len == 0 {
            return;
        }
        let s = self.ip(src, len, "copy_ids src");
        let d = self.ip(dst, len, "copy_ids dst");
        self.dtod(d, s, len, "copy_ids");
    }

    fn synchronize(&self) -> Result<()> {
        CudaBackend::synchronize(self)
    }

    fn peak_memory(&self) -> Option<u64> {
        // Buffers come from the default pool; recorded graphs' temporaries from the device's
        // graph memory.
        let pool =
            self.pool_attribute(drv_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?;
        let graph = self.graph_mem_attribute(true).unwrap_or(0);
        Some(pool + graph)
    }

    fn reset_peak_memory(&self) {
        let attr = drv_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        let Some(pool) = self.mem_pool() else { return };
        let mut zero = 0u64;
        // SAFETY: a valid pool of this device; the attribute takes a u64 (resetting the high
        // mark to 0 restarts it at the bytes in use).
        let r = unsafe {
            drv_sys::cuMemPoolSetAttribute(pool, attr, (&mut zero as *mut u64).cast()).result()
        };
        self.note(r, "resetting the memory high-water mark");
        self.graph_mem_attribute(false);
    }

    fn fill(&self, len: usize, value: f32, x: Mut<CudaBuf>) {
        if len == 0 {
            return;
        }
        match self.mt(x, len, "fill") {
            TypedPtr::F32(p) => self.k().fill_f32(grid1(len), p, long(len), value),
            TypedPtr::Bf16(p) => self.k().fill_bf16(grid1(len), p, long(len), value),
        }
    }

    fn copy(&self, len: usize, src: Ref<CudaBuf>, dst: Mut<CudaBuf>) {
        if len == 0 {
            return;
        }
        let s = self.rt(src, len, "copy src");
        let d = self.mt(dst, len, "copy dst");
        match (s, d) {
            (TypedPtr::F32(s), TypedPtr::F32(d)) => self.dtod(d, s, len, "copy"),
            (TypedPtr::Bf16(s), TypedPtr::Bf16(d)) => self.dtod(d, s, len, "copy"),
            (TypedPtr::F32(s), TypedPtr::Bf16(d)) => {
                self.k().convert_f32_bf16(grid1(len), long(len), s, d)
            }
            (TypedPtr::Bf16(s), TypedPtr::F32(d)) => {
                self.k().convert_bf16_f32(grid1(len), long(len), s, d)
            }
        }
    }

    fn copy_2d(
        &self,
        rows: usize,
        cols: usize,
        src: Ref<CudaBuf>,
        src_ld: usize,
        dst: Mut<CudaBuf>,
        dst_ld: usize,
        accumulate: bool,
    ) {
        if rows == 0 || cols == 0 {
            return;
        }
        assert!(
            src_ld >= cols && dst_ld >= cols,
            "copy_2d: row stride below cols"
        );
        let s = self.rt(src, extent(rows, cols, src_ld), "copy_2d src");
        let d = self.mt(dst, extent(rows, cols, dst_ld), "copy_2d dst");
        let (cfg, r, c) = (grid1(rows * cols), int(rows, "rows"), int(cols, "cols"));
        let (sl, dl, acc) = (long(src_ld), long(dst_ld), accumulate as i32);
        match (s, d) {
            (TypedPtr::F32(s), TypedPtr::F32(d)) => {
                self.k().copy_2d_f32(cfg, r, c, s, sl, d, dl, acc)
            }
            (TypedPtr::Bf16(s), TypedPtr::Bf16(d)) => {
                self.k().copy_2d_bf16(cfg, r, c, s, sl, d, dl, acc)
            }
            (TypedPtr::F32(s), TypedPtr::Bf16(d)) => {
                self.k().copy_2d_f32_bf16(cfg, r, c, s, sl, d, dl, acc)
            }
            (s, d) => self.no_instance("copy_2d", &[s, d]),
        }
    }

    fn axpy(&self, len: usize, alpha: f32, x: Ref<CudaBuf>, y: Mut<CudaBuf>) {
        if len == 0 {
            return;
        }
        let xp = self.rt(x, len, "axpy x");
        let yp = self.mt(y, len, "axpy y");
        let (cfg, n) = (grid1(len), long(len));
        match (xp, yp) {
            (TypedPtr::F32(x), TypedPtr::F32(y)) => self.k().axpy_f32(cfg, n, alpha, x, y),
            (TypedPtr::Bf16(x), TypedPtr::Bf16(y)) => self.k().axpy_bf16(cfg, n, alpha, x, y),
            (x, y) => self.no_instance("axpy", &[x, y]),
        }
    }

    // ---- dense -------------------------------------------------------------------------

    fn gemm(
        &self,
        s: &Gemm,
        alpha: f32,
        a: Ref<CudaBuf>,
        b: Ref<CudaBuf>,
        beta: f32,
        c: Mut<CudaBuf>,
    ) {
        let (m, n, k) = (s.m, s.n, s.k);
        if s.batch == 0 || m == 0 || n == 0 {
            return;
        }
        assert!(s.ldc >= n, "gemm: ldc {} < n {n}", s.ldc);
        let last = s.batch - 1;
        let cp = self.mt(c, last * s.stride_c + extent(m, n, s.ldc), "gemm C");
        // Batched work runs concurrently (one scale_2d launch, or cuBLAS's strided batch),
        // which is only the trait's `for b in 0..batch` when the C matrices share no element
        // (stacked, or side by side inside common rows: the CPU reference's test); otherwise
        // one matrix after the other, in batch order, on the stream.
        let disjoint = s.c_disjoint();
        if k == 0 {
            let (mi, ni, ldc) = (int(m, "m"), int(n, "n"), long(s.ldc));
            let runs: Vec<(usize, i32, i64)> = if disjoint {
                vec![(0, int(s.batch, "batch"), long(s.stride_c))]
            } else {
                (0..s.batch).map(|bi| (bi * s.stride_c, 1, 0)).collect()
            };
            for (off, count, stride) in runs {
                let cfg = grid1(count as usize * m * n);
                match cp.offset(off) {
                    TypedPtr::F32(c) => self
                        .k()
                        .scale_2d_f32(cfg, count, mi, ni, beta, c, ldc, stride),
                    TypedPtr::Bf16(c) => self
                        .k()
                        .scale_2d_bf16(cfg, count, mi, ni, beta, c, ldc, stride),
                }
            }
            return;
        }
        let (a_len, b_len) = s.operand_spans();
        let ap = self.rt(a, a_len, "gemm A");
        let bp = self.rt(b, b_len, "gemm B");
        let (TypedPtr::F32(ap), TypedPtr::F32(bp), TypedPtr::F32(cp)) = (ap, bp, cp) else {
            // Two f32 operands stay f32 (docs/model.md §7): rounding them for a bf16 C would
            // not be the reference's product, and nothing computes one.
            if ap.dtype() == Precision::F32 && bp.dtype() == Precision::F32 {
                return self.no_instance("gemm", &[ap, bp, cp]);
            }
            return self.gemm_bf16(s, alpha, (ap, a_len), (bp, b_len), beta, cp);
        };
        // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: B's buffer is
        // cuBLAS's first operand (column-major n×k when not transposed), A's the second.
        // cuBLAS runs in the calling thread's current context.
        self.note(self.ctx.bind_to_thread(), "bind context");
        let h = *self.blas.handle();
        let (cm, cn, ck) = (int(n, "n"), int(m, "m"), int(k, "k"));
        let (lda, ldb, ldc) = (int(s.ldb, "ldb"), int(s.lda, "lda"), int(s.ldc, "ldc"));
        // SAFETY: the three windows were checked above for every batch entry; the pointers
        // are device addresses in this context; alpha/beta are host values (host pointer
        // mode, cuBLAS's default).
        let r = unsafe {
            if !disjoint || s.batch == 1 {
                (0..s.batch).try_for_each(|bi| {
                    blas::sgemm(
                        h,
                        op(s.trans_b),
                        op(s.trans_a),
                        cm,
                        cn,
                        ck,
                        &alpha,
                        bp.offset(bi * s.stride_b).as_ptr(),
                        lda,
                        ap.offset(bi * s.stride_a).as_ptr(),
                        ldb,
                        &beta,
                        cp.offset(bi * s.stride_c).as_mut_ptr(),
                        ldc,
                    )
                })
            } else {
                blas::sgemm_strided_batched(
                    h,
                    op(s.trans_b),
                    op(s.trans_a),
                    cm,
                    cn,
                    ck,
                    &alpha,
                    bp.as_ptr(),
                    lda,
                    long(s.stride_b),
                    ap.as_ptr(),
                    ldb,
                    long(s.stride_a),
                    &beta,
                    cp.as_mut_ptr(),
                    ldc,
                    long(s.stride_c),
                    int(s.batch, "batch"),
                )
            }
        };
        self.count_launches(if !disjoint || s.batch == 1 {
            s.batch
        } else {
            1
        });
        self.note(r, "cuBLAS sgemm");
    }

    fn gemm_outer(
        &self,
        s: &Gemm,
        outer: &Outer,
        alpha: f32,
        a: Ref<CudaBuf>,
        b: Ref<CudaBuf>,
        beta: f32,
        c: Mut<CudaBuf>,
    ) {
        let (m, n, k) = (s.m, s.n, s.k);
        let products = outer.count * s.batch;
        // One pointer-array call needs both operands in one type (a mixed pair goes through
        // the per-head products, which convert it).
        let same_type = a.buf.dtype() == b.buf.dtype();
        if outer.count <= 1 || s.batch == 0 || k == 0 || !outer.disjoint(s) || !same_type {
            return super::gemm_outer_composed(self, s, outer, alpha, a, b, beta, c);
        }
        if m == 0 || n == 0 {
            return;
        }
        // cuBLAS cannot see the addresses of a pointer array: bf16 products need each one
        // 16-byte aligned (it checks a strided batch's base and stride itself, so a shape
        // whose products are not aligned goes through the per-head strided calls).
        if a.buf.dtype() == Precision::Bf16 {
            let fits = |buf: &CudaBuf, off: usize, strides: [usize; 3]| {
                let bytes = elem_bytes(buf.dtype());
                buf.typed().offset(off).addr().is_multiple_of(16)
                    && strides.iter().all(|&x| (x * bytes).is_multiple_of(16))
            };
            let aligned = fits(a.buf, a.off, [outer.stride_a, s.stride_a, s.lda])
                && fits(b.buf, b.off, [outer.stride_b, s.stride_b, s.ldb])
                && fits(c.buf, c.off, [outer.stride_c, s.stride_c, s.ldc]);
            if !aligned {
                return super::gemm_outer_composed(self, s, outer, alpha, a, b, beta, c);
            }
        }
        assert!(s.ldc >= n, "gemm: ldc {} < n {n}", s.ldc);
        let ((ar, ac), (br, bc)) = s.stored_shapes();
        let (lo, li) = (outer.count - 1, s.batch - 1);
        let span = |so: usize, si: usize, rows: usize, cols: usize, ld: usize| {
            lo * so + li * si + extent(rows, cols, ld)
        };
        let ap = self.rt(a, span(outer.stride_a, s.stride_a, ar, ac, s.lda), "gemm A");
        let bp = self.rt(b, span(outer.stride_b, s.stride_b, br, bc, s.ldb), "gemm B");
        let cp = self.mt(c, span(outer.stride_c, s.stride_c, m, n, s.ldc), "gemm C");
        if ap.dtype() == Precision::F32 && cp.dtype() == Precision::Bf16 {
            return self.no_instance("gemm_outer", &[ap, bp, cp]);
        }
        let ptrs = {
            let mut st = self.lock_state();
            match self.pscratch(&mut st, 3 * products) {
                Ok(p) => p,
                Err(e) => return self.note(Err(e), "gemm pointer scratch"),
            }
        };
        let bytes = |p: TypedPtr| elem_bytes(p.dtype()) as i32;
        // cuBLAS's A operand is our B (see `gemm`): its array comes first.
        self.k().gemm_pointers(
            grid1(products),
            int(outer.count, "outer"),
            int(s.batch, "batch"),
            bp.addr(),
            long(outer.stride_b),
            long(s.stride_b),
            bytes(bp),
            ap.addr(),
            long(outer.stride_a),
            long(s.stride_a),
            bytes(ap),
            cp.addr(),
            long(outer.stride_c),
            long(s.stride_c),
            bytes(cp),
            ptrs,
        );
        let arrays = [0, 1, 2].map(|i| ptrs.offset(i * products).addr());
        self.note(self.ctx.bind_to_thread(), "bind context");
        let h = *self.blas.handle();
        let (cm, cn, ck) = (int(n, "n"), int(m, "m"), int(k, "k"));
        let (lda, ldb, ldc) = (int(s.ldb, "ldb"), int(s.lda, "lda"), int(s.ldc, "ldc"));
        // SAFETY: every product's window was checked above (the spans cover the last one of
        // both levels); the pointer arrays hold `products` device addresses each, written by
        // the kernel queued before on the same stream; their C matrices are disjoint
        // (`Outer::disjoint`); alpha/beta are host f32 values (f32 compute in both calls).
        let r = unsafe {
            if ap.dtype() == Precision::F32 {
                blas_sys::cublasSgemmBatched(
                    h,
                    op(s.trans_b),
                    op(s.trans_a),
                    cm,
                    cn,
                    ck,
                    &alpha,
                    arrays[0] as *const *const f32,
                    lda,
                    arrays[1] as *const *const f32,
                    ldb,
                    &beta,
                    arrays[2] as *const *mut f32,
                    ldc,
                    int(products, "products"),
                )
            } else {
                blas_sys::cublasGemmBatchedEx(
                    h,
                    op(s.trans_b),
                    op(s.trans_a),
                    cm,
                    cn,
                    ck,
                    (&alpha as *const f32).cast(),
                    arrays[0] as *const *const std::ffi::c_void,
                    cuda_type(Precision::Bf16),
                    lda,
                    arrays[1] as *const *const std::ffi::c_void,
                    cuda_type(Precision::Bf16),
                    ldb,
                    (&beta as *const f32).cast(),
                    arrays[2] as *const *mut std::ffi::c_void,
                    cuda_type(cp.dtype()),
                    ldc,
                    int(products, "products"),
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
        }
        .result();
        self.count_launches(1);
        self.note(r, "cuBLAS batched product");
    }

    fn linear_forward(
        &self,
        rows: usize,
        inp: usize,
        out: usize,
        x: Ref<CudaBuf>,
        w: Ref<CudaBuf>,
        b: Ref<CudaBuf>,
        y: Mut<CudaBuf>,
        accumulate: bool,
    ) {
        if rows == 0 || inp == 0 || out == 0 {
            return super::linear_composed(self, rows, inp, out, x, w, b, y, accumulate);
        }
        self.lt_linear(rows, inp, out, x, w, b, None, accumulate, y);
    }

    fn linear_residual(
        &self,
        rows: usize,
        inp: usize,
        out: usize,
        x: Ref<CudaBuf>,
        w: Ref<CudaBuf>,
        b: Ref<CudaBuf>,
        resid: Ref<CudaBuf>,
        mut y: Mut<CudaBuf>,
    ) {
        if rows == 0 || inp == 0 || out == 0 {
            self.copy(rows * out, resid, y.reborrow());
            return super::linear_composed(self, rows, inp, out, x, w, b, y, true);
        }
        self.lt_linear(rows, inp, out, x, w, b, Some(resid), true, y);
    }

    fn add_bias(&self, rows: usize, n: usize, bias: Ref<CudaBuf>, y: Mut<CudaBuf>) {
        if rows == 0 || n == 0 {
            return;
        }
        let bp = self.rt(bias, n, "add_bias bias");
        let yp = self.mt(y, rows * n, "add_bias y");
        let (cfg, r, ni) = (grid1(rows * n), int(rows, "rows"), int(n, "n"));
        match (bp, yp) {
            (TypedPtr::F32(b), TypedPtr::F32(y)) => self.k().add_bias_f32(cfg, r, ni, b, y),
            (TypedPtr::Bf16(b), TypedPtr::Bf16(y)) => self.k().add_bias_bf16(cfg, r, ni, b, y),
            (TypedPtr::Bf16(b), TypedPtr::F32(y)) => self.k().add_bias_bf16_f32(cfg, r, ni, b, y),
            (b, y) => self.no_instance("add_bias", &[b, y]),
        }
    }

    fn bias_backward(&self, rows: usize, n: usize, dy: Ref<CudaBuf>, db: Mut<CudaBuf>) {
        if n == 0 || rows == 0 {
            return;
        }
        let g = self.rt(dy, rows * n, "bias_backward dy");
        let o = self.mp(db, n, "bias_backward db");
        self.column_sum(rows, n, g, o);
    }

    // ---- element-wise and normalisation ----------------------------------------------

    fn gelu(&self, len: usize, x: Ref<CudaBuf>, y: Mut<CudaBuf>) {
        if len == 0 {
            return;
        }
        let xp = self.rt(x, len, "gelu x");
        let yp = self.mt(y, len, "gelu y");
        let (cfg, n) = (grid1(len), long(len));
        match (xp, yp) {
            (TypedPtr::F32(x), TypedPtr::F32(y)) => self.k().gelu_f32(cfg, n, x, y),
            (TypedPtr::Bf16(x), TypedPtr::Bf16(y)) => self.k().gelu_bf16(cfg, n, x, y),
            (x, y) => self.no_instance("gelu", &[x, y]),
        }
    }

    fn gelu_in_place(&self, len: usize, xy: Mut<CudaBuf>) {
        if len == 0 {
            return;
        }
        let (cfg, n) = (grid1(len), long(len));
        match self.mt(xy, len, "gelu_in_place xy") {
            TypedPtr::F32(v) => self.k().gelu_in_place_f32(cfg, n, v),
            TypedPtr::Bf16(v) => self.k().gelu_in_place_bf16(cfg, n, v),
        }
    }

    fn gelu_backward(&self, len: usize, x: Ref<CudaBuf>, dy: Ref<CudaBuf>, dx: Mut<CudaBuf>) {
        if len == 0 {
            return;
        }
        let xp = self.rt(x, len, "gelu_backward x");
        let gp = self.rt(dy, len, "gelu_backward dy");
        let dp = self.mt(dx, len, "gelu_backward dx");
        let (cfg, n) = (grid1(len), long(len));
        match (xp, gp, dp) {
            (TypedPtr::F32(x), TypedPtr::F32(g), TypedPtr::F32(d)) => {
                self.k().gelu_backward_f32(cfg, n, x, g, d)
            }
            (TypedPtr::Bf16(x), TypedPtr::Bf16(g), TypedPtr::Bf16(d)) => {
                self.k().gelu_backward_bf16(cfg, n, x, g, d)
            }
            (x, g, d) => self.no_instance("gelu_backward", &[x, g, d]),
        }
    }

    fn gelu_bias_backward(
        &self,
        rows: usize,
        n: usize,
        x: Ref<CudaBuf>,
        grad: Mut<CudaBuf>,
        db: Mut<CudaBuf>,
    ) {
        if rows == 0 || n == 0 {
            return;
        }
        let xp = self.rt(x, rows * n, "gelu_bias_backward x");
        let gp = self.mt(grad, rows * n, "gelu_bias_backward grad");
        let bp = self.mp(db, n, "gelu_bias_backward db");
        // The column chunks of `column_sum`, so that the bias gradient is the one the
        // unfused path gives.
        let (per, chunks) = col_chunks(rows);
        let (cfg, r, ni, pi) = (
            chunk_grid(n, chunks),
            int(rows, "rows"),
            int(n, "n"),
            int(per, "chunk"),
        );
        match (xp, gp) {
            (TypedPtr::F32(x), TypedPtr::F32(g)) => {
                self.chunked_sum("gelu_bias_backward", n, chunks, bp, |part| {
                    self.k()
                        .gelu_backward_bias_partial_f32(cfg, r, ni, pi, x, g, part)
                })
            }
            (TypedPtr::Bf16(x), TypedPtr::Bf16(g)) => {
                self.chunked_sum("gelu_bias_backward", n, chunks, bp, |part| {
                    self.k()
                        .gelu_backward_bias_partial_bf16(cfg, r, ni, pi, x, g, part)
                })
            }
            (x, g) => self.no_instance("gelu_bias_backward", &[x, g]),
        }
    }

    fn layernorm(
        &self,
        rows: usize,
        d: usize,
        x: Ref<CudaBuf>,
        gamma_beta: Ref<CudaBuf>,
        y: Mut<CudaBuf>,
        stats: Mut<CudaBuf>,
    ) {
        if rows == 0 || d == 0 {
            return;
        }
        let xp = self.rt(x, rows * d, "layernorm x");
        let gb = self.rt(gamma_beta, 2 * d, "layernorm gamma_beta");
        let yp = self.mt(y, rows * d, "layernorm y");
        let sp = self.mp(stats, 2 * rows, "layernorm stats");
        let (cfg, r, di) = (rows_cfg(rows), int(rows, "rows"), int(d, "d"));
        match (xp, gb, yp) {
            (TypedPtr::F32(x), TypedPtr::F32(g), TypedPtr::F32(y)) => {
                self.k().layernorm_f32(cfg, r, di, x, g, y, sp)
            }
            (TypedPtr::F32(x), TypedPtr::Bf16(g), TypedPtr::Bf16(y)) => {
                self.k().layernorm_bf16(cfg, r, di, x, g, y, sp)
            }
            (x, g, y) => self.no_instance("layernorm", &[x, g, y]),
        }
    }

    fn layernorm_backward(
        &self,
        rows: usize,
        d: usize,
        x: Ref<CudaBuf>,
        gamma_beta: Ref<CudaBuf>,
        stats: Ref<CudaBuf>,
        dy: Ref<CudaBuf>,
        dx: Mut<CudaBuf>,
        dgamma_beta: Mut<CudaBuf>,
    ) {
        if rows == 0 || d == 0 {
            return;
        }
        let xp = self.rp(x, rows * d, "layernorm_backward x");
        let gb = self.rt(gamma_beta, 2 * d, "layernorm_backward gamma_beta");
        let sp = self.rp(stats, 2 * rows, "layernorm_backward stats");
        let gp = self.rt(dy, rows * d, "layernorm_backward dy");
        let dxp = self.mp(dx, rows * d, "layernorm_backward dx");
        let dgb = self.mp(dgamma_beta, 2 * d, "layernorm_backward dgamma_beta");
        let (ri, di) = (int(rows, "rows"), int(d, "d"));
        let cfg = rows_cfg(rows);
        match (gb, gp) {
            (TypedPtr::F32(g), TypedPtr::F32(dy)) => self
                .k()
                .layernorm_backward_dx_f32(cfg, ri, di, xp, g, sp, dy, dxp),
            (TypedPtr::Bf16(g), TypedPtr::Bf16(dy)) => self
                .k()
                .layernorm_backward_dx_bf16(cfg, ri, di, xp, g, sp, dy, dxp),
            (g, dy) => return self.no_instance("layernorm_backward", &[g, dy]),
        }
        let (per, chunks) = col_chunks(rows);
        let mut st = self.lock_state();
        let part = match self.fscratch(&mut st, chunks * 2 * d) {
            Ok(p) => p,
            Err(e) => return self.note(Err(e), "layernorm_backward scratch"),
        };
        let cfg = LaunchConfig {
            grid_dim: (d.div_ceil(128) as u32, chunks as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let pi = int(per, "chunk");
        match gp {
            TypedPtr::F32(dy) => self
                .k()
                .layernorm_param_partial_f32(cfg, ri, di, pi, xp, sp, dy, part),
            TypedPtr::Bf16(dy) => self
                .k()
                .layernorm_param_partial_bf16(cfg, ri, di, pi, xp, sp, dy, part),
        }
        self.col_finish(2 * d, chunks, part, dgb);
    }

    // ---- embeddings --------------------------------------------------------------------

    fn embedding(
        &self,
        n: usize,
        width: usize,
        tables: &[EmbTable],
        ids: &CudaSlice<u32>,
        params: &CudaBuf,
        mode: EmbMode,
        out: Mut<CudaBuf>,
        out_ld: usize,
    ) {
        let fields = tables.len();
        let out_w = mode.row_width(fields, width);
        if n == 0 || out_w == 0 {
            return;
        }
        assert!(
            out_ld >= out_w,
            "embedding: out_ld {out_ld} < row width {out_w}"
        );
        let idp = self.ip(ids, n * fields, "embedding ids");
        let op_ = self.mt(out, extent(n, out_w, out_ld), "embedding out");
        if fields == 0 {
            // Sum over no field: zeros.
            let (cfg, ni, wi, ld) = (
                grid1(n * width),
                int(n, "n"),
                int(width, "width"),
                long(out_ld),
            );
            match op_ {
                TypedPtr::F32(o) => self.k().scale_2d_f32(cfg, 1, ni, wi, 0.0, o, ld, 0),
                TypedPtr::Bf16(o) => self.k().scale_2d_bf16(cfg, 1, ni, wi, 0.0, o, ld, 0),
            }
            return;
        }
        check_tables("embedding", tables, width, params.len());
        let err = self.base(&self.lock_state().err_flag);
        let pbase = params.typed();
        let sum = mode == EmbMode::Sum;
        for (gi, group) in EmbFields::groups(tables, width, mode, false)
            .iter()
            .enumerate()
        {
            let per_token = if sum {
                width
            } else {
                group.count as usize * width
            };
            let cfg = grid1(n * per_token);
            let (ni, wi, fi, g) = (
                int(n, "n"),
                int(width, "width"),
                int(fields, "fields"),
                *group,
            );
            let (ld, su, acc) = (long(out_ld), sum as i32, (sum && gi > 0) as i32);
            match (pbase, op_) {
                (TypedPtr::F32(p), TypedPtr::F32(o)) => self
                    .k()
                    .emb_gather_f32(cfg, ni, wi, fi, g, idp, p, o, ld, su, acc, err),
                (TypedPtr::Bf16(p), TypedPtr::Bf16(o)) => self
                    .k()
                    .emb_gather_bf16(cfg, ni, wi, fi, g, idp, p, o, ld, su, acc, err),
                (TypedPtr::Bf16(p), TypedPtr::F32(o)) => self
                    .k()
                    .emb_gather_bf16_f32(cfg, ni, wi, fi, g, idp, p, o, ld, su, acc, err),
                (p, o) => return self.no_instance("embedding", &[p, o]),
            }
        }
    }

    fn embedding_backward(
        &self,
        n: usize,
        width: usize,
        tables: &[EmbTable],
        ids: &CudaSlice<u32>,
        mode: EmbMode,
        dout: Ref<CudaBuf>,
        dout_ld: usize,
        grads: &mut CudaBuf,
        valid: Option<ValidTokens<'_, CudaSlice<u32>>>,
    ) {
        let fields = tables.len();
        let out_w = mode.row_width(fields, width);
        if n == 0 || width == 0 || fields == 0 {
            return;
        }
        assert!(
            dout_ld >= out_w,
            "embedding_backward: dout_ld {dout_ld} < {out_w}"
        );
        check_tables("embedding_backward", tables, width, grads.len());
        let (vlp, vl) = match valid {
            Some(v) => {
                assert!(
                    v.max_len > 0 && n.is_multiple_of(v.max_len),
                    "embedding_backward: {n} tokens are not rows of {} slots",
                    v.max_len
                );
                let what = "embedding_backward lengths";
                (
                    self.ip(v.lens, n / v.max_len, what),
                    int(v.max_len, "max_len"),
                )
            }
            None => (DevPtr::null(), 1),
        };
        let idp = self.ip(ids, n * fields, "embedding_backward ids");
        let gp = self.rt(dout, extent(n, out_w, dout_ld), "embedding_backward dout");
        let gbase = grads.ptr();
        // Tables that share elements go one field at a time, in field order (the CPU's order).
        for group in EmbFields::groups(tables, width, mode, true) {
            let plan = EmbBackwardPlan::new(&group, n, width);
            let mut st = self.lock_state();
            let err = self.base(&st.err_flag);
            let hist = match self.uscratch(&mut st, plan.scratch) {
                Ok(p) => p,
                Err(e) => return self.note(Err(e), "embedding_backward scratch"),
            };
            let starts = hist.offset(plan.chunks * plan.keys);
            let sorted = starts.offset(plan.keys + 1);
            let (ni, fi, ci) = (int(n, "n"), int(fields, "fields"), int(plan.chunk, "chunk"));
            self.k()
                .emb_hist(plan.hist, ni, fi, group, idp, vlp, vl, ci, hist, err);
            if plan.keys == 0 {
                continue;
            }
            let ku = group.keys();
            let chunks = int(plan.chunks, "chunks");
            self.k()
                .emb_col_scan(plan.col_scan, chunks, ku, hist, starts.offset(1));
            self.k().emb_key_scan(plan.key_scan, ku, starts);
            self.k().emb_place(
                plan.place, ni, fi, group, idp, vlp, vl, ci, hist, starts, sorted,
            );
            let cfg = plan.rows;
            let (wi, ld) = (int(width, "width"), long(dout_ld));
            match gp {
                TypedPtr::F32(g) => self
                    .k()
                    .emb_rows_f32(cfg, wi, group, starts, sorted, g, ld, gbase),
                TypedPtr::Bf16(g) => self
                    .k()
                    .emb_rows_bf16(cfg, wi, group, starts, sorted, g, ld, gbase),
            }
        }
    }

    fn add_positions(
        &self,
        batch: usize,
        max_len: usize,
        d: usize,
        lens: &CudaSlice<u32>,
        pos: Ref<CudaBuf>,
        x: Mut<CudaBuf>,
    ) {
        if batch == 0 || max_len == 0 || d == 0 {
            return;
        }
        let lp = self.ip(lens, batch, "add_positions lens");
        let pp = self.rt(pos, max_len * d, "add_positions pos");
        let xp = self.mp(x, batch * max_len * d, "add_positions x");
        let err = self.base(&self.lock_state().err_flag);
        let cfg = grid1(batch * max_len * d);
        let (bi, li, di) = (int(batch, "batch"), int(max_len, "max_len"), int(d, "d"));
        match pp {
            TypedPtr::F32(p) => self.k().add_positions_f32(cfg, bi, li, di, lp, p, xp, err),
            TypedPtr::Bf16(p) => self.k().add_positions_bf16(cfg, bi, li, di, lp, p, xp, err),
        }
    }

    fn add_positions_backward(
        &self,
        batch: usize,
        max_len: usize,
        d: usize,
        lens: &CudaSlice<u32>,
        dx: Ref<CudaBuf>,
        dpos: Mut<CudaBuf>,
    ) {
        if batch == 0 || max_len == 0 || d == 0 {
            return;
        }
        assert!(
            max_len <= 65_535,
            "add_positions_backward: max_len {max_len} > 65535"
        );
        let lp = self.ip(lens, batch, "add_positions_backward lens");
        let gp = self.rp(dx, batch * max_len * d, "add_positions_backward dx");
        let pp = self.mp(dpos, max_len * d, "add_positions_backward dpos");
        // Chunks of batch rows summed in parallel, then the chunks added in order.
        let (per, chunks) = row_chunks(batch, ROW_CHUNK_ROWS);
        let err = self.base(&self.lock_state().err_flag);
        self.chunked_sum("add_positions_backward", max_len * d, chunks, pp, |part| {
            // Columns (x) × positions (y) × chunks (z).
            let mut cfg = chunk_grid(d, max_len);
            cfg.grid_dim.2 = chunks as u32;
            self.k().add_positions_partial_f32(
                cfg,
                int(batch, "batch"),
                int(max_len, "max_len"),
                int(d, "d"),
                int(per, "chunk"),
                lp,
                gp,
                part,
                err,
            );
        });
    }

    // ---- attention and pooling ---------------------------------------------------------

    fn attention_saved_len(&self, s: &AttnShape) -> usize {
        match self.fused_attention(s) {
            Some(_) => attention::fused_saved_len(s),
            None => s.probs_len(),
        }
    }

    /// The fused kernels' row statistics are f32 whatever the precision; the composition's
    /// probabilities are an activation.
    fn attention_saved(&self, s: &AttnShape) -> Result<CudaBuf> {
        match self.fused_attention(s) {
            Some(_) => self.scratch_full(attention::fused_saved_len(s)),
            None => self.scratch(s.probs_len()),
        }
    }

    fn attention(
        &self,
        s: &AttnShape,
        lens: &CudaSlice<u32>,
        scale: f32,
        qkv: Ref<CudaBuf>,
        ctx: Mut<CudaBuf>,
        saved: Mut<CudaBuf>,
    ) {
        match self.fused_attention(s) {
            Some(plan) => self.attention_fused(s, plan, (lens, 0), scale, qkv, ctx, saved),
            None => attention_composed(self, s, lens, scale, qkv, ctx, saved),
        }
    }

    /// The fused forward with its row statistics in a step's scratch, or the composition a
    /// few heads at a time.
    fn attention_infer(
        &self,
        s: &AttnShape,
        lens: &CudaSlice<u32>,
        first_row: usize,
        scale: f32,
        qkv: Ref<CudaBuf>,
        ctx: Mut<CudaBuf>,
    ) -> Result<()> {
        match self.fused_attention(s) {
            Some(plan) => {
                let mut stats = self.scratch_full(attention::fused_saved_len(s))?;
                let saved = Mut::whole(&mut stats);
                let lens = (lens, first_row);
                self.attention_fused(s, plan, lens, scale, qkv, ctx, saved);
                Ok(())
            }
            None => attention_infer_composed(self, s, lens, first_row, scale, qkv, ctx),
        }
    }

    fn attention_backward(
        &self,
        s: &AttnShape,
        lens: &CudaSlice<u32>,
        scale: f32,
        qkv: Ref<CudaBuf>,
        saved: Ref<CudaBuf>,
        dctx: Ref<CudaBuf>,
        dqkv: Mut<CudaBuf>,
    ) -> Result<()> {
        match self.fused_attention(s) {
            Some(plan) => {
                self.attention_backward_fused(s, plan, lens, scale, qkv, saved, dctx, dqkv)
            }
            None => attention_backward_composed(self, s, lens, scale, qkv, saved, dctx, dqkv),
        }
    }

    fn masked_softmax(
        &self,
        batch: usize,
        heads: usize,
        lq: usize,
        lk: usize,
        key_lens: &CudaSlice<u32>,
        first_row: usize,
        scale: f32,
        scores: Mut<CudaBuf>,
    ) {
        let rows = batch * heads * lq;
        if rows == 0 || lk == 0 {
            return;
        }
        let lp = self
            .ip(key_lens, first_row + batch, "masked_softmax key_lens")
            .offset(first_row);
        let sp = self.mt(scores, rows * lk, "masked_softmax scores");
        let err = self.base(&self.lock_state().err_flag);
        let (cfg, r, per, l) = (
            rows_cfg(rows),
            int(rows, "rows"),
            int(heads * lq, "heads·lq"),
            int(lk, "lk"),
        );
        match sp {
            TypedPtr::F32(p) => self
                .k()
                .masked_softmax_f32(cfg, r, per, l, lp, scale, p, err),
            TypedPtr::Bf16(p) => self
                .k()
                .masked_softmax_bf16(cfg, r, per, l, lp, scale, p, err),
        }
    }

    fn masked_softmax_backward(
        &self,
        batch: usize,
        heads: usize,
        lq: usize,
        lk: usize,
        key_lens: &CudaSlice<u32>,
        scale: f32,
        probs: Ref<CudaBuf>,
        dprobs: Ref<CudaBuf>,
        dscores: Mut<CudaBuf>,
    ) {
        let rows = batch * heads * lq;
        if rows == 0 || lk == 0 {
            return;
        }
        let lp = self.ip(key_lens, batch, "masked_softmax_backward key_lens");
        let pp = self.rt(probs, rows * lk, "masked_softmax_backward probs");
        let gp = self.rt(dprobs, rows * lk, "masked_softmax_backward dprobs");
        let dp = self.mt(dscores, rows * lk, "masked_softmax_backward dscores");
        let err = self.base(&self.lock_state().err_flag);
        let (cfg, r, per, l) = (
            rows_cfg(rows),
            int(rows, "rows"),
            int(heads * lq, "heads·lq"),
            int(lk, "lk"),
        );
        match (pp, gp, dp) {
            (TypedPtr::F32(p), TypedPtr::F32(g), TypedPtr::F32(d)) => self
                .k()
                .masked_softmax_backward_f32(cfg, r, per, l, lp, scale, p, g, d, err),
            (TypedPtr::Bf16(p), TypedPtr::Bf16(g), TypedPtr::Bf16(d)) => self
                .k()
                .masked_softmax_backward_bf16(cfg, r, per, l, lp, scale, p, g, d, err),
            (p, g, d) => self.no_instance("masked_softmax_backward", &[p, g, d]),
        }
    }

    fn masked_mean(
        &self,
        batch: usize,
        max_len: usize,
        d: usize,
        lens: &CudaSlice<u32>,
        x: Ref<CudaBuf>,
        empty: Ref<CudaBuf>,
        out: Mut<CudaBuf>,
    ) {
        if batch == 0 || d == 0 {
            return;
        }
        let lp = self.ip(lens, batch, "masked_mean lens");
        let xp = if max_len == 0 {
            x.buf.typed()
        } else {
            self.rt(x, batch * max_len * d, "masked_mean x")
        };
        let ep = self.rt(empty, d, "masked_mean empty");
        let op_ = self.mt(out, batch * d, "masked_mean out");
        let err = self.base(&self.lock_state().err_flag);
        let cfg = grid1(batch * d);
        let (bi, li, di) = (int(batch, "batch"), int(max_len, "max_len"), int(d, "d"));
        match (xp, ep, op_) {
            (TypedPtr::F32(x), TypedPtr::F32(e), TypedPtr::F32(o)) => {
                self.k().masked_mean_f32(cfg, bi, li, di, lp, x, e, o, err)
            }
            (TypedPtr::Bf16(x), TypedPtr::Bf16(e), TypedPtr::Bf16(o)) => {
                self.k().masked_mean_bf16(cfg, bi, li, di, lp, x, e, o, err)
            }
            (x, e, o) => self.no_instance("masked_mean", &[x, e, o]),
        }
    }

    fn masked_mean_backward(
        &self,
        batch: usize,
        max_len: usize,
        d: usize,
        lens: &CudaSlice<u32>,
        dout: Ref<CudaBuf>,
        dx: Mut<CudaBuf>,
        dempty: Mut<CudaBuf>,
    ) {
        if batch == 0 || d == 0 {
            return;
        }
        let lp = self.ip(lens, batch, "masked_mean_backward lens");
        let gp = self.rt(dout, batch * d, "masked_mean_backward dout");
        let ep = self.mp(dempty, d, "masked_mean_backward dempty");
        let (bi, li, di) = (int(batch, "batch"), int(max_len, "max_len"), int(d, "d"));
        if max_len > 0 {
            let xp = self.mt(dx, batch * max_len * d, "masked_mean_backward dx");
            let err = self.base(&self.lock_state().err_flag);
            let cfg = grid1(batch * max_len * d);
            match (gp, xp) {
                (TypedPtr::F32(g), TypedPtr::F32(x)) => self
                    .k()
                    .masked_mean_backward_f32(cfg, bi, li, di, lp, g, x, err),
                (TypedPtr::Bf16(g), TypedPtr::Bf16(x)) => self
                    .k()
                    .masked_mean_backward_bf16(cfg, bi, li, di, lp, g, x, err),
                (g, x) => return self.no_instance("masked_mean_backward", &[g, x]),
            }
        }
        // Chunks of rows summed in parallel, then the chunks added in order.
        let (per, chunks) = row_chunks(batch, ROW_CHUNK_ROWS);
        let (cfg, pi) = (chunk_grid(d, chunks), int(per, "chunk"));
        self.chunked_sum("masked_mean_backward", d, chunks, ep, |part| match gp {
            TypedPtr::F32(g) => self
                .k()
                .masked_mean_dempty_partial_f32(cfg, bi, di, pi, lp, g, part),
            TypedPtr::Bf16(g) => self
                .k()
                .masked_mean_dempty_partial_bf16(cfg, bi, di, pi, lp, g, part),
        });
    }

    fn put_empty_rows(
        &self,
        batch: usize,
        max_len: usize,
        d: usize,
        lens: &CudaSlice<u32>,
        vec: Ref<CudaBuf>,
        seq: Mut<CudaBuf>,
    ) {
        if batch == 0 || d == 0 {
            return;
        }
        assert!(max_len >= 1, "put_empty_rows: max_len must be at least 1");
        let lp = self.ip(lens, batch, "put_empty_rows lens");
        let vp = self.rt(vec, batch * d, "put_empty_rows vec");
        let sp = self.mt(seq, batch * max_len * d, "put_empty_rows seq");
        let cfg = grid1(batch * d);
        let (bi, li, di) = (int(batch, "batch"), int(max_len, "max_len"), int(d, "d"));
        match (vp, sp) {
            (TypedPtr::F32(v), TypedPtr::F32(s)) => {
                self.k().put_empty_rows_f32(cfg, bi, li, di, lp, v, s)
            }
            (TypedPtr::Bf16(v), TypedPtr::Bf16(s)) => {
                self.k().put_empty_rows_bf16(cfg, bi, li, di, lp, v, s)
            }
            (v, s) => self.no_instance("put_empty_rows", &[v, s]),
        }
    }

    fn put_empty_rows_backward(
        &self,
        batch: usize,
        max_len: usize,
        d: usize,
        lens: &CudaSlice<u32>,
        dseq: Mut<CudaBuf>,
        dvec: Mut<CudaBuf>,
    ) {
        if batch == 0 || d == 0 {
            return;
        }
        assert!(
            max_len >= 1,
            "put_empty_rows_backward: max_len must be at least 1"
        );
        let lp = self.ip(lens, batch, "put_empty_rows_backward lens");
        let sp = self.mt(dseq, batch * max_len * d, "put_empty_rows_backward dseq");
        let vp = self.mt(dvec, batch * d, "put_empty_rows_backward dvec");
        let cfg = grid1(batch * d);
        let (bi, li, di) = (int(batch, "batch"), int(max_len, "max_len"), int(d, "d"));
        match (sp, vp) {
            (TypedPtr::F32(s), TypedPtr::F32(v)) => self
                .k()
                .put_empty_rows_backward_f32(cfg, bi, li, di, lp, s, v),
            (TypedPtr::Bf16(s), TypedPtr::Bf16(v)) => self
                .k()
                .put_empty_rows_backward_bf16(cfg, bi, li, di, lp, s, v),
            (s, v) => self.no_instance("put_empty_rows_backward", &[s, v]),
        }
    }

    // ---- losses ------------------------------------------------------------------------

    fn bce_loss_into(
        &self,
        n: usize,
        logits: Ref<CudaBuf>,
        labels: Ref<CudaBuf>,
        weights: Ref<CudaBuf>,
        coef: f32,
        dlogits: Option<Mut<CudaBuf>>,
        out: Mut<CudaBuf>,
    ) -> Result<()> {
        let op_ = self.mp(out, 1, "bce_loss out");
        if n == 0 {
            return self.store_zero(op_);
        }
        let zp = self.rp(logits, n, "bce_loss logits");
        let yp = self.rp(labels, n, "bce_loss labels");
        let wp = self.rp(weights, n, "bce_loss weights");
        let gp = dlogits.map_or(DevPtr::null(), |g| self.mp(g, n, "bce_loss dlogits"));
        let mut st = self.lock_state();
        let terms = self.dscratch(&mut st, n)?.offset(1);
        let f = coef / n as f32;
        self.k()
            .bce_f32(grid1(n), int(n, "n"), zp, yp, wp, f, gp, terms);
        self.reduce_terms_into(&mut st, n, 1.0 / n as f64, None, op_)
    }

    fn bernoulli_kl_loss_into(
        &self,
        n: usize,
        student: Ref<CudaBuf>,
        target: Ref<CudaBuf>,
        weights: Option<Ref<CudaBuf>>,
        tau: f32,
        coef: f32,
        dstudent: Option<Mut<CudaBuf>>,
        out: Mut<CudaBuf>,
    ) -> Result<()> {
        if tau.is_nan() || tau <= 0.0 {
            return Err(Error::invalid(format!(
                "bernoulli_kl_loss: temperature τ = {tau} must be positive"
            )));
        }
        let op_ = self.mp(out, 1, "bernoulli_kl_loss out");
        if n == 0 {
            return self.store_zero(op_);
        }
        let sp = self.rp(student, n, "bernoulli_kl_loss student");
        let tp = self.rp(target, n, "bernoulli_kl_loss target");
        let wp = weights.map_or(DevPtr::null(), |w| {
            self.rp(w, n, "bernoulli_kl_loss weights")
        });
        let gp = dstudent.map_or(DevPtr::null(), |g| {
            self.mp(g, n, "bernoulli_kl_loss dstudent")
        });
        let mut st = self.lock_state();
        let terms = self.dscratch(&mut st, n)?.offset(1);
        let f = coef * tau / n as f32;
        self.k().bernoulli_kl_f32(
            grid1(n),
            int(n, "n"),
            sp,
            tp,
            wp,
            1.0f32 / tau,
            f,
            gp,
            terms,
        );
        let tau2 = tau as f64 * tau as f64;
        self.reduce_terms_into(&mut st, n, tau2 / n as f64, None, op_)
    }

    fn coarse_loss_into(
        &self,
        n: usize,
        d: usize,
        pred: Ref<CudaBuf>,
        target: Ref<CudaBuf>,
        weights: Ref<CudaBuf>,
        cosine: bool,
        coef: f32,
        dpred: Option<Mut<CudaBuf>>,
        out: Mut<CudaBuf>,
    ) -> Result<()> {
        let op_ = self.mp(out, 1, "coarse_loss out");
        if n == 0 || d == 0 {
            return self.store_zero(op_);
        }
        let pp = self.rt(pred, n * d, "coarse_loss pred");
        let tp = self.rt(target, n * d, "coarse_loss target");
        let wp = self.rp(weights, n, "coarse_loss weights");
        let gp = dpred.map(|g| self.mt(g, n * d, "coarse_loss dpred"));
        let mut st = self.lock_state();
        let terms = self.dscratch(&mut st, n)?.offset(1);
        let coef_over_n = coef * (1.0 / n as f32);
        let (cfg, ni, di, cs) = (rows_cfg(n), int(n, "n"), int(d, "d"), cosine as i32);
        // The gradient's address in the inputs' type (null when there is none), or `None`
        // when its type differs.
        let g32 = gp.map_or(Some(DevPtr::null()), TypedPtr::f32);
        let g16 = gp.map_or(Some(DevPtr::null()), TypedPtr::bf16);
        match (pp, tp, g32, g16) {
            (TypedPtr::F32(p), TypedPtr::F32(t), Some(g), _) => {
                self.k()
                    .coarse_f32(cfg, ni, di, p, t, wp, cs, coef_over_n, g, terms)
            }
            (TypedPtr::Bf16(p), TypedPtr::Bf16(t), _, Some(g)) => {
                self.k()
                    .coarse_bf16(cfg, ni, di, p, t, wp, cs, coef_over_n, g, terms)
            }
            _ => {
                let mut types = vec![pp, tp];
                types.extend(gp);
                self.no_instance("coarse_loss", &types);
            }
        }
        self.reduce_terms_into(&mut st, n, 1.0 / n as f64, None, op_)
    }

    fn fine_loss_into(
        &self,
        shape: FineShape,
        q: Ref<CudaBuf>,
        v: Ref<CudaBuf>,
        t_in: Ref<CudaBuf>,
        q_lens: &CudaSlice<u32>,
        k_lens: &CudaSlice<u32>,
        weights: Ref<CudaBuf>,
        coef: f32,
        grads: Option<FineGrads<'_, CudaBuf>>,
        out: Mut<CudaBuf>,
    ) -> Result<()> {
        let FineShape { batch, lq, lk, d } = shape;
        let op_ = self.mp(out, 1, "fine_loss out");
        if batch == 0 || d == 0 {
            return self.store_zero(op_);
        }
        if q_lens.len() < batch || k_lens.len() < batch {
            return Err(Error::invalid(format!(
                "fine_loss: {} query / {} key lengths for a batch of {batch}",
                q_lens.len(),
                k_lens.len()
            )));
        }
        // |R| and the length checks happen on the device (a length beyond its padded extent
        // raises the fault flag), so nothing waits here.
        let Some((cfg, tile)) = fine_cfg(batch, lq, lk, d) else {
            return Err(Error::invalid(format!(
                "fine_loss: lk = {lk}, d = {d} is too large for the CUDA kernel: it needs \
                 {FINE_GROUP}·(lk + d) + 1 = {} floats of shared memory, at most \
                 {FINE_SMEM_FLOATS}",
                FINE_GROUP * (lk + d) + 1
            )));
        };
        let qp = self.rt(q, batch * lq * d, "fine_loss q");
        let vp = self.rt(v, batch * lq * d, "fine_loss v");
        let tp = self.rt(t_in, batch * lk * d, "fine_loss t_in");
        let wp = self.rp(weights, batch, "fine_loss weights");
        let grads = match grads {
            Some(FineGrads { dq, dv }) if lq > 0 && lk > 0 => vec![
                self.mt(dq, batch * lq * d, "fine_loss dq"),
                self.mt(dv, batch * lq * d, "fine_loss dv"),
            ],
            _ => Vec::new(),
        };
        // q, v, t_in, then the gradients if any, all of one type.
        let mut all = vec![qp, vp, tp];
        all.extend(grads);
        let as_f32: Option<Vec<_>> = all.iter().map(|p| p.f32()).collect();
        let as_bf16: Option<Vec<_>> = all.iter().map(|p| p.bf16()).collect();
        let typed = match (as_f32, as_bf16) {
            (Some(p), _) => FineAddrs::F32(p),
            (_, Some(p)) => FineAddrs::Bf16(p),
            _ => {
                self.no_instance("fine_loss", &all);
                return Ok(());
            }
        };
        let qlp = self.base(q_lens);
        let klp = self.base(k_lens);
        let mut st = self.lock_state();
        let terms = self.dscratch(&mut st, batch)?.offset(1);
        let err = self.base(&st.err_flag);
        let (bi, lqi, lki, di) = (
            int(batch, "batch"),
            int(lq, "lq"),
            int(lk, "lk"),
            int(d, "d"),
        );
        let ti = int(tile, "tile");
        match typed {
            FineAddrs::F32(p) => self.k().fine_f32(
                cfg,
                bi,
                lqi,
                lki,
                di,
                ti,
                p[0],
                p[1],
                p[2],
                qlp,
                klp,
                wp,
                coef,
                grad_or_null(&p, 0),
                grad_or_null(&p, 1),
                terms,
                err,
            ),
            FineAddrs::Bf16(p) => self.k().fine_bf16(
                cfg,
                bi,
                lqi,
                lki,
                di,
                ti,
                p[0],
                p[1],
                p[2],
                qlp,
                klp,
                wp,
                coef,
                grad_or_null(&p, 0),
                grad_or_null(&p, 1),
                terms,
                err,
            ),
        }
        self.reduce_terms_into(&mut st, batch, 1.0, Some((klp, batch)), op_)
    }

    // ---- optimizer ---------------------------------------------------------------------

    fn sum_squares_into(&self, len: usize, x: Ref<CudaBuf>, out: Mut<CudaBuf>) -> Result<()> {
        let op_ = self.mp(out, 1, "sum_squares out");
        if len == 0 {
            return self.store_zero(op_);
        }
        let xp = self.rp(x, len, "sum_squares x");
        let blocks = len.div_ceil(THREADS as usize).min(SUMSQ_BLOCKS);
        let mut st = self.lock_state();
        let part = self.dscratch(&mut st, blocks)?.offset(1);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        self.k().sum_squares_partial(cfg, long(len), xp, part);
        self.reduce_terms_into(&mut st, blocks, 1.0, None, op_)
    }

    fn adamw_clipped(
        &self,
        hp: &AdamW,
        clip: f64,
        sum_sq: Ref<CudaBuf>,
        sched: Option<Ref<CudaBuf>>,
        params: &mut CudaBuf,
        grads: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        decay_mask: &CudaBuf,
    ) -> Result<()> {
        let (len, [pp, gp, mp, vp, dp]) = self.adamw_buffers(hp, params, grads, m, v, decay_mask);
        let sp = self.rp(sum_sq, 1, "adamw_clipped sum_sq");
        let schp = sched.map_or(DevPtr::null(), |r| self.rp(r, 3, "adamw_clipped sched"));
        if len == 0 {
            return Ok(());
        }
        let [lr, bc1, bc2] = sched_values::<f32>(hp);
        let err = self.base(&self.lock_state().err_flag);
        self.k().adamw_clipped_f32(
            grid1(len),
            long(len),
            pp,
            gp,
            mp,
            vp,
            dp,
            sp,
            schp,
            clip,
            hp.beta1 as f32,
            hp.beta2 as f32,
            bc1,
            bc2,
            lr,
            hp.eps as f32,
            hp.weight_decay as f32,
            err,
        );
        Ok(())
    }

    fn adamw(
        &self,
        hp: &AdamW,
        params: &mut CudaBuf,
        grads: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        decay_mask: &CudaBuf,
    ) {
        let (len, [pp, gp, mp, vp, dp]) = self.adamw_buffers(hp, params, grads, m, v, decay_mask);
        if len == 0 {
            return;
        }
        let [lr, bc1, bc2] = sched_values::<f32>(hp);
        self.k().adamw_f32(
            grid1(len),
            long(len),
            pp,
            gp,
            mp,
            vp,
            dp,
            hp.grad_scale as f32,
            hp.beta1 as f32,
            hp.beta2 as f32,
            bc1,
            bc2,
            lr,
            hp.eps as f32,
            hp.weight_decay as f32,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{fine_cfg, FINE_GROUP};

    #[test]
    fn the_fine_group_is_the_kernels() {
        let src = include_str!("../../../kernels/losses.cu");
        assert!(
            src.lines()
                .any(|l| l == format!("#define FINE_G {FINE_GROUP}")),
            "kernels/losses.cu does not define FINE_G as FINE_GROUP = {FINE_GROUP}"
        );
    }

    /// (warps, tile, shared-memory floats) of the fine kernel's launch.
    fn fine(batch: usize, lq: usize, lk: usize, d: usize) -> Option<(u32, usize, u32)> {
        fine_cfg(batch, lq, lk, d)
            .map(|(cfg, tile)| (cfg.block_dim.0 / 32, tile, cfg.shared_mem_bytes / 4))
    }

    #[test]
    fn the_fine_kernel_takes_fewer_warps_before_it_refuses_a_shape() {
        // §8: 4 warps, every student token in one tile.
        assert_eq!(fine(1024, 32, 128, 128), Some((4, 32, 16 * 256 + 32)));
        assert_eq!(fine(2, 80, 128, 256).map(|f| f.1), Some(80));
        // Past 638 keys at d = 128, 4 warps do not fit: 2, then 1.
        assert_eq!(fine(1, 8, 638, 128).map(|f| f.0), Some(4));
        assert_eq!(fine(1, 8, 639, 128).map(|f| f.0), Some(2));
        assert_eq!(fine(1, 8, 1406, 128).map(|f| f.0), Some(1));
        assert_eq!(fine(2, 11, 700, 64).map(|f| (f.0, f.1)), Some((4, 11)));
        // The last shape at d = 64: one warp, a tile of 4 tokens, all 12272 floats.
        assert_eq!(fine(3, 5, 3003, 64), Some((1, 4, 12272)));
        assert_eq!(fine(3, 5, 3004, 64), None);
    }
}
