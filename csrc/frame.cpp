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
  return cpu::frame_apply(x.contiguous(), R, contiguous_or_none(perm), contiguous_or_none(center));
}

at::Tensor frame_unapply_mean_cpu(const at::Tensor& y, const at::Tensor& R, const c10::optional<at::Tensor>& perm,
                                  const c10::optional<at::Tensor>& center, const c10::optional<at::Tensor>& soft) {
  check_frame_args(y, "y", /*per_sample=*/true, R, perm, center, soft);
  return cpu::frame_unapply_mean(y.contiguous(), R, contiguous_or_none(perm), contiguous_or_none(center));
}

// The upstream gradient must have the shape of the forward output.
void check_grad_shape(const at::Tensor& grad, at::IntArrayRef expected, const at::Tensor& like) {
  TORCH_CHECK_VALUE(grad.sizes() == expected, "grad must have shape ", expected, ", got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == like.scalar_type(), "grad must have dtype ", like.scalar_type(), ", got ",
                   grad.scalar_type());
  check_same_device(like, "the points", grad, "grad");
}

std::tuple<at::Tensor, at::Tensor> frame_apply_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                            const at::Tensor& R, const c10::optional<at::Tensor>& perm,
                                                            const c10::optional<at::Tensor>& center) {
  check_frame_args(x, "x", /*per_sample=*/false, R, perm, center, c10::nullopt);
  check_grad_shape(grad, {x.size(0), R.size(1), x.size(1), 3, x.size(3)}, x);
  return cpu::frame_apply_backward(grad.contiguous(), x.contiguous(), R, contiguous_or_none(perm),
                                   contiguous_or_none(center));
}

std::tuple<at::Tensor, at::Tensor> frame_unapply_mean_backward_cpu(const at::Tensor& grad, const at::Tensor& y,
                                                                   const at::Tensor& R,
                                                                   const c10::optional<at::Tensor>& perm) {
  check_frame_args(y, "y", /*per_sample=*/true, R, perm, c10::nullopt, c10::nullopt);
  check_grad_shape(grad, {y.size(0), y.size(2), 3, y.size(4)}, y);
  return cpu::frame_unapply_mean_backward(grad.contiguous(), y.contiguous(), R, contiguous_or_none(perm));
}

}  // namespace

TORCH_LIBRARY_IMPL(lps_fast, CPU, m) {
  m.impl("frame_apply", &frame_apply_cpu);
  m.impl("frame_unapply_mean", &frame_unapply_mean_cpu);
  m.impl("frame_apply_backward", &frame_apply_backward_cpu);
  m.impl("frame_unapply_mean_backward", &frame_unapply_mean_backward_cpu);
}

}  // namespace lps_fast
