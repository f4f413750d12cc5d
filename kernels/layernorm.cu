// LayerNorm over the last dimension (ε = 1e-5), one warp per row: forward writes y and the
// per-row (μ, rstd); backward accumulates dx per row (warp reductions) and the γ/β gradients
// through a fixed-chunk column reduction (ln_param_partial, then col_finish_f32 of copy.cu).
// Statistics are f32 in every instance; the bf16 instances read the residual stream x in f32
// and γ/β from the weights' bf16 copy, write y in bf16 and take dy in bf16, dx in f32.

// Block of 32·W threads handles W rows.
template <typename TX, typename TG, typename TY>
__device__ __forceinline__ void layernorm(int rows, int d, const TX* __restrict__ x,
                                          const TG* __restrict__ gb, TY* __restrict__ y,
                                          float* __restrict__ stats) {
  const int lane = threadIdx.x & 31;
  const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= rows) return;
  const i64 o = (i64)r * d;
  float s = 0.0f;
  for (int j = lane; j < d; j += 32) s += ld(x, o + j);
  const float mu = warp_sum(s) / (float)d;
  float v = 0.0f;
  for (int j = lane; j < d; j += 32) {
    const float t = ld(x, o + j) - mu;
    v += t * t;
  }
  const float var = warp_sum(v) / (float)d;
  const float rstd = 1.0f / sqrtf(var + 1e-5f);
  for (int j = lane; j < d; j += 32) st(y, o + j, (ld(x, o + j) - mu) * rstd * ld(gb, j) + ld(gb, d + j));
  if (lane == 0) {
    stats[2 * (i64)r] = mu;
    stats[2 * (i64)r + 1] = rstd;
  }
}

extern "C" __global__ void layernorm_f32(int rows, int d, const float* __restrict__ x,
                                         const float* __restrict__ gb, float* __restrict__ y,
                                         float* __restrict__ stats) {
  layernorm(rows, d, x, gb, y, stats);
}

// x f32, γ/β bf16, y bf16.
extern "C" __global__ void layernorm_bf16(int rows, int d, const float* __restrict__ x,
                                          const bf16* __restrict__ gb, bf16* __restrict__ y,
                                          float* __restrict__ stats) {
  layernorm(rows, d, x, gb, y, stats);
}

// dx += rstd·(g − mean(g) − x̂·mean(g·x̂)), g = dy·γ; one warp per row.
template <typename TX, typename TG, typename TDY, typename TDX>
__device__ __forceinline__ void layernorm_backward_dx(int rows, int d, const TX* __restrict__ x,
                                                      const TG* __restrict__ gb,
                                                      const float* __restrict__ stats,
                                                      const TDY* __restrict__ dy, TDX* __restrict__ dx) {
  const int lane = threadIdx.x & 31;
  const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= rows) return;
  const float mu = stats[2 * (i64)r], rstd = stats[2 * (i64)r + 1];
  const i64 o = (i64)r * d;
  float sg = 0.0f, sgx = 0.0f;
  for (int j = lane; j < d; j += 32) {
    const float g = ld(dy, o + j) * ld(gb, j);
    sg += g;
    sgx += g * (ld(x, o + j) - mu) * rstd;
  }
  const float mg = warp_sum(sg) / (float)d;
  const float mgx = warp_sum(sgx) / (float)d;
  for (int j = lane; j < d; j += 32) {
    const float xh = (ld(x, o + j) - mu) * rstd;
    st(dx, o + j, ld(dx, o + j) + rstd * (ld(dy, o + j) * ld(gb, j) - mg - xh * mgx));
  }
}

extern "C" __global__ void layernorm_backward_dx_f32(int rows, int d, const float* __restrict__ x,
                                                     const float* __restrict__ gb,
                                                     const float* __restrict__ stats,
                                                     const float* __restrict__ dy, float* __restrict__ dx) {
  layernorm_backward_dx(rows, d, x, gb, stats, dy, dx);
}

// x f32, γ/β bf16, dy bf16, dx f32.
extern "C" __global__ void layernorm_backward_dx_bf16(int rows, int d, const float* __restrict__ x,
                                                      const bf16* __restrict__ gb,
                                                      const float* __restrict__ stats,
                                                      const bf16* __restrict__ dy, float* __restrict__ dx) {
  layernorm_backward_dx(rows, d, x, gb, stats, dy, dx);
}

// Pass 1 of dγ/dβ: partial[c·2d + j] = Σ_{r in chunk c} dy·x̂, partial[c·2d + d + j] =
// Σ dy, rows in order, in f32. Grid (⌈d/blockDim⌉, chunks).
template <typename TX, typename TDY>
__device__ __forceinline__ void layernorm_param_partial(int rows, int d, int chunk_rows,
                                                        const TX* __restrict__ x,
                                                        const float* __restrict__ stats,
                                                        const TDY* __restrict__ dy,
                                                        float* __restrict__ partial) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const int r0 = blockIdx.y * chunk_rows;
  const int r1 = min(rows, r0 + chunk_rows);
  float ag = 0.0f, ab = 0.0f;
  // Unrolled so that many rows' loads are in flight at once; the sums keep their order.
#pragma unroll 8
  for (int r = r0; r < r1; ++r) {
    const float g = ld(dy, (i64)r * d + j);
    ag += g * (ld(x, (i64)r * d + j) - stats[2 * (i64)r]) * stats[2 * (i64)r + 1];
    ab += g;
  }
  partial[(i64)blockIdx.y * 2 * d + j] = ag;
  partial[(i64)blockIdx.y * 2 * d + d + j] = ab;
}

extern "C" __global__ void layernorm_param_partial_f32(int rows, int d, int chunk_rows,
                                                       const float* __restrict__ x,
                                                       const float* __restrict__ stats,
                                                       const float* __restrict__ dy,
                                                       float* __restrict__ partial) {
  layernorm_param_partial(rows, d, chunk_rows, x, stats, dy, partial);
}

// x f32, dy bf16.
extern "C" __global__ void layernorm_param_partial_bf16(int rows, int d, int chunk_rows,
                                                        const float* __restrict__ x,
                                                        const float* __restrict__ stats,
                                                        const bf16* __restrict__ dy,
                                                        float* __restrict__ partial) {
  layernorm_param_partial(rows, d, chunk_rows, x, stats, dy, partial);
}
