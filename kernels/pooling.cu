// Masked mean over time and its backward, and the empty-row slot of the fine loss. One thread
// per output element; time steps are added in order (the CPU reference's order). Instances
// `_f32` and `_bf16` (every sequence and vector bf16; the sums f32, partial sums f32).

// out[b,c] = Σ_{t<ℓ} x[b,t,c]/ℓ, or empty[c] when ℓ = lens[b] = 0.
template <typename T>
__device__ __forceinline__ void masked_mean(int batch, int max_len, int d, const u32* __restrict__ lens,
                                            const T* __restrict__ x, const T* __restrict__ empty,
                                            T* __restrict__ out, u32* err) {
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
      st(out, e, ld(empty, c));
      continue;
    }
    float acc = 0.0f;
    // Unrolled so that 16 time steps' loads are in flight at once; the sum keeps its order.
#pragma unroll 16
    for (u32 t = 0; t < l; ++t) acc += ld(x, (b * max_len + t) * d + c);
    st(out, e, acc / (float)l);
  }
}

extern "C" __global__ void masked_mean_f32(int batch, int max_len, int d, const u32* __restrict__ lens,
                                           const float* __restrict__ x, const float* __restrict__ empty,
                                           float* __restrict__ out, u32* err) {
  masked_mean(batch, max_len, d, lens, x, empty, out, err);
}

extern "C" __global__ void masked_mean_bf16(int batch, int max_len, int d, const u32* __restrict__ lens,
                                            const bf16* __restrict__ x, const bf16* __restrict__ empty,
                                            bf16* __restrict__ out, u32* err) {
  masked_mean(batch, max_len, d, lens, x, empty, out, err);
}

// dx[b,t,c] = dout[b,c]/ℓ on valid slots, 0 on padding (overwrites).
template <typename T>
__device__ __forceinline__ void masked_mean_backward(int batch, int max_len, int d, const u32* __restrict__ lens,
                                                     const T* __restrict__ dout, T* __restrict__ dx, u32* err) {
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
    st(dx, e, (t < l) ? ld(dout, b * d + c) / (float)l : 0.0f);
  }
}

extern "C" __global__ void masked_mean_backward_f32(int batch, int max_len, int d, const u32* __restrict__ lens,
                                                    const float* __restrict__ dout, float* __restrict__ dx,
                                                    u32* err) {
  masked_mean_backward(batch, max_len, d, lens, dout, dx, err);
}

extern "C" __global__ void masked_mean_backward_bf16(int batch, int max_len, int d, const u32* __restrict__ lens,
                                                     const bf16* __restrict__ dout, bf16* __restrict__ dx,
                                                     u32* err) {
  masked_mean_backward(batch, max_len, d, lens, dout, dx, err);
}

// Pass 1 of dempty[c] += Σ_{b: ℓ_b = 0} dout[b,c]: partial[k, c] sums the empty rows of chunk k
// (rows k·chunk_rows .. +chunk_rows, in order) in f32; grid (⌈d/blockDim⌉, chunks). Pass 2 is
// col_finish_f32, adding the chunks in order (a fixed order: deterministic).
template <typename T>
__device__ __forceinline__ void masked_mean_dempty_partial(int batch, int d, int chunk_rows,
                                                           const u32* __restrict__ lens,
                                                           const T* __restrict__ dout,
                                                           float* __restrict__ partial) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= d) return;
  const int b0 = blockIdx.y * chunk_rows;
  const int b1 = min(batch, b0 + chunk_rows);
  float acc = 0.0f;
  for (int b = b0; b < b1; ++b)
    if (lens[b] == 0) acc += ld(dout, (i64)b * d + c);
  partial[(i64)blockIdx.y * d + c] = acc;
}

extern "C" __global__ void masked_mean_dempty_partial_f32(int batch, int d, int chunk_rows,
                                                          const u32* __restrict__ lens,
                                                          const float* __restrict__ dout,
                                                          float* __restrict__ partial) {
  masked_mean_dempty_partial(batch, d, chunk_rows, lens, dout, partial);
}

extern "C" __global__ void masked_mean_dempty_partial_bf16(int batch, int d, int chunk_rows,
                                                           const u32* __restrict__ lens,
                                                           const bf16* __restrict__ dout,
                                                           float* __restrict__ partial) {
  masked_mean_dempty_partial(batch, d, chunk_rows, lens, dout, partial);
}

// seq[b,0,c] = vec[b,c] for the rows with lens[b] = 0 (one thread per (b, c)).
template <typename T>
__device__ __forceinline__ void put_empty_rows(int batch, int max_len, int d, const u32* __restrict__ lens,
                                               const T* __restrict__ vec, T* __restrict__ seq) {
  const i64 total = (i64)batch * d;
  for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
    const i64 b = e / d;
    if (lens[b] == 0) st(seq, b * max_len * d + e % d, ld(vec, e));
  }
}

extern "C" __global__ void put_empty_rows_f32(int batch, int max_len, int d, const u32* __restrict__ lens,
                                              const float* __restrict__ vec, float* __restrict__ seq) {
  put_empty_rows(batch, max_len, d, lens, vec, seq);
}

extern "C" __global__ void put_empty_rows_bf16(int batch, int max_len, int d, const u32* __restrict__ lens,
                                               const bf16* __restrict__ vec, bf16* __restrict__ seq) {
  put_empty_rows(batch, max_len, d, lens, vec, seq);
}

// For the rows with lens[b] = 0: dvec[b,c] += dseq[b,0,c], then dseq[b,0,c] = 0.
template <typename T>
__device__ __forceinline__ void put_empty_rows_backward(int batch, int max_len, int d,
                                                        const u32* __restrict__ lens, T* __restrict__ dseq,
                                                        T* __restrict__ dvec) {
  const i64 total = (i64)batch * d;
  for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
    const i64 b = e / d;
    if (lens[b] != 0) continue;
    const i64 s = b * max_len * d + e % d;
    st(dvec, e, ld(dvec, e) + ld(dseq, s));
    st(dseq, s, 0.0f);
  }
}

extern "C" __global__ void put_empty_rows_backward_f32(int batch, int max_len, int d,
                                                       const u32* __restrict__ lens,
                                                       float* __restrict__ dseq, float* __restrict__ dvec) {
  put_empty_rows_backward(batch, max_len, d, lens, dseq, dvec);
}

extern "C" __global__ void put_empty_rows_backward_bf16(int batch, int max_len, int d,
                                                        const u32* __restrict__ lens,
                                                        bf16* __restrict__ dseq, bf16* __restrict__ dvec) {
  put_empty_rows_backward(batch, max_len, d, lens, dseq, dvec);
}
