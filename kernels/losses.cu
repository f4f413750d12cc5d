// The losses of docs/model.md §5, each one fused launch computing the per-row loss terms (in
// double, one slot per row) and, when a gradient pointer is given, accumulating coef·∂L/∂input;
// then reduce_terms adds the row terms in a fixed order (strided per thread, then a fixed tree),
// applies the final scale and stores the value as a float in the caller's slot on the device
// (nothing is read back here).

// Number of rows b < n with lens[b] > 0, for every thread of the block (integer sums are
// exact, so any order gives the same count). `sh` holds at least one u32.
__device__ __forceinline__ u32 block_count_nonzero(int n, const u32* __restrict__ lens, u32* sh) {
  if (threadIdx.x == 0) *sh = 0;
  __syncthreads();
  u32 c = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) c += lens[i] > 0;
  atomicAdd(sh, c);
  __syncthreads();
  const u32 total = *sh;
  __syncthreads();
  return total;
}

// out[0] = (float)(scale · Σ_i terms[i]); a single block (blockDim.x a multiple of 32). With
// `count_lens`, scale = 1/|{b < count_n : count_lens[b] > 0}| (0 when that set is empty).
extern "C" __global__ void reduce_terms(int n, const double* __restrict__ terms, double scale,
                                        const u32* __restrict__ count_lens, int count_n,
                                        float* __restrict__ out) {
  __shared__ double sh[32];
  __shared__ u32 cnt;
  double acc = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) acc += terms[i];
  const double total = block_sum_d(acc, sh);
  if (count_lens) {
    const u32 r = block_count_nonzero(count_n, count_lens, &cnt);
    scale = r == 0 ? 0.0 : 1.0 / (double)r;
  }
  if (threadIdx.x == 0) out[0] = (float)(total * scale);
}

// Weighted BCE on logits: term_i = w·(softplus(z) − y·z); dz += f·w·(σ(z) − y), f = coef/n.
extern "C" __global__ void bce_f32(int n, const float* __restrict__ z, const float* __restrict__ y,
                                   const float* __restrict__ w, float f, float* __restrict__ dz,
                                   double* __restrict__ terms) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const float zi = z[i], yi = y[i], wi = w[i];
    terms[i] = (double)(wi * (softplusf(zi) - yi * zi));
    if (dz) dz[i] += f * wi * (sigmoidf(zi) - yi);
  }
}

// Temperature-scaled Bernoulli KL, a = t/τ, b = s/τ:
// term_i = w·(softplus(b) − softplus(a) + σ(a)·(a − b)); ds += f·w·(σ(b) − σ(a)), f = coef·τ/n.
// w = null means weights 1.
extern "C" __global__ void bernoulli_kl_f32(int n, const float* __restrict__ s, const float* __restrict__ t,
                                            const float* __restrict__ w, float inv_tau, float f,
                                            float* __restrict__ ds, double* __restrict__ terms) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const float wi = w ? w[i] : 1.0f;
    const float a = t[i] * inv_tau, b = s[i] * inv_tau;
    terms[i] = (double)(wi * (softplusf(b) - softplusf(a) + sigmoidf(a) * (a - b)));
    if (ds) ds[i] += f * wi * (sigmoidf(b) - sigmoidf(a));
  }
}

// Coarse alignment, one warp per row. MSE: term = w·‖p − t‖²/d, dp += 2·coef·w/(n·d)·(p − t).
// Cosine: term = w·(1 − cos), dp += coef·w/n·(cos·p/‖p‖² − t/(‖p‖‖t‖)); a zero vector has
// cosine 0 and no gradient.
template <typename T>
__device__ __forceinline__ void coarse(int n, int d, const T* __restrict__ p, const T* __restrict__ t,
                                       const float* __restrict__ w, int cosine, float coef_over_n,
                                       T* __restrict__ dp, double* __restrict__ terms) {
  const int lane = threadIdx.x & 31;
  const int i = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (i >= n) return;
  const T* pr = p + (i64)i * d;
  const T* tr = t + (i64)i * d;
  const float wi = w[i];
  const float inv_d = 1.0f / (float)d;
  if (cosine) {
    float pp = 0.0f, tt = 0.0f, pt = 0.0f;
    for (int j = lane; j < d; j += 32) {
      const float pj = ld(pr, j), tj = ld(tr, j);
      pp += pj * pj;
      tt += tj * tj;
      pt += pj * tj;
    }
    pp = warp_sum(pp);
    tt = warp_sum(tt);
    pt = warp_sum(pt);
    if (pp == 0.0f || tt == 0.0f) {
      if (lane == 0) terms[i] = (double)wi;
      return;
    }
    const float np = sqrtf(pp), nt = sqrtf(tt);
    const float cs = pt / (np * nt);
    if (dp) {
      const float f = coef_over_n * wi;
      T* g = dp + (i64)i * d;
      for (int j = lane; j < d; j += 32) st(g, j, ld(g, j) + f * (cs * ld(pr, j) / pp - ld(tr, j) / (np * nt)));
    }
    if (lane == 0) terms[i] = (double)(wi * (1.0f - cs));
  } else {
    float se = 0.0f;
    for (int j = lane; j < d; j += 32) {
      const float e = ld(pr, j) - ld(tr, j);
      se += e * e;
    }
    se = warp_sum(se);
    if (dp) {
      const float f = 2.0f * coef_over_n * wi * inv_d;
      T* g = dp + (i64)i * d;
      for (int j = lane; j < d; j += 32) st(g, j, ld(g, j) + f * (ld(pr, j) - ld(tr, j)));
    }
    if (lane == 0) terms[i] = (double)(wi * se * inv_d);
  }
}

extern "C" __global__ void coarse_f32(int n, int d, const float* __restrict__ p, const float* __restrict__ t,
                                      const float* __restrict__ w, int cosine, float coef_over_n,
                                      float* __restrict__ dp, double* __restrict__ terms) {
  coarse(n, d, p, t, w, cosine, coef_over_n, dp, terms);
}

// p, t and dp bf16; w f32.
extern "C" __global__ void coarse_bf16(int n, int d, const bf16* __restrict__ p, const bf16* __restrict__ t,
                                       const float* __restrict__ w, int cosine, float coef_over_n,
                                       bf16* __restrict__ dp, double* __restrict__ terms) {
  coarse(n, d, p, t, w, cosine, coef_over_n, dp, terms);
}

// Query tokens a warp of the fine kernel handles at once (FINE_GROUP in src/backend/cuda/mod.rs):
// every key and teacher-token load is reused for all of them.
#define FINE_G 4

// One stage of warp_reduce_scatter32: lanes H apart exchange halves of their first 2H values;
// each keeps the half its lane bit H selects, own value + the partner's.
template <int H>
__device__ __forceinline__ void reduce_scatter_stage(float (&v)[32], int lane) {
  const bool hi = (lane & H) != 0;
#pragma unroll
  for (int i = 0; i < H; ++i) {
    const float send = hi ? v[i] : v[i + H];
    const float keep = hi ? v[i + H] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, H);
  }
}

// Sums of 32 values over the warp, in one reduce-scatter: lane l returns Σ_lanes v[l]. Each sum
// is formed by the same butterfly as warp_sum (partners 16, 8, 4, 2, 1 apart, own value + the
// partner's), so it is bit-identical to warp_sum of that value, with 31 shuffles for the 32
// sums instead of 160.
__device__ __forceinline__ float warp_reduce_scatter32(float (&v)[32]) {
  const int lane = threadIdx.x & 31;
  reduce_scatter_stage<16>(v, lane);
  reduce_scatter_stage<8>(v, lane);
  reduce_scatter_stage<4>(v, lane);
  reduce_scatter_stage<2>(v, lane);
  reduce_scatter_stage<1>(v, lane);
  return v[0];
}

// Products of the warp's FINE_G vectors x (shared memory, slots t ≥ nt hold zeros and are not
// stored) with the rows k < nk of M (global): s_tk = scale · Σ_c x[t·d + c]·M[k·d + c], stored as
// out[t·lk + k] = s_tk, or with SCALE_BY as out[t·lk + k] = out[t·lk + k]·(s_tk + shift[t]) (each
// element read and rewritten by the lane that forms s_tk). Lanes split c as warp_sum's callers
// do (c = lane, lane + 32, …, in order); eight rows of M at a time, their FINE_G·8 dot products
// reduced together.
template <bool SCALE_BY, typename E>
__device__ __forceinline__ void fine_products(int d, u32 nk, int nt, const float* __restrict__ x,
                                              const E* __restrict__ M, float scale,
                                              const float (&shift)[FINE_G], float* out, int lk) {
  const int lane = threadIdx.x & 31;
  const int t = lane >> 3, u = lane & 7;
  float my_shift = 0.0f;
#pragma unroll
  for (int i = 0; i < FINE_G; ++i)
    if (i == t) my_shift = shift[i];
  for (u32 k0 = 0; k0 < nk; k0 += 8) {
    float p[FINE_G * 8];
#pragma unroll
    for (int i = 0; i < FINE_G * 8; ++i) p[i] = 0.0f;
    for (int c = lane; c < d; c += 32) {
      float m[8];
#pragma unroll
      for (int v = 0; v < 8; ++v) m[v] = k0 + v < nk ? ld(M, (i64)(k0 + v) * d + c) : 0.0f;
#pragma unroll
      for (int i = 0; i < FINE_G; ++i) {
        const float xv = x[i * d + c];
#pragma unroll
        for (int v = 0; v < 8; ++v) p[i * 8 + v] += xv * m[v];
      }
    }
    const float s = warp_reduce_scatter32(p);
    if (t < nt && k0 + u < nk) {
      float* o = out + t * lk + k0 + u;
      *o = SCALE_BY ? *o * (scale * s + my_shift) : scale * s;
    }
  }
}

// acc[t] = Σ_{k<nk} a[t·lk + k]·M[k·d + c] for column c and the first nt of the warp's FINE_G
// rows of a (shared memory), keys in increasing order; acc[t ≥ nt] = 0.
template <typename E>
__device__ __forceinline__ void fine_mix(int c, int d, u32 nk, int nt, const float* __restrict__ a,
                                         int lk, const E* __restrict__ M, float acc[FINE_G]) {
#pragma unroll
  for (int t = 0; t < FINE_G; ++t) acc[t] = 0.0f;
  for (u32 kk = 0; kk < nk; ++kk) {
    const float mv = ld(M, (i64)kk * d + c);
#pragma unroll
    for (int t = 0; t < FINE_G; ++t)
      if (t < nt) acc[t] += a[t * lk + kk] * mv;
  }
}

// Behaviour-level alignment (L_fine, docs/model.md §5.6), one block per batch row b; each warp
// takes FINE_G student tokens j at a time (of a tile of J tokens). The queries come in the
// teacher tokens' space (q_j = W_kᵀ·(W_q·x_j + b_q), src/loss/mod.rs `fine_term`), so the keys are
// the teacher tokens t_k themselves. For ℓq = q_lens[b] > 0 and ℓk = k_lens[b] > 0:
//   A_j = softmax_k(q_j·t_k/√d), c_j = Σ_k A_jk·t_k, r_j = v_j − c_j, e_j = ‖r_j‖²/d,
//   term_b = w_b·mean_j e_j (0 for a row with no query or no key).
// Gradients, G = 2·f·w_b/(d·ℓq) with f = coef/|R| (|R| counted here from k_lens): dv_j += G·r_j;
// dA_jk = −G·r_j·t_k, whose A-weighted sum over k is −G·r_j·c_j; dS_jk = A_jk·(dA_jk + G·r_j·c_j)
// (written over A_j in shared memory); dq_j += Σ_k dS_jk·t_k/√d. Padded tokens (j ≥ ℓq,
// k ≥ ℓk) are never read. Each sum has a fixed order (lanes over columns, warp_sum trees, keys
// in increasing order; the row's loss over its tokens in order), so two runs are bit-identical.
// Dynamic shared memory: warps·FINE_G·(lk + d) + J floats.
template <typename E>
__device__ __forceinline__ void fine(int batch, int lq, int lk, int d, int J, const E* __restrict__ q,
                                     const E* __restrict__ v, const E* __restrict__ tin,
                                     const u32* __restrict__ q_lens, const u32* __restrict__ k_lens,
                                     const float* __restrict__ w, float coef, E* __restrict__ dq,
                                     E* __restrict__ dv, double* __restrict__ terms, u32* err) {
  extern __shared__ float sm[];
  __shared__ u32 n_r;
  const int b = blockIdx.x;
  const float f = coef / (float)block_count_nonzero(batch, k_lens, &n_r);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  u32 Lq = q_lens[b], Lk = k_lens[b];
  if (Lq > (u32)lq || Lk > (u32)lk) {
    if (threadIdx.x == 0) atomicOr(err, MGKD_ERR_LEN);
    Lq = min(Lq, (u32)lq);
    Lk = min(Lk, (u32)lk);
  }
  if (Lq == 0 || Lk == 0) {
    if (threadIdx.x == 0) terms[b] = 0.0;
    return;
  }
  const bool grad = dq != nullptr;
  const E* Q = q + (i64)b * lq * d;
  const E* V = v + (i64)b * lq * d;
  const E* T = tin + (i64)b * lk * d;
  float* ss = sm + warp * FINE_G * (lk + d);  // this warp's FINE_G rows: scores, A, then dS
  float* sv = ss + FINE_G * lk;               // this warp's FINE_G vectors: q_j, then r_j
  float* es = sm + nw * FINE_G * (lk + d);    // J token errors of the tile
  const float inv_sqrt_d = 1.0f / sqrtf((float)d);
  const float inv_d = 1.0f / (float)d;
  const float G = 2.0f * (f * w[b]) * inv_d / (float)Lq;
  const float no_shift[FINE_G] = {};
  double loss = 0.0;
  for (u32 j0 = 0; j0 < Lq; j0 += J) {
    const u32 tj = min((u32)J, Lq - j0);
    for (u32 g0 = warp * FINE_G; g0 < tj; g0 += nw * FINE_G) {
      const int nt = (int)min((u32)FINE_G, tj - g0);  // the group's tokens: j0 + g0 + t, t < nt
      for (int t = 0; t < FINE_G; ++t)
        for (int c = lane; c < d; c += 32)
          sv[t * d + c] = t < nt ? ld(Q, (i64)(j0 + g0 + t) * d + c) : 0.0f;
      __syncwarp();
      fine_products<false>(d, Lk, nt, sv, T, inv_sqrt_d, no_shift, ss, lk);
      __syncwarp();
      for (int t = 0; t < nt; ++t) {
        float* st_ = ss + t * lk;
        float mx = -MGKD_INF;
        for (u32 kk = lane; kk < Lk; kk += 32) mx = fmaxf(mx, st_[kk]);
        mx = warp_max(mx);
        float sum = 0.0f;
        for (u32 kk = lane; kk < Lk; kk += 32) {
          const float e = expf(st_[kk] - mx);
          st_[kk] = e;
          sum += e;
        }
        const float inv = 1.0f / warp_sum(sum);
        for (u32 kk = lane; kk < Lk; kk += 32) st_[kk] *= inv;
      }
      __syncwarp();
      float e2[FINE_G], rc[FINE_G];
#pragma unroll
      for (int t = 0; t < FINE_G; ++t) e2[t] = rc[t] = 0.0f;
      for (int c = lane; c < d; c += 32) {
        float acc[FINE_G];
        fine_mix(c, d, Lk, nt, ss, lk, T, acc);
#pragma unroll
        for (int t = 0; t < FINE_G; ++t) {
          if (t < nt) {
            const float r = ld(V, (i64)(j0 + g0 + t) * d + c) - acc[t];
            sv[t * d + c] = r;
            e2[t] += r * r;
            rc[t] += r * acc[t];
          } else {
            sv[t * d + c] = 0.0f;
          }
        }
      }
      float shift[FINE_G];  // G·r_j·c_j: minus the A-weighted sum of dA_j
#pragma unroll
      for (int t = 0; t < FINE_G; ++t) {
        const float e = warp_sum(e2[t]);
        if (lane == 0 && t < nt) es[g0 + t] = e * inv_d;
        shift[t] = grad ? G * warp_sum(rc[t]) : 0.0f;
      }
      __syncwarp();
      if (grad) {
        // Each read-modify-write of a gradient loads every old value it will need before it
        // stores any: the compiler cannot tell the stores from the next loads, so one at a
        // time each load would wait for the previous store.
        const i64 row = (i64)b * lq + j0 + g0;
        for (int c = lane; c < d; c += 32) {
          float old[FINE_G];
#pragma unroll
          for (int t = 0; t < FINE_G; ++t)
            if (t < nt) old[t] = ld(dv, (row + t) * d + c);
#pragma unroll
          for (int t = 0; t < FINE_G; ++t)
            if (t < nt) st(dv, (row + t) * d + c, old[t] + G * sv[t * d + c]);
        }
        // dS over A, in place.
        fine_products<true>(d, Lk, nt, sv, T, -G, shift, ss, lk);
        __syncwarp();
        for (int c = lane; c < d; c += 32) {
          float old[FINE_G], acc[FINE_G];
#pragma unroll
          for (int t = 0; t < FINE_G; ++t)
            if (t < nt) old[t] = ld(dq, (row + t) * d + c);
          fine_mix(c, d, Lk, nt, ss, lk, T, acc);
#pragma unroll
          for (int t = 0; t < FINE_G; ++t)
            if (t < nt) st(dq, (row + t) * d + c, old[t] + inv_sqrt_d * acc[t]);
        }
      }
      __syncwarp();
    }
    __syncthreads();
    if (threadIdx.x == 0)
      for (u32 jj = 0; jj < tj; ++jj) loss += (double)es[jj];
    __syncthreads();
  }
  if (threadIdx.x == 0) terms[b] = (double)w[b] * (loss / (double)Lq);
}

extern "C" __global__ void fine_f32(int batch, int lq, int lk, int d, int J, const float* __restrict__ q,
                                    const float* __restrict__ v, const float* __restrict__ tin,
                                    const u32* __restrict__ q_lens, const u32* __restrict__ k_lens,
                                    const float* __restrict__ w, float coef, float* __restrict__ dq,
                                    float* __restrict__ dv, double* __restrict__ terms, u32* err) {
  fine(batch, lq, lk, d, J, q, v, tin, q_lens, k_lens, w, coef, dq, dv, terms, err);
}

// q, v, tin and their gradients bf16; w f32.
extern "C" __global__ void fine_bf16(int batch, int lq, int lk, int d, int J, const bf16* __restrict__ q,
                                     const bf16* __restrict__ v, const bf16* __restrict__ tin,
                                     const u32* __restrict__ q_lens, const u32* __restrict__ k_lens,
                                     const float* __restrict__ w, float coef, bf16* __restrict__ dq,
                                     bf16* __restrict__ dv, double* __restrict__ terms, u32* err) {
  fine(batch, lq, lk, d, J, q, v, tin, q_lens, k_lens, w, coef, dq, dv, terms, err);
}
