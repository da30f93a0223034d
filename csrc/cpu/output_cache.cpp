// The CPU output cache (see include/routing_kernels/cpu_memory.h for why and what it keeps).
#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>
#include <routing_kernels/cpu_memory.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <list>
#include <mutex>
#include <new>
#include <vector>

#ifdef __linux__
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace routing_kernels {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kMinCachedBytes = size_t{1} << 20;  // below this, page faults cost little: plain at::empty
constexpr int64_t kDefaultLimitMb = 256;             // room for y and dx of a 128 MB x, or four 64 MB ones

int64_t limit_from_env() {
  const char* text = std::getenv("ROUTING_KERNELS_CPU_CACHE_MB");
  if (text == nullptr || *text == '\0') return kDefaultLimitMb << 20;
  char* end = nullptr;
  errno = 0;
  const long long mb = std::strtoll(text, &end, 10);
  TORCH_CHECK(end != text && *end == '\0' && errno == 0 && mb >= 0 && mb <= (int64_t{1} << 40),
              "routing_kernels: ROUTING_KERNELS_CPU_CACHE_MB must be a whole number of megabytes in [0, 2^40], got '",
              text, "'");
  return static_cast<int64_t>(mb) << 20;
}

struct Buffer {
  void* ptr;
  size_t bytes;      // capacity: the requested size rounded up to 2 MB
  size_t requested;  // what the tensor asked for (reported to the profiler)
};

class OutputCache final : public c10::Allocator {
 public:
  static OutputCache& get() {
    // Never destroyed: tensors freed during interpreter shutdown still call release().
    static OutputCache* cache = new OutputCache();
    return *cache;
  }

  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = (std::max<size_t>(n, 1) + kHugePage - 1) / kHugePage * kHugePage;
    void* ptr = take(bytes);
    if (ptr == nullptr) ptr = fresh(bytes);
    auto* buffer = new Buffer{ptr, bytes, n};
    report(ptr, static_cast<int64_t>(n));
    return {ptr, buffer, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  bool enabled() const { return limit_ > 0; }

  CpuOutputCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(cached_bytes_.load()), limit_, hits_, misses_};
  }

  void empty() {
    std::list<Buffer> dropped;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      dropped.swap(free_);
      cached_bytes_ = 0;
    }
    for (const Buffer& b : dropped) std::free(b.ptr);
  }

  void set_poison(bool enabled) { poison_.store(enabled, std::memory_order_relaxed); }
  bool poisoned() const { return poison_.load(std::memory_order_relaxed); }

 private:
  OutputCache() : limit_(limit_from_env()) {
#ifdef __linux__
    // A forked child (DataLoader workers) inherits the cache's memory but maybe a mutex held by another thread of
    // the parent: give it a fresh, empty cache (the inherited buffers stay with the parent's copy-on-write pages).
    pthread_atfork(nullptr, nullptr, [] {
      OutputCache& c = get();
      new (&c.mutex_) std::mutex();
      new (&c.free_) std::list<Buffer>();
      c.cached_bytes_.store(0);
    });
#endif
  }

  // The most recently freed buffer of exactly this capacity, or nullptr.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->bytes == bytes) {
        void* ptr = it->ptr;
        cached_bytes_ -= bytes;
        free_.erase(it);
        ++hits_;
        allocated_bytes_ += bytes;
        return ptr;
      }
    }
    ++misses_;
    allocated_bytes_ += bytes;
    return nullptr;
  }

  static void* fresh(size_t bytes) {
    void* ptr = nullptr;
    if (posix_memalign(&ptr, kHugePage, bytes) != 0 || ptr == nullptr) {
      get().forget(bytes);
      TORCH_CHECK_WITH(OutOfMemoryError, false, "routing_kernels: could not allocate ", bytes,
                       " bytes of CPU memory for an output");
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    // Advice only: with THP in its usual "madvise" mode a fault then maps (and zeroes) 2 MB at once, about half
    // the cost of 512 faults of 4 KB here.
    madvise(ptr, bytes, MADV_HUGEPAGE);
#endif
    return ptr;
  }

  void forget(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    allocated_bytes_ -= bytes;
  }

  static void release(void* context) {
    auto* buffer = static_cast<Buffer*>(context);
    OutputCache& cache = get();
    std::vector<void*> to_free;
    {
      std::lock_guard<std::mutex> lock(cache.mutex_);
      cache.allocated_bytes_ -= buffer->bytes;
      if (static_cast<int64_t>(buffer->bytes) <= cache.limit_) {
        cache.free_.push_front(*buffer);
        cache.cached_bytes_ += buffer->bytes;
        while (static_cast<int64_t>(cache.cached_bytes_) > cache.limit_) {  // drop the least recently freed
          to_free.push_back(cache.free_.back().ptr);
          cache.cached_bytes_ -= cache.free_.back().bytes;
          cache.free_.pop_back();
        }
      } else {
        to_free.push_back(buffer->ptr);
      }
    }
    report(buffer->ptr, -static_cast<int64_t>(buffer->requested));  // totals after the release, like torch
    for (void* ptr : to_free) std::free(ptr);
    delete buffer;
  }

  static void report(void* ptr, int64_t delta) {
    OutputCache& cache = get();
    size_t allocated, cached;
    {
      std::lock_guard<std::mutex> lock(cache.mutex_);  // one consistent snapshot of both totals
      allocated = cache.allocated_bytes_.load();
      cached = cache.cached_bytes_.load();
    }
    c10::reportMemoryUsageToProfiler(ptr, delta, allocated, allocated + cached, c10::Device(c10::DeviceType::CPU));
  }

  const int64_t limit_;
  std::mutex mutex_;
  std::list<Buffer> free_;  // most recently freed first
  // Changed and read under mutex_ (atomic as well: stats() and report() stay race-free if that ever changes).
  std::atomic<size_t> cached_bytes_{0};
  std::atomic<size_t> allocated_bytes_{0};  // live outputs (capacity)
  int64_t hits_ = 0, misses_ = 0;
  std::atomic<bool> poison_{false};
};

// Advice for a fresh at::empty block when the cache is off: only its whole, aligned 2 MB ranges can be huge.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace

at::Tensor empty_cpu_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  OutputCache& cache = OutputCache::get();
  const int64_t numel = c10::multiply_integers(sizes);
  const size_t nbytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  at::Tensor out;
  if (nbytes < kMinCachedBytes) {
    out = at::empty(sizes, options);
  } else if (cache.enabled()) {
    out = at::detail::empty_generic(sizes, &cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                    c10::typeMetaToScalarType(options.dtype()), std::nullopt);
  } else {
    out = at::empty(sizes, options);
    advise_huge_pages(out);
  }
  if (cache.poisoned()) {
    if (out.is_floating_point()) {
      out.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      out.fill_(-12345);  // not -1: that is a valid value of route_chunks' indices (padding)
    }
  }
  return out;
}

CpuOutputCacheStats cpu_output_cache_stats() { return OutputCache::get().stats(); }

void empty_cpu_output_cache() { OutputCache::get().empty(); }

void set_cpu_output_cache_poison(bool enabled) { OutputCache::get().set_poison(enabled); }

}  // namespace routing_kernels
