// CUDA kernels of the frame family (docs/SPEC.md, "Ops"): centering, the permutation gather or
// scatter, the 3 x 3 rotation and the mean over samples in one pass, one thread per
// (point, channel) computing all three components. Memory-bound; R and center are tiny and
// broadcast through the cache.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"
#include "cuda/launch.cuh"
#include "cuda/permutation.cuh"

namespace lps_fast {
namespace cuda {
namespace {

// out[b, j, r, m, c] = sum_a R[b, j, a, m] (x[b, p(r), a, c] - center[b, a, c])
template <typename scalar_t, typename index_t>
__global__ void frame_apply_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ R,
                                   const int64_t* __restrict__ perm, const scalar_t* __restrict__ center,
                                   scalar_t* __restrict__ out, index_t k, index_t n, index_t channels,
                                   index_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  for (index_t index = blockIdx.x * blockDim.x + threadIdx.x; index < total; index += gridDim.x * blockDim.x) {
    const index_t row = index / channels;  // (b * k + j) * n + r
    const index_t c = index - row * channels;
    const index_t sample = row / n;
    const index_t b = sample / k;
    const index_t r = row - sample * n;
    const index_t node = perm == nullptr ? r : clamp_index(static_cast<index_t>(perm[row]), n);
    const scalar_t* point = x + (b * n + node) * 3 * channels + c;
    acc_t v[3];
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      v[a] = static_cast<acc_t>(point[a * channels]);
      if (center != nullptr) v[a] -= static_cast<acc_t>(center[(b * 3 + a) * channels + c]);
    }
    const scalar_t* rotation = R + sample * 9;
    scalar_t* target = out + row * 3 * channels + c;
#pragma unroll
    for (int m = 0; m < 3; ++m) {
      target[m * channels] = static_cast<scalar_t>(static_cast<acc_t>(rotation[m]) * v[0] +
                                                   static_cast<acc_t>(rotation[3 + m]) * v[1] +
                                                   static_cast<acc_t>(rotation[6 + m]) * v[2]);
    }
  }
}

// out[b, i, a, c] = sum_j sum_m R[b, j, a, m] y[b, j, q_j(i), m, c] / k + center[b, a, c]
template <typename scalar_t, typename index_t>
__global__ void frame_unapply_mean_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ R,
                                          const int64_t* __restrict__ inverse, const scalar_t* __restrict__ center,
                                          scalar_t* __restrict__ out, index_t k, index_t n, index_t channels,
                                          index_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  for (index_t index = blockIdx.x * blockDim.x + threadIdx.x; index < total; index += gridDim.x * blockDim.x) {
    const index_t row = index / channels;  // b * n + i
    const index_t c = index - row * channels;
    const index_t b = row / n, i = row - b * n;
    acc_t sum[3] = {acc_t(0), acc_t(0), acc_t(0)};
    for (index_t j = 0; j < k; ++j) {
      const index_t sample = b * k + j;
      const index_t r = inverse == nullptr ? i : clamp_index(static_cast<index_t>(inverse[sample * n + i]), n);
      const scalar_t* point = y + (sample * n + r) * 3 * channels + c;
      const acc_t v0 = static_cast<acc_t>(point[0]), v1 = static_cast<acc_t>(point[channels]),
                  v2 = static_cast<acc_t>(point[2 * channels]);
      const scalar_t* rotation = R + sample * 9;
#pragma unroll
      for (int a = 0; a < 3; ++a) {
        sum[a] += static_cast<acc_t>(rotation[a * 3]) * v0 + static_cast<acc_t>(rotation[a * 3 + 1]) * v1 +
                  static_cast<acc_t>(rotation[a * 3 + 2]) * v2;
      }
    }
    scalar_t* target = out + row * 3 * channels + c;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      acc_t value = sum[a] / static_cast<acc_t>(k);
      if (center != nullptr) value += static_cast<acc_t>(center[(b * 3 + a) * channels + c]);
      target[a * channels] = static_cast<scalar_t>(value);
    }
  }
}

template <typename scalar_t>
const scalar_t* optional_data(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<scalar_t>() : nullptr;
}

at::Tensor frame_apply_cuda(const at::Tensor& x_in, const at::Tensor& R_in, const c10::optional<at::Tensor>& perm_in,
                            const c10::optional<at::Tensor>& center_in, const c10::optional<at::Tensor>& soft) {
  check_frame_args(x_in, "x", /*per_sample=*/false, R_in, perm_in, center_in, soft);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), R = R_in.contiguous();
  const c10::optional<at::Tensor> perm = contiguous_or_none(perm_in), center = contiguous_or_none(center_in);
  const int64_t batch = x.size(0), n = x.size(1), channels = x.size(3), k = R.size(1);
  at::Tensor out = at::empty({batch, k, n, 3, channels}, x.options());
  if (out.numel() == 0) return out;
  const int64_t total = batch * k * n * channels;
  const int64_t* perm_data = perm.has_value() ? perm->const_data_ptr<int64_t>() : nullptr;
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "frame_apply_cuda", [&] {
    const GridPlan plan = plan_grid(total, out.numel());
    if (plan.int32) {
      frame_apply_kernel<scalar_t, int32_t><<<plan.blocks, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), R.const_data_ptr<scalar_t>(), perm_data, optional_data<scalar_t>(center),
          out.mutable_data_ptr<scalar_t>(), k, n, channels, total);
    } else {
      frame_apply_kernel<scalar_t, int64_t><<<plan.blocks, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), R.const_data_ptr<scalar_t>(), perm_data, optional_data<scalar_t>(center),
          out.mutable_data_ptr<scalar_t>(), k, n, channels, total);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor frame_unapply_mean_cuda(const at::Tensor& y_in, const at::Tensor& R_in,
                                   const c10::optional<at::Tensor>& perm_in,
                                   const c10::optional<at::Tensor>& center_in,
                                   const c10::optional<at::Tensor>& soft) {
  check_frame_args(y_in, "y", /*per_sample=*/true, R_in, perm_in, center_in, soft);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = y_in.contiguous(), R = R_in.contiguous();
  const c10::optional<at::Tensor> center = contiguous_or_none(center_in);
  const int64_t batch = y.size(0), k = y.size(1), n = y.size(2), channels = y.size(4);
  at::Tensor out = at::empty({batch, n, 3, channels}, y.options());
  if (out.numel() == 0) return out;
  const at::Tensor inverse = perm_in.has_value() ? inverse_permutation(perm_in->contiguous()) : at::Tensor();
  const int64_t* positions = inverse.defined() ? inverse.const_data_ptr<int64_t>() : nullptr;
  const int64_t total = batch * n * channels;
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "frame_unapply_mean_cuda", [&] {
    const GridPlan plan = plan_grid(total, y.numel());
    if (plan.int32) {
      frame_unapply_mean_kernel<scalar_t, int32_t><<<plan.blocks, kThreads, 0, stream>>>(
          y.const_data_ptr<scalar_t>(), R.const_data_ptr<scalar_t>(), positions, optional_data<scalar_t>(center),
          out.mutable_data_ptr<scalar_t>(), k, n, channels, total);
    } else {
      frame_unapply_mean_kernel<scalar_t, int64_t><<<plan.blocks, kThreads, 0, stream>>>(
          y.const_data_ptr<scalar_t>(), R.const_data_ptr<scalar_t>(), positions, optional_data<scalar_t>(center),
          out.mutable_data_ptr<scalar_t>(), k, n, channels, total);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(lps_fast, CUDA, m) {
  m.impl("frame_apply", &cuda::frame_apply_cuda);
  m.impl("frame_unapply_mean", &cuda::frame_unapply_mean_cuda);
}

}  // namespace lps_fast
