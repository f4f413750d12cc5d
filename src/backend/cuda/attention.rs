//! Host side of the fused attention kernels (`kernels/attention.cu`): whether they run
//! ([`AttentionKernels`]), which shapes they take, their shared memory, what the forward
//! saves, and the launches. Shapes whose tables do not fit a block's shared memory take the
//! composition ([`crate::backend::attention`]) instead; [`CudaBackend`] decides per call
//! with [`CudaBackend::fused_attention`], the same test for the forward, the backward and the
//! size of the saved state.

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::{int, CudaBackend, CudaBuf, TypedPtr};
use crate::backend::{AttnShape, Backend, Mut, Precision, Ref};
use crate::Result;

/// Which implementation [`crate::backend::Backend::attention`] runs on CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernels {
    /// The composition: batched cuBLAS products and the masked softmax kernels (the default
    /// in f32 until a GPU measurement shows the fused kernels faster).
    Composed,
    /// The fused kernels where the shape fits: in a bf16 run on sm_80 or later the
    /// tensor-core ones of `kernels/attention_mma.cu`, otherwise those of
    /// `kernels/attention.cu` ([`fused_plan`]); the composition elsewhere.
    Fused,
}

/// Environment variable choosing [`AttentionKernels`] when a backend is opened: `composed`
/// (the default) or `fused`.
pub const ATTENTION_ENV: &str = "MGKD_CUDA_ATTENTION";

impl AttentionKernels {
    /// The choice named by [`ATTENTION_ENV`] (the default when it is unset); an error naming
    /// the variable for any other value.
    pub fn from_env() -> std::result::Result<AttentionKernels, String> {
        match std::env::var(ATTENTION_ENV) {
            Err(std::env::VarError::NotPresent) => AttentionKernels::named(None),
            Ok(v) => AttentionKernels::named(Some(&v)),
            Err(e) => Err(format!("{ATTENTION_ENV}: {e}")),
        }
    }

    /// The choice a value of [`ATTENTION_ENV`] names (`None`: unset, the default).
    fn named(v: Option<&str>) -> std::result::Result<AttentionKernels, String> {
        match v {
            None | Some("composed") => Ok(AttentionKernels::Composed),
            Some("fused") => Ok(AttentionKernels::Fused),
            Some(v) => Err(format!(
                "{ATTENTION_ENV}={v:?}: expected `composed` or `fused`"
            )),
        }
    }
}

/// Warps per block (`ATTN_WARPS` in attention.cu, `MMA_WARPS` in attention_mma.cu).
const ATTN_WARPS: usize = 4;
/// Dynamic shared memory a block may use without opting in, in bytes (the attention
/// kernels have no static shared memory).
const ATTN_SMEM_BYTES: usize = 48 * 1024;
/// Floats the forward saves per query row: the softmax's max and the reciprocal of its sum.
const SAVED_PER_ROW: usize = 2;
/// Widest head the tensor-core kernels take (`MMA_DH_MAX`); dh must be a multiple of 16.
const MMA_DH_MAX: usize = 64;
/// bf16 elements of padding per shared row of the tensor-core kernels (`MMA_PAD`).
const MMA_PAD: usize = 8;

/// Which fused kernels run one shape, with the dynamic shared memory of their three kernels
/// in bytes (forward, backward query pass, backward key pass). Both save the same row
/// statistics, so the backward takes either forward's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FusedPlan {
    /// `kernels/attention.cu`: CUDA cores, f32 tables in shared memory, f32 or bf16 buffers.
    Cores([usize; 3]),
    /// `kernels/attention_mma.cu`: bf16 tensor cores (sm_80 and later), bf16 buffers only.
    TensorCores([usize; 3]),
}

/// Whether the fused kernels can take shape `s` at all: not empty, heads dividing d, and
/// one block per (row, head) a valid grid.
fn fusable(s: &AttnShape) -> bool {
    s.batch > 0
        && s.len > 0
        && s.heads > 0
        && s.d.is_multiple_of(s.heads)
        && s.dh() > 0
        && i32::try_from(s.batch * s.heads).is_ok()
}

/// Shared memory of the CUDA-core kernels for shape `s` (bytes): two `[len, dh+1]` f32
/// tables and per-warp rows (attention.cu's header); `None` when a block would need more
/// than [`ATTN_SMEM_BYTES`].
pub fn cores_smem(s: &AttnShape) -> Option<[usize; 3]> {
    if !fusable(s) {
        return None;
    }
    let (l, dh, w) = (s.len, s.dh(), ATTN_WARPS);
    let tables = 2 * l * (dh + 1);
    let floats = [
        tables + w * (dh + l),
        tables + w * (2 * dh + 2 * l),
        tables + w * (2 * dh + 2 * l) + 3 * l,
    ];
    let bytes = floats.map(|f| f * std::mem::size_of::<f32>());
    (bytes[2] <= ATTN_SMEM_BYTES).then_some(bytes)
}

/// Shared memory of the tensor-core kernels for shape `s` (bytes): two `[lenp, dh + 8]`
/// bf16 tables (lenp = len rounded up to 16), and in the key pass three f32 rows of lenp;
/// `None` unless dh is a multiple of 16 up to [`MMA_DH_MAX`] and a block fits in
/// [`ATTN_SMEM_BYTES`].
pub fn mma_smem(s: &AttnShape) -> Option<[usize; 3]> {
    if !fusable(s) || !s.dh().is_multiple_of(16) || s.dh() > MMA_DH_MAX {
        return None;
    }
    let lenp = s.len.next_multiple_of(16);
    let tables = 2 * lenp * (s.dh() + MMA_PAD) * std::mem::size_of::<half::bf16>();
    let key = tables + 3 * lenp * std::mem::size_of::<f32>();
    (key <= ATTN_SMEM_BYTES).then_some([tables, tables, key])
}

/// The fused kernels for shape `s`: the tensor-core ones where `tensor_cores` (a bf16 run on
/// sm_80 or later) and they take the shape, else the CUDA-core ones where they fit; `None`
/// when neither does (the composition runs).
pub(super) fn fused_plan(s: &AttnShape, tensor_cores: bool) -> Option<FusedPlan> {
    tensor_cores
        .then(|| mma_smem(s).map(FusedPlan::TensorCores))
        .flatten()
        .or_else(|| cores_smem(s).map(FusedPlan::Cores))
}

/// Whether the fused kernels run shape `s` when chosen, on a device that has the
/// tensor-core ones when `tensor_cores` ([`fused_plan`]).
pub fn fused_fits(s: &AttnShape, tensor_cores: bool) -> bool {
    fused_plan(s, tensor_cores).is_some()
}

/// Elements of the fused forward's saved state, `[batch, heads, len, 2]`.
pub fn fused_saved_len(s: &AttnShape) -> usize {
    s.batch * s.heads * s.len * SAVED_PER_ROW
}

/// One block per (batch row, head), with `bytes` of dynamic shared memory.
fn cfg(s: &AttnShape, bytes: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (int(s.batch * s.heads, "batch·heads") as u32, 1, 1),
        block_dim: (32 * ATTN_WARPS as u32, 1, 1),
        shared_mem_bytes: bytes as u32,
    }
}

impl CudaBackend {
    /// Which attention implementation this backend runs.
    pub fn attention_kernels(&self) -> AttentionKernels {
        self.attention
    }

    /// Chooses the attention implementation (for what follows: buffers saved by one
    /// implementation's forward go to the same implementation's backward).
    pub fn set_attention_kernels(&mut self, k: AttentionKernels) {
        self.attention = k;
    }

    /// The fused kernels that run for `s`, when they run: chosen, and the shape fits
    /// ([`fused_plan`]; tensor cores in a bf16 run on sm_80 or later).
    pub(super) fn fused_attention(&self, s: &AttnShape) -> Option<FusedPlan> {
        let tensor_cores = self.precision == Precision::Bf16 && self.info.compute_capability.0 >= 8;
        match self.attention {
            AttentionKernels::Fused => fused_plan(s, tensor_cores),
            AttentionKernels::Composed => None,
        }
    }

    /// [`Backend::attention`] in one kernel, the one `plan` names; the rows' key lengths
    /// are `lens.0[lens.1 ..]`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_fused(
        &self,
        s: &AttnShape,
        plan: FusedPlan,
        (lens, first_row): (&CudaSlice<u32>, usize),
        scale: f32,
        qkv: Ref<CudaBuf>,
        ctx: Mut<CudaBuf>,
        saved: Mut<CudaBuf>,
    ) {
        let tokens = s.batch * s.len;
        let lp = self
            .ip(lens, first_row + s.batch, "attention lens")
            .offset(first_row);
        let qp = self.rt(qkv, tokens * 3 * s.d, "attention qkv");
        let cp = self.mt(ctx, tokens * s.d, "attention ctx");
        let sp = self.mp(saved, fused_saved_len(s), "attention saved");
        let err = self.base(&self.lock_state().err_flag);
        let (heads, len, dh) = (int(s.heads, "heads"), int(s.len, "len"), int(s.dh(), "dh"));
        let k = self.k();
        match (plan, qp, cp) {
            (FusedPlan::Cores(m), TypedPtr::F32(q), TypedPtr::F32(o)) => {
                k.attn_forward_f32(cfg(s, m[0]), heads, len, dh, lp, scale, q, o, sp, err)
            }
            (FusedPlan::Cores(m), TypedPtr::Bf16(q), TypedPtr::Bf16(o)) => {
                k.attn_forward_bf16(cfg(s, m[0]), heads, len, dh, lp, scale, q, o, sp, err)
            }
            (FusedPlan::TensorCores(m), TypedPtr::Bf16(q), TypedPtr::Bf16(o)) => {
                k.attn_mma_forward_bf16(cfg(s, m[0]), heads, len, dh, lp, scale, q, o, sp, err)
            }
            (_, q, o) => self.no_instance("attention", &[q, o]),
        }
    }

    /// [`Backend::attention_backward`] in the two kernels of `plan`: the query pass (dQ, and
    /// each query row's `D = Σ_j p·dp` into an arena scratch), then the key pass (dK, dV).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_backward_fused(
        &self,
        s: &AttnShape,
        plan: FusedPlan,
        lens: &CudaSlice<u32>,
        scale: f32,
        qkv: Ref<CudaBuf>,
        saved: Ref<CudaBuf>,
        dctx: Ref<CudaBuf>,
        dqkv: Mut<CudaBuf>,
    ) -> Result<()> {
        let tokens = s.batch * s.len;
        let dsum = self.scratch_full(s.batch * s.heads * s.len)?;
        let ds = dsum.ptr();
        let lp = self.ip(lens, s.batch, "attention_backward lens");
        let qp = self.rt(qkv, tokens * 3 * s.d, "attention_backward qkv");
        let sp = self.rp(saved, fused_saved_len(s), "attention_backward saved");
        let gp = self.rt(dctx, tokens * s.d, "attention_backward dctx");
        let dp = self.mt(dqkv, tokens * 3 * s.d, "attention_backward dqkv");
        let err = self.base(&self.lock_state().err_flag);
        let (heads, len, dh) = (int(s.heads, "heads"), int(s.len, "len"), int(s.dh(), "dh"));
        let k = self.k();
        match (plan, qp, gp, dp) {
            (FusedPlan::Cores(m), TypedPtr::F32(q), TypedPtr::F32(g), TypedPtr::F32(d)) => {
                let (cq, ckv) = (cfg(s, m[1]), cfg(s, m[2]));
                k.attn_backward_q_f32(cq, heads, len, dh, lp, scale, q, sp, g, d, ds, err);
                k.attn_backward_kv_f32(ckv, heads, len, dh, lp, scale, q, sp, g, ds, d, err);
            }
            (FusedPlan::Cores(m), TypedPtr::Bf16(q), TypedPtr::Bf16(g), TypedPtr::Bf16(d)) => {
                let (cq, ckv) = (cfg(s, m[1]), cfg(s, m[2]));
                k.attn_backward_q_bf16(cq, heads, len, dh, lp, scale, q, sp, g, d, ds, err);
                k.attn_backward_kv_bf16(ckv, heads, len, dh, lp, scale, q, sp, g, ds, d, err);
            }
            (
                FusedPlan::TensorCores(m),
                TypedPtr::Bf16(q),
                TypedPtr::Bf16(g),
                TypedPtr::Bf16(d),
            ) => {
                let (cq, ckv) = (cfg(s, m[1]), cfg(s, m[2]));
                k.attn_mma_backward_q_bf16(cq, heads, len, dh, lp, scale, q, sp, g, d, ds, err);
                k.attn_mma_backward_kv_bf16(ckv, heads, len, dh, lp, scale, q, sp, g, ds, d, err);
            }
            (_, q, g, d) => self.no_instance("attention_backward", &[q, g, d]),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_names_the_implementation_or_is_refused() {
        assert_eq!(
            AttentionKernels::named(None),
            Ok(AttentionKernels::Composed)
        );
        assert_eq!(
            AttentionKernels::named(Some("composed")),
            Ok(AttentionKernels::Composed)
        );
        assert_eq!(
            AttentionKernels::named(Some("fused")),
            Ok(AttentionKernels::Fused)
        );
        let e = AttentionKernels::named(Some("Fused")).unwrap_err();
        assert!(e.contains(ATTENTION_ENV) && e.contains("\"Fused\""), "{e}");
    }

    fn shape(len: usize, heads: usize, d: usize) -> AttnShape {
        AttnShape {
            batch: 1024,
            len,
            heads,
            d,
        }
    }

    #[test]
    fn the_section_8_shapes_fit_the_cuda_core_kernels_and_a_long_one_does_not() {
        let s = shape;
        assert!(cores_smem(&s(128, 4, 128)).is_some(), "teacher");
        assert!(cores_smem(&s(32, 4, 128)).is_some(), "student");
        // 2·157·33 + 3·157 + 4·(64 + 314) floats exceed 48 KiB.
        assert!(cores_smem(&s(156, 4, 128)).is_some());
        assert!(cores_smem(&s(157, 4, 128)).is_none());
        assert!(cores_smem(&s(32, 3, 128)).is_none(), "heads must divide d");
        let floats = cores_smem(&s(128, 4, 128)).unwrap().map(|b| b / 4);
        assert_eq!(
            floats,
            [8448 + 4 * 160, 8448 + 4 * 320, 8448 + 4 * 320 + 384]
        );
    }

    #[test]
    fn the_tensor_core_kernels_take_heads_of_16_to_64_columns_within_48_kib() {
        let s = shape;
        // §8: 2 tables of 128 rows of 32 + 8 bf16; the key pass adds 3·128 floats.
        assert_eq!(
            mma_smem(&s(128, 4, 128)),
            Some([20480, 20480, 20480 + 1536])
        );
        // len rounds up to 16 rows.
        assert_eq!(mma_smem(&s(19, 4, 128)), Some([5120, 5120, 5120 + 384]));
        assert!(mma_smem(&s(32, 4, 64)).is_some(), "dh 16");
        assert!(mma_smem(&s(32, 2, 128)).is_some(), "dh 64");
        assert!(mma_smem(&s(32, 8, 64)).is_none(), "dh 8");
        assert!(mma_smem(&s(32, 4, 96)).is_none(), "dh 24");
        assert!(mma_smem(&s(32, 1, 128)).is_none(), "dh 128");
        // 2·lenp·40·2 + 12·lenp ≤ 49152 up to lenp = 285: len 272 fits, 288 does not.
        assert!(mma_smem(&s(272, 4, 128)).is_some());
        assert!(mma_smem(&s(273, 4, 128)).is_none());
    }

    #[test]
    fn a_bf16_run_on_tensor_cores_takes_them_and_falls_back_to_cuda_cores() {
        let s = shape;
        let tc = |s: AttnShape| fused_plan(&s, true);
        assert!(matches!(
            tc(s(128, 4, 128)),
            Some(FusedPlan::TensorCores(_))
        ));
        assert!(matches!(
            fused_plan(&s(128, 4, 128), false),
            Some(FusedPlan::Cores(_))
        ));
        // dh 8: not a tensor-core shape, a CUDA-core one.
        assert!(matches!(tc(s(11, 3, 24)), Some(FusedPlan::Cores(_))));
        // Too long for the CUDA-core tables, not for the bf16 ones.
        assert!(matches!(
            tc(s(200, 4, 128)),
            Some(FusedPlan::TensorCores(_))
        ));
        assert_eq!(fused_plan(&s(200, 4, 128), false), None);
        assert_eq!(tc(s(400, 4, 128)), None);
    }
}
