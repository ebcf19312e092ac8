// CPU kernels of vn_layer: a vector-neuron layer's batch norm, leaky ReLU and (for a kNN edge
// convolution) neighbour max-pool in one pass over the entries, without edge tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace lps_fast {
namespace cpu {

// See csrc/vn_layer.cpp for the arguments.
std::tuple<at::Tensor, at::Tensor, at::Tensor> vn_layer(
    const at::Tensor& p, const at::Tensor& d, const c10::optional<at::Tensor>& p_centre,
    const c10::optional<at::Tensor>& d_centre, const c10::optional<at::Tensor>& neighbours,
    const c10::optional<at::Tensor>& pool, const c10::optional<at::Tensor>& mask, const at::Tensor& weight,
    const at::Tensor& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double eps, double slope);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> vn_layer_backward(
    const at::Tensor& grad, const at::Tensor& p, const at::Tensor& d, const c10::optional<at::Tensor>& p_centre,
    const c10::optional<at::Tensor>& d_centre, const c10::optional<at::Tensor>& neighbours,
    const at::Tensor& selected, const c10::optional<at::Tensor>& mask, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& stats, bool training, double eps, double slope);

}  // namespace cpu
}  // namespace lps_fast
