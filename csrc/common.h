// Shared helpers of the lps_fast kernels: argument checks and permutation handling.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <vector>

namespace lps_fast {

// Size of the flattened trailing feature dims of `t` starting at `first_feature_dim`.
inline int64_t feature_size(const at::Tensor& t, int64_t first_feature_dim) {
  int64_t size = 1;
  for (int64_t d = first_feature_dim; d < t.dim(); ++d) size *= t.size(d);
  return size;
}

// Output shape of a gather over k samples: (B, k, *input.shape[1:]).
inline std::vector<int64_t> sampled_shape(const at::Tensor& input, int64_t k) {
  std::vector<int64_t> shape{input.size(0), k};
  for (int64_t d = 1; d < input.dim(); ++d) shape.push_back(input.size(d));
  return shape;
}

// Output shape of a mean over the sample dim: (B, *y.shape[2:]).
inline std::vector<int64_t> averaged_shape(const at::Tensor& y) {
  std::vector<int64_t> shape{y.size(0)};
  for (int64_t d = 2; d < y.dim(); ++d) shape.push_back(y.size(d));
  return shape;
}

// Output shape of unpermute_edges_mean: (B, n, n, *F), or (B, n, *F) for the diagonal.
inline std::vector<int64_t> averaged_edge_shape(const at::Tensor& y, bool diagonal) {
  std::vector<int64_t> shape{y.size(0), y.size(2)};
  if (!diagonal) shape.push_back(y.size(3));
  for (int64_t d = 4; d < y.dim(); ++d) shape.push_back(y.size(d));
  return shape;
}

inline c10::optional<at::Tensor> contiguous_or_none(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return c10::nullopt;
  return t->contiguous();
}

// Checks that the C++ entry points repeat from the Python layer: the ops are reachable through
// torch.ops.lps_fast directly, where no Python validation ran, and a bad shape here would be an
// out-of-bounds access rather than an error.
inline void check_perm_shape(const at::Tensor& perm, int64_t batch, int64_t n, int64_t k = -1) {
  TORCH_CHECK_TYPE(perm.scalar_type() == at::kLong, "perm must be an int64 tensor, got ", perm.scalar_type());
  TORCH_CHECK_VALUE(perm.dim() == 3 && perm.size(0) == batch && perm.size(2) == n &&
                        (k < 0 || perm.size(1) == k),
                    "perm must have shape (B, k, n) = (", batch, ", ", (k < 0 ? std::string("k") : std::to_string(k)),
                    ", ", n, "), got ", perm.sizes());
}

inline void check_same_device(const at::Tensor& reference, const char* reference_name, const at::Tensor& t,
                              const char* name) {
  TORCH_CHECK_VALUE(t.device() == reference.device(), name, " is on ", t.device(), " but ", reference_name,
                    " is on ", reference.device());
}

inline void check_soft_shape(const c10::optional<at::Tensor>& soft, int64_t batch, int64_t k, int64_t n) {
  if (!soft.has_value()) return;
  TORCH_CHECK_VALUE(soft->dim() == 4 && soft->size(0) == batch && soft->size(1) == k && soft->size(2) == n &&
                        soft->size(3) == n,
                    "soft must have shape (B, k, n, n) = (", batch, ", ", k, ", ", n, ", ", n, "), got ",
                    soft->sizes());
}

// Raised from inside kernels when a perm row is not a permutation of 0..n-1.
[[noreturn]] inline void fail_not_a_permutation(int64_t row, int64_t k, int64_t n, int64_t position,
                                                int64_t value) {
  C10_THROW_ERROR(ValueError, c10::str("perm must hold a permutation of 0..", n - 1, " in every row; perm[",
                                       row / k, ", ", row % k, "] is not one (entry ", position, " is ", value,
                                       value >= 0 && value < n ? ", repeated)" : ", out of range)"));
}

}  // namespace lps_fast

namespace lps_fast {

// Per-op argument checks, shared by the CPU and CUDA entry points.

inline void check_permute_nodes_args(const at::Tensor& x, const at::Tensor& perm,
                                     const c10::optional<at::Tensor>& soft) {
  TORCH_CHECK_VALUE(x.dim() >= 2, "x must have shape (B, n, *F), got ", x.sizes());
  check_perm_shape(perm, x.size(0), x.size(1));
  check_same_device(x, "x", perm, "perm");
  check_soft_shape(soft, x.size(0), perm.size(1), x.size(1));
}

inline void check_permute_edges_args(const at::Tensor& e, const at::Tensor& perm,
                                     const c10::optional<at::Tensor>& soft) {
  TORCH_CHECK_VALUE(e.dim() >= 3 && e.size(1) == e.size(2), "e must have shape (B, n, n, *F), got ", e.sizes());
  check_perm_shape(perm, e.size(0), e.size(1));
  check_same_device(e, "e", perm, "perm");
  check_soft_shape(soft, e.size(0), perm.size(1), e.size(1));
}

inline void check_unpermute_args(const at::Tensor& y, const at::Tensor& perm, const c10::optional<at::Tensor>& soft,
                                 bool edges) {
  if (edges) {
    TORCH_CHECK_VALUE(y.dim() >= 4 && y.size(2) == y.size(3), "y must have shape (B, k, n, n, *F), got ",
                      y.sizes());
  } else {
    TORCH_CHECK_VALUE(y.dim() >= 3, "y must have shape (B, k, n, *F), got ", y.sizes());
  }
  TORCH_CHECK_TYPE(at::isFloatingType(y.scalar_type()), "y must be a floating-point tensor, got ", y.scalar_type());
  TORCH_CHECK_VALUE(y.size(1) >= 1, "y must hold at least one sample (k >= 1)");
  check_perm_shape(perm, y.size(0), y.size(2), y.size(1));
  check_same_device(y, "y", perm, "perm");
  check_soft_shape(soft, y.size(0), y.size(1), y.size(2));
}

inline void check_frame_args(const at::Tensor& points, const char* name, bool per_sample, const at::Tensor& R,
                             const c10::optional<at::Tensor>& perm, const c10::optional<at::Tensor>& center,
                             const c10::optional<at::Tensor>& soft) {
  const int64_t vector_dim = per_sample ? 3 : 2;
  TORCH_CHECK_VALUE(points.dim() == vector_dim + 2 && points.size(vector_dim) == 3, name, " must have shape ",
                    per_sample ? "(B, k, n, 3, C)" : "(B, n, 3, C)", ", got ", points.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(points.scalar_type()), name, " must be a floating-point tensor, got ",
                   points.scalar_type());
  const int64_t batch = points.size(0);
  const int64_t n = points.size(per_sample ? 2 : 1);
  const int64_t channels = points.size(vector_dim + 1);
  TORCH_CHECK_VALUE(R.dim() == 4 && R.size(0) == batch && R.size(2) == 3 && R.size(3) == 3 &&
                        (!per_sample || R.size(1) == points.size(1)),
                    "R must have shape (B, k, 3, 3), got ", R.sizes());
  TORCH_CHECK_TYPE(R.scalar_type() == points.scalar_type(), "R must have the dtype of ", name);
  check_same_device(points, name, R, "R");
  const int64_t k = R.size(1);
  TORCH_CHECK_VALUE(!per_sample || k >= 1, name, " must hold at least one sample (k >= 1)");
  if (center.has_value()) {
    TORCH_CHECK_VALUE(center->dim() == 3 && center->size(0) == batch && center->size(1) == 3 &&
                          center->size(2) == channels,
                      "center must have shape (B, 3, C), got ", center->sizes());
    TORCH_CHECK_TYPE(center->scalar_type() == points.scalar_type(), "center must have the dtype of ", name);
    check_same_device(points, name, *center, "center");
  }
  if (perm.has_value()) {
    check_perm_shape(*perm, batch, n, k);
    check_same_device(points, name, *perm, "perm");
    check_soft_shape(soft, batch, k, n);
  } else {
    TORCH_CHECK_VALUE(!soft.has_value(), "soft was given without perm");
  }
}

inline void check_mask_shape(const c10::optional<at::Tensor>& mask, const at::Tensor& like, int64_t batch,
                             int64_t n) {
  if (!mask.has_value()) return;
  TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "mask must be a bool tensor, got ", mask->scalar_type());
  TORCH_CHECK_VALUE(mask->dim() == 2 && mask->size(0) == batch && mask->size(1) == n,
                    "mask must have shape (B, n) = (", batch, ", ", n, "), got ", mask->sizes());
  check_same_device(like, "the first argument", *mask, "mask");
}

inline void check_scores_args(const at::Tensor& scores, double tau, int64_t n_iter,
                              const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK_VALUE(scores.dim() == 3, "scores must have shape (B, k, n), got ", scores.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(scores.scalar_type()), "scores must be a floating-point tensor");
  TORCH_CHECK_VALUE(tau > 0, "tau must be a finite positive temperature, got ", tau);
  TORCH_CHECK_VALUE(n_iter >= 0, "n_iter must be >= 0, got ", n_iter);
  check_mask_shape(mask, scores, scores.size(0), scores.size(2));
}

inline void check_soft_matrix_args(const at::Tensor& soft, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK_VALUE(soft.dim() == 4 && soft.size(2) == soft.size(3), "soft must have shape (B, k, n, n), got ",
                    soft.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(soft.scalar_type()), "soft must be a floating-point tensor");
  check_mask_shape(mask, soft, soft.size(0), soft.size(2));
}

inline void check_gram_schmidt_args(const at::Tensor& V) {
  TORCH_CHECK_VALUE(V.dim() >= 2 && V.size(-1) == 3 && V.size(-2) == 3, "V must have shape (..., 3, 3), got ",
                    V.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(V.scalar_type()), "V must be a floating-point tensor");
}

}  // namespace lps_fast
