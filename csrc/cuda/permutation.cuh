// The inverse permutation on the GPU, shared by the scatter-mean kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "cuda/launch.cuh"

namespace lps_fast {
namespace cuda {

// inverse[b, j, perm[b, j, r]] = r; out-of-range entries are clamped (no bounds violation).
static __global__ void invert_kernel(const int64_t* __restrict__ perm, int64_t* __restrict__ inverse, int64_t n,
                                     int64_t total) {
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t sample = index / n;
    inverse[sample * n + clamp_index<int64_t>(perm[index], n)] = index - sample * n;
  }
}

// (B, k, n) int64 -> its inverse, of the same shape.
static inline at::Tensor inverse_permutation(const at::Tensor& perm) {
  at::Tensor inverse = at::empty(perm.sizes(), perm.options());
  const int64_t total = perm.numel();
  if (total == 0) return inverse;
  invert_kernel<<<grid_size(total), kThreads, 0, current_stream()>>>(
      perm.const_data_ptr<int64_t>(), inverse.mutable_data_ptr<int64_t>(), perm.size(2), total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return inverse;
}

}  // namespace cuda
}  // namespace lps_fast
