// CPU matrix products of the vector-neuron network's layers (csrc/vn_dgcnn.cpp, the vn_matmul op):
// many rows (every node's 3 coordinates, thousands) against a small weight (tens of columns).
#pragma once

#include <ATen/core/Tensor.h>

namespace lps_fast {
namespace cpu {

// x (..., K) @ w (K, M) -> (..., M), contiguous. x's rows may be a column block of a wider
// buffer (a uniform row stride, unit column stride); other layouts are copied first.
at::Tensor small_matmul(const at::Tensor& x, const at::Tensor& w);

// x (..., K)^T @ g (..., M) -> (K, M), the sum over every row: the weight gradient of small_matmul.
at::Tensor small_matmul_tn(const at::Tensor& x, const at::Tensor& g);

}  // namespace cpu
}  // namespace lps_fast
