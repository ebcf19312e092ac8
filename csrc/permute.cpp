// Registration of the CPU permutation kernels under the lps_fast:: schemas (lps_fast/_ops.py).
// `soft` only carries the straight-through gradient: the forward value never reads it.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include <torch/library.h>

#include "common.h"
#include "cpu/permute_cpu.h"

namespace lps_fast {
namespace {

at::Tensor permute_nodes_cpu(const at::Tensor& x, const at::Tensor& perm, const c10::optional<at::Tensor>& soft) {
  check_permute_nodes_args(x, perm, soft);
  return cpu::permute_nodes(x.contiguous(), perm.contiguous());
}

at::Tensor permute_edges_cpu(const at::Tensor& e, const at::Tensor& perm, const c10::optional<at::Tensor>& soft) {
  check_permute_edges_args(e, perm, soft);
  return cpu::permute_edges(e.contiguous(), perm.contiguous());
}

at::Tensor unpermute_mean_cpu(const at::Tensor& y, const at::Tensor& perm, const c10::optional<at::Tensor>& soft) {
  check_unpermute_args(y, perm, soft, /*edges=*/false);
  return cpu::unpermute_mean(y.contiguous(), perm.contiguous());
}

at::Tensor unpermute_edges_mean_cpu(const at::Tensor& y, const at::Tensor& perm,
                                    const c10::optional<at::Tensor>& soft, bool diagonal) {
  check_unpermute_args(y, perm, soft, /*edges=*/true);
  return cpu::unpermute_edges_mean(y.contiguous(), perm.contiguous(), diagonal);
}

// The backward kernels get the upstream gradient of the op's output: (B, k, n, *F) samples for the
// gathers' sums, (B, n, *F) for unpermute_mean's scaled gather.
at::Tensor permute_nodes_backward_cpu(const at::Tensor& grad, const at::Tensor& perm) {
  check_unpermute_args(grad, perm, c10::nullopt, /*edges=*/false);
  return cpu::permute_nodes_backward(grad.contiguous(), perm.contiguous());
}

at::Tensor permute_edges_backward_cpu(const at::Tensor& grad, const at::Tensor& perm) {
  check_unpermute_args(grad, perm, c10::nullopt, /*edges=*/true);
  return cpu::permute_edges_backward(grad.contiguous(), perm.contiguous());
}

at::Tensor unpermute_mean_backward_cpu(const at::Tensor& grad, const at::Tensor& perm) {
  check_permute_nodes_args(grad, perm, c10::nullopt);
  TORCH_CHECK_TYPE(at::isFloatingType(grad.scalar_type()), "grad must be a floating-point tensor, got ",
                   grad.scalar_type());
  return cpu::unpermute_mean_backward(grad.contiguous(), perm.contiguous());
}

// (B, n, *F): the upstream gradient of the diagonal; returns (B, k, n, n, *F).
at::Tensor unpermute_edges_mean_diagonal_backward_cpu(const at::Tensor& grad, const at::Tensor& perm) {
  check_permute_nodes_args(grad, perm, c10::nullopt);
  TORCH_CHECK_TYPE(at::isFloatingType(grad.scalar_type()), "grad must be a floating-point tensor, got ",
                   grad.scalar_type());
  return cpu::unpermute_edges_mean_diagonal_backward(grad.contiguous(), perm.contiguous());
}

}  // namespace

TORCH_LIBRARY_IMPL(lps_fast, CPU, m) {
  m.impl("unpermute_edges_mean_diagonal_backward", &unpermute_edges_mean_diagonal_backward_cpu);
  m.impl("permute_nodes_backward", &permute_nodes_backward_cpu);
  m.impl("permute_edges_backward", &permute_edges_backward_cpu);
  m.impl("unpermute_mean_backward", &unpermute_mean_backward_cpu);
  m.impl("permute_nodes", &permute_nodes_cpu);
  m.impl("permute_edges", &permute_edges_cpu);
  m.impl("unpermute_mean", &unpermute_mean_cpu);
  m.impl("unpermute_edges_mean", &unpermute_edges_mean_cpu);
}

}  // namespace lps_fast
