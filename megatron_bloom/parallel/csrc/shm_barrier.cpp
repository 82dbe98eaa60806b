// A barrier for processes that map the same shared memory (parallel/host_group.py). Each rank publishes
// the number of barriers it has passed in a cache line of its own, then waits until every rank's count
// has reached it. Release/acquire ordering makes each rank's writes to the shared buffer before the
// barrier visible to every rank after it.
//
// A waiting rank spins briefly (its peers are usually about to arrive) and then sleeps on a futex on
// the peer's counter, which the peer wakes when it arrives. Ranks may outnumber cores (tests run 8 on
// 2), and a rank that kept spinning or yielding would take the core from the rank it waits for.
#include <torch/extension.h>

#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace {

constexpr int64_t kLineWords = 16;  // uint32 counters one 64-byte cache line apart: no false sharing
constexpr int kSpins = 1024;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Not FUTEX_PRIVATE_FLAG: the waiters are other processes.
inline void futex_wait(uint32_t* word, uint32_t seen, const timespec* timeout) {
  syscall(SYS_futex, word, FUTEX_WAIT, seen, timeout, nullptr, 0);
}

inline void futex_wake_all(uint32_t* word) { syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0); }

// Counters wrap around at 2^32; a peer has arrived when its count is not behind ours.
inline bool reached(uint32_t count, uint32_t generation) { return static_cast<int32_t>(count - generation) >= 0; }

void barrier(torch::Tensor counters, int64_t rank, int64_t world, int64_t generation, double timeout_s) {
  TORCH_CHECK(counters.is_contiguous() && counters.nbytes() >= static_cast<size_t>(world * kLineWords * 4),
              "barrier: counters must be a contiguous tensor of 64 bytes per rank");
  auto* base = static_cast<uint32_t*>(counters.data_ptr());
  const auto target = static_cast<uint32_t>(generation);
  __atomic_store_n(base + rank * kLineWords, target, __ATOMIC_RELEASE);
  futex_wake_all(base + rank * kLineWords);
  const auto start = std::chrono::steady_clock::now();
  const timespec nap = {0, 100 * 1000 * 1000};  // wake up every 100 ms to check the timeout
  for (int64_t peer = 0; peer < world; ++peer) {
    uint32_t* word = base + peer * kLineWords;
    for (int spins = 0;; ++spins) {
      const uint32_t count = __atomic_load_n(word, __ATOMIC_ACQUIRE);
      if (reached(count, target)) break;
      if (spins < kSpins) {
        cpu_relax();
        continue;
      }
      futex_wait(word, count, &nap);  // returns at once if the count has changed since it was read
      if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > timeout_s) {
        throw std::runtime_error("shared-memory barrier: rank " + std::to_string(peer) +
                                 " of the group did not arrive within " + std::to_string(timeout_s) +
                                 " s (did it stop?)");
      }
    }
  }
}

}  // namespace

TORCH_LIBRARY(mbloom_shm, m) {
  m.def("barrier(Tensor(a!) counters, int rank, int world, int generation, float timeout_s) -> ()", &barrier);
}
