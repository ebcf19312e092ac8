// Registration of the CPU vn_score_head kernels under the lps_fast:: schemas (lps_fast/_ops.py,
// NETWORK_SCHEMAS), with the argument checks: the op is reachable through torch.ops directly,
// where a bad shape would otherwise be an out-of-bounds read.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include <torch/library.h>

#include "common.h"
#include "cpu/vn_score_head_cpu.h"

namespace lps_fast {
namespace {

void check_vn_score_head_args(const at::Tensor& x, const at::Tensor& frame, const at::Tensor& pair,
                              const c10::optional<at::Tensor>& mask, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(2) == 3, "x must have shape (N, n, 3, W), got ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "x must be float32 or float64, got ", x.scalar_type());
  const int64_t N = x.size(0), n = x.size(1), W = x.size(3);
  TORCH_CHECK_VALUE(frame.sizes() == at::IntArrayRef({N, n, 3, 3}), "frame must have shape (N, n, 3, 3) = (", N,
                    ", ", n, ", 3, 3), got ", frame.sizes());
  TORCH_CHECK_VALUE(pair.dim() == 4 && pair.size(0) == N && pair.size(1) == n && pair.size(2) == 3,
                    "pair must have shape (N, n, 3, V) = (", N, ", ", n, ", 3, V), got ", pair.sizes());
  const int64_t V = pair.size(3);
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == 3 * (W + V), "weight must have shape (3 * (W + V),) = (",
                    3 * (W + V), ",), got ", weight.sizes());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{frame, "frame"}, {pair, "pair"},
                                {weight, "weight"}}) {
    TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, " must have the dtype of x (", x.scalar_type(),
                     "), got ", t.scalar_type());
    check_same_device(x, "x", t, name);
  }
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "mask must be a bool tensor, got ", mask->scalar_type());
    TORCH_CHECK_VALUE(mask->sizes() == at::IntArrayRef({N, n}), "mask must have shape (N, n) = (", N, ", ", n,
                      "), got ", mask->sizes());
    check_same_device(x, "x", *mask, "mask");
  }
}

at::Tensor vn_score_head_cpu(const at::Tensor& x, const at::Tensor& frame, const at::Tensor& pair,
                             const c10::optional<at::Tensor>& mask, const at::Tensor& weight, const at::Tensor& bias) {
  check_vn_score_head_args(x, frame, pair, mask, weight);
  TORCH_CHECK_VALUE(bias.numel() == 1, "bias must hold one value, got shape ", bias.sizes());
  TORCH_CHECK_TYPE(bias.scalar_type() == x.scalar_type(), "bias must have the dtype of x");
  return cpu::vn_score_head(x.contiguous(), frame.contiguous(), pair.contiguous(), contiguous_or_none(mask),
                            weight.contiguous(), bias.contiguous());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> vn_score_head_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& frame, const at::Tensor& pair,
    const c10::optional<at::Tensor>& mask, const at::Tensor& weight) {
  check_vn_score_head_args(x, frame, pair, mask, weight);
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef({x.size(0), x.size(1)}), "grad must have shape (N, n) = (",
                    x.size(0), ", ", x.size(1), "), got ", grad.sizes());
  return cpu::vn_score_head_backward(grad.to(x.scalar_type()).contiguous(), x.contiguous(), frame.contiguous(),
                                     pair.contiguous(), contiguous_or_none(mask), weight.contiguous());
}

}  // namespace

TORCH_LIBRARY_IMPL(lps_fast, CPU, m) {
  m.impl("vn_score_head", &vn_score_head_cpu);
  m.impl("vn_score_head_backward", &vn_score_head_backward_cpu);
}

}  // namespace lps_fast
