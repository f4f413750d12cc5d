//! The element type of the CPU backend: `f32` for speed, `f64` for gradient checks.

use std::fmt::{Debug, Display};

/// A floating-point element the engine computes in (implemented for `f32` and `f64`).
///
/// Beyond [`num_traits::Float`] it offers the exact error function (for the erf form of
/// GELU), lossless-enough conversion to and from `f64`, and the matching
/// `matrixmultiply` kernel.
pub trait Float:
    num_traits::Float
    + num_traits::FromPrimitive
    + bytemuck::Pod
    + Default
    + Debug
    + Display
    + Send
    + Sync
    + std::iter::Sum
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + 'static
{
    /// The error function erf(x).
    fn erf(self) -> Self;
    /// Conversion from `f64` (rounding for `f32`).
    fn from_f64(x: f64) -> Self;
    /// Conversion to `f64` (exact).
    fn to_f64(self) -> f64;
    /// Row-major-agnostic strided GEMM: `C = α·A·B + β·C` with `A` m×k, `B` k×n, `C` m×n,
    /// each given by its row and column strides (the `matrixmultiply` convention).
    ///
    /// # Safety
    /// The pointers and strides must describe valid, non-overlapping (for `c`) memory.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

impl Float for f32 {
    fn erf(self) -> Self {
        libm::erff(self)
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}

impl Float for f64 {
    fn erf(self) -> Self {
        libm::erf(self)
    }
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}
