// Masked mean over time and its backward, and the empty-row slot of the fine loss. One thread
// per output element; time steps are added in order (the CPU reference's order).

// out[b,c] = Σ_{t<ℓ} x[b,t,c]/ℓ, or empty[c] when ℓ = lens[b] = 0.
extern "C" __global__ void masked_mean_f32(int batch, int max_len, int d, const u32* __restrict__ lens,
                                           const float* __restrict__ x, const float* __restrict__ empty,
                                           float* __restrict__ out, u32* err) {
  const i64 total = (i64)batch * d;
  for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
    const i64 b = e / d;
    const int c = (int)(e % d);
    u32 l = lens[b];
    if (l > (u32)max_len) {
      atomicOr(err, MGKD_ERR_LEN);
      l = max_len;
    }
    if (l == 0) {
      out[e] = empty[c];
      continue;
    }
    float acc = 0.0f;
    for (u32 t = 0; t < l; ++t) acc += x[(b * max_len + t) * d + c];
    out[e] = acc / (float)l;
  }
}

// dx[b,t,c] = dout[b,c]/ℓ on valid slots, 0 on padding (overwrites).
extern "C" __global__ void masked_mean_backward_f32(int batch, int max_len, int d, const u32* __restrict__ lens,
                                                    const float* __restrict__ dout, float* __restrict__ dx,
                                                    u32* err) {
  const i64 total = (i64)batch * max_len * d;
  for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
    const i64 b = e / ((i64)max_len * d);
    const u32 t = (u32)((e / d) % max_len);
    const int c = (int)(e % d);
    u32 l = lens[b];
    if (l > (u32)max_len) {
      atomicOr(err, MGKD_ERR_LEN);
      l = max_len;
    }
    dx[e] = (t < l) ? dout[b * d + c] / (float)l : 0.0f;
  }
}

// Pass 1 of dempty[c] += Σ_{b: ℓ_b = 0} dout[b,c]: partial[k, c] sums the empty rows of chunk k
// (rows k·chunk_rows .. +chunk_rows, in order); grid (⌈d/blockDim⌉, chunks). Pass 2 is
// col_finish_f32, adding the chunks in order (a fixed order: deterministic).
extern "C" __global__ void masked_mean_dempty_partial_f32(int batch, int d, int chunk_rows,
                                                          const u32* __restrict__ lens,
                                                          const float* __restrict__ dout,
                                                          float* __restrict__ partial) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= d) return;
  const int b0 = blockIdx.y * chunk_rows;
  const int b1 = min(batch, b0 + chunk_rows);
  float acc = 0.0f;
  for (int b = b0; b < b1; ++b)
    if (lens[b] == 0) acc += dout[(i64)b * d + c];
  partial[(i64)blockIdx.y * d + c] = acc;
}

// seq[b,0,c] = vec[b,c] for the rows with lens[b] = 0 (one thread per (b, c)).
extern "C" __global__ void put_empty_rows_f32(int batch, int max_len, int d, const u32* __restrict__ lens,
                                              const float* __restrict__ vec, float* __restrict__ seq) {
  const i64 total = (i64)batch * d;
  for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
    const i64 b = e / d;
    if (lens[b] == 0) seq[b * max_len * d + e % d] = vec[e];
  }
}

// For the rows with lens[b] = 0: dvec[b,c] += dseq[b,0,c], then dseq[b,0,c] = 0.
extern "C" __global__ void put_empty_rows_backward_f32(int batch, int max_len, int d,
                                                       const u32* __restrict__ lens,
                                                       float* __restrict__ dseq, float* __restrict__ dvec) {
  const i64 total = (i64)batch * d;
  for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
    const i64 b = e / d;
    if (lens[b] != 0) continue;
    float* s = dseq + b * max_len * d + e % d;
    dvec[e] += *s;
    *s = 0.0f;
  }
}
