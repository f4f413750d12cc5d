// Optimizer family: Σx² for the global gradient norm (deterministic two passes: fixed-grid
// block partials in double here, then reduce_terms of losses.cu) and the AdamW step, with the clipping factor given or read
// from the device.

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

// One AdamW step (docs/model.md §6.1) on element i: g ← gs·g, m ← β1·m + (1−β1)·g, v ← β2·v +
// (1−β2)·g², p ← p − lr·(m̂/(√v̂ + ε) + λ·mask·p), m̂ = m/bc1, v̂ = v/bc2.
__device__ __forceinline__ void adamw_element(i64 i, float* __restrict__ p, const float* __restrict__ g,
                                              float* __restrict__ m, float* __restrict__ v,
                                              const float* __restrict__ mask, float gs, float b1,
                                              float b2, float bc1, float bc2, float lr, float eps,
                                              float wd) {
  const float gi = gs * g[i];
  const float mi = b1 * m[i] + (1.0f - b1) * gi;
  const float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
  m[i] = mi;
  v[i] = vi;
  const float mh = mi / bc1, vh = vi / bc2;
  p[i] = p[i] - lr * (mh / (sqrtf(vh) + eps) + wd * mask[i] * p[i]);
}

// AdamW with the clipping factor gs given.
extern "C" __global__ void adamw_f32(i64 n, float* __restrict__ p, const float* __restrict__ g,
                                     float* __restrict__ m, float* __restrict__ v,
                                     const float* __restrict__ mask, float gs, float b1, float b2,
                                     float bc1, float bc2, float lr, float eps, float wd) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
    adamw_element(i, p, g, m, v, mask, gs, b1, b2, bc1, bc2, lr, eps, wd);
}

// AdamW with global-norm clipping from the device: ‖g‖ = √sum_sq[0] (in double, as the host
// computes it), gs = min(1, clip/‖g‖). A non-finite ‖g‖ updates nothing and raises
// MGKD_ERR_NONFINITE. With `sched`, lr and the bias corrections are read from it
// ([lr, bc1, bc2]: a recorded graph then takes each replay's values) instead of the arguments.
extern "C" __global__ void adamw_clipped_f32(i64 n, float* __restrict__ p, const float* __restrict__ g,
                                             float* __restrict__ m, float* __restrict__ v,
                                             const float* __restrict__ mask,
                                             const float* __restrict__ sum_sq,
                                             const float* __restrict__ sched, double clip, float b1,
                                             float b2, float bc1, float bc2, float lr, float eps,
                                             float wd, u32* err) {
  if (sched) {
    lr = sched[0];
    bc1 = sched[1];
    bc2 = sched[2];
  }
  const double norm = sqrt((double)sum_sq[0]);
  if (!isfinite(norm)) {
    if (blockIdx.x == 0 && threadIdx.x == 0) atomicOr(err, MGKD_ERR_NONFINITE);
    return;
  }
  const float gs = (float)(norm > clip ? clip / norm : 1.0);
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
    adamw_element(i, p, g, m, v, mask, gs, b1, b2, bc1, bc2, lr, eps, wd);
}
