// CPU kernels of gram_schmidt (docs/SPEC.md, "Distribution-side ops"): three vectors -> a frame.
#pragma once

#include <ATen/core/Tensor.h>

namespace lps_fast {
namespace cpu {

at::Tensor gram_schmidt(const at::Tensor& V, bool proper);
at::Tensor gram_schmidt_backward(const at::Tensor& grad, const at::Tensor& V, bool proper);

}  // namespace cpu
}  // namespace lps_fast
