// CPU kernels of the permutation family. Inputs are contiguous and already shape-checked by
// csrc/permute.cpp; perm values are validated here, inside the kernels.
#pragma once

#include <ATen/core/Tensor.h>

namespace lps_fast {
namespace cpu {

// Validates every row of a contiguous (rows, n) int64 perm; writes its inverse when `inverse`
// is non-null (inverse[row, perm[row, r]] = r). Throws a ValueError naming the first bad row.
void invert_permutations(const int64_t* perm, int64_t rows, int64_t k, int64_t n, int64_t* inverse);
at::Tensor inverse_permutation(const at::Tensor& perm);

// Calls body(row, b, i) for the node rows row = b * n + i in [begin, end), walking (b, i) with
// counters instead of a division per row (the scatter-means iterate output node rows).
template <typename Body>
inline void for_each_node_row(int64_t begin, int64_t end, int64_t n, const Body& body) {
  int64_t b = begin / n;
  int64_t i = begin - b * n;
  for (int64_t row = begin; row < end; ++row, ++i) {
    if (i == n) {
      i = 0;
      ++b;
    }
    body(row, b, i);
  }
}

at::Tensor permute_nodes(const at::Tensor& x, const at::Tensor& perm);
at::Tensor permute_edges(const at::Tensor& e, const at::Tensor& perm);
at::Tensor unpermute_mean(const at::Tensor& y, const at::Tensor& perm);
at::Tensor unpermute_edges_mean(const at::Tensor& y, const at::Tensor& perm, bool diagonal);

// Backward passes: the sums over the samples that are the gathers' gradients (B, n, *F) and
// (B, n, n, *F), and unpermute_mean's gradient grad[b, perm[b, j, r]] / k (B, k, n, *F).
at::Tensor permute_nodes_backward(const at::Tensor& grad, const at::Tensor& perm);
at::Tensor permute_edges_backward(const at::Tensor& grad, const at::Tensor& perm);
at::Tensor unpermute_mean_backward(const at::Tensor& grad, const at::Tensor& perm);
// unpermute_edges_mean's gradient with diagonal=true: grad[b, perm[b, j, r]] / k on the diagonal
// of each sample (B, k, n, n, *F), zero elsewhere.
at::Tensor unpermute_edges_mean_diagonal_backward(const at::Tensor& grad, const at::Tensor& perm);

}  // namespace cpu
}  // namespace lps_fast
