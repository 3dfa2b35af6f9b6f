// The scheduler of the CUDA emulation (csrc/cuda/emulate/emulate.h): blocks one after another, a block's threads as
// fibers, released together at barriers and warp shuffles, run in the order the schedule says.
#undef _FORTIFY_SOURCE  // _longjmp between fiber stacks: no "jumps up the stack only" check
#define HKD_CUDA_EMULATE
#include "emulate.h"

#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <vector>

thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace hkd::emu {
namespace {

enum State { kReady, kAtBarrier, kAtWarp, kDone };

// A fiber starts with swapcontext (once per block) and then switches with _setjmp/_longjmp: no signal-mask syscall.
struct Fiber {
  ucontext_t context;
  jmp_buf resume;
  bool started;
  unsigned linear;  // threadIdx, linearised
  dim3 index;
  State state;
  int predicate, result;  // barrier_or's vote and the block's answer
  unsigned mask;          // the mask of the shuffle it waits at
  int parity;             // which of the two shuffle slot sets its next shuffle uses
};

constexpr size_t kStackBytes = 128 * 1024, kGuardBytes = 4096;

struct Block {
  std::vector<Fiber> fibers;
  std::vector<unsigned long long> slots[2];  // shuffle values by thread, double-buffered
  Fiber* current = nullptr;
  ucontext_t scheduler;
  jmp_buf back;  // the scheduler, waiting for the running fiber to yield
  std::string error;  // set by a fiber that found a fault: the launch stops
  long long barriers = 0, shuffles = 0;
};

struct Runtime {
  std::mutex mutex;  // one launch at a time (blockIdx & co. and the shared arrays are per OS thread)
  Config config;
  LaunchRecord last;
  std::map<const void*, int> max_dynamic_shared;
  std::vector<unsigned char* (*)()> dynamic_shared;
  int last_error = 0;
  std::string message;
  unsigned char* stacks = nullptr;
  size_t stack_count = 0;
};

Runtime& runtime() {
  static Runtime r;
  return r;
}

thread_local Block* active = nullptr;

unsigned char* stack_of(size_t i) {  // fiber i's stack, each below a guard page (an overflow faults, not corrupts)
  Runtime& r = runtime();
  return r.stacks + i * (kStackBytes + kGuardBytes) + kGuardBytes;
}

void reserve_stacks(size_t count) {
  Runtime& r = runtime();
  if (count <= r.stack_count) return;
  if (r.stacks) munmap(r.stacks, r.stack_count * (kStackBytes + kGuardBytes));
  void* p = mmap(nullptr, count * (kStackBytes + kGuardBytes), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                 -1, 0);
  r.stacks = static_cast<unsigned char*>(p == MAP_FAILED ? nullptr : p);
  r.stack_count = r.stacks ? count : 0;
  for (size_t i = 0; i < r.stack_count; ++i) mprotect(stack_of(i) - kGuardBytes, kGuardBytes, PROT_NONE);
}

// The kernel call of the launch being run, for the fibers' entry point.
void (*g_entry)(void*) = nullptr;
void* g_call = nullptr;

void fiber_main() {
  g_entry(g_call);
  active->current->state = kDone;
  _longjmp(active->back, 1);
}

void yield(State state) {
  Block& b = *active;
  Fiber& f = *b.current;
  f.state = state;
  if (!_setjmp(f.resume)) _longjmp(b.back, 1);
}

void resume(Block& b, Fiber& f) {
  if (_setjmp(b.back)) return;  // the fiber yielded or ended
  if (f.started) _longjmp(f.resume, 1);
  f.started = true;
  swapcontext(&b.scheduler, &f.context);
}

[[noreturn]] void fail(const std::string& message) {  // from a fiber: stop the launch
  Block& b = *active;
  if (b.error.empty()) b.error = message;
  for (;;) yield(kAtBarrier);  // never resumed: the scheduler sees the error first
}

std::string where() {
  const Fiber& f = *active->current;
  return "block (" + std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) + ") thread " +
         std::to_string(f.linear);
}

// The order in which the scheduler visits n items (fibers of a round, blocks of a launch).
std::vector<size_t> order(size_t n, const Config& c, unsigned long long stream) {
  std::vector<size_t> o(n);
  std::iota(o.begin(), o.end(), size_t(0));
  if (c.schedule == kReversed) std::reverse(o.begin(), o.end());
  if (c.schedule == kShuffled) {
    std::mt19937_64 rng(static_cast<unsigned long long>(c.seed) * 0x9e3779b97f4a7c15ull + stream);
    std::shuffle(o.begin(), o.end(), rng);
  }
  return o;
}

// Release whatever can go on; false when nothing can (the block is done, or stuck: b.error says which).
bool release(Block& b, unsigned threads) {
  bool released = false;
  // warp rendezvous: every lane of the mask has arrived at a shuffle
  for (unsigned w = 0; w * 32 < threads; ++w) {
    unsigned arrived = 0, mask = 0;
    bool first = true, agree = true;
    for (unsigned lane = 0; lane < 32 && w * 32 + lane < threads; ++lane) {
      const Fiber& f = b.fibers[w * 32 + lane];
      if (f.state != kAtWarp) continue;
      arrived |= 1u << lane;
      agree = agree && (first || f.mask == mask);
      mask = f.mask, first = false;
    }
    if (!arrived) continue;
    if (!agree) {
      b.error = "warp " + std::to_string(w) + ": lanes wait at shuffles with different masks";
      return false;
    }
    if ((arrived & mask) == mask) {
      for (unsigned lane = 0; lane < 32; ++lane)
        if (mask >> lane & 1u) b.fibers[w * 32 + lane].state = kReady;
      released = true;
    }
  }
  if (released) return true;
  size_t done = 0, waiting = 0, at_warp = 0;
  int vote = 0;
  for (const Fiber& f : b.fibers) {
    done += f.state == kDone;
    waiting += f.state == kAtBarrier;
    at_warp += f.state == kAtWarp;
    if (f.state == kAtBarrier) vote |= f.predicate != 0;
  }
  if (done == b.fibers.size()) return false;
  if (at_warp) {
    b.error = std::to_string(at_warp) + " threads wait at a warp shuffle whose other lanes never arrive "
              "(they exited or wait at __syncthreads)";
    return false;
  }
  if (done) {
    b.error = "__syncthreads reached by " + std::to_string(waiting) + " threads, but " + std::to_string(done) +
              " threads of the block exited without it (a barrier in divergent code)";
    return false;
  }
  ++b.barriers;
  for (Fiber& f : b.fibers) f.state = kReady, f.result = vote;
  return true;
}

std::string run_block(Block& b, unsigned threads, const Config& c, unsigned long long block_id) {
  b.fibers.assign(threads, Fiber{});
  for (int p = 0; p < 2; ++p) b.slots[p].assign(threads, 0);
  b.error.clear();
  const dim3 dims = blockDim;
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    f.linear = t;
    f.index = dim3(t % dims.x, t / dims.x % dims.y, t / (dims.x * dims.y));
    f.state = kReady;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = stack_of(t);
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  for (unsigned long long round = 0;; ++round) {
    for (size_t t : order(threads, c, block_id * 1000003ull + round)) {
      Fiber& f = b.fibers[t];
      if (f.state != kReady) continue;
      b.current = &f;
      threadIdx = f.index;
      resume(b, f);
      if (!b.error.empty()) return b.error + " (" + where() + ")";
    }
    if (!release(b, threads)) return b.error;
  }
}

}  // namespace

Config& config() { return runtime().config; }
LaunchRecord& last_launch() { return runtime().last; }

int take_last_error() {
  Runtime& r = runtime();
  const int e = r.last_error;
  r.last_error = 0;
  return e;
}

const char* error_string(int error) {
  if (error == cudaSuccess) return "no error";
  if (!runtime().message.empty()) return runtime().message.c_str();
  return error == cudaErrorInvalidValue ? "invalid argument" : "invalid configuration argument";
}

void set_max_dynamic_shared(const void* kernel, int bytes) { runtime().max_dynamic_shared[kernel] = bytes; }

bool register_dynamic_shared(unsigned char* (*array)()) {
  runtime().dynamic_shared.push_back(array);
  return true;
}

void barrier() {
  active->current->predicate = 0;
  yield(kAtBarrier);
}

int barrier_or(int predicate) {
  active->current->predicate = predicate;
  yield(kAtBarrier);
  return active->current->result;
}

unsigned long long shuffle_down(unsigned mask, unsigned long long value, unsigned delta, int width) {
  Block& b = *active;
  Fiber& f = *b.current;
  const unsigned lane = f.linear % 32, warp = f.linear / 32;
  if (!(mask >> lane & 1u)) fail("__shfl_down_sync from lane " + std::to_string(lane) + " outside its mask");
  if (width < 1 || width > 32 || (width & (width - 1))) fail("__shfl_down_sync width must be a power of 2 <= 32");
  for (unsigned l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && warp * 32 + l >= b.fibers.size()) fail("__shfl_down_sync mask names a missing lane");
  const int p = f.parity;
  f.parity ^= 1;
  b.slots[p][f.linear] = value;
  f.mask = mask;
  ++b.shuffles;
  yield(kAtWarp);
  const unsigned segment = lane / unsigned(width) * unsigned(width), source = lane + delta;
  if (source >= segment + unsigned(width)) return value;  // past the segment: the lane keeps its own value
  if (!(mask >> source & 1u)) return ~0ull;               // a lane outside the mask: undefined, here all ones
  return b.slots[p][warp * 32 + source];
}

int run(dim3 grid, dim3 block, size_t shared_bytes, const void* kernel, void (*entry)(void*), void* call) {
  Runtime& r = runtime();
  std::lock_guard<std::mutex> lock(r.mutex);
  const Config c = r.config;
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  const unsigned long long blocks = 1ull * grid.x * grid.y * grid.z;
  auto error = [&](int code, std::string message) {
    r.last_error = code;
    r.message = std::move(message);
    return code;
  };
  r.message.clear();
  if (!threads || threads > 1024 || block.z > 64 || !blocks || grid.y > 65535 || grid.z > 65535 ||
      grid.x > 2147483647u)
    return error(cudaErrorInvalidConfiguration, "invalid configuration argument (emulated launch: grid (" +
                                                    std::to_string(grid.x) + ", " + std::to_string(grid.y) +
                                                    "), block of " + std::to_string(threads) + " threads)");
  const auto attr = r.max_dynamic_shared.find(kernel);
  const size_t allowed = attr == r.max_dynamic_shared.end() ? 48 * 1024 : size_t(std::max(attr->second, 48 * 1024));
  if (shared_bytes > allowed || shared_bytes > kSharedArena)
    return error(cudaErrorInvalidValue, "invalid argument (emulated launch: " + std::to_string(shared_bytes) +
                                            " bytes of dynamic shared memory, the kernel allows " +
                                            std::to_string(allowed) + ")");
  reserve_stacks(threads);
  if (r.stack_count < threads) return error(cudaErrorLaunchFailure, "emulated launch: no memory for fiber stacks");
  Block b;
  active = &b;
  g_entry = entry, g_call = call;
  gridDim = grid, blockDim = block;
  r.last = LaunchRecord{grid, block, (long long)shared_bytes, r.last.launches + 1, 0, 0};
  std::string failure;
  for (size_t id : order(blocks, c, 0x5eedull)) {
    blockIdx = dim3(unsigned(id % grid.x), unsigned(id / grid.x % grid.y), unsigned(id / (1ull * grid.x * grid.y)));
    for (auto array : r.dynamic_shared) std::memset(array(), 0xff, kSharedArena);  // poison: NaN, or -1
    failure = run_block(b, unsigned(threads), c, id);
    for (auto array : r.dynamic_shared) {
      const unsigned char* p = array();
      for (size_t i = shared_bytes; i < kSharedArena && failure.empty(); ++i)
        if (p[i] != 0xff)
          failure = "wrote byte " + std::to_string(i) + " of dynamic shared memory, past the launch's " +
                    std::to_string(shared_bytes) + " bytes";
    }
    if (!failure.empty()) {
      failure = "emulated kernel fault in block (" + std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) +
                "): " + failure;
      break;
    }
  }
  r.last.barriers = b.barriers, r.last.shuffles = b.shuffles;
  active = nullptr;
  return failure.empty() ? 0 : error(cudaErrorLaunchFailure, failure);
}

}  // namespace hkd::emu
