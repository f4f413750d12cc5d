// Runs one set of fused attention kernels (emulated through shim.h) on one case: forward,
// backward query pass, backward key pass, launched as src/backend/cuda/attention.rs launches
// them (one block of 4 warps per (row, head)). The test compiles it with
//   -DELEM=bf16|float  the element type of qkv, ctx, dctx and dqkv;
//   -DATTN_FORWARD=… -DATTN_BACKWARD_Q=… -DATTN_BACKWARD_KV=…  the three kernels.
//
// Input file (little-endian): i32 batch, heads, len, dh; f32 scale; u32 lens[batch];
// ELEM qkv[batch·len·3d] and ELEM dctx[batch·len·d].
// Output file: ELEM ctx[batch·len·d]; f32 saved[batch·heads·len·2]; ELEM dqkv[batch·len·3d];
// f32 dsum[batch·heads·len]; u32 err. Outputs start as 0xff bytes (NaN as f32 and as bf16),
// so an element no kernel wrote reads as NaN.

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
  std::vector<ELEM> qkv(tokens * 3 * d), dctx(tokens * d);
  read_exact(in, lens.data(), lens.size() * 4);
  read_exact(in, qkv.data(), qkv.size() * sizeof(ELEM));
  read_exact(in, dctx.data(), dctx.size() * sizeof(ELEM));
  fclose(in);

  std::vector<ELEM> ctx(tokens * d), dqkv(tokens * 3 * d);
  std::vector<float> saved((size_t)batch * heads * len * 2), dsum((size_t)batch * heads * len);
  memset(ctx.data(), 0xff, ctx.size() * sizeof(ELEM));
  memset(dqkv.data(), 0xff, dqkv.size() * sizeof(ELEM));
  memset(saved.data(), 0xff, saved.size() * 4);
  memset(dsum.data(), 0xff, dsum.size() * 4);
  u32 err = 0;
  const int grid = batch * heads, threads = 128;
  emu::launch(grid, threads, [&] {
    ATTN_FORWARD(heads, len, dh, lens.data(), scale, qkv.data(), ctx.data(), saved.data(), &err);
  });
  emu::launch(grid, threads, [&] {
    ATTN_BACKWARD_Q(heads, len, dh, lens.data(), scale, qkv.data(), saved.data(), dctx.data(),
                    dqkv.data(), dsum.data(), &err);
  });
  emu::launch(grid, threads, [&] {
    ATTN_BACKWARD_KV(heads, len, dh, lens.data(), scale, qkv.data(), saved.data(), dctx.data(),
                     dsum.data(), dqkv.data(), &err);
  });

  FILE* out = fopen(argv[2], "wb");
  if (!out) {
    perror(argv[2]);
    return 2;
  }
  fwrite(ctx.data(), sizeof(ELEM), ctx.size(), out);
  fwrite(saved.data(), 4, saved.size(), out);
  fwrite(dqkv.data(), sizeof(ELEM), dqkv.size(), out);
  fwrite(dsum.data(), 4, dsum.size(), out);
  fwrite(&err, 4, 1, out);
  return fclose(out) == 0 ? 0 : 2;
}
