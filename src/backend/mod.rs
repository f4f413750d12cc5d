//! The narrow backend abstraction: every numerical primitive the model, the losses and the
//! optimizer need, each with its backward, behind one trait that the CPU reference
//! ([`cpu::CpuBackend`], generic over f32 and f64) and the CUDA backend implement. One model
//! and one trainer drive both.
//!
//! Conventions, for every method:
//! - Matrices are row-major. A window into a buffer is a [`Ref`] (read) or a [`Mut`] (write):
//!   the buffer and an element offset; the extent follows from the shape arguments.
//! - **Parameter gradients accumulate** (`+=`): the model's gradient buffer is zeroed once per
//!   step and every op adds its contribution. Activation outputs and activation gradients
//!   overwrite unless the method says "accumulates".
//! - Sequences are padded `[batch, max_len, …]` with per-row lengths in an id buffer; padded
//!   positions contribute nothing to any output or gradient, and a query with no valid key
//!   gives a zero output and a zero gradient (never a NaN).
//! - Reductions run in a fixed order, so results are bit-identical whatever the number of
//!   threads.

pub mod arena;
pub mod attention;
pub mod cpu;
pub mod cpu_bf16;
pub mod cuda;
pub mod device;
pub mod float;
pub mod host_memory;
pub mod precision;

pub use arena::ArenaStats;
pub use attention::{AttnShape, INFER_ATTN_ELEMS};
pub use float::Float;
pub use precision::Precision;

use crate::dist::Comm;
use crate::Result;

/// A read-only window into a backend buffer, starting at element `off`.
#[derive(Debug)]
pub struct Ref<'a, T> {
    /// The buffer.
    pub buf: &'a T,
    /// Offset in elements.
    pub off: usize,
}

impl<T> Clone for Ref<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Ref<'_, T> {}

/// A writable window into a backend buffer, starting at element `off`.
#[derive(Debug)]
pub struct Mut<'a, T> {
    /// The buffer.
    pub buf: &'a mut T,
    /// Offset in elements.
    pub off: usize,
}

impl<'a, T> Ref<'a, T> {
    /// The window of `buf` starting at element `off`.
    pub fn at(buf: &'a T, off: usize) -> Self {
        Ref { buf, off }
    }
    /// The window starting at element 0.
    pub fn whole(buf: &'a T) -> Self {
        Ref { buf, off: 0 }
    }
}

impl<'a, T> Mut<'a, T> {
    /// The window of `buf` starting at element `off`.
    pub fn at(buf: &'a mut T, off: usize) -> Self {
        Mut { buf, off }
    }
    /// The window starting at element 0.
    pub fn whole(buf: &'a mut T) -> Self {
        Mut { buf, off: 0 }
    }
    /// A shorter-lived window on the same place (to pass a `Mut` on and keep it).
    pub fn reborrow(&mut self) -> Mut<'_, T> {
        Mut {
            buf: self.buf,
            off: self.off,
        }
    }
}

/// Shape of a (strided-batched) general matrix product, row-major:
/// for `b in 0..batch`, `C_b[i,j] = α·Σ_p op(A_b)[i,p]·op(B_b)[p,j] + β·C_b[i,j]`, with
/// `op(X) = Xᵀ` when the `trans_*` flag is set. `C_b` is `m×n` with row stride `ldc`;
/// `A_b` is stored `m×k` (or `k×m` when transposed) with row stride `lda`; `B_b` is stored
/// `k×n` (or `n×k` when transposed) with row stride `ldb`. Batch `b` starts `b·stride_*`
/// elements after the window's offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gemm {
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// Use Aᵀ.
    pub trans_a: bool,
    /// Use Bᵀ.
    pub trans_b: bool,
    /// Row stride of A as stored.
    pub lda: usize,
    /// Row stride of B as stored.
    pub ldb: usize,
    /// Row stride of C.
    pub ldc: usize,
    /// Number of products.
    pub batch: usize,
    /// Element distance between consecutive A matrices.
    pub stride_a: usize,
    /// Element distance between consecutive B matrices.
    pub stride_b: usize,
    /// Element distance between consecutive C matrices.
    pub stride_c: usize,
}

impl Gemm {
    /// Whether the batch's C matrices share no element, so that they may be computed
    /// concurrently (otherwise one after the other, in batch order, as the trait specifies).
    pub fn c_disjoint(&self) -> bool {
        placed_apart(self.batch, self.stride_c, self.m, self.n, self.ldc)
    }

    /// The stored shapes `(rows, cols)` of A and B (`m×k` or, transposed, `k×m`; `k×n` or
    /// `n×k`). Panics, as a caller bug, when `k > 0` and a row stride is below its row
    /// width.
    pub fn stored_shapes(&self) -> ((usize, usize), (usize, usize)) {
        let (m, n, k) = (self.m, self.n, self.k);
        let a = if self.trans_a { (k, m) } else { (m, k) };
        let b = if self.trans_b { (n, k) } else { (k, n) };
        assert!(
            k == 0 || (self.lda >= a.1 && self.ldb >= b.1),
            "gemm: lda/ldb below the row width"
        );
        (a, b)
    }

    /// Elements A and B span from their first element over the whole batch, as stored
    /// (`(batch − 1)·stride + rows·ld` less the last row's slack); 0 for an empty batch or
    /// `k = 0`, where the product reads neither.
    pub fn operand_spans(&self) -> (usize, usize) {
        if self.batch == 0 || self.k == 0 {
            return (0, 0);
        }
        let ((ar, ac), (br, bc)) = self.stored_shapes();
        let last = self.batch - 1;
        (
            last * self.stride_a + extent(ar, ac, self.lda),
            last * self.stride_b + extent(br, bc, self.ldb),
        )
    }

    /// A single dense product with packed operands: `C[m,n] = op(A)·op(B)`.
    pub fn new(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Gemm {
        Gemm {
            m,
            n,
            k,
            trans_a,
            trans_b,
            lda: if trans_a { m } else { k },
            ldb: if trans_b { k } else { n },
            ldc: n,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        }
    }
}

/// An outer batch around a [`Gemm`]: `count` repetitions of its whole strided batch, the
/// `o`-th shifted by `o·stride_*` elements, so that product `(o, b)` reads A at
/// `o·stride_a + b·gemm.stride_a` past the window's offset (B and C alike). Attention runs
/// batch × heads as one call this way: heads outer, batch rows inner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outer {
    /// Number of repetitions.
    pub count: usize,
    /// Element distance between the A matrices of consecutive repetitions.
    pub stride_a: usize,
    /// Element distance between the B matrices of consecutive repetitions.
    pub stride_b: usize,
    /// Element distance between the C matrices of consecutive repetitions.
    pub stride_c: usize,
}

impl Outer {
    /// Whether the `count × s.batch` C matrices of `s` under this outer batch are pairwise
    /// disjoint, so that they may be computed concurrently. A sufficient test: the level of
    /// smaller stride places its matrices apart (as [`Gemm::c_disjoint`] tests one level),
    /// and the other level's stride is at least the extent of one such group.
    pub fn disjoint(&self, s: &Gemm) -> bool {
        let (mut lo, mut hi) = ((s.batch, s.stride_c), (self.count, self.stride_c));
        if lo.0 > 1 && (hi.0 <= 1 || hi.1 < lo.1) {
            std::mem::swap(&mut lo, &mut hi);
        }
        let ((c1, s1), (c2, s2)) = (lo, hi);
        let group = if c1 == 0 {
            0
        } else {
            (c1 - 1) * s1 + extent(s.m, s.n, s.ldc)
        };
        placed_apart(c1, s1, s.m, s.n, s.ldc) && (c2 <= 1 || s2 >= group)
    }
}

/// [`Backend::all_reduce_sum`] through the host: downloads `x`'s window, sums it over
/// `comm` ([`Comm::all_reduce_sum`]: rank 0 adds the ranks' values in rank order) and
/// writes the result back.
pub fn all_reduce_via_host<B: Backend + ?Sized>(
    be: &B,
    comm: &Comm,
    len: usize,
    x: Mut<B::Buf>,
) -> Result<()> {
    if comm.world() == 1 || len == 0 {
        return Ok(());
    }
    let host = be.download(x.buf)?;
    let mut part = host
        .get(x.off..x.off + len)
        .ok_or_else(|| crate::Error::invalid("all-reduce window beyond its buffer"))?
        .to_vec();
    comm.all_reduce_sum(&mut part)?;
    be.write(&part, x)
}

/// Extent in elements of `rows` rows of `cols` elements with row stride `ld` (0 if empty).
pub(crate) fn extent(rows: usize, cols: usize, ld: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * ld + cols
    }
}

/// Whether `count` `m×n` matrices of row stride `ldc`, `stride` elements apart, share no
/// element: stacked (stride ≥ a matrix's extent), or side by side inside common rows
/// (stride ≥ n and the last ends within `ldc`).
fn placed_apart(count: usize, stride: usize, m: usize, n: usize, ldc: usize) -> bool {
    count <= 1 || stride >= extent(m, n, ldc) || (stride >= n && (count - 1) * stride + n <= ldc)
}

/// [`Backend::gemm_outer`] as one [`Backend::gemm`] per repetition, in order: the definition
/// (and the reference of a backend that fuses the repetitions).
#[allow(clippy::too_many_arguments)]
pub fn gemm_outer_composed<B: Backend + ?Sized>(
    be: &B,
    s: &Gemm,
    outer: &Outer,
    alpha: B::F,
    a: Ref<B::Buf>,
    b: Ref<B::Buf>,
    beta: B::F,
    c: Mut<B::Buf>,
) {
    for o in 0..outer.count {
        be.gemm(
            s,
            alpha,
            Ref::at(a.buf, a.off + o * outer.stride_a),
            Ref::at(b.buf, b.off + o * outer.stride_b),
            beta,
            Mut::at(&mut *c.buf, c.off + o * outer.stride_c),
        );
    }
}

/// One embedding table inside a parameter buffer: `vocab` rows of the op's `width`,
/// starting at element `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbTable {
    /// Element offset of row 0.
    pub offset: usize,
    /// Number of rows (ids must be `< vocab`; the data layer guarantees it).
    pub vocab: usize,
}

/// The valid tokens of `batch` padded sequences of `max_len` slots each, flattened to
/// `batch·max_len` tokens: token `i` is valid when `i % max_len < lens[i / max_len]`.
#[derive(Debug)]
pub struct ValidTokens<'a, I> {
    /// Per-row lengths.
    pub lens: &'a I,
    /// Slots per row.
    pub max_len: usize,
}

impl<I> Clone for ValidTokens<'_, I> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<I> Copy for ValidTokens<'_, I> {}

impl ValidTokens<'_, Vec<u32>> {
    /// Whether token `i` is valid (host lengths).
    pub fn is_valid(&self, i: usize) -> bool {
        self.max_len > 0 && i % self.max_len < self.lens[i / self.max_len] as usize
    }
}

/// How [`Backend::embedding`] combines the fields of one token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbMode {
    /// `out[i, :] = Σ_k table_k[ids[i,k], :]` (event embedding; `out` is `width` wide).
    Sum,
    /// `out[i, k·width .. (k+1)·width] = table_k[ids[i,k], :]` (profile embedding).
    Concat,
}

impl EmbMode {
    /// Width of one output row for `fields` tables of `width` columns: `width` for
    /// [`EmbMode::Sum`], `fields·width` for [`EmbMode::Concat`].
    pub fn row_width(self, fields: usize, width: usize) -> usize {
        match self {
            EmbMode::Sum => width,
            EmbMode::Concat => fields * width,
        }
    }
}

/// Hyper-parameters of one AdamW step (docs/model.md §6.1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// Learning rate of this step (after the schedule).
    pub lr: f64,
    /// First-moment decay β1.
    pub beta1: f64,
    /// Second-moment decay β2.
    pub beta2: f64,
    /// ε added to √v̂.
    pub eps: f64,
    /// Decoupled weight decay λ, applied where the decay mask is 1.
    pub weight_decay: f64,
    /// 1-based step number (for bias correction).
    pub step: u64,
    /// Factor applied to every gradient first (global-norm clipping: `min(1, c/‖g‖)`).
    pub grad_scale: f64,
}

/// Shape of the fine-grained (behaviour-level) alignment loss `L_fine`, docs/model.md §5.6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FineShape {
    /// Rows.
    pub batch: usize,
    /// Padded student tokens per row.
    pub lq: usize,
    /// Padded teacher tokens per row.
    pub lk: usize,
    /// Model width d.
    pub d: usize,
}

/// Host memory a batch is assembled in on the way to the device ([`Backend::Staging`]). It
/// can move to another thread, so that the next batch is laid out while the device runs the
/// current one.
pub trait HostStaging<F>: Send {
    /// The float and id regions, for writing. Waits until every upload queued from them
    /// ([`Backend::upload_staged`]) has read them.
    fn regions(&mut self) -> Result<(&mut [F], &mut [u32])>;
}

/// The backend: buffers and every primitive of the engine. See the module documentation for
/// the conventions (row-major, windows, parameter gradients accumulate).
pub trait Backend: Send + Sync {
    /// Element type of float buffers.
    type F: Float;
    /// A float buffer resident on the device.
    type Buf: Send + Sync;
    /// A `u32` buffer resident on the device (ids, lengths).
    type Ids: Send + Sync;
    /// Recorded work that can be replayed ([`Backend::capture`]).
    type Graph;
    /// Host memory a batch is laid out in before it is uploaded: page-locked on CUDA, so
    /// that the upload is an asynchronous DMA that neither waits for the device nor makes it
    /// wait; plain vectors on the CPU.
    type Staging: HostStaging<Self::F>;
    /// Marks the staged uploads queued before it ([`Backend::upload_fence`]); work queued
    /// after [`Backend::wait_upload`] on it reads their data. Nothing on the CPU, whose
    /// uploads are done when they return.
    type Fence: Send;

    /// A short human-readable name ("cpu-f64", "cuda:0 NVIDIA H100 …").
    fn name(&self) -> String;

    // ---- memory ------------------------------------------------------------------------

    /// A zero-filled buffer of `len` elements.
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    /// A buffer of `len` elements whose contents are unspecified, for an output every
    /// element of which is written before any is read (a β = 0 product, a kernel that writes
    /// all of its output): it skips the zero fill. The CPU backend fills it with NaN, so that
    /// a read before the first write shows in every test run on the CPU.
    fn uninit(&self, len: usize) -> Result<Self::Buf>;
    /// A buffer of `len` elements for one step's activations, gradients or scratch, whose
    /// contents are unspecified as with [`Backend::uninit`] (the default). A backend may
    /// carve it out of an activation arena ([`arena`]) sized by the first step of the
    /// largest shape, so that later steps allocate nothing. Drop it before the next step:
    /// a buffer held longer keeps the arena from being reused (still correct, but every
    /// later request then misses it).
    fn scratch(&self, len: usize) -> Result<Self::Buf> {
        self.uninit(len)
    }
    /// [`Backend::scratch`], zero-filled (the default is [`Backend::zeros`]).
    fn scratch_zeros(&self, len: usize) -> Result<Self::Buf> {
        self.zeros(len)
    }
    /// The element type of activation buffers ([`Backend::scratch`],
    /// [`Backend::act_zeros`]): [`Precision::F32`] (the default) stores them in `F` like
    /// every other buffer; under [`Precision::Bf16`] they hold bfloat16 values, while
    /// [`Backend::zeros`], [`Backend::uninit`], uploads and [`Backend::scratch_full`] stay
    /// in `F`. Every operation reads each buffer in its own type, computes in `F` and rounds
    /// what it stores to the type of the buffer it writes.
    fn precision(&self) -> Precision {
        Precision::F32
    }
    /// A zero-filled buffer that outlives a step, in the activation precision (the
    /// weights' compute copy of a bf16 run). The default is [`Backend::zeros`].
    fn act_zeros(&self, len: usize) -> Result<Self::Buf> {
        self.zeros(len)
    }
    /// [`Backend::scratch`] in `F` whatever [`Backend::precision`] says: for what the
    /// precision scheme keeps in full precision (LayerNorm statistics, logits, loss terms).
    /// The default is [`Backend::scratch`].
    fn scratch_full(&self, len: usize) -> Result<Self::Buf> {
        self.scratch(len)
    }
    /// [`Backend::scratch_full`], zero-filled (the default is [`Backend::scratch_zeros`]).
    fn scratch_full_zeros(&self, len: usize) -> Result<Self::Buf> {
        self.scratch_zeros(len)
    }
    /// The activation arena's size and service so far, where the backend keeps one (`None`
    /// on the CPU, whose allocator plays that part).
    fn arena_stats(&self) -> Option<ArenaStats> {
        None
    }
    /// Device operations this backend has queued so far — kernels, library products (one
    /// per call, a batched call counting once), copies and fills — where it counts them
    /// (`None` on the CPU, which launches nothing). A recorded graph's replay adds nothing:
    /// its operations were counted while it was recorded.
    fn launch_count(&self) -> Option<u64> {
        None
    }
    /// A buffer holding a copy of `host`.
    fn upload(&self, host: &[Self::F]) -> Result<Self::Buf>;
    /// An id buffer holding a copy of `host`.
    fn upload_ids(&self, host: &[u32]) -> Result<Self::Ids>;
    /// The buffer's contents on the host.
    fn download(&self, buf: &Self::Buf) -> Result<Vec<Self::F>>;
    /// Host staging memory for `floats` floats and `ids` ids (allocated once and reused: it
    /// is slow to allocate on CUDA).
    fn alloc_staging(&self, floats: usize, ids: usize) -> Result<Self::Staging>;
    /// A new buffer holding `staging`'s floats `[off, off + len)`. The copy may run beside
    /// the work queued before it (CUDA: on a copy stream): work reads the buffer only after
    /// [`Backend::wait_upload`] on a fence taken after it ([`Backend::upload_fence`]), and
    /// must not read it before. The staging region must not be rewritten until the copy is
    /// made, which [`HostStaging::regions`] waits for.
    fn upload_staged(&self, staging: &Self::Staging, off: usize, len: usize) -> Result<Self::Buf>;
    /// A new id buffer holding `staging`'s ids `[off, off + len)`, as
    /// [`Backend::upload_staged`].
    fn upload_staged_ids(
        &self,
        staging: &Self::Staging,
        off: usize,
        len: usize,
    ) -> Result<Self::Ids>;
    /// A fence after every staged upload queued so far ([`Backend::upload_staged`],
    /// [`Backend::upload_staged_ids`]).
    fn upload_fence(&self) -> Result<Self::Fence>;
    /// Makes the work queued from now on wait until the uploads before `fence` are done
    /// (queued: the host does not wait). A fence dropped unwaited is waited for then, so
    /// that the buffers it covers are never given back while their copies may still run.
    fn wait_upload(&self, fence: &Self::Fence) -> Result<()>;
    /// Number of elements of `buf`.
    fn len(&self, buf: &Self::Buf) -> usize;
    /// Waits until every queued operation has finished and reports an error a device kept
    /// since the last check (a no-op on the CPU, whose operations finish when they return).
    fn synchronize(&self) -> Result<()>;
    /// Joins this backend to the data-parallel job of `comm`: a backend with a device
    /// communicator (CUDA: NCCL) sets it up (collectively: every rank calls this) and keeps
    /// it in `comm`. The default has none, and [`Backend::all_reduce_sum`] goes through the
    /// host.
    fn attach_comm(&self, comm: &Comm) -> Result<()> {
        let _ = comm;
        Ok(())
    }
    /// Sums the `len` elements at `x` over the ranks of `comm`, in place; every rank gets
    /// the same bits. Queued where the backend has a device communicator; the default
    /// ([`all_reduce_via_host`]) waits for the device and sums through `comm`'s host links.
    fn all_reduce_sum(&self, comm: &Comm, len: usize, x: Mut<Self::Buf>) -> Result<()> {
        all_reduce_via_host(self, comm, len, x)
    }
    /// Whether [`Backend::all_reduce_sum`] over `comm` may be recorded into a graph
    /// ([`Backend::capture`]): only a device communicator's can.
    fn all_reduce_in_graphs(&self, comm: &Comm) -> bool {
        let _ = comm;
        false
    }
    /// Records the work that `queue` enqueues as a replayable graph instead of running it,
    /// where the backend can (CUDA graphs); `Ok(None)` where it cannot (the CPU runs work as
    /// it is queued, and does not call `queue`). While recording, `queue` must neither wait
    /// for the device nor read from it, must not grow a buffer the backend keeps, and every
    /// buffer it touches from outside must outlive the graph; its own temporaries belong to
    /// the graph.
    fn capture(&self, queue: &mut dyn FnMut() -> Result<()>) -> Result<Option<Self::Graph>>;
    /// Queues one run of `graph`.
    fn replay(&self, graph: &Self::Graph) -> Result<()>;
    /// Whether `graph` may still be replayed as recorded: `false` once the activation arena
    /// it was recorded against has been replaced by a larger one (it keeps the old one
    /// alive, so a replay stays correct, but recording it again frees that memory).
    fn graph_current(&self, graph: &Self::Graph) -> bool {
        let _ = graph;
        true
    }
    /// `dst[0..host.len()] = host`, queued after the work before it.
    fn write(&self, host: &[Self::F], dst: Mut<Self::Buf>) -> Result<()>;
    /// `dst[0..len] = src[0..len]` for id buffers.
    fn copy_ids(&self, len: usize, src: &Self::Ids, dst: &mut Self::Ids);
    /// Peak bytes held by this backend's device buffers since the last
    /// [`Backend::reset_peak_memory`], where the backend can tell. On the CPU: the peak of
    /// the process's large heap allocations ([`host_memory`]), where its counting allocator
    /// is installed (the `mgkd-train` binary), else `None`; the bf16 scheme's CPU reference
    /// counts its buffers' bytes in their storage types instead ([`cpu_bf16`]).
    fn peak_memory(&self) -> Option<u64>;
    /// Starts a new window for [`Backend::peak_memory`] at the bytes held now.
    fn reset_peak_memory(&self);
    /// `x[0..len] = value`.
    fn fill(&self, len: usize, value: Self::F, x: Mut<Self::Buf>);
    /// `dst[0..len] = src[0..len]`.
    fn copy(&self, len: usize, src: Ref<Self::Buf>, dst: Mut<Self::Buf>);
    /// 2-D block copy: `dst[r·dst_ld + c] = src[r·src_ld + c]` for `r < rows, c < cols`;
    /// accumulates (`+=`) when `accumulate`.
    #[allow(clippy::too_many_arguments)]
    fn copy_2d(
        &self,
        rows: usize,
        cols: usize,
        src: Ref<Self::Buf>,
        src_ld: usize,
        dst: Mut<Self::Buf>,
        dst_ld: usize,
        accumulate: bool,
    );
    /// `y[0..len] += α·x[0..len]`.
    fn axpy(&self, len: usize, alpha: Self::F, x: Ref<Self::Buf>, y: Mut<Self::Buf>);

    // ---- dense -------------------------------------------------------------------------

    /// General (strided-batched) matrix product, see [`Gemm`].
    fn gemm(
        &self,
        shape: &Gemm,
        alpha: Self::F,
        a: Ref<Self::Buf>,
        b: Ref<Self::Buf>,
        beta: Self::F,
        c: Mut<Self::Buf>,
    );
    /// The `outer.count × s.batch` products of `s` under an [`Outer`] batch: as if by one
    /// [`Backend::gemm`] per repetition in order ([`gemm_outer_composed`], the default). A
    /// backend may run them all as one batched call where [`Outer::disjoint`] holds.
    #[allow(clippy::too_many_arguments)]
    fn gemm_outer(
        &self,
        s: &Gemm,
        outer: &Outer,
        alpha: Self::F,
        a: Ref<Self::Buf>,
        b: Ref<Self::Buf>,
        beta: Self::F,
        c: Mut<Self::Buf>,
    ) {
        gemm_outer_composed(self, s, outer, alpha, a, b, beta, c)
    }
    /// The linear map `y = x·Wᵀ + b` on `rows` rows (`y += x·Wᵀ + b` with `accumulate`, a
    /// residual connection): `x` packed `rows×inp`, `w` stored `out×inp`, `b` of `out`,
    /// `y` packed `rows×out`. The default is [`linear_composed`] ([`Backend::gemm`], then
    /// [`Backend::add_bias`]); a backend may fuse the bias into the product.
    #[allow(clippy::too_many_arguments)]
    fn linear_forward(
        &self,
        rows: usize,
        inp: usize,
        out: usize,
        x: Ref<Self::Buf>,
        w: Ref<Self::Buf>,
        b: Ref<Self::Buf>,
        y: Mut<Self::Buf>,
        accumulate: bool,
    ) {
        linear_composed(self, rows, inp, out, x, w, b, y, accumulate)
    }
    /// The linear map with a residual input, `y = resid + x·Wᵀ + b` (shapes as
    /// [`Backend::linear_forward`], `resid` packed `rows×out`), so that a residual connection
    /// needs no copy of its input first. The default copies `resid` into `y`, then
    /// accumulates [`Backend::linear_forward`]; a backend may read `resid` in the product.
    #[allow(clippy::too_many_arguments)]
    fn linear_residual(
        &self,
        rows: usize,
        inp: usize,
        out: usize,
        x: Ref<Self::Buf>,
        w: Ref<Self::Buf>,
        b: Ref<Self::Buf>,
        resid: Ref<Self::Buf>,
        mut y: Mut<Self::Buf>,
    ) {
        self.copy(rows * out, resid, y.reborrow());
        self.linear_forward(rows, inp, out, x, w, b, y, true)
    }
    /// `y[r, :] += bias` for `r < rows`, `y` is `rows×n`.
    fn add_bias(&self, rows: usize, n: usize, bias: Ref<Self::Buf>, y: Mut<Self::Buf>);
    /// Bias gradient, accumulates: `db[j] += Σ_r dy[r, j]`.
    fn bias_backward(&self, rows: usize, n: usize, dy: Ref<Self::Buf>, db: Mut<Self::Buf>);

    // ---- element-wise and normalisation ----------------------------------------------

    /// Exact GELU `y = x·Φ(x) = x·(1 + erf(x/√2))/2` on `len` elements.
    fn gelu(&self, len: usize, x: Ref<Self::Buf>, y: Mut<Self::Buf>);
    /// [`Backend::gelu`] in place: `xy` holds `x` on entry and `GELU(x)` on return (each
    /// element as [`Backend::gelu`] computes it), so that a pass whose `x` is not needed
    /// afterwards (a feed-forward network's pre-activation, when the backward recomputes it)
    /// holds one buffer instead of two.
    fn gelu_in_place(&self, len: usize, xy: Mut<Self::Buf>);
    /// `dx = dy·GELU'(x)`, `GELU'(x) = Φ(x) + x·φ(x)`.
    fn gelu_backward(&self, len: usize, x: Ref<Self::Buf>, dy: Ref<Self::Buf>, dx: Mut<Self::Buf>);
    /// The backward of GELU after a biased linear map, `rows×n`, in place: `grad` holds
    /// `dy` on entry and `dx = dy·GELU'(x)` on return (each element as
    /// [`Backend::gelu_backward`] computes it), and the bias gradient `db += Σ_rows dx` (the
    /// map's pre-activation is `x`), summed as [`Backend::bias_backward`] sums. In place, so
    /// that a block's backward never holds `dy` and `dx` (`tokens×4d` each) at once.
    fn gelu_bias_backward(
        &self,
        rows: usize,
        n: usize,
        x: Ref<Self::Buf>,
        grad: Mut<Self::Buf>,
        db: Mut<Self::Buf>,
    );
    /// LayerNorm over the last dimension, ε = 1e-5:
    /// `y = (x − μ)·rstd·γ + β`, `rstd = 1/√(σ² + ε)`. `gamma_beta` holds γ (d) then β (d).
    /// `stats` (`rows×2`) receives μ and rstd per row for the backward.
    #[allow(clippy::too_many_arguments)]
    fn layernorm(
        &self,
        rows: usize,
        d: usize,
        x: Ref<Self::Buf>,
        gamma_beta: Ref<Self::Buf>,
        y: Mut<Self::Buf>,
        stats: Mut<Self::Buf>,
    );
    /// LayerNorm backward. **Accumulates** into `dx` (the residual stream's gradient) and into
    /// `dgamma_beta` (dγ then dβ, d each).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        rows: usize,
        d: usize,
        x: Ref<Self::Buf>,
        gamma_beta: Ref<Self::Buf>,
        stats: Ref<Self::Buf>,
        dy: Ref<Self::Buf>,
        dx: Mut<Self::Buf>,
        dgamma_beta: Mut<Self::Buf>,
    );

    // ---- embeddings --------------------------------------------------------------------

    /// Embedding lookup of `n` tokens with `tables.len()` fields each; `ids` is `n×fields`
    /// (row `i`, field `k` at `i·fields + k`), `params` holds the tables. Writes `out`
    /// (`n×width` for [`EmbMode::Sum`], `n×(fields·width)` for [`EmbMode::Concat`]) with row
    /// stride `out_ld`.
    #[allow(clippy::too_many_arguments)]
    fn embedding(
        &self,
        n: usize,
        width: usize,
        tables: &[EmbTable],
        ids: &Self::Ids,
        params: &Self::Buf,
        mode: EmbMode,
        out: Mut<Self::Buf>,
        out_ld: usize,
    );
    /// Backward of [`Backend::embedding`]: scatter-adds `dout` rows into the tables' gradients
    /// in `grads` (laid out like `params`), each element's terms in token order. With
    /// `valid`, only the valid tokens' rows are added: the backward of the embedding followed
    /// by zeroing the padded tokens' rows (whose gradient a masked model leaves at zero, so
    /// skipping them spares the work that padding would otherwise cost).
    #[allow(clippy::too_many_arguments)]
    fn embedding_backward(
        &self,
        n: usize,
        width: usize,
        tables: &[EmbTable],
        ids: &Self::Ids,
        mode: EmbMode,
        dout: Ref<Self::Buf>,
        dout_ld: usize,
        grads: &mut Self::Buf,
        valid: Option<ValidTokens<'_, Self::Ids>>,
    );
    /// Learned positions counted back from the most recent event (docs/model.md §4.2): for row `b`
    /// of length `ℓ = lens[b]` and slot `t < ℓ`, `x[b,t,:] += pos[ℓ−1−t, :]`; padded slots are left
    /// untouched. `x` is `batch×max_len×d`.
    #[allow(clippy::too_many_arguments)]
    fn add_positions(
        &self,
        batch: usize,
        max_len: usize,
        d: usize,
        lens: &Self::Ids,
        pos: Ref<Self::Buf>,
        x: Mut<Self::Buf>,
    );
    /// Backward of [`Backend::add_positions`], accumulates `dpos[ℓ−1−t,:] += dx[b,t,:]`.
    fn add_positions_backward(
        &self,
        batch: usize,
        max_len: usize,
        d: usize,
        lens: &Self::Ids,
        dx: Ref<Self::Buf>,
        dpos: Mut<Self::Buf>,
    );

    // ---- attention and pooling ---------------------------------------------------------

    /// Masked softmax of attention scores, in place: `scores` is
    /// `batch×heads×lq×lk`; for row `b` only keys `j < len_b` are valid, `len_b =
    /// key_lens[first_row + b]` (`first_row` > 0: a window of the batch's rows):
    /// `p[b,h,i,j] = exp(s·scale − max)/Σ` over valid `j`, 0 for the others, and an all-zero
    /// row when `len_b = 0`.
    #[allow(clippy::too_many_arguments)]
    fn masked_softmax(
        &self,
        batch: usize,
        heads: usize,
        lq: usize,
        lk: usize,
        key_lens: &Self::Ids,
        first_row: usize,
        scale: Self::F,
        scores: Mut<Self::Buf>,
    );
    /// Backward of [`Backend::masked_softmax`]: `ds = scale·p⊙(dp − Σ_j p·dp)` (0 where
    /// masked). `probs` is the forward output.
    #[allow(clippy::too_many_arguments)]
    fn masked_softmax_backward(
        &self,
        batch: usize,
        heads: usize,
        lq: usize,
        lk: usize,
        key_lens: &Self::Ids,
        scale: Self::F,
        probs: Ref<Self::Buf>,
        dprobs: Ref<Self::Buf>,
        dscores: Mut<Self::Buf>,
    );
    /// Elements of what [`Backend::attention`] saves for its backward: the probabilities
    /// (`s.probs_len()`) by default; a fused implementation may save less (row statistics).
    fn attention_saved_len(&self, s: &AttnShape) -> usize {
        s.probs_len()
    }

    /// A step's buffer for what [`Backend::attention`] saves for its backward
    /// ([`Backend::attention_saved_len`] elements), in the type this backend keeps it in.
    /// Default: a [`Backend::scratch`] buffer (the composition's probabilities are an
    /// activation); a fused kernel's row statistics stay in full precision.
    fn attention_saved(&self, s: &AttnShape) -> Result<Self::Buf> {
        self.scratch(self.attention_saved_len(s))
    }
    /// Multi-head self-attention with a key-padding mask ([`attention`]): from the fused
    /// projection `qkv` (`[batch, len, 3d]`), `ctx` (`[batch, len, d]`) = per head
    /// `softmax_mask(Q_h·K_hᵀ·scale)·V_h`, keys `j < lens[b]` only; `saved`
    /// ([`Backend::attention_saved_len`] elements) receives what the backward needs. The
    /// default is [`attention::attention_composed`]; a backend may fuse it.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        s: &AttnShape,
        lens: &Self::Ids,
        scale: Self::F,
        qkv: Ref<Self::Buf>,
        ctx: Mut<Self::Buf>,
        saved: Mut<Self::Buf>,
    ) {
        attention::attention_composed(self, s, lens, scale, qkv, ctx, saved)
    }
    /// [`Backend::attention`] for inference: `ctx` only, nothing saved for a backward; the
    /// key lengths of its rows are `lens[first_row ..]` (`first_row` > 0: a window of the
    /// batch's rows). The default is [`attention::attention_infer_composed`] (the
    /// composition a few heads and rows at a time); a backend may fuse it.
    #[allow(clippy::too_many_arguments)]
    fn attention_infer(
        &self,
        s: &AttnShape,
        lens: &Self::Ids,
        first_row: usize,
        scale: Self::F,
        qkv: Ref<Self::Buf>,
        ctx: Mut<Self::Buf>,
    ) -> Result<()> {
        attention::attention_infer_composed(self, s, lens, first_row, scale, qkv, ctx)
    }
    /// Backward of [`Backend::attention`]: `dqkv` (`[batch, len, 3d]`, overwritten) from
    /// the gradient of the output `dctx`, given the forward's `qkv` and `saved`. A query
    /// with no valid key gets a zero gradient. The default is
    /// [`attention::attention_backward_composed`].
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        s: &AttnShape,
        lens: &Self::Ids,
        scale: Self::F,
        qkv: Ref<Self::Buf>,
        saved: Ref<Self::Buf>,
        dctx: Ref<Self::Buf>,
        dqkv: Mut<Self::Buf>,
    ) -> Result<()> {
        attention::attention_backward_composed(self, s, lens, scale, qkv, saved, dctx, dqkv)
    }
    /// Masked mean over time: `out[b,:] = Σ_{t<ℓ} x[b,t,:]/ℓ` with `ℓ = lens[b]`, or `empty`
    /// (the learned `s_∅`) when `ℓ = 0`. `x` is `batch×max_len×d`.
    #[allow(clippy::too_many_arguments)]
    fn masked_mean(
        &self,
        batch: usize,
        max_len: usize,
        d: usize,
        lens: &Self::Ids,
        x: Ref<Self::Buf>,
        empty: Ref<Self::Buf>,
        out: Mut<Self::Buf>,
    );
    /// Backward of [`Backend::masked_mean`]: overwrites `dx` (`dout/ℓ` on valid slots, 0 on
    /// padding) and accumulates the rows with `ℓ = 0` into `dempty`.
    #[allow(clippy::too_many_arguments)]
    fn masked_mean_backward(
        &self,
        batch: usize,
        max_len: usize,
        d: usize,
        lens: &Self::Ids,
        dout: Ref<Self::Buf>,
        dx: Mut<Self::Buf>,
        dempty: Mut<Self::Buf>,
    );

    /// Puts a per-row vector into slot 0 of the rows whose sequence is empty: for every `b`
    /// with `lens[b] = 0`, `seq[b,0,:] = vec[b,:]`; other rows are left untouched. `vec` is
    /// `batch×d`, `seq` is `batch×max_len×d` with `max_len ≥ 1`. (`L_fine`, docs/model.md §5.6: the
    /// student token of an empty pre-service sequence is the profile vector.)
    #[allow(clippy::too_many_arguments)]
    fn put_empty_rows(
        &self,
        batch: usize,
        max_len: usize,
        d: usize,
        lens: &Self::Ids,
        vec: Ref<Self::Buf>,
        seq: Mut<Self::Buf>,
    );
    /// Backward of [`Backend::put_empty_rows`]: for every `b` with `lens[b] = 0`,
    /// **accumulates** `dvec[b,:] += dseq[b,0,:]` and zeroes `dseq[b,0,:]` (that slot held no
    /// token of the sequence); other rows are left untouched.
    #[allow(clippy::too_many_arguments)]
    fn put_empty_rows_backward(
        &self,
        batch: usize,
        max_len: usize,
        d: usize,
        lens: &Self::Ids,
        dseq: Mut<Self::Buf>,
        dvec: Mut<Self::Buf>,
    );

    // ---- losses (fused forward + backward) ---------------------------------------------
    //
    // Each `*_into` writes the loss value into `out[0]` (a one-element window, left on the
    // device: no synchronisation) and, when a gradient window is given, **accumulates**
    // `coef · ∂L/∂input` into it. The value-returning forms read `out` back (they wait for
    // the device); a training step uses the `*_into` forms and reads its scalars once per
    // logging interval.

    /// Weighted binary cross-entropy on logits, stable (softplus form):
    /// `L = (1/n)·Σ_i w_i·(softplus(z_i) − y_i·z_i)`, `∂L/∂z_i = w_i·(σ(z_i) − y_i)/n`.
    /// `labels` holds 0/1 as floats.
    #[allow(clippy::too_many_arguments)]
    fn bce_loss_into(
        &self,
        n: usize,
        logits: Ref<Self::Buf>,
        labels: Ref<Self::Buf>,
        weights: Ref<Self::Buf>,
        coef: Self::F,
        dlogits: Option<Mut<Self::Buf>>,
        out: Mut<Self::Buf>,
    ) -> Result<()>;
    /// [`Backend::bce_loss_into`], returning the value.
    #[allow(clippy::too_many_arguments)]
    fn bce_loss(
        &self,
        n: usize,
        logits: Ref<Self::Buf>,
        labels: Ref<Self::Buf>,
        weights: Ref<Self::Buf>,
        coef: Self::F,
        dlogits: Option<Mut<Self::Buf>>,
    ) -> Result<Self::F> {
        read_scalar(self, |out| {
            self.bce_loss_into(n, logits, labels, weights, coef, dlogits, out)
        })
    }
    /// Temperature-scaled Bernoulli KL (soft labels and self-distillation):
    /// `L = τ²·(1/n)·Σ_i w_i·KL(Bern(σ(t_i/τ)) ‖ Bern(σ(s_i/τ)))`,
    /// `∂L/∂s_i = τ·w_i·(σ(s_i/τ) − σ(t_i/τ))/n`; no gradient to the targets `t`.
    /// `weights = None` means `w_i = 1`.
    #[allow(clippy::too_many_arguments)]
    fn bernoulli_kl_loss_into(
        &self,
        n: usize,
        student: Ref<Self::Buf>,
        target: Ref<Self::Buf>,
        weights: Option<Ref<Self::Buf>>,
        tau: Self::F,
        coef: Self::F,
        dstudent: Option<Mut<Self::Buf>>,
        out: Mut<Self::Buf>,
    ) -> Result<()>;
    /// [`Backend::bernoulli_kl_loss_into`], returning the value.
    #[allow(clippy::too_many_arguments)]
    fn bernoulli_kl_loss(
        &self,
        n: usize,
        student: Ref<Self::Buf>,
        target: Ref<Self::Buf>,
        weights: Option<Ref<Self::Buf>>,
        tau: Self::F,
        coef: Self::F,
        dstudent: Option<Mut<Self::Buf>>,
    ) -> Result<Self::F> {
        read_scalar(self, |out| {
            self.bernoulli_kl_loss_into(n, student, target, weights, tau, coef, dstudent, out)
        })
    }
    /// Sequence-level alignment, `pred`/`target` are `n×d`:
    /// MSE form `L = (1/n)·Σ_i w_i·‖pred_i − target_i‖²/d`;
    /// cosine form `L = (1/n)·Σ_i w_i·(1 − cos(pred_i, target_i))` (a zero vector has cosine
    /// 0 and a zero gradient). No gradient to `target`.
    #[allow(clippy::too_many_arguments)]
    fn coarse_loss_into(
        &self,
        n: usize,
        d: usize,
        pred: Ref<Self::Buf>,
        target: Ref<Self::Buf>,
        weights: Ref<Self::Buf>,
        cosine: bool,
        coef: Self::F,
        dpred: Option<Mut<Self::Buf>>,
        out: Mut<Self::Buf>,
    ) -> Result<()>;
    /// [`Backend::coarse_loss_into`], returning the value.
    #[allow(clippy::too_many_arguments)]
    fn coarse_loss(
        &self,
        n: usize,
        d: usize,
        pred: Ref<Self::Buf>,
        target: Ref<Self::Buf>,
        weights: Ref<Self::Buf>,
        cosine: bool,
        coef: Self::F,
        dpred: Option<Mut<Self::Buf>>,
    ) -> Result<Self::F> {
        read_scalar(self, |out| {
            self.coarse_loss_into(n, d, pred, target, weights, cosine, coef, dpred, out)
        })
    }
    /// Behaviour-level alignment (`L_fine`, docs/model.md §5.6), all `batch×l×d`, with the
    /// teacher's tokens `t_in` as the keys: `q` are the queries in the teacher tokens' space
    /// (`W_kᵀ·(W_q·T_pre + b_q)`, so that `q_j·t_k = (W_q·T_pre,j + b_q)·(W_k·t_k)`), `v =
    /// W_v·T_pre + b_v` (projections done by the caller). For row `b` with `ℓq = q_lens[b] > 0`
    /// student tokens and `ℓk = k_lens[b]` teacher tokens: `A_j = softmax_k(q_j·t_in,k/√d)`
    /// over `k < ℓk`, `e_j = ‖v_j − Σ_k A_jk·t_in,k‖²/d`, row loss `mean_{j<ℓq} e_j`;
    /// `L = Σ_{b∈R} w_b·rowloss_b/|R|` with `R = {b : ℓk > 0}` (0 when R is empty).
    /// Gradients (accumulated, scaled by `coef`) go to `q` and `v`, never to `t_in`.
    /// A length beyond its padded extent is an error (on a device, reported by the next
    /// synchronising call).
    #[allow(clippy::too_many_arguments)]
    fn fine_loss_into(
        &self,
        shape: FineShape,
        q: Ref<Self::Buf>,
        v: Ref<Self::Buf>,
        t_in: Ref<Self::Buf>,
        q_lens: &Self::Ids,
        k_lens: &Self::Ids,
        weights: Ref<Self::Buf>,
        coef: Self::F,
        grads: Option<FineGrads<'_, Self::Buf>>,
        out: Mut<Self::Buf>,
    ) -> Result<()>;
    /// [`Backend::fine_loss_into`], returning the value.
    #[allow(clippy::too_many_arguments)]
    fn fine_loss(
        &self,
        shape: FineShape,
        q: Ref<Self::Buf>,
        v: Ref<Self::Buf>,
        t_in: Ref<Self::Buf>,
        q_lens: &Self::Ids,
        k_lens: &Self::Ids,
        weights: Ref<Self::Buf>,
        coef: Self::F,
        grads: Option<FineGrads<'_, Self::Buf>>,
    ) -> Result<Self::F> {
        read_scalar(self, |out| {
            self.fine_loss_into(shape, q, v, t_in, q_lens, k_lens, weights, coef, grads, out)
        })
    }

    // ---- optimizer ---------------------------------------------------------------------

    /// `out[0] = Σ x²` over `len` elements, in a fixed order (for the global gradient norm).
    fn sum_squares_into(&self, len: usize, x: Ref<Self::Buf>, out: Mut<Self::Buf>) -> Result<()>;
    /// [`Backend::sum_squares_into`], returning the value.
    fn sum_squares(&self, len: usize, x: Ref<Self::Buf>) -> Result<Self::F> {
        read_scalar(self, |out| self.sum_squares_into(len, x, out))
    }
    /// One AdamW pass (as [`Backend::adamw`]) with the global-norm clipping factor taken
    /// from the device: `‖g‖ = √sum_sq[0]`, `hp.grad_scale` replaced by `min(1, clip/‖g‖)`.
    /// A non-finite `‖g‖` leaves the parameters and moments untouched and is an error
    /// ("training diverged"; on a device, reported by the next synchronising call).
    /// `sched`, when given, holds `[lr, 1 − β1^t, 1 − β2^t]` for the step `hp` describes, and
    /// a device reads them from there (so that a recorded graph takes each replay's values;
    /// see [`sched_values`]). The default reads `sum_sq` back (waits for the device) and
    /// calls [`Backend::adamw`] with `hp`.
    #[allow(clippy::too_many_arguments)]
    fn adamw_clipped(
        &self,
        hp: &AdamW,
        clip: f64,
        sum_sq: Ref<Self::Buf>,
        sched: Option<Ref<Self::Buf>>,
        params: &mut Self::Buf,
        grads: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        decay_mask: &Self::Buf,
    ) -> Result<()> {
        let _ = sched; // it repeats hp's values; only recorded work needs them on the device
        let mut one = self.zeros(1)?;
        self.copy(1, sum_sq, Mut::whole(&mut one));
        let ss = self.download(&one)?[0].to_f64();
        let hp = AdamW {
            grad_scale: clip_factor(ss.sqrt(), clip)?,
            ..*hp
        };
        self.adamw(&hp, params, grads, m, v, decay_mask);
        Ok(())
    }
    /// One AdamW pass over the flat buffers (docs/model.md §6.1), `g ← grad_scale·g`,
    /// `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
    /// `p ← p − lr·(m̂/(√v̂ + ε) + λ·mask·p)` with `m̂ = m/(1−β1^t)`, `v̂ = v/(1−β2^t)`.
    /// `decay_mask` holds 1 for weight-matrix elements and 0 elsewhere.
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        hp: &AdamW,
        params: &mut Self::Buf,
        grads: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        decay_mask: &Self::Buf,
    );
}

/// Gradient windows of [`Backend::fine_loss`]: two distinct buffers.
#[derive(Debug)]
pub struct FineGrads<'a, B> {
    /// Gradient of `q`.
    pub dq: Mut<'a, B>,
    /// Gradient of `v`.
    pub dv: Mut<'a, B>,
}

/// Runs `write` on a fresh one-element buffer and returns what it wrote (waits for the
/// device).
fn read_scalar<B: Backend + ?Sized>(
    be: &B,
    write: impl FnOnce(Mut<B::Buf>) -> Result<()>,
) -> Result<B::F> {
    let mut out = be.zeros(1)?;
    write(Mut::whole(&mut out))?;
    Ok(be.download(&out)?[0])
}

/// The device schedule constants of an AdamW step, `[lr, 1 − β1^t, 1 − β2^t]` (see
/// [`Backend::adamw_clipped`]), rounded as the kernels round them.
pub fn sched_values<F: Float>(hp: &AdamW) -> [F; 3] {
    let step = i32::try_from(hp.step).unwrap_or(i32::MAX);
    [
        <F as Float>::from_f64(hp.lr),
        <F as Float>::from_f64(1.0 - hp.beta1.powi(step)),
        <F as Float>::from_f64(1.0 - hp.beta2.powi(step)),
    ]
}

/// The global-norm clipping factor `min(1, clip/‖g‖)` (1 for a zero gradient); an
/// [`Error::Diverged`](crate::Error::Diverged) for a non-finite norm (the step would destroy
/// the parameters).
pub fn clip_factor(norm: f64, clip: f64) -> Result<f64> {
    if !norm.is_finite() {
        return Err(crate::Error::Diverged(format!(
            "gradient norm is {norm}: training diverged"
        )));
    }
    Ok(if norm > clip { clip / norm } else { 1.0 })
}

/// [`Backend::linear_forward`] composed of [`Backend::gemm`] (or a zero fill when `inp = 0`)
/// and [`Backend::add_bias`]: the reference a fused implementation is checked against.
#[allow(clippy::too_many_arguments)]
pub fn linear_composed<B: Backend + ?Sized>(
    be: &B,
    rows: usize,
    inp: usize,
    out: usize,
    x: Ref<B::Buf>,
    w: Ref<B::Buf>,
    b: Ref<B::Buf>,
    mut y: Mut<B::Buf>,
    accumulate: bool,
) {
    let f = <B::F as Float>::from_f64;
    if inp > 0 {
        let beta = f(if accumulate { 1.0 } else { 0.0 });
        be.gemm(
            &Gemm::new(rows, out, inp, false, true),
            f(1.0),
            x,
            w,
            beta,
            y.reborrow(),
        );
    } else if !accumulate {
        be.fill(rows * out, f(0.0), y.reborrow());
    }
    be.add_bias(rows, out, b, y);
}
