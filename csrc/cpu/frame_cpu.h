// CPU kernels of the frame family: O(3)/E(3) frames acting on (n, 3, C) point features,
// optionally composed with a permutation.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace lps_fast {
namespace cpu {

// out[b, j, r, :, c] = R[b, j]^T (x[b, p(r), :, c] - center[b, :, c])
at::Tensor frame_apply(const at::Tensor& x, const at::Tensor& R, const c10::optional<at::Tensor>& perm,
                       const c10::optional<at::Tensor>& center);
// out[b, p(r)] += R[b, j] y[b, j, r] / k, then + center
at::Tensor frame_unapply_mean(const at::Tensor& y, const at::Tensor& R, const c10::optional<at::Tensor>& perm,
                              const c10::optional<at::Tensor>& center);
// Fused backward passes: (grad_x summed over the samples, grad_R) and (grad_y, grad_R).
std::tuple<at::Tensor, at::Tensor> frame_apply_backward(const at::Tensor& grad, const at::Tensor& x,
                                                        const at::Tensor& R, const c10::optional<at::Tensor>& perm,
                                                        const c10::optional<at::Tensor>& center);
std::tuple<at::Tensor, at::Tensor> frame_unapply_mean_backward(const at::Tensor& grad, const at::Tensor& y,
                                                               const at::Tensor& R,
                                                               const c10::optional<at::Tensor>& perm);

}  // namespace cpu
}  // namespace lps_fast
