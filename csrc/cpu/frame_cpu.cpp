// CPU kernels of the frame family (SPEC section 2). Centering, the permutation gather or
// scatter, the 3 x 3 rotation and the mean over samples are one pass over the data; channels
// are innermost so the per-channel loops vectorize.
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

}  // namespace

at::Tensor frame_apply(const at::Tensor& x, const at::Tensor& R, const c10::optional<at::Tensor>& perm,
                       const c10::optional<at::Tensor>& center) {
  const int64_t batch = x.size(0), n = x.size(1), channels = x.size(3), k = R.size(1);
  at::Tensor out = at::empty({batch, k, n, 3, channels}, x.options());
  if (out.numel() == 0) return out;
  const int64_t* perm_data = nullptr;
  if (perm.has_value()) {
    perm_data = perm->const_data_ptr<int64_t>();
    invert_permutations(perm_data, batch * k, k, n, nullptr);
  }
  const int64_t point_size = 3 * channels;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "frame_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const scalar_t* R_data = R.const_data_ptr<scalar_t>();
    const scalar_t* center_data = center.has_value() ? center->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch * k * n, grain_for(3 * point_size), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> centered(point_size);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t sample = row / n;  // b * k + j
        const int64_t b = sample / k, r = row % n;
        const int64_t node = perm_data != nullptr ? perm_data[row] : r;
        const scalar_t* point = x_data + (b * n + node) * point_size;
        for (int64_t m = 0; m < point_size; ++m) {
          acc_t value = static_cast<acc_t>(point[m]);
          if (center_data != nullptr) value -= static_cast<acc_t>(center_data[b * point_size + m]);
          centered[m] = value;
        }
        const scalar_t* rotation = R_data + sample * 9;  // rotation[a * 3 + m] = R[a, m]
        scalar_t* target = out_data + row * point_size;
        for (int64_t m = 0; m < 3; ++m) {
          // (R^T v)[m] = sum_a R[a, m] v[a]
          const acc_t r0 = rotation[m], r1 = rotation[3 + m], r2 = rotation[6 + m];
          for (int64_t c = 0; c < channels; ++c) {
            target[m * channels + c] = static_cast<scalar_t>(
                r0 * centered[c] + r1 * centered[channels + c] + r2 * centered[2 * channels + c]);
          }
        }
      }
    });
  });
  return out;
}

at::Tensor frame_unapply_mean(const at::Tensor& y, const at::Tensor& R, const c10::optional<at::Tensor>& perm,
                              const c10::optional<at::Tensor>& center) {
  const int64_t batch = y.size(0), k = y.size(1), n = y.size(2), channels = y.size(4);
  at::Tensor out = at::empty({batch, n, 3, channels}, y.options());
  if (out.numel() == 0) return out;
  at::Tensor inverse;
  const int64_t* position = nullptr;
  if (perm.has_value()) {
    inverse = inverse_permutation(*perm);
    position = inverse.const_data_ptr<int64_t>();
  }
  const int64_t point_size = 3 * channels;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "frame_unapply_mean_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* y_data = y.const_data_ptr<scalar_t>();
    const scalar_t* R_data = R.const_data_ptr<scalar_t>();
    const scalar_t* center_data = center.has_value() ? center->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    const acc_t samples = static_cast<acc_t>(k);
    at::parallel_for(0, batch * n, grain_for(k * 3 * point_size), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(point_size);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / n, i = row % n;
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t j = 0; j < k; ++j) {
          const int64_t sample = b * k + j;
          const int64_t r = position != nullptr ? position[sample * n + i] : i;
          const scalar_t* point = y_data + (sample * n + r) * point_size;
          const scalar_t* rotation = R_data + sample * 9;
          for (int64_t a = 0; a < 3; ++a) {
            // (R v)[a] = sum_m R[a, m] v[m]
            const acc_t r0 = rotation[a * 3], r1 = rotation[a * 3 + 1], r2 = rotation[a * 3 + 2];
            for (int64_t c = 0; c < channels; ++c) {
              sum[a * channels + c] += r0 * static_cast<acc_t>(point[c]) +
                                       r1 * static_cast<acc_t>(point[channels + c]) +
                                       r2 * static_cast<acc_t>(point[2 * channels + c]);
            }
          }
        }
        scalar_t* target = out_data + row * point_size;
        for (int64_t m = 0; m < point_size; ++m) {
          acc_t value = sum[m] / samples;
          if (center_data != nullptr) value += static_cast<acc_t>(center_data[b * point_size + m]);
          target[m] = static_cast<scalar_t>(value);
        }
      }
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace lps_fast
