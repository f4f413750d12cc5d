// Masked attention softmax, forward (in place) and backward; one warp per score row.
// Row r of the batch×heads×lq rows belongs to batch row b = r / (heads·lq); only keys
// j < key_lens[b] are valid, the others get 0, and a row with no valid key is all zero.
// Instances `_f32` and `_bf16` (scores, probabilities and their gradients bf16; the row's max,
// sum and dot product f32).

// The forward reads each score three times (max, sum, output) and writes the row once, so a
// bf16 row is rounded once, from the f32 probability.
template <typename T>
__device__ __forceinline__ void masked_softmax(int rows, int per_b, int lk, const u32* __restrict__ key_lens,
                                               float scale, T* __restrict__ s, u32* err) {
  const int lane = threadIdx.x & 31;
  const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= rows) return;
  u32 l = key_lens[r / per_b];
  if (l > (u32)lk) {
    if (lane == 0) atomicOr(err, MGKD_ERR_LEN);
    l = lk;
  }
  T* row = s + (i64)r * lk;
  float mx = -MGKD_INF;
  for (u32 j = lane; j < l; j += 32) mx = fmaxf(mx, ld(row, j) * scale);
  mx = warp_max(mx);
  float sum = 0.0f;
  for (u32 j = lane; j < l; j += 32) sum += expf(ld(row, j) * scale - mx);
  const float inv = 1.0f / warp_sum(sum);
  for (int j = lane; j < lk; j += 32) st(row, j, ((u32)j < l) ? expf(ld(row, j) * scale - mx) * inv : 0.0f);
}

extern "C" __global__ void masked_softmax_f32(int rows, int per_b, int lk, const u32* __restrict__ key_lens,
                                              float scale, float* __restrict__ s, u32* err) {
  masked_softmax(rows, per_b, lk, key_lens, scale, s, err);
}

extern "C" __global__ void masked_softmax_bf16(int rows, int per_b, int lk, const u32* __restrict__ key_lens,
                                               float scale, bf16* __restrict__ s, u32* err) {
  masked_softmax(rows, per_b, lk, key_lens, scale, s, err);
}

// ds = scale·p⊙(dp − Σ_j p·dp) on valid keys, 0 elsewhere.
template <typename T>
__device__ __forceinline__ void masked_softmax_backward(int rows, int per_b, int lk,
                                                        const u32* __restrict__ key_lens, float scale,
                                                        const T* __restrict__ p, const T* __restrict__ dp,
                                                        T* __restrict__ ds, u32* err) {
  const int lane = threadIdx.x & 31;
  const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= rows) return;
  u32 l = key_lens[r / per_b];
  if (l > (u32)lk) {
    if (lane == 0) atomicOr(err, MGKD_ERR_LEN);
    l = lk;
  }
  const T* pr = p + (i64)r * lk;
  const T* gr = dp + (i64)r * lk;
  float dot = 0.0f;
  for (u32 j = lane; j < l; j += 32) dot += ld(pr, j) * ld(gr, j);
  dot = warp_sum(dot);
  T* o = ds + (i64)r * lk;
  for (int j = lane; j < lk; j += 32) st(o, j, ((u32)j < l) ? scale * ld(pr, j) * (ld(gr, j) - dot) : 0.0f);
}

extern "C" __global__ void masked_softmax_backward_f32(int rows, int per_b, int lk,
                                                       const u32* __restrict__ key_lens, float scale,
                                                       const float* __restrict__ p,
                                                       const float* __restrict__ dp,
                                                       float* __restrict__ ds, u32* err) {
  masked_softmax_backward(rows, per_b, lk, key_lens, scale, p, dp, ds, err);
}

extern "C" __global__ void masked_softmax_backward_bf16(int rows, int per_b, int lk,
                                                        const u32* __restrict__ key_lens, float scale,
                                                        const bf16* __restrict__ p,
                                                        const bf16* __restrict__ dp,
                                                        bf16* __restrict__ ds, u32* err) {
  masked_softmax_backward(rows, per_b, lk, key_lens, scale, p, dp, ds, err);
}
