// Fused multi-head self-attention on tensor cores, bf16 storage (the tensor-core instance of
// Backend::attention under the bf16 scheme; src/backend/cuda/attention.rs launches it and
// says when). Same layouts, saved statistics and semantics as kernels/attention.cu: qkv is
// [batch, len, 3d], ctx and dctx [batch, len, d], saved [batch, heads, len, 2] holds each query
// row's softmax max m and 1/Σ, dsum [batch, heads, len] each row's D = Σ_j p_j·dp_j; keys
// j < lens[b] only; a row without keys gets a zero output and zero gradients; padded query rows
// get outputs and gradients as in the composition.
//
// Every product is `mma.sync.m16n8k16` (bf16 A and B, f32 accumulation; sm_80 and later, the
// host launches these kernels only there). One block per (batch row, head), MMA_WARPS warps;
// each warp owns 16-row tiles (query tiles in the forward and the query pass, key tiles in
// the key pass). The block stages the two tables every warp reads (K and V, or Q and dC) in
// shared memory as bf16, rows padded to dh + 8 elements so that the 8 rows a fragment load
// touches fall in distinct banks; the warp's own 16 rows go straight from global memory into
// A fragments. Scores and probabilities live in registers, 64 keys (32 queries in the key
// pass) at a time: the L×L probabilities never reach memory.
//
// Probabilities. The forward finds m and Σ in a first sweep over the keys (online: Σ rescaled
// when m grows), then recomputes each score and forms p = exp(s·scale − m)·inv, rounded to
// bf16 once: that is the A operand of P·V. The backward recomputes the same scores and the
// same rounded p (the key pass computes them as K·Qᵀ: the same products, summed by the tensor
// core in its own order). ds = scale·p·(dp − D) is rounded to bf16 once as the A operand of
// dS·K and dSᵀ·Q. Accumulation is f32 throughout; each output element is rounded to bf16 once.
//
// Deterministic: every sum runs in a fixed order (the mma's own, then key or query chunks in
// increasing order, then fixed shuffles); no atomics except the error flag.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16): lane = 4·g + t. A (16×16, row-major):
// a0 = (row g, cols 2t, 2t+1), a1 = (row g+8, cols 2t, 2t+1), a2 = (row g, cols 2t+8, 2t+9),
// a3 = (row g+8, cols 2t+8, 2t+9). B (16×8): b0 = (rows 2t, 2t+1, col g), b1 = (rows 2t+8,
// 2t+9, col g). C (16×8, f32): c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, cols 2t,
// 2t+1). Each 32-bit register holds two bf16, the lower index in the lower half. So the C
// fragments of two adjacent 8-column tiles are, element for element, the A fragment of the
// next product over those 16 columns.

#define MMA_WARPS 4
// Widest head: dh is a multiple of 16 up to this (the host checks).
#define MMA_DH_MAX 64
// Keys per sweep step of the forward and the query pass; queries per step of the key pass.
#define MMA_KEYS 64
#define MMA_QUERIES 32
// bf16 elements of padding at the end of each shared row.
#define MMA_PAD 8

typedef unsigned short u16;

// Two bf16 in one register, `lo` in the lower half.
__device__ __forceinline__ u32 mma_pack(u16 lo, u16 hi) { return (u32)lo | ((u32)hi << 16); }

// The bf16 bits of `v`, rounded to nearest, ties to even (as `st`).
__device__ __forceinline__ u16 mma_round(float v) {
  bf16 r;
  st(&r, 0, v);
  return r.bits;
}

__device__ __forceinline__ u32 mma_pack_f32(float lo, float hi) {
  return mma_pack(mma_round(lo), mma_round(hi));
}

// c += a·b on tensor cores (16×16 bf16 times 16×8 bf16, f32 accumulation).
__device__ __forceinline__ void mma_16816(float* c, const u32* a, u32 b0, u32 b1) {
#if __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// A fragment of rows r0.. r0+15, columns c0.. c0+15 of a bf16 matrix in global memory (row
// stride `ld`); rows ≥ `rows` read as zero. Element loads: a buffer view may start at any
// element.
__device__ __forceinline__ void mma_a_global(u32* a, const bf16* __restrict__ x, i64 ld, int r0,
                                             int rows, int c0, int g, int t) {
  const int ra = r0 + g, rb = ra + 8;
  const bf16* pa = x + (i64)ra * ld + c0 + 2 * t;
  const bf16* pb = x + (i64)rb * ld + c0 + 2 * t;
  a[0] = ra < rows ? mma_pack(pa[0].bits, pa[1].bits) : 0u;
  a[1] = rb < rows ? mma_pack(pb[0].bits, pb[1].bits) : 0u;
  a[2] = ra < rows ? mma_pack(pa[8].bits, pa[9].bits) : 0u;
  a[3] = rb < rows ? mma_pack(pb[8].bits, pb[9].bits) : 0u;
}

// B fragment (16×8) with B[k][n] = X[n0 + n][k0 + k], X a shared table (row stride s): the
// transpose of X's rows, the two elements of a register adjacent in a row.
__device__ __forceinline__ void mma_b_rows(u32& b0, u32& b1, const u16* x, int s, int n0, int k0,
                                           int g, int t) {
  const u16* p = x + (n0 + g) * s + k0 + 2 * t;
  b0 = *(const u32*)p;
  b1 = *(const u32*)(p + 8);
}

// B fragment (16×8) with B[k][n] = X[k0 + k][n0 + n], X a shared table (row stride s).
__device__ __forceinline__ void mma_b_cols(u32& b0, u32& b1, const u16* x, int s, int k0, int n0,
                                           int g, int t) {
  const u16* p = x + (k0 + 2 * t) * s + n0 + g;
  b0 = mma_pack(p[0], p[s]);
  b1 = mma_pack(p[8 * s], p[9 * s]);
}

// Copies rows 0..rows of one head's column block (row stride `ld`) into a shared [lenp, s]
// table and zeroes rows rows..lenp (the padding columns are never read).
__device__ __forceinline__ void mma_stage(u16* dst, const bf16* __restrict__ src, int rows,
                                          int lenp, int dh, i64 ld) {
  const int s = dh + MMA_PAD;
  for (int k = threadIdx.x; k < lenp * dh; k += blockDim.x) {
    const int r = k / dh, c = k - r * dh;
    dst[r * s + c] = r < rows ? src[(i64)r * ld + c].bits : (u16)0;
  }
}

// Row max and sum over the 4 lanes of a quad (the lanes holding one row of a C fragment).
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// acc[nt] = A·Bᵀ for the 16 rows of `a` (k-steps of 16 over dh) and the 8-row tiles of the
// shared table x starting at row c + 8·nt, for the tiles with c + 8·nt < `end`; the others
// are left at zero. N tiles (a compile-time count).
template <int N>
__device__ __forceinline__ void mma_rows_product(float (*acc)[4], u32 (*a)[4], const u16* x,
                                                 int s, int c, int end, int dh, int g, int t) {
#pragma unroll
  for (int nt = 0; nt < N; ++nt) {
    acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
    if (c + 8 * nt < end) {
#pragma unroll
      for (int kk = 0; kk < MMA_DH_MAX / 16; ++kk) {
        if (16 * kk < dh) {
          u32 b0, b1;
          mma_b_rows(b0, b1, x, s, c + 8 * nt, 16 * kk, g, t);
          mma_16816(acc[nt], a[kk], b0, b1);
        }
      }
    }
  }
}

// out[nt] += P·X over 16 columns of P per k-step: p[2kk], p[2kk+1] are the f32 C fragments
// of P's columns c + 16kk.., rounded to bf16 here (a value already in bf16 stays as it is),
// X the shared table whose rows c + 16kk.. are the k index; k-steps with c + 16kk < `end`
// only.
template <int N>
__device__ __forceinline__ void mma_p_product(float (*out)[4], float (*p)[4], const u16* x,
                                              int s, int c, int end, int dh, int g, int t) {
#pragma unroll
  for (int kk = 0; kk < N / 2; ++kk) {
    if (c + 16 * kk < end) {
      u32 a[4];
      a[0] = mma_pack_f32(p[2 * kk][0], p[2 * kk][1]);
      a[1] = mma_pack_f32(p[2 * kk][2], p[2 * kk][3]);
      a[2] = mma_pack_f32(p[2 * kk + 1][0], p[2 * kk + 1][1]);
      a[3] = mma_pack_f32(p[2 * kk + 1][2], p[2 * kk + 1][3]);
#pragma unroll
      for (int nt = 0; nt < MMA_DH_MAX / 8; ++nt) {
        if (8 * nt < dh) {
          u32 b0, b1;
          mma_b_cols(b0, b1, x, s, c + 16 * kk, 8 * nt, g, t);
          mma_16816(out[nt], a, b0, b1);
        }
      }
    }
  }
}

// Writes a warp's 16×dh f32 result (C fragments `acc`) to rows r0.. (< rows) of a bf16 matrix
// (row stride ld).
__device__ __forceinline__ void mma_store(bf16* __restrict__ y, i64 ld, float (*acc)[4],
                                          int r0, int rows, int dh, int g, int t) {
#pragma unroll
  for (int nt = 0; nt < MMA_DH_MAX / 8; ++nt) {
    if (8 * nt < dh) {
      const int c = 8 * nt + 2 * t;
      if (r0 + g < rows) {
        st(y, (i64)(r0 + g) * ld + c, acc[nt][0]);
        st(y, (i64)(r0 + g) * ld + c + 1, acc[nt][1]);
      }
      if (r0 + g + 8 < rows) {
        st(y, (i64)(r0 + g + 8) * ld + c, acc[nt][2]);
        st(y, (i64)(r0 + g + 8) * ld + c + 1, acc[nt][3]);
      }
    }
  }
}

// The probability of score `v` of a row with statistics (m, inv), rounded to bf16, for key
// `key` of a sequence of `l` keys (0 past it).
__device__ __forceinline__ float mma_prob(float v, float scale, float m, float inv, int key, int l) {
  if (key >= l) return 0.0f;
  return __uint_as_float(((u32)mma_round(expf(v * scale - m) * inv)) << 16);
}

// Shared memory (bytes) of the forward and the query pass: 2·lenp·(dh + 8)·2; of the key pass:
// that and 3·lenp floats. lenp = len rounded up to 16.

// Forward: ctx = softmax_mask(Q·Kᵀ·scale)·V per (b, h); saved as in attention.cu.
extern "C" __global__ void __launch_bounds__(32 * MMA_WARPS)
    attn_mma_forward_bf16(int heads, int len, int dh, const u32* __restrict__ lens, float scale,
                          const bf16* __restrict__ qkv, bf16* __restrict__ ctx,
                          float* __restrict__ saved, u32* err) {
  extern __shared__ float mma_sm[];
  const int b = blockIdx.x / heads, h = blockIdx.x - b * heads;
  const int d = heads * dh, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int l = (int)seq_len(lens, b, len, err);
  const int lenp = (len + 15) & ~15, s = dh + MMA_PAD;
  const i64 ld3 = 3 * (i64)d;
  const bf16* base = qkv + (i64)b * len * ld3 + h * dh;
  u16* ks = (u16*)mma_sm;
  u16* vs = ks + lenp * s;
  mma_stage(ks, base + d, l, lenp, dh, ld3);
  mma_stage(vs, base + 2 * d, l, lenp, dh, ld3);
  __syncthreads();
  for (int i0 = 16 * w; i0 < len; i0 += 16 * MMA_WARPS) {
    u32 qa[MMA_DH_MAX / 16][4];
#pragma unroll
    for (int kk = 0; kk < MMA_DH_MAX / 16; ++kk)
      if (16 * kk < dh) mma_a_global(qa[kk], base, ld3, i0, len, 16 * kk, g, t);
    // First sweep: each row's max of s·scale over the valid keys and its sum of exponentials.
    float m[2] = {-MGKD_INF, -MGKD_INF}, sum[2] = {0.0f, 0.0f};
    float sc[MMA_KEYS / 8][4];
    for (int c = 0; c < l; c += MMA_KEYS) {
      mma_rows_product<MMA_KEYS / 8>(sc, qa, ks, s, c, l, dh, g, t);
      float cm[2] = {-MGKD_INF, -MGKD_INF};
#pragma unroll
      for (int nt = 0; nt < MMA_KEYS / 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r)
          if (c + 8 * nt + 2 * t + (r & 1) < l) cm[r >> 1] = fmaxf(cm[r >> 1], sc[nt][r] * scale);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float mn = fmaxf(m[r], quad_max(cm[r]));
        sum[r] *= expf(m[r] - mn);
        m[r] = mn;
      }
#pragma unroll
      for (int nt = 0; nt < MMA_KEYS / 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r)
          if (c + 8 * nt + 2 * t + (r & 1) < l) sum[r >> 1] += expf(sc[nt][r] * scale - m[r >> 1]);
    }
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      sum[r] = quad_sum(sum[r]);
      inv[r] = l > 0 ? 1.0f / sum[r] : 0.0f;
      if (l == 0) m[r] = 0.0f;
    }
    // Second sweep: the rounded probabilities times V.
    float o[MMA_DH_MAX / 8][4];
#pragma unroll
    for (int nt = 0; nt < MMA_DH_MAX / 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;
    for (int c = 0; c < l; c += MMA_KEYS) {
      mma_rows_product<MMA_KEYS / 8>(sc, qa, ks, s, c, l, dh, g, t);
#pragma unroll
      for (int nt = 0; nt < MMA_KEYS / 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r)
          sc[nt][r] = mma_prob(sc[nt][r], scale, m[r >> 1], inv[r >> 1], c + 8 * nt + 2 * t + (r & 1), l);
      mma_p_product<MMA_KEYS / 8>(o, sc, vs, s, c, l, dh, g, t);
    }
    mma_store(ctx + (i64)b * len * d + h * dh, d, o, i0, len, dh, g, t);
    if (t == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = i0 + g + 8 * r;
        if (i < len) {
          float* sv = saved + (((i64)b * heads + h) * len + i) * 2;
          sv[0] = m[r];
          sv[1] = inv[r];
        }
      }
    }
  }
}

// Backward, query pass: per query tile, D_i = Σ_j p_ij·dp_ij (dp = dC·Vᵀ) in a first sweep,
// then ds_ij = scale·p_ij·(dp_ij − D_i) and dQ = dS·K in a second; dQ into dqkv's Q columns,
// D_i to dsum[(b·heads + h)·len + i].
extern "C" __global__ void __launch_bounds__(32 * MMA_WARPS)
    attn_mma_backward_q_bf16(int heads, int len, int dh, const u32* __restrict__ lens, float scale,
                             const bf16* __restrict__ qkv, const float* __restrict__ saved,
                             const bf16* __restrict__ dctx, bf16* __restrict__ dqkv,
                             float* __restrict__ dsum, u32* err) {
  extern __shared__ float mma_sm[];
  const int b = blockIdx.x / heads, h = blockIdx.x - b * heads;
  const int d = heads * dh, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int l = (int)seq_len(lens, b, len, err);
  const int lenp = (len + 15) & ~15, s = dh + MMA_PAD;
  const i64 ld3 = 3 * (i64)d, row0 = ((i64)b * heads + h) * len;
  const bf16* base = qkv + (i64)b * len * ld3 + h * dh;
  const bf16* gbase = dctx + (i64)b * len * d + h * dh;
  u16* ks = (u16*)mma_sm;
  u16* vs = ks + lenp * s;
  mma_stage(ks, base + d, l, lenp, dh, ld3);
  mma_stage(vs, base + 2 * d, l, lenp, dh, ld3);
  __syncthreads();
  for (int i0 = 16 * w; i0 < len; i0 += 16 * MMA_WARPS) {
    u32 qa[MMA_DH_MAX / 16][4], ga[MMA_DH_MAX / 16][4];
#pragma unroll
    for (int kk = 0; kk < MMA_DH_MAX / 16; ++kk) {
      if (16 * kk < dh) {
        mma_a_global(qa[kk], base, ld3, i0, len, 16 * kk, g, t);
        mma_a_global(ga[kk], gbase, d, i0, len, 16 * kk, g, t);
      }
    }
    float m[2], inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = i0 + g + 8 * r;
      m[r] = i < len ? saved[(row0 + i) * 2] : 0.0f;
      inv[r] = i < len ? saved[(row0 + i) * 2 + 1] : 0.0f;
    }
    float sc[MMA_KEYS / 8][4], dp[MMA_KEYS / 8][4];
    float dsr[2] = {0.0f, 0.0f};
    for (int c = 0; c < l; c += MMA_KEYS) {
      mma_rows_product<MMA_KEYS / 8>(sc, qa, ks, s, c, l, dh, g, t);
      mma_rows_product<MMA_KEYS / 8>(dp, ga, vs, s, c, l, dh, g, t);
#pragma unroll
      for (int nt = 0; nt < MMA_KEYS / 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r)
          dsr[r >> 1] += mma_prob(sc[nt][r], scale, m[r >> 1], inv[r >> 1], c + 8 * nt + 2 * t + (r & 1), l) *
                         dp[nt][r];
    }
    dsr[0] = quad_sum(dsr[0]);
    dsr[1] = quad_sum(dsr[1]);
    float dq[MMA_DH_MAX / 8][4];
#pragma unroll
    for (int nt = 0; nt < MMA_DH_MAX / 8; ++nt) dq[nt][0] = dq[nt][1] = dq[nt][2] = dq[nt][3] = 0.0f;
    for (int c = 0; c < l; c += MMA_KEYS) {
      mma_rows_product<MMA_KEYS / 8>(sc, qa, ks, s, c, l, dh, g, t);
      mma_rows_product<MMA_KEYS / 8>(dp, ga, vs, s, c, l, dh, g, t);
#pragma unroll
      for (int nt = 0; nt < MMA_KEYS / 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const float p =
              mma_prob(sc[nt][r], scale, m[r >> 1], inv[r >> 1], c + 8 * nt + 2 * t + (r & 1), l);
          sc[nt][r] = scale * p * (dp[nt][r] - dsr[r >> 1]);
        }
      mma_p_product<MMA_KEYS / 8>(dq, sc, ks, s, c, l, dh, g, t);
    }
    mma_store(dqkv + (i64)b * len * ld3 + h * dh, ld3, dq, i0, len, dh, g, t);
    if (t == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = i0 + g + 8 * r;
        if (i < len) dsum[row0 + i] = dsr[r];
      }
    }
  }
}

// Backward, key pass: per key tile, over every query row (padded ones included, as in the
// composition) in steps of MMA_QUERIES: Pᵀ = exp(K·Qᵀ·scale − m)·inv and dPᵀ = V·dCᵀ
// recomputed, dSᵀ = scale·Pᵀ∘(dPᵀ − D), then dV += Pᵀ·dC and dK += dSᵀ·Q; into dqkv's K and V
// columns, zero for keys j ≥ lens[b].
extern "C" __global__ void __launch_bounds__(32 * MMA_WARPS)
    attn_mma_backward_kv_bf16(int heads, int len, int dh, const u32* __restrict__ lens, float scale,
                              const bf16* __restrict__ qkv, const float* __restrict__ saved,
                              const bf16* __restrict__ dctx, const float* __restrict__ dsum,
                              bf16* __restrict__ dqkv, u32* err) {
  extern __shared__ float mma_sm[];
  const int b = blockIdx.x / heads, h = blockIdx.x - b * heads;
  const int d = heads * dh, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int l = (int)seq_len(lens, b, len, err);
  const int lenp = (len + 15) & ~15, s = dh + MMA_PAD;
  const i64 ld3 = 3 * (i64)d, row0 = ((i64)b * heads + h) * len;
  const bf16* base = qkv + (i64)b * len * ld3 + h * dh;
  u16* qs = (u16*)mma_sm;
  u16* gs = qs + lenp * s;
  float* ms = (float*)(gs + lenp * s);
  float* invs = ms + lenp;
  float* dss = invs + lenp;
  mma_stage(qs, base, len, lenp, dh, ld3);
  mma_stage(gs, dctx + (i64)b * len * d + h * dh, len, lenp, dh, d);
  for (int i = threadIdx.x; i < lenp; i += blockDim.x) {
    ms[i] = i < len ? saved[(row0 + i) * 2] : 0.0f;
    invs[i] = i < len ? saved[(row0 + i) * 2 + 1] : 0.0f;
    dss[i] = i < len ? dsum[row0 + i] : 0.0f;
  }
  __syncthreads();
  for (int j0 = 16 * w; j0 < len; j0 += 16 * MMA_WARPS) {
    float dk[MMA_DH_MAX / 8][4], dv[MMA_DH_MAX / 8][4];
#pragma unroll
    for (int nt = 0; nt < MMA_DH_MAX / 8; ++nt) {
      dk[nt][0] = dk[nt][1] = dk[nt][2] = dk[nt][3] = 0.0f;
      dv[nt][0] = dv[nt][1] = dv[nt][2] = dv[nt][3] = 0.0f;
    }
    if (j0 < l) {
      u32 ka[MMA_DH_MAX / 16][4], va[MMA_DH_MAX / 16][4];
#pragma unroll
      for (int kk = 0; kk < MMA_DH_MAX / 16; ++kk) {
        if (16 * kk < dh) {
          mma_a_global(ka[kk], base + d, ld3, j0, l, 16 * kk, g, t);
          mma_a_global(va[kk], base + 2 * d, ld3, j0, l, 16 * kk, g, t);
        }
      }
      float pt[MMA_QUERIES / 8][4], dpt[MMA_QUERIES / 8][4];
      for (int c = 0; c < lenp; c += MMA_QUERIES) {
        mma_rows_product<MMA_QUERIES / 8>(pt, ka, qs, s, c, lenp, dh, g, t);
        mma_rows_product<MMA_QUERIES / 8>(dpt, va, gs, s, c, lenp, dh, g, t);
#pragma unroll
        for (int nt = 0; nt < MMA_QUERIES / 8; ++nt)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int i = c + 8 * nt + 2 * t + (r & 1), j = j0 + g + 8 * (r >> 1);
            // Query rows past lenp are never read (their k-steps are skipped).
            const int ic = i < lenp ? i : 0;
            const float p = mma_prob(pt[nt][r], scale, ms[ic], invs[ic], j, l);
            pt[nt][r] = p;
            dpt[nt][r] = scale * p * (dpt[nt][r] - dss[ic]);
          }
        mma_p_product<MMA_QUERIES / 8>(dv, pt, gs, s, c, lenp, dh, g, t);
        mma_p_product<MMA_QUERIES / 8>(dk, dpt, qs, s, c, lenp, dh, g, t);
      }
    }
    bf16* out = dqkv + (i64)b * len * ld3 + h * dh;
    mma_store(out + d, ld3, dk, j0, len, dh, g, t);
    mma_store(out + 2 * d, ld3, dv, j0, len, dh, g, t);
  }
}
