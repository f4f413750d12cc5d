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
// - Streams are queues that run as late as the program allows: work runs only when
//   something waits for it (a stream, event or context synchronisation, a synchronous call,
//   a copy to pageable memory, a query), and a stream's operation that waits on an event
//   first runs the other stream up to that record. So a missing wait shows: a kernel reads
//   memory a copy on another stream has not written yet (0xff bytes), host code reads a
//   page-locked copy's destination before it is filled (0xff bytes), a copy from
//   page-locked memory finds its bytes rewritten by the host before it ran (reported).
//   Beside that, a race check: every operation carries a vector clock (what it is ordered
//   after: its stream's earlier work, the events it waited on, what the host saw finish
//   before queueing it), and each access to an allocation (a copy's range, a product's
//   operands, a kernel's pointer arguments, taken as writes; an allocation and a free in
//   stream order count as writes) must be ordered after the allocation's last write, and a
//   write after the reads since; otherwise the two operations are reported. A stream under
//   capture records instead; a stream that waits on an event recorded under capture joins
//   that capture; a launched graph replays the records as one operation of its stream.
//   Calls a capture forbids (synchronous allocation, copies and sets, synchronising a
//   capturing stream or the context, querying a captured event) fail with
//   CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED and invalidate the capture.
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
#include <deque>
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

// The order between streams, as vector clocks: entry i of a clock is how many operations of
// stream i are ordered before (the stream's own operations count themselves).
using Clock = std::vector<uint64_t>;

void join(Clock& into, const Clock& from) {
  if (from.size() > into.size()) into.resize(from.size(), 0);
  for (size_t i = 0; i < from.size(); ++i) into[i] = std::max(into[i], from[i]);
}

// Whether operation `tick` of stream `stream` is ordered before whatever holds `clock`.
bool ordered_before(int stream, uint64_t tick, const Clock& clock) {
  return (size_t)stream < clock.size() && tick <= clock[stream];
}

// One access to an allocation: which operation made it (its stream and place there).
struct Access {
  int stream = -1;
  uint64_t tick = 0;
  std::string what;
};

struct Allocation {
  size_t bytes;
  bool pool;   // from cuMemAllocAsync (the default pool's statistics)
  bool graph;  // made under capture (the graph's memory)
  // The last write and the reads since (one per stream, the latest), for the race check.
  Access written;
  std::vector<Access> reads;
  bool free_queued = false;  // cuMemFreeAsync was called (it runs in its stream's order)
};

std::map<uintptr_t, Allocation> allocations;
// Allocations given back (base → bytes), until their memory is handed out again: a fault in
// one of them is a use after free.
std::map<uintptr_t, size_t> freed;
// Page-locked host memory (base → bytes): a queued copy reads or writes it when it runs.
std::map<uintptr_t, size_t> pinned;
size_t pool_used = 0, pool_high = 0, graph_used = 0, graph_high = 0;
CUresult sticky = SUCCESS;

struct Graph;
struct Stream;

// A queued operation: what it does, what it is ordered after (its clock), and the places
// in other streams it waits for (an event waited on, the legacy stream's implicit order).
struct Op {
  std::function<void()> run;
  std::string what;
  Clock clock;
  std::vector<std::pair<Stream*, uint64_t>> after;
};

// An operation as a graph records it; a replay runs it under the replaying operation.
struct Recorded {
  std::function<void()> run;
  std::string what;
};

struct Stream {
  int id;
  bool blocking;  // ordered with the legacy stream (created without CU_STREAM_NON_BLOCKING)
  Graph* capture = nullptr;  // the graph this stream records into, if any
  Clock clock;               // what the next operation queued here is ordered after
  std::deque<Op> pending;    // queued, not yet run (they run when something waits for them)
  uint64_t queued = 0, done = 0;
  bool destroyed = false;  // kept: queued waits of other streams may name it
};

struct Event {
  bool recorded = false;  // a record has run (the time is set)
  double at_ms = 0.0;
  Graph* captured = nullptr;  // recorded under this capture
  Stream* stream = nullptr;   // the last record outside a capture: its stream and place
  uint64_t seq = 0;
  Clock clock;
};

struct Graph {
  std::vector<Recorded> ops;
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

std::vector<std::unique_ptr<Stream>> all_streams;
// Events live while a record queued on them may still run (the handle is the raw pointer).
std::map<void*, std::shared_ptr<Event>> events;
// What the host has seen finish (through a synchronisation): the work it queues after
// is ordered after that. Every host thread shares it (they order themselves).
Clock host_clock;

Stream* new_stream(bool blocking) {
  all_streams.push_back(std::make_unique<Stream>());
  Stream* s = all_streams.back().get();
  s->id = (int)all_streams.size() - 1;
  s->blocking = blocking;
  return s;
}

Stream* const legacy_stream = new_stream(true);

// The operation running now (its stream and clock), which the accesses it makes are
// checked against; none outside an operation.
struct Running {
  int stream = -1;
  const Clock* clock = nullptr;
  const std::string* what = nullptr;
} running;

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

Stream* stream_of(void* s) { return s ? static_cast<Stream*>(s) : legacy_stream; }

// Whether any stream is capturing (the calls a capture forbids are checked against it).
std::set<Graph*> capturing;

// Fails a call that a capture forbids, and invalidates the capture(s).
CUresult forbidden_under_capture(const char* what) {
  if (capturing.empty()) return SUCCESS;
  for (Graph* g : capturing) g->invalid = true;
  fprintf(stderr, "emulated CUDA device: %s during stream capture\n", what);
  return ERR_CAPTURE_UNSUPPORTED;
}

// Runs the operations queued on `s` up to its `upto`-th, each after the operations of other
// streams it waits for. (A wait names only operations queued before it, so this ends.)
void drain(Stream* s, uint64_t upto) {
  while (s->done < upto && !s->pending.empty()) {
    Op op = std::move(s->pending.front());
    s->pending.pop_front();
    for (auto& [other, seq] : op.after) drain(other, seq);
    if (sticky == SUCCESS) {  // after a fault the context runs nothing more
      running = Running{s->id, &op.clock, &op.what};
      op.run();
      running = Running{};
    }
    ++s->done;
  }
}

// Runs what `s` has queued; the host has then seen it finish.
CUresult finish(Stream* s) {
  drain(s, s->queued);
  join(host_clock, s->clock);
  return sticky;
}

// Runs everything queued on every stream (a synchronisation of the context).
CUresult finish_all() {
  for (auto& s : all_streams) finish(s.get());
  return sticky;
}

// Queues `fn` on `s`, ordered after what the host has seen finish, after the places of
// other streams in `after` (whose clocks the caller has joined into `s`'s), and (for the
// legacy stream and the blocking streams) after each other's work queued before it.
void queue(Stream* s, std::string what, std::function<void()> fn,
           std::vector<std::pair<Stream*, uint64_t>> after = {}) {
  join(s->clock, host_clock);
  auto implicit = [&](Stream* other) {
    if (other == s || other->destroyed || other->queued == 0) return;
    join(s->clock, other->clock);
    after.push_back({other, other->queued});
  };
  if (s == legacy_stream) {
    for (auto& other : all_streams)
      if (other->blocking) implicit(other.get());
  } else if (s->blocking) {
    implicit(legacy_stream);
  }
  if (s->clock.size() <= (size_t)s->id) s->clock.resize(s->id + 1, 0);
  s->clock[s->id] = ++s->queued;
  s->pending.push_back(Op{std::move(fn), std::move(what), s->clock, std::move(after)});
  if (verbose()) {
    fprintf(stderr, "emulated CUDA device: stream %d queues %s\n", s->id,
            s->pending.back().what.c_str());
  }
}

// Queues `fn` on stream `s`, or records it where `s` is capturing.
CUresult submit(void* s, std::string what, std::function<void()> fn) {
  if (sticky != SUCCESS) return sticky;
  Stream* st = stream_of(s);
  if (st == legacy_stream && !capturing.empty()) {
    return forbidden_under_capture("work on the legacy stream");
  }
  if (st->destroyed) return fault(ERR_INVALID_HANDLE, "%s on a destroyed stream", what.c_str());
  if (st->capture) {
    st->capture->ops.push_back(Recorded{std::move(fn), std::move(what)});
  } else {
    queue(st, std::move(what), std::move(fn));
  }
  return sticky;
}

// The allocation holding [p, p + bytes), or the end.
std::map<uintptr_t, Allocation>::iterator holding_it(uintptr_t p, size_t bytes) {
  auto it = allocations.upper_bound(p);
  if (it == allocations.begin()) return allocations.end();
  --it;
  if (p - it->first + bytes <= it->second.bytes && p >= it->first) return it;
  return allocations.end();
}

// The allocation holding [p, p + bytes), or null.
const Allocation* holding(uintptr_t p, size_t bytes) {
  auto it = holding_it(p, bytes);
  return it == allocations.end() ? nullptr : &it->second;
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

// Reports two accesses to one allocation that no stream order, event or synchronisation
// orders (the running operation's, and an earlier one).
bool race(uintptr_t base, const Allocation& a, const Access& earlier, bool earlier_wrote,
          bool write) {
  fault(ERR_ILLEGAL_ADDRESS,
        "a race on the allocation at %#llx (%zu bytes): %s (stream %d, its operation %llu) %s "
        "it, and %s (stream %d, its operation %llu) %s it, with no event or synchronisation "
        "ordering the two",
        (unsigned long long)base, a.bytes, earlier.what.c_str(), earlier.stream,
        (unsigned long long)earlier.tick, earlier_wrote ? "wrote" : "read", running.what->c_str(),
        running.stream, (unsigned long long)(*running.clock)[running.stream],
        write ? "writes" : "reads");
  return false;
}

// An access of the running operation to [p, p + bytes): it must lie in an allocation, after
// that allocation's last write in the order between streams, and a write also after the
// reads since. (Granularity: the allocation. Work of one stream is ordered by the stream.)
bool touch(uintptr_t p, size_t bytes, bool write, const char* what) {
  if (bytes == 0) return true;
  auto it = holding_it(p, bytes);
  if (it == allocations.end()) return in_device_memory(p, bytes, what);  // the fault
  if (!running.clock) return true;
  Allocation& a = it->second;
  const Clock& now = *running.clock;
  if (a.written.stream >= 0 && !ordered_before(a.written.stream, a.written.tick, now)) {
    return race(it->first, a, a.written, true, write);
  }
  const uint64_t tick = now[running.stream];
  if (write) {
    for (const Access& r : a.reads)
      if (!ordered_before(r.stream, r.tick, now)) return race(it->first, a, r, false, true);
    a.reads.clear();
    a.written = Access{running.stream, tick, *running.what};
    return true;
  }
  for (Access& r : a.reads) {
    if (r.stream == running.stream) {
      r.tick = tick;
      r.what = *running.what;
      return true;
    }
  }
  a.reads.push_back(Access{running.stream, tick, *running.what});
  return true;
}

// Whether [p, p + bytes) is page-locked host memory.
bool is_pinned(const void* p, size_t bytes) {
  auto it = pinned.upper_bound((uintptr_t)p);
  if (it == pinned.begin()) return false;
  --it;
  return (uintptr_t)p >= it->first && (uintptr_t)p - it->first + bytes <= it->second;
}

// A digest of host bytes (FNV-1a), to see whether they changed.
uint64_t digest(const void* p, size_t bytes) {
  uint64_t h = 0xcbf29ce484222325ull;
  const unsigned char* c = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < bytes; ++i) h = (h ^ c[i]) * 0x100000001b3ull;
  return h;
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

// Takes an allocation out of the pool's and the graphs' statistics (when it is given back
// in stream order, at the call, as a pool counts it).
void uncount(const Allocation& a) {
  if (a.pool) pool_used -= a.bytes;
  if (a.graph) graph_used -= a.bytes;
}

// Gives the memory back: later accesses to it are uses after free.
void give_back(std::map<uintptr_t, Allocation>::iterator it) {
  freed[it->first] = it->second.bytes;
  free((void*)it->first);
  allocations.erase(it);
}

CUresult release(CUdeviceptr p, const char* what) {
  auto it = allocations.find((uintptr_t)p);
  if (it == allocations.end() || it->second.free_queued) {
    return fault(ERR_INVALID_VALUE, "%s: %#llx is not an allocation", what, p);
  }
  uncount(it->second);
  give_back(it);
  return SUCCESS;
}

}  // namespace

// Kernel arguments: called by the generated launches, as the kernel runs, for every pointer
// parameter (each an access, as a write, to the allocation it points into; a pointer just
// past an allocation's end, the end of an empty window, belongs to that allocation).
void emu_check_pointer(const char* kernel, int k, const void* p) {
  if (!p) return;
  const uintptr_t at = (uintptr_t)p;
  for (uintptr_t byte : {at, at - 1}) {
    if (holding(byte, 1)) {
      touch(byte, 1, true, kernel);
      return;
    }
  }
  char what[160];
  snprintf(what, sizeof what, "kernel %s: argument %d (%p)", kernel, k, p);
  in_device_memory(at, 1, what);  // the fault, with where the pointer points
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
  return finish_all();
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

CUresult cuStreamCreate(void** s, unsigned flags) {
  LOCKED;
  *s = new_stream(!(flags & 1));  // CU_STREAM_NON_BLOCKING
  return SUCCESS;
}
CUresult cuStreamCreateWithPriority(void** s, unsigned f, int) { return cuStreamCreate(s, f); }
// The queued work still runs (the object is kept: other streams' waits may name it).
CUresult cuStreamDestroy_v2(void* s) {
  LOCKED;
  Stream* st = static_cast<Stream*>(s);
  drain(st, st->queued);
  st->destroyed = true;
  return SUCCESS;
}
CUresult cuStreamSynchronize(void* s) {
  LOCKED;
  if (stream_of(s)->capture || (!s && !capturing.empty())) {
    return forbidden_under_capture("cuStreamSynchronize");
  }
  return finish(stream_of(s));
}
// Work still queued answers "not ready" (and runs, so that a caller polling sees it end).
CUresult cuStreamQuery(void* s) {
  LOCKED;
  Stream* st = stream_of(s);
  if (st->capture) return forbidden_under_capture("cuStreamQuery");
  if (st->done < st->queued) {
    drain(st, st->queued);
    return sticky ? sticky : ERR_NOT_READY;
  }
  return finish(st);
}

// Whether the event's last record outside a capture is queued and has not run yet.
bool record_pending(const Event* ev) { return ev->stream && ev->stream->done < ev->seq; }

CUresult cuEventCreate(void** e, unsigned) {
  LOCKED;
  auto ev = std::make_shared<Event>();
  events[ev.get()] = ev;
  *e = ev.get();
  return SUCCESS;
}
// A record still queued keeps the event's state alive until it runs.
CUresult cuEventDestroy_v2(void* e) {
  LOCKED;
  return events.erase(e) ? SUCCESS : ERR_INVALID_HANDLE;
}
CUresult cuEventRecord(void* e, void* s) {
  LOCKED;
  auto found = events.find(e);
  if (found == events.end()) return ERR_INVALID_HANDLE;
  std::shared_ptr<Event> ev = found->second;
  Stream* st = stream_of(s);
  if (st->capture) {
    ev->captured = st->capture;
    ev->recorded = true;
    return SUCCESS;
  }
  if (CUresult r = submit(s, "cuEventRecord", [ev] {
        ev->recorded = true;
        ev->at_ms = now_ms();
      })) {
    return r;
  }
  ev->captured = nullptr;
  ev->stream = st;
  ev->seq = st->queued;
  ev->clock = st->clock;
  return SUCCESS;
}
CUresult cuEventRecordWithFlags(void* e, void* s, unsigned) { return cuEventRecord(e, s); }
CUresult cuEventSynchronize(void* e) {
  LOCKED;
  Event* ev = static_cast<Event*>(e);
  if (ev->captured) return forbidden_under_capture("cuEventSynchronize");
  if (ev->stream) {
    drain(ev->stream, ev->seq);
    join(host_clock, ev->clock);
  }
  return sticky;
}
// A record still queued answers "not ready" (and runs, so that a caller polling sees it end).
CUresult cuEventQuery(void* e) {
  LOCKED;
  Event* ev = static_cast<Event*>(e);
  if (ev->captured) return forbidden_under_capture("cuEventQuery");
  if (record_pending(ev)) {
    drain(ev->stream, ev->seq);
    return sticky ? sticky : ERR_NOT_READY;
  }
  return cuEventSynchronize(e);
}
CUresult cuEventElapsedTime(float* ms, void* start, void* end) {
  LOCKED;
  Event *a = static_cast<Event*>(start), *b = static_cast<Event*>(end);
  if (record_pending(a) || record_pending(b)) return ERR_NOT_READY;
  if (!a->recorded || !b->recorded) return ERR_INVALID_HANDLE;
  *ms = (float)(b->at_ms - a->at_ms);
  return SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) {
  return cuEventElapsedTime(ms, start, end);
}

// The stream's next operations run after the event's last record; a stream waiting on an
// event recorded under capture joins that capture.
CUresult cuStreamWaitEvent(void* s, void* e, unsigned) {
  LOCKED;
  Event* ev = static_cast<Event*>(e);
  Stream* st = stream_of(s);
  if (ev->captured && !st->capture) {
    if (st == legacy_stream) return forbidden_under_capture("the legacy stream joining a capture");
    st->capture = ev->captured;
    return sticky;
  }
  if (st->capture || !ev->stream) return sticky;
  if (sticky) return sticky;
  join(st->clock, ev->clock);  // the record's clock (queue knows only its stream and place)
  queue(st, "cuStreamWaitEvent", [] {}, {{ev->stream, ev->seq}});
  return sticky;
}

CUresult cuLaunchHostFunc(void* s, void (*fn)(void*), void* data) {
  LOCKED;
  return submit(s, "cuLaunchHostFunc", [fn, data] { fn(data); });
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

// A synchronous free: the work queued before it finishes first.
CUresult cuMemFree_v2(CUdeviceptr p) {
  LOCKED;
  if (CUresult r = forbidden_under_capture("cuMemFree")) return r;
  finish_all();
  return release(p, "cuMemFree");
}

// The memory belongs to the stream from this point of its order: the allocation is an
// operation of the stream (a write of the whole allocation), which any other stream's use
// must be ordered after.
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
  *p = (CUdeviceptr)m;
  if (st->capture) {
    st->capture->owned.push_back(m);
    return SUCCESS;
  }
  return submit(s, "cuMemAllocAsync", [m, bytes] { touch((uintptr_t)m, bytes, true, "cuMemAllocAsync"); });
}

CUresult cuMemAllocFromPoolAsync(CUdeviceptr* p, size_t bytes, void*, void* s) {
  return cuMemAllocAsync(p, bytes, s);
}

// A free under capture frees nothing until the graph is destroyed (the graph keeps its
// allocations). Otherwise the pool counts the bytes free at once; the memory is given back
// when the free runs, in the stream's order (a write of the whole allocation: any other
// stream's use must be ordered before it), and a use after that is a use after free.
CUresult cuMemFreeAsync(CUdeviceptr p, void* s) {
  LOCKED;
  if (p == 0) return SUCCESS;
  auto it = allocations.find((uintptr_t)p);
  if (it == allocations.end() || it->second.free_queued) {
    return fault(ERR_INVALID_VALUE, "cuMemFreeAsync: %#llx is not an allocation", p);
  }
  if (stream_of(s)->capture) return SUCCESS;
  for (Graph* g : capturing) {
    for (void* o : g->owned)
      if ((CUdeviceptr)o == p) {
        return fault(ERR_INVALID_VALUE, "cuMemFreeAsync of a capture's allocation outside it");
      }
  }
  if (sticky) return sticky;
  it->second.free_queued = true;
  uncount(it->second);
  const size_t bytes = it->second.bytes;
  return submit(s, "cuMemFreeAsync", [p, bytes] {
    if (touch((uintptr_t)p, bytes, true, "cuMemFreeAsync")) give_back(allocations.find((uintptr_t)p));
  });
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
  LOCKED;
  const size_t rounded = (bytes + 4095) & ~size_t(4095);
  *p = aligned_alloc(4096, rounded ? rounded : 4096);
  if (!*p) return ERR_OUT_OF_MEMORY;
  pinned[(uintptr_t)*p] = bytes;
  return SUCCESS;
}
CUresult cuMemFreeHost(void* p) {
  LOCKED;
  pinned.erase((uintptr_t)p);
  free(p);
  return SUCCESS;
}

// From page-locked memory the copy reads the host bytes when it runs: they must not change
// before then (the host must wait for an event recorded after the copy, or synchronise).
// From pageable memory the call stages the bytes before it returns.
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, void* s) {
  LOCKED;
  if (!in_device_memory(dst, bytes, "cuMemcpyHtoDAsync destination")) return sticky;
  const char* what = "cuMemcpyHtoDAsync";
  if (stream_of(s)->capture) {  // a replay reads the host bytes of its time
    return submit(s, what, [=] {
      if (touch(dst, bytes, true, what)) memcpy((void*)dst, src, bytes);
    });
  }
  if (is_pinned(src, bytes)) {
    const uint64_t before = digest(src, bytes);
    return submit(s, what, [=] {
      if (digest(src, bytes) != before) {
        fault(ERR_ILLEGAL_ADDRESS,
              "cuMemcpyHtoDAsync: the page-locked host bytes [%p, +%zu) it copies were "
              "rewritten after the call and before the copy ran (nothing waited for the copy)",
              src, bytes);
        return;
      }
      if (touch(dst, bytes, true, what)) memcpy((void*)dst, src, bytes);
    });
  }
  auto staged = std::make_shared<std::vector<char>>((const char*)src, (const char*)src + bytes);
  return submit(s, what, [=] {
    if (touch(dst, bytes, true, what)) memcpy((void*)dst, staged->data(), bytes);
  });
}
// Into page-locked memory the bytes are undefined (here: 0xff) until the copy is seen done;
// into pageable memory the call returns once the copy is done.
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes, void* s) {
  LOCKED;
  if (!in_device_memory(src, bytes, "cuMemcpyDtoHAsync source")) return sticky;
  const char* what = "cuMemcpyDtoHAsync";
  Stream* st = stream_of(s);
  const bool live = !st->capture, to_pinned = is_pinned(dst, bytes);
  if (live && to_pinned) memset(dst, 0xff, bytes);
  if (CUresult r = submit(s, what, [=] {
        if (touch(src, bytes, false, what)) memcpy(dst, (const void*)src, bytes);
      })) {
    return r;
  }
  return live && !to_pinned ? finish(st) : sticky;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, void* s) {
  LOCKED;
  if (!in_device_memory(dst, bytes, "cuMemcpyDtoDAsync destination") ||
      !in_device_memory(src, bytes, "cuMemcpyDtoDAsync source")) {
    return sticky;
  }
  return submit(s, "cuMemcpyDtoDAsync", [=] {
    if (touch(src, bytes, false, "cuMemcpyDtoDAsync source") &&
        touch(dst, bytes, true, "cuMemcpyDtoDAsync destination")) {
      memmove((void*)dst, (const void*)src, bytes);
    }
  });
}
// The synchronous copies and sets: on the legacy stream, finished before they return.
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) {
  LOCKED;
  if (CUresult r = forbidden_under_capture("cuMemcpyHtoD")) return r;
  if (CUresult r = cuMemcpyHtoDAsync_v2(dst, src, bytes, nullptr)) return r;
  return finish(legacy_stream);
}
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) {
  LOCKED;
  if (CUresult r = forbidden_under_capture("cuMemcpyDtoH")) return r;
  if (CUresult r = cuMemcpyDtoHAsync_v2(dst, src, bytes, nullptr)) return r;
  return finish(legacy_stream);
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes) {
  LOCKED;
  if (CUresult r = forbidden_under_capture("cuMemcpyDtoD")) return r;
  if (CUresult r = cuMemcpyDtoDAsync_v2(dst, src, bytes, nullptr)) return r;
  return finish(legacy_stream);
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void* s) {
  LOCKED;
  if (!in_device_memory(dst, n, "cuMemsetD8Async")) return sticky;
  return submit(s, "cuMemsetD8Async", [=] {
    if (touch(dst, n, true, "cuMemsetD8Async")) memset((void*)dst, v, n);
  });
}
CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
  LOCKED;
  if (CUresult r = forbidden_under_capture("cuMemsetD8")) return r;
  if (CUresult r = cuMemsetD8Async(dst, v, n, nullptr)) return r;
  return finish(legacy_stream);
}
CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, void* s) {
  LOCKED;
  if (!in_device_memory(dst, 4 * n, "cuMemsetD32Async")) return sticky;
  return submit(s, "cuMemsetD32Async", [=] {
    if (!touch(dst, 4 * n, true, "cuMemsetD32Async")) return;
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
  return submit(s, "kernel " + fn->name, std::move(run));
}

// ---- Graphs ----------------------------------------------------------------------------------

CUresult cuStreamBeginCapture_v2(void* s, int) {
  LOCKED;
  Stream* st = stream_of(s);
  if (st == legacy_stream) return ERR_CAPTURE_UNSUPPORTED;
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
  for (auto& other : all_streams)
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

// A launch is one operation of the stream; the recorded operations run in it, in order.
CUresult cuGraphLaunch(void* exec, void* s) {
  LOCKED;
  Graph* g = static_cast<Exec*>(exec)->graph;
  return submit(s, "cuGraphLaunch", [g] {
    const std::string* launch = running.what;
    for (auto& op : g->ops) {
      if (sticky) break;
      running.what = &op.what;
      op.run();
    }
    running.what = launch;
  });
}

// Queued launches of the graph run first (a GPU frees an executing graph when it ends).
CUresult cuGraphExecDestroy(void* exec) {
  LOCKED;
  finish_all();
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

// The accesses of a call's products as they run: A and B (and C where β ≠ 0) and the bias
// read, D written.
bool touch_products(const std::vector<Product>& ps, const char* call) {
  for (const Product& p : ps) {
    if (p.m == 0 || p.n == 0) continue;
    auto bytes = [](const Operand& o) { return (size_t)o.extent() * elem_bytes(o.type); };
    if (p.k > 0 && (!touch(p.a.base, bytes(p.a), false, call) || !touch(p.b.base, bytes(p.b), false, call))) {
      return false;
    }
    if (p.beta != 0.0f && !touch(p.c.base, bytes(p.c), false, call)) return false;
    if (p.bias && !touch(p.bias, (size_t)p.m * elem_bytes(p.bias_type), false, call)) return false;
    if (!touch(p.d.base, bytes(p.d), true, call)) return false;
  }
  return true;
}

// Checks the products now and queues them (with `scratch`, a workspace they write).
int enqueue(BlasHandle* h, std::vector<Product> ps, const char* call, uintptr_t scratch = 0,
            size_t scratch_bytes = 0) {
  if (sticky) return BLAS_EXECUTION_FAILED;
  if (int r = check(ps, call)) return r;
  return submit(h->stream, call, [ps, call, scratch, scratch_bytes] {
           if (!touch(scratch, scratch_bytes, true, call) || !touch_products(ps, call)) return;
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
  const CUresult r = submit(bh->stream, call, [=] {
    for (const void* arr : {(const void*)a, (const void*)b, (const void*)c}) {
      if (!touch((uintptr_t)arr, sizeof(void*) * batch, false, call)) return;
    }
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
    if (!touch_products(ps, call)) return;
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
  return enqueue(&tmp, {p}, "cublasLtMatmul", (uintptr_t)workspace, workspace_bytes);
}

}  // extern "C"
