// CPU kernels of the permutation family (SPEC section 2).
//
// The gathers copy raw elements, so they serve every dtype through one instantiation per
// element size. The scatter-means never scatter: they invert each sample's permutation once
// (O(n), which also validates it) and then gather-and-sum over the k samples, so every output
// row is written by exactly one thread, deterministically, accumulating in float (double for
// double inputs).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include "cpu/permute_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common.h"

namespace lps_fast {
namespace cpu {
namespace {

// Elements per parallel chunk: large enough to amortize scheduling, small enough to balance.
constexpr int64_t kGrainElements = 1 << 15;

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(elements_per_item, 1));
}

template <typename element_t>
inline void copy_elements(const element_t* from, element_t* to, int64_t count) {
  if (count == 1) {
    *to = *from;
  } else {
    std::memcpy(to, from, count * sizeof(element_t));
  }
}

// out[b, j, r, :] = x[b, perm[b, j, r], :]   x: [B, n, F], out: [B, k, n, F]
template <typename element_t>
void gather_nodes(const element_t* x, const int64_t* perm, element_t* out, int64_t batch, int64_t k, int64_t n,
                  int64_t features) {
  at::parallel_for(0, batch * k * n, grain_for(features), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (k * n);
      copy_elements(x + (b * n + perm[row]) * features, out + row * features, features);
    }
  });
}

// out[b, j, r, s, :] = e[b, perm[r], perm[s], :]   e: [B, n, n, F], out: [B, k, n, n, F]
template <typename element_t>
void gather_edges(const element_t* e, const int64_t* perm, element_t* out, int64_t batch, int64_t k, int64_t n,
                  int64_t features) {
  const int64_t row_size = n * features;
  at::parallel_for(0, batch * k * n, grain_for(row_size), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t sample = row / n;  // b * k + j
      const int64_t b = sample / k;
      const int64_t* sample_perm = perm + sample * n;
      const element_t* source = e + (b * n + perm[row]) * row_size;
      element_t* target = out + row * row_size;
      if (features == 1) {
        for (int64_t s = 0; s < n; ++s) target[s] = source[sample_perm[s]];
      } else {
        for (int64_t s = 0; s < n; ++s) {
          std::memcpy(target + s * features, source + sample_perm[s] * features, features * sizeof(element_t));
        }
      }
    }
  });
}

// Runs `kernel<element_t>` with an unsigned type of the element size of `t` (dtype-agnostic copy).
template <template <typename> class Kernel, typename... Args>
void dispatch_by_element_size(const at::Tensor& t, const char* name, Args&&... args) {
  switch (t.element_size()) {
    case 1: Kernel<uint8_t>::run(std::forward<Args>(args)...); break;
    case 2: Kernel<uint16_t>::run(std::forward<Args>(args)...); break;
    case 4: Kernel<uint32_t>::run(std::forward<Args>(args)...); break;
    case 8: Kernel<uint64_t>::run(std::forward<Args>(args)...); break;
    default: TORCH_CHECK_TYPE(false, name, " of dtype ", t.scalar_type(), " is not supported");
  }
}

template <typename element_t>
struct GatherNodes {
  static void run(const at::Tensor& x, const at::Tensor& perm, at::Tensor& out, int64_t features) {
    gather_nodes<element_t>(static_cast<const element_t*>(x.const_data_ptr()), perm.const_data_ptr<int64_t>(),
                            static_cast<element_t*>(out.mutable_data_ptr()), perm.size(0), perm.size(1),
                            perm.size(2), features);
  }
};

template <typename element_t>
struct GatherEdges {
  static void run(const at::Tensor& e, const at::Tensor& perm, at::Tensor& out, int64_t features) {
    gather_edges<element_t>(static_cast<const element_t*>(e.const_data_ptr()), perm.const_data_ptr<int64_t>(),
                            static_cast<element_t*>(out.mutable_data_ptr()), perm.size(0), perm.size(1),
                            perm.size(2), features);
  }
};

}  // namespace

void invert_permutations(const int64_t* perm, int64_t rows, int64_t k, int64_t n, int64_t* inverse) {
  at::parallel_for(0, rows, grain_for(n), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> scratch(inverse == nullptr ? n : 0);
    for (int64_t row = begin; row < end; ++row) {
      int64_t* position = inverse == nullptr ? scratch.data() : inverse + row * n;
      std::fill(position, position + n, -1);
      const int64_t* row_perm = perm + row * n;
      for (int64_t r = 0; r < n; ++r) {
        const int64_t node = row_perm[r];
        if (node < 0 || node >= n || position[node] >= 0) fail_not_a_permutation(row, k, n, r, node);
        position[node] = r;
      }
    }
  });
}

at::Tensor inverse_permutation(const at::Tensor& perm) {
  at::Tensor inverse = at::empty(perm.sizes(), perm.options());
  invert_permutations(perm.const_data_ptr<int64_t>(), perm.size(0) * perm.size(1), perm.size(1), perm.size(2),
                      inverse.mutable_data_ptr<int64_t>());
  return inverse;
}

at::Tensor permute_nodes(const at::Tensor& x, const at::Tensor& perm) {
  const int64_t batch = perm.size(0), k = perm.size(1), n = perm.size(2);
  at::Tensor out = at::empty(sampled_shape(x, k), x.options());
  if (out.numel() == 0) return out;
  invert_permutations(perm.const_data_ptr<int64_t>(), batch * k, k, n, nullptr);
  dispatch_by_element_size<GatherNodes>(x, "x", x, perm, out, feature_size(x, 2));
  return out;
}

at::Tensor permute_edges(const at::Tensor& e, const at::Tensor& perm) {
  const int64_t batch = perm.size(0), k = perm.size(1), n = perm.size(2);
  at::Tensor out = at::empty(sampled_shape(e, k), e.options());
  if (out.numel() == 0) return out;
  invert_permutations(perm.const_data_ptr<int64_t>(), batch * k, k, n, nullptr);
  dispatch_by_element_size<GatherEdges>(e, "e", e, perm, out, feature_size(e, 3));
  return out;
}

at::Tensor unpermute_mean(const at::Tensor& y, const at::Tensor& perm) {
  const int64_t batch = y.size(0), k = y.size(1), n = y.size(2);
  const int64_t features = feature_size(y, 3);
  at::Tensor out = at::empty(averaged_shape(y), y.options());
  if (out.numel() == 0) return out;
  const at::Tensor inverse = inverse_permutation(perm);
  const int64_t* position = inverse.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "unpermute_mean_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* source = y.const_data_ptr<scalar_t>();
    scalar_t* target = out.mutable_data_ptr<scalar_t>();
    // out[b, i, :] = sum_j y[b, j, q_j(i), :] / k with q_j the inverse of perm[b, j]
    at::parallel_for(0, batch * n, grain_for(k * features), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(features);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / n, i = row % n;
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t j = 0; j < k; ++j) {
          const int64_t sample = b * k + j;
          const scalar_t* from = source + (sample * n + position[sample * n + i]) * features;
          for (int64_t f = 0; f < features; ++f) sum[f] += static_cast<acc_t>(from[f]);
        }
        scalar_t* to = target + row * features;
        for (int64_t f = 0; f < features; ++f) to[f] = static_cast<scalar_t>(sum[f] / static_cast<acc_t>(k));
      }
    });
  });
  return out;
}

at::Tensor unpermute_edges_mean(const at::Tensor& y, const at::Tensor& perm, bool diagonal) {
  const int64_t batch = y.size(0), k = y.size(1), n = y.size(2);
  const int64_t features = feature_size(y, 4);
  at::Tensor out = at::empty(averaged_edge_shape(y, diagonal), y.options());
  if (out.numel() == 0) return out;
  const at::Tensor inverse = inverse_permutation(perm);
  const int64_t* position = inverse.const_data_ptr<int64_t>();
  const int64_t row_size = n * features;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "unpermute_edges_mean_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* source = y.const_data_ptr<scalar_t>();
    scalar_t* target = out.mutable_data_ptr<scalar_t>();
    const acc_t samples = static_cast<acc_t>(k);
    if (diagonal) {
      // out[b, i, :] = sum_j y[b, j, q(i), q(i), :] / k: O(k n F)
      at::parallel_for(0, batch * n, grain_for(k * features), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> sum(features);
        for (int64_t row = begin; row < end; ++row) {
          const int64_t b = row / n, i = row % n;
          std::fill(sum.begin(), sum.end(), acc_t(0));
          for (int64_t j = 0; j < k; ++j) {
            const int64_t sample = b * k + j;
            const int64_t q = position[sample * n + i];
            const scalar_t* from = source + ((sample * n + q) * n + q) * features;
            for (int64_t f = 0; f < features; ++f) sum[f] += static_cast<acc_t>(from[f]);
          }
          scalar_t* to = target + row * features;
          for (int64_t f = 0; f < features; ++f) to[f] = static_cast<scalar_t>(sum[f] / samples);
        }
      });
      return;
    }
    // out[b, i, u, :] = sum_j y[b, j, q(i), q(u), :] / k: one output row (b, i) per item
    at::parallel_for(0, batch * n, grain_for(k * row_size), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(row_size);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / n, i = row % n;
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t j = 0; j < k; ++j) {
          const int64_t sample = b * k + j;
          const int64_t* q = position + sample * n;
          const scalar_t* from_row = source + (sample * n + q[i]) * row_size;
          if (features == 1) {
            for (int64_t u = 0; u < n; ++u) sum[u] += static_cast<acc_t>(from_row[q[u]]);
          } else {
            for (int64_t u = 0; u < n; ++u) {
              const scalar_t* from = from_row + q[u] * features;
              acc_t* into = sum.data() + u * features;
              for (int64_t f = 0; f < features; ++f) into[f] += static_cast<acc_t>(from[f]);
            }
          }
        }
        scalar_t* to = target + row * row_size;
        for (int64_t m = 0; m < row_size; ++m) to[m] = static_cast<scalar_t>(sum[m] / samples);
      }
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace lps_fast
