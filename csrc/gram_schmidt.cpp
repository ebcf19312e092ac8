// Registration of the CPU Gram-Schmidt kernels under the lps_fast:: schemas.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include <torch/library.h>

#include "common.h"
#include "cpu/gram_schmidt_cpu.h"

namespace lps_fast {
namespace {

at::Tensor gram_schmidt_cpu(const at::Tensor& V, bool proper) {
  check_gram_schmidt_args(V);
  return cpu::gram_schmidt(V.contiguous(), proper);
}

at::Tensor gram_schmidt_backward_cpu(const at::Tensor& grad, const at::Tensor& V, bool proper) {
  check_gram_schmidt_args(V);
  TORCH_CHECK_VALUE(grad.sizes() == V.sizes(), "grad must have the shape of V");
  return cpu::gram_schmidt_backward(grad.to(V.scalar_type()).contiguous(), V.contiguous(), proper);
}

}  // namespace

TORCH_LIBRARY_IMPL(lps_fast, CPU, m) {
  m.impl("gram_schmidt", &gram_schmidt_cpu);
  m.impl("gram_schmidt_backward", &gram_schmidt_backward_cpu);
}

}  // namespace lps_fast
