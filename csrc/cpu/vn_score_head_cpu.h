// CPU kernels of vn_score_head: the invariant per-node scores of the vector-neuron DGCNN
// (lps_fast.nn.VNDGCNN), from the features' coordinates in a per-node frame.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace lps_fast {
namespace cpu {

// See csrc/vn_score_head.cpp for the arguments.
at::Tensor vn_score_head(const at::Tensor& x, const at::Tensor& frame, const at::Tensor& pair,
                         const c10::optional<at::Tensor>& mask, const at::Tensor& weight, const at::Tensor& bias);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> vn_score_head_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& frame, const at::Tensor& pair,
    const c10::optional<at::Tensor>& mask, const at::Tensor& weight);

}  // namespace cpu
}  // namespace lps_fast
