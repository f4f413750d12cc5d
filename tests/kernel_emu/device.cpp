// An emulated CUDA device: the subset of the CUDA driver API, cuBLAS and cuBLASLt that the
// CUDA backend (through cudarc) calls, implemented on the CPU, so that the backend's own host
// code (its arena, typed launches, product calls, graph capture and replay, uploads) runs
// without a GPU. tests/kernel_emu/mod.rs (`device_library`) compiles this file with every
// kernels/*.cu (each in a namespace of its own, against shim.h) into libcuda.so, and two
// thin libraries, libcublas.so and libcublasLt.so, that resolve to it.
//
// What it emulates, and what it checks:
// - Device memory is host memory: an allocation is 256-byte aligned, filled with 0xff bytes
//   (NaN as f32 and bf16) so that a read of what nobody wrote shows, and registered, so that
//   every copy range and product operand window is checked against the allocation it must
//   lie in, and every pointer a kernel receives must point into one (or be null). A fault is
//   reported on stderr and becomes the context's sticky error (CUDA_ERROR_ILLEGAL_ADDRESS),
//   as on a GPU.
// - Work runs at once, in call order, on the calling thread (all streams are one queue), so
//   races between streams are not detected. A stream under capture records instead; a
//   stream that waits on an event recorded under capture joins that capture; a launched
//   graph replays the records. Calls a capture forbids (synchronous allocation, copies and
//   sets, synchronising a capturing stream or the context, querying a captured event) fail
//   with CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED and invalidate the capture.
// - Launches: the grid and block limits, dynamic shared memory beyond 48 KiB only after
//   cuFuncSetAttribute raised the function's limit, one-dimensional blocks of whole warps
//   (what shim.h runs), each pointer argument inside an allocation.
// - Products: cuBLAS's argument checks (leading dimensions), operand windows, C disjoint
//   from A and B and from the other batch entries' C; C is not read when β = 0. Sums in
//   f64, rounded once to the output type (the GPU's f32 sums are checked against the CPU
//   by the parity tests' tolerances).
// - Memory statistics: the default pool's used bytes and high-water mark (requested bytes,
//   no rounding), and the graph allocations' (made at capture, kept for the graph's life).

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <algorithm>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

// Generated beside this file (tests/kernel_emu/mod.rs): whether a kernel exists, and the
// launch of one, its arguments read from `params` now and run later.
bool emu_kernel_exists(const char* name);
std::function<void()> emu_kernel_bind(const char* name, int gx, int gy, int gz, int block,
                                      size_t smem, void** params);

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef int CUdevice;

enum : int {
  SUCCESS = 0,
  ERR_INVALID_VALUE = 1,
  ERR_OUT_OF_MEMORY = 2,
  ERR_INVALID_HANDLE = 400,
  ERR_NOT_FOUND = 500,
  ERR_NOT_READY = 600,
  ERR_ILLEGAL_ADDRESS = 700,
  ERR_LAUNCH_OUT_OF_RESOURCES = 701,
  ERR_NOT_SUPPORTED = 801,
  ERR_CAPTURE_UNSUPPORTED = 900,
  ERR_CAPTURE_INVALIDATED = 901,
  ERR_CAPTURE_WRONG_THREAD = 908,
};

namespace {

constexpr size_t kTotalMemory = 16ull << 30;
constexpr int kDefaultSharedLimit = 48 * 1024;
constexpr int kOptinSharedLimit = 227 * 1024;

std::recursive_mutex big_lock;
#define LOCKED std::lock_guard<std::recursive_mutex> guard_(big_lock)

struct Allocation {
  size_t bytes;
  bool pool;   // from cuMemAllocAsync (the default pool's statistics)
  bool graph;  // made under capture (the graph's memory)
};

std::map<uintptr_t, Allocation> allocations;
// Allocations given back (base → bytes), until their memory is handed out again: a fault in
// one of them is a use after free.
std::map<uintptr_t, size_t> freed;
size_t pool_used = 0, pool_high = 0, graph_used = 0, graph_high = 0;
CUresult sticky = SUCCESS;

struct Graph;

struct Stream {
  Graph* capture = nullptr;  // the graph this stream records into, if any
};

struct Event {
  bool recorded = false;
  double at_ms = 0.0;
  Graph* captured = nullptr;  // recorded under this capture
};

struct Graph {
  std::vector<std::function<void()>> ops;
  std::vector<void*> owned;  // allocations made under capture
  bool invalid = false;
};

struct Exec {
  Graph* graph;
};

struct Function {
  std::string name;
  int max_dynamic_shared = kDefaultSharedLimit;
};

Stream legacy_stream;
std::set<Stream*> streams = {&legacy_stream};

double now_ms() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

bool verbose() {
  static const bool v = getenv("MGKD_EMULATED_CUDA_VERBOSE") != nullptr;
  return v;
}

// Reports a fault of the caller (stderr) and makes it the context's sticky error.
CUresult fault(CUresult code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
CUresult fault(CUresult code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "emulated CUDA device: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
  if (code == ERR_ILLEGAL_ADDRESS && sticky == SUCCESS) sticky = code;
  return code;
}

Stream* stream_of(void* s) { return s ? static_cast<Stream*>(s) : &legacy_stream; }

// Whether any stream is capturing (the calls a capture forbids are checked against it).
std::set<Graph*> capturing;

// Fails a call that a capture forbids, and invalidates the capture(s).
CUresult forbidden_under_capture(const char* what) {
  if (capturing.empty()) return SUCCESS;
  for (Graph* g : capturing) g->invalid = true;
  fprintf(stderr, "emulated CUDA device: %s during stream capture\n", what);
  return ERR_CAPTURE_UNSUPPORTED;
}

// Runs `op` now, or records it where `s` is capturing.
CUresult submit(void* s, std::function<void()> op) {
  if (sticky != SUCCESS) return sticky;
  Stream* st = stream_of(s);
  if (st == &legacy_stream && !capturing.empty()) {
    return forbidden_under_capture("work on the legacy stream");
  }
  if (st->capture) {
    st->capture->ops.push_back(std::move(op));
  } else {
    op();
  }
  return sticky;
}

// The allocation holding [p, p + bytes), or null.
const Allocation* holding(uintptr_t p, size_t bytes) {
  auto it = allocations.upper_bound(p);
  if (it == allocations.begin()) return nullptr;
  --it;
  if (p - it->first + bytes <= it->second.bytes && p >= it->first) return &it->second;
  return nullptr;
}

// Checks that [p, p + bytes) lies in one allocation (a zero-length range anywhere in or just
// past one); otherwise a fault naming `what`.
bool in_device_memory(uintptr_t p, size_t bytes, const char* what) {
  if (bytes == 0) return true;
  if (holding(p, bytes)) return true;
  const char* where = "outside every allocation";
  auto it = freed.upper_bound(p);
  if (it != freed.begin() && p < std::prev(it)->first + std::prev(it)->second) {
    where = "in an allocation given back before (a use after free)";
  } else if (holding(p, 1)) {
    where = "past the end of an allocation";
  }
  fault(ERR_ILLEGAL_ADDRESS, "%s: bytes [%#llx, %#llx) %s", what, (unsigned long long)p,
        (unsigned long long)(p + bytes), where);
  return false;
}

void* allocate(size_t bytes, bool pool, bool graph) {
  const size_t rounded = (bytes + 255) & ~size_t(255);
  void* p = aligned_alloc(256, rounded);
  if (!p) return nullptr;
  memset(p, 0xff, rounded);
  // Freed ranges are disjoint (each was an allocation, made after the ranges it overlapped
  // were dropped here): those overlapping the new one are the one starting before it and
  // those starting inside it.
  auto it = freed.upper_bound((uintptr_t)p);
  if (it != freed.begin() && std::prev(it)->first + std::prev(it)->second > (uintptr_t)p) --it;
  while (it != freed.end() && it->first < (uintptr_t)p + rounded) it = freed.erase(it);
  allocations[(uintptr_t)p] = Allocation{bytes, pool, graph};
  if (pool) {
    pool_used += bytes;
    if (pool_used > pool_high) pool_high = pool_used;
  }
  if (graph) {
    graph_used += bytes;
    if (graph_used > graph_high) graph_high = graph_used;
  }
  return p;
}

CUresult release(CUdeviceptr p, const char* what) {
  auto it = allocations.find((uintptr_t)p);
  if (it == allocations.end()) {
    return fault(ERR_INVALID_VALUE, "%s: %#llx is not an allocation", what, p);
  }
  if (it->second.pool) pool_used -= it->second.bytes;
  if (it->second.graph) graph_used -= it->second.bytes;
  freed[it->first] = it->second.bytes;
  allocations.erase(it);
  free((void*)p);
  return SUCCESS;
}

}  // namespace

// Kernel arguments: called by the generated launches for every pointer parameter.
void emu_check_pointer(const char* kernel, int k, const void* p) {
  if (!p) return;
  if (!holding((uintptr_t)p, 1) && !holding((uintptr_t)p - 1, 1)) {
    fault(ERR_ILLEGAL_ADDRESS, "kernel %s: argument %d (%p) points into no allocation", kernel,
          k, p);
  }
}

extern "C" {

// ---- Initialisation, device, context -------------------------------------------------------

CUresult cuInit(unsigned) { return SUCCESS; }

CUresult cuDriverGetVersion(int* v) {
  *v = 13000;
  return SUCCESS;
}

CUresult cuDeviceGetCount(int* n) {
  *n = 1;
  return SUCCESS;
}

CUresult cuDeviceGet(CUdevice* d, int ordinal) {
  if (ordinal != 0) return 101;  // CUDA_ERROR_INVALID_DEVICE
  *d = 0;
  return SUCCESS;
}

CUresult cuDeviceGetName(char* name, int len, CUdevice) {
  snprintf(name, len, "emulated CUDA device (tests/kernel_emu)");
  return SUCCESS;
}

CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
  *bytes = kTotalMemory;
  return SUCCESS;
}

CUresult cuDeviceGetUuid(unsigned char* uuid, CUdevice) {
  memset(uuid, 0x5a, 16);
  return SUCCESS;
}

CUresult cuDeviceGetUuid_v2(unsigned char* uuid, CUdevice d) { return cuDeviceGetUuid(uuid, d); }

// The compute capability is 9.0 (sm_90: NVRTC compiles every kernel, the tensor-core ones
// included), or MGKD_EMULATED_CUDA_SM (e.g. 80).
CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice) {
  static const int sm = getenv("MGKD_EMULATED_CUDA_SM") ? atoi(getenv("MGKD_EMULATED_CUDA_SM")) : 90;
  switch (attr) {
    case 1: *v = 1024; break;               // max threads per block
    case 2: *v = 1024; break;               // max block x
    case 3: case 4: *v = 1024; break;       // max block y, z
    case 5: *v = 2147483647; break;         // max grid x
    case 6: case 7: *v = 65535; break;      // max grid y, z
    case 8: *v = kDefaultSharedLimit; break;
    case 10: *v = 32; break;                // warp size
    case 16: *v = 132; break;               // multiprocessors
    case 75: *v = sm / 10; break;
    case 76: *v = sm % 10; break;
    case 97: *v = kOptinSharedLimit; break;
    case 115: *v = 1; break;                // memory pools supported
    default:
      *v = 0;
      if (verbose()) fprintf(stderr, "emulated CUDA device: attribute %d read as 0\n", attr);
  }
  return SUCCESS;
}

static int primary_context;

CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice) {
  *ctx = &primary_context;
  return SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return SUCCESS; }
CUresult cuCtxSetCurrent(void*) { return SUCCESS; }
CUresult cuCtxGetCurrent(void** ctx) {
  *ctx = &primary_context;
  return SUCCESS;
}
CUresult cuCtxGetDevice(CUdevice* d) {
  *d = 0;
  return SUCCESS;
}
CUresult cuCtxSynchronize() {
  LOCKED;
  if (CUresult r = forbidden_under_capture("cuCtxSynchronize")) return r;
  return sticky;
}

CUresult cuGetErrorName(CUresult e, const char** s) {
  switch (e) {
    case SUCCESS: *s = "CUDA_SUCCESS"; break;
    case ERR_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
    case ERR_OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case ERR_INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
    case ERR_NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
    case ERR_ILLEGAL_ADDRESS: *s = "CUDA_ERROR_ILLEGAL_ADDRESS"; break;
    case ERR_LAUNCH_OUT_OF_RESOURCES: *s = "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"; break;
    case ERR_NOT_SUPPORTED: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
    case ERR_CAPTURE_UNSUPPORTED: *s = "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"; break;
    case ERR_CAPTURE_INVALIDATED: *s = "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"; break;
    default: *s = "CUDA_ERROR_UNKNOWN";
  }
  return SUCCESS;
}
CUresult cuGetErrorString(CUresult e, const char** s) { return cuGetErrorName(e, s); }

// ---- Streams and events ----------------------------------------------------------------------

CUresult cuStreamCreate(void** s, unsigned) {
  LOCKED;
  Stream* st = new Stream();
  streams.insert(st);
  *s = st;
  return SUCCESS;
}
CUresult cuStreamCreateWithPriority(void** s, unsigned f, int) { return cuStreamCreate(s, f); }
CUresult cuStreamDestroy_v2(void* s) {
  LOCKED;
  streams.erase(static_cast<Stream*>(s));
  delete static_cast<Stream*>(s);
  return SUCCESS;
}
CUresult cuStreamSynchronize(void* s) {
  LOCKED;
  if (stream_of(s)->capture || (!s && !capturing.empty())) {
    return forbidden_under_capture("cuStreamSynchronize");
  }
  return sticky;
}
CUresult cuStreamQuery(void* s) { return cuStreamSynchronize(s); }

CUresult cuEventCreate(void** e, unsigned) {
  LOCKED;
  *e = new Event();
  return SUCCESS;
}
CUresult cuEventDestroy_v2(void* e) {
  LOCKED;
  delete static_cast<Event*>(e);
  return SUCCESS;
}
CUresult cuEventRecord(void* e, void* s) {
  LOCKED;
  Event* ev = static_cast<Event*>(e);
  Stream* st = stream_of(s);
  if (st->capture) {
    ev->captured = st->capture;
    ev->recorded = true;
    return SUCCESS;
  }
  ev->captured = nullptr;
  return submit(s, [ev] {
    ev->recorded = true;
    ev->at_ms = now_ms();
  });
}
CUresult cuEventRecordWithFlags(void* e, void* s, unsigned) { return cuEventRecord(e, s); }
CUresult cuEventSynchronize(void* e) {
  LOCKED;
  if (static_cast<Event*>(e)->captured) return forbidden_under_capture("cuEventSynchronize");
  return sticky;
}
CUresult cuEventQuery(void* e) {
  LOCKED;
  if (static_cast<Event*>(e)->captured) return forbidden_under_capture("cuEventQuery");
  return sticky;
}
CUresult cuEventElapsedTime(float* ms, void* start, void* end) {
  LOCKED;
  Event *a = static_cast<Event*>(start), *b = static_cast<Event*>(end);
  if (!a->recorded || !b->recorded) return ERR_INVALID_HANDLE;
  *ms = (float)(b->at_ms - a->at_ms);
  return SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) {
  return cuEventElapsedTime(ms, start, end);
}

// A stream waiting on an event recorded under capture joins that capture.
CUresult cuStreamWaitEvent(void* s, void* e, unsigned) {
  LOCKED;
  Event* ev = static_cast<Event*>(e);
  Stream* st = stream_of(s);
  if (ev->captured && !st->capture) {
    if (st == &legacy_stream) return forbidden_under_capture("the legacy stream joining a capture");
    st->capture = ev->captured;
  }
  return sticky;
}

CUresult cuLaunchHostFunc(void* s, void (*fn)(void*), void* data) {
  LOCKED;
  return submit(s, [fn, data] { fn(data); });
}

// ---- Memory ----------------------------------------------------------------------------------

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
  LOCKED;
  if (CUresult r = forbidden_under_capture("cuMemAlloc")) return r;
  if (bytes == 0) return ERR_INVALID_VALUE;
  void* m = allocate(bytes, false, false);
  if (!m) return ERR_OUT_OF_MEMORY;
  *p = (CUdeviceptr)m;
  return sticky;
}

CUresult cuMemFree_v2(CUdeviceptr p) {
  LOCKED;
  if (CUresult r = forbidden_under_capture("cuMemFree")) return r;
  return release(p, "cuMemFree");
}

CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void* s) {
  LOCKED;
  if (sticky) return sticky;
  if (bytes == 0) {  // nothing to hold (a GPU accepts the request)
    *p = 0;
    return SUCCESS;
  }
  Stream* st = stream_of(s);
  void* m = allocate(bytes, !st->capture, st->capture != nullptr);
  if (!m) return ERR_OUT_OF_MEMORY;
  if (st->capture) st->capture->owned.push_back(m);
  *p = (CUdeviceptr)m;
  return SUCCESS;
}

CUresult cuMemAllocFromPoolAsync(CUdeviceptr* p, size_t bytes, void*, void* s) {
  return cuMemAllocAsync(p, bytes, s);
}

// A free under capture frees nothing until the graph is destroyed (the graph keeps its
// allocations); otherwise at once (work is never pending).
CUresult cuMemFreeAsync(CUdeviceptr p, void* s) {
  LOCKED;
  if (p == 0) return SUCCESS;
  if (stream_of(s)->capture) {
    if (!allocations.count((uintptr_t)p)) {
      return fault(ERR_INVALID_VALUE, "cuMemFreeAsync: %#llx is not an allocation", p);
    }
    return SUCCESS;
  }
  Graph* owner = nullptr;
  for (Graph* g : capturing) {
    for (void* o : g->owned)
      if ((CUdeviceptr)o == p) owner = g;
  }
  if (owner) return fault(ERR_INVALID_VALUE, "cuMemFreeAsync of a capture's allocation outside it");
  return release(p, "cuMemFreeAsync");
}

CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
  LOCKED;
  size_t used = 0;
  for (auto& a : allocations) used += a.second.bytes;
  *total = kTotalMemory;
  *free_bytes = used < kTotalMemory ? kTotalMemory - used : 0;
  return SUCCESS;
}

CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
  *p = aligned_alloc(4096, (bytes + 4095) & ~size_t(4095));
  return *p ? SUCCESS : ERR_OUT_OF_MEMORY;
}
CUresult cuMemFreeHost(void* p) {
  free(p);
  return SUCCESS;
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, void* s) {
  LOCKED;
  if (!in_device_memory(dst, bytes, "cuMemcpyHtoDAsync destination")) return sticky;
  return submit(s, [=] { memcpy((void*)dst, src, bytes); });
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes, void* s) {
  LOCKED;
  if (!in_device_memory(src, bytes, "cuMemcpyDtoHAsync source")) return sticky;
  return submit(s, [=] { memcpy(dst, (const void*)src, bytes); });
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, void* s) {
  LOCKED;
  if (!in_device_memory(dst, bytes, "cuMemcpyDtoDAsync destination") ||
      !in_device_memory(src, bytes, "cuMemcpyDtoDAsync source")) {
    return sticky;
  }
  return submit(s, [=] { memmove((void*)dst, (const void*)src, bytes); });
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) {
  LOCKED;
  if (CUresult r = forbidden_under_capture("cuMemcpyHtoD")) return r;
  return cuMemcpyHtoDAsync_v2(dst, src, bytes, nullptr);
}
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) {
  LOCKED;
  if (CUresult r = forbidden_under_capture("cuMemcpyDtoH")) return r;
  return cuMemcpyDtoHAsync_v2(dst, src, bytes, nullptr);
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes) {
  LOCKED;
  if (CUresult r = forbidden_under_capture("cuMemcpyDtoD")) return r;
  return cuMemcpyDtoDAsync_v2(dst, src, bytes, nullptr);
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void* s) {
  LOCKED;
  if (!in_device_memory(dst, n, "cuMemsetD8Async")) return sticky;
  return submit(s, [=] { memset((void*)dst, v, n); });
}
CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
  LOCKED;
  if (CUresult r = forbidden_under_capture("cuMemsetD8")) return r;
  return cuMemsetD8Async(dst, v, n, nullptr);
}
CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, void* s) {
  LOCKED;
  if (!in_device_memory(dst, 4 * n, "cuMemsetD32Async")) return sticky;
  return submit(s, [=] {
    for (size_t i = 0; i < n; ++i) memcpy((char*)dst + 4 * i, &v, 4);
  });
}

static int default_pool;

CUresult cuDeviceGetDefaultMemPool(void** pool, CUdevice) {
  *pool = &default_pool;
  return SUCCESS;
}
CUresult cuDeviceGetMemPool(void** pool, CUdevice d) { return cuDeviceGetDefaultMemPool(pool, d); }

CUresult cuMemPoolSetAttribute(void*, int attr, void* v) {
  LOCKED;
  switch (attr) {
    case 4:  // release threshold
      return SUCCESS;
    case 6:  // reserved high: reset
    case 8:  // used high: reset (to the bytes in use)
      pool_high = pool_used;
      return SUCCESS;
    default:
      (void)v;
      return ERR_INVALID_VALUE;
  }
}

CUresult cuMemPoolGetAttribute(void*, int attr, void* v) {
  LOCKED;
  uint64_t* out = static_cast<uint64_t*>(v);
  switch (attr) {
    case 4: *out = UINT64_MAX; return SUCCESS;
    case 5: case 7: *out = pool_used; return SUCCESS;
    case 6: case 8: *out = pool_high; return SUCCESS;
    default: return ERR_INVALID_VALUE;
  }
}

CUresult cuMemPoolTrimTo(void*, size_t) { return SUCCESS; }

CUresult cuDeviceGetGraphMemAttribute(CUdevice, int attr, void* v) {
  LOCKED;
  uint64_t* out = static_cast<uint64_t*>(v);
  switch (attr) {
    case 0: case 2: *out = graph_used; return SUCCESS;
    case 1: case 3: *out = graph_high; return SUCCESS;
    default: return ERR_INVALID_VALUE;
  }
}

CUresult cuDeviceSetGraphMemAttribute(CUdevice, int attr, void* v) {
  LOCKED;
  if ((attr == 1 || attr == 3) && *static_cast<uint64_t*>(v) == 0) {
    graph_high = graph_used;
    return SUCCESS;
  }
  return ERR_INVALID_VALUE;
}

CUresult cuDeviceGraphMemTrim(CUdevice) { return SUCCESS; }

// ---- Modules and launches --------------------------------------------------------------------

static int module_token;

CUresult cuModuleLoadData(void** module, const void* image) {
  if (!image) return ERR_INVALID_VALUE;
  *module = &module_token;
  return SUCCESS;
}
CUresult cuModuleUnload(void*) { return SUCCESS; }

CUresult cuModuleGetFunction(void** f, void*, const char* name) {
  LOCKED;
  if (!emu_kernel_exists(name)) return ERR_NOT_FOUND;
  *f = new Function{name};
  return SUCCESS;
}

CUresult cuFuncSetAttribute(void* f, int attr, int value) {
  LOCKED;
  Function* fn = static_cast<Function*>(f);
  if (attr == 8) {  // max dynamic shared memory
    if (value < 0 || value > kOptinSharedLimit) return ERR_INVALID_VALUE;
    fn->max_dynamic_shared = value;
  }
  return SUCCESS;
}

CUresult cuFuncGetAttribute(int* v, int attr, void* f) {
  Function* fn = static_cast<Function*>(f);
  switch (attr) {
    case 0: *v = 1024; break;  // max threads per block
    case 8: *v = fn->max_dynamic_shared; break;
    default: *v = 0;
  }
  return SUCCESS;
}

CUresult cuFuncSetCacheConfig(void*, int) { return SUCCESS; }

CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned smem, void* s, void** params, void** extra) {
  LOCKED;
  if (sticky) return sticky;
  Function* fn = static_cast<Function*>(f);
  if (!fn) return ERR_INVALID_HANDLE;
  if (extra) return fault(ERR_NOT_SUPPORTED, "%s: launch with `extra` arguments", fn->name.c_str());
  if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0 || gx > 2147483647u ||
      gy > 65535 || gz > 65535 || bx * by * bz > 1024) {
    return fault(ERR_INVALID_VALUE, "%s: grid (%u, %u, %u), block (%u, %u, %u)", fn->name.c_str(),
                 gx, gy, gz, bx, by, bz);
  }
  if ((int)smem > fn->max_dynamic_shared) {
    return fault(ERR_INVALID_VALUE, "%s: %u bytes of dynamic shared memory, the limit is %d",
                 fn->name.c_str(), smem, fn->max_dynamic_shared);
  }
  if (by != 1 || bz != 1 || bx % 32 != 0) {
    return fault(ERR_NOT_SUPPORTED,
                 "%s: block (%u, %u, %u): the emulation runs 1-D blocks of whole warps",
                 fn->name.c_str(), bx, by, bz);
  }
  std::function<void()> run = emu_kernel_bind(fn->name.c_str(), gx, gy, gz, bx, smem, params);
  if (!run) return ERR_INVALID_HANDLE;
  if (verbose()) {
    fprintf(stderr, "emulated CUDA device: %s (%u, %u, %u) x %u\n", fn->name.c_str(), gx, gy, gz, bx);
  }
  return submit(s, std::move(run));
}

// ---- Graphs ----------------------------------------------------------------------------------

CUresult cuStreamBeginCapture_v2(void* s, int) {
  LOCKED;
  Stream* st = stream_of(s);
  if (st == &legacy_stream) return ERR_CAPTURE_UNSUPPORTED;
  if (st->capture) return ERR_INVALID_VALUE;
  st->capture = new Graph();
  capturing.insert(st->capture);
  return SUCCESS;
}
CUresult cuStreamBeginCapture(void* s, int mode) { return cuStreamBeginCapture_v2(s, mode); }

CUresult cuStreamIsCapturing(void* s, int* status) {
  LOCKED;
  Stream* st = stream_of(s);
  *status = st->capture ? (st->capture->invalid ? 2 : 1) : 0;
  return SUCCESS;
}

CUresult cuGraphDestroy(void* g);

CUresult cuStreamEndCapture(void* s, void** graph) {
  LOCKED;
  Stream* st = stream_of(s);
  Graph* g = st->capture;
  if (!g) return ERR_INVALID_VALUE;
  // Every stream that joined the capture leaves it with the origin.
  capturing.erase(g);
  for (Stream* other : streams)
    if (other->capture == g) other->capture = nullptr;
  st->capture = nullptr;
  if (g->invalid) {
    *graph = nullptr;
    cuGraphDestroy(g);
    return ERR_CAPTURE_INVALIDATED;
  }
  *graph = g;
  return SUCCESS;
}

CUresult cuGraphDestroy(void* graph) {
  LOCKED;
  (void)graph;  // the records stay with the instantiated graphs (see cuGraphExecDestroy)
  return SUCCESS;
}

CUresult cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
  LOCKED;
  if (!graph) return ERR_INVALID_VALUE;
  *exec = new Exec{static_cast<Graph*>(graph)};
  return SUCCESS;
}

CUresult cuGraphUpload(void*, void*) { return SUCCESS; }

CUresult cuGraphLaunch(void* exec, void* s) {
  LOCKED;
  Graph* g = static_cast<Exec*>(exec)->graph;
  return submit(s, [g] {
    for (auto& op : g->ops) {
      if (sticky) return;
      op();
    }
  });
}

CUresult cuGraphExecDestroy(void* exec) {
  LOCKED;
  Exec* e = static_cast<Exec*>(exec);
  for (void* p : e->graph->owned) release((CUdeviceptr)p, "a graph's allocation");
  delete e->graph;
  delete e;
  return SUCCESS;
}

}  // extern "C"

// ---- cuBLAS and cuBLASLt ---------------------------------------------------------------------

#include <unordered_set>

namespace {

enum : int { BLAS_OK = 0, BLAS_INVALID_VALUE = 7, BLAS_EXECUTION_FAILED = 13, BLAS_NOT_SUPPORTED = 15 };
enum : int { R_32F = 0, R_16BF = 14 };

struct BlasHandle {
  void* stream = nullptr;
};

int elem_bytes(int type) { return type == R_32F ? 4 : type == R_16BF ? 2 : 0; }

float load(int type, uintptr_t base, int64_t i) {
  if (type == R_32F) return reinterpret_cast<const float*>(base)[i];
  const uint32_t u = (uint32_t)reinterpret_cast<const uint16_t*>(base)[i] << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

void store(int type, uintptr_t base, int64_t i, float v) {
  if (type == R_32F) {
    reinterpret_cast<float*>(base)[i] = v;
    return;
  }
  uint32_t u;
  memcpy(&u, &v, 4);
  uint16_t b;
  if ((u & 0x7fffffffu) > 0x7f800000u)
    b = (uint16_t)((u >> 16) | 0x40u);
  else
    b = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  reinterpret_cast<uint16_t*>(base)[i] = b;
}

// A column-major matrix operand as stored: `rows` × `cols`, leading dimension `ld`.
struct Operand {
  uintptr_t base;
  int type;
  int64_t rows, cols, ld;
  int64_t extent() const { return rows == 0 || cols == 0 ? 0 : (cols - 1) * ld + rows; }
  uintptr_t at(int64_t r, int64_t c) const { return base + (uintptr_t)((c * ld + r) * elem_bytes(type)); }
};

// One product D = α·op(A)·op(B) + β·C (+ bias[i] on row i), D m × n; C is not read when
// β = 0. Sums in f64, rounded once to D's type.
struct Product {
  bool ta, tb;
  int64_t m, n, k;
  float alpha, beta;
  Operand a, b, c, d;
  uintptr_t bias = 0;
  int bias_type = R_32F;

  void run() const {
    // op(A) by rows and op(B) by columns, each contiguous over k, read once.
    std::vector<double> ar((size_t)(m * k)), bc((size_t)(n * k));
    for (int64_t i = 0; i < m; ++i)
      for (int64_t l = 0; l < k; ++l)
        ar[i * k + l] = ta ? load(a.type, a.base, i * a.ld + l) : load(a.type, a.base, l * a.ld + i);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t l = 0; l < k; ++l)
        bc[j * k + l] = tb ? load(b.type, b.base, l * b.ld + j) : load(b.type, b.base, j * b.ld + l);
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t i = 0; i < m; ++i) {
        const double *x = &ar[i * k], *y = &bc[j * k];
        double acc = 0.0;
        for (int64_t l = 0; l < k; ++l) acc += x[l] * y[l];
        double v = (double)alpha * acc;
        if (beta != 0.0f) v += (double)beta * load(c.type, c.base, j * c.ld + i);
        if (bias) v += load(bias_type, bias, i);
        store(d.type, d.base, j * d.ld + i, (float)v);
      }
    }
  }
};

// The stored shapes of op(A) (m × k) and op(B) (k × n).
Operand stored_a(uintptr_t p, int type, bool t, int64_t m, int64_t k, int64_t ld) {
  return t ? Operand{p, type, k, m, ld} : Operand{p, type, m, k, ld};
}
Operand stored_b(uintptr_t p, int type, bool t, int64_t k, int64_t n, int64_t ld) {
  return t ? Operand{p, type, n, k, ld} : Operand{p, type, k, n, ld};
}

bool fits(const Operand& o, const char* what) {
  if (o.extent() == 0) return true;
  return in_device_memory(o.base, (size_t)o.extent() * elem_bytes(o.type), what);
}

// Checks a batch of products as cuBLAS would and as the GPU needs: types, leading
// dimensions, every operand window inside an allocation, each D disjoint from every A and B
// and from the other D's (element by element: windows of heads interleave).
int check(const std::vector<Product>& ps, const char* call) {
  std::unordered_set<uintptr_t> written;
  for (const Product& p : ps) {
    for (const Operand* o : {&p.a, &p.b, &p.c, &p.d}) {
      if (!elem_bytes(o->type)) {
        fault(ERR_NOT_SUPPORTED, "%s: data type %d", call, o->type);
        return BLAS_NOT_SUPPORTED;
      }
      if (o->ld < (o->rows > 1 ? o->rows : 1)) {
        fprintf(stderr, "emulated CUDA device: %s: leading dimension %lld below %lld rows\n", call,
                (long long)o->ld, (long long)o->rows);
        return BLAS_INVALID_VALUE;
      }
    }
    if (p.m < 0 || p.n < 0 || p.k < 0) return BLAS_INVALID_VALUE;
    if (p.m == 0 || p.n == 0) continue;
    const bool reads_c = p.beta != 0.0f;
    if ((p.k > 0 && (!fits(p.a, call) || !fits(p.b, call))) || (reads_c && !fits(p.c, call)) ||
        !fits(p.d, call)) {
      fprintf(stderr,
              "emulated CUDA device: %s: product %zu of %zu: m %lld n %lld k %lld, A %#llx (ld %lld), "
              "B %#llx (ld %lld), C %#llx, D %#llx (ld %lld), beta %g\n",
              call, (size_t)(&p - ps.data()), ps.size(), (long long)p.m, (long long)p.n,
              (long long)p.k, (unsigned long long)p.a.base, (long long)p.a.ld,
              (unsigned long long)p.b.base, (long long)p.b.ld, (unsigned long long)p.c.base,
              (unsigned long long)p.d.base, (long long)p.d.ld, p.beta);
      return BLAS_EXECUTION_FAILED;
    }
    if (p.bias && !in_device_memory(p.bias, (size_t)p.m * elem_bytes(p.bias_type), call)) {
      return BLAS_EXECUTION_FAILED;
    }
    for (int64_t j = 0; j < p.n; ++j)
      for (int64_t i = 0; i < p.m; ++i) {
        if (!written.insert(p.d.at(i, j)).second) {
          fault(ERR_ILLEGAL_ADDRESS, "%s: two products of one call write element (%lld, %lld) at %#llx",
                call, (long long)i, (long long)j, (unsigned long long)p.d.at(i, j));
          return BLAS_EXECUTION_FAILED;
        }
      }
  }
  for (const Product& p : ps) {
    if (p.k == 0) continue;
    for (const Operand* o : {&p.a, &p.b})
      for (int64_t c = 0; c < o->cols; ++c)
        for (int64_t r = 0; r < o->rows; ++r)
          if (written.count(o->at(r, c))) {
            fault(ERR_ILLEGAL_ADDRESS, "%s: an operand element at %#llx is also written", call,
                  (unsigned long long)o->at(r, c));
            return BLAS_EXECUTION_FAILED;
          }
  }
  return BLAS_OK;
}

int enqueue(BlasHandle* h, std::vector<Product> ps, const char* call) {
  if (sticky) return BLAS_EXECUTION_FAILED;
  if (int r = check(ps, call)) return r;
  return submit(h->stream, [ps] {
           for (const Product& p : ps) p.run();
         }) == SUCCESS
             ? BLAS_OK
             : BLAS_EXECUTION_FAILED;
}

// The products of a strided batch (a stride in elements).
std::vector<Product> strided(bool ta, bool tb, int m, int n, int k, float alpha, uintptr_t a, int at,
                             int lda, long long sa, uintptr_t b, int bt, int ldb, long long sb,
                             float beta, uintptr_t c, int ct, int ldc, long long sc, int batch) {
  std::vector<Product> ps;
  for (int i = 0; i < batch; ++i) {
    const uintptr_t ai = a + (uintptr_t)(i * sa * elem_bytes(at));
    const uintptr_t bi = b + (uintptr_t)(i * sb * elem_bytes(bt));
    const uintptr_t ci = c + (uintptr_t)(i * sc * elem_bytes(ct));
    const Operand cd{ci, ct, m, n, ldc};
    ps.push_back(Product{ta, tb, m, n, k, alpha, beta, stored_a(ai, at, ta, m, k, lda),
                         stored_b(bi, bt, tb, k, n, ldb), cd, cd});
  }
  return ps;
}

// Compute and scale types: f32 compute (pedantic or not) with f32 scalars.
bool f32_compute(int compute) { return compute == 68 || compute == 69; }

struct LtDesc {
  int compute, scale;
  int transa = 0, transb = 0;
  uint32_t epilogue = 1;
  uint64_t bias = 0;
  int bias_type = -1;
};

struct LtLayout {
  int type;
  uint64_t rows, cols;
  int64_t ld;
  int batch = 1;
};

}  // namespace

extern "C" {

int cublasCreate_v2(void** h) {
  *h = new BlasHandle();
  return BLAS_OK;
}
int cublasDestroy_v2(void* h) {
  delete static_cast<BlasHandle*>(h);
  return BLAS_OK;
}
int cublasSetStream_v2(void* h, void* s) {
  static_cast<BlasHandle*>(h)->stream = s;
  return BLAS_OK;
}
int cublasGetStream_v2(void* h, void** s) {
  *s = static_cast<BlasHandle*>(h)->stream;
  return BLAS_OK;
}
int cublasSetWorkspace_v2(void*, void* p, size_t bytes) {
  LOCKED;
  return bytes == 0 || holding((uintptr_t)p, bytes) ? BLAS_OK : BLAS_INVALID_VALUE;
}
int cublasSetMathMode(void*, int) { return BLAS_OK; }
int cublasGetMathMode(void*, int* mode) {
  *mode = 0;
  return BLAS_OK;
}
int cublasSetPointerMode_v2(void*, int mode) { return mode == 0 ? BLAS_OK : BLAS_NOT_SUPPORTED; }
int cublasGetPointerMode_v2(void*, int* mode) {
  *mode = 0;
  return BLAS_OK;
}

int cublasSgemm_v2(void* h, int ta, int tb, int m, int n, int k, const float* alpha, const float* a,
                   int lda, const float* b, int ldb, const float* beta, float* c, int ldc) {
  LOCKED;
  return enqueue(static_cast<BlasHandle*>(h),
                 strided(ta, tb, m, n, k, *alpha, (uintptr_t)a, R_32F, lda, 0, (uintptr_t)b, R_32F,
                         ldb, 0, *beta, (uintptr_t)c, R_32F, ldc, 0, 1),
                 "cublasSgemm");
}

int cublasSgemmStridedBatched(void* h, int ta, int tb, int m, int n, int k, const float* alpha,
                              const float* a, int lda, long long sa, const float* b, int ldb,
                              long long sb, const float* beta, float* c, int ldc, long long sc,
                              int batch) {
  LOCKED;
  return enqueue(static_cast<BlasHandle*>(h),
                 strided(ta, tb, m, n, k, *alpha, (uintptr_t)a, R_32F, lda, sa, (uintptr_t)b, R_32F,
                         ldb, sb, *beta, (uintptr_t)c, R_32F, ldc, sc, batch),
                 "cublasSgemmStridedBatched");
}

int cublasGemmEx(void* h, int ta, int tb, int m, int n, int k, const void* alpha, const void* a,
                 int at, int lda, const void* b, int bt, int ldb, const void* beta, void* c, int ct,
                 int ldc, int compute, int) {
  LOCKED;
  if (!f32_compute(compute)) return BLAS_NOT_SUPPORTED;
  return enqueue(static_cast<BlasHandle*>(h),
                 strided(ta, tb, m, n, k, *(const float*)alpha, (uintptr_t)a, at, lda, 0,
                         (uintptr_t)b, bt, ldb, 0, *(const float*)beta, (uintptr_t)c, ct, ldc, 0, 1),
                 "cublasGemmEx");
}

int cublasGemmStridedBatchedEx(void* h, int ta, int tb, int m, int n, int k, const void* alpha,
                               const void* a, int at, int lda, long long sa, const void* b, int bt,
                               int ldb, long long sb, const void* beta, void* c, int ct, int ldc,
                               long long sc, int batch, int compute, int) {
  LOCKED;
  if (!f32_compute(compute)) return BLAS_NOT_SUPPORTED;
  return enqueue(static_cast<BlasHandle*>(h),
                 strided(ta, tb, m, n, k, *(const float*)alpha, (uintptr_t)a, at, lda, sa,
                         (uintptr_t)b, bt, ldb, sb, *(const float*)beta, (uintptr_t)c, ct, ldc, sc,
                         batch),
                 "cublasGemmStridedBatchedEx");
}

// The pointer arrays are device memory, read when the call runs (a kernel queued before it
// may write them).
static int batched(void* h, int ta, int tb, int m, int n, int k, float alpha, const void* const* a,
                   int at, int lda, const void* const* b, int bt, int ldb, float beta,
                   void* const* c, int ct, int ldc, int batch, const char* call) {
  BlasHandle* bh = static_cast<BlasHandle*>(h);
  if (sticky) return BLAS_EXECUTION_FAILED;
  if (batch < 0) return BLAS_INVALID_VALUE;
  for (const void* arr : {(const void*)a, (const void*)b, (const void*)c}) {
    if (!in_device_memory((uintptr_t)arr, sizeof(void*) * batch, call)) return BLAS_EXECUTION_FAILED;
  }
  const CUresult r = submit(bh->stream, [=] {
    std::vector<Product> ps;
    for (int i = 0; i < batch; ++i) {
      const Operand cd{(uintptr_t)c[i], ct, m, n, ldc};
      ps.push_back(Product{(bool)ta, (bool)tb, m, n, k, alpha, beta,
                           stored_a((uintptr_t)a[i], at, ta, m, k, lda),
                           stored_b((uintptr_t)b[i], bt, tb, k, n, ldb), cd, cd});
    }
    if (check(ps, call) != BLAS_OK) {
      if (!sticky) sticky = ERR_ILLEGAL_ADDRESS;
      return;
    }
    for (const Product& p : ps) p.run();
  });
  return r == SUCCESS ? BLAS_OK : BLAS_EXECUTION_FAILED;
}

int cublasSgemmBatched(void* h, int ta, int tb, int m, int n, int k, const float* alpha,
                       const float* const* a, int lda, const float* const* b, int ldb,
                       const float* beta, float* const* c, int ldc, int batch) {
  LOCKED;
  return batched(h, ta, tb, m, n, k, *alpha, (const void* const*)a, R_32F, lda,
                 (const void* const*)b, R_32F, ldb, *beta, (void* const*)c, R_32F, ldc, batch,
                 "cublasSgemmBatched");
}

int cublasGemmBatchedEx(void* h, int ta, int tb, int m, int n, int k, const void* alpha,
                        const void* const* a, int at, int lda, const void* const* b, int bt, int ldb,
                        const void* beta, void* const* c, int ct, int ldc, int batch, int compute,
                        int) {
  LOCKED;
  if (!f32_compute(compute)) return BLAS_NOT_SUPPORTED;
  return batched(h, ta, tb, m, n, k, *(const float*)alpha, a, at, lda, b, bt, ldb,
                 *(const float*)beta, c, ct, ldc, batch, "cublasGemmBatchedEx");
}

// cuBLASLt: descriptors with the attributes the backend sets (transposes, the bias epilogue,
// the bias pointer and type), plain column-major layouts, one product per call.

int cublasLtCreate(void** h) {
  *h = new BlasHandle();
  return BLAS_OK;
}
int cublasLtDestroy(void* h) {
  delete static_cast<BlasHandle*>(h);
  return BLAS_OK;
}

int cublasLtMatmulDescCreate(void** d, int compute, int scale) {
  if (!f32_compute(compute) || scale != R_32F) return BLAS_NOT_SUPPORTED;
  *d = new LtDesc{compute, scale};
  return BLAS_OK;
}
int cublasLtMatmulDescDestroy(void* d) {
  delete static_cast<LtDesc*>(d);
  return BLAS_OK;
}
int cublasLtMatmulDescSetAttribute(void* d, int attr, const void* v, size_t bytes) {
  LtDesc* desc = static_cast<LtDesc*>(d);
  auto want = [&](size_t n) { return bytes == n; };
  switch (attr) {
    case 3:
      if (!want(4)) return BLAS_INVALID_VALUE;
      memcpy(&desc->transa, v, 4);
      return BLAS_OK;
    case 4:
      if (!want(4)) return BLAS_INVALID_VALUE;
      memcpy(&desc->transb, v, 4);
      return BLAS_OK;
    case 7:
      if (!want(4)) return BLAS_INVALID_VALUE;
      memcpy(&desc->epilogue, v, 4);
      return desc->epilogue == 1 || desc->epilogue == 4 ? BLAS_OK : BLAS_NOT_SUPPORTED;
    case 8:
      if (!want(8)) return BLAS_INVALID_VALUE;
      memcpy(&desc->bias, v, 8);
      return BLAS_OK;
    case 26:
      if (!want(4)) return BLAS_INVALID_VALUE;
      memcpy(&desc->bias_type, v, 4);
      return BLAS_OK;
    default:
      fprintf(stderr, "emulated CUDA device: cuBLASLt descriptor attribute %d\n", attr);
      return BLAS_NOT_SUPPORTED;
  }
}

int cublasLtMatrixLayoutCreate(void** l, int type, uint64_t rows, uint64_t cols, int64_t ld) {
  *l = new LtLayout{type, rows, cols, ld};
  return BLAS_OK;
}
int cublasLtMatrixLayoutDestroy(void* l) {
  delete static_cast<LtLayout*>(l);
  return BLAS_OK;
}
int cublasLtMatrixLayoutSetAttribute(void* l, int attr, const void* v, size_t bytes) {
  if (attr == 5 && bytes == 4) {
    memcpy(&static_cast<LtLayout*>(l)->batch, v, 4);
    return static_cast<LtLayout*>(l)->batch == 1 ? BLAS_OK : BLAS_NOT_SUPPORTED;
  }
  fprintf(stderr, "emulated CUDA device: cuBLASLt layout attribute %d\n", attr);
  return BLAS_NOT_SUPPORTED;
}

static int preference_token;
int cublasLtMatmulPreferenceCreate(void** p) {
  *p = &preference_token;
  return BLAS_OK;
}
int cublasLtMatmulPreferenceDestroy(void*) { return BLAS_OK; }
int cublasLtMatmulPreferenceSetAttribute(void*, int, const void*, size_t) { return BLAS_OK; }

// op(A) m × k, op(B) k × n, C and D m × n; false when the layouts disagree.
static bool lt_shape(const LtDesc& d, const LtLayout& a, const LtLayout& b, const LtLayout& c,
                     const LtLayout& dl, int64_t* m, int64_t* n, int64_t* k) {
  *m = dl.rows;
  *n = dl.cols;
  *k = d.transa ? a.rows : a.cols;
  const int64_t am = d.transa ? a.cols : a.rows;
  const int64_t bk = d.transb ? b.cols : b.rows, bn = d.transb ? b.rows : b.cols;
  return am == *m && bk == *k && bn == *n && c.rows == dl.rows && c.cols == dl.cols &&
         c.type == dl.type && a.type == b.type;
}

int cublasLtMatmulAlgoGetHeuristic(void*, void* desc, void* a, void* b, void* c, void* d, void*,
                                   int requested, void* results, int* count) {
  const LtDesc& ds = *static_cast<LtDesc*>(desc);
  int64_t m, n, k;
  if (!lt_shape(ds, *static_cast<LtLayout*>(a), *static_cast<LtLayout*>(b),
                *static_cast<LtLayout*>(c), *static_cast<LtLayout*>(d), &m, &n, &k)) {
    return BLAS_INVALID_VALUE;
  }
  if (requested < 1) return BLAS_INVALID_VALUE;
  // cublasLtMatmulHeuristicResult_t: an algorithm (8 u64), workspace size, state, waves,
  // 4 reserved ints; all zero is "this algorithm, no workspace, fine".
  memset(results, 0, 96);
  *count = 1;
  return BLAS_OK;
}

int cublasLtMatmul(void* h, void* desc, const void* alpha, const void* a, void* al, const void* b,
                   void* bl, const void* beta, const void* c, void* cl, void* d, void* dl,
                   const void*, void* workspace, size_t workspace_bytes, void* stream) {
  LOCKED;
  const LtDesc& ds = *static_cast<LtDesc*>(desc);
  const LtLayout &A = *static_cast<LtLayout*>(al), &B = *static_cast<LtLayout*>(bl),
                 &C = *static_cast<LtLayout*>(cl), &D = *static_cast<LtLayout*>(dl);
  int64_t m, n, k;
  if (!lt_shape(ds, A, B, C, D, &m, &n, &k)) return BLAS_INVALID_VALUE;
  if (workspace_bytes && !in_device_memory((uintptr_t)workspace, workspace_bytes, "cublasLtMatmul workspace")) {
    return BLAS_EXECUTION_FAILED;
  }
  if (c != d && C.ld != D.ld) return BLAS_NOT_SUPPORTED;
  Product p{(bool)ds.transa, (bool)ds.transb, m, n, k, *(const float*)alpha, *(const float*)beta,
            Operand{(uintptr_t)a, A.type, (int64_t)A.rows, (int64_t)A.cols, A.ld},
            Operand{(uintptr_t)b, B.type, (int64_t)B.rows, (int64_t)B.cols, B.ld},
            Operand{(uintptr_t)c, C.type, m, n, C.ld}, Operand{(uintptr_t)d, D.type, m, n, D.ld}};
  if (ds.epilogue == 4) {
    if (!ds.bias) return BLAS_INVALID_VALUE;
    p.bias = ds.bias;
    p.bias_type = ds.bias_type >= 0 ? ds.bias_type : D.type;
  }
  BlasHandle tmp{stream};
  return enqueue(&tmp, {p}, "cublasLtMatmul");
}

}  // extern "C"
