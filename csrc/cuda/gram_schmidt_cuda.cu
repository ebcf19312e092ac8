// CUDA kernels of gram_schmidt: one thread per 3 x 3 matrix, math in gram_schmidt_math.h.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"
#include "cuda/launch.cuh"
#include "gram_schmidt_math.h"

namespace lps_fast {
namespace cuda {
namespace {

namespace gs = gram_schmidt_math;

template <typename scalar_t>
__global__ void gram_schmidt_kernel(const scalar_t* __restrict__ V, scalar_t* __restrict__ R, bool proper,
                                    int64_t matrices) {
  using acc_t = double;  // 3 x 3 work: double costs nothing and keeps ill-conditioned frames accurate
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < matrices;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t in[9], out[9];
    gs::Forward<acc_t> f;
#pragma unroll
    for (int m = 0; m < 9; ++m) in[m] = static_cast<acc_t>(V[i * 9 + m]);
    gs::forward(in, proper, f, out);
#pragma unroll
    for (int m = 0; m < 9; ++m) R[i * 9 + m] = static_cast<scalar_t>(out[m]);
  }
}

template <typename scalar_t>
__global__ void gram_schmidt_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ V,
                                             scalar_t* __restrict__ grad_V, bool proper, int64_t matrices) {
  using acc_t = double;  // 3 x 3 work: double costs nothing and keeps ill-conditioned frames accurate
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < matrices;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t in[9], g[9], R[9], out[9];
    gs::Forward<acc_t> f;
#pragma unroll
    for (int m = 0; m < 9; ++m) {
      in[m] = static_cast<acc_t>(V[i * 9 + m]);
      g[m] = static_cast<acc_t>(grad[i * 9 + m]);
    }
    gs::forward(in, proper, f, R);
    gs::backward(f, g, proper, out);
#pragma unroll
    for (int m = 0; m < 9; ++m) grad_V[i * 9 + m] = static_cast<scalar_t>(out[m]);
  }
}

at::Tensor gram_schmidt_cuda(const at::Tensor& V_in, bool proper) {
  check_gram_schmidt_args(V_in);
  const c10::cuda::CUDAGuard guard(V_in.device());
  const at::Tensor V = V_in.contiguous();
  at::Tensor R = at::empty(V.sizes(), V.options());
  const int64_t matrices = V.numel() / 9;
  if (matrices == 0) return R;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, V.scalar_type(), "gram_schmidt_cuda", [&] {
    gram_schmidt_kernel<scalar_t><<<grid_size(matrices, 128), 128, 0, current_stream()>>>(
        V.const_data_ptr<scalar_t>(), R.mutable_data_ptr<scalar_t>(), proper, matrices);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return R;
}

at::Tensor gram_schmidt_backward_cuda(const at::Tensor& grad_in, const at::Tensor& V_in, bool proper) {
  check_gram_schmidt_args(V_in);
  TORCH_CHECK_VALUE(grad_in.sizes() == V_in.sizes(), "grad must have the shape of V");
  const c10::cuda::CUDAGuard guard(V_in.device());
  const at::Tensor V = V_in.contiguous(), grad = grad_in.to(V_in.scalar_type()).contiguous();
  at::Tensor grad_V = at::empty(V.sizes(), V.options());
  const int64_t matrices = V.numel() / 9;
  if (matrices == 0) return grad_V;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, V.scalar_type(), "gram_schmidt_backward_cuda", [&] {
    gram_schmidt_backward_kernel<scalar_t><<<grid_size(matrices, 128), 128, 0, current_stream()>>>(
        grad.const_data_ptr<scalar_t>(), V.const_data_ptr<scalar_t>(), grad_V.mutable_data_ptr<scalar_t>(), proper,
        matrices);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_V;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(lps_fast, CUDA, m) {
  m.impl("gram_schmidt", &cuda::gram_schmidt_cuda);
  m.impl("gram_schmidt_backward", &cuda::gram_schmidt_backward_cuda);
}

}  // namespace lps_fast
