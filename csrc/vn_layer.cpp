// Registration of the CPU vn_layer kernels under the lps_fast:: schemas (lps_fast/_ops.py,
// NETWORK_SCHEMAS), with the argument checks: the op is reachable through torch.ops directly,
// where a bad shape would otherwise be an out-of-bounds read.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include <torch/library.h>

#include "common.h"
#include "cpu/vn_layer_cpu.h"

namespace lps_fast {
namespace {

// p, d and the optional centre tensors: (N, n, 3, C) / (N, n, 3, D) with D in {1, C}, last dim
// contiguous (other strides are free: they are column blocks of one matmul output).
at::Tensor vectors_arg(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

c10::optional<at::Tensor> vectors_arg(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return c10::nullopt;
  return vectors_arg(*t);
}

void check_vn_layer_args(const at::Tensor& p, const at::Tensor& d, const c10::optional<at::Tensor>& p_centre,
                         const c10::optional<at::Tensor>& d_centre, const c10::optional<at::Tensor>& neighbours,
                         const c10::optional<at::Tensor>& pool, const c10::optional<at::Tensor>& mask,
                         const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK_VALUE(p.dim() == 4 && p.size(2) == 3, "p must have shape (N, n, 3, C), got ", p.sizes());
  TORCH_CHECK_TYPE(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble,
                   "p must be float32 or float64, got ", p.scalar_type());
  const int64_t N = p.size(0), n = p.size(1), C = p.size(3);
  TORCH_CHECK_VALUE(d.dim() == 4 && d.size(0) == N && d.size(1) == n && d.size(2) == 3 &&
                        (d.size(3) == 1 || d.size(3) == C),
                    "d must have shape (N, n, 3, 1) or (N, n, 3, C) = (", N, ", ", n, ", 3, ", C, "), got ",
                    d.sizes());
  TORCH_CHECK_TYPE(d.scalar_type() == p.scalar_type(), "d must have the dtype of p");
  check_same_device(p, "p", d, "d");
  if (p_centre.has_value()) {
    TORCH_CHECK_VALUE(p_centre->sizes() == p.sizes(), "p_centre must have the shape of p ", p.sizes(), ", got ",
                      p_centre->sizes());
    TORCH_CHECK_TYPE(p_centre->scalar_type() == p.scalar_type(), "p_centre must have the dtype of p");
    check_same_device(p, "p", *p_centre, "p_centre");
  }
  if (d_centre.has_value()) {
    TORCH_CHECK_VALUE(d_centre->sizes() == d.sizes(), "d_centre must have the shape of d ", d.sizes(), ", got ",
                      d_centre->sizes());
    TORCH_CHECK_TYPE(d_centre->scalar_type() == p.scalar_type(), "d_centre must have the dtype of p");
    check_same_device(p, "p", *d_centre, "d_centre");
  }
  TORCH_CHECK_VALUE(neighbours.has_value() == pool.has_value(),
                    "neighbours and pool go together (an edge convolution pools over the neighbours)");
  if (neighbours.has_value()) {
    TORCH_CHECK_TYPE(neighbours->scalar_type() == at::kLong, "neighbours must be int64, got ",
                     neighbours->scalar_type());
    TORCH_CHECK_VALUE(neighbours->dim() == 3 && neighbours->size(0) == N && neighbours->size(1) == n &&
                          neighbours->size(2) >= 1,
                      "neighbours must have shape (N, n, K) = (", N, ", ", n, ", K >= 1), got ", neighbours->sizes());
    check_same_device(p, "p", *neighbours, "neighbours");
    if (neighbours->numel() > 0) {
      const at::Tensor lo = neighbours->min(), hi = neighbours->max();
      TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < n, "neighbours must lie in [0, ", n,
                        "), got values in [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
    }
    TORCH_CHECK_VALUE(pool->dim() == 2 && pool->size(0) == C && pool->size(1) == C,
                      "pool must have shape (C, C) = (", C, ", ", C, "), got ", pool->sizes());
    TORCH_CHECK_TYPE(pool->scalar_type() == p.scalar_type(), "pool must have the dtype of p");
    check_same_device(p, "p", *pool, "pool");
  }
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "mask must be a bool tensor, got ", mask->scalar_type());
    TORCH_CHECK_VALUE(mask->dim() == 2 && mask->size(0) == N && mask->size(1) == n, "mask must have shape (N, n) = (",
                      N, ", ", n, "), got ", mask->sizes());
    check_same_device(p, "p", *mask, "mask");
  }
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{weight, "weight"}, {bias, "bias"}}) {
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == C, name, " must have shape (C,) = (", C, ",), got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == p.scalar_type(), name, " must have the dtype of p");
    check_same_device(p, "p", t, name);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> vn_layer_cpu(
    const at::Tensor& p, const at::Tensor& d, const c10::optional<at::Tensor>& p_centre,
    const c10::optional<at::Tensor>& d_centre, const c10::optional<at::Tensor>& neighbours,
    const c10::optional<at::Tensor>& pool, const c10::optional<at::Tensor>& mask, const at::Tensor& weight,
    const at::Tensor& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double eps, double slope) {
  check_vn_layer_args(p, d, p_centre, d_centre, neighbours, pool, mask, weight, bias);
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(),
                    "running_mean and running_var go together (both for eval mode, neither for training)");
  if (running_mean.has_value()) {
    for (const auto& [t, name] :
         {std::pair<const at::Tensor&, const char*>{*running_mean, "running_mean"}, {*running_var, "running_var"}}) {
      TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == p.size(3), name, " must have shape (C,), got ", t.sizes());
    }
  }
  return cpu::vn_layer(vectors_arg(p), vectors_arg(d), vectors_arg(p_centre), vectors_arg(d_centre),
                       contiguous_or_none(neighbours), pool, contiguous_or_none(mask), weight, bias, running_mean,
                       running_var, eps, slope);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> vn_layer_backward_cpu(
    const at::Tensor& grad, const at::Tensor& p, const at::Tensor& d, const c10::optional<at::Tensor>& p_centre,
    const c10::optional<at::Tensor>& d_centre, const c10::optional<at::Tensor>& neighbours,
    const at::Tensor& selected, const c10::optional<at::Tensor>& mask, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& stats, bool training, double eps, double slope) {
  TORCH_CHECK_VALUE(grad.sizes() == p.sizes(), "grad must have the shape of p ", p.sizes(), ", got ", grad.sizes());
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == 2 && stats.size(1) == p.size(3),
                    "stats must have shape (2, C), got ", stats.sizes());
  if (neighbours.has_value()) {
    TORCH_CHECK_VALUE(selected.sizes() == at::IntArrayRef({p.size(0), p.size(1), p.size(3)}),
                      "selected must have shape (N, n, C), got ", selected.sizes());
    TORCH_CHECK_TYPE(selected.scalar_type() == at::kLong, "selected must be int64");
  }
  return cpu::vn_layer_backward(grad.to(p.scalar_type()), vectors_arg(p), vectors_arg(d), vectors_arg(p_centre),
                                vectors_arg(d_centre), contiguous_or_none(neighbours), selected.contiguous(),
                                contiguous_or_none(mask), weight, bias, stats.to(p.scalar_type()), training, eps,
                                slope);
}

}  // namespace

TORCH_LIBRARY_IMPL(lps_fast, CPU, m) {
  m.impl("vn_layer", &vn_layer_cpu);
  m.impl("vn_layer_backward", &vn_layer_backward_cpu);
}

}  // namespace lps_fast
