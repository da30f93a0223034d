// A host emulation of the subset of CUDA our kernels use, so that the .cuh kernel templates run unchanged as C++
// on the CPU (tests and sanitizer builds; see csrc/README.md). Not a simulator of the GPU: blocks run one at a
// time, so inter-block concurrency and the memory model are out of its sight.
//
// One block at a time; its threads run either as fibers on the calling OS thread (ucontext; fast, the schedule is
// chosen: see Schedule) or, with Options::threads, as one std::thread per CUDA thread (for ThreadSanitizer and
// AddressSanitizer, which do not follow swapcontext). Both share one rendezvous state machine (Block below):
//   __syncthreads       waits until every thread of the block waits at the SAME barrier (file:line); a thread
//                       that exited, or one waiting at another barrier or shuffle, is reported with both lines;
//   __shfl_xor_sync     waits until every lane of its warp reached the same shuffle; the mask must name exactly
//                       the warp's lanes (a partial mask is reported);
//   RK_SHARED_ARRAY     static shared memory from a per-block arena, filled with 0xFF bytes (NaN in every float
//                       type) before each block, and held to the 48 KB static limit;
//   launch bounds       the launch helper (csrc/cuda/launch.cuh) checks blockDim against the kernel's bound.
// Errors throw cuda_emu::Error from the launch, with the source lines involved.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <ucontext.h>

namespace cuda_emu {

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct StreamTag;
using cudaStream_t = StreamTag*;

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr int WARP = 32;
constexpr std::size_t STATIC_SHARED_LIMIT = 48 * 1024;  // bytes of static __shared__ per block

// Order in which runnable fibers of a block are resumed. Each fiber runs until its next barrier or shuffle, so the
// order decides which thread writes or reads shared memory first within a barrier interval.
enum class Schedule : int {
  kRoundRobin = 0,  // threads 0, 1, 2, ...
  kReverse = 1,     // ..., 2, 1, 0
  kRaceAhead = 2,   // one thread (chosen from the seed) always first, the others round-robin
  kRandom = 3,      // a seeded random runnable thread each time
};

struct Options {
  Schedule schedule = Schedule::kRoundRobin;
  bool reverse_blocks = false;  // run blockIdx gridDim-1 ... 0
  bool threads = false;         // std::thread per CUDA thread instead of fibers
  unsigned seed = 0;
};

inline Options& options() {
  static Options opts;
  return opts;
}

// What the CUDA built-ins read; set by the runner before a thread (fiber) resumes.
struct ThreadState {
  uint3 thread_idx{0, 0, 0};
  uint3 block_idx{0, 0, 0};
  dim3 block_dim;
  dim3 grid_dim;
  int tid = 0;  // linear thread index in the block
};
inline thread_local ThreadState tls;

struct Site {
  const char* file = "";
  int line = 0;
  bool operator==(const Site& o) const { return line == o.line && std::strcmp(file, o.file) == 0; }
};

inline std::string where(const Site& s) {
  const char* base = std::strrchr(s.file, '/');
  return std::string(base ? base + 1 : s.file) + ":" + std::to_string(s.line);
}

enum class St { kRun, kBarrier, kShfl, kDone };

struct Lane {
  St st = St::kRun;
  Site site;
  unsigned mask = 0;
  unsigned xor_mask = 0;
  unsigned char in[8] = {};
  unsigned char out[8] = {};
};

// Thrown inside a worker thread to unwind a kernel body once the block has failed (thread mode only).
struct Abort {};

// The state of the block being run, shared by its threads. In thread mode every access holds `mu`.
struct Block {
  std::vector<Lane> lanes;
  int n = 0;
  std::string error;  // first failure; the block stops
  std::mutex mu;
  std::condition_variable cv;
  uint64_t phase = 0;  // bumped at each resolution (thread mode wakes on it)
  // Shared-memory arena for the current block: generation, bytes used.
  uint64_t generation = 0;
  std::size_t shared_used = 0;
  alignas(16) unsigned char shared[STATIC_SHARED_LIMIT];

  void reset(int threads) {
    n = threads;
    lanes.assign(threads, Lane{});
    ++generation;
    shared_used = 0;
    std::memset(shared, 0xFF, sizeof(shared));  // NaN in fp64/fp32/fp16/bf16: a read before a write shows
  }

  unsigned warp_mask(int w) const {
    const int lanes_here = std::min(WARP, n - w * WARP);
    return lanes_here == WARP ? 0xffffffffu : ((1u << lanes_here) - 1u);
  }

  // Called when no thread can run: release a warp at a shuffle or the block at a barrier, or record why not.
  // Returns true when some thread became runnable.
  bool resolve() {
    bool progress = false;
    for (int w = 0; w * WARP < n; ++w) {
      const int lo = w * WARP, hi = std::min(n, lo + WARP);
      int at_shfl = 0;
      for (int i = lo; i < hi; ++i) at_shfl += lanes[i].st == St::kShfl;
      if (at_shfl == 0) continue;
      if (at_shfl != hi - lo) {
        for (int i = lo; i < hi; ++i) {
          if (lanes[i].st != St::kShfl) {
            return fail("warp " + std::to_string(w) + ": lane " + std::to_string(lanes[lo].st == St::kShfl ? lo : i) +
                        " waits at __shfl_xor_sync " + where(first_shfl(lo, hi)) + " while lane " + std::to_string(i) +
                        describe(lanes[i]));
          }
        }
      }
      const Site site = lanes[lo].site;
      for (int i = lo; i < hi; ++i) {
        if (!(lanes[i].site == site)) {
          return fail("warp " + std::to_string(w) + ": divergent shuffles at " + where(site) + " and " +
                      where(lanes[i].site));
        }
        if (lanes[i].mask != warp_mask(w)) {
          std::ostringstream msg;
          msg << "__shfl_xor_sync at " << where(site) << ": mask 0x" << std::hex << lanes[i].mask
              << " does not name the warp's lanes 0x" << warp_mask(w);
          return fail(msg.str());
        }
      }
      for (int i = lo; i < hi; ++i) {
        const int src = lo + static_cast<int>(((i - lo) ^ lanes[i].xor_mask) & (WARP - 1));
        std::memcpy(lanes[i].out, lanes[src < hi ? src : i].in, sizeof(lanes[i].out));
        lanes[i].st = St::kRun;
      }
      progress = true;
    }
    if (progress) return true;
    int at_barrier = 0, done = 0;
    for (const Lane& l : lanes) {
      at_barrier += l.st == St::kBarrier;
      done += l.st == St::kDone;
    }
    if (at_barrier == 0) return false;  // every thread finished
    int first = 0;
    while (lanes[first].st != St::kBarrier) ++first;
    const Site site = lanes[first].site;
    for (int i = 0; i < n; ++i) {
      if (lanes[i].st == St::kBarrier && !(lanes[i].site == site)) {
        return fail("divergent __syncthreads: thread " + std::to_string(first) + " waits at " + where(site) +
                    ", thread " + std::to_string(i) + " at " + where(lanes[i].site));
      }
    }
    if (done > 0) {
      int gone = 0;
      while (lanes[gone].st != St::kDone) ++gone;
      return fail("__syncthreads at " + where(site) + " reached by " + std::to_string(at_barrier) + " of " +
                  std::to_string(n) + " threads; thread " + std::to_string(gone) +
                  " exited the kernel without reaching it (deadlock on a GPU)");
    }
    for (Lane& l : lanes) l.st = St::kRun;
    return true;
  }

  Site first_shfl(int lo, int hi) const {
    for (int i = lo; i < hi; ++i)
      if (lanes[i].st == St::kShfl) return lanes[i].site;
    return {};
  }

  static std::string describe(const Lane& l) {
    if (l.st == St::kDone) return " exited";
    if (l.st == St::kBarrier) return " waits at __syncthreads " + where(l.site);
    return " is running";
  }

  bool fail(const std::string& msg) {
    if (error.empty()) error = msg;
    return false;
  }
};

inline Block& block() {
  static Block* b = new Block();  // never freed: worker threads may still be unwinding at exit
  return *b;
}

// ---------------------------------------------------------------------------------------------------------------
// Fibers: the runner switches to a fiber, which runs until it blocks (barrier, shuffle) or ends, then switches back.
// A fiber is entered once through makecontext/swapcontext; every later switch is a __builtin_setjmp/longjmp pair,
// which saves no signal mask (swapcontext makes two sigprocmask system calls per switch: ~10x slower here). After
// its kernel body ends, a fiber waits for the next block and runs the body again, so fibers outlive blocks.

struct Fibers {
  std::size_t stack_bytes = 128 * 1024;
  std::vector<std::vector<unsigned char>> stacks;
  std::vector<ucontext_t> ctx;
  std::vector<char> started;       // entered through makecontext, parked in `jump`
  std::vector<std::array<void*, 5>> jump;  // where each parked fiber resumes
  std::array<void*, 5> runner_jump{};
  ucontext_t runner{};
  const std::function<void()>* body = nullptr;
  int current = -1;
};

inline Fibers& fibers() {
  static Fibers f;
  return f;
}

// Parks the current fiber and resumes the runner. noinline: __builtin_setjmp and __builtin_longjmp must not
// share a function with the code they return into.
__attribute__((noinline)) inline void fiber_park() {
  Fibers& f = fibers();
  if (__builtin_setjmp(f.jump[f.current].data()) == 0) __builtin_longjmp(f.runner_jump.data(), 1);
}

__attribute__((noinline)) inline void fiber_resume(int i) {
  Fibers& f = fibers();
  if (__builtin_setjmp(f.runner_jump.data()) != 0) return;
  if (!f.started[i]) {
    f.started[i] = 1;
    swapcontext(&f.runner, &f.ctx[i]);  // the fiber parks through runner_jump, never by returning here
    return;
  }
  __builtin_longjmp(f.jump[i].data(), 1);
}

inline void fiber_entry() {
  Fibers& f = fibers();
  for (;;) {
    (*f.body)();
    block().lanes[f.current].st = St::kDone;
    fiber_park();  // resumed for the next block
  }
}

// Suspends the calling CUDA thread until the block state lets it run again.
inline void wait_turn() {
  Block& b = block();
  const int me = tls.tid;
  if (options().threads) {
    std::unique_lock<std::mutex> lock(b.mu, std::adopt_lock);  // caller holds mu
    bool any_running = false;
    for (const Lane& l : b.lanes) any_running |= l.st == St::kRun;
    if (!any_running && b.error.empty()) {
      b.resolve();
      ++b.phase;
      b.cv.notify_all();
    }
    b.cv.wait(lock, [&] { return b.lanes[me].st == St::kRun || !b.error.empty(); });
    const bool failed = !b.error.empty();
    lock.release();
    if (failed) {
      b.mu.unlock();
      throw Abort{};
    }
    return;
  }
  (void)me;
  fiber_park();
}

inline void syncthreads(const char* file, int line) {
  Block& b = block();
  if (options().threads) b.mu.lock();
  Lane& l = b.lanes[tls.tid];
  l.st = St::kBarrier;
  l.site = {file, line};
  wait_turn();
  if (options().threads) b.mu.unlock();
}

template <typename T>
T shfl_xor_sync(unsigned mask, T value, int lane_mask, const char* file, int line) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  Block& b = block();
  if (options().threads) b.mu.lock();
  Lane& l = b.lanes[tls.tid];
  l.st = St::kShfl;
  l.site = {file, line};
  l.mask = mask;
  l.xor_mask = static_cast<unsigned>(lane_mask);
  std::memcpy(l.in, &value, sizeof(T));
  wait_turn();
  T out;
  std::memcpy(&out, b.lanes[tls.tid].out, sizeof(T));
  if (options().threads) b.mu.unlock();
  return out;
}

// A kernel-side failure (trap, shared-memory overflow): the block stops and the launch throws.
[[noreturn]] inline void fail_in_kernel(const std::string& msg) {
  Block& b = block();
  if (options().threads) {
    std::lock_guard<std::mutex> lock(b.mu);
    b.fail(msg);
    b.cv.notify_all();
    throw Abort{};
  }
  b.fail(msg);
  Fibers& f = fibers();
  b.lanes[f.current].st = St::kDone;
  fiber_park();  // never resumed: the launch throws and the fibers restart from scratch
  std::abort();
}

inline std::string at_line(const char* msg, const char* file, int line) {
  return std::string(msg) + " (" + where({file, line}) + ")";
}

// One static __shared__ array of a kernel: the same arena slice for every thread of a block.
struct SharedSlot {
  uint64_t generation = ~uint64_t{0};
  std::size_t offset = 0;

  template <typename T>
  T* get(std::size_t count, const char* file, int line) {
    Block& b = block();
    std::unique_lock<std::mutex> lock(b.mu, std::defer_lock);
    if (options().threads) lock.lock();
    if (generation != b.generation) {
      const std::size_t start = (b.shared_used + 15) / 16 * 16;
      const std::size_t bytes = count * sizeof(T);
      if (start + bytes > STATIC_SHARED_LIMIT) {
        if (lock.owns_lock()) lock.unlock();
        fail_in_kernel("static shared memory above the 48 KB limit at " + where({file, line}) + ": " +
                       std::to_string(start + bytes) + " bytes");
      }
      offset = start;
      b.shared_used = start + bytes;
      generation = b.generation;
    }
    return reinterpret_cast<T*>(b.shared + offset);
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Launch

inline void set_thread(const dim3& block_dim, int tid) {
  tls.tid = tid;
  tls.thread_idx = {tid % block_dim.x, (tid / block_dim.x) % block_dim.y, tid / (block_dim.x * block_dim.y)};
}

inline void run_block_fibers(int n, const std::function<void()>& body, std::mt19937& rng, int racer) {
  Block& b = block();
  Fibers& f = fibers();
  if (static_cast<int>(f.stacks.size()) < n) {
    const int old = static_cast<int>(f.stacks.size());
    f.stacks.resize(n);
    f.ctx.resize(n);
    f.started.resize(n, 0);
    f.jump.resize(n);
    for (int i = old; i < n; ++i) {
      f.stacks[i].resize(f.stack_bytes);
      getcontext(&f.ctx[i]);
      f.ctx[i].uc_stack.ss_sp = f.stacks[i].data();
      f.ctx[i].uc_stack.ss_size = f.stacks[i].size();
      f.ctx[i].uc_link = nullptr;  // fiber_entry never returns
      makecontext(&f.ctx[i], fiber_entry, 0);
    }
  }
  f.body = &body;
  const Schedule sched = options().schedule;
  std::vector<int> runnable;
  for (;;) {
    runnable.clear();
    for (int i = 0; i < n; ++i)
      if (b.lanes[i].st == St::kRun) runnable.push_back(i);
    if (runnable.empty()) {
      if (!b.error.empty() || !b.resolve()) break;
      continue;
    }
    if (sched == Schedule::kReverse) std::reverse(runnable.begin(), runnable.end());
    if (sched == Schedule::kRandom) std::shuffle(runnable.begin(), runnable.end(), rng);
    if (sched == Schedule::kRaceAhead) {
      auto it = std::find(runnable.begin(), runnable.end(), racer % n);
      if (it != runnable.end()) std::rotate(runnable.begin(), it, it + 1);
    }
    for (int i : runnable) {  // each runs to its next barrier / shuffle / end
      if (!b.error.empty()) break;
      f.current = i;
      set_thread(tls.block_dim, i);
      fiber_resume(i);
    }
    if (!b.error.empty()) break;
  }
  if (!b.error.empty()) {  // fibers stopped mid-body: start every one afresh next time
    for (int i = 0; i < static_cast<int>(f.started.size()); ++i) {
      f.started[i] = 0;
      getcontext(&f.ctx[i]);
      f.ctx[i].uc_stack.ss_sp = f.stacks[i].data();
      f.ctx[i].uc_stack.ss_size = f.stacks[i].size();
      f.ctx[i].uc_link = nullptr;
      makecontext(&f.ctx[i], fiber_entry, 0);
    }
  }
}

inline uint3 block_index(long long k, const dim3& grid, long long n_blocks) {
  const long long id = options().reverse_blocks ? n_blocks - 1 - k : k;
  return {static_cast<unsigned>(id % grid.x), static_cast<unsigned>((id / grid.x) % grid.y),
          static_cast<unsigned>(id / (static_cast<long long>(grid.x) * grid.y))};
}

inline std::string block_name(const uint3& i) {
  return "block (" + std::to_string(i.x) + ", " + std::to_string(i.y) + ", " + std::to_string(i.z) + ")";
}

// Thread mode: n OS threads live for the whole launch and walk the blocks together; the last thread to finish a
// block sets up the next one (fresh lanes, poisoned shared memory), then the others follow.
inline void run_grid_threads(int n, const std::function<void()>& body, const dim3& grid, const dim3& block_dim,
                             long long n_blocks, uint3& failed_block) {
  Block& b = block();
  long long current = 0;  // block being run; guarded by b.mu
  b.reset(n);
  std::vector<std::thread> workers;
  workers.reserve(n);
  for (int i = 0; i < n; ++i) {
    workers.emplace_back([&, i] {
      tls.grid_dim = grid;
      tls.block_dim = block_dim;
      set_thread(block_dim, i);
      for (long long mine = 0;; ++mine) {
        {
          std::lock_guard<std::mutex> lock(b.mu);
          if (!b.error.empty() || mine >= n_blocks) return;
          tls.block_idx = block_index(mine, grid, n_blocks);
        }
        try {
          body();
        } catch (const Abort&) {
        }
        std::unique_lock<std::mutex> lock(b.mu);
        b.lanes[i].st = St::kDone;
        int done = 0;
        bool any_running = false;
        for (const Lane& l : b.lanes) {
          done += l.st == St::kDone;
          any_running |= l.st == St::kRun;
        }
        bool changed = true;  // wake the others only when their state moved (a wake-up costs ~10 us per thread)
        if (b.error.empty() && done == n) {
          if (++current < n_blocks) b.reset(n);
        } else if (b.error.empty() && !any_running) {
          b.resolve();  // the others all wait at a barrier or shuffle: release them or report
        } else {
          changed = !b.error.empty();
        }
        if (!b.error.empty()) failed_block = tls.block_idx;
        if (changed) {
          ++b.phase;
          b.cv.notify_all();
        }
        b.cv.wait(lock, [&] { return current > mine || !b.error.empty(); });
      }
    });
  }
  for (std::thread& t : workers) t.join();
}

// Runs kernel(args...) over the grid, one block at a time. Throws Error on a detected fault.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block_dim, Args... args) {
  const long long n_threads = static_cast<long long>(block_dim.x) * block_dim.y * block_dim.z;
  if (n_threads < 1 || n_threads > 1024) throw Error("blockDim of " + std::to_string(n_threads) + " threads");
  const long long n_blocks = static_cast<long long>(grid.x) * grid.y * grid.z;
  if (n_blocks < 1) throw Error("empty grid (cudaErrorInvalidConfiguration on a GPU)");
  const int n = static_cast<int>(n_threads);
  const std::function<void()> body = [&] { kernel(args...); };
  Block& b = block();
  b.error.clear();
  if (options().threads) {
    uint3 failed{};
    run_grid_threads(n, body, grid, block_dim, n_blocks, failed);
    if (!b.error.empty()) throw Error(block_name(failed) + ": " + b.error);
    return;
  }
  std::mt19937 rng(options().seed);
  const int racer = static_cast<int>(options().seed * 2654435761u % static_cast<unsigned>(n));
  for (long long k = 0; k < n_blocks; ++k) {
    tls.grid_dim = grid;
    tls.block_dim = block_dim;
    tls.block_idx = block_index(k, grid, n_blocks);
    b.reset(n);
    run_block_fibers(n, body, rng, racer);
    if (!b.error.empty()) throw Error(block_name(tls.block_idx) + ": " + b.error);
  }
}

}  // namespace cuda_emu

// The CUDA spellings the kernels use.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define threadIdx (::cuda_emu::tls.thread_idx)
#define blockIdx (::cuda_emu::tls.block_idx)
#define blockDim (::cuda_emu::tls.block_dim)
#define gridDim (::cuda_emu::tls.grid_dim)
#define __syncthreads() ::cuda_emu::syncthreads(__FILE__, __LINE__)
#define __shfl_xor_sync(mask, value, lane_mask) ::cuda_emu::shfl_xor_sync(mask, value, lane_mask, __FILE__, __LINE__)
#define __trap() ::cuda_emu::fail_in_kernel(::cuda_emu::at_line("__trap()", __FILE__, __LINE__))
using cuda_emu::cudaStream_t;
using cuda_emu::dim3;
using std::max;
using std::min;
