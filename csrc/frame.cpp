// Registration of the CPU frame kernels under the lps_fast:: schemas (lps_fast/_ops.py).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include <torch/library.h>

#include "common.h"
#include "cpu/frame_cpu.h"

namespace lps_fast {
namespace {

at::Tensor frame_apply_cpu(const at::Tensor& x, const at::Tensor& R, const c10::optional<at::Tensor>& perm,
                           const c10::optional<at::Tensor>& center, const c10::optional<at::Tensor>& soft) {
  check_frame_args(x, "x", /*per_sample=*/false, R, perm, center, soft);
  return cpu::frame_apply(x.contiguous(), R.contiguous(), contiguous_or_none(perm), contiguous_or_none(center));
}

at::Tensor frame_unapply_mean_cpu(const at::Tensor& y, const at::Tensor& R, const c10::optional<at::Tensor>& perm,
                                  const c10::optional<at::Tensor>& center, const c10::optional<at::Tensor>& soft) {
  check_frame_args(y, "y", /*per_sample=*/true, R, perm, center, soft);
  return cpu::frame_unapply_mean(y.contiguous(), R.contiguous(), contiguous_or_none(perm), contiguous_or_none(center));
}

}  // namespace

TORCH_LIBRARY_IMPL(lps_fast, CPU, m) {
  m.impl("frame_apply", &frame_apply_cpu);
  m.impl("frame_unapply_mean", &frame_unapply_mean_cpu);
}

}  // namespace lps_fast
