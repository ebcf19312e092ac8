// CPU kernels of gram_schmidt: one 3 x 3 matrix per item, math in gram_schmidt_math.h.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include "cpu/gram_schmidt_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "gram_schmidt_math.h"

namespace lps_fast {
namespace cpu {

namespace gs = gram_schmidt_math;

at::Tensor gram_schmidt(const at::Tensor& V, bool proper) {
  at::Tensor R = at::empty(V.sizes(), V.options());
  const int64_t matrices = V.numel() / 9;
  if (matrices == 0) return R;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, V.scalar_type(), "gram_schmidt_cpu", [&] {
    using acc_t = double;  // 3 x 3 work: double costs nothing and keeps ill-conditioned frames accurate
    const scalar_t* source = V.const_data_ptr<scalar_t>();
    scalar_t* target = R.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, matrices, 2048, [&](int64_t begin, int64_t end) {
      gs::Forward<acc_t> f;
      acc_t in[9], out[9];
      for (int64_t i = begin; i < end; ++i) {
        for (int m = 0; m < 9; ++m) in[m] = static_cast<acc_t>(source[i * 9 + m]);
        gs::forward(in, proper, f, out);
        for (int m = 0; m < 9; ++m) target[i * 9 + m] = static_cast<scalar_t>(out[m]);
      }
    });
  });
  return R;
}

at::Tensor gram_schmidt_backward(const at::Tensor& grad, const at::Tensor& V, bool proper) {
  at::Tensor grad_V = at::empty(V.sizes(), V.options());
  const int64_t matrices = V.numel() / 9;
  if (matrices == 0) return grad_V;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, V.scalar_type(), "gram_schmidt_backward_cpu", [&] {
    using acc_t = double;  // 3 x 3 work: double costs nothing and keeps ill-conditioned frames accurate
    const scalar_t* source = V.const_data_ptr<scalar_t>();
    const scalar_t* upstream = grad.const_data_ptr<scalar_t>();
    scalar_t* target = grad_V.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, matrices, 1024, [&](int64_t begin, int64_t end) {
      gs::Forward<acc_t> f;
      acc_t in[9], g[9], R[9], out[9];
      for (int64_t i = begin; i < end; ++i) {
        for (int m = 0; m < 9; ++m) {
          in[m] = static_cast<acc_t>(source[i * 9 + m]);
          g[m] = static_cast<acc_t>(upstream[i * 9 + m]);
        }
        gs::forward(in, proper, f, R);
        gs::backward(f, g, proper, out);
        for (int m = 0; m < 9; ++m) target[i * 9 + m] = static_cast<scalar_t>(out[m]);
      }
    });
  });
  return grad_V;
}

}  // namespace cpu
}  // namespace lps_fast
