// Shared prelude of every kernel file: the backend (and tests/kernels_compile.rs) prepend it
// to each kernels/*.cu before handing the source to NVRTC, so no include path is needed.
// Reductions here use fixed shuffle/tree patterns: for a given launch shape the result is
// bit-identical from run to run (docs/model.md §6.5; no floating-point atomics anywhere).

typedef unsigned int u32;
typedef long long i64;

// +∞ without math_constants.h (NVRTC has no INFINITY).
#define MGKD_INF __int_as_float(0x7f800000)

// Error bits a kernel may raise in the backend's device flag word (checked at the next
// synchronising call, reported as an error there).
#define MGKD_ERR_ID 1u   // an embedding id ≥ its table's vocabulary
#define MGKD_ERR_LEN 2u  // a sequence length beyond its padded extent
#define MGKD_ERR_NONFINITE 4u  // a non-finite gradient norm (the optimizer step was skipped)

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024) in a fixed order; every
// thread gets the result. `sh` holds at least 32 doubles.
__device__ __forceinline__ double block_sum_d(double v, double* sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum_d(v);
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  double r = (lane < nw) ? sh[lane] : 0.0;
  r = warp_sum_d(r);
  __syncthreads();
  return r;
}

// Sequence b's length lens[b], clamped to its padded extent `len`; a length beyond it
// raises MGKD_ERR_LEN (one thread of the block reports it).
__device__ __forceinline__ u32 seq_len(const u32* lens, int b, int len, u32* err) {
  u32 l = lens[b];
  if (l > (u32)len) {
    if (threadIdx.x == 0) atomicOr(err, MGKD_ERR_LEN);
    l = len;
  }
  return l;
}

// Stable log(1 + e^x).
__device__ __forceinline__ float softplusf(float x) {
  return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x)));
}

// Stable logistic sigmoid.
__device__ __forceinline__ float sigmoidf(float x) {
  if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
  const float e = expf(x);
  return e / (1.0f + e);
}

// ---- element types -------------------------------------------------------------------------
// A kernel family is written once as a template over the element types of its buffers
// (`ld`/`st` below) and instantiated by thin `extern "C"` kernels: `<op>_f32` with every
// buffer f32, `<op>_bf16` with the types the bf16 scheme gives that operation (docs/model.md
// §7: activations bf16; the residual stream, statistics, partial sums and parameter
// gradients f32; each instance's comment says which), `<op>_f32_bf16` for a conversion.
// Arithmetic is f32 whatever the storage.

// bfloat16 storage: the upper 16 bits of an f32 (no cuda_bf16.h needed). A struct, not a
// typedef, so that templates and overloads tell it from a 16-bit integer.
struct bf16 {
  unsigned short bits;
};

__device__ __forceinline__ float ld(const float* p, i64 i) { return p[i]; }
// Widening is exact.
__device__ __forceinline__ float ld(const bf16* p, i64 i) {
  return __uint_as_float(((u32)p[i].bits) << 16);
}

__device__ __forceinline__ void st(float* p, i64 i, float v) { p[i] = v; }
// Round to nearest, ties to even, as the host's `half::bf16::from_f32`: a NaN stays a (quiet)
// NaN, a finite value past bf16's range becomes ±∞.
__device__ __forceinline__ void st(bf16* p, i64 i, float v) {
  const u32 u = __float_as_uint(v);
  bf16 r;
  if ((u & 0x7fffffffu) > 0x7f800000u)
    r.bits = (unsigned short)((u >> 16) | 0x40u);
  else
    r.bits = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  p[i] = r;
}

// The value `v` becomes once stored as a T (what a later load of it gives).
__device__ __forceinline__ float stored(const float*, float v) { return v; }
__device__ __forceinline__ float stored(const bf16*, float v) {
  bf16 t;
  st(&t, 0, v);
  return ld(&t, 0);
}
