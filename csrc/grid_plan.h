// Host-side launch arithmetic of the CUDA grid-stride loops, in plain C++ so that the CPU
// extension compiles it too and the tests can check it on a machine without a GPU
// (lps_fast._C.grid_plan).
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>

namespace lps_fast {

struct GridPlan {
  int64_t blocks;  // grid size of a grid-stride loop over `total` items
  bool int32;      // whether its index arithmetic may run in int32
};

// Enough blocks to fill every SM many times over, few enough that each thread handles several
// items when the problem is large.
inline int64_t grid_blocks(int64_t total, int threads, int multiprocessors) {
  const int64_t blocks = (total + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(multiprocessors) * 32;
  return std::max<int64_t>(1, std::min(blocks, cap));
}

// A grid-stride loop over `total` items whose element offsets stay below `extent` (the largest
// numel it addresses). The loop forms `index + gridDim.x * blockDim.x` before comparing it with
// `total`, so the largest index it ever holds is below `total + stride`: int32 is safe only when
// that sum fits, not merely `total`.
inline GridPlan plan_grid(int64_t total, int64_t extent, int threads, int multiprocessors) {
  const int64_t blocks = grid_blocks(total, threads, multiprocessors);
  const int64_t stride = blocks * threads;
  const bool int32 = total + stride <= static_cast<int64_t>(INT_MAX) && extent < static_cast<int64_t>(INT_MAX);
  return {blocks, int32};
}

}  // namespace lps_fast
