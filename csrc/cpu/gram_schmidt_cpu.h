// CPU kernels of gram_schmidt (SPEC section 3): three vectors -> an orthonormal frame.
#pragma once

#include <ATen/core/Tensor.h>

namespace lps_fast {
namespace cpu {

at::Tensor gram_schmidt(const at::Tensor& V, bool proper);
at::Tensor gram_schmidt_backward(const at::Tensor& grad, const at::Tensor& V, bool proper);

}  // namespace cpu
}  // namespace lps_fast
