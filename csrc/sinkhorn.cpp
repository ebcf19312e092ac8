// Registration of the CPU Sinkhorn and entropy kernels under the lps_fast:: schemas.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include <torch/library.h>

#include "common.h"
#include "cpu/sinkhorn_cpu.h"

namespace lps_fast {
namespace {

std::tuple<at::Tensor, at::Tensor> sinkhorn_sort_cpu(const at::Tensor& scores, double tau, int64_t n_iter,
                                                     const c10::optional<at::Tensor>& mask) {
  check_scores_args(scores, tau, n_iter, mask);
  return cpu::sinkhorn_sort(scores.contiguous(), tau, n_iter, contiguous_or_none(mask));
}

at::Tensor sinkhorn_sort_backward_cpu(const at::Tensor& grad_soft, const at::Tensor& scores, double tau,
                                      int64_t n_iter, const c10::optional<at::Tensor>& mask) {
  check_scores_args(scores, tau, n_iter, mask);
  const int64_t n = scores.size(2);
  TORCH_CHECK_VALUE(grad_soft.dim() == 4 && grad_soft.size(0) == scores.size(0) &&
                        grad_soft.size(1) == scores.size(1) && grad_soft.size(2) == n && grad_soft.size(3) == n,
                    "grad_soft must have shape (B, k, n, n), got ", grad_soft.sizes());
  return cpu::sinkhorn_sort_backward(grad_soft.to(scores.scalar_type()).contiguous(), scores.contiguous(), tau,
                                     n_iter, contiguous_or_none(mask));
}

at::Tensor permutation_entropy_cpu(const at::Tensor& soft, const c10::optional<at::Tensor>& mask) {
  check_soft_matrix_args(soft, mask);
  return cpu::permutation_entropy(soft.contiguous(), contiguous_or_none(mask));
}

at::Tensor permutation_entropy_backward_cpu(const at::Tensor& grad, const at::Tensor& soft,
                                            const c10::optional<at::Tensor>& mask) {
  check_soft_matrix_args(soft, mask);
  TORCH_CHECK_VALUE(grad.numel() == 1, "grad of permutation_entropy must be a scalar");
  return cpu::permutation_entropy_backward(grad, soft.contiguous(), contiguous_or_none(mask));
}

}  // namespace

TORCH_LIBRARY_IMPL(lps_fast, CPU, m) {
  m.impl("sinkhorn_sort", &sinkhorn_sort_cpu);
  m.impl("sinkhorn_sort_backward", &sinkhorn_sort_backward_cpu);
  m.impl("permutation_entropy", &permutation_entropy_cpu);
  m.impl("permutation_entropy_backward", &permutation_entropy_backward_cpu);
}

}  // namespace lps_fast
