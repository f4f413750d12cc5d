// Embedding family: gather (Sum / Concat) and its deterministic scatter-add backward, plus
// the learned positions counted back from the most recent event.
//
// Backward without float atomics: one block of 32 threads owns EMB_ROWS consecutive rows of
// one table and 32 columns; it walks every token in token order (ids staged through shared
// memory) and adds the tokens that hit its rows into a shared-memory accumulator seeded with
// the current gradient. Each gradient element therefore receives its terms in token order,
// exactly the order of the CPU reference, whatever the grid.

#define EMB_ROWS 16
#define EMB_TILE 256

// One field k of a gather: out[i·out_ld + col0 + c] (+)= table[ids[i·fields + k]·width + c].
// `accumulate` adds (Sum mode, fields after the first), else overwrites.
extern "C" __global__ void embedding_gather_f32(int n, int width, int fields, int k,
                                                const u32* __restrict__ ids,
                                                const float* __restrict__ table, u32 vocab,
                                                float* __restrict__ out, i64 out_ld, int col0,
                                                int accumulate, u32* err) {
  const i64 total = (i64)n * width;
  for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
    const i64 i = e / width;
    const int c = (int)(e % width);
    const u32 id = ids[i * fields + k];
    float v = 0.0f;
    if (id < vocab) v = table[(i64)id * width + c];
    else atomicOr(err, MGKD_ERR_ID);
    float* o = out + i * out_ld + col0 + c;
    if (accumulate) *o += v; else *o = v;
  }
}

// Backward of one field k. Grid (⌈width/32⌉, up to ⌈vocab/EMB_ROWS⌉ row groups, the blocks
// striding over the groups when there are more), 32 threads.
extern "C" __global__ void embedding_scatter_f32(int n, int width, int fields, int k,
                                                 const u32* __restrict__ ids,
                                                 const float* __restrict__ dout, i64 dout_ld,
                                                 int col0, float* __restrict__ grad, u32 vocab) {
  __shared__ float acc[EMB_ROWS][32];
  __shared__ u32 tile[EMB_TILE];
  const int c = blockIdx.x * 32 + threadIdx.x;
  for (u32 row0 = blockIdx.y * EMB_ROWS; row0 < vocab; row0 += gridDim.y * EMB_ROWS) {
    const u32 nrows = min((u32)EMB_ROWS, vocab - row0);
    for (u32 r = 0; r < nrows; ++r)
      acc[r][threadIdx.x] = (c < width) ? grad[(i64)(row0 + r) * width + c] : 0.0f;
    for (int t0 = 0; t0 < n; t0 += EMB_TILE) {
      const int tn = min(EMB_TILE, n - t0);
      __syncthreads();
      for (int t = threadIdx.x; t < tn; t += 32) tile[t] = ids[(i64)(t0 + t) * fields + k];
      __syncthreads();
      if (c < width) {
        for (int t = 0; t < tn; ++t) {
          const u32 rel = tile[t] - row0;  // wraps to a huge value below row0
          if (rel < nrows) acc[rel][threadIdx.x] += dout[(i64)(t0 + t) * dout_ld + col0 + c];
        }
      }
    }
    if (c < width)
      for (u32 r = 0; r < nrows; ++r) grad[(i64)(row0 + r) * width + c] = acc[r][threadIdx.x];
  }
}

// Checks every id of field k against its vocabulary (the scatter skips bad ids; this raises
// the flag that turns them into an error).
extern "C" __global__ void embedding_check_ids(int n, int fields, int k, const u32* __restrict__ ids,
                                               u32 vocab, u32* err) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
    if (ids[i * fields + k] >= vocab) atomicOr(err, MGKD_ERR_ID);
}

// x[b,t,:] += pos[ℓ−1−t, :] for t < ℓ = lens[b]; padded slots untouched.
extern "C" __global__ void add_positions_f32(int batch, int max_len, int d, const u32* __restrict__ lens,
                                             const float* __restrict__ pos, float* __restrict__ x, u32* err) {
  const i64 total = (i64)batch * max_len * d;
  for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
    const i64 b = e / ((i64)max_len * d);
    const int t = (int)((e / d) % max_len), c = (int)(e % d);
    u32 l = lens[b];
    if (l > (u32)max_len) {
      atomicOr(err, MGKD_ERR_LEN);
      l = max_len;
    }
    if ((u32)t < l) x[e] += pos[(i64)(l - 1 - t) * d + c];
  }
}

// dpos[p, :] += Σ_b dx[b, ℓ_b−1−p, :] over rows b with p < ℓ_b, in row order. One thread
// per (p, c): grid (⌈d/blockDim⌉, max_len).
extern "C" __global__ void add_positions_backward_f32(int batch, int max_len, int d,
                                                      const u32* __restrict__ lens,
                                                      const float* __restrict__ dx,
                                                      float* __restrict__ dpos, u32* err) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int p = blockIdx.y;
  if (c >= d) return;
  float acc = dpos[(i64)p * d + c];
  for (int b = 0; b < batch; ++b) {
    u32 l = lens[b];
    if (l > (u32)max_len) {
      atomicOr(err, MGKD_ERR_LEN);
      l = max_len;
    }
    if ((u32)p < l) acc += dx[((i64)b * max_len + (l - 1 - p)) * d + c];
  }
  dpos[(i64)p * d + c] = acc;
}
