// Fused multi-head self-attention with a key-padding mask, forward and backward (the CUDA
// override of Backend::attention; src/backend/cuda/attention.rs launches it and says when).
//
// Layout: qkv is [batch, len, 3d] (Q in columns 0..d, K in d..2d, V in 2d..3d; head h in
// columns h·dh.. of each block), ctx and dctx are [batch, len, d]. One block per (batch row
// b, head h), ATTN_WARPS warps; the keys and values (forward) or the queries and output
// gradients (key pass of the backward) of that head live in shared memory, rows padded to
// dh + 1 floats so that lanes reading one column of 32 rows hit 32 banks. Each warp takes
// one row at a time: lanes run over the other sequence index for the dot products (each a
// serial loop over the head's columns), write the row of probabilities into the warp's own
// shared buffer, then run over the columns for the products with it (serial over the
// sequence index, in increasing order). Every sum has a fixed order, so results are
// bit-identical from run to run; no atomics except the error flag. The probabilities never
// reach global memory: the forward saves per query row the softmax's max m and 1/Σ, and
// the backward recomputes p_ij = exp(s_ij·scale − m_i)·inv_i, the same expression as the
// forward, so the same bits.
//
// Semantics match the composition (scores, masked softmax, P·V): keys j < lens[b] only; a
// row without keys gets a zero output and zero gradients; padded query rows get outputs
// (the model ignores them) and their gradients flow as in the composition.
//
// Each kernel is a template over the type of qkv, ctx and their gradients: `_f32`, and `_bf16`
// (bf16 storage, f32 shared tables and arithmetic); the saved statistics and D are f32 in both.

#define ATTN_WARPS 4

// Shared memory of one block, in floats: two [len, dh+1] tables and the warps' buffers.
// attn_forward: per warp the query row (dh) and a probability row (len).
// attn_backward_q: per warp the query and output-gradient rows (2·dh), p and dp rows (2·len).
// attn_backward_kv: per warp the key and value rows (2·dh), p and ds rows (2·len); and the
// rows' m, inv and D (3·len).

// Copies rows 0..rows of one head's column block (row stride `ld`) into a [rows, dh+1] table.
template <typename T>
__device__ __forceinline__ void attn_stage(float* __restrict__ dst, const T* __restrict__ src,
                                           int rows, int dh, i64 row_ld) {
  for (int k = threadIdx.x; k < rows * dh; k += blockDim.x) {
    const int r = k / dh, c = k - r * dh;
    dst[r * (dh + 1) + c] = ld(src, (i64)r * row_ld + c);
  }
}

// Dot product of a row of a shared [., dh+1] table with a dh-vector in shared memory.
__device__ __forceinline__ float attn_dot(const float* __restrict__ row,
                                          const float* __restrict__ v, int dh) {
  float s = 0.0f;
  for (int p = 0; p < dh; ++p) s += row[p] * v[p];
  return s;
}

// Forward: ctx = softmax_mask(Q·Kᵀ·scale)·V per (b, h); saved[(b·heads + h)·len + i] holds
// (m, inv) of query row i: saved is [batch, heads, len, 2].
template <typename T>
__device__ __forceinline__ void attn_forward(int heads, int len, int dh, const u32* __restrict__ lens,
                                             float scale, const T* __restrict__ qkv, T* __restrict__ ctx,
                                             float* __restrict__ saved, u32* err) {
  extern __shared__ float sm[];
  const int b = blockIdx.x / heads, h = blockIdx.x - b * heads;
  const int d = heads * dh, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const u32 l = seq_len(lens, b, len, err);
  const T* base = qkv + (i64)b * len * 3 * d + h * dh;
  float* ks = sm;
  float* vs = ks + len * (dh + 1);
  float* qrow = vs + len * (dh + 1) + w * (dh + len);
  float* prow = qrow + dh;
  attn_stage(ks, base + d, l, dh, 3 * d);
  attn_stage(vs, base + 2 * d, l, dh, 3 * d);
  __syncthreads();
  for (int i = w; i < len; i += ATTN_WARPS) {
    const T* q = base + (i64)i * 3 * d;
    for (int p = lane; p < dh; p += 32) qrow[p] = ld(q, p);
    __syncwarp();
    float mx = -MGKD_INF;
    for (u32 j = lane; j < l; j += 32) {
      const float s = attn_dot(ks + j * (dh + 1), qrow, dh);
      prow[j] = s;
      mx = fmaxf(mx, s * scale);
    }
    mx = warp_max(mx);
    float sum = 0.0f;
    for (u32 j = lane; j < l; j += 32) {
      const float e = expf(prow[j] * scale - mx);
      prow[j] = e;
      sum += e;
    }
    sum = warp_sum(sum);
    const float inv = (l > 0) ? 1.0f / sum : 0.0f;
    for (u32 j = lane; j < l; j += 32) prow[j] *= inv;
    __syncwarp();
    T* out = ctx + ((i64)b * len + i) * d + h * dh;
    for (int p = lane; p < dh; p += 32) {
      float acc = 0.0f;
      for (u32 j = 0; j < l; ++j) acc += prow[j] * vs[j * (dh + 1) + p];
      st(out, p, acc);
    }
    if (lane == 0) {
      float* sv = saved + (((i64)b * heads + h) * len + i) * 2;
      sv[0] = (l > 0) ? mx : 0.0f;
      sv[1] = inv;
    }
    __syncwarp();
  }
}

extern "C" __global__ void attn_forward_f32(int heads, int len, int dh, const u32* __restrict__ lens,
                                            float scale, const float* __restrict__ qkv,
                                            float* __restrict__ ctx, float* __restrict__ saved,
                                            u32* err) {
  attn_forward(heads, len, dh, lens, scale, qkv, ctx, saved, err);
}

// qkv and ctx bf16; saved f32.
extern "C" __global__ void attn_forward_bf16(int heads, int len, int dh, const u32* __restrict__ lens,
                                             float scale, const bf16* __restrict__ qkv,
                                             bf16* __restrict__ ctx, float* __restrict__ saved,
                                             u32* err) {
  attn_forward(heads, len, dh, lens, scale, qkv, ctx, saved, err);
}

// Backward, query pass: per query row i, p_j and dp_j = dC_i·V_j over the valid keys,
// D_i = Σ_j p_j·dp_j, ds_j = scale·p_j·(dp_j − D_i) (masked_softmax_backward's formula),
// dQ_i = Σ_j ds_j·K_j into dqkv's Q columns; D_i to dsum[(b·heads + h)·len + i].
template <typename T>
__device__ __forceinline__ void attn_backward_q(int heads, int len, int dh, const u32* __restrict__ lens,
                                                float scale, const T* __restrict__ qkv,
                                                const float* __restrict__ saved, const T* __restrict__ dctx,
                                                T* __restrict__ dqkv, float* __restrict__ dsum, u32* err) {
  extern __shared__ float sm[];
  const int b = blockIdx.x / heads, h = blockIdx.x - b * heads;
  const int d = heads * dh, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const u32 l = seq_len(lens, b, len, err);
  const T* base = qkv + (i64)b * len * 3 * d + h * dh;
  float* ks = sm;
  float* vs = ks + len * (dh + 1);
  float* qrow = vs + len * (dh + 1) + w * (2 * dh + 2 * len);
  float* grow = qrow + dh;
  float* prow = grow + dh;
  float* gp = prow + len;
  attn_stage(ks, base + d, l, dh, 3 * d);
  attn_stage(vs, base + 2 * d, l, dh, 3 * d);
  __syncthreads();
  const i64 row0 = ((i64)b * heads + h) * len;
  for (int i = w; i < len; i += ATTN_WARPS) {
    const T* q = base + (i64)i * 3 * d;
    const T* g = dctx + ((i64)b * len + i) * d + h * dh;
    for (int p = lane; p < dh; p += 32) {
      qrow[p] = ld(q, p);
      grow[p] = ld(g, p);
    }
    __syncwarp();
    const float mx = saved[(row0 + i) * 2], inv = saved[(row0 + i) * 2 + 1];
    float dot = 0.0f;
    for (u32 j = lane; j < l; j += 32) {
      const float s = attn_dot(ks + j * (dh + 1), qrow, dh);
      const float pj = expf(s * scale - mx) * inv;
      const float dpj = attn_dot(vs + j * (dh + 1), grow, dh);
      prow[j] = pj;
      gp[j] = dpj;
      dot += pj * dpj;
    }
    dot = warp_sum(dot);
    for (u32 j = lane; j < l; j += 32) prow[j] = scale * prow[j] * (gp[j] - dot);
    __syncwarp();
    T* dq = dqkv + ((i64)b * len + i) * 3 * d + h * dh;
    for (int p = lane; p < dh; p += 32) {
      float acc = 0.0f;
      for (u32 j = 0; j < l; ++j) acc += prow[j] * ks[j * (dh + 1) + p];
      st(dq, p, acc);
    }
    if (lane == 0) dsum[row0 + i] = dot;
    __syncwarp();
  }
}

extern "C" __global__ void attn_backward_q_f32(int heads, int len, int dh,
                                               const u32* __restrict__ lens, float scale,
                                               const float* __restrict__ qkv,
                                               const float* __restrict__ saved,
                                               const float* __restrict__ dctx,
                                               float* __restrict__ dqkv, float* __restrict__ dsum,
                                               u32* err) {
  attn_backward_q(heads, len, dh, lens, scale, qkv, saved, dctx, dqkv, dsum, err);
}

// qkv, dctx and dqkv bf16; saved and dsum f32.
extern "C" __global__ void attn_backward_q_bf16(int heads, int len, int dh,
                                                const u32* __restrict__ lens, float scale,
                                                const bf16* __restrict__ qkv,
                                                const float* __restrict__ saved,
                                                const bf16* __restrict__ dctx,
                                                bf16* __restrict__ dqkv, float* __restrict__ dsum,
                                                u32* err) {
  attn_backward_q(heads, len, dh, lens, scale, qkv, saved, dctx, dqkv, dsum, err);
}

// Backward, key pass: per valid key j, over every query row i (padded ones included, as in
// the composition): p_ij and ds_ij recomputed (D_i from the query pass), dV_j = Σ_i p_ij·dC_i,
// dK_j = Σ_i ds_ij·Q_i into dqkv's K and V columns; zero for keys j ≥ lens[b].
template <typename T>
__device__ __forceinline__ void attn_backward_kv(int heads, int len, int dh, const u32* __restrict__ lens,
                                                 float scale, const T* __restrict__ qkv,
                                                 const float* __restrict__ saved, const T* __restrict__ dctx,
                                                 const float* __restrict__ dsum, T* __restrict__ dqkv,
                                                 u32* err) {
  extern __shared__ float sm[];
  const int b = blockIdx.x / heads, h = blockIdx.x - b * heads;
  const int d = heads * dh, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const u32 l = seq_len(lens, b, len, err);
  const T* base = qkv + (i64)b * len * 3 * d + h * dh;
  float* qs = sm;
  float* gs = qs + len * (dh + 1);
  float* ms = gs + len * (dh + 1);
  float* invs = ms + len;
  float* ds_ = invs + len;
  float* krow = ds_ + len + w * (2 * dh + 2 * len);
  float* vrow = krow + dh;
  float* prow = vrow + dh;
  float* srow = prow + len;
  const i64 row0 = ((i64)b * heads + h) * len;
  if (l > 0) {
    attn_stage(qs, base, len, dh, 3 * d);
    attn_stage(gs, dctx + (i64)b * len * d + h * dh, len, dh, d);
    for (int i = threadIdx.x; i < len; i += blockDim.x) {
      ms[i] = saved[(row0 + i) * 2];
      invs[i] = saved[(row0 + i) * 2 + 1];
      ds_[i] = dsum[row0 + i];
    }
  }
  __syncthreads();
  for (int j = w; j < len; j += ATTN_WARPS) {
    T* dk = dqkv + ((i64)b * len + j) * 3 * d + d + h * dh;
    T* dv = dk + d;
    if ((u32)j >= l) {
      for (int p = lane; p < dh; p += 32) {
        st(dk, p, 0.0f);
        st(dv, p, 0.0f);
      }
      continue;
    }
    const T* k = base + (i64)j * 3 * d + d;
    for (int p = lane; p < dh; p += 32) {
      krow[p] = ld(k, p);
      vrow[p] = ld(k, p + d);
    }
    __syncwarp();
    for (int i = lane; i < len; i += 32) {
      const float s = attn_dot(qs + i * (dh + 1), krow, dh);
      const float pij = expf(s * scale - ms[i]) * invs[i];
      const float dpij = attn_dot(gs + i * (dh + 1), vrow, dh);
      prow[i] = pij;
      srow[i] = scale * pij * (dpij - ds_[i]);
    }
    __syncwarp();
    for (int p = lane; p < dh; p += 32) {
      float av = 0.0f, ak = 0.0f;
      for (int i = 0; i < len; ++i) {
        av += prow[i] * gs[i * (dh + 1) + p];
        ak += srow[i] * qs[i * (dh + 1) + p];
      }
      st(dv, p, av);
      st(dk, p, ak);
    }
    __syncwarp();
  }
}

extern "C" __global__ void attn_backward_kv_f32(int heads, int len, int dh,
                                                const u32* __restrict__ lens, float scale,
                                                const float* __restrict__ qkv,
                                                const float* __restrict__ saved,
                                                const float* __restrict__ dctx,
                                                const float* __restrict__ dsum,
                                                float* __restrict__ dqkv, u32* err) {
  attn_backward_kv(heads, len, dh, lens, scale, qkv, saved, dctx, dsum, dqkv, err);
}

// qkv, dctx and dqkv bf16; saved and dsum f32.
extern "C" __global__ void attn_backward_kv_bf16(int heads, int len, int dh,
                                                 const u32* __restrict__ lens, float scale,
                                                 const bf16* __restrict__ qkv,
                                                 const float* __restrict__ saved,
                                                 const bf16* __restrict__ dctx,
                                                 const float* __restrict__ dsum,
                                                 bf16* __restrict__ dqkv, u32* err) {
  attn_backward_kv(heads, len, dh, lens, scale, qkv, saved, dctx, dsum, dqkv, err);
}
