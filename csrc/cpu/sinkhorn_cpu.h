// CPU kernels of sinkhorn_sort and permutation_entropy (docs/SPEC.md, "Distribution-side ops").
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace lps_fast {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> sinkhorn_sort(const at::Tensor& scores, double tau, int64_t n_iter,
                                                 const c10::optional<at::Tensor>& mask);
at::Tensor sinkhorn_sort_backward(const at::Tensor& grad_soft, const at::Tensor& scores, double tau,
                                  int64_t n_iter, const c10::optional<at::Tensor>& mask);
at::Tensor permutation_entropy(const at::Tensor& soft, const c10::optional<at::Tensor>& mask);
at::Tensor permutation_entropy_backward(const at::Tensor& grad, const at::Tensor& soft,
                                        const c10::optional<at::Tensor>& mask);

}  // namespace cpu
}  // namespace lps_fast
