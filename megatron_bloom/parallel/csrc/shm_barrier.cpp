// A barrier for processes that map the same shared memory (parallel/host_group.py). Each rank publishes
// the number of barriers it has passed in a cache line of its own, then waits until every rank's count
// has reached it. Release/acquire ordering makes each rank's writes to the shared buffer before the
// barrier visible to every rank after it.
//
// A waiting rank spins briefly (its peers are usually about to arrive) and then sleeps on a futex on
// the peer's counter, which the peer wakes when it arrives. Ranks may outnumber cores (tests run 8 on
// 2), and a rank that kept spinning or yielding would take the core from the rank it waits for.
//
// The rest of a rank's cache line carries a header: what the rank is about to all-reduce (element count,
// dtype, op). A barrier given a header compares every rank's with its own once all have arrived, so ranks
// that disagree get an error instead of each other's stale bytes. While it sleeps, a waiting rank checks
// every 100 ms that the peer it waits for is still alive (/proc/PID/stat), so a dead peer is named at once
// rather than at the timeout.
#include <torch/extension.h>

#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <cstdint>
#include <fstream>
#include <string>
#include <tuple>

namespace {

constexpr int64_t kLineWords = 16;  // uint32 words, one 64-byte cache line per rank: no false sharing
constexpr int64_t kHeaderWords = 4;  // words 1..4 of the line (word 0 is the barrier counter)
constexpr int kSpins = 1024;

// What a barrier returns (with the index of the peer concerned).
enum Outcome : int64_t { kPassed = 0, kHeadersDiffer = 1, kPeerExited = 2, kTimedOut = 3 };

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

// A process is gone when /proc has no entry for it, or only a zombie's (exited, not yet reaped).
bool process_exited(int64_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  if (!stat) return true;
  std::string line;
  std::getline(stat, line);
  const auto name_end = line.rfind(')');  // "PID (COMM) STATE ...": COMM may hold spaces and parentheses
  if (name_end == std::string::npos || name_end + 2 >= line.size()) return true;
  const char state = line[name_end + 2];
  return state == 'Z' || state == 'X';
}

// pids: each rank's process id, or empty where the ranks do not share a pid namespace (no liveness check).
// header: kHeaderWords words to publish and compare, or empty.
std::tuple<int64_t, int64_t> barrier(torch::Tensor counters, int64_t rank, int64_t world, int64_t generation,
                                     double timeout_s, std::vector<int64_t> header, std::vector<int64_t> pids) {
  TORCH_CHECK(counters.is_contiguous() && counters.nbytes() >= static_cast<size_t>(world * kLineWords * 4),
              "barrier: counters must be a contiguous tensor of 64 bytes per rank");
  TORCH_CHECK(header.empty() || header.size() == kHeaderWords, "barrier: the header has 4 words");
  auto* base = static_cast<uint32_t*>(counters.data_ptr());
  uint32_t* mine = base + rank * kLineWords;
  for (size_t word = 0; word < header.size(); ++word) {
    __atomic_store_n(mine + 1 + word, static_cast<uint32_t>(header[word]), __ATOMIC_RELAXED);
  }
  const auto target = static_cast<uint32_t>(generation);
  __atomic_store_n(mine, target, __ATOMIC_RELEASE);
  futex_wake_all(mine);
  const auto start = std::chrono::steady_clock::now();
  const timespec nap = {0, 100 * 1000 * 1000};  // wake up every 100 ms to check the peer and the timeout
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
      if (reached(__atomic_load_n(word, __ATOMIC_ACQUIRE), target)) break;
      if (!pids.empty() && process_exited(pids[peer])) return {kPeerExited, peer};
      if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > timeout_s) {
        return {kTimedOut, peer};
      }
    }
  }
  // No peer can write its next header before this rank has arrived at the next barrier: the headers read
  // here are this barrier's.
  for (int64_t peer = 0; peer < world && !header.empty(); ++peer) {
    for (int64_t w = 0; w < kHeaderWords; ++w) {
      if (__atomic_load_n(base + peer * kLineWords + 1 + w, __ATOMIC_RELAXED) != static_cast<uint32_t>(header[w])) {
        return {kHeadersDiffer, peer};
      }
    }
  }
  return {kPassed, -1};
}

}  // namespace

TORCH_LIBRARY(mbloom_shm, m) {
  m.def("barrier(Tensor(a!) counters, int rank, int world, int generation, float timeout_s, int[] header, "
        "int[] pids) -> (int, int)", &barrier);
}
