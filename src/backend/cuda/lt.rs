//! The linear map `y = x·Wᵀ + b` (or `y += x·Wᵀ + b`) as one cuBLASLt call, the bias added
//! in the product's epilogue (CUBLASLT_EPILOGUE_BIAS) instead of a separate pass over `y`.
//! f32 compute (no TF32, like the cuBLAS products) on f32 operands, or on bf16 operands
//! (tensor cores, f32 accumulation) into an f32 or bf16 output, the bias in the output's
//! type; a reduction scheme without atomics, so results repeat bit for bit. A plan
//! (descriptors, layouts and the heuristic's algorithm) is made once per shape and types and
//! kept.

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::Mutex;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;

use crate::backend::Precision;

/// Shape, types and pointer alignment of one linear map: (rows, in, out, accumulate, operand
/// type, output type, bytes every address is a multiple of, at most 256).
type Shape = (usize, usize, usize, bool, Precision, Precision, u32);

/// The largest power of two up to 256 that divides every address of `addrs`: the alignment
/// cuBLASLt's heuristic is told, so that it only offers algorithms that can load from them
/// (its default assumes 256).
fn alignment(addrs: &[u64]) -> u32 {
    let any = addrs.iter().fold(256u64, |acc, a| acc | a);
    1u32 << any.trailing_zeros().min(8)
}

/// cuBLASLt's data type of elements of `dtype`.
fn data_type(dtype: Precision) -> sys::cudaDataType_t {
    match dtype {
        Precision::F32 => sys::cudaDataType_t::CUDA_R_32F,
        Precision::Bf16 => sys::cudaDataType_t::CUDA_R_16BF,
    }
}

/// Descriptors and algorithm of one shape.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

/// A cuBLASLt handle and its plans.
pub struct LtLinear {
    handle: sys::cublasLtHandle_t,
    plans: Mutex<HashMap<Shape, Plan>>,
    workspace: u64,
    workspace_bytes: usize,
}

// SAFETY: the handle and the plans' descriptors are only used under the `plans` lock or
// through calls that cuBLASLt documents as thread-safe for a handle used on one stream.
unsafe impl Send for LtLinear {}
// SAFETY: as above.
unsafe impl Sync for LtLinear {}

fn lt_err(what: &str, e: impl std::fmt::Debug) -> String {
    format!("cuBLASLt {what}: {e:?}")
}

impl LtLinear {
    /// A handle using `workspace_bytes` of device memory at `workspace` (shared with the
    /// other products of the same stream, which run one after the other).
    pub fn new(workspace: u64, workspace_bytes: usize) -> Result<LtLinear, String> {
        let handle = lt::create_handle().map_err(|e| lt_err("handle", e))?;
        Ok(LtLinear {
            handle,
            plans: Mutex::new(HashMap::new()),
            workspace,
            workspace_bytes,
        })
    }

    fn plan(&self, shape: Shape) -> Result<Plan, String> {
        let (rows, inp, out, _, operands, output, align) = shape;
        let f32_t = sys::cudaDataType_t::CUDA_R_32F;
        let (ab_t, cd_t) = (data_type(operands), data_type(output));
        let compute = sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let desc = lt::create_matmul_desc(compute, f32_t).map_err(|e| lt_err("desc", e))?;
        let set = |attr, v: *const c_void, n: usize| {
            // SAFETY: a live descriptor; `v` points at `n` bytes of the attribute's type.
            unsafe { lt::set_matmul_desc_attribute(desc, attr, v, n) }
                .map_err(|e| lt_err("desc attribute", e))
        };
        type A = sys::cublasLtMatmulDescAttributes_t;
        // Column-major: Yᵀ (out×rows) = op(W)·Xᵀ with W stored inp×out (ld inp), op = T.
        let (t, n) = (1i32, 0i32);
        set(
            A::CUBLASLT_MATMUL_DESC_TRANSA,
            (&t as *const i32).cast(),
            size_of::<i32>(),
        )?;
        set(
            A::CUBLASLT_MATMUL_DESC_TRANSB,
            (&n as *const i32).cast(),
            size_of::<i32>(),
        )?;
        let epi = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
        let epi_p = (&epi as *const sys::cublasLtEpilogue_t).cast();
        set(
            A::CUBLASLT_MATMUL_DESC_EPILOGUE,
            epi_p,
            size_of::<sys::cublasLtEpilogue_t>(),
        )?;
        // The bias is in the output's type (cuBLASLt's default).
        let bias_t = cd_t;
        set(
            A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
            (&bias_t as *const sys::cudaDataType_t).cast(),
            size_of::<sys::cudaDataType_t>(),
        )?;
        let layout = |t, r: usize, c: usize, ld: usize| {
            lt::create_matrix_layout(t, r as u64, c as u64, ld as i64)
                .map_err(|e| lt_err("layout", e))
        };
        let a = layout(ab_t, inp, out, inp)?;
        let b = layout(ab_t, inp, rows, inp)?;
        let c = layout(cd_t, out, rows, out)?;
        let pref = lt::create_matmul_pref().map_err(|e| lt_err("preference", e))?;
        type P = sys::cublasLtMatmulPreferenceAttributes_t;
        let ws = self.workspace_bytes as u64;
        // No in-place (atomic) split-K reduction: the sum order must not depend on timing.
        // A bf16 output reduces its split-K partial sums in the compute type (f32), so that
        // the product is rounded once, as the CPU reference rounds it.
        type R = sys::cublasLtReductionScheme_t;
        let schemes = match output {
            Precision::F32 => {
                R::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE as u32
                    | R::CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE as u32
            }
            Precision::Bf16 => R::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE as u32,
        };
        let picked = (|| {
            // SAFETY: a live preference; the attributes are a u64 and a u32.
            unsafe {
                let ws_p = (&ws as *const u64).cast();
                lt::set_matmul_pref_attribute(
                    pref,
                    P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    ws_p,
                    8,
                )
                .map_err(|e| lt_err("preference attribute", e))?;
                let sc_p = (&schemes as *const u32).cast();
                lt::set_matmul_pref_attribute(
                    pref,
                    P::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                    sc_p,
                    4,
                )
                .map_err(|e| lt_err("preference attribute", e))?;
                let al_p = (&align as *const u32).cast();
                for attr in [
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                ] {
                    lt::set_matmul_pref_attribute(pref, attr, al_p, 4)
                        .map_err(|e| lt_err("preference attribute", e))?;
                }
                lt::get_matmul_algo_heuristic(self.handle, desc, a, b, c, c, pref)
                    .map_err(|e| lt_err("algorithm search", e))
            }
        })();
        // SAFETY: created above and no longer needed.
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
        let heuristic = picked?;
        Ok(Plan {
            desc,
            a,
            b,
            c,
            algo: heuristic.algo,
        })
    }

    /// Queues `y = x·Wᵀ + b`, or with a residual `y = r + x·Wᵀ + b` (`r` may be `y` itself),
    /// on `stream`: `x` is `rows×inp`, `w` is `out×inp`, `b` is `out`, `r` and `y` are
    /// `rows×out`, all packed row-major device addresses checked by the caller; `x` and `w`
    /// hold elements of `operands`, `b`, `r` and `y` of `output` (f32 operands need an f32
    /// output).
    ///
    /// # Safety
    /// The addresses must hold those extents and types in the context current on this
    /// thread.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn forward(
        &self,
        stream: sys::cudaStream_t,
        rows: usize,
        inp: usize,
        out: usize,
        x: u64,
        w: u64,
        b: u64,
        residual: Option<u64>,
        y: u64,
        (operands, output): (Precision, Precision),
    ) -> Result<(), String> {
        let accumulate = residual.is_some();
        // f32 plans keep the heuristic's default (256), as measured on the GPU; bf16 plans
        // are told the addresses' alignment.
        let align = match operands {
            Precision::F32 => 256,
            Precision::Bf16 => alignment(&[x, w, b, residual.unwrap_or(y), y]),
        };
        let key = (rows, inp, out, accumulate, operands, output, align);
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        let p = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.plan(key)?),
        };
        let attr = sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER;
        lt::set_matmul_desc_attribute(p.desc, attr, (&b as *const u64).cast(), size_of::<u64>())
            .map_err(|e| lt_err("bias pointer", e))?;
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        lt::matmul(
            self.handle,
            p.desc,
            (&alpha as *const f32).cast(),
            (&beta as *const f32).cast(),
            w as *const c_void,
            p.a,
            x as *const c_void,
            p.b,
            residual.unwrap_or(y) as *const c_void,
            p.c,
            y as *mut c_void,
            p.c,
            &p.algo,
            self.workspace as *mut c_void,
            self.workspace_bytes,
            stream as _,
        )
        .map_err(|e| lt_err("matmul", e))
    }
}

impl Drop for LtLinear {
    fn drop(&mut self) {
        let plans = self.plans.get_mut().unwrap_or_else(|p| p.into_inner());
        for (_, p) in plans.drain() {
            // SAFETY: every descriptor was created by this object and is used nowhere else.
            unsafe {
                let _ = lt::destroy_matrix_layout(p.a);
                let _ = lt::destroy_matrix_layout(p.b);
                let _ = lt::destroy_matrix_layout(p.c);
                let _ = lt::destroy_matmul_desc(p.desc);
            }
        }
        // SAFETY: the handle was created by this object.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

#[cfg(test)]
mod tests {
    use super::alignment;

    #[test]
    fn the_alignment_is_the_largest_power_of_two_dividing_every_address() {
        assert_eq!(alignment(&[0, 512, 1024]), 256);
        assert_eq!(alignment(&[256, 4096 + 16]), 16);
        assert_eq!(alignment(&[4096, 4096 + 6]), 2);
        assert_eq!(alignment(&[8, 4096 + 4]), 4);
    }
}
