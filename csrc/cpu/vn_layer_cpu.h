// CPU kernels of vn_layer: a vector-neuron layer's batch norm, leaky ReLU and (for a kNN edge
// convolution) neighbour max-pool in one pass over the entries, without edge tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace lps_fast {
namespace cpu {

// See csrc/vn_layer.cpp for the arguments. `into` (optional): where the output goes, a
// (N, n, 3, C) view whose last dim has stride 1 (a column block of a wider tensor, say); for the
// backward a (N, n, 3, C [+ C] + D [+ D]) tensor whose column blocks receive the gradients of p,
// p_centre, d and d_centre, in that order (absent centre terms take no columns).
std::tuple<at::Tensor, at::Tensor, at::Tensor> vn_layer(
    const at::Tensor& p, const at::Tensor& d, const c10::optional<at::Tensor>& p_centre,
    const c10::optional<at::Tensor>& d_centre, const c10::optional<at::Tensor>& neighbours,
    const c10::optional<at::Tensor>& pool, const c10::optional<at::Tensor>& mask, const at::Tensor& weight,
    const at::Tensor& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double eps, double slope,
    const c10::optional<at::Tensor>& into = c10::nullopt);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> vn_layer_backward(
    const at::Tensor& grad, const at::Tensor& p, const at::Tensor& d, const c10::optional<at::Tensor>& p_centre,
    const c10::optional<at::Tensor>& d_centre, const c10::optional<at::Tensor>& neighbours,
    const at::Tensor& selected, const c10::optional<at::Tensor>& mask, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& stats, bool training, double eps, double slope,
    const c10::optional<at::Tensor>& into = c10::nullopt);

}  // namespace cpu
}  // namespace lps_fast
