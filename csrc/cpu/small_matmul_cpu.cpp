// CPU kernels of small_matmul: products of many rows with a small weight, the shapes of the
// vector-neuron network's layers ((6000, 21) @ (21, 84) for one n-body batch). BLAS runs these at
// under half this core's FMA peak: it packs both operands and scales the output before every
// call, work that a weight of a few kilobytes does not repay. Here the weight stays in L1 as it
// is, each output tile lives in registers for the whole reduction, and the rows are read once.
//
// small_matmul: tiles of RB rows x V vectors of columns (up to 3 vectors, 48 float columns, per
// panel of columns); per k, V loads of the weight row and RB broadcasts of x feed RB * V FMAs.
// small_matmul_tn (x^T @ g): tiles of KB output rows (x's columns) x V vectors of g's columns,
// accumulated over chunks of rows that stay in L2 while every tile passes over them. Each output
// element is summed by one thread in row order, so results do not depend on the thread count.
// Without AVX-512 both fall back to ATen's matmul.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include "cpu/small_matmul_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <vector>

#if defined(__AVX512F__)
#include "cpu/vector512.h"
#endif

namespace lps_fast {
namespace cpu {
namespace {

// The rows of x (..., K): the product of its leading sizes.
int64_t row_count(const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return rows;
}

#if defined(__AVX512F__)
// The rows of x (..., K) as a matrix with a uniform row stride and unit column stride, copying
// only where its layout has no such stride.
struct Rows {
  at::Tensor storage;
  int64_t count = 0, width = 0, stride = 0;
};

Rows rows_of(const at::Tensor& x) {
  Rows rows;
  rows.width = x.size(-1);
  rows.count = row_count(x);
  // the leading dims (size-1 ones aside) must step whole rows: each stride = the next one's span
  bool uniform = x.stride(-1) == 1 || rows.width <= 1;
  int64_t stride = -1, span = 0;
  for (int64_t d = x.dim() - 2; uniform && d >= 0; --d) {
    if (x.size(d) == 1) continue;
    if (stride < 0) {
      stride = x.stride(d);
    } else {
      uniform = x.stride(d) == span;
    }
    span = x.stride(d) * x.size(d);
  }
  rows.storage = uniform ? x : x.contiguous();
  rows.stride = uniform && stride >= 0 ? stride : rows.width;
  return rows;
}

// Columns of a panel, in vectors: up to 18 accumulators (6 rows x 3 vectors). Wider tiles
// (4 rows x 6 vectors) ran (6000, 21) @ (21, 84) 10% slower than two panels of 3 vectors.
constexpr int kMaxVectors = 3;

template <int V>
constexpr int row_tile() { return V <= 2 ? 8 : 6; }

// Vector v of a panel row of V vectors: whole, or the `tail` lanes of the last one.
template <typename T, int V>
inline typename Vector512<T>::Vec load_panel(const T* row, int v, typename Vector512<T>::Mask tail) {
  using W = Vector512<T>;
  return v == V - 1 ? W::load(tail, row + v * W::kLanes) : W::load(row + v * W::kLanes);
}
template <typename T, int V>
inline void store_panel(T* row, int v, typename Vector512<T>::Mask tail, typename Vector512<T>::Vec x) {
  using W = Vector512<T>;
  if (v == V - 1) {
    W::store(tail, row + v * W::kLanes, x);
  } else {
    W::store(row + v * W::kLanes, x);
  }
}

// C[0:RB, panel] = A[0:RB, :] @ B[:, panel]; the panel's last vector holds `tail` lanes.
template <typename T, int V, int RB>
inline void nn_tile(const T* A, int64_t lda, const T* B, int64_t ldb, int64_t K, T* C, int64_t ldc,
                    typename Vector512<T>::Mask tail) {
  using W = Vector512<T>;
  typename W::Vec acc[RB][V];
  // GCC keeps these arrays in registers only when the loops are unrolled before scalar
  // replacement (else it stores every accumulator to the stack on every k: 3x slower)
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[r][v] = W::zero();
  for (int64_t k = 0; k < K; ++k) {
    typename W::Vec b[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) b[v] = load_panel<T, V>(B + k * ldb, v, tail);
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      const auto a = W::broadcast(A[r * lda + k]);
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[r][v] = W::fma(a, b[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) store_panel<T, V>(C + r * ldc, v, tail, acc[r][v]);
}

template <typename T, int V>
void nn_panel(const T* A, int64_t lda, int64_t R, int64_t K, const T* B, int64_t ldb, int64_t width, T* C,
              int64_t ldc) {
  constexpr int RB = row_tile<V>();
  const auto tail = Vector512<T>::first(width - (V - 1) * Vector512<T>::kLanes);
  const int64_t tiles = R / RB;
  at::parallel_for(0, tiles, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, RB * K * V * Vector512<T>::kLanes)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t t = begin; t < end; ++t)
                       nn_tile<T, V, RB>(A + t * RB * lda, lda, B, ldb, K, C + t * RB * ldc, ldc, tail);
                   });
  for (int64_t r = tiles * RB; r < R; ++r) nn_tile<T, V, 1>(A + r * lda, lda, B, ldb, K, C + r * ldc, ldc, tail);
}

// C[k0:k0+KB, panel] (+)= A[r0:r1, k0:k0+KB]^T @ G[r0:r1, panel]; `first`: C starts from zero.
// The chunk's rows are summed from zero and then added to C: two short sums instead of one over
// every row, whose rounding error grows with its length (float32 at 6000 rows: 8x BLAS's).
template <typename T, int V, int KB>
inline void tn_tile(const T* A, int64_t lda, const T* G, int64_t ldg, int64_t r0, int64_t r1, T* C, int64_t ldc,
                    typename Vector512<T>::Mask tail, bool first) {
  using W = Vector512<T>;
  typename W::Vec acc[KB][V];
#pragma GCC unroll 8
  for (int k = 0; k < KB; ++k)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[k][v] = W::zero();
  for (int64_t r = r0; r < r1; ++r) {
    typename W::Vec g[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) g[v] = load_panel<T, V>(G + r * ldg, v, tail);
#pragma GCC unroll 8
    for (int k = 0; k < KB; ++k) {
      const auto a = W::broadcast(A[r * lda + k]);
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[k][v] = W::fma(a, g[v], acc[k][v]);
    }
  }
#pragma GCC unroll 8
  for (int k = 0; k < KB; ++k)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v)
      store_panel<T, V>(C + k * ldc, v, tail, first ? acc[k][v] : W::add(load_panel<T, V>(C + k * ldc, v, tail), acc[k][v]));
}

template <typename T, int V>
void tn_panel(const T* A, int64_t lda, int64_t R, int64_t K, const T* G, int64_t ldg, int64_t width, T* C,
              int64_t ldc) {
  constexpr int KB = row_tile<V>();
  const auto tail = Vector512<T>::first(width - (V - 1) * Vector512<T>::kLanes);
  // rows per chunk: the chunk's rows of x and g stay in L2 while every tile passes over them
  const int64_t chunk = std::max<int64_t>(64, (128 * 1024 / static_cast<int64_t>(sizeof(T))) /
                                                  std::max<int64_t>(1, K + V * Vector512<T>::kLanes));
  const int64_t tiles = (K + KB - 1) / KB;
  for (int64_t r0 = 0; r0 < R; r0 += chunk) {
    const int64_t r1 = std::min(R, r0 + chunk);
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t k0 = t * KB;
        if (k0 + KB <= K) {
          tn_tile<T, V, KB>(A + k0, lda, G, ldg, r0, r1, C + k0 * ldc, ldc, tail, r0 == 0);
        } else {
          for (int64_t k = k0; k < K; ++k) tn_tile<T, V, 1>(A + k, lda, G, ldg, r0, r1, C + k * ldc, ldc, tail, r0 == 0);
        }
      }
    });
  }
}

// Runs panel<T, V>(..., panel offset, panel width) over the column panels of M.
template <typename T, typename Panel>
void over_panels(int64_t M, Panel&& panel) {
  constexpr int64_t kPanel = kMaxVectors * Vector512<T>::kLanes;
  for (int64_t j0 = 0; j0 < M; j0 += kPanel) panel(j0, std::min(kPanel, M - j0));
}

template <typename T, template <typename, int> class Kernel, typename... Args>
void dispatch_vectors(int64_t width, Args&&... args) {
  switch ((width + Vector512<T>::kLanes - 1) / Vector512<T>::kLanes) {
    case 1: return Kernel<T, 1>::run(args...);
    case 2: return Kernel<T, 2>::run(args...);
    default: return Kernel<T, 3>::run(args...);
  }
}

template <typename T, int V>
struct NN {
  static void run(const T* A, int64_t lda, int64_t R, int64_t K, const T* B, int64_t ldb, int64_t width, T* C,
                  int64_t ldc) {
    nn_panel<T, V>(A, lda, R, K, B, ldb, width, C, ldc);
  }
};
template <typename T, int V>
struct TN {
  static void run(const T* A, int64_t lda, int64_t R, int64_t K, const T* G, int64_t ldg, int64_t width, T* C,
                  int64_t ldc) {
    tn_panel<T, V>(A, lda, R, K, G, ldg, width, C, ldc);
  }
};

std::vector<int64_t> with_last(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = last;
  return shape;
}
#endif

}  // namespace

at::Tensor small_matmul(const at::Tensor& x, const at::Tensor& w) {
#if defined(__AVX512F__)
  const int64_t K = w.size(0), M = w.size(1);
  const Rows a = rows_of(x);
  at::Tensor out = at::empty(with_last(x, M), x.options());
  if (a.count == 0 || M == 0) return out;
  if (K == 0) return out.zero_();
  const at::Tensor b = w.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "small_matmul", [&] {
    const scalar_t* A = a.storage.const_data_ptr<scalar_t>();
    const scalar_t* B = b.const_data_ptr<scalar_t>();
    scalar_t* C = out.mutable_data_ptr<scalar_t>();
    over_panels<scalar_t>(M, [&](int64_t j0, int64_t width) {
      dispatch_vectors<scalar_t, NN>(width, A, a.stride, a.count, K, B + j0, M, width, C + j0, M);
    });
  });
  return out;
#else
  // BLAS's rounding may depend on the operands' layouts: dense copies keep the values independent
  // of them, as they are above
  return at::matmul(x.contiguous(), w.contiguous());
#endif
}

at::Tensor small_matmul_tn(const at::Tensor& x, const at::Tensor& g) {
  const int64_t K = x.size(-1), M = g.size(-1);
  const int64_t rows = row_count(x);
  TORCH_CHECK_VALUE(rows == row_count(g), "small_matmul_tn: x and g must have as many rows, got ", rows, " and ",
                    row_count(g));
#if defined(__AVX512F__)
  const Rows a = rows_of(x), b = rows_of(g);
  at::Tensor out = at::empty({K, M}, x.options());
  if (K == 0 || M == 0) return out;
  if (a.count == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "small_matmul_tn", [&] {
    const scalar_t* A = a.storage.const_data_ptr<scalar_t>();
    const scalar_t* G = b.storage.const_data_ptr<scalar_t>();
    scalar_t* C = out.mutable_data_ptr<scalar_t>();
    over_panels<scalar_t>(M, [&](int64_t j0, int64_t width) {
      dispatch_vectors<scalar_t, TN>(width, A, a.stride, a.count, K, G + j0, b.stride, width, C + j0, M);
    });
  });
  return out;
#else
  return at::mm(x.reshape({rows, K}).t(), g.reshape({rows, M}));
#endif
}

}  // namespace cpu
}  // namespace lps_fast
