// A CUDA execution model on the CPU, for checking a kernel's indexing and algorithm without a
// GPU (tests/attention_emulated.rs). Not a simulator of the hardware: it runs the kernel's
// own source, compiled by g++, with
// - one block at a time, its threads as cooperative fibers on one OS thread (each started
//   once on a ucontext, then switched by _setjmp/_longjmp: compile with -U_FORTIFY_SOURCE,
//   whose longjmp check refuses another stack), so the schedule is deterministic and a
//   barrier costs a context switch;
// - __syncthreads and __syncwarp as barriers of the block and of the warp, __shfl_xor_sync
//   through a per-warp exchange between two warp barriers (every lane must take part, as
//   the kernels' fixed shuffle patterns do);
// - dynamic shared memory as one buffer filled with 0xff bytes (NaN as f32 and as bf16)
//   before each block, so a read of a word the block did not write shows up as NaN, and
//   with canary bytes past the launch's size, checked when the launch ends;
// - emu_mma: mma.sync.m16n8k16 (bf16 × bf16 + f32) as the PTX ISA lays out its fragments
//   (see kernels/attention_mma.cu's header): the warp's lanes deposit their registers, each
//   lane rebuilds the two 16×16 and 16×8 matrices, computes its four results (products
//   summed in f64, added to the accumulator in f32), and the warp meets again.
// - static `__shared__` variables as function-local statics (one copy, which the block's
//   fibers share; blocks run one after another);
// - atomics as plain read-modify-writes (one OS thread), warp votes and matches through the
//   same exchange as the shuffles.
// The test harness (tests/kernel_emu/mod.rs) substitutes emu_mma for a kernel's inline PTX
// and `T* name = (T*)emu_shared();` for its `extern __shared__` declarations; everything else
// compiles as written.

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <ucontext.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
static dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(n)
#define __shared__ static

template <typename A, typename B>
inline auto min(A a, B b) -> decltype(a + b) {
  return a < b ? a : b;
}
template <typename A, typename B>
inline auto max(A a, B b) -> decltype(a + b) {
  return a < b ? b : a;
}

namespace emu {

constexpr int kMaxThreads = 1024;
constexpr size_t kStack = 256 * 1024;
constexpr size_t kSharedBytes = 228 * 1024;
// Bytes 0xa5 past a launch's dynamic shared memory: still there after each block, or the
// kernel wrote past what it was given.
constexpr unsigned char kCanary = 0xa5;

struct Fiber {
  jmp_buf at;                     // where the thread stopped (once started)
  std::unique_ptr<char[]> stack;  // kStack bytes, made at the first start
  bool started = false, done = false;
};

struct Barrier {
  int n = 0, count = 0;
  unsigned gen = 0;
};

static jmp_buf scheduler;
static std::vector<Fiber> fibers(kMaxThreads);
static int current = 0;
static std::function<void()> body;
static Barrier block_barrier;
static Barrier warp_barrier[kMaxThreads / 32];
static uint64_t exchange[kMaxThreads / 32][32];
static uint32_t mma_a[kMaxThreads / 32][32][4];
static uint32_t mma_b[kMaxThreads / 32][32][2];
static std::vector<unsigned char> shared(kSharedBytes);

// Back to the scheduler; it resumes the fibers in a fixed round-robin order. (Switches are
// _setjmp/_longjmp, which save no signal mask: no system call per switch.)
inline void yield() {
  if (!_setjmp(fibers[current].at)) _longjmp(scheduler, 1);
}

// Waits until `b.n` threads have arrived (the last to arrive goes on at once).
inline void wait(Barrier& b) {
  const unsigned gen = b.gen;
  if (++b.count == b.n) {
    b.count = 0;
    ++b.gen;
    return;
  }
  while (b.gen == gen) yield();
}

// A fiber's life: the current kernel body for one block, then parked until the scheduler
// starts it on the next block (fibers are made once, with their stacks, and kept).
inline void trampoline() {
  for (;;) {
    body();
    fibers[current].done = true;
    yield();
  }
}

// Runs fiber `i` until it yields: a first start through a ucontext on its own stack, a
// _longjmp back to where it stopped afterwards.
inline void resume(int i) {
  if (_setjmp(scheduler)) return;
  Fiber& f = fibers[i];
  if (f.started) _longjmp(f.at, 1);
  f.started = true;
  f.stack.reset(new char[kStack]);
  static ucontext_t start;
  getcontext(&start);
  start.uc_stack.ss_sp = f.stack.get();
  start.uc_stack.ss_size = kStack;
  start.uc_link = nullptr;
  makecontext(&start, trampoline, 0);
  setcontext(&start);
}

// Runs `kernel` for blocks (0..grid_x) × (0..grid_y) × (0..grid_z), x fastest, with `threads`
// threads each (a multiple of 32) and `smem` bytes of dynamic shared memory. Exits with a
// message when a block of the launch wrote past them.
inline void launch(int grid_x, int grid_y, int threads, size_t smem, std::function<void()> kernel,
                   int grid_z = 1) {
  if (threads % 32 != 0 || threads > kMaxThreads || smem > kSharedBytes) {
    fprintf(stderr, "bad launch: %d threads, %zu bytes of shared memory\n", threads, smem);
    exit(3);
  }
  body = std::move(kernel);
  gridDim.x = grid_x;
  gridDim.y = grid_y;
  gridDim.z = grid_z;
  blockDim.x = threads;
  blockDim.y = blockDim.z = 1;
  threadIdx.y = threadIdx.z = 0;
  memset(shared.data() + smem, kCanary, shared.size() - smem);
  for (int b = 0; b < grid_x * grid_y * grid_z; ++b) {
    blockIdx.x = b % grid_x;
    blockIdx.y = b / grid_x % grid_y;
    blockIdx.z = b / grid_x / grid_y;
    memset(shared.data(), 0xff, smem);
    block_barrier = Barrier{threads};
    for (int w = 0; w < threads / 32; ++w) warp_barrier[w] = Barrier{32};
    for (int i = 0; i < threads; ++i) fibers[i].done = false;
    for (int left = threads; left > 0;) {
      left = 0;
      for (int i = 0; i < threads; ++i) {
        if (fibers[i].done) continue;
        current = i;
        threadIdx.x = i;
        resume(i);
        left += fibers[i].done ? 0 : 1;
      }
    }
  }
  for (size_t k = smem; k < shared.size(); ++k) {
    if (shared[k] != kCanary) {
      fprintf(stderr, "a block wrote shared memory byte %zu, past its %zu bytes\n", k, smem);
      exit(3);
    }
  }
}

inline float bf16_value(uint32_t reg, int half) {
  const uint32_t bits = half ? (reg >> 16) : (reg & 0xffffu);
  const uint32_t u = bits << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

}  // namespace emu

inline float* emu_shared() { return reinterpret_cast<float*>(emu::shared.data()); }

inline void __syncthreads() { emu::wait(emu::block_barrier); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::wait(emu::warp_barrier[threadIdx.x / 32]); }
inline void __trap() { abort(); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
  static_assert(sizeof(T) <= 8, "a shuffled value fits 8 bytes");
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  uint64_t word = 0;
  memcpy(&word, &v, sizeof(T));
  emu::exchange[w][lane] = word;
  __syncwarp();
  word = emu::exchange[w][lane ^ mask];
  __syncwarp();
  T out;
  memcpy(&out, &word, sizeof(T));
  return out;
}

inline float __int_as_float(int i) {
  float f;
  memcpy(&f, &i, 4);
  return f;
}
inline float __uint_as_float(unsigned u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  memcpy(&u, &f, 4);
  return u;
}
inline unsigned atomicOr(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old | v;
  return old;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
// Round-to-nearest addition, never contracted (g++ without -ffast-math does not contract
// across a call).
inline float __fadd_rn(float a, float b) { return a + b; }

// The lanes of the warp holding the same value as this one (full warp taking part).
inline unsigned __match_any_sync(unsigned, unsigned v) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  emu::exchange[w][lane] = v;
  __syncwarp();
  unsigned mask = 0;
  for (int l = 0; l < 32; ++l)
    if ((unsigned)emu::exchange[w][l] == v) mask |= 1u << l;
  __syncwarp();
  return mask;
}

// c += A·B for the warp (mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32).
inline void emu_mma(float* c, const unsigned* a, unsigned b0, unsigned b1) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  for (int r = 0; r < 4; ++r) emu::mma_a[w][lane][r] = a[r];
  emu::mma_b[w][lane][0] = b0;
  emu::mma_b[w][lane][1] = b1;
  __syncwarp();
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int e = 0; e < 2; ++e) {
      A[g][2 * t + e] = emu::bf16_value(emu::mma_a[w][l][0], e);
      A[g + 8][2 * t + e] = emu::bf16_value(emu::mma_a[w][l][1], e);
      A[g][2 * t + 8 + e] = emu::bf16_value(emu::mma_a[w][l][2], e);
      A[g + 8][2 * t + 8 + e] = emu::bf16_value(emu::mma_a[w][l][3], e);
      B[2 * t + e][g] = emu::bf16_value(emu::mma_b[w][l][0], e);
      B[2 * t + 8 + e][g] = emu::bf16_value(emu::mma_b[w][l][1], e);
    }
  }
  __syncwarp();
  const int g = lane >> 2, t = lane & 3;
  for (int r = 0; r < 4; ++r) {
    const int row = g + 8 * (r >> 1), col = 2 * t + (r & 1);
    double s = 0.0;
    for (int k = 0; k < 16; ++k) s += (double)A[row][k] * (double)B[k][col];
    c[r] = (float)((double)c[r] + s);
  }
}

// One kernel argument as the runner (runner.cpp) reads it: a buffer's address, an integer,
// or a float; the generated dispatcher casts it to the parameter's type.
struct EmuArg {
  void* p;
  long long i;
  float f;
  double d;
};

// Calls kernel `name` with `a` (generated from the launch table); false when the file has no
// such kernel.
bool emu_dispatch(const char* name, const EmuArg* a);
