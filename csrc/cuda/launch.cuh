// Launch helpers shared by the CUDA kernels. Only c10's CUDA headers are used (not
// ATen/cuda/CUDAContext.h), so the kernels compile against a toolkit without the CUDA math
// libraries' headers.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "grid_plan.h"

namespace lps_fast {
namespace cuda {

constexpr int kThreads = 256;

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int multiprocessor_count() {
  constexpr int kMaxDevices = 64;
  static int counts[kMaxDevices] = {};  // 0 = not asked yet; benign race: every writer agrees
  const int device = c10::cuda::current_device();
  if (device >= kMaxDevices) return 132;
  if (counts[device] == 0) {
    int count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    counts[device] = count;
  }
  return counts[device];
}

// Blocks for a grid-stride loop whose indices are 64-bit.
inline int64_t grid_size(int64_t total, int threads = kThreads) {
  return grid_blocks(total, threads, multiprocessor_count());
}

// Grid size and index width of a grid-stride loop (csrc/grid_plan.h): 32-bit index arithmetic
// is several times cheaper than 64-bit division on the GPU, so it is used whenever every index
// the launch forms fits.
inline GridPlan plan_grid(int64_t total, int64_t extent, int threads = kThreads) {
  return lps_fast::plan_grid(total, extent, threads, multiprocessor_count());
}

// For launches that are not grid-stride loops (one block per row, bounded inner loops).
inline bool fits_int32(int64_t count) { return count < static_cast<int64_t>(INT_MAX); }

template <typename index_t>
__device__ __forceinline__ index_t clamp_index(index_t value, index_t n) {
  return value < 0 ? index_t(0) : (value >= n ? n - 1 : value);
}

}  // namespace cuda
}  // namespace lps_fast
