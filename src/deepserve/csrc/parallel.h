// deepserve's kernels: a parallel loop whose range is handed out piece by piece.
//
// at::parallel_for gives each thread an equal share up front. Decode attention's tasks
// differ in size (each row has its own context), and on a small machine that serves as it
// computes (the HTTP thread, tokenizing, the client itself share the cores) one thread of
// a region is often descheduled for a while: its share then waits, and the other thread
// spins at the region's end. Here each thread takes the next piece when it is done with
// one, so the region ends together. Which thread runs a piece changes nothing in its
// results: every piece writes its own outputs. (Not for loops whose threads reuse their
// share's data from call to call: the AMX GEMMs measured 8-12% slower handed out so.)
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace ds_parallel {

// f(b, e) over consecutive pieces of [begin, end) of at most `piece` items, each item
// exactly once. Pieces shrink toward the end (a share of what is left, down to one
// item), so the thread that takes the last one keeps the others waiting for one small
// piece, not a whole one.
template <typename F>
inline void pieces(int64_t begin, int64_t end, int64_t piece, const F& f) {
  if (end <= begin) return;
  piece = std::max<int64_t>(1, piece);
  const int64_t n = (end - begin + piece - 1) / piece;
  const int64_t threads = std::min<int64_t>(n, at::get_num_threads());
  if (threads <= 1 || at::in_parallel_region()) {
    f(begin, end);
    return;
  }
  std::atomic<int64_t> next{begin};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    int64_t b = next.load(std::memory_order_relaxed);
    while (b < end) {
      const int64_t size = std::clamp<int64_t>((end - b) / (2 * threads), 1, piece);
      if (next.compare_exchange_weak(b, b + size, std::memory_order_relaxed)) {
        f(b, b + size);
        b = next.load(std::memory_order_relaxed);
      }
    }
  });
}

}  // namespace ds_parallel
