//! Host side of the fused attention kernels (`kernels/attention.cu`): whether they run
//! ([`AttentionKernels`]), which shapes they take, their shared memory, what the forward
//! saves, and the launches. Shapes whose tables do not fit a block's shared memory take the
//! composition ([`crate::backend::attention`]) instead; [`CudaBackend`] decides per call
//! with [`CudaBackend::fused_attention`], the same test for the forward, the backward and the
//! size of the saved state.

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::{int, CudaBackend, CudaBuf, TypedPtr};
use crate::backend::{AttnShape, Backend, Mut, Ref};
use crate::Result;

/// Which implementation [`crate::backend::Backend::attention`] runs on CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernels {
    /// The composition: batched cuBLAS products and the masked softmax kernels (the default
    /// in f32 until a GPU measurement shows the fused kernels faster).
    Composed,
    /// The fused kernels of `kernels/attention.cu`, where the shape fits ([`fused_smem`]);
    /// the composition elsewhere.
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

/// Warps per block (`ATTN_WARPS` in attention.cu).
const ATTN_WARPS: usize = 4;
/// Dynamic shared memory a block may use without opting in, in floats (48 KiB; the
/// attention kernels have no static shared memory).
const ATTN_SMEM_FLOATS: usize = 48 * 1024 / 4;
/// Floats the forward saves per query row: the softmax's max and the reciprocal of its sum.
const SAVED_PER_ROW: usize = 2;

/// Shared memory of one block of the forward, the backward's query pass and its key pass
/// (in floats) for shape `s`; `None` when the shape is empty, its heads do not divide d, or
/// a block would need more than [`ATTN_SMEM_FLOATS`] (the composition runs then).
pub(super) fn fused_smem(s: &AttnShape) -> Option<[usize; 3]> {
    if s.batch == 0 || s.len == 0 || s.heads == 0 || !s.d.is_multiple_of(s.heads) || s.dh() == 0 {
        return None;
    }
    let (l, dh, w) = (s.len, s.dh(), ATTN_WARPS);
    let tables = 2 * l * (dh + 1);
    let forward = tables + w * (dh + l);
    let query = tables + w * (2 * dh + 2 * l);
    let key = query + 3 * l;
    let blocks_ok = i32::try_from(s.batch * s.heads).is_ok();
    (key <= ATTN_SMEM_FLOATS && blocks_ok).then_some([forward, query, key])
}

/// Elements of the fused forward's saved state, `[batch, heads, len, 2]`.
pub(super) fn fused_saved_len(s: &AttnShape) -> usize {
    s.batch * s.heads * s.len * SAVED_PER_ROW
}

/// One block per (batch row, head), with `floats` of dynamic shared memory.
fn cfg(s: &AttnShape, floats: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (int(s.batch * s.heads, "batch·heads") as u32, 1, 1),
        block_dim: (32 * ATTN_WARPS as u32, 1, 1),
        shared_mem_bytes: (floats * std::mem::size_of::<f32>()) as u32,
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

    /// The fused kernels' shared memory for `s` when they run for it: chosen, and the shape
    /// fits ([`fused_smem`]).
    pub(super) fn fused_attention(&self, s: &AttnShape) -> Option<[usize; 3]> {
        match self.attention {
            AttentionKernels::Fused => fused_smem(s),
            AttentionKernels::Composed => None,
        }
    }

    /// [`Backend::attention`] in one kernel (`smem` from [`fused_smem`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_fused(
        &self,
        s: &AttnShape,
        smem: [usize; 3],
        lens: &CudaSlice<u32>,
        scale: f32,
        qkv: Ref<CudaBuf>,
        ctx: Mut<CudaBuf>,
        saved: Mut<CudaBuf>,
    ) {
        let tokens = s.batch * s.len;
        let lp = self.ip(lens, s.batch, "attention lens");
        let qp = self.rt(qkv, tokens * 3 * s.d, "attention qkv");
        let cp = self.mt(ctx, tokens * s.d, "attention ctx");
        let sp = self.mp(saved, fused_saved_len(s), "attention saved");
        let err = self.base(&self.lock_state().err_flag);
        let c = cfg(s, smem[0]);
        let (heads, len, dh) = (int(s.heads, "heads"), int(s.len, "len"), int(s.dh(), "dh"));
        match (qp, cp) {
            (TypedPtr::F32(q), TypedPtr::F32(o)) => self
                .k()
                .attn_forward_f32(c, heads, len, dh, lp, scale, q, o, sp, err),
            (TypedPtr::Bf16(q), TypedPtr::Bf16(o)) => self
                .k()
                .attn_forward_bf16(c, heads, len, dh, lp, scale, q, o, sp, err),
            (q, o) => self.no_instance("attention", &[q, o]),
        }
    }

    /// [`Backend::attention_backward`] in two kernels: the query pass (dQ, and each query
    /// row's `D = Σ_j p·dp` into an arena scratch), then the key pass (dK, dV).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_backward_fused(
        &self,
        s: &AttnShape,
        smem: [usize; 3],
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
        let (cq, ckv) = (cfg(s, smem[1]), cfg(s, smem[2]));
        match (qp, gp, dp) {
            (TypedPtr::F32(q), TypedPtr::F32(g), TypedPtr::F32(d)) => {
                let k = self.k();
                k.attn_backward_q_f32(cq, heads, len, dh, lp, scale, q, sp, g, d, ds, err);
                k.attn_backward_kv_f32(ckv, heads, len, dh, lp, scale, q, sp, g, ds, d, err);
            }
            (TypedPtr::Bf16(q), TypedPtr::Bf16(g), TypedPtr::Bf16(d)) => {
                let k = self.k();
                k.attn_backward_q_bf16(cq, heads, len, dh, lp, scale, q, sp, g, d, ds, err);
                k.attn_backward_kv_bf16(ckv, heads, len, dh, lp, scale, q, sp, g, ds, d, err);
            }
            (q, g, d) => self.no_instance("attention_backward", &[q, g, d]),
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

    #[test]
    fn the_section_8_shapes_fit_and_a_long_one_does_not() {
        let s = |len, heads, d| AttnShape {
            batch: 1024,
            len,
            heads,
            d,
        };
        assert!(fused_smem(&s(128, 4, 128)).is_some(), "teacher");
        assert!(fused_smem(&s(32, 4, 128)).is_some(), "student");
        // 2·157·33 + 3·157 + 4·(64 + 314) floats exceed 48 KiB.
        assert!(fused_smem(&s(156, 4, 128)).is_some());
        assert!(fused_smem(&s(157, 4, 128)).is_none());
        assert!(fused_smem(&s(32, 3, 128)).is_none(), "heads must divide d");
        let [f, q, k] = fused_smem(&s(128, 4, 128)).unwrap();
        assert_eq!(
            (f, q, k),
            (8448 + 4 * 160, 8448 + 4 * 320, 8448 + 4 * 320 + 384)
        );
    }
}
