// Masked attention softmax, forward (in place) and backward; one warp per score row.
// Row r of the batch×heads×lq rows belongs to batch row b = r / (heads·lq); only keys
// j < key_lens[b] are valid, the others get 0, and a row with no valid key is all zero.

extern "C" __global__ void masked_softmax_f32(int rows, int per_b, int lk, const u32* __restrict__ key_lens,
                                              float scale, float* __restrict__ s, u32* err) {
  const int lane = threadIdx.x & 31;
  const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= rows) return;
  u32 l = key_lens[r / per_b];
  if (l > (u32)lk) {
    if (lane == 0) atomicOr(err, MGKD_ERR_LEN);
    l = lk;
  }
  float* row = s + (i64)r * lk;
  float mx = -MGKD_INF;
  for (u32 j = lane; j < l; j += 32) mx = fmaxf(mx, row[j] * scale);
  mx = warp_max(mx);
  float sum = 0.0f;
  for (u32 j = lane; j < l; j += 32) {
    const float e = expf(row[j] * scale - mx);
    row[j] = e;
    sum += e;
  }
  const float inv = 1.0f / warp_sum(sum);
  for (int j = lane; j < lk; j += 32) row[j] = ((u32)j < l) ? row[j] * inv : 0.0f;
}

// ds = scale·p⊙(dp − Σ_j p·dp) on valid keys, 0 elsewhere.
extern "C" __global__ void masked_softmax_backward_f32(int rows, int per_b, int lk,
                                                       const u32* __restrict__ key_lens, float scale,
                                                       const float* __restrict__ p,
                                                       const float* __restrict__ dp,
                                                       float* __restrict__ ds, u32* err) {
  const int lane = threadIdx.x & 31;
  const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= rows) return;
  u32 l = key_lens[r / per_b];
  if (l > (u32)lk) {
    if (lane == 0) atomicOr(err, MGKD_ERR_LEN);
    l = lk;
  }
  const float* pr = p + (i64)r * lk;
  const float* gr = dp + (i64)r * lk;
  float dot = 0.0f;
  for (u32 j = lane; j < l; j += 32) dot += pr[j] * gr[j];
  dot = warp_sum(dot);
  float* o = ds + (i64)r * lk;
  for (int j = lane; j < lk; j += 32) o[j] = ((u32)j < l) ? scale * pr[j] * (gr[j] - dot) : 0.0f;
}
