//! Typed kernel launches from one table: every kernel the backend launches is declared once
//! below (its file in `kernels/`, its name, its parameters with their Rust types), which
//! gives [`KERNELS`] (what [`CudaBackend::new`] loads and `tests/kernels_compile.rs`
//! compiles) and one typed launcher per kernel ([`Kernels`], reached by `CudaBackend::k`).
//! A launch with an argument of the wrong type or in the wrong place does not compile; the
//! table is checked against the kernels' C parameter lists by this module's tests (without a
//! GPU). Device addresses are [`DevPtr`]s typed by their element, so an offset is scaled by
//! the element's own size.

use std::marker::PhantomData;

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

use half::bf16;

use super::embedding::EmbFields;
use super::CudaBackend;

/// A device address of elements of type `T` (passed to a kernel as a `T*`).
#[repr(transparent)]
pub struct DevPtr<T> {
    addr: u64,
    _elem: PhantomData<T>,
}

impl<T> Clone for DevPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DevPtr<T> {}

impl<T> std::fmt::Debug for DevPtr<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevPtr({:#x})", self.addr)
    }
}

// SAFETY: a transparent wrapper of a u64, which is how a kernel receives a pointer.
unsafe impl<T> DeviceRepr for DevPtr<T> {}

impl<T> DevPtr<T> {
    /// The address `addr`, holding elements of type `T`.
    pub fn new(addr: u64) -> DevPtr<T> {
        DevPtr {
            addr,
            _elem: PhantomData,
        }
    }

    /// The null address: what a kernel takes for an absent optional buffer.
    pub fn null() -> DevPtr<T> {
        DevPtr::new(0)
    }

    /// The address `elems` elements further on.
    pub fn offset(self, elems: usize) -> DevPtr<T> {
        DevPtr::new(self.addr + (elems * std::mem::size_of::<T>()) as u64)
    }

    /// The raw address (for a library call, or as a number a kernel computes with).
    pub fn addr(self) -> u64 {
        self.addr
    }

    /// The address as a pointer to read through (a library call's argument).
    pub fn as_ptr(self) -> *const T {
        self.addr as *const T
    }

    /// The address as a pointer to write through (a library call's argument).
    pub fn as_mut_ptr(self) -> *mut T {
        self.addr as *mut T
    }
}

/// The C type a kernel parameter has for each Rust argument type (`const`, `__restrict__`
/// and names aside).
pub trait CType {
    /// The C type, spaces removed.
    const C: &'static str;
}

macro_rules! c_types {
    ($($t:ty => $c:literal),* $(,)?) => {
        $(impl CType for $t {
            const C: &'static str = $c;
        })*
    };
}

c_types! {
    i32 => "int",
    i64 => "i64",
    u32 => "u32",
    u64 => "unsignedlonglong",
    f32 => "float",
    f64 => "double",
    DevPtr<f32> => "float*",
    DevPtr<bf16> => "bf16*",
    DevPtr<f64> => "double*",
    DevPtr<u32> => "u32*",
    DevPtr<u64> => "unsignedlonglong*",
    EmbFields => "EmbFields",
}

/// One kernel of the table: its file in `kernels/`, its name and its parameters' C types.
#[derive(Debug, Clone, Copy)]
pub struct KernelDecl {
    /// File in `kernels/`.
    pub file: &'static str,
    /// Kernel name (`extern "C"`).
    pub name: &'static str,
    /// C types of the parameters, in order (see [`CType`]).
    pub params: &'static [&'static str],
}

/// The typed launchers of one backend (see the module documentation).
pub(super) struct Kernels<'a>(pub(super) &'a CudaBackend);

macro_rules! kernel_table {
    ($($file:literal { $(fn $name:ident($($arg:ident: $ty:ty),* $(,)?);)* })*) => {
        /// Every kernel the backend launches, with its file and parameter types.
        pub const KERNELS: &[KernelDecl] = &[$($(KernelDecl {
            file: $file,
            name: stringify!($name),
            params: &[$(<$ty as CType>::C),*],
        },)*)*];

        impl Kernels<'_> {
            $($(
                #[doc = concat!("Queues `", stringify!($name), "` (kernels/", $file, ") with `cfg`.")]
                #[allow(clippy::too_many_arguments)]
                pub(super) fn $name(&self, cfg: LaunchConfig, $($arg: $ty),*) {
                    let be = self.0;
                    let mut launch = be.stream.launch_builder(be.kernel(stringify!($name)));
                    $(launch.arg(&$arg);)*
                    // SAFETY: the argument types are the kernel's parameter types (the table
                    // is checked against kernels/*.cu), and every address was bounds-checked
                    // against its buffer by the caller.
                    let r = unsafe { launch.launch(cfg) };
                    be.count_launches(1);
                    be.note(r.map(|_| ()), stringify!($name));
                }
            )*)*
        }
    };
}

kernel_table! {
    "copy.cu" {
        fn fill_f32(x: DevPtr<f32>, n: i64, v: f32);
        fn fill_bf16(x: DevPtr<bf16>, n: i64, v: f32);
        fn copy_2d_f32(rows: i32, cols: i32, src: DevPtr<f32>, src_ld: i64, dst: DevPtr<f32>, dst_ld: i64, accumulate: i32);
        fn copy_2d_bf16(rows: i32, cols: i32, src: DevPtr<bf16>, src_ld: i64, dst: DevPtr<bf16>, dst_ld: i64, accumulate: i32);
        fn copy_2d_f32_bf16(rows: i32, cols: i32, src: DevPtr<f32>, src_ld: i64, dst: DevPtr<bf16>, dst_ld: i64, accumulate: i32);
        fn convert_f32_bf16(n: i64, src: DevPtr<f32>, dst: DevPtr<bf16>);
        fn convert_bf16_f32(n: i64, src: DevPtr<bf16>, dst: DevPtr<f32>);
        fn axpy_f32(n: i64, alpha: f32, x: DevPtr<f32>, y: DevPtr<f32>);
        fn axpy_bf16(n: i64, alpha: f32, x: DevPtr<bf16>, y: DevPtr<bf16>);
        fn scale_2d_f32(batch: i32, rows: i32, cols: i32, beta: f32, c: DevPtr<f32>, ld: i64, bs: i64);
        fn scale_2d_bf16(batch: i32, rows: i32, cols: i32, beta: f32, c: DevPtr<bf16>, ld: i64, bs: i64);
        fn col_partial_f32(rows: i32, n: i32, chunk_rows: i32, x: DevPtr<f32>, partial: DevPtr<f32>);
        fn col_partial_bf16(rows: i32, n: i32, chunk_rows: i32, x: DevPtr<bf16>, partial: DevPtr<f32>);
        fn col_finish_f32(n: i32, chunks: i32, partial: DevPtr<f32>, out: DevPtr<f32>);
        fn gemm_pointers(outer: i32, inner: i32, a: u64, oa: i64, ia: i64, ea: i32, b: u64, ob: i64, ib: i64, eb: i32, c: u64, oc: i64, ic: i64, ec: i32, out: DevPtr<u64>);
    }
    "gelu.cu" {
        fn add_bias_f32(rows: i32, n: i32, bias: DevPtr<f32>, y: DevPtr<f32>);
        fn add_bias_bf16(rows: i32, n: i32, bias: DevPtr<bf16>, y: DevPtr<bf16>);
        fn add_bias_bf16_f32(rows: i32, n: i32, bias: DevPtr<bf16>, y: DevPtr<f32>);
        fn gelu_f32(n: i64, x: DevPtr<f32>, y: DevPtr<f32>);
        fn gelu_bf16(n: i64, x: DevPtr<bf16>, y: DevPtr<bf16>);
        fn gelu_in_place_f32(n: i64, xy: DevPtr<f32>);
        fn gelu_in_place_bf16(n: i64, xy: DevPtr<bf16>);
        fn gelu_backward_f32(n: i64, x: DevPtr<f32>, dy: DevPtr<f32>, dx: DevPtr<f32>);
        fn gelu_backward_bf16(n: i64, x: DevPtr<bf16>, dy: DevPtr<bf16>, dx: DevPtr<bf16>);
        fn gelu_backward_bias_partial_f32(rows: i32, n: i32, chunk_rows: i32, x: DevPtr<f32>, grad: DevPtr<f32>, partial: DevPtr<f32>);
        fn gelu_backward_bias_partial_bf16(rows: i32, n: i32, chunk_rows: i32, x: DevPtr<bf16>, grad: DevPtr<bf16>, partial: DevPtr<f32>);
    }
    "layernorm.cu" {
        fn layernorm_f32(rows: i32, d: i32, x: DevPtr<f32>, gb: DevPtr<f32>, y: DevPtr<f32>, stats: DevPtr<f32>);
        fn layernorm_bf16(rows: i32, d: i32, x: DevPtr<f32>, gb: DevPtr<bf16>, y: DevPtr<bf16>, stats: DevPtr<f32>);
        fn layernorm_backward_dx_f32(rows: i32, d: i32, x: DevPtr<f32>, gb: DevPtr<f32>, stats: DevPtr<f32>, dy: DevPtr<f32>, dx: DevPtr<f32>);
        fn layernorm_backward_dx_bf16(rows: i32, d: i32, x: DevPtr<f32>, gb: DevPtr<bf16>, stats: DevPtr<f32>, dy: DevPtr<bf16>, dx: DevPtr<f32>);
        fn layernorm_param_partial_f32(rows: i32, d: i32, chunk_rows: i32, x: DevPtr<f32>, stats: DevPtr<f32>, dy: DevPtr<f32>, partial: DevPtr<f32>);
        fn layernorm_param_partial_bf16(rows: i32, d: i32, chunk_rows: i32, x: DevPtr<f32>, stats: DevPtr<f32>, dy: DevPtr<bf16>, partial: DevPtr<f32>);
    }
    "embedding.cu" {
        fn emb_gather_f32(n: i32, width: i32, fields: i32, g: EmbFields, ids: DevPtr<u32>, params: DevPtr<f32>, out: DevPtr<f32>, out_ld: i64, sum: i32, accumulate: i32, err: DevPtr<u32>);
        fn emb_gather_bf16(n: i32, width: i32, fields: i32, g: EmbFields, ids: DevPtr<u32>, params: DevPtr<bf16>, out: DevPtr<bf16>, out_ld: i64, sum: i32, accumulate: i32, err: DevPtr<u32>);
        fn emb_gather_bf16_f32(n: i32, width: i32, fields: i32, g: EmbFields, ids: DevPtr<u32>, params: DevPtr<bf16>, out: DevPtr<f32>, out_ld: i64, sum: i32, accumulate: i32, err: DevPtr<u32>);
        fn emb_hist(n: i32, fields: i32, g: EmbFields, ids: DevPtr<u32>, valid_lens: DevPtr<u32>, valid_len: i32, chunk: i32, hist: DevPtr<u32>, err: DevPtr<u32>);
        fn emb_col_scan(chunks: i32, keys: u32, hist: DevPtr<u32>, totals: DevPtr<u32>);
        fn emb_key_scan(keys: u32, starts: DevPtr<u32>);
        fn emb_place(n: i32, fields: i32, g: EmbFields, ids: DevPtr<u32>, valid_lens: DevPtr<u32>, valid_len: i32, chunk: i32, hist: DevPtr<u32>, starts: DevPtr<u32>, sorted: DevPtr<u32>);
        fn emb_rows_f32(width: i32, g: EmbFields, starts: DevPtr<u32>, sorted: DevPtr<u32>, dout: DevPtr<f32>, dout_ld: i64, grad: DevPtr<f32>);
        fn emb_rows_bf16(width: i32, g: EmbFields, starts: DevPtr<u32>, sorted: DevPtr<u32>, dout: DevPtr<bf16>, dout_ld: i64, grad: DevPtr<f32>);
        fn add_positions_f32(batch: i32, max_len: i32, d: i32, lens: DevPtr<u32>, pos: DevPtr<f32>, x: DevPtr<f32>, err: DevPtr<u32>);
        fn add_positions_bf16(batch: i32, max_len: i32, d: i32, lens: DevPtr<u32>, pos: DevPtr<bf16>, x: DevPtr<f32>, err: DevPtr<u32>);
        fn add_positions_partial_f32(batch: i32, max_len: i32, d: i32, chunk_rows: i32, lens: DevPtr<u32>, dx: DevPtr<f32>, partial: DevPtr<f32>, err: DevPtr<u32>);
    }
    "attention.cu" {
        fn attn_forward_f32(heads: i32, len: i32, dh: i32, lens: DevPtr<u32>, scale: f32, qkv: DevPtr<f32>, ctx: DevPtr<f32>, saved: DevPtr<f32>, err: DevPtr<u32>);
        fn attn_forward_bf16(heads: i32, len: i32, dh: i32, lens: DevPtr<u32>, scale: f32, qkv: DevPtr<bf16>, ctx: DevPtr<bf16>, saved: DevPtr<f32>, err: DevPtr<u32>);
        fn attn_backward_q_f32(heads: i32, len: i32, dh: i32, lens: DevPtr<u32>, scale: f32, qkv: DevPtr<f32>, saved: DevPtr<f32>, dctx: DevPtr<f32>, dqkv: DevPtr<f32>, dsum: DevPtr<f32>, err: DevPtr<u32>);
        fn attn_backward_q_bf16(heads: i32, len: i32, dh: i32, lens: DevPtr<u32>, scale: f32, qkv: DevPtr<bf16>, saved: DevPtr<f32>, dctx: DevPtr<bf16>, dqkv: DevPtr<bf16>, dsum: DevPtr<f32>, err: DevPtr<u32>);
        fn attn_backward_kv_f32(heads: i32, len: i32, dh: i32, lens: DevPtr<u32>, scale: f32, qkv: DevPtr<f32>, saved: DevPtr<f32>, dctx: DevPtr<f32>, dsum: DevPtr<f32>, dqkv: DevPtr<f32>, err: DevPtr<u32>);
        fn attn_backward_kv_bf16(heads: i32, len: i32, dh: i32, lens: DevPtr<u32>, scale: f32, qkv: DevPtr<bf16>, saved: DevPtr<f32>, dctx: DevPtr<bf16>, dsum: DevPtr<f32>, dqkv: DevPtr<bf16>, err: DevPtr<u32>);
    }
    "attention_mma.cu" {
        fn attn_mma_forward_bf16(heads: i32, len: i32, dh: i32, lens: DevPtr<u32>, scale: f32, qkv: DevPtr<bf16>, ctx: DevPtr<bf16>, saved: DevPtr<f32>, err: DevPtr<u32>);
        fn attn_mma_backward_q_bf16(heads: i32, len: i32, dh: i32, lens: DevPtr<u32>, scale: f32, qkv: DevPtr<bf16>, saved: DevPtr<f32>, dctx: DevPtr<bf16>, dqkv: DevPtr<bf16>, dsum: DevPtr<f32>, err: DevPtr<u32>);
        fn attn_mma_backward_kv_bf16(heads: i32, len: i32, dh: i32, lens: DevPtr<u32>, scale: f32, qkv: DevPtr<bf16>, saved: DevPtr<f32>, dctx: DevPtr<bf16>, dsum: DevPtr<f32>, dqkv: DevPtr<bf16>, err: DevPtr<u32>);
    }
    "softmax.cu" {
        fn masked_softmax_f32(rows: i32, per_b: i32, lk: i32, key_lens: DevPtr<u32>, scale: f32, s: DevPtr<f32>, err: DevPtr<u32>);
        fn masked_softmax_bf16(rows: i32, per_b: i32, lk: i32, key_lens: DevPtr<u32>, scale: f32, s: DevPtr<bf16>, err: DevPtr<u32>);
        fn masked_softmax_backward_f32(rows: i32, per_b: i32, lk: i32, key_lens: DevPtr<u32>, scale: f32, p: DevPtr<f32>, dp: DevPtr<f32>, ds: DevPtr<f32>, err: DevPtr<u32>);
        fn masked_softmax_backward_bf16(rows: i32, per_b: i32, lk: i32, key_lens: DevPtr<u32>, scale: f32, p: DevPtr<bf16>, dp: DevPtr<bf16>, ds: DevPtr<bf16>, err: DevPtr<u32>);
    }
    "pooling.cu" {
        fn masked_mean_f32(batch: i32, max_len: i32, d: i32, lens: DevPtr<u32>, x: DevPtr<f32>, empty: DevPtr<f32>, out: DevPtr<f32>, err: DevPtr<u32>);
        fn masked_mean_bf16(batch: i32, max_len: i32, d: i32, lens: DevPtr<u32>, x: DevPtr<bf16>, empty: DevPtr<bf16>, out: DevPtr<bf16>, err: DevPtr<u32>);
        fn masked_mean_backward_f32(batch: i32, max_len: i32, d: i32, lens: DevPtr<u32>, dout: DevPtr<f32>, dx: DevPtr<f32>, err: DevPtr<u32>);
        fn masked_mean_backward_bf16(batch: i32, max_len: i32, d: i32, lens: DevPtr<u32>, dout: DevPtr<bf16>, dx: DevPtr<bf16>, err: DevPtr<u32>);
        fn masked_mean_dempty_partial_f32(batch: i32, d: i32, chunk_rows: i32, lens: DevPtr<u32>, dout: DevPtr<f32>, partial: DevPtr<f32>);
        fn masked_mean_dempty_partial_bf16(batch: i32, d: i32, chunk_rows: i32, lens: DevPtr<u32>, dout: DevPtr<bf16>, partial: DevPtr<f32>);
        fn put_empty_rows_f32(batch: i32, max_len: i32, d: i32, lens: DevPtr<u32>, vec: DevPtr<f32>, seq: DevPtr<f32>);
        fn put_empty_rows_bf16(batch: i32, max_len: i32, d: i32, lens: DevPtr<u32>, vec: DevPtr<bf16>, seq: DevPtr<bf16>);
        fn put_empty_rows_backward_f32(batch: i32, max_len: i32, d: i32, lens: DevPtr<u32>, dseq: DevPtr<f32>, dvec: DevPtr<f32>);
        fn put_empty_rows_backward_bf16(batch: i32, max_len: i32, d: i32, lens: DevPtr<u32>, dseq: DevPtr<bf16>, dvec: DevPtr<bf16>);
    }
    "losses.cu" {
        fn reduce_terms(n: i32, terms: DevPtr<f64>, scale: f64, count_lens: DevPtr<u32>, count_n: i32, out: DevPtr<f32>);
        fn bce_f32(n: i32, z: DevPtr<f32>, y: DevPtr<f32>, w: DevPtr<f32>, f: f32, dz: DevPtr<f32>, terms: DevPtr<f64>);
        fn bernoulli_kl_f32(n: i32, s: DevPtr<f32>, t: DevPtr<f32>, w: DevPtr<f32>, inv_tau: f32, f: f32, ds: DevPtr<f32>, terms: DevPtr<f64>);
        fn coarse_f32(n: i32, d: i32, p: DevPtr<f32>, t: DevPtr<f32>, w: DevPtr<f32>, cosine: i32, coef_over_n: f32, dp: DevPtr<f32>, terms: DevPtr<f64>);
        fn coarse_bf16(n: i32, d: i32, p: DevPtr<bf16>, t: DevPtr<bf16>, w: DevPtr<f32>, cosine: i32, coef_over_n: f32, dp: DevPtr<bf16>, terms: DevPtr<f64>);
        fn fine_f32(batch: i32, lq: i32, lk: i32, d: i32, tile: i32, q: DevPtr<f32>, v: DevPtr<f32>, tin: DevPtr<f32>, q_lens: DevPtr<u32>, k_lens: DevPtr<u32>, w: DevPtr<f32>, coef: f32, dq: DevPtr<f32>, dv: DevPtr<f32>, terms: DevPtr<f64>, err: DevPtr<u32>);
        fn fine_bf16(batch: i32, lq: i32, lk: i32, d: i32, tile: i32, q: DevPtr<bf16>, v: DevPtr<bf16>, tin: DevPtr<bf16>, q_lens: DevPtr<u32>, k_lens: DevPtr<u32>, w: DevPtr<f32>, coef: f32, dq: DevPtr<bf16>, dv: DevPtr<bf16>, terms: DevPtr<f64>, err: DevPtr<u32>);
    }
    "adamw.cu" {
        fn sum_squares_partial(n: i64, x: DevPtr<f32>, partial: DevPtr<f64>);
        fn adamw_f32(n: i64, p: DevPtr<f32>, g: DevPtr<f32>, m: DevPtr<f32>, v: DevPtr<f32>, mask: DevPtr<f32>, gs: f32, b1: f32, b2: f32, bc1: f32, bc2: f32, lr: f32, eps: f32, wd: f32);
        fn adamw_clipped_f32(n: i64, p: DevPtr<f32>, g: DevPtr<f32>, m: DevPtr<f32>, v: DevPtr<f32>, mask: DevPtr<f32>, sum_sq: DevPtr<f32>, sched: DevPtr<f32>, clip: f64, b1: f32, b2: f32, bc1: f32, bc2: f32, lr: f32, eps: f32, wd: f32, err: DevPtr<u32>);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::nvrtc::SOURCES;

    /// `(name, parameter C types)` of every `extern "C" __global__` kernel in `src`, with
    /// `const`, `__restrict__`, the parameter names, spaces and a `__launch_bounds__(..)`
    /// before the name removed.
    fn declared(src: &str) -> Vec<(String, Vec<String>)> {
        let mut out = Vec::new();
        let key = "extern \"C\" __global__ void ";
        let mut rest = src;
        while let Some(at) = rest.find(key) {
            rest = rest[at + key.len()..].trim_start();
            if let Some(bounds) = rest.strip_prefix("__launch_bounds__") {
                rest = &bounds[bounds.find(')').expect("closed launch bounds") + 1..];
            }
            let open = rest.find('(').expect("a parameter list");
            let close = rest.find(')').expect("a closed parameter list");
            let name = rest[..open].trim().to_string();
            let params = rest[open + 1..close]
                .split(',')
                .map(|p| {
                    let p = p.replace("__restrict__", " ").replace("const ", " ");
                    let words: Vec<&str> = p.split_whitespace().collect();
                    // The last word is the name, unless it is glued to a `*`.
                    let (ty, name) = words.split_at(words.len() - 1);
                    let mut ty = ty.concat();
                    ty.push_str(
                        name[0].trim_end_matches(|c: char| c.is_alphanumeric() || c == '_'),
                    );
                    ty
                })
                .collect();
            out.push((name, params));
            rest = &rest[close..];
        }
        out
    }

    #[test]
    fn the_table_matches_every_kernels_c_parameters() {
        let mut seen = 0;
        for source in SOURCES {
            for (name, params) in declared(source.src) {
                let decl = KERNELS.iter().find(|k| k.name == name).unwrap_or_else(|| {
                    panic!("{}: kernel {name} is not in the table", source.file)
                });
                assert_eq!(decl.file, source.file, "kernel {name}: file");
                assert_eq!(
                    decl.params,
                    params.as_slice(),
                    "kernel {name}: parameter types"
                );
                seen += 1;
            }
        }
        assert_eq!(
            seen,
            KERNELS.len(),
            "a kernel of the table is in no source file"
        );
    }

    #[test]
    fn the_parser_reads_pointers_names_and_qualifiers() {
        let src = "extern \"C\" __global__ void k(int n, const float* __restrict__ x,\n  u32 *e, EmbFields f, unsigned long long a) {}\n\
                   extern \"C\" __global__ void __launch_bounds__(32 * W)\n    k2(const bf16* q) {}";
        let got = declared(src);
        let want = ["int", "float*", "u32*", "EmbFields", "unsignedlonglong"];
        assert_eq!(
            got,
            vec![
                ("k".to_string(), want.map(String::from).to_vec()),
                ("k2".to_string(), vec!["bf16*".to_string()])
            ]
        );
    }

    #[test]
    fn an_offset_counts_elements_of_the_pointers_type() {
        assert_eq!(DevPtr::<f32>::new(256).offset(3).addr(), 268);
        assert_eq!(DevPtr::<f64>::new(256).offset(3).addr(), 280);
        assert_eq!(DevPtr::<u64>::new(0).offset(1).addr(), 8);
    }
}
