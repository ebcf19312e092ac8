// CUDA kernels of the permutation family (docs/SPEC.md, "Ops"), registered for the CUDA dispatch key.
//
// All of them are memory-bound. The gathers copy raw bytes in the widest aligned vector that
// divides a row (16, 8, 4, 2 or 1 bytes), so one instantiation per width serves every dtype.
// The edge gather handles a few output rows of one sample per block, with that sample's perm in
// shared memory. The scatter-means never use atomics: unpermute_mean gathers over the inverse
// permutation, and unpermute_edges_mean reads each input row once, coalesced, and scatters it
// into an output row accumulated in shared memory. Perm values are not validated on the GPU
// (that would need a host synchronisation); out-of-range entries are clamped, so a bad perm
// gives wrong numbers, never an out-of-bounds access.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "common.h"
#include "cuda/launch.cuh"
#include "cuda/permutation.cuh"

namespace lps_fast {
namespace cuda {
namespace {

// Output rows of one sample handled by one block of the edge kernels.
constexpr int kEdgeRowsPerBlock = 8;
// Largest shared-memory accumulator row of unpermute_edges_mean (bytes).
constexpr int64_t kMaxAccumulatorBytes = 32 * 1024;

// out[b, j, r, :] = x[b, perm[b, j, r], :], rows of `row_vectors` vec_t
template <typename vec_t, typename index_t>
__global__ void gather_nodes_kernel(const vec_t* __restrict__ x, const int64_t* __restrict__ perm,
                                    vec_t* __restrict__ out, index_t k, index_t n, index_t row_vectors,
                                    index_t total) {
  for (index_t index = blockIdx.x * blockDim.x + threadIdx.x; index < total; index += gridDim.x * blockDim.x) {
    const index_t row = index / row_vectors;  // (b * k + j) * n + r
    const index_t column = index - row * row_vectors;
    const index_t b = row / (k * n);
    const index_t node = clamp_index(static_cast<index_t>(perm[row]), n);
    out[index] = x[(b * n + node) * row_vectors + column];
  }
}

// out[b, j, r, s, :] = e[b, perm[r], perm[s], :] for kEdgeRowsPerBlock rows r of sample (b, j)
template <typename vec_t>
__global__ void gather_edges_kernel(const vec_t* __restrict__ e, const int64_t* __restrict__ perm,
                                    vec_t* __restrict__ out, int k, int n, int cell_vectors) {
  extern __shared__ int sample_perm[];  // [n], clamped
  const int64_t sample = blockIdx.x;    // b * k + j
  const int64_t b = sample / k;
  for (int s = threadIdx.x; s < n; s += blockDim.x) sample_perm[s] = clamp_index<int>(perm[sample * n + s], n);
  __syncthreads();
  const int first_row = blockIdx.y * kEdgeRowsPerBlock;
  const int rows = min(kEdgeRowsPerBlock, n - first_row);
  const int row_items = n * cell_vectors;
  for (int t = threadIdx.x; t < rows * row_items; t += blockDim.x) {
    const int local_row = t / row_items;
    const int item = t - local_row * row_items;
    const int s = item / cell_vectors;
    const int column = item - s * cell_vectors;
    const int r = first_row + local_row;
    const int64_t source = ((b * n + sample_perm[r]) * n + sample_perm[s]) * cell_vectors + column;
    out[(sample * n + r) * static_cast<int64_t>(row_items) + item] = e[source];
  }
}

// out[b, i, f] = sum_j y[b, j, q_j(i), f] / k
template <typename scalar_t, typename index_t>
__global__ void scatter_mean_nodes_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ inverse,
                                          scalar_t* __restrict__ out, index_t k, index_t n, index_t features,
                                          index_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  for (index_t index = blockIdx.x * blockDim.x + threadIdx.x; index < total; index += gridDim.x * blockDim.x) {
    const index_t row = index / features;  // b * n + i
    const index_t f = index - row * features;
    const index_t b = row / n, i = row - b * n;
    acc_t sum = 0;
    for (index_t j = 0; j < k; ++j) {
      const index_t sample = b * k + j;
      const index_t position = clamp_index(static_cast<index_t>(inverse[sample * n + i]), n);
      sum += static_cast<acc_t>(y[(sample * n + position) * features + f]);
    }
    out[index] = static_cast<scalar_t>(sum / static_cast<acc_t>(k));
  }
}

// out[b, i, :, :] = sum_j (row q_j(i) of y[b, j], its columns scattered by perm_j) / k: one
// block per output row, accumulated in shared memory.
template <typename scalar_t>
__global__ void scatter_mean_edge_rows_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ perm,
                                              const int64_t* __restrict__ inverse, scalar_t* __restrict__ out,
                                              int k, int n, int features) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ unsigned char shared_bytes[];
  acc_t* accumulator = reinterpret_cast<acc_t*>(shared_bytes);  // [n * features]
  const int64_t row = blockIdx.x;                                 // b * n + i
  const int64_t b = row / n;
  const int i = static_cast<int>(row - b * n);
  const int row_items = n * features;
  for (int t = threadIdx.x; t < row_items; t += blockDim.x) accumulator[t] = acc_t(0);
  __syncthreads();
  for (int j = 0; j < k; ++j) {
    const int64_t sample = b * k + j;
    const int q = clamp_index<int>(inverse[sample * n + i], n);
    const scalar_t* source = y + (sample * n + q) * static_cast<int64_t>(row_items);
    const int64_t* sample_perm = perm + sample * n;
    for (int t = threadIdx.x; t < row_items; t += blockDim.x) {
      const int s = t / features;
      const int f = t - s * features;
      accumulator[clamp_index<int>(sample_perm[s], n) * features + f] += static_cast<acc_t>(source[t]);
    }
    __syncthreads();  // the next sample scatters to other slots of other threads
  }
  const acc_t samples = static_cast<acc_t>(k);
  for (int t = threadIdx.x; t < row_items; t += blockDim.x) {
    out[row * row_items + t] = static_cast<scalar_t>(accumulator[t] / samples);
  }
}

// Fallback for rows too wide for shared memory, and the diagonal:
// out[b, i, u, f] = sum_j y[b, j, q(i), q(u), f] / k (DIAGONAL: u = i, out[b, i, f])
template <typename scalar_t, typename index_t, bool DIAGONAL>
__global__ void scatter_mean_edges_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ inverse,
                                          scalar_t* __restrict__ out, index_t k, index_t n, index_t features,
                                          index_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  for (index_t index = blockIdx.x * blockDim.x + threadIdx.x; index < total; index += gridDim.x * blockDim.x) {
    const index_t cell = index / features;
    const index_t f = index - cell * features;
    index_t b, i, u;
    if (DIAGONAL) {
      b = cell / n;
      i = cell - b * n;
      u = i;
    } else {
      const index_t row = cell / n;  // b * n + i
      u = cell - row * n;
      b = row / n;
      i = row - b * n;
    }
    acc_t sum = 0;
    for (index_t j = 0; j < k; ++j) {
      const index_t sample = b * k + j;
      const int64_t* q = inverse + sample * n;
      const index_t qi = clamp_index(static_cast<index_t>(q[i]), n);
      const index_t qu = DIAGONAL ? qi : clamp_index(static_cast<index_t>(q[u]), n);
      sum += static_cast<acc_t>(y[((sample * n + qi) * n + qu) * features + f]);
    }
    out[index] = static_cast<scalar_t>(sum / static_cast<acc_t>(k));
  }
}

int64_t vector_width(const void* a, const void* b, int64_t row_bytes) {
  for (int64_t width : {16, 8, 4, 2}) {
    if (row_bytes % width == 0 && reinterpret_cast<uintptr_t>(a) % width == 0 &&
        reinterpret_cast<uintptr_t>(b) % width == 0) {
      return width;
    }
  }
  return 1;
}

template <typename vec_t>
void launch_gather_nodes(const at::Tensor& x, const at::Tensor& perm, at::Tensor& out, int64_t row_bytes) {
  const int64_t k = perm.size(1), n = perm.size(2);
  const int64_t row_vectors = row_bytes / static_cast<int64_t>(sizeof(vec_t));
  const int64_t total = perm.numel() * row_vectors;
  const auto stream = current_stream();
  const auto* source = static_cast<const vec_t*>(x.const_data_ptr());
  auto* target = static_cast<vec_t*>(out.mutable_data_ptr());
  // Offsets are in vectors; bytes bound them from above.
  const GridPlan plan = plan_grid(total, std::max(total, x.numel() * x.element_size()));
  if (plan.int32) {
    gather_nodes_kernel<vec_t, int32_t><<<plan.blocks, kThreads, 0, stream>>>(
        source, perm.const_data_ptr<int64_t>(), target, k, n, row_vectors, total);
  } else {
    gather_nodes_kernel<vec_t, int64_t><<<plan.blocks, kThreads, 0, stream>>>(
        source, perm.const_data_ptr<int64_t>(), target, k, n, row_vectors, total);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename vec_t>
void launch_gather_edges(const at::Tensor& e, const at::Tensor& perm, at::Tensor& out, int64_t cell_bytes) {
  const int64_t samples = perm.size(0) * perm.size(1), k = perm.size(1), n = perm.size(2);
  const int64_t cell_vectors = cell_bytes / static_cast<int64_t>(sizeof(vec_t));
  const int64_t row_blocks = (n + kEdgeRowsPerBlock - 1) / kEdgeRowsPerBlock;
  TORCH_CHECK(fits_int32(kEdgeRowsPerBlock * n * cell_vectors) && row_blocks < 65536,
              "permute_edges: rows of ", n, " x ", cell_bytes, " bytes are too large for the CUDA kernel");
  const int64_t row_items = n * cell_vectors;
  const int threads = static_cast<int>(std::min<int64_t>(
      kThreads, std::max<int64_t>(32, (kEdgeRowsPerBlock * row_items + 31) / 32 * 32)));
  const dim3 grid(static_cast<unsigned>(samples), static_cast<unsigned>(row_blocks));
  gather_edges_kernel<vec_t><<<grid, threads, n * sizeof(int), current_stream()>>>(
      static_cast<const vec_t*>(e.const_data_ptr()), perm.const_data_ptr<int64_t>(),
      static_cast<vec_t*>(out.mutable_data_ptr()), static_cast<int>(k), static_cast<int>(n),
      static_cast<int>(cell_vectors));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs launch<vec_t> for the vector width in bytes.
#define LPS_FAST_DISPATCH_WIDTH(width, launch, ...) \
  switch (width) {                                  \
    case 16: launch<int4>(__VA_ARGS__); break;      \
    case 8: launch<int2>(__VA_ARGS__); break;       \
    case 4: launch<int32_t>(__VA_ARGS__); break;    \
    case 2: launch<int16_t>(__VA_ARGS__); break;    \
    default: launch<int8_t>(__VA_ARGS__); break;    \
  }

// ---- registered entry points ---------------------------------------------------------------

at::Tensor permute_nodes_cuda(const at::Tensor& x_in, const at::Tensor& perm_in,
                              const c10::optional<at::Tensor>& soft) {
  check_permute_nodes_args(x_in, perm_in, soft);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), perm = perm_in.contiguous();
  at::Tensor out = at::empty(sampled_shape(x, perm.size(1)), x.options());
  if (out.numel() == 0) return out;
  const int64_t row_bytes = feature_size(x, 2) * x.element_size();
  const int64_t width = vector_width(x.const_data_ptr(), out.const_data_ptr(), row_bytes);
  LPS_FAST_DISPATCH_WIDTH(width, launch_gather_nodes, x, perm, out, row_bytes);
  return out;
}

at::Tensor permute_edges_cuda(const at::Tensor& e_in, const at::Tensor& perm_in,
                              const c10::optional<at::Tensor>& soft) {
  check_permute_edges_args(e_in, perm_in, soft);
  const c10::cuda::CUDAGuard guard(e_in.device());
  const at::Tensor e = e_in.contiguous(), perm = perm_in.contiguous();
  at::Tensor out = at::empty(sampled_shape(e, perm.size(1)), e.options());
  if (out.numel() == 0) return out;
  const int64_t cell_bytes = feature_size(e, 3) * e.element_size();
  const int64_t width = vector_width(e.const_data_ptr(), out.const_data_ptr(), cell_bytes);
  LPS_FAST_DISPATCH_WIDTH(width, launch_gather_edges, e, perm, out, cell_bytes);
  return out;
}

at::Tensor unpermute_mean_cuda(const at::Tensor& y_in, const at::Tensor& perm_in,
                               const c10::optional<at::Tensor>& soft) {
  check_unpermute_args(y_in, perm_in, soft, /*edges=*/false);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = y_in.contiguous(), perm = perm_in.contiguous();
  const int64_t batch = y.size(0), k = y.size(1), n = y.size(2), features = feature_size(y, 3);
  at::Tensor out = at::empty(averaged_shape(y), y.options());
  if (out.numel() == 0) return out;
  const at::Tensor inverse = inverse_permutation(perm);
  const int64_t total = out.numel();
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "unpermute_mean_cuda", [&] {
    const GridPlan plan = plan_grid(total, y.numel());
    if (plan.int32) {
      scatter_mean_nodes_kernel<scalar_t, int32_t><<<plan.blocks, kThreads, 0, stream>>>(
          y.const_data_ptr<scalar_t>(), inverse.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), k, n,
          features, total);
    } else {
      scatter_mean_nodes_kernel<scalar_t, int64_t><<<plan.blocks, kThreads, 0, stream>>>(
          y.const_data_ptr<scalar_t>(), inverse.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), k, n,
          features, total);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor unpermute_edges_mean_cuda(const at::Tensor& y_in, const at::Tensor& perm_in,
                                     const c10::optional<at::Tensor>& soft, bool diagonal) {
  check_unpermute_args(y_in, perm_in, soft, /*edges=*/true);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = y_in.contiguous(), perm = perm_in.contiguous();
  const int64_t batch = y.size(0), k = y.size(1), n = y.size(2), features = feature_size(y, 4);
  at::Tensor out = at::empty(averaged_edge_shape(y, diagonal), y.options());
  if (out.numel() == 0) return out;
  const at::Tensor inverse = inverse_permutation(perm);
  const int64_t total = out.numel();
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "unpermute_edges_mean_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t row_bytes = n * features * static_cast<int64_t>(sizeof(acc_t));
    const scalar_t* source = y.const_data_ptr<scalar_t>();
    const int64_t* positions = inverse.const_data_ptr<int64_t>();
    scalar_t* target = out.mutable_data_ptr<scalar_t>();
    if (!diagonal && row_bytes <= kMaxAccumulatorBytes) {
      const int threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, (n * features + 31) / 32 * 32)));
      scatter_mean_edge_rows_kernel<scalar_t><<<batch * n, threads, row_bytes, stream>>>(
          source, perm.const_data_ptr<int64_t>(), positions, target, static_cast<int>(k), static_cast<int>(n),
          static_cast<int>(features));
    } else if (const GridPlan plan = plan_grid(total, y.numel()); plan.int32) {
      if (diagonal) {
        scatter_mean_edges_kernel<scalar_t, int32_t, true><<<plan.blocks, kThreads, 0, stream>>>(
            source, positions, target, k, n, features, total);
      } else {
        scatter_mean_edges_kernel<scalar_t, int32_t, false><<<plan.blocks, kThreads, 0, stream>>>(
            source, positions, target, k, n, features, total);
      }
    } else {
      if (diagonal) {
        scatter_mean_edges_kernel<scalar_t, int64_t, true><<<plan.blocks, kThreads, 0, stream>>>(
            source, positions, target, k, n, features, total);
      } else {
        scatter_mean_edges_kernel<scalar_t, int64_t, false><<<plan.blocks, kThreads, 0, stream>>>(
            source, positions, target, k, n, features, total);
      }
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(lps_fast, CUDA, m) {
  m.impl("permute_nodes", &cuda::permute_nodes_cuda);
  m.impl("permute_edges", &cuda::permute_edges_cuda);
  m.impl("unpermute_mean", &cuda::unpermute_mean_cuda);
  m.impl("unpermute_edges_mean", &cuda::unpermute_edges_mean_cuda);
}

}  // namespace lps_fast
