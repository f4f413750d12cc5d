// Memory family: fill, (2-D, accumulating) copy, axpy, β-scaling of a matrix block (the
// k = 0 case of a GEMM), and the deterministic column reduction used by every parameter
// gradient that sums over rows (bias, LayerNorm γ/β): pass 1 writes one partial sum per
// (fixed-size row chunk, column), pass 2 adds the chunks in chunk order.

template <typename T>
__device__ __forceinline__ void fill(T* x, i64 n, float v) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
    st(x, i, v);
}

extern "C" __global__ void fill_f32(float* x, i64 n, float v) { fill(x, n, v); }

extern "C" __global__ void fill_bf16(bf16* x, i64 n, float v) { fill(x, n, v); }

// dst[r·dst_ld + c] (+)= src[r·src_ld + c] for r < rows, c < cols.
template <typename TS, typename TD>
__device__ __forceinline__ void copy_2d(int rows, int cols, const TS* __restrict__ src, i64 src_ld,
                                        TD* __restrict__ dst, i64 dst_ld, int accumulate) {
  const i64 total = (i64)rows * cols;
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
    const i64 r = i / cols, c = i % cols;
    const float s = ld(src, r * src_ld + c);
    const i64 o = r * dst_ld + c;
    st(dst, o, accumulate ? ld(dst, o) + s : s);
  }
}

extern "C" __global__ void copy_2d_f32(int rows, int cols, const float* __restrict__ src, i64 src_ld,
                                       float* __restrict__ dst, i64 dst_ld, int accumulate) {
  copy_2d(rows, cols, src, src_ld, dst, dst_ld, accumulate);
}

extern "C" __global__ void copy_2d_bf16(int rows, int cols, const bf16* __restrict__ src, i64 src_ld,
                                        bf16* __restrict__ dst, i64 dst_ld, int accumulate) {
  copy_2d(rows, cols, src, src_ld, dst, dst_ld, accumulate);
}

extern "C" __global__ void copy_2d_f32_bf16(int rows, int cols, const float* __restrict__ src, i64 src_ld,
                                            bf16* __restrict__ dst, i64 dst_ld, int accumulate) {
  copy_2d(rows, cols, src, src_ld, dst, dst_ld, accumulate);
}

// dst = src rounded to bf16 (the weights' compute copy, an f32 operand beside a bf16 one).
extern "C" __global__ void convert_f32_bf16(i64 n, const float* __restrict__ src, bf16* __restrict__ dst) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
    st(dst, i, src[i]);
}

// dst = src widened to f32 (exact): a bf16 bias for a product whose output is f32.
extern "C" __global__ void convert_bf16_f32(i64 n, const bf16* __restrict__ src, float* __restrict__ dst) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
    dst[i] = ld(src, i);
}

// y += α·x.
template <typename T>
__device__ __forceinline__ void axpy(i64 n, float alpha, const T* __restrict__ x, T* __restrict__ y) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
    st(y, i, ld(y, i) + alpha * ld(x, i));
}

extern "C" __global__ void axpy_f32(i64 n, float alpha, const float* __restrict__ x, float* __restrict__ y) {
  axpy(n, alpha, x, y);
}

extern "C" __global__ void axpy_bf16(i64 n, float alpha, const bf16* __restrict__ x, bf16* __restrict__ y) {
  axpy(n, alpha, x, y);
}

// C ← β·C on batch matrices of rows×cols (row stride ld, batch stride bs); β = 0 writes zeros.
template <typename T>
__device__ __forceinline__ void scale_2d(int batch, int rows, int cols, float beta, T* c, i64 ld_, i64 bs) {
  const i64 per = (i64)rows * cols, total = per * batch;
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
    const i64 b = i / per, r = (i % per) / cols, col = i % cols;
    const i64 o = b * bs + r * ld_ + col;
    st(c, o, (beta == 0.0f) ? 0.0f : beta * ld(c, o));
  }
}

extern "C" __global__ void scale_2d_f32(int batch, int rows, int cols, float beta, float* c, i64 ld, i64 bs) {
  scale_2d(batch, rows, cols, beta, c, ld, bs);
}

extern "C" __global__ void scale_2d_bf16(int batch, int rows, int cols, float beta, bf16* c, i64 ld, i64 bs) {
  scale_2d(batch, rows, cols, beta, c, ld, bs);
}

// Pass 1 of a column sum: partial[chunk·n + j] = Σ_{r in chunk} x[r·n + j], chunks of
// `chunk_rows` rows, rows in order, in f32 whatever x's type. Grid (⌈n/blockDim⌉, chunks).
template <typename T>
__device__ __forceinline__ void col_partial(int rows, int n, int chunk_rows, const T* __restrict__ x,
                                            float* __restrict__ partial) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= n) return;
  const int r0 = blockIdx.y * chunk_rows;
  const int r1 = min(rows, r0 + chunk_rows);
  float acc = 0.0f;
  // Unrolled so that 16 rows' loads are in flight at once; the sum keeps its order.
#pragma unroll 16
  for (int r = r0; r < r1; ++r) acc += ld(x, (i64)r * n + j);
  partial[(i64)blockIdx.y * n + j] = acc;
}

extern "C" __global__ void col_partial_f32(int rows, int n, int chunk_rows, const float* __restrict__ x,
                                           float* __restrict__ partial) {
  col_partial(rows, n, chunk_rows, x, partial);
}

extern "C" __global__ void col_partial_bf16(int rows, int n, int chunk_rows, const bf16* __restrict__ x,
                                            float* __restrict__ partial) {
  col_partial(rows, n, chunk_rows, x, partial);
}

// Pass 2: out[j] += Σ_chunk partial[chunk·n + j], chunks in order.
extern "C" __global__ void col_finish_f32(int n, int chunks, const float* __restrict__ partial,
                                          float* __restrict__ out) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= n) return;
  float acc = 0.0f;
#pragma unroll 16
  for (int c = 0; c < chunks; ++c) acc += partial[(i64)c * n + j];
  out[j] += acc;
}

// Device addresses of the products of a two-level batched GEMM (cuBLAS's pointer-array
// batch): entry e = o·inner + i of each array is base + (o·outer_stride + i·inner_stride)
// elements of ea, eb and ec bytes; the A, B and C arrays follow one another in `out`
// (3·outer·inner entries).
extern "C" __global__ void gemm_pointers(int outer, int inner, unsigned long long a, i64 oa, i64 ia,
                                         int ea, unsigned long long b, i64 ob, i64 ib, int eb,
                                         unsigned long long c, i64 oc, i64 ic, int ec,
                                         unsigned long long* __restrict__ out) {
  const i64 total = (i64)outer * inner;
  for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
    const i64 o = e / inner, i = e % inner;
    out[e] = a + (unsigned long long)((o * oa + i * ia) * ea);
    out[total + e] = b + (unsigned long long)((o * ob + i * ib) * eb);
    out[2 * total + e] = c + (unsigned long long)((o * oc + i * ic) * ec);
  }
}
