// CPU kernels of the frame family (docs/SPEC.md, "Ops"). Centering, the permutation gather or
// scatter, the 3 x 3 rotation and the mean over samples are one pass over the data. The
// forward walks one sample's points in order (no index division per point) with the rotation
// in registers; small channel counts are compile-time constants so the per-point loops unroll.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include "cpu/frame_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "cpu/permute_cpu.h"

namespace lps_fast {
namespace cpu {
namespace {

constexpr int64_t kGrainElements = 1 << 14;

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(elements_per_item, 1));
}

// out[b, j, r, m, c] = sum_a R[b, j, a, m] (x[b, p(r), a, c] - center[b, a, c]), one sample
// (b, j) per item, C (or `channels`) channels per vector
template <int C, typename scalar_t>
void frame_apply_kernel(const scalar_t* x, const scalar_t* R, const int64_t* perm, const scalar_t* center,
                        scalar_t* out, int64_t batch, int64_t k, int64_t n, int64_t runtime_channels) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = C > 0 ? C : runtime_channels;
  const int64_t point_size = 3 * channels;
  at::parallel_for(0, batch * k, grain_for(n * 3 * point_size), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> shift(point_size);
    for (int64_t sample = begin; sample < end; ++sample) {
      const int64_t b = sample / k;
      for (int64_t m = 0; m < point_size; ++m) {
        shift[m] = center != nullptr ? static_cast<acc_t>(center[b * point_size + m]) : acc_t(0);
      }
      acc_t rotation[9];  // rotation[a * 3 + m] = R[a, m]
      for (int e = 0; e < 9; ++e) rotation[e] = static_cast<acc_t>(R[sample * 9 + e]);
      const scalar_t* graph = x + b * n * point_size;
      const int64_t* sample_perm = perm != nullptr ? perm + sample * n : nullptr;
      scalar_t* target = out + sample * n * point_size;
      for (int64_t r = 0; r < n; ++r, target += point_size) {
        const scalar_t* point = graph + (sample_perm != nullptr ? sample_perm[r] : r) * point_size;
        for (int64_t c = 0; c < channels; ++c) {
          const acc_t v0 = static_cast<acc_t>(point[c]) - shift[c];
          const acc_t v1 = static_cast<acc_t>(point[channels + c]) - shift[channels + c];
          const acc_t v2 = static_cast<acc_t>(point[2 * channels + c]) - shift[2 * channels + c];
          // (R^T v)[m] = sum_a R[a, m] v[a]
          for (int m = 0; m < 3; ++m) {
            target[m * channels + c] =
                static_cast<scalar_t>(rotation[m] * v0 + rotation[3 + m] * v1 + rotation[6 + m] * v2);
          }
        }
      }
    }
  });
}

// out[b, i, a, c] = sum_j sum_m R[b, j, a, m] y[b, j, q_j(i), m, c] / k + center[b, a, c], one
// output node (b, i) per item
template <int C, typename scalar_t>
void frame_unapply_mean_kernel(const scalar_t* y, const scalar_t* R, const int64_t* position, const scalar_t* center,
                               scalar_t* out, int64_t batch, int64_t k, int64_t n, int64_t runtime_channels) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = C > 0 ? C : runtime_channels;
  const int64_t point_size = 3 * channels;
  const acc_t samples = static_cast<acc_t>(k);
  at::parallel_for(0, batch * n, grain_for(k * 3 * point_size), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(point_size);
    for_each_node_row(begin, end, n, [&](int64_t row, int64_t b, int64_t i) {
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t j = 0; j < k; ++j) {
        const int64_t sample = b * k + j;
        const int64_t r = position != nullptr ? position[sample * n + i] : i;
        const scalar_t* point = y + (sample * n + r) * point_size;
        const scalar_t* rotation = R + sample * 9;
        for (int a = 0; a < 3; ++a) {
          // (R v)[a] = sum_m R[a, m] v[m]
          const acc_t r0 = rotation[a * 3], r1 = rotation[a * 3 + 1], r2 = rotation[a * 3 + 2];
          for (int64_t c = 0; c < channels; ++c) {
            sum[a * channels + c] += r0 * static_cast<acc_t>(point[c]) + r1 * static_cast<acc_t>(point[channels + c]) +
                                     r2 * static_cast<acc_t>(point[2 * channels + c]);
          }
        }
      }
      scalar_t* target = out + row * point_size;
      for (int64_t m = 0; m < point_size; ++m) {
        acc_t value = sum[m] / samples;
        if (center != nullptr) value += static_cast<acc_t>(center[b * point_size + m]);
        target[m] = static_cast<scalar_t>(value);
      }
    });
  });
}

// Backward of frame_apply, one graph b per item (the samples of a graph scatter into the same
// gradient rows), reading each upstream gradient G[b, j] once for both results:
//   grad_x[b, i, a, c] = sum_j sum_m R[b, j, a, m] G[b, j, q_j(i), m, c]   (a sum, not a mean)
//   grad_R[b, j, a, m] = sum_r sum_c (x[b, p_j(r), a, c] - center[b, a, c]) G[b, j, r, m, c]
template <int C, typename scalar_t>
void frame_apply_backward_kernel(const scalar_t* grad, const scalar_t* x, const scalar_t* R, const int64_t* perm,
                                 const scalar_t* center, scalar_t* grad_x, scalar_t* grad_R, int64_t batch,
                                 int64_t k, int64_t n, int64_t runtime_channels) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = C > 0 ? C : runtime_channels;
  const int64_t point_size = 3 * channels;
  at::parallel_for(0, batch, grain_for(k * n * 6 * point_size), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> shift(point_size), graph_grad(n * point_size);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t m = 0; m < point_size; ++m) {
        shift[m] = center != nullptr ? static_cast<acc_t>(center[b * point_size + m]) : acc_t(0);
      }
      std::fill(graph_grad.begin(), graph_grad.end(), acc_t(0));
      const scalar_t* graph = x + b * n * point_size;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t sample = b * k + j;
        acc_t rotation[9], rotation_grad[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
        for (int e = 0; e < 9; ++e) rotation[e] = static_cast<acc_t>(R[sample * 9 + e]);
        const int64_t* sample_perm = perm != nullptr ? perm + sample * n : nullptr;
        const scalar_t* upstream = grad + sample * n * point_size;
        for (int64_t r = 0; r < n; ++r, upstream += point_size) {
          const int64_t node = sample_perm != nullptr ? sample_perm[r] : r;
          const scalar_t* point = graph + node * point_size;
          acc_t* node_grad = graph_grad.data() + node * point_size;
          for (int64_t c = 0; c < channels; ++c) {
            const acc_t g0 = static_cast<acc_t>(upstream[c]);
            const acc_t g1 = static_cast<acc_t>(upstream[channels + c]);
            const acc_t g2 = static_cast<acc_t>(upstream[2 * channels + c]);
            for (int a = 0; a < 3; ++a) {
              const acc_t v = static_cast<acc_t>(point[a * channels + c]) - shift[a * channels + c];
              rotation_grad[a * 3] += v * g0;
              rotation_grad[a * 3 + 1] += v * g1;
              rotation_grad[a * 3 + 2] += v * g2;
              node_grad[a * channels + c] += rotation[a * 3] * g0 + rotation[a * 3 + 1] * g1 + rotation[a * 3 + 2] * g2;
            }
          }
        }
        for (int e = 0; e < 9; ++e) grad_R[sample * 9 + e] = static_cast<scalar_t>(rotation_grad[e]);
      }
      scalar_t* target = grad_x + b * n * point_size;
      for (int64_t t = 0; t < n * point_size; ++t) target[t] = static_cast<scalar_t>(graph_grad[t]);
    }
  });
}

// Backward of frame_unapply_mean, one sample (b, j) per item, G the node-level upstream gradient:
//   grad_y[b, j, r, m, c] = sum_a R[b, j, a, m] G[b, p_j(r), a, c] / k
//   grad_R[b, j, a, m]    = sum_r sum_c G[b, p_j(r), a, c] y[b, j, r, m, c] / k
template <int C, typename scalar_t>
void frame_unapply_mean_backward_kernel(const scalar_t* grad, const scalar_t* y, const scalar_t* R,
                                        const int64_t* perm, scalar_t* grad_y, scalar_t* grad_R, int64_t batch,
                                        int64_t k, int64_t n, int64_t runtime_channels) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = C > 0 ? C : runtime_channels;
  const int64_t point_size = 3 * channels;
  const acc_t inverse_k = acc_t(1) / static_cast<acc_t>(k);
  at::parallel_for(0, batch * k, grain_for(n * 6 * point_size), [&](int64_t begin, int64_t end) {
    for (int64_t sample = begin; sample < end; ++sample) {
      const int64_t b = sample / k;
      acc_t rotation[9], rotation_grad[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
      for (int e = 0; e < 9; ++e) rotation[e] = static_cast<acc_t>(R[sample * 9 + e]) * inverse_k;
      const scalar_t* graph = grad + b * n * point_size;
      const int64_t* sample_perm = perm != nullptr ? perm + sample * n : nullptr;
      const scalar_t* values = y + sample * n * point_size;
      scalar_t* target = grad_y + sample * n * point_size;
      for (int64_t r = 0; r < n; ++r, values += point_size, target += point_size) {
        const scalar_t* point = graph + (sample_perm != nullptr ? sample_perm[r] : r) * point_size;
        for (int64_t c = 0; c < channels; ++c) {
          const acc_t v0 = static_cast<acc_t>(point[c]);
          const acc_t v1 = static_cast<acc_t>(point[channels + c]);
          const acc_t v2 = static_cast<acc_t>(point[2 * channels + c]);
          for (int m = 0; m < 3; ++m) {
            const acc_t w = static_cast<acc_t>(values[m * channels + c]);
            rotation_grad[m] += v0 * w;
            rotation_grad[3 + m] += v1 * w;
            rotation_grad[6 + m] += v2 * w;
            target[m * channels + c] =
                static_cast<scalar_t>(rotation[m] * v0 + rotation[3 + m] * v1 + rotation[6 + m] * v2);
          }
        }
      }
      for (int e = 0; e < 9; ++e) grad_R[sample * 9 + e] = static_cast<scalar_t>(rotation_grad[e] * inverse_k);
    }
  });
}

// Runs the statement with the constexpr int C set to the channel count when it is 1 to 4, else
// 0 (run-time count), so that the per-point loops unroll.
#define LPS_FAST_DISPATCH_CHANNELS(channels, C, ...)       \
  switch (channels) {                                      \
    case 1: { constexpr int C = 1; __VA_ARGS__; break; }   \
    case 2: { constexpr int C = 2; __VA_ARGS__; break; }   \
    case 3: { constexpr int C = 3; __VA_ARGS__; break; }   \
    case 4: { constexpr int C = 4; __VA_ARGS__; break; }   \
    default: { constexpr int C = 0; __VA_ARGS__; break; }  \
  }

template <typename scalar_t>
const scalar_t* optional_data(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<scalar_t>() : nullptr;
}

// The data of perm, checked to hold permutations (the kernels index with it), or nullptr.
const int64_t* checked_perm_data(const c10::optional<at::Tensor>& perm, int64_t batch, int64_t k, int64_t n) {
  if (!perm.has_value()) return nullptr;
  const int64_t* data = perm->const_data_ptr<int64_t>();
  invert_permutations(data, batch * k, k, n, nullptr);
  return data;
}

}  // namespace

at::Tensor frame_apply(const at::Tensor& x, const at::Tensor& R, const c10::optional<at::Tensor>& perm,
                       const c10::optional<at::Tensor>& center) {
  const int64_t batch = x.size(0), n = x.size(1), channels = x.size(3), k = R.size(1);
  at::Tensor out = at::empty({batch, k, n, 3, channels}, x.options());
  if (out.numel() == 0) return out;
  const int64_t* perm_data = checked_perm_data(perm, batch, k, n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "frame_apply_cpu", [&] {
    LPS_FAST_DISPATCH_CHANNELS(channels, C,
                               frame_apply_kernel<C>(x.const_data_ptr<scalar_t>(), R.const_data_ptr<scalar_t>(),
                                                     perm_data, optional_data<scalar_t>(center),
                                                     out.mutable_data_ptr<scalar_t>(), batch, k, n, channels));
  });
  return out;
}

at::Tensor frame_unapply_mean(const at::Tensor& y, const at::Tensor& R, const c10::optional<at::Tensor>& perm,
                              const c10::optional<at::Tensor>& center) {
  const int64_t batch = y.size(0), k = y.size(1), n = y.size(2), channels = y.size(4);
  at::Tensor out = at::empty({batch, n, 3, channels}, y.options());
  if (out.numel() == 0) return out;
  at::Tensor inverse;
  if (perm.has_value()) inverse = inverse_permutation(*perm);
  const int64_t* position = inverse.defined() ? inverse.const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "frame_unapply_mean_cpu", [&] {
    LPS_FAST_DISPATCH_CHANNELS(channels, C,
                               frame_unapply_mean_kernel<C>(y.const_data_ptr<scalar_t>(), R.const_data_ptr<scalar_t>(),
                                                            position, optional_data<scalar_t>(center),
                                                            out.mutable_data_ptr<scalar_t>(), batch, k, n,
                                                            channels));
  });
  return out;
}


std::tuple<at::Tensor, at::Tensor> frame_apply_backward(const at::Tensor& grad, const at::Tensor& x,
                                                        const at::Tensor& R, const c10::optional<at::Tensor>& perm,
                                                        const c10::optional<at::Tensor>& center) {
  const int64_t batch = x.size(0), n = x.size(1), channels = x.size(3), k = R.size(1);
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_R = at::empty(R.sizes(), R.options());
  const int64_t* perm_data = checked_perm_data(perm, batch, k, n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "frame_apply_backward_cpu", [&] {
    LPS_FAST_DISPATCH_CHANNELS(
        channels, C,
        frame_apply_backward_kernel<C>(grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                       R.const_data_ptr<scalar_t>(), perm_data, optional_data<scalar_t>(center),
                                       grad_x.mutable_data_ptr<scalar_t>(), grad_R.mutable_data_ptr<scalar_t>(), batch,
                                       k, n, channels));
  });
  return {grad_x, grad_R};
}

std::tuple<at::Tensor, at::Tensor> frame_unapply_mean_backward(const at::Tensor& grad, const at::Tensor& y,
                                                               const at::Tensor& R,
                                                               const c10::optional<at::Tensor>& perm) {
  const int64_t batch = y.size(0), k = y.size(1), n = y.size(2), channels = y.size(4);
  at::Tensor grad_y = at::empty(y.sizes(), y.options());
  at::Tensor grad_R = at::empty(R.sizes(), R.options());
  const int64_t* perm_data = checked_perm_data(perm, batch, k, n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "frame_unapply_mean_backward_cpu", [&] {
    LPS_FAST_DISPATCH_CHANNELS(
        channels, C,
        frame_unapply_mean_backward_kernel<C>(grad.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                                              R.const_data_ptr<scalar_t>(), perm_data,
                                              grad_y.mutable_data_ptr<scalar_t>(), grad_R.mutable_data_ptr<scalar_t>(),
                                              batch, k, n, channels));
  });
  return {grad_y, grad_R};
}

}  // namespace cpu
}  // namespace lps_fast
