// lps_fast::vn_matmul: x (..., K) @ w (K, M) for the vector-neuron layers of the learned
// distribution's network (lps_fast.nn), and its backward. The layers map every node's three
// coordinates through one small stacked weight (the linear map and the nonlinearity's
// directions side by side); csrc/cpu/small_matmul_cpu.cpp says why BLAS is slow there. The
// layer-by-layer network calls this op and the whole-network op (csrc/vn_dgcnn.cpp) its kernels,
// so both compute the same values bit for bit (their kNN graphs then agree even among ties).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include <torch/library.h>

#include "common.h"
#include "cpu/small_matmul_cpu.h"

#include <ATen/ops/empty.h>

#include <tuple>

namespace lps_fast {
namespace {

void check_vn_matmul_args(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least one dim (..., K), got a scalar");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == x.size(-1), "w must have shape (K, M) with K = x.shape[-1] = ",
                    x.size(-1), ", got ", w.sizes());
  TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), "w must have the dtype of x (", x.scalar_type(), "), got ",
                   w.scalar_type());
  check_same_device(x, "x", w, "w");
}

at::Tensor vn_matmul_cpu(const at::Tensor& x, const at::Tensor& w) {
  check_vn_matmul_args(x, w);
  return cpu::small_matmul(x, w);
}

// {x's gradient (empty unless input_grad), w's gradient}.
std::tuple<at::Tensor, at::Tensor> vn_matmul_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                          const at::Tensor& w, bool input_grad) {
  check_vn_matmul_args(x, w);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.size(1);
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef(shape), "grad must have the shape of the output ", shape,
                    ", got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), "grad must have the dtype of x");
  check_same_device(x, "x", grad, "grad");
  at::Tensor grad_x = input_grad ? cpu::small_matmul(grad, w.t()) : at::empty({0}, x.options());
  return {grad_x, cpu::small_matmul_tn(x, grad)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lps_fast, CPU, m) {
  m.impl("vn_matmul", &vn_matmul_cpu);
  m.impl("vn_matmul_backward", &vn_matmul_backward_cpu);
}

}  // namespace lps_fast
