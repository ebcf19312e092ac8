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

at::Tensor permute_nodes(const at::Tensor& x, const at::Tensor& perm);
at::Tensor permute_edges(const at::Tensor& e, const at::Tensor& perm);
at::Tensor unpermute_mean(const at::Tensor& y, const at::Tensor& perm);
at::Tensor unpermute_edges_mean(const at::Tensor& y, const at::Tensor& perm, bool diagonal);

}  // namespace cpu
}  // namespace lps_fast
