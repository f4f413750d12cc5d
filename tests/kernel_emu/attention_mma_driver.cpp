// Runs the tensor-core attention kernels (kernels/attention_mma.cu, emulated through shim.h)
// on one case: forward, backward query pass, backward key pass, launched as
// src/backend/cuda/attention.rs launches them (one block of 4 warps per (row, head)).
//
// Input file (little-endian): i32 batch, heads, len, dh; f32 scale; u32 lens[batch];
// u16 qkv[batch·len·3d] and u16 dctx[batch·len·d] as bf16 bits.
// Output file: u16 ctx[batch·len·d]; f32 saved[batch·heads·len·2]; u16 dqkv[batch·len·3d];
// f32 dsum[batch·heads·len]; u32 err. Outputs start as 0xff bytes (NaN), so an element no
// kernel wrote reads as NaN.

static void read_exact(FILE* f, void* p, size_t bytes) {
  if (fread(p, 1, bytes, f) != bytes) {
    fprintf(stderr, "short input\n");
    exit(2);
  }
}

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s INPUT OUTPUT\n", argv[0]);
    return 2;
  }
  FILE* in = fopen(argv[1], "rb");
  if (!in) {
    perror(argv[1]);
    return 2;
  }
  int32_t shape[4];
  float scale;
  read_exact(in, shape, sizeof shape);
  read_exact(in, &scale, sizeof scale);
  const int batch = shape[0], heads = shape[1], len = shape[2], dh = shape[3];
  const size_t d = (size_t)heads * dh, tokens = (size_t)batch * len;
  std::vector<u32> lens(batch);
  std::vector<uint16_t> qkv(tokens * 3 * d), dctx(tokens * d);
  read_exact(in, lens.data(), lens.size() * 4);
  read_exact(in, qkv.data(), qkv.size() * 2);
  read_exact(in, dctx.data(), dctx.size() * 2);
  fclose(in);

  std::vector<uint16_t> ctx(tokens * d, 0xffff), dqkv(tokens * 3 * d, 0xffff);
  std::vector<float> saved((size_t)batch * heads * len * 2), dsum((size_t)batch * heads * len);
  memset(saved.data(), 0xff, saved.size() * 4);
  memset(dsum.data(), 0xff, dsum.size() * 4);
  u32 err = 0;
  const bf16* q = reinterpret_cast<const bf16*>(qkv.data());
  const bf16* g = reinterpret_cast<const bf16*>(dctx.data());
  bf16* c = reinterpret_cast<bf16*>(ctx.data());
  bf16* dq = reinterpret_cast<bf16*>(dqkv.data());
  const int grid = batch * heads, threads = 32 * MMA_WARPS;
  emu::launch(grid, threads, [&] {
    attn_mma_forward_bf16(heads, len, dh, lens.data(), scale, q, c, saved.data(), &err);
  });
  emu::launch(grid, threads, [&] {
    attn_mma_backward_q_bf16(heads, len, dh, lens.data(), scale, q, saved.data(), g, dq, dsum.data(),
                             &err);
  });
  emu::launch(grid, threads, [&] {
    attn_mma_backward_kv_bf16(heads, len, dh, lens.data(), scale, q, saved.data(), g, dsum.data(),
                              dq, &err);
  });

  FILE* out = fopen(argv[2], "wb");
  if (!out) {
    perror(argv[2]);
    return 2;
  }
  fwrite(ctx.data(), 2, ctx.size(), out);
  fwrite(saved.data(), 4, saved.size(), out);
  fwrite(dqkv.data(), 2, dqkv.size(), out);
  fwrite(dsum.data(), 4, dsum.size(), out);
  fwrite(&err, 4, 1, out);
  return fclose(out) == 0 ? 0 : 2;
}
