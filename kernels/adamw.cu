// Optimizer family: Σx² for the global gradient norm (deterministic two passes: fixed-grid
// block partials in double here, then reduce_f64 of losses.cu) and the AdamW step.

// Pass 1: partial[block] = Σ x² over the block's grid-stride elements (the grid depends on
// the length only, so the order is fixed).
extern "C" __global__ void sum_squares_partial(i64 n, const float* __restrict__ x, double* __restrict__ partial) {
  __shared__ double sh[32];
  double acc = 0.0;
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    const double v = (double)x[i];
    acc += v * v;
  }
  const double total = block_sum_d(acc, sh);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// One AdamW step (SPEC §6): g ← gs·g, m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g²,
// p ← p − lr·(m̂/(√v̂ + ε) + λ·mask·p), m̂ = m/bc1, v̂ = v/bc2.
extern "C" __global__ void adamw_f32(i64 n, float* __restrict__ p, const float* __restrict__ g,
                                     float* __restrict__ m, float* __restrict__ v,
                                     const float* __restrict__ mask, float gs, float b1, float b2,
                                     float bc1, float bc2, float lr, float eps, float wd) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    const float gi = gs * g[i];
    const float mi = b1 * m[i] + (1.0f - b1) * gi;
    const float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float mh = mi / bc1, vh = vi / bc2;
    p[i] = p[i] - lr * (mh / (sqrtf(vh) + eps) + wd * mask[i] * p[i]);
  }
}
