// CPU kernels of the distribution side of S_n: sinkhorn_sort (forward and backward) and
// permutation_entropy (forward and backward). docs/SPEC.md ("Distribution-side ops") defines
// them; docs/DESIGN.md derives the dual-potential form used here.
//
// One (b, j) matrix per parallel item. The Sinkhorn iterates are L0 - U[i] - V[r], so the
// kernel keeps the m x m cost matrix L0 (m real nodes) and the two potential vectors in cache,
// and never stores an n x n iterate; the backward pass recomputes the potentials of every
// iteration (2 * n_iter * m numbers) instead of keeping 2 * n_iter dense matrices alive.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include "cpu/sinkhorn_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/math.h"

namespace lps_fast {
namespace cpu {
namespace {

constexpr double kNormEps = 1e-12;
constexpr double kMaskedNormEps = 1e-6;
constexpr double kEntropyClamp = 1e-12;
constexpr double kLogFloor = -100.0;

// Normalized scores, their descending order and the compact real-node layout of one matrix.
template <typename acc_t>
struct SortedScores {
  std::vector<acc_t> normalized;      // s_hat by node, padded nodes 0      [n]
  std::vector<int64_t> order;         // node at each position (the perm)  [n]
  std::vector<int64_t> real_nodes;    // real nodes in index order: the rows of L0  [m]
  std::vector<acc_t> node_score;      // s_hat[real_nodes[ii]]             [m]
  std::vector<acc_t> position_score;  // s_hat[order[r]], r < m            [m]
  acc_t norm = 0;
  acc_t eps = 0;
  int64_t m = 0;

  template <typename scalar_t>
  void compute(const scalar_t* scores, const bool* mask, int64_t n) {
    normalized.resize(n);
    order.resize(n);
    real_nodes.clear();
    acc_t squares = 0;
    for (int64_t i = 0; i < n; ++i) {
      const bool real = mask == nullptr || mask[i];
      const acc_t value = real ? static_cast<acc_t>(scores[i]) : acc_t(0);
      normalized[i] = value;
      squares += value * value;
      if (real) real_nodes.push_back(i);
    }
    m = static_cast<int64_t>(real_nodes.size());
    norm = std::sqrt(squares);
    eps = static_cast<acc_t>(mask == nullptr ? kNormEps : kMaskedNormEps);
    const acc_t denominator = std::max(norm, eps);
    for (int64_t i = 0; i < n; ++i) normalized[i] /= denominator;

    // Descending, stable (ties and padded nodes in index order); NaN sorts first, as in torch.
    std::iota(order.begin(), order.end(), int64_t(0));
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      const bool real_a = mask == nullptr || mask[a], real_b = mask == nullptr || mask[b];
      if (real_a != real_b) return real_a;
      if (!real_a) return false;
      const acc_t sa = normalized[a], sb = normalized[b];
      const bool nan_a = std::isnan(sa), nan_b = std::isnan(sb);
      if (nan_a || nan_b) return nan_a && !nan_b;
      return sa > sb;
    });
    node_score.resize(m);
    position_score.resize(m);
    for (int64_t ii = 0; ii < m; ++ii) {
      node_score[ii] = normalized[real_nodes[ii]];
      position_score[ii] = normalized[order[ii]];
    }
  }

  // L0[ii, r] = -|s_hat[node ii] - s_hat_sorted[r]| / tau over the real block.
  void cost(acc_t tau, std::vector<acc_t>& L0) const {
    L0.resize(m * m);
    const acc_t inverse_tau = acc_t(1) / tau;
    for (int64_t ii = 0; ii < m; ++ii) {
      const acc_t s = node_score[ii];
      acc_t* row = L0.data() + ii * m;
      for (int64_t r = 0; r < m; ++r) row[r] = -std::abs(s - position_score[r]) * inverse_tau;
    }
  }
};

// U[ii] = logsumexp_r (L0[ii, r] - V[r])
template <typename acc_t>
void row_potentials(const acc_t* L0, int64_t m, const acc_t* V, acc_t* U) {
  for (int64_t ii = 0; ii < m; ++ii) {
    const acc_t* row = L0 + ii * m;
    acc_t peak = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : peak)
    for (int64_t r = 0; r < m; ++r) peak = std::max(peak, row[r] - V[r]);
    acc_t total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t r = 0; r < m; ++r) total += fast_exp(row[r] - V[r] - peak);
    U[ii] = peak + std::log(total);
  }
}

// V[r] = logsumexp_ii (L0[ii, r] - U[ii]); rows outer so the inner loop runs along memory.
template <typename acc_t>
void column_potentials(const acc_t* L0, int64_t m, const acc_t* U, acc_t* V, acc_t* peak, acc_t* total) {
  std::fill(peak, peak + m, -std::numeric_limits<acc_t>::infinity());
  std::fill(total, total + m, acc_t(0));
  for (int64_t ii = 0; ii < m; ++ii) {
    const acc_t* row = L0 + ii * m;
    const acc_t u = U[ii];
    for (int64_t r = 0; r < m; ++r) peak[r] = std::max(peak[r], row[r] - u);
  }
  for (int64_t ii = 0; ii < m; ++ii) {
    const acc_t* row = L0 + ii * m;
    const acc_t u = U[ii];
    for (int64_t r = 0; r < m; ++r) total[r] += fast_exp(row[r] - u - peak[r]);
  }
  for (int64_t r = 0; r < m; ++r) V[r] = peak[r] + std::log(total[r]);
}

// Calls f(std::integral_constant<int, m>) for blocks of 2 to 8 real nodes and with 0 (size
// known at run time only) otherwise, so that the loops over tiny blocks unroll.
template <typename F>
decltype(auto) with_fixed_size(int64_t m, F&& f) {
  switch (m) {
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

// Largest spread of L0 = -|s - t| / tau for which the kernel iterates in the linear domain:
// exp(L0) then stays far above the smallest normal number, so K = exp(L0) loses nothing and
// each iteration is two matrix-vector products instead of 2 m^2 exponentials.
template <typename acc_t>
constexpr acc_t kLinearSpread = sizeof(acc_t) == 4 ? acc_t(60) : acc_t(600);

// The iterates of one matrix, in one of two equivalent forms:
//   linear: entry(t) = K[ii, r] * row[ii] * column[r], with K = exp(L0), row = exp(-U), column = exp(-V)
//   log:    entry(t) = exp(L0[ii, r] - row[ii] - column[r]), with row = U, column = V
// The linear form is exact whenever exp(L0) cannot underflow; otherwise (small tau and a wide
// spread of scores) the kernel keeps the potentials in the log domain, as the reference does.
template <typename acc_t>
struct SinkhornWorkspace {
  SortedScores<acc_t> sorted;
  std::vector<acc_t> L0, K, KT, row, column, peak, total;
  std::vector<acc_t> history_row, history_column;  // backward: the potentials of every iteration
  bool linear = true;

  void prepare(acc_t tau) {
    sorted.cost(tau, L0);
    const int64_t m = sorted.m;
    // min L0 = -(largest - smallest score) / tau; the sorted scores give both ends.
    const acc_t spread = m > 0 ? (sorted.position_score[0] - sorted.position_score[m - 1]) / tau : acc_t(0);
    linear = spread <= kLinearSpread<acc_t>;
    if (linear) {
      K.resize(m * m);
#pragma omp simd
      for (int64_t e = 0; e < m * m; ++e) K[e] = fast_exp(L0[e]);
    }
  }

  // n_iter iterations; with `keep_history`, history_row[t] and history_column[t] hold iteration t + 1.
  void iterate(int64_t n_iter, bool keep_history) {
    if (linear && iterate_linear(n_iter, keep_history)) return;
    linear = false;
    iterate_log(n_iter, keep_history);
  }

  // u_t = 1 / (K v_{t-1}), v_t = 1 / (K^T u_t), v_0 = 1. False if a scaling left the float
  // range (only possible near the spread limit): the caller then iterates in the log domain.
  bool iterate_linear(int64_t n_iter, bool keep_history) {
    const int64_t m = sorted.m;
    // K^T as well, so that both half-steps sweep rows of a matrix (see linear_iterations).
    KT.resize(m * m);
    for (int64_t ii = 0; ii < m; ++ii) {
      for (int64_t r = 0; r < m; ++r) KT[r * m + ii] = K[ii * m + r];
    }
    row.assign(m, acc_t(1));
    column.assign(m, acc_t(1));
    total.resize(m);
    if (keep_history) {
      history_row.resize(n_iter * m);
      history_column.resize(n_iter * m);
    }
    acc_t* rows_out = keep_history ? history_row.data() : nullptr;
    acc_t* columns_out = keep_history ? history_column.data() : nullptr;
    // Small matrices get their size at compile time: the sweeps unroll into registers.
    return with_fixed_size(m, [&](auto fixed) {
      return linear_iterations<decltype(fixed)::value>(m, n_iter, K.data(), KT.data(), row.data(), column.data(),
                                                       total.data(), rows_out, columns_out);
    });
  }

  // The linear iterations as axpy sweeps along the rows of K and K^T: no per-row dot products,
  // whose vector reductions cost more than the rows themselves when m is small. Not inlined, so
  // that the restrict qualifiers hold and the sweeps vectorize.
  template <int FIXED_M>
  static LPS_FAST_NOINLINE bool linear_iterations(int64_t runtime_m, int64_t n_iter, const acc_t* __restrict__ K,
                                                  const acc_t* __restrict__ KT, acc_t* __restrict__ row,
                                                  acc_t* __restrict__ column, acc_t* __restrict__ total,
                                                  acc_t* __restrict__ history_row,
                                                  acc_t* __restrict__ history_column) {
    const int64_t m = FIXED_M > 0 ? FIXED_M : runtime_m;
    int finite = 1;
    for (int64_t t = 0; t < n_iter; ++t) {
      // row = 1 / (K column): total[ii] = sum_r K^T[r, ii] column[r]
      std::fill(total, total + m, acc_t(0));
      for (int64_t r = 0; r < m; ++r) {
        const acc_t* kt_row = KT + r * m;
        const acc_t c = column[r];
        for (int64_t ii = 0; ii < m; ++ii) total[ii] += kt_row[ii] * c;
      }
      for (int64_t ii = 0; ii < m; ++ii) row[ii] = acc_t(1) / total[ii];
      // column = 1 / (K^T row): total[r] = sum_ii K[ii, r] row[ii]
      std::fill(total, total + m, acc_t(0));
      for (int64_t ii = 0; ii < m; ++ii) {
        const acc_t* k_row = K + ii * m;
        const acc_t u = row[ii];
        for (int64_t r = 0; r < m; ++r) total[r] += k_row[r] * u;
      }
      for (int64_t r = 0; r < m; ++r) column[r] = acc_t(1) / total[r];
      for (int64_t e = 0; e < m; ++e) {
        finite &= (row[e] > 0) & (row[e] <= std::numeric_limits<acc_t>::max()) & (column[e] > 0) &
                  (column[e] <= std::numeric_limits<acc_t>::max());
      }
      if (history_row != nullptr) {
        std::copy(row, row + m, history_row + t * m);
        std::copy(column, column + m, history_column + t * m);
      }
    }
    return finite != 0;
  }

  void iterate_log(int64_t n_iter, bool keep_history) {
    const int64_t m = sorted.m;
    row.assign(m, acc_t(0));
    column.assign(m, acc_t(0));
    peak.resize(m);
    total.resize(m);
    if (keep_history) {
      history_row.resize(n_iter * m);
      history_column.resize(n_iter * m);
    }
    for (int64_t t = 0; t < n_iter; ++t) {
      row_potentials(L0.data(), m, column.data(), row.data());
      column_potentials(L0.data(), m, row.data(), column.data(), peak.data(), total.data());
      if (keep_history) {
        std::copy(row.begin(), row.end(), history_row.begin() + t * m);
        std::copy(column.begin(), column.end(), history_column.begin() + t * m);
      }
    }
  }

  // Potentials before the first iteration: v_0 = 1 (linear) or V_0 = 0 (log).
  acc_t initial_column() const { return linear ? acc_t(1) : acc_t(0); }
};

// Entry (ii, r) of an iterate from its row and column potentials (see SinkhornWorkspace).
template <bool LINEAR, typename acc_t>
inline acc_t iterate_entry(const acc_t* k_row, const acc_t* l0_row, int64_t r, acc_t row_value, acc_t column_value) {
  if constexpr (LINEAR) {
    return k_row[r] * row_value * column_value;
  } else {
    return fast_exp(l0_row[r] - row_value - column_value);
  }
}

template <bool LINEAR, typename scalar_t, typename acc_t>
void write_soft(const SinkhornWorkspace<acc_t>& work, scalar_t* out, int64_t n) {
  const int64_t m = work.sorted.m;
  std::fill(out, out + n * n, scalar_t(0));
  for (int64_t ii = 0; ii < m; ++ii) {
    const acc_t* k_row = LINEAR ? work.K.data() + ii * m : nullptr;
    const acc_t* l0_row = work.L0.data() + ii * m;
    const acc_t u = work.row[ii];
    const acc_t* __restrict__ column = work.column.data();
    scalar_t* __restrict__ out_row = out + work.sorted.real_nodes[ii] * n;
#pragma omp simd
    for (int64_t r = 0; r < m; ++r) {
      out_row[r] = static_cast<scalar_t>(iterate_entry<LINEAR>(k_row, l0_row, r, u, column[r]));
    }
  }
}

// Matrices per parallel chunk: one for large matrices, more for tiny ones, so that a batch of
// small problems does not pay a thread hand-off per matrix.
int64_t matrices_per_chunk(int64_t n, int64_t passes) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(n * n * passes, 1));
}

template <typename scalar_t>
void sinkhorn_forward_kernel(const at::Tensor& scores, double tau, int64_t n_iter, const bool* mask_data,
                             at::Tensor& soft, at::Tensor& perm) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = scores.size(0), k = scores.size(1), n = scores.size(2);
  const scalar_t* score_data = scores.const_data_ptr<scalar_t>();
  scalar_t* soft_data = soft.mutable_data_ptr<scalar_t>();
  int64_t* perm_data = perm.mutable_data_ptr<int64_t>();
  at::parallel_for(0, batch * k, matrices_per_chunk(n, n_iter + 1), [&](int64_t begin, int64_t end) {
    SinkhornWorkspace<acc_t> work;
    for (int64_t matrix = begin; matrix < end; ++matrix) {
      const int64_t b = matrix / k;
      const bool* mask = mask_data == nullptr ? nullptr : mask_data + b * n;
      work.sorted.compute(score_data + matrix * n, mask, n);
      std::copy(work.sorted.order.begin(), work.sorted.order.end(), perm_data + matrix * n);
      work.prepare(static_cast<acc_t>(tau));
      work.iterate(n_iter, /*keep_history=*/false);
      if (work.linear) {
        write_soft<true>(work, soft_data + matrix * n * n, n);
      } else {
        write_soft<false>(work, soft_data + matrix * n * n, n);
      }
    }
  });
}

// One row ii of a reverse step, with its weights w[r] = (d loss / d entry) * entry folded into
// the score adjoints on the fly: dL0/ds[ii] = -slope[r], dL0/dt[r] = +slope[r] with
// slope = sign(s[ii] - t[r]) / tau. Not inlined: gcc drops the restrict qualifiers of inlined
// parameters, and without them these loops stay scalar.
//   final step:  w = G[r] * entry,          row_sum += w, column_adjoint[r] -= w
//   column step: w = column_adjoint[r] * entry, row_sum += w
//   row step:    w = row_adjoint * entry,   next_column_adjoint[r] -= w
enum class ReverseStep { kFinal, kColumn, kRow };

constexpr int64_t kReduceLanes = 16;

// Sum of LANES partial sums by halves, each half a fixed-length loop that vectorizes.
template <int64_t LANES, typename acc_t>
inline acc_t fold_lanes(acc_t* partial) {
  if constexpr (LANES == 1) {
    return partial[0];
  } else {
#pragma omp simd
    for (int64_t lane = 0; lane < LANES / 2; ++lane) partial[lane] += partial[lane + LANES / 2];
    return fold_lanes<LANES / 2>(partial);
  }
}

#define LPS_FAST_REVERSE_ENTRY                                              \
  const acc_t entry = iterate_entry<LINEAR>(k_row, l0_row, r, u, column[r]); \
  acc_t w;                                                                 \
  if constexpr (STEP == ReverseStep::kFinal) {                             \
    w = static_cast<acc_t>(g_row[r]) * entry;                              \
    column_adjoint[r] -= w;                                                \
  } else if constexpr (STEP == ReverseStep::kColumn) {                     \
    w = column_adjoint[r] * entry;                                         \
  } else {                                                                 \
    w = row_adjoint * entry;                                               \
    column_adjoint[r] -= w;                                                \
  }                                                                        \
  sum += w;                                                                \
  const acc_t folded = slope[r] * w;                                       \
  node -= folded;                                                          \
  d_position[r] += folded;

template <ReverseStep STEP, bool LINEAR, int FIXED_M, typename acc_t, typename grad_t>
LPS_FAST_NOINLINE void reverse_row(int64_t runtime_m, const acc_t* __restrict__ k_row, const acc_t* __restrict__ l0_row,
                        const acc_t* __restrict__ slope, acc_t u, const acc_t* __restrict__ column,
                        const grad_t* __restrict__ g_row, acc_t row_adjoint,
                        acc_t* __restrict__ column_adjoint, acc_t* __restrict__ d_position, acc_t& row_sum,
                        acc_t& d_node) {
  const int64_t m = FIXED_M > 0 ? FIXED_M : runtime_m;
  acc_t sum = 0, node = 0;
  int64_t r = 0;
  if (FIXED_M == 0 && m >= kReduceLanes) {
    // Per-lane partial sums, folded by halves at the end: an omp simd reduction would end in one
    // sequential add per lane, which dominates rows of a few dozen entries.
    acc_t sums[kReduceLanes] = {}, nodes[kReduceLanes] = {};
    for (; r + kReduceLanes <= m; r += kReduceLanes) {
      const int64_t start = r;
#pragma omp simd
      for (int64_t lane = 0; lane < kReduceLanes; ++lane) {
        acc_t sum = 0, node = 0;
        {
          const int64_t r = start + lane;
          LPS_FAST_REVERSE_ENTRY
        }
        sums[lane] += sum;
        nodes[lane] += node;
      }
    }
    sum = fold_lanes<kReduceLanes>(sums);
    node = fold_lanes<kReduceLanes>(nodes);
  }
  for (; r < m; ++r) {
    LPS_FAST_REVERSE_ENTRY
  }
  row_sum += sum;
  d_node += node;
}

#undef LPS_FAST_REVERSE_ENTRY

// Reverse mode through the iterations of one matrix (docs/DESIGN.md), accumulating
// d loss / d s_hat[node ii] into d_node and d loss / d s_hat_sorted[r] into d_position.
template <bool LINEAR, typename scalar_t, typename acc_t>
struct SinkhornAdjoint {
  std::vector<acc_t> adjoint_row, adjoint_column, next_adjoint_column, d_node, d_position, slope, initial_column;

  void run_any(const SinkhornWorkspace<acc_t>& work, const scalar_t* G, int64_t n, int64_t n_iter,
               acc_t inverse_tau) {
    with_fixed_size(work.sorted.m, [&](auto fixed) { run<decltype(fixed)::value>(work, G, n, n_iter, inverse_tau); });
  }

  // FIXED_M > 0: the size of the real block, known at compile time (small matrices).
  template <int FIXED_M>
  void run(const SinkhornWorkspace<acc_t>& work, const scalar_t* G, int64_t n, int64_t n_iter, acc_t inverse_tau) {
    const SortedScores<acc_t>& sorted = work.sorted;
    const int64_t m = sorted.m;
    adjoint_row.assign(m, acc_t(0));
    adjoint_column.assign(m, acc_t(0));
    next_adjoint_column.resize(m);
    d_node.assign(m, acc_t(0));
    d_position.assign(m, acc_t(0));
    initial_column.assign(m, work.initial_column());
    // sign(s[ii] - t[r]) / tau, constant across iterations
    slope.resize(m * m);
    for (int64_t ii = 0; ii < m; ++ii) {
      const acc_t score = sorted.node_score[ii];
      acc_t* slope_row = slope.data() + ii * m;
      const acc_t* t = sorted.position_score.data();
#pragma omp simd
      for (int64_t r = 0; r < m; ++r) slope_row[r] = sign(score - t[r]) * inverse_tau;
    }
    auto k_row = [&](int64_t ii) { return LINEAR ? work.K.data() + ii * m : nullptr; };
    auto l0_row = [&](int64_t ii) { return work.L0.data() + ii * m; };
    auto slope_row = [&](int64_t ii) { return slope.data() + ii * m; };
    acc_t* a_column = adjoint_column.data();
    acc_t* a_next = next_adjoint_column.data();
    acc_t* d_pos = d_position.data();
    const scalar_t* no_grad = nullptr;

    // The output soft = entry(T): dL = G * soft.
    for (int64_t ii = 0; ii < m; ++ii) {
      reverse_row<ReverseStep::kFinal, LINEAR, FIXED_M>(m, k_row(ii), l0_row(ii), slope_row(ii), work.row[ii],
                                               work.column.data(), G + sorted.real_nodes[ii] * n,
                                               acc_t(0), a_column, d_pos, adjoint_row[ii], d_node[ii]);
      adjoint_row[ii] = -adjoint_row[ii];
    }
    for (int64_t step = n_iter - 1; step >= 0; --step) {
      const acc_t* row_t = work.history_row.data() + step * m;
      const acc_t* column_t = work.history_column.data() + step * m;
      const acc_t* column_before = step > 0 ? work.history_column.data() + (step - 1) * m : initial_column.data();
      // Column step: the column potentials normalize entry(row_t, column_t).
      for (int64_t ii = 0; ii < m; ++ii) {
        acc_t row_sum = 0;
        reverse_row<ReverseStep::kColumn, LINEAR, FIXED_M>(m, k_row(ii), l0_row(ii), slope_row(ii), row_t[ii], column_t,
                                                  no_grad, acc_t(0), a_column, d_pos, row_sum, d_node[ii]);
        adjoint_row[ii] -= row_sum;
      }
      // Row step: the row potentials normalize entry(row_t, column_{t-1}), column_0 initial.
      std::fill(a_next, a_next + m, acc_t(0));
      for (int64_t ii = 0; ii < m; ++ii) {
        acc_t unused = 0;
        reverse_row<ReverseStep::kRow, LINEAR, FIXED_M>(m, k_row(ii), l0_row(ii), slope_row(ii), row_t[ii], column_before,
                                               no_grad, adjoint_row[ii], a_next, d_pos, unused, d_node[ii]);
      }
      std::swap(a_column, a_next);
      std::fill(adjoint_row.begin(), adjoint_row.end(), acc_t(0));
    }
  }
};

template <typename scalar_t>
void sinkhorn_backward_kernel(const at::Tensor& grad_soft, const at::Tensor& scores, double tau, int64_t n_iter,
                              const bool* mask_data, at::Tensor& grad_scores) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = scores.size(0), k = scores.size(1), n = scores.size(2);
  const scalar_t* score_data = scores.const_data_ptr<scalar_t>();
  const scalar_t* grad_data = grad_soft.const_data_ptr<scalar_t>();
  scalar_t* out_data = grad_scores.mutable_data_ptr<scalar_t>();
  const acc_t inverse_tau = acc_t(1) / static_cast<acc_t>(tau);
  at::parallel_for(0, batch * k, matrices_per_chunk(n, 3 * (n_iter + 1)), [&](int64_t begin, int64_t end) {
    SinkhornWorkspace<acc_t> work;
    SinkhornAdjoint<true, scalar_t, acc_t> linear_adjoint;
    SinkhornAdjoint<false, scalar_t, acc_t> log_adjoint;
    std::vector<acc_t> d_normalized;
    for (int64_t matrix = begin; matrix < end; ++matrix) {
      const int64_t b = matrix / k;
      const bool* mask = mask_data == nullptr ? nullptr : mask_data + b * n;
      SortedScores<acc_t>& sorted = work.sorted;
      sorted.compute(score_data + matrix * n, mask, n);
      work.prepare(static_cast<acc_t>(tau));
      work.iterate(n_iter, /*keep_history=*/true);
      const scalar_t* G = grad_data + matrix * n * n;
      const std::vector<acc_t>* d_node;
      const std::vector<acc_t>* d_position;
      if (work.linear) {
        linear_adjoint.run_any(work, G, n, n_iter, inverse_tau);
        d_node = &linear_adjoint.d_node;
        d_position = &linear_adjoint.d_position;
      } else {
        log_adjoint.run_any(work, G, n, n_iter, inverse_tau);
        d_node = &log_adjoint.d_node;
        d_position = &log_adjoint.d_position;
      }

      // Back to s_hat by node, then through s_hat = s / max(||s||, eps).
      d_normalized.assign(n, acc_t(0));
      for (int64_t ii = 0; ii < sorted.m; ++ii) {
        d_normalized[sorted.real_nodes[ii]] += (*d_node)[ii];
        d_normalized[sorted.order[ii]] += (*d_position)[ii];
      }
      scalar_t* out = out_data + matrix * n;
      if (sorted.norm >= sorted.eps) {
        acc_t projection = 0;
        for (int64_t i = 0; i < n; ++i) projection += sorted.normalized[i] * d_normalized[i];
        for (int64_t i = 0; i < n; ++i) {
          const bool real = mask == nullptr || mask[i];
          out[i] = real ? static_cast<scalar_t>((d_normalized[i] - sorted.normalized[i] * projection) / sorted.norm)
                        : scalar_t(0);
        }
      } else {
        for (int64_t i = 0; i < n; ++i) {
          const bool real = mask == nullptr || mask[i];
          out[i] = real ? static_cast<scalar_t>(d_normalized[i] / sorted.eps) : scalar_t(0);
        }
      }
    }
  });
}

// ---- permutation entropy ---------------------------------------------------------------------

// One matrix gathered to its real m x m block: clamped entries a = max(S, 1e-12), where the
// clamp passes gradient, log a, and the reciprocal column and row sums with their logs. Since
// p = a / c[r] and q = a / w, log p = log a - log c[r] and log q = log a - log w: one log per
// entry instead of two.
template <typename acc_t>
struct EntropyBlock {
  std::vector<int64_t> real_nodes;
  // sums = [row sums, column sums] and log_sums their logs; log_row_sum and log_column_sum
  // point into log_sums
  std::vector<acc_t> clamped, log_clamped, active, inverse_column_sum, inverse_row_sum, sums, log_sums;
  const acc_t* log_row_sum = nullptr;
  const acc_t* log_column_sum = nullptr;
  int64_t m = 0;

  // The logs run over whole vectors: buffers are padded with ones (log 0) to a multiple of this,
  // so that tiny blocks (5 x 5 at n-body) pay no scalar remainder loop.
  static constexpr int64_t kLogLanes = 16;
  static int64_t padded(int64_t count) { return (count + kLogLanes - 1) / kLogLanes * kLogLanes; }

  template <typename scalar_t>
  void gather(const scalar_t* soft, const bool* mask, int64_t n) {
    real_nodes.clear();
    for (int64_t i = 0; i < n; ++i) {
      if (mask == nullptr || mask[i]) real_nodes.push_back(i);
    }
    m = static_cast<int64_t>(real_nodes.size());
    clamped.assign(padded(m * m), acc_t(1));
    log_clamped.resize(padded(m * m));
    active.resize(m * m);
    inverse_row_sum.resize(m);
    inverse_column_sum.resize(m);
    sums.assign(padded(2 * m), acc_t(1));
    log_sums.resize(padded(2 * m));
    if (m == n) {
      clamp_entries(m * m, soft, clamped.data(), active.data());
    } else {
      for (int64_t ii = 0; ii < m; ++ii) {
        const scalar_t* source = soft + real_nodes[ii] * n;
        acc_t* a = clamped.data() + ii * m;
        for (int64_t rr = 0; rr < m; ++rr) a[rr] = static_cast<acc_t>(source[real_nodes[rr]]);
      }
      clamp_entries(m * m, clamped.data(), clamped.data(), active.data());
    }
    log_entries(padded(m * m), clamped.data(), log_clamped.data());
    // the sums first, then their logs in one vector loop, then their reciprocals
    acc_t* row_sum = sums.data();
    acc_t* column_sum = sums.data() + m;
    std::fill(column_sum, column_sum + m, acc_t(0));
    for (int64_t ii = 0; ii < m; ++ii) row_sum[ii] = add_row(m, clamped.data() + ii * m, column_sum);
    log_entries(padded(2 * m), sums.data(), log_sums.data());
    log_row_sum = log_sums.data();
    log_column_sum = log_sums.data() + m;
    for (int64_t e = 0; e < m; ++e) {
      inverse_row_sum[e] = acc_t(1) / row_sum[e];
      inverse_column_sum[e] = acc_t(1) / column_sum[e];
    }
  }

  // Hot loops as functions that are not inlined, so that the restrict qualifiers hold (gcc
  // drops them when it inlines) and the loops vectorize.
  template <typename scalar_t>
  static LPS_FAST_NOINLINE void clamp_entries(int64_t count, const scalar_t* source, acc_t* a, acc_t* __restrict__ passes) {
    const acc_t floor = static_cast<acc_t>(kEntropyClamp);
#pragma omp simd
    for (int64_t t = 0; t < count; ++t) {
      const acc_t value = static_cast<acc_t>(source[t]);
      a[t] = std::max(value, floor);
      passes[t] = value >= floor ? acc_t(1) : acc_t(0);
    }
  }

  static LPS_FAST_NOINLINE void log_entries(int64_t count, const acc_t* __restrict__ a, acc_t* __restrict__ out) {
#pragma omp simd
    for (int64_t t = 0; t < count; ++t) out[t] = fast_log(a[t]);
  }

  // Adds one row to the column sums and returns the row's sum.
  static LPS_FAST_NOINLINE acc_t add_row(int64_t m, const acc_t* __restrict__ a, acc_t* __restrict__ column_sum) {
    acc_t row_sum = 0;
#pragma omp simd reduction(+ : row_sum)
    for (int64_t rr = 0; rr < m; ++rr) {
      row_sum += a[rr];
      column_sum[rr] += a[rr];
    }
    return row_sum;
  }
};

// result += sum over r in [0, m) of the `sum` that the statements ... add for index r: rows of
// at least kReduceLanes entries keep per-lane partial sums folded by halves (see reverse_row),
// shorter ones run as a plain loop.
#define LPS_FAST_ROW_SUM(m, result, ...)                                   \
  do {                                                                     \
    int64_t row_begin = 0;                                                 \
    if ((m) >= kReduceLanes) {                                             \
      acc_t partial[kReduceLanes] = {};                                    \
      for (; row_begin + kReduceLanes <= (m); row_begin += kReduceLanes) { \
        _Pragma("omp simd") for (int64_t lane = 0; lane < kReduceLanes; ++lane) { \
          const int64_t rr = row_begin + lane;                             \
          acc_t sum = 0;                                                   \
          __VA_ARGS__                                                      \
          partial[lane] += sum;                                            \
        }                                                                  \
      }                                                                    \
      result += fold_lanes<kReduceLanes>(partial);                         \
    }                                                                      \
    for (int64_t rr = row_begin; rr < (m); ++rr) {                         \
      acc_t sum = 0;                                                       \
      __VA_ARGS__                                                          \
      result += sum;                                                       \
    }                                                                      \
  } while (false)

// -sum_r [p l(p) + q l(q)] over one row, p = a / c[r], q = a / w, l(x) = max(log x, -100).
template <typename acc_t>
LPS_FAST_NOINLINE acc_t entropy_row(int64_t m, const acc_t* __restrict__ a, const acc_t* __restrict__ log_a,
                                    const acc_t* __restrict__ inverse_c, const acc_t* __restrict__ log_c,
                                    acc_t inverse_w, acc_t log_w) {
  const acc_t floor = static_cast<acc_t>(kLogFloor);
  acc_t total = 0;
  LPS_FAST_ROW_SUM(m, total, {
    const acc_t p = a[rr] * inverse_c[rr], q = a[rr] * inverse_w;
    sum -= p * std::max(log_a[rr] - log_c[rr], floor) + q * std::max(log_a[rr] - log_w, floor);
  });
  return total;
}

// slope(x) = d(-x l(x))/dx = -(l(x) + [log x >= -100]) of one row's p and q entries; adds
// slope(p) p to column_total[r] and returns sum_r slope(q) q.
template <typename acc_t>
LPS_FAST_NOINLINE acc_t entropy_slopes_row(int64_t m, const acc_t* __restrict__ a, const acc_t* __restrict__ log_a,
                                           const acc_t* __restrict__ inverse_c, const acc_t* __restrict__ log_c,
                                           acc_t inverse_w, acc_t log_w, acc_t* __restrict__ p_slope,
                                           acc_t* __restrict__ q_slope, acc_t* __restrict__ column_total) {
  const acc_t floor = static_cast<acc_t>(kLogFloor);
  acc_t row_total = 0;
  LPS_FAST_ROW_SUM(m, row_total, {
    const acc_t p = a[rr] * inverse_c[rr], q = a[rr] * inverse_w;
    const acc_t log_p = log_a[rr] - log_c[rr], log_q = log_a[rr] - log_w;
    const acc_t slope_p = -(std::max(log_p, floor) + (log_p >= floor ? acc_t(1) : acc_t(0)));
    const acc_t slope_q = -(std::max(log_q, floor) + (log_q >= floor ? acc_t(1) : acc_t(0)));
    p_slope[rr] = slope_p;
    q_slope[rr] = slope_q;
    column_total[rr] += slope_p * p;
    sum += slope_q * q;
  });
  return row_total;
}

#undef LPS_FAST_ROW_SUM

// d entropy / d S over one row, before the scatter back to node indices.
template <typename acc_t>
LPS_FAST_NOINLINE void entropy_gradient_row(int64_t m, const acc_t* __restrict__ passes, const acc_t* __restrict__ p_slope,
                                 const acc_t* __restrict__ q_slope, const acc_t* __restrict__ column_mean,
                                 const acc_t* __restrict__ inverse_c, acc_t row_mean, acc_t inverse_w, acc_t scale,
                                 acc_t* __restrict__ out) {
#pragma omp simd
  for (int64_t rr = 0; rr < m; ++rr) {
    const acc_t value = (p_slope[rr] - column_mean[rr]) * inverse_c[rr] + (q_slope[rr] - row_mean) * inverse_w;
    out[rr] = scale * passes[rr] * value;
  }
}

// Entropy of one gathered block (all its rows).
template <typename acc_t>
acc_t block_entropy(const EntropyBlock<acc_t>& block) {
  const int64_t m = block.m;
  acc_t total = 0;
  for (int64_t ii = 0; ii < m; ++ii) {
    total += entropy_row(m, block.clamped.data() + ii * m, block.log_clamped.data() + ii * m,
                         block.inverse_column_sum.data(), block.log_column_sum, block.inverse_row_sum[ii],
                         block.log_row_sum[ii]);
  }
  return total;
}

template <typename scalar_t>
void entropy_forward_kernel(const at::Tensor& soft, const bool* mask_data, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = soft.size(0), k = soft.size(1), n = soft.size(2);
  const scalar_t* soft_data = soft.const_data_ptr<scalar_t>();
  std::vector<double> per_matrix(batch * k, 0.0);
  at::parallel_for(0, batch * k, matrices_per_chunk(n, 2), [&](int64_t begin, int64_t end) {
    EntropyBlock<acc_t> block;
    for (int64_t matrix = begin; matrix < end; ++matrix) {
      const int64_t b = matrix / k;
      block.gather(soft_data + matrix * n * n, mask_data == nullptr ? nullptr : mask_data + b * n, n);
      per_matrix[matrix] = static_cast<double>(block_entropy(block));
    }
  });
  double result = 0;
  for (int64_t b = 0; b < batch; ++b) {
    int64_t n_real = n;
    if (mask_data != nullptr) n_real = std::count(mask_data + b * n, mask_data + (b + 1) * n, true);
    double graph = 0;
    for (int64_t j = 0; j < k; ++j) graph += per_matrix[b * k + j];
    if (k > 0) result += graph / (static_cast<double>(k) * std::max<int64_t>(n_real, 1));
  }
  // No graphs (or no samples) carry no entropy: 0, so adding it to a loss changes nothing.
  out.fill_(batch > 0 ? result / batch : 0.0);
}

template <typename scalar_t>
void entropy_backward_kernel(const at::Tensor& grad, const at::Tensor& soft, const bool* mask_data,
                             at::Tensor& grad_soft) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = soft.size(0), k = soft.size(1), n = soft.size(2);
  const scalar_t* soft_data = soft.const_data_ptr<scalar_t>();
  scalar_t* out_data = grad_soft.mutable_data_ptr<scalar_t>();
  const acc_t upstream = grad.item<acc_t>();
  at::parallel_for(0, batch * k, matrices_per_chunk(n, 4), [&](int64_t begin, int64_t end) {
    EntropyBlock<acc_t> block;
    // slope(x) = d(-x l(x))/dx = -(l(x) + [log x >= -100]) for the column (p) and row (q) entries
    std::vector<acc_t> column_slope, row_slope, column_mean, row_mean, weight;
    for (int64_t matrix = begin; matrix < end; ++matrix) {
      const int64_t b = matrix / k;
      const bool* mask = mask_data == nullptr ? nullptr : mask_data + b * n;
      block.gather(soft_data + matrix * n * n, mask, n);
      const int64_t m = block.m;
      const acc_t scale = upstream / (static_cast<acc_t>(batch) * k * std::max<int64_t>(m, 1));
      column_slope.resize(m * m);
      row_slope.resize(m * m);
      column_mean.assign(m, acc_t(0));  // sum_i slope(p[i, r]) p[i, r]
      row_mean.resize(m);                // sum_r slope(q[i, r]) q[i, r]
      weight.resize(m);
      for (int64_t ii = 0; ii < m; ++ii) {
        row_mean[ii] = entropy_slopes_row(m, block.clamped.data() + ii * m, block.log_clamped.data() + ii * m,
                                          block.inverse_column_sum.data(), block.log_column_sum,
                                          block.inverse_row_sum[ii], block.log_row_sum[ii],
                                          column_slope.data() + ii * m, row_slope.data() + ii * m,
                                          column_mean.data());
      }
      scalar_t* out = out_data + matrix * n * n;
      std::fill(out, out + n * n, scalar_t(0));
      const int64_t* nodes = block.real_nodes.data();
      for (int64_t ii = 0; ii < m; ++ii) {
        entropy_gradient_row(m, block.active.data() + ii * m, column_slope.data() + ii * m, row_slope.data() + ii * m,
                             column_mean.data(), block.inverse_column_sum.data(), row_mean[ii],
                             block.inverse_row_sum[ii], scale, weight.data());
        scalar_t* out_row = out + nodes[ii] * n;
        for (int64_t rr = 0; rr < m; ++rr) out_row[nodes[rr]] = static_cast<scalar_t>(weight[rr]);
      }
    }
  });
}

const bool* mask_pointer(const c10::optional<at::Tensor>& mask) {
  return mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sinkhorn_sort(const at::Tensor& scores, double tau, int64_t n_iter,
                                                 const c10::optional<at::Tensor>& mask) {
  const int64_t batch = scores.size(0), k = scores.size(1), n = scores.size(2);
  at::Tensor soft = at::empty({batch, k, n, n}, scores.options());
  at::Tensor perm = at::empty({batch, k, n}, scores.options().dtype(at::kLong));
  if (perm.numel() == 0) return {soft, perm};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "sinkhorn_sort_cpu", [&] {
    sinkhorn_forward_kernel<scalar_t>(scores, tau, n_iter, mask_pointer(mask), soft, perm);
  });
  return {soft, perm};
}

at::Tensor sinkhorn_sort_backward(const at::Tensor& grad_soft, const at::Tensor& scores, double tau,
                                  int64_t n_iter, const c10::optional<at::Tensor>& mask) {
  at::Tensor grad_scores = at::empty(scores.sizes(), scores.options());
  if (grad_scores.numel() == 0) return grad_scores;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "sinkhorn_sort_backward_cpu", [&] {
    sinkhorn_backward_kernel<scalar_t>(grad_soft, scores, tau, n_iter, mask_pointer(mask), grad_scores);
  });
  return grad_scores;
}

at::Tensor permutation_entropy(const at::Tensor& soft, const c10::optional<at::Tensor>& mask) {
  at::Tensor out = at::empty({}, soft.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, soft.scalar_type(), "permutation_entropy_cpu", [&] {
    entropy_forward_kernel<scalar_t>(soft, mask_pointer(mask), out);
  });
  return out;
}

at::Tensor permutation_entropy_backward(const at::Tensor& grad, const at::Tensor& soft,
                                        const c10::optional<at::Tensor>& mask) {
  at::Tensor grad_soft = at::empty(soft.sizes(), soft.options());
  if (grad_soft.numel() == 0) return grad_soft;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, soft.scalar_type(), "permutation_entropy_backward_cpu",
                                  [&] { entropy_backward_kernel<scalar_t>(grad, soft, mask_pointer(mask), grad_soft); });
  return grad_soft;
}

}  // namespace cpu
}  // namespace lps_fast
