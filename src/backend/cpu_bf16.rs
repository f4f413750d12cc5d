//! The CPU reference of the bf16 precision scheme ([`Precision::Bf16`]): [`CpuBf16Backend`]
//! runs every operation of the f32 CPU backend ([`CpuBackend<f32>`]) and then rounds what it
//! wrote into a bf16 buffer to the nearest bfloat16. Buffers ([`TaggedBuf`]) carry their
//! storage type: a step's activations, activation gradients and scratch
//! ([`Backend::scratch`]) and the weights' compute copy ([`Backend::act_zeros`]) are bf16;
//! parameters, gradients, Adam moments, uploads, LayerNorm statistics, logits and loss terms
//! ([`Backend::scratch_full`]) are f32. Arithmetic is f32 throughout, so this is exactly "load
//! bf16, compute in f32, round on store" — the scheme the CUDA kernels implement — up to the
//! order of summation. A matrix product takes both operands in one type: an f32 operand
//! multiplied with a bf16 one (the residual stream's gradient into a weight's product, the
//! logits' gradient into the head's) is rounded to bf16 first, as a tensor-core product needs.
//!
//! It exists to check the scheme, not to be fast: values are held as f32 that are exact
//! bf16 numbers, so it saves no memory, and each write costs an extra rounding pass. What it
//! reports as its memory ([`Backend::peak_memory`]) is therefore not the host's: it is what
//! a device running the scheme with the CUDA backend's memory layout holds, counted by a
//! ledger as buffers are made and dropped:
//! - a buffer of its own (parameters, gradients, moments, uploads, the weights' compute
//!   copy) counts its bytes in its storage type, 2 per bf16 element and 4 per f32 one;
//! - a step's scratch ([`Backend::scratch`], [`Backend::scratch_full`] and their zeroed
//!   forms) is placed in an emulated activation arena, the same [`ArenaPlan`] as the CUDA
//!   backend's, resized at the same moments: a window in the slab counts nothing, the slab
//!   counts its whole capacity from its making, and a request the slab cannot serve (a
//!   miss) counts its bytes like a buffer of its own. So the ledger's peak includes the
//!   arena's alignment, its fragmentation and the slab's rounding, and
//!   [`Backend::arena_stats`] reports the slab and the misses a device would see;
//! - the scratch the CUDA backend takes inside an operation that this reference computes
//!   without it is placed there too, for the operation's duration, with no host memory
//!   (`Held`): the bf16 copy of an f32 operand beside a bf16 one in a matrix product,
//!   and the attention's scratch, as the attention implementation the backend emulates
//!   ([`CpuBf16Backend::emulating`]) takes it: the composition's probabilities
//!   (inference) and their two gradients (backward), or the fused kernels' row statistics
//!   (inference) and row sums (backward), where a shape fits them on a device with tensor
//!   cores. With the fused kernels, the saved state of a training forward counts as their
//!   row statistics (`[batch, heads, len, 2]` f32), although this reference keeps the
//!   probabilities for its own backward.
//!
//! Not counted: what the CUDA backend keeps for its life outside the arena (the cuBLAS
//! workspace, 32 MiB; its grow-only scratch for column sums, the embedding backward's sort
//! and the products' pointer arrays), id buffers (`u32` on every backend), and the pool's
//! own rounding.

use super::arena::{self, lock, ArenaPlan, ArenaStats, HoldsPlan};
use super::attention::infer_probs_len;
use super::cpu::{CpuBackend, CpuStaging};
use super::cuda::attention::{fused_fits, fused_saved_len, AttentionKernels};
use super::precision::{round_bf16, Precision};
use super::{
    AdamW, AttnShape, Backend, EmbMode, EmbTable, FineGrads, FineShape, Gemm, Mut, Outer, Ref,
    ValidTokens,
};
use crate::Result;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Bytes the process's live [`TaggedBuf`]s and emulated slabs count on the ledger (see the
/// module documentation).
static SCHEME_LIVE: AtomicU64 = AtomicU64::new(0);
/// The most [`SCHEME_LIVE`] bytes held at once since the last reset.
static SCHEME_PEAK: AtomicU64 = AtomicU64::new(0);

/// Enters `bytes` on the ledger.
fn ledger_add(bytes: u64) {
    SCHEME_PEAK.fetch_max(SCHEME_LIVE.fetch_add(bytes, Relaxed) + bytes, Relaxed);
}

/// Takes `bytes` off the ledger.
fn ledger_sub(bytes: u64) {
    SCHEME_LIVE.fetch_sub(bytes, Relaxed);
}

/// The emulated activation arena of one [`CpuBf16Backend`]: the placement plan, whose
/// capacity is the emulated slab's (on the ledger while the arena lives).
#[derive(Debug, Default)]
struct ArenaState {
    plan: ArenaPlan,
}

impl ArenaState {
    /// Replaces the slab by a larger one when a finished round reached above it and no
    /// window is held, as the CUDA backend's arena does before placing a request: the old
    /// slab leaves the ledger and the new one enters it.
    fn resize(&mut self) {
        if let Some(cap) = self.plan.wanted() {
            ledger_sub(self.plan.stats().capacity as u64);
            ledger_add(cap as u64);
            self.plan.resized(cap);
        }
    }
}

impl Drop for ArenaState {
    fn drop(&mut self) {
        ledger_sub(self.plan.stats().capacity as u64);
    }
}

impl HoldsPlan for ArenaState {
    fn plan_mut(&mut self) -> &mut ArenaPlan {
        &mut self.plan
    }
}

/// A window of an emulated arena held by a [`TaggedBuf`] or a [`Held`].
type Lease = arena::Lease<ArenaState>;

/// A window of `bytes` bytes of `arena`, with the bytes it put on the ledger (all of them
/// for a miss, none in the slab): the slab first replaced when a finished round needs more,
/// as the CUDA backend's arena does before placing a request.
fn place(arena: &Arc<Mutex<ArenaState>>, bytes: u64) -> (Lease, u64) {
    let mut st = lock(arena);
    st.resize();
    let window = st.plan.take(bytes as usize);
    drop(st);
    let counted = match window.slab_offset() {
        Some(_) => 0,
        None => bytes,
    };
    ledger_add(counted);
    (Lease::new(arena.clone(), window), counted)
}

/// Scratch that the CUDA backend takes inside one operation and this reference does not
/// (its inner f32 backend computes in host memory of its own): a window of the emulated
/// arena, on the ledger like a scratch buffer's, held until dropped; no host memory.
struct Held {
    /// Gives the window back when dropped (after [`Held`]'s own drop).
    _lease: Lease,
    /// The bytes it put on the ledger.
    counted: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        ledger_sub(self.counted);
    }
}

/// A host buffer of f32 values tagged with the type it stands for: with
/// [`Precision::Bf16`] every element is an exact bfloat16 value. From its making to its drop
/// it is on the scheme's ledger: its bytes in that type, or nothing when it is a window of
/// the emulated arena's slab (see the module documentation).
#[derive(Debug)]
pub struct TaggedBuf {
    /// The elements (exact bf16 values when `dtype` is bf16); private, so that its length,
    /// which the ledger counts, is fixed at the making.
    data: Vec<f32>,
    /// The storage type the buffer stands for.
    dtype: Precision,
    /// The arena window it stands in, for a step's scratch.
    lease: Option<Lease>,
    /// The bytes it put on the ledger.
    counted: u64,
}

impl PartialEq for TaggedBuf {
    /// Equal values in the same storage type (where the buffer lives does not matter).
    fn eq(&self, other: &TaggedBuf) -> bool {
        self.dtype == other.dtype && self.data == other.data
    }
}

impl TaggedBuf {
    /// A buffer of its own of type `dtype` holding `data` as given, entered on the ledger.
    fn tagged(data: Vec<f32>, dtype: Precision) -> TaggedBuf {
        let mut b = TaggedBuf {
            data,
            dtype,
            lease: None,
            counted: 0,
        };
        b.counted = b.stored_bytes();
        ledger_add(b.counted);
        b
    }

    /// A step's scratch buffer of type `dtype` holding `data` (rounded to the type), placed
    /// in `arena` as `bytes` bytes of a device's storage: on the ledger only when the slab
    /// cannot serve it.
    fn scratch(
        data: Vec<f32>,
        dtype: Precision,
        bytes: u64,
        arena: &Arc<Mutex<ArenaState>>,
    ) -> TaggedBuf {
        let mut b = TaggedBuf {
            data,
            dtype,
            lease: None,
            counted: 0,
        };
        let (lease, counted) = place(arena, bytes);
        (b.lease, b.counted) = (Some(lease), counted);
        b.settle();
        b
    }

    /// An f32 buffer holding `data`.
    pub fn f32(data: Vec<f32>) -> TaggedBuf {
        TaggedBuf::tagged(data, Precision::F32)
    }

    /// A bf16 buffer holding `data` rounded to bfloat16.
    pub fn bf16(data: Vec<f32>) -> TaggedBuf {
        let mut b = TaggedBuf::tagged(data, Precision::Bf16);
        b.settle();
        b
    }

    /// The elements, as f32 values (exact bf16 values in a bf16 buffer).
    pub fn values(&self) -> &[f32] {
        &self.data
    }

    /// The storage type the buffer stands for.
    pub fn dtype(&self) -> Precision {
        self.dtype
    }

    /// Bytes of the buffer in its storage type: `len · 2` for bf16, `len · 4` for f32.
    pub fn stored_bytes(&self) -> u64 {
        (self.data.len() * self.dtype.act_bytes(std::mem::size_of::<f32>())) as u64
    }

    /// Whether the buffer is a window of the emulated arena's slab (so counts nothing on
    /// the ledger).
    pub fn in_arena(&self) -> bool {
        self.lease.is_some() && self.counted == 0
    }

    /// Rounds every element to the buffer's type (a no-op for f32 buffers; idempotent).
    fn settle(&mut self) {
        self.settle_window(0, usize::MAX);
    }

    /// Rounds the elements `[off, off + len)` (clipped to the buffer) to its type: what an
    /// operation wrote there (a window into a large buffer, such as one batch's rows of a
    /// teacher cache, costs no pass over the rest).
    fn settle_window(&mut self, off: usize, len: usize) {
        if self.dtype == Precision::Bf16 {
            let end = off.saturating_add(len).min(self.data.len());
            let start = off.min(end);
            self.data[start..end]
                .iter_mut()
                .for_each(|x| *x = round_bf16(*x));
        }
    }
}

impl Clone for TaggedBuf {
    /// A buffer of its own with the same values and type (a clone of a scratch window is
    /// not placed in the arena).
    fn clone(&self) -> TaggedBuf {
        TaggedBuf::tagged(self.data.clone(), self.dtype)
    }
}

impl Drop for TaggedBuf {
    fn drop(&mut self) {
        ledger_sub(self.counted);
    }
}

/// The bf16 scheme's CPU reference (see the module documentation). Clones share one
/// emulated arena.
#[derive(Debug, Clone)]
pub struct CpuBf16Backend {
    inner: CpuBackend<f32>,
    arena: Arc<Mutex<ArenaState>>,
    /// The CUDA attention implementation whose memory the ledger counts.
    attention: AttentionKernels,
}

impl Default for CpuBf16Backend {
    fn default() -> Self {
        CpuBf16Backend::emulating(AttentionKernels::Composed)
    }
}

impl CpuBf16Backend {
    /// A new backend (threads from rayon's pool, as [`CpuBackend`]) with an empty arena,
    /// counting the memory of CUDA's default attention (the composition).
    pub fn new() -> Self {
        CpuBf16Backend::default()
    }

    /// [`CpuBf16Backend::new`], counting the memory of the attention implementation
    /// `attention` (the results are the same: only the ledger differs).
    pub fn emulating(attention: AttentionKernels) -> Self {
        CpuBf16Backend {
            inner: CpuBackend::new(),
            arena: Arc::default(),
            attention,
        }
    }

    /// [`CpuBf16Backend::emulating`] the implementation [`ATTENTION_ENV`](super::cuda::ATTENTION_ENV) names, as a CUDA
    /// backend opened now would run; an error naming the variable for a value it does not
    /// take.
    pub fn from_env() -> Result<Self> {
        let attention = AttentionKernels::from_env().map_err(crate::Error::invalid)?;
        Ok(CpuBf16Backend::emulating(attention))
    }

    /// Whether the emulated device runs `s` with the fused kernels (as a bf16 CUDA backend
    /// on a device with tensor cores would).
    fn fused(&self, s: &AttnShape) -> bool {
        self.attention == AttentionKernels::Fused && fused_fits(s, true)
    }

    /// [`Held`] scratch of `elems` f32 elements (none for 0).
    fn held_f32(&self, elems: usize) -> Option<Held> {
        self.held_bytes((elems * std::mem::size_of::<f32>()) as u64)
    }

    /// A step's scratch buffer of `len` elements of `dtype`, `zeroed` or NaN-filled as the
    /// f32 backend's, in the emulated arena. An empty request takes no window, as on CUDA.
    fn scratch_typed(&self, len: usize, dtype: Precision, zeroed: bool) -> Result<TaggedBuf> {
        let data = match zeroed {
            true => self.inner.zeros(len)?,
            false => self.inner.uninit(len)?,
        };
        let bytes = (len * dtype.act_bytes(std::mem::size_of::<f32>())) as u64;
        Ok(match len {
            0 => TaggedBuf::tagged(data, dtype),
            _ => TaggedBuf::scratch(data, dtype, bytes, &self.arena),
        })
    }

    /// [`Held`] scratch of `elems` bf16 elements (none for 0, as on CUDA).
    fn held_bf16(&self, elems: usize) -> Option<Held> {
        self.held_bytes((elems * Precision::Bf16.act_bytes(std::mem::size_of::<f32>())) as u64)
    }

    /// [`Held`] scratch of `bytes` bytes (none for 0).
    fn held_bytes(&self, bytes: u64) -> Option<Held> {
        (bytes > 0).then(|| {
            let (lease, counted) = place(&self.arena, bytes);
            Held {
                _lease: lease,
                counted,
            }
        })
    }

    /// The [`Held`] bf16 copies a device makes of the operands `copies` says are rounded
    /// (see [`matrix_operands`]), of `a_len` and `b_len` elements: the first operand's,
    /// then the second's.
    fn held_operands(
        &self,
        copies: (&Option<Vec<f32>>, &Option<Vec<f32>>),
        a_len: usize,
        b_len: usize,
    ) -> [Option<Held>; 2] {
        let a = copies.0.as_ref().and_then(|_| self.held_bf16(a_len));
        [a, copies.1.as_ref().and_then(|_| self.held_bf16(b_len))]
    }
}

/// The f32 window of a tagged read window.
#[inline]
fn r(x: Ref<TaggedBuf>) -> Ref<Vec<f32>> {
    Ref::at(&x.buf.data, x.off)
}

/// The two operands of a matrix product as one type: when one is bf16 and the other f32,
/// a bf16-rounded copy of the f32 one (a tensor-core product takes both operands in bf16,
/// so a device converts the f32 operand first); two f32 operands stay f32. `None` means
/// the operand is read as it is.
fn matrix_operands(a: &TaggedBuf, b: &TaggedBuf) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    let rounded = |x: &TaggedBuf| Some(x.data.iter().map(|&v| round_bf16(v)).collect());
    match (a.dtype, b.dtype) {
        (Precision::F32, Precision::Bf16) => (rounded(a), None),
        (Precision::Bf16, Precision::F32) => (None, rounded(b)),
        _ => (None, None),
    }
}

/// The read window `x` over `copy` where there is one (see [`matrix_operands`]).
fn operand<'a>(x: Ref<'a, TaggedBuf>, copy: &'a Option<Vec<f32>>) -> Ref<'a, Vec<f32>> {
    Ref::at(copy.as_ref().unwrap_or(&x.buf.data), x.off)
}

/// An operation's written extent that is not worked out: from the window's offset to the
/// end of its buffer.
const REST: usize = usize::MAX;

/// Runs `op` on the f32 window of `y`, then rounds the `extent` elements it may have written
/// from the window's offset on ([`REST`]: to the buffer's end) to `y`'s type.
#[inline]
fn w<T>(y: Mut<TaggedBuf>, extent: usize, op: impl FnOnce(Mut<Vec<f32>>) -> T) -> T {
    let Mut { buf, off } = y;
    let out = op(Mut::at(&mut buf.data, off));
    buf.settle_window(off, extent);
    out
}

/// Runs `op` on the f32 windows of two distinct writable buffers, then rounds both from
/// their offsets to their buffers' ends.
#[inline]
fn w2<T>(
    y: Mut<TaggedBuf>,
    z: Mut<TaggedBuf>,
    op: impl FnOnce(Mut<Vec<f32>>, Mut<Vec<f32>>) -> T,
) -> T {
    let (Mut { buf: yb, off: yo }, Mut { buf: zb, off: zo }) = (y, z);
    let out = op(Mut::at(&mut yb.data, yo), Mut::at(&mut zb.data, zo));
    yb.settle_window(yo, REST);
    zb.settle_window(zo, REST);
    out
}

/// Elements a `rows`-row block of `cols` columns with row stride `ld` spans.
fn block_extent(rows: usize, cols: usize, ld: usize) -> usize {
    match rows {
        0 => 0,
        r => (r - 1) * ld + cols,
    }
}

/// A tagged write window taken apart: its buffer and offset (see [`f32_window`]).
type Parts<'a> = (&'a mut TaggedBuf, usize);

/// `y` taken apart, so that its f32 window can be lent to an operation and the buffer
/// rounded to its type afterwards ([`settle`]).
fn parts(y: Option<Mut<'_, TaggedBuf>>) -> Option<Parts<'_>> {
    y.map(|Mut { buf, off }| (buf, off))
}

/// The f32 window of a taken-apart write window.
fn f32_window<'a>(p: &'a mut Option<Parts<'_>>) -> Option<Mut<'a, Vec<f32>>> {
    p.as_mut().map(|(b, off)| Mut::at(&mut b.data, *off))
}

/// Rounds a taken-apart window's buffer, from its offset on, to its type.
fn settle(p: Option<Parts<'_>>) {
    if let Some((b, off)) = p {
        b.settle_window(off, REST);
    }
}

impl Backend for CpuBf16Backend {
    type F = f32;
    type Buf = TaggedBuf;
    type Ids = Vec<u32>;
    type Graph = std::convert::Infallible;
    type Staging = CpuStaging<f32>;
    type Fence = ();

    fn name(&self) -> String {
        "cpu-bf16".into()
    }

    fn precision(&self) -> Precision {
        Precision::Bf16
    }

    // ---- memory ------------------------------------------------------------------------

    fn zeros(&self, len: usize) -> Result<TaggedBuf> {
        Ok(TaggedBuf::f32(self.inner.zeros(len)?))
    }

    fn uninit(&self, len: usize) -> Result<TaggedBuf> {
        Ok(TaggedBuf::f32(self.inner.uninit(len)?))
    }

    fn scratch(&self, len: usize) -> Result<TaggedBuf> {
        self.scratch_typed(len, Precision::Bf16, false)
    }

    fn scratch_zeros(&self, len: usize) -> Result<TaggedBuf> {
        self.scratch_typed(len, Precision::Bf16, true)
    }

    fn scratch_full(&self, len: usize) -> Result<TaggedBuf> {
        self.scratch_typed(len, Precision::F32, false)
    }

    fn scratch_full_zeros(&self, len: usize) -> Result<TaggedBuf> {
        self.scratch_typed(len, Precision::F32, true)
    }

    fn act_zeros(&self, len: usize) -> Result<TaggedBuf> {
        Ok(TaggedBuf::bf16(self.inner.zeros(len)?))
    }

    /// The emulated arena's slab and misses (see the module documentation).
    fn arena_stats(&self) -> Option<ArenaStats> {
        Some(lock(&self.arena).plan.stats())
    }

    fn upload(&self, host: &[f32]) -> Result<TaggedBuf> {
        Ok(TaggedBuf::f32(host.to_vec()))
    }

    fn upload_ids(&self, host: &[u32]) -> Result<Vec<u32>> {
        Ok(host.to_vec())
    }

    fn download(&self, buf: &TaggedBuf) -> Result<Vec<f32>> {
        Ok(buf.data.clone())
    }

    fn alloc_staging(&self, floats: usize, ids: usize) -> Result<CpuStaging<f32>> {
        self.inner.alloc_staging(floats, ids)
    }

    fn upload_staged(
        &self,
        staging: &CpuStaging<f32>,
        off: usize,
        len: usize,
    ) -> Result<TaggedBuf> {
        Ok(TaggedBuf::f32(self.inner.upload_staged(staging, off, len)?))
    }

    fn upload_staged_ids(
        &self,
        staging: &CpuStaging<f32>,
        off: usize,
        len: usize,
    ) -> Result<Vec<u32>> {
        self.inner.upload_staged_ids(staging, off, len)
    }

    fn upload_fence(&self) -> Result<()> {
        Ok(())
    }

    fn wait_upload(&self, _fence: &()) -> Result<()> {
        Ok(())
    }

    fn len(&self, buf: &TaggedBuf) -> usize {
        buf.data.len()
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn capture(&self, _queue: &mut dyn FnMut() -> Result<()>) -> Result<Option<Self::Graph>> {
        Ok(None)
    }

    fn replay(&self, graph: &Self::Graph) -> Result<()> {
        match *graph {}
    }

    fn write(&self, host: &[f32], dst: Mut<TaggedBuf>) -> Result<()> {
        w(dst, host.len(), |d| self.inner.write(host, d))
    }

    fn copy_ids(&self, len: usize, src: &Vec<u32>, dst: &mut Vec<u32>) {
        self.inner.copy_ids(len, src, dst)
    }

    /// The most bytes the ledger held at once since [`Backend::reset_peak_memory`]: the
    /// process's [`TaggedBuf`]s in their storage types and the emulated arenas' slabs (the
    /// module documentation says why not the host's bytes); shared by every instance in the
    /// process, as a device's pool is.
    fn peak_memory(&self) -> Option<u64> {
        Some(SCHEME_PEAK.load(Relaxed))
    }

    fn reset_peak_memory(&self) {
        SCHEME_PEAK.store(SCHEME_LIVE.load(Relaxed), Relaxed);
    }

    fn fill(&self, len: usize, value: f32, x: Mut<TaggedBuf>) {
        w(x, len, |x| self.inner.fill(len, value, x))
    }

    fn copy(&self, len: usize, src: Ref<TaggedBuf>, dst: Mut<TaggedBuf>) {
        w(dst, len, |d| self.inner.copy(len, r(src), d))
    }

    fn copy_2d(
        &self,
        rows: usize,
        cols: usize,
        src: Ref<TaggedBuf>,
        src_ld: usize,
        dst: Mut<TaggedBuf>,
        dst_ld: usize,
        accumulate: bool,
    ) {
        w(dst, block_extent(rows, cols, dst_ld), |d| {
            self.inner
                .copy_2d(rows, cols, r(src), src_ld, d, dst_ld, accumulate)
        })
    }

    fn axpy(&self, len: usize, alpha: f32, x: Ref<TaggedBuf>, y: Mut<TaggedBuf>) {
        w(y, len, |y| self.inner.axpy(len, alpha, r(x), y))
    }

    // ---- dense -------------------------------------------------------------------------

    fn gemm(
        &self,
        shape: &Gemm,
        alpha: f32,
        a: Ref<TaggedBuf>,
        b: Ref<TaggedBuf>,
        beta: f32,
        c: Mut<TaggedBuf>,
    ) {
        let (ac, bc) = matrix_operands(a.buf, b.buf);
        // A device converts the extents it reads, for a product that reads them.
        let (a_len, b_len) = shape.operand_spans();
        let product = shape.m > 0 && shape.n > 0 && a_len > 0;
        let _held = product.then(|| self.held_operands((&ac, &bc), a_len, b_len));
        let (a, b) = (operand(a, &ac), operand(b, &bc));
        w(c, REST, |c| self.inner.gemm(shape, alpha, a, b, beta, c))
    }

    fn gemm_outer(
        &self,
        s: &Gemm,
        outer: &Outer,
        alpha: f32,
        a: Ref<TaggedBuf>,
        b: Ref<TaggedBuf>,
        beta: f32,
        c: Mut<TaggedBuf>,
    ) {
        let (ac, bc) = matrix_operands(a.buf, b.buf);
        let (a, b) = (operand(a, &ac), operand(b, &bc));
        w(c, REST, |c| {
            self.inner.gemm_outer(s, outer, alpha, a, b, beta, c)
        })
    }

    fn linear_forward(
        &self,
        rows: usize,
        inp: usize,
        out: usize,
        x: Ref<TaggedBuf>,
        wt: Ref<TaggedBuf>,
        b: Ref<TaggedBuf>,
        y: Mut<TaggedBuf>,
        accumulate: bool,
    ) {
        let (xc, wc) = matrix_operands(x.buf, wt.buf);
        let _held = self.held_operands((&xc, &wc), rows * inp, out * inp);
        let (x, wt) = (operand(x, &xc), operand(wt, &wc));
        w(y, rows * out, |y| {
            self.inner
                .linear_forward(rows, inp, out, x, wt, r(b), y, accumulate)
        })
    }

    fn linear_residual(
        &self,
        rows: usize,
        inp: usize,
        out: usize,
        x: Ref<TaggedBuf>,
        wt: Ref<TaggedBuf>,
        b: Ref<TaggedBuf>,
        resid: Ref<TaggedBuf>,
        y: Mut<TaggedBuf>,
    ) {
        let (xc, wc) = matrix_operands(x.buf, wt.buf);
        let _held = self.held_operands((&xc, &wc), rows * inp, out * inp);
        let (x, wt) = (operand(x, &xc), operand(wt, &wc));
        w(y, rows * out, |y| {
            self.inner
                .linear_residual(rows, inp, out, x, wt, r(b), r(resid), y)
        })
    }

    fn add_bias(&self, rows: usize, n: usize, bias: Ref<TaggedBuf>, y: Mut<TaggedBuf>) {
        w(y, rows * n, |y| self.inner.add_bias(rows, n, r(bias), y))
    }

    fn bias_backward(&self, rows: usize, n: usize, dy: Ref<TaggedBuf>, db: Mut<TaggedBuf>) {
        w(db, n, |db| self.inner.bias_backward(rows, n, r(dy), db))
    }

    // ---- element-wise and normalisation ----------------------------------------------

    fn gelu(&self, len: usize, x: Ref<TaggedBuf>, y: Mut<TaggedBuf>) {
        w(y, len, |y| self.inner.gelu(len, r(x), y))
    }

    fn gelu_in_place(&self, len: usize, xy: Mut<TaggedBuf>) {
        w(xy, len, |v| self.inner.gelu_in_place(len, v))
    }

    fn gelu_backward(&self, len: usize, x: Ref<TaggedBuf>, dy: Ref<TaggedBuf>, dx: Mut<TaggedBuf>) {
        w(dx, len, |dx| self.inner.gelu_backward(len, r(x), r(dy), dx))
    }

    /// Rounds `dx` before summing it into `db`, as a kernel that stores `dx` in bf16 and
    /// sums what it stored would: the bias gradient is the column sum of the stored `dx`.
    fn gelu_bias_backward(
        &self,
        rows: usize,
        n: usize,
        x: Ref<TaggedBuf>,
        mut grad: Mut<TaggedBuf>,
        db: Mut<TaggedBuf>,
    ) {
        let len = rows * n;
        w(grad.reborrow(), len, |g| {
            self.inner.gelu_backward_in_place(len, r(x), g)
        });
        self.bias_backward(rows, n, Ref::at(&*grad.buf, grad.off), db);
    }

    fn layernorm(
        &self,
        rows: usize,
        d: usize,
        x: Ref<TaggedBuf>,
        gamma_beta: Ref<TaggedBuf>,
        y: Mut<TaggedBuf>,
        stats: Mut<TaggedBuf>,
    ) {
        w2(y, stats, |y, st| {
            self.inner.layernorm(rows, d, r(x), r(gamma_beta), y, st)
        })
    }

    fn layernorm_backward(
        &self,
        rows: usize,
        d: usize,
        x: Ref<TaggedBuf>,
        gamma_beta: Ref<TaggedBuf>,
        stats: Ref<TaggedBuf>,
        dy: Ref<TaggedBuf>,
        dx: Mut<TaggedBuf>,
        dgamma_beta: Mut<TaggedBuf>,
    ) {
        w2(dx, dgamma_beta, |dx, dg| {
            self.inner
                .layernorm_backward(rows, d, r(x), r(gamma_beta), r(stats), r(dy), dx, dg)
        })
    }

    // ---- embeddings --------------------------------------------------------------------

    fn embedding(
        &self,
        n: usize,
        width: usize,
        tables: &[EmbTable],
        ids: &Vec<u32>,
        params: &TaggedBuf,
        mode: EmbMode,
        out: Mut<TaggedBuf>,
        out_ld: usize,
    ) {
        let extent = block_extent(n, mode.row_width(tables.len(), width), out_ld);
        w(out, extent, |o| {
            self.inner
                .embedding(n, width, tables, ids, &params.data, mode, o, out_ld)
        })
    }

    fn embedding_backward(
        &self,
        n: usize,
        width: usize,
        tables: &[EmbTable],
        ids: &Vec<u32>,
        mode: EmbMode,
        dout: Ref<TaggedBuf>,
        dout_ld: usize,
        grads: &mut TaggedBuf,
        valid: Option<ValidTokens<'_, Vec<u32>>>,
    ) {
        w(Mut::whole(grads), REST, |g| {
            self.inner.embedding_backward(
                n,
                width,
                tables,
                ids,
                mode,
                r(dout),
                dout_ld,
                g.buf,
                valid,
            )
        })
    }

    fn add_positions(
        &self,
        batch: usize,
        max_len: usize,
        d: usize,
        lens: &Vec<u32>,
        pos: Ref<TaggedBuf>,
        x: Mut<TaggedBuf>,
    ) {
        w(x, batch * max_len * d, |x| {
            self.inner.add_positions(batch, max_len, d, lens, r(pos), x)
        })
    }

    fn add_positions_backward(
        &self,
        batch: usize,
        max_len: usize,
        d: usize,
        lens: &Vec<u32>,
        dx: Ref<TaggedBuf>,
        dpos: Mut<TaggedBuf>,
    ) {
        w(dpos, REST, |dp| {
            self.inner
                .add_positions_backward(batch, max_len, d, lens, r(dx), dp)
        })
    }

    // ---- attention and pooling ---------------------------------------------------------

    fn masked_softmax(
        &self,
        batch: usize,
        heads: usize,
        lq: usize,
        lk: usize,
        key_lens: &Vec<u32>,
        first_row: usize,
        scale: f32,
        scores: Mut<TaggedBuf>,
    ) {
        w(scores, REST, |s| {
            self.inner
                .masked_softmax(batch, heads, lq, lk, key_lens, first_row, scale, s)
        })
    }

    fn masked_softmax_backward(
        &self,
        batch: usize,
        heads: usize,
        lq: usize,
        lk: usize,
        key_lens: &Vec<u32>,
        scale: f32,
        probs: Ref<TaggedBuf>,
        dprobs: Ref<TaggedBuf>,
        dscores: Mut<TaggedBuf>,
    ) {
        w(dscores, REST, |ds| {
            self.inner.masked_softmax_backward(
                batch,
                heads,
                lq,
                lk,
                key_lens,
                scale,
                r(probs),
                r(dprobs),
                ds,
            )
        })
    }

    /// The probabilities, in bf16, for the inner composition's backward; under the fused
    /// kernels ([`CpuBf16Backend::emulating`]) the ledger counts them as the fused
    /// forward's row statistics, which is what a device keeps instead.
    fn attention_saved(&self, s: &AttnShape) -> Result<TaggedBuf> {
        let len = self.attention_saved_len(s);
        if !self.fused(s) || len == 0 {
            return self.scratch(len);
        }
        let bytes = (fused_saved_len(s) * std::mem::size_of::<f32>()) as u64;
        let data = self.inner.uninit(len)?;
        Ok(TaggedBuf::scratch(
            data,
            Precision::Bf16,
            bytes,
            &self.arena,
        ))
    }

    /// One operation, as a fused kernel runs it: Q·Kᵀ, the masked softmax and P·V in f32,
    /// the output (and the saved probabilities) rounded once when stored.
    fn attention(
        &self,
        s: &AttnShape,
        lens: &Vec<u32>,
        scale: f32,
        qkv: Ref<TaggedBuf>,
        ctx: Mut<TaggedBuf>,
        saved: Mut<TaggedBuf>,
    ) {
        w2(ctx, saved, |c, sv| {
            self.inner.attention(s, lens, scale, r(qkv), c, sv)
        })
    }

    /// One operation, as [`CpuBf16Backend::attention`]: the inner f32 composition a few
    /// heads at a time, the output rounded once when stored.
    fn attention_infer(
        &self,
        s: &AttnShape,
        lens: &Vec<u32>,
        first_row: usize,
        scale: f32,
        qkv: Ref<TaggedBuf>,
        ctx: Mut<TaggedBuf>,
    ) -> Result<()> {
        // The fused forward's row statistics, or the composition's probabilities for a
        // block of heads and rows at a time.
        let _held = match self.fused(s) {
            true => self.held_f32(fused_saved_len(s)),
            false => self.held_bf16(infer_probs_len(s)),
        };
        w(ctx, REST, |c| {
            self.inner
                .attention_infer(s, lens, first_row, scale, r(qkv), c)
        })
    }

    fn attention_backward(
        &self,
        s: &AttnShape,
        lens: &Vec<u32>,
        scale: f32,
        qkv: Ref<TaggedBuf>,
        saved: Ref<TaggedBuf>,
        dctx: Ref<TaggedBuf>,
        dqkv: Mut<TaggedBuf>,
    ) -> Result<()> {
        // The fused query pass's row sums; or the composition's dP, then dS, dP given back
        // once dS is made.
        let _held = match self.fused(s) {
            true => self.held_f32(s.batch * s.heads * s.len),
            false => {
                let dprobs = self.held_bf16(s.probs_len());
                let dscores = self.held_bf16(s.probs_len());
                drop(dprobs);
                dscores
            }
        };
        w(dqkv, REST, |dq| {
            self.inner
                .attention_backward(s, lens, scale, r(qkv), r(saved), r(dctx), dq)
        })
    }

    fn masked_mean(
        &self,
        batch: usize,
        max_len: usize,
        d: usize,
        lens: &Vec<u32>,
        x: Ref<TaggedBuf>,
        empty: Ref<TaggedBuf>,
        out: Mut<TaggedBuf>,
    ) {
        w(out, REST, |o| {
            self.inner
                .masked_mean(batch, max_len, d, lens, r(x), r(empty), o)
        })
    }

    fn masked_mean_backward(
        &self,
        batch: usize,
        max_len: usize,
        d: usize,
        lens: &Vec<u32>,
        dout: Ref<TaggedBuf>,
        dx: Mut<TaggedBuf>,
        dempty: Mut<TaggedBuf>,
    ) {
        w2(dx, dempty, |dx, de| {
            self.inner
                .masked_mean_backward(batch, max_len, d, lens, r(dout), dx, de)
        })
    }

    fn put_empty_rows(
        &self,
        batch: usize,
        max_len: usize,
        d: usize,
        lens: &Vec<u32>,
        vec: Ref<TaggedBuf>,
        seq: Mut<TaggedBuf>,
    ) {
        w(seq, REST, |s| {
            self.inner
                .put_empty_rows(batch, max_len, d, lens, r(vec), s)
        })
    }

    fn put_empty_rows_backward(
        &self,
        batch: usize,
        max_len: usize,
        d: usize,
        lens: &Vec<u32>,
        dseq: Mut<TaggedBuf>,
        dvec: Mut<TaggedBuf>,
    ) {
        w2(dseq, dvec, |ds, dv| {
            self.inner
                .put_empty_rows_backward(batch, max_len, d, lens, ds, dv)
        })
    }

    // ---- losses ------------------------------------------------------------------------

    fn bce_loss_into(
        &self,
        n: usize,
        logits: Ref<TaggedBuf>,
        labels: Ref<TaggedBuf>,
        weights: Ref<TaggedBuf>,
        coef: f32,
        dlogits: Option<Mut<TaggedBuf>>,
        out: Mut<TaggedBuf>,
    ) -> Result<()> {
        let mut dz = parts(dlogits);
        let res = w(out, REST, |o| {
            self.inner.bce_loss_into(
                n,
                r(logits),
                r(labels),
                r(weights),
                coef,
                f32_window(&mut dz),
                o,
            )
        });
        settle(dz);
        res
    }

    fn bernoulli_kl_loss_into(
        &self,
        n: usize,
        student: Ref<TaggedBuf>,
        target: Ref<TaggedBuf>,
        weights: Option<Ref<TaggedBuf>>,
        tau: f32,
        coef: f32,
        dstudent: Option<Mut<TaggedBuf>>,
        out: Mut<TaggedBuf>,
    ) -> Result<()> {
        let mut ds = parts(dstudent);
        let res = w(out, REST, |o| {
            self.inner.bernoulli_kl_loss_into(
                n,
                r(student),
                r(target),
                weights.map(r),
                tau,
                coef,
                f32_window(&mut ds),
                o,
            )
        });
        settle(ds);
        res
    }

    fn coarse_loss_into(
        &self,
        n: usize,
        d: usize,
        pred: Ref<TaggedBuf>,
        target: Ref<TaggedBuf>,
        weights: Ref<TaggedBuf>,
        cosine: bool,
        coef: f32,
        dpred: Option<Mut<TaggedBuf>>,
        out: Mut<TaggedBuf>,
    ) -> Result<()> {
        let mut dp = parts(dpred);
        let res = w(out, REST, |o| {
            let dp = f32_window(&mut dp);
            self.inner
                .coarse_loss_into(n, d, r(pred), r(target), r(weights), cosine, coef, dp, o)
        });
        settle(dp);
        res
    }

    fn fine_loss_into(
        &self,
        shape: FineShape,
        q: Ref<TaggedBuf>,
        v: Ref<TaggedBuf>,
        t_in: Ref<TaggedBuf>,
        q_lens: &Vec<u32>,
        k_lens: &Vec<u32>,
        weights: Ref<TaggedBuf>,
        coef: f32,
        grads: Option<FineGrads<'_, TaggedBuf>>,
        out: Mut<TaggedBuf>,
    ) -> Result<()> {
        let Some(FineGrads { dq, dv }) = grads else {
            return w(out, REST, |o| {
                self.inner.fine_loss_into(
                    shape,
                    r(q),
                    r(v),
                    r(t_in),
                    q_lens,
                    k_lens,
                    r(weights),
                    coef,
                    None,
                    o,
                )
            });
        };
        let (mut pq, mut pv) = (parts(Some(dq)), parts(Some(dv)));
        let res = w(out, REST, |o| {
            let grads = match (f32_window(&mut pq), f32_window(&mut pv)) {
                (Some(dq), Some(dv)) => Some(FineGrads { dq, dv }),
                _ => None,
            };
            self.inner.fine_loss_into(
                shape,
                r(q),
                r(v),
                r(t_in),
                q_lens,
                k_lens,
                r(weights),
                coef,
                grads,
                o,
            )
        });
        for p in [pq, pv] {
            settle(p);
        }
        res
    }

    // ---- optimizer ---------------------------------------------------------------------

    fn sum_squares_into(&self, len: usize, x: Ref<TaggedBuf>, out: Mut<TaggedBuf>) -> Result<()> {
        w(out, 1, |o| self.inner.sum_squares_into(len, r(x), o))
    }

    fn adamw(
        &self,
        hp: &AdamW,
        params: &mut TaggedBuf,
        grads: &TaggedBuf,
        m: &mut TaggedBuf,
        v: &mut TaggedBuf,
        decay_mask: &TaggedBuf,
    ) {
        for (b, what) in [
            (&*params, "parameters"),
            (grads, "gradients"),
            (&*m, "first moments"),
            (&*v, "second moments"),
        ] {
            assert_eq!(
                b.dtype,
                Precision::F32,
                "adamw: the {what} must be f32 (master weights)"
            );
        }
        self.inner.adamw(
            hp,
            &mut params.data,
            &grads.data,
            &mut m.data,
            &mut v.data,
            &decay_mask.data,
        )
    }
}
