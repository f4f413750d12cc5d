// LayerNorm over the last dimension (ε = 1e-5), one warp per row: forward writes y and the
// per-row (μ, rstd); backward accumulates dx per row (warp reductions) and the γ/β gradients
// through a fixed-chunk column reduction (ln_param_partial, then col_finish_f32 of copy.cu).

// Block of 32·W threads handles W rows.
extern "C" __global__ void layernorm_f32(int rows, int d, const float* __restrict__ x,
                                         const float* __restrict__ gb, float* __restrict__ y,
                                         float* __restrict__ stats) {
  const int lane = threadIdx.x & 31;
  const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= rows) return;
  const float* xr = x + (i64)r * d;
  float s = 0.0f;
  for (int j = lane; j < d; j += 32) s += xr[j];
  const float mu = warp_sum(s) / (float)d;
  float v = 0.0f;
  for (int j = lane; j < d; j += 32) {
    const float t = xr[j] - mu;
    v += t * t;
  }
  const float var = warp_sum(v) / (float)d;
  const float rstd = 1.0f / sqrtf(var + 1e-5f);
  float* yr = y + (i64)r * d;
  for (int j = lane; j < d; j += 32) yr[j] = (xr[j] - mu) * rstd * gb[j] + gb[d + j];
  if (lane == 0) {
    stats[2 * (i64)r] = mu;
    stats[2 * (i64)r + 1] = rstd;
  }
}

// dx += rstd·(g − mean(g) − x̂·mean(g·x̂)), g = dy·γ; one warp per row.
extern "C" __global__ void layernorm_backward_dx_f32(int rows, int d, const float* __restrict__ x,
                                                     const float* __restrict__ gb,
                                                     const float* __restrict__ stats,
                                                     const float* __restrict__ dy, float* __restrict__ dx) {
  const int lane = threadIdx.x & 31;
  const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= rows) return;
  const float mu = stats[2 * (i64)r], rstd = stats[2 * (i64)r + 1];
  const float* xr = x + (i64)r * d;
  const float* gr = dy + (i64)r * d;
  float sg = 0.0f, sgx = 0.0f;
  for (int j = lane; j < d; j += 32) {
    const float g = gr[j] * gb[j];
    sg += g;
    sgx += g * (xr[j] - mu) * rstd;
  }
  const float mg = warp_sum(sg) / (float)d;
  const float mgx = warp_sum(sgx) / (float)d;
  float* o = dx + (i64)r * d;
  for (int j = lane; j < d; j += 32) {
    const float xh = (xr[j] - mu) * rstd;
    o[j] += rstd * (gr[j] * gb[j] - mg - xh * mgx);
  }
}

// Pass 1 of dγ/dβ: partial[c·2d + j] = Σ_{r in chunk c} dy·x̂, partial[c·2d + d + j] =
// Σ dy, rows in order. Grid (⌈d/blockDim⌉, chunks).
extern "C" __global__ void layernorm_param_partial_f32(int rows, int d, int chunk_rows,
                                                       const float* __restrict__ x,
                                                       const float* __restrict__ stats,
                                                       const float* __restrict__ dy,
                                                       float* __restrict__ partial) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const int r0 = blockIdx.y * chunk_rows;
  const int r1 = min(rows, r0 + chunk_rows);
  float ag = 0.0f, ab = 0.0f;
  for (int r = r0; r < r1; ++r) {
    const float g = dy[(i64)r * d + j];
    ag += g * (x[(i64)r * d + j] - stats[2 * (i64)r]) * stats[2 * (i64)r + 1];
    ab += g;
  }
  partial[(i64)blockIdx.y * 2 * d + j] = ag;
  partial[(i64)blockIdx.y * 2 * d + d + j] = ab;
}
