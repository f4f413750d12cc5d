// Embedding family: gather (Sum / Concat) and its deterministic scatter-add backward, plus
// the learned positions counted back from the most recent event.
//
// One launch covers a group of fields (at most EMB_MAX_FIELDS, described by EmbFields, passed
// by value). The fields' rows form one key space: key = key0[f] + id, so a group's tables are
// addressed as one vocabulary of key0[count] rows.
//
// Backward in O(tokens), without float atomics: a stable counting sort of the (token, field)
// items by key, then one pass per key that adds its tokens' output gradients in token order.
//   1. emb_hist:     per chunk of items, a histogram of keys (integer atomics: exact counts);
//                    ids beyond their vocabulary raise the fault flag and are left out, and
//                    so are padded tokens when the sequences' lengths are given.
//   2. emb_col_scan: per key, exclusive prefix of the counts over the chunks (in place) and
//                    the key's total.
//   3. emb_key_scan: exclusive prefix of the totals over the keys: starts[key].
//   4. emb_place:    one warp per chunk walks its items in order and writes each token index
//                    at starts[key] + (earlier items of the key) — a stable placement.
//   5. emb_rows:     one block per key (× column tiles): grad[row, c] += dout[token, c] for
//                    the key's tokens in increasing token order.
// Each gradient element therefore receives its terms in token order, the CPU reference's
// order, and the result is bit-identical from run to run whatever the grid.

#define EMB_MAX_FIELDS 32
#define EMB_SCAN_THREADS 1024

struct EmbFields {
  int count;                       // fields in the group
  int first;                       // the group's first field among the ids' columns
  u32 key0[EMB_MAX_FIELDS + 1];    // key0[f]: first key of field f; key0[count]: keys in all
  i64 offset[EMB_MAX_FIELDS];      // element offset of field f's table (params / grads)
  int col0[EMB_MAX_FIELDS];        // first column of field f's slice of out / dout
};

// The field of `key` (linear search: a group has at most EMB_MAX_FIELDS fields).
__device__ __forceinline__ int emb_field_of(const EmbFields& g, u32 key) {
  int f = 0;
  while (f + 1 < g.count && key >= g.key0[f + 1]) ++f;
  return f;
}

// Gather. Sum mode (`sum` = 1): out[i, c] (+)= Σ_f table_f[id_f, c], fields in order, one
// thread per (token, column); `accumulate` adds to out (a group after the first). Concat
// mode: out[i, col0_f + c] = table_f[id_f, c], one thread per (token, field, column). A bad
// id reads nothing (contributes 0) and raises the fault flag.
template <typename TP, typename TO>
__device__ __forceinline__ void emb_gather(int n, int width, int fields, const EmbFields& g,
                                           const u32* __restrict__ ids, const TP* __restrict__ params,
                                           TO* __restrict__ out, i64 out_ld, int sum, int accumulate,
                                           u32* err) {
  const int per_token = sum ? width : g.count * width;
  const i64 total = (i64)n * per_token;
  for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < total;
       e += (i64)gridDim.x * blockDim.x) {
    const i64 i = e / per_token;
    const int r = (int)(e % per_token);
    const u32* row_ids = ids + i * fields + g.first;
    if (sum) {
      float v = accumulate ? ld(out, i * out_ld + r) : 0.0f;
      for (int f = 0; f < g.count; ++f) {
        const u32 id = row_ids[f];
        if (id < g.key0[f + 1] - g.key0[f]) v += ld(params, g.offset[f] + (i64)id * width + r);
        else atomicOr(err, MGKD_ERR_ID);
      }
      st(out, i * out_ld + r, v);
    } else {
      const int f = r / width, c = r % width;
      const u32 id = row_ids[f];
      float v = 0.0f;
      if (id < g.key0[f + 1] - g.key0[f]) v = ld(params, g.offset[f] + (i64)id * width + c);
      else atomicOr(err, MGKD_ERR_ID);
      st(out, i * out_ld + g.col0[f] + c, v);
    }
  }
}

extern "C" __global__ void emb_gather_f32(int n, int width, int fields, EmbFields g,
                                          const u32* __restrict__ ids,
                                          const float* __restrict__ params,
                                          float* __restrict__ out, i64 out_ld, int sum,
                                          int accumulate, u32* err) {
  emb_gather(n, width, fields, g, ids, params, out, out_ld, sum, accumulate, err);
}

// Tables (the weights' copy) bf16, out bf16 (the profile row a product reads).
extern "C" __global__ void emb_gather_bf16(int n, int width, int fields, EmbFields g,
                                           const u32* __restrict__ ids,
                                           const bf16* __restrict__ params,
                                           bf16* __restrict__ out, i64 out_ld, int sum,
                                           int accumulate, u32* err) {
  emb_gather(n, width, fields, g, ids, params, out, out_ld, sum, accumulate, err);
}

// Tables bf16, out f32 (the residual stream of a sequence encoder).
extern "C" __global__ void emb_gather_bf16_f32(int n, int width, int fields, EmbFields g,
                                               const u32* __restrict__ ids,
                                               const bf16* __restrict__ params,
                                               float* __restrict__ out, i64 out_ld, int sum,
                                               int accumulate, u32* err) {
  emb_gather(n, width, fields, g, ids, params, out, out_ld, sum, accumulate, err);
}

// Key of item e = i·count + f (token i, field f of the group); EMB_BAD_ID for an id beyond
// its vocabulary, EMB_SKIP for a padded token (with valid_lens: token i is row i / valid_len,
// slot i % valid_len, valid below the row's length).
#define EMB_BAD_ID 0xffffffffu
#define EMB_SKIP 0xfffffffeu
__device__ __forceinline__ u32 emb_key(const EmbFields& g, const u32* __restrict__ ids, int fields,
                                       const u32* __restrict__ valid_lens, int valid_len, i64 e) {
  const i64 i = e / g.count;
  const int f = (int)(e % g.count);
  if (valid_lens && (u32)(i % valid_len) >= valid_lens[i / valid_len]) return EMB_SKIP;
  const u32 id = ids[i * fields + g.first + f];
  return id < g.key0[f + 1] - g.key0[f] ? g.key0[f] + id : EMB_BAD_ID;
}

// Pass 1. Grid: one block per chunk of `chunk` items; hist is chunks × keys.
extern "C" __global__ void emb_hist(int n, int fields, EmbFields g, const u32* __restrict__ ids,
                                    const u32* __restrict__ valid_lens, int valid_len, int chunk,
                                    u32* __restrict__ hist, u32* err) {
  const u32 keys = g.key0[g.count];
  u32* h = hist + (i64)blockIdx.x * keys;
  for (u32 k = threadIdx.x; k < keys; k += blockDim.x) h[k] = 0;
  __syncthreads();
  const i64 items = (i64)n * g.count;
  const i64 begin = (i64)blockIdx.x * chunk;
  const i64 end = min(items, begin + chunk);
  for (i64 e = begin + threadIdx.x; e < end; e += blockDim.x) {
    const u32 key = emb_key(g, ids, fields, valid_lens, valid_len, e);
    if (key < EMB_SKIP) atomicAdd(&h[key], 1u);
    else if (key == EMB_BAD_ID) atomicOr(err, MGKD_ERR_ID);
  }
}

// Pass 2. One thread per key: hist[c, key] ← Σ_{c' < c} hist[c', key]; totals[key] = Σ_c.
extern "C" __global__ void emb_col_scan(int chunks, u32 keys, u32* __restrict__ hist,
                                        u32* __restrict__ totals) {
  const u32 key = blockIdx.x * blockDim.x + threadIdx.x;
  if (key >= keys) return;
  u32 run = 0;
  int c = 0;
  // 16 chunks' counts loaded before any is overwritten: the compiler cannot tell that a store
  // does not feed the next load, so one at a time each would wait a full memory round trip.
  for (; c + 16 <= chunks; c += 16) {
    u32 t[16];
#pragma unroll
    for (int u = 0; u < 16; ++u) t[u] = hist[(i64)(c + u) * keys + key];
#pragma unroll
    for (int u = 0; u < 16; ++u) {
      hist[(i64)(c + u) * keys + key] = run;
      run += t[u];
    }
  }
  for (; c < chunks; ++c) {
    const u32 t = hist[(i64)c * keys + key];
    hist[(i64)c * keys + key] = run;
    run += t;
  }
  totals[key] = run;
}

// Pass 3. One block of EMB_SCAN_THREADS: starts[key] = Σ_{k < key} totals[k], for key ≤ keys
// (starts[keys] = all valid items). `starts` may alias `totals` shifted by one: totals[k]
// lives at starts[k + 1].
extern "C" __global__ void emb_key_scan(u32 keys, u32* __restrict__ starts) {
  __shared__ u32 sh[EMB_SCAN_THREADS];
  u32 carry = 0;
  for (u32 base = 0; base < keys; base += EMB_SCAN_THREADS) {
    const u32 k = base + threadIdx.x;
    const u32 v = k < keys ? starts[k + 1] : 0;
    sh[threadIdx.x] = v;
    __syncthreads();
    // Inclusive Hillis–Steele scan of the tile.
    for (int o = 1; o < EMB_SCAN_THREADS; o <<= 1) {
      const u32 add = threadIdx.x >= (u32)o ? sh[threadIdx.x - o] : 0;
      __syncthreads();
      sh[threadIdx.x] += add;
      __syncthreads();
    }
    if (k < keys) starts[k + 1] = carry + sh[threadIdx.x];
    carry += sh[EMB_SCAN_THREADS - 1];
    __syncthreads();
  }
  if (threadIdx.x == 0) starts[0] = 0;
}

// Pass 4. One warp per chunk: items in order, 32 at a time; lanes holding the same key get
// consecutive slots in lane order after the key's earlier items.
extern "C" __global__ void emb_place(int n, int fields, EmbFields g, const u32* __restrict__ ids,
                                     const u32* __restrict__ valid_lens, int valid_len, int chunk,
                                     u32* __restrict__ hist,
                                     const u32* __restrict__ starts, u32* __restrict__ sorted) {
  const u32 keys = g.key0[g.count];
  u32* h = hist + (i64)blockIdx.x * keys;
  const i64 items = (i64)n * g.count;
  const i64 begin = (i64)blockIdx.x * chunk;
  const i64 end = min(items, begin + chunk);
  const u32 lane = threadIdx.x;
  for (i64 e0 = begin; e0 < end; e0 += 32) {
    const i64 e = e0 + lane;
    const u32 key = e < end ? emb_key(g, ids, fields, valid_lens, valid_len, e) : EMB_BAD_ID;
    const u32 same = __match_any_sync(0xffffffffu, key);
    const u32 rank = __popc(same & ((1u << lane) - 1u));
    u32 before = 0;
    if (key < EMB_SKIP) before = h[key];
    __syncwarp();
    if (key < EMB_SKIP) {
      sorted[starts[key] + before + rank] = (u32)(e / g.count);
      if (rank == 0) h[key] = before + __popc(same);
    }
    __syncwarp();
  }
}

// Pass 5. Grid (keys, column tiles of blockDim.x): grad[offset_f + row·width + c] += the
// key's tokens' dout[token·dout_ld + col0_f + c], in token order, in f32 (grad is f32).
template <typename TD>
__device__ __forceinline__ void emb_rows(int width, const EmbFields& g, const u32* __restrict__ starts,
                                         const u32* __restrict__ sorted, const TD* __restrict__ dout,
                                         i64 dout_ld, float* __restrict__ grad) {
  const u32 key = blockIdx.x;
  const int c = blockIdx.y * blockDim.x + threadIdx.x;
  const u32 s = starts[key], t_end = starts[key + 1];
  if (c >= width || s == t_end) return;
  const int f = emb_field_of(g, key);
  float* gp = grad + g.offset[f] + (i64)(key - g.key0[f]) * width + c;
  const TD* d = dout + g.col0[f] + c;
  float acc = *gp;
  // Unrolled so that 16 tokens' index and gradient loads are in flight at once (a frequent id
  // has thousands of tokens); added in order.
#pragma unroll 16
  for (u32 t = s; t < t_end; ++t) acc += ld(d, (i64)sorted[t] * dout_ld);
  *gp = acc;
}

extern "C" __global__ void emb_rows_f32(int width, EmbFields g, const u32* __restrict__ starts,
                                        const u32* __restrict__ sorted,
                                        const float* __restrict__ dout, i64 dout_ld,
                                        float* __restrict__ grad) {
  emb_rows(width, g, starts, sorted, dout, dout_ld, grad);
}

// dout bf16, grad f32.
extern "C" __global__ void emb_rows_bf16(int width, EmbFields g, const u32* __restrict__ starts,
                                         const u32* __restrict__ sorted,
                                         const bf16* __restrict__ dout, i64 dout_ld,
                                         float* __restrict__ grad) {
  emb_rows(width, g, starts, sorted, dout, dout_ld, grad);
}

// x[b,t,:] += pos[ℓ−1−t, :] for t < ℓ = lens[b]; padded slots untouched.
template <typename TP>
__device__ __forceinline__ void add_positions(int batch, int max_len, int d, const u32* __restrict__ lens,
                                              const TP* __restrict__ pos, float* __restrict__ x, u32* err) {
  const i64 total = (i64)batch * max_len * d;
  for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
    const i64 b = e / ((i64)max_len * d);
    const int t = (int)((e / d) % max_len), c = (int)(e % d);
    u32 l = lens[b];
    if (l > (u32)max_len) {
      atomicOr(err, MGKD_ERR_LEN);
      l = max_len;
    }
    if ((u32)t < l) x[e] += ld(pos, (i64)(l - 1 - t) * d + c);
  }
}

extern "C" __global__ void add_positions_f32(int batch, int max_len, int d, const u32* __restrict__ lens,
                                             const float* __restrict__ pos, float* __restrict__ x, u32* err) {
  add_positions(batch, max_len, d, lens, pos, x, err);
}

// Positions (the weights' copy) bf16, the residual stream x f32.
extern "C" __global__ void add_positions_bf16(int batch, int max_len, int d, const u32* __restrict__ lens,
                                              const bf16* __restrict__ pos, float* __restrict__ x, u32* err) {
  add_positions(batch, max_len, d, lens, pos, x, err);
}

// Pass 1 of the position gradient: partial[k, p, :] = Σ_b dx[b, ℓ_b−1−p, :] over the rows b
// of chunk k (rows k·chunk_rows .. +chunk_rows, in order) with p < ℓ_b. One thread per
// (c, p, k): grid (⌈d/blockDim⌉, max_len, chunks). Pass 2 is col_finish_f32 over
// max_len·d columns, adding the chunks in order into dpos (a fixed order: deterministic).
extern "C" __global__ void add_positions_partial_f32(int batch, int max_len, int d, int chunk_rows,
                                                     const u32* __restrict__ lens,
                                                     const float* __restrict__ dx,
                                                     float* __restrict__ partial, u32* err) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int p = blockIdx.y;
  if (c >= d) return;
  const int b0 = blockIdx.z * chunk_rows;
  const int b1 = min(batch, b0 + chunk_rows);
  float acc = 0.0f;
  for (int b = b0; b < b1; ++b) {
    u32 l = lens[b];
    if (l > (u32)max_len) {
      atomicOr(err, MGKD_ERR_LEN);
      l = max_len;
    }
    if ((u32)p < l) acc += dx[((i64)b * max_len + (l - 1 - p)) * d + c];
  }
  partial[((i64)blockIdx.z * max_len + p) * d + c] = acc;
}
