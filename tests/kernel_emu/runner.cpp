// The emulator's main (after shim.h, kernels/common.cuh, one kernel file and the dispatcher
// that tests/kernel_emu/mod.rs generates from the launch table): reads buffers and a list of
// launches, runs the launches in order on the emulated device, writes the buffers back.
//
// Input file (little-endian):
//   u32 buffers; per buffer: u32 element bytes, u64 elements, the bytes;
//   u32 launches; per launch: u32 name length, the name, u32 grid x, u32 grid y, u32 block,
//   u32 shared bytes, u32 arguments; per argument: u32 kind (0 buffer, 1 integer, 2 f32,
//   3 f64, 4 null pointer, 5 buffer at a byte offset), u64 payload (the buffer's index, the
//   integer, the float's bits, or index | byte offset << 16).
// Output file: every buffer's bytes, in order. Exit status 3 with a message on stderr when a
// launch is malformed or a block writes past its shared memory, 4 for an unknown kernel.


static void emu_read(FILE* f, void* p, size_t bytes) {
  if (fread(p, 1, bytes, f) != bytes) {
    fprintf(stderr, "short input\n");
    exit(2);
  }
}

template <typename T>
static T emu_get(FILE* f) {
  T v;
  emu_read(f, &v, sizeof v);
  return v;
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
  std::vector<std::vector<unsigned char>> bufs(emu_get<uint32_t>(in));
  for (auto& b : bufs) {
    const uint32_t elem = emu_get<uint32_t>(in);
    const uint64_t count = emu_get<uint64_t>(in);
    // At least 8 bytes, 16-byte aligned storage: a buffer may hold a struct argument.
    b.resize(elem * count + 16);
    emu_read(in, b.data(), elem * count);
  }
  const uint32_t launches = emu_get<uint32_t>(in);
  for (uint32_t l = 0; l < launches; ++l) {
    std::string name(emu_get<uint32_t>(in), '\0');
    emu_read(in, name.data(), name.size());
    const uint32_t grid_x = emu_get<uint32_t>(in), grid_y = emu_get<uint32_t>(in);
    const uint32_t block = emu_get<uint32_t>(in);
    const uint32_t smem = emu_get<uint32_t>(in);
    std::vector<EmuArg> args(emu_get<uint32_t>(in));
    for (EmuArg& a : args) {
      const uint32_t kind = emu_get<uint32_t>(in);
      const uint64_t payload = emu_get<uint64_t>(in);
      a = EmuArg{nullptr, 0, 0.0f, 0.0};
      switch (kind) {
        case 0:
          if (payload >= bufs.size()) {
            fprintf(stderr, "%s: buffer %llu of %zu\n", name.c_str(), (unsigned long long)payload,
                    bufs.size());
            return 3;
          }
          a.p = bufs[payload].data();
          break;
        case 1:
          a.i = (long long)payload;
          break;
        case 2: {
          const uint32_t bits = (uint32_t)payload;
          memcpy(&a.f, &bits, 4);
          break;
        }
        case 3:
          memcpy(&a.d, &payload, 8);
          break;
        case 4:
          break;
        case 5: {
          const uint64_t idx = payload & 0xffffu, off = payload >> 16;
          if (idx >= bufs.size() || off > bufs[idx].size()) {
            fprintf(stderr, "%s: buffer %llu at byte %llu\n", name.c_str(), (unsigned long long)idx,
                    (unsigned long long)off);
            return 3;
          }
          a.p = bufs[idx].data() + off;
          break;
        }
        default:
          fprintf(stderr, "%s: argument kind %u\n", name.c_str(), kind);
          return 3;
      }
    }
    bool found = true;
    emu::launch((int)grid_x, (int)grid_y, (int)block, smem, [&] { found = emu_dispatch(name.c_str(), args.data()); });
    if (!found) {
      fprintf(stderr, "no kernel %s in this file\n", name.c_str());
      return 4;
    }
  }
  fclose(in);
  FILE* out = fopen(argv[2], "wb");
  if (!out) {
    perror(argv[2]);
    return 2;
  }
  for (auto& b : bufs) fwrite(b.data(), 1, b.size() - 16, out);
  return fclose(out) == 0 ? 0 : 2;
}
