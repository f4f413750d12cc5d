// Bias and GELU family: y += bias per row; exact GELU (erf form) and its derivative.

// y[r, :] += bias for r < rows; y is rows×n.
template <typename TB, typename TY>
__device__ __forceinline__ void add_bias(int rows, int n, const TB* __restrict__ bias, TY* __restrict__ y) {
  const i64 total = (i64)rows * n;
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x)
    st(y, i, ld(y, i) + ld(bias, i % n));
}

extern "C" __global__ void add_bias_f32(int rows, int n, const float* __restrict__ bias, float* __restrict__ y) {
  add_bias(rows, n, bias, y);
}

// Bias (the weights' copy) bf16, y bf16.
extern "C" __global__ void add_bias_bf16(int rows, int n, const bf16* __restrict__ bias, bf16* __restrict__ y) {
  add_bias(rows, n, bias, y);
}

// Bias bf16, y f32 (a map into the residual stream).
extern "C" __global__ void add_bias_bf16_f32(int rows, int n, const bf16* __restrict__ bias,
                                             float* __restrict__ y) {
  add_bias(rows, n, bias, y);
}

// GELU(v) = v·Φ(v) = v·(1 + erf(v/√2))/2.
__device__ __forceinline__ float gelu_value(float v) { return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); }

// y = GELU(x).
template <typename T>
__device__ __forceinline__ void gelu(i64 n, const T* __restrict__ x, T* __restrict__ y) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
    st(y, i, gelu_value(ld(x, i)));
}

extern "C" __global__ void gelu_f32(i64 n, const float* __restrict__ x, float* __restrict__ y) { gelu(n, x, y); }

extern "C" __global__ void gelu_bf16(i64 n, const bf16* __restrict__ x, bf16* __restrict__ y) { gelu(n, x, y); }

// xy = GELU(xy) in place: each thread reads and writes only its own elements.
template <typename T>
__device__ __forceinline__ void gelu_in_place(i64 n, T* __restrict__ xy) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
    st(xy, i, gelu_value(ld(xy, i)));
}

extern "C" __global__ void gelu_in_place_f32(i64 n, float* __restrict__ xy) { gelu_in_place(n, xy); }

extern "C" __global__ void gelu_in_place_bf16(i64 n, bf16* __restrict__ xy) { gelu_in_place(n, xy); }

// GELU'(x) = Φ(x) + x·φ(x).
__device__ __forceinline__ float gelu_grad(float v) {
  const float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
  const float pdf = 0.39894228040143268f * expf(-0.5f * v * v);
  return cdf + v * pdf;
}

// dx = dy·GELU'(x).
template <typename T>
__device__ __forceinline__ void gelu_backward(i64 n, const T* __restrict__ x, const T* __restrict__ dy,
                                              T* __restrict__ dx) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
    st(dx, i, ld(dy, i) * gelu_grad(ld(x, i)));
}

extern "C" __global__ void gelu_backward_f32(i64 n, const float* __restrict__ x, const float* __restrict__ dy,
                                             float* __restrict__ dx) {
  gelu_backward(n, x, dy, dx);
}

extern "C" __global__ void gelu_backward_bf16(i64 n, const bf16* __restrict__ x, const bf16* __restrict__ dy,
                                              bf16* __restrict__ dx) {
  gelu_backward(n, x, dy, dx);
}

// In place on a rows×n block: grad holds dy on entry and dx = dy·GELU'(x) on return, with
// pass 1 of the bias gradient in the same pass: partial[k, j] = Σ dx[r, j] (as stored) over
// the rows r of chunk k (rows k·chunk_rows .. +chunk_rows, in order), in f32; grid
// (⌈n/blockDim⌉, chunks). Pass 2 is col_finish_f32. The same chunks, order and roundings as
// gelu_backward followed by col_partial (the sum is __fadd_rn: never contracted with the
// product into an fma), so the two paths agree bit for bit. Each thread loads GELU_ROWS
// rows' dy and x before it stores any dx: grad is read and written through one pointer, so
// the compiler could not move a load above an earlier store, and one row at a time each load
// would wait for the previous store.
constexpr int GELU_ROWS = 8;
template <typename T>
__device__ __forceinline__ void gelu_backward_bias_partial(int rows, int n, int chunk_rows,
                                                           const T* __restrict__ x, T* grad,
                                                           float* __restrict__ partial) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= n) return;
  const int r0 = blockIdx.y * chunk_rows;
  const int r1 = min(rows, r0 + chunk_rows);
  float acc = 0.0f;
  for (int r = r0; r < r1; r += GELU_ROWS) {
    float dy[GELU_ROWS], xv[GELU_ROWS];
#pragma unroll
    for (int u = 0; u < GELU_ROWS; ++u) {
      const i64 i = (i64)(r + u) * n + j;
      dy[u] = r + u < r1 ? ld(grad, i) : 0.0f;
      xv[u] = r + u < r1 ? ld(x, i) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < GELU_ROWS; ++u) {
      if (r + u < r1) {
        const float g = dy[u] * gelu_grad(xv[u]);
        st(grad, (i64)(r + u) * n + j, g);
        acc = __fadd_rn(acc, stored(grad, g));
      }
    }
  }
  partial[(i64)blockIdx.y * n + j] = acc;
}

extern "C" __global__ void gelu_backward_bias_partial_f32(int rows, int n, int chunk_rows,
                                                          const float* __restrict__ x, float* grad,
                                                          float* __restrict__ partial) {
  gelu_backward_bias_partial(rows, n, chunk_rows, x, grad, partial);
}

extern "C" __global__ void gelu_backward_bias_partial_bf16(int rows, int n, int chunk_rows,
                                                           const bf16* __restrict__ x, bf16* grad,
                                                           float* __restrict__ partial) {
  gelu_backward_bias_partial(rows, n, chunk_rows, x, grad, partial);
}
