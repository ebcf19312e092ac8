// CPU kernels of vn_score_head. Per node i of graph b, with F the node's frame (F[a][e]: component
// a of frame vector e) and the head's weights w (pooled part) and u (pair part), both stored
// (channel, frame vector):
//   coords[i][e][c] = sum_a F[a][e] x[i][a][c]          (invariant: x and F rotate together)
//   pooled[e][c]    = max over the real nodes of coords[.][e][c]   (0 for a graph without any)
//   score[i]        = sum_{a,e} F[a][e] sum_c pair[i][a][c] u[c][e]  +  sum_{e,c} pooled[e][c] w[c][e] + bias
// and 0 at padded nodes. The composed formulation materialises coords for every node as an
// (N, n, 3, 3, W) broadcast product and reduces it; here each node's coordinates live in a
// 3W-element buffer. The backward pass recomputes the coordinates and their max (so that it
// compares values computed by the same code, whatever the compiler contracts into FMAs) and
// shares the max's gradient equally between tied nodes, as amax does.
// Sums over graphs (the weight and bias gradients) are accumulated in double, in a fixed
// chunking of the batch, so results do not depend on the thread count.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include "cpu/vn_score_head_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace lps_fast {
namespace cpu {
namespace {

constexpr int64_t kMaxChunks = 64;

inline int64_t chunk_count(int64_t N) { return std::max<int64_t>(1, std::min<int64_t>(N, kMaxChunks)); }
inline int64_t chunk_begin(int64_t chunk, int64_t chunks, int64_t N) { return chunk * N / chunks; }

// A head weight block stored (channel, frame vector), c * 3 + e, as rows per frame vector, e * C + c,
// so that the loops over channels read it contiguously.
template <typename T>
std::vector<T> by_frame_vector(const T* w, int64_t C) {
  std::vector<T> out(3 * C);
  for (int64_t c = 0; c < C; ++c)
    for (int e = 0; e < 3; ++e) out[e * C + c] = w[c * 3 + e];
  return out;
}

// coords[e * W + c] = sum_a F[a * 3 + e] X[a * W + c]
template <typename T>
inline void frame_coordinates(const T* F, const T* X, int64_t W, T* coords) {
  for (int e = 0; e < 3; ++e) {
    const T f0 = F[e], f1 = F[3 + e], f2 = F[6 + e];
    T* out = coords + e * W;
    for (int64_t c = 0; c < W; ++c) out[c] = f0 * X[c] + f1 * X[W + c] + f2 * X[2 * W + c];
  }
}

// sum_c P[a * V + c] u[e * V + c] for every (a, e): the pair features through the head, 3 x 3.
template <typename T>
inline void pair_through_head(const T* P, const T* u, int64_t V, T* out) {
  for (int a = 0; a < 3; ++a)
    for (int e = 0; e < 3; ++e) {
      T sum = T(0);
      for (int64_t c = 0; c < V; ++c) sum += P[a * V + c] * u[e * V + c];
      out[a * 3 + e] = sum;
    }
}

// Per graph, the max over its real nodes of each coordinate (0 for a graph without any).
template <typename T>
inline void pool_graph(const T* coords_of_nodes, const bool* valid_row, int64_t n, int64_t W, T* best) {
  std::fill(best, best + 3 * W, -std::numeric_limits<T>::infinity());
  bool any = false;
  for (int64_t i = 0; i < n; ++i) {
    if (valid_row && !valid_row[i]) continue;
    any = true;
    const T* own = coords_of_nodes + i * 3 * W;
    for (int64_t j = 0; j < 3 * W; ++j) best[j] = (own[j] > best[j] || own[j] != own[j]) ? own[j] : best[j];
  }
  if (!any) std::fill(best, best + 3 * W, T(0));
}

}  // namespace

at::Tensor vn_score_head(const at::Tensor& x, const at::Tensor& frame, const at::Tensor& pair,
                         const c10::optional<at::Tensor>& mask, const at::Tensor& weight, const at::Tensor& bias) {
  const int64_t N = x.size(0), n = x.size(1), W = x.size(3), V = pair.size(3);
  at::Tensor scores = at::empty({N, n}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vn_score_head_cpu", [&] {
    using T = scalar_t;
    const T* xs = x.const_data_ptr<T>();
    const T* fs = frame.const_data_ptr<T>();
    const T* ps = pair.const_data_ptr<T>();
    const bool* valid = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
    const T* w = weight.const_data_ptr<T>();
    const std::vector<T> w_pooled = by_frame_vector(w, W), w_pair = by_frame_vector(w + 3 * W, V);
    const T b0 = bias.const_data_ptr<T>()[0];
    T* out = scores.mutable_data_ptr<T>();
    at::parallel_for(0, N, std::max<int64_t>(1, 2048 / (n * 3 * (W + V) + 1)), [&](int64_t begin, int64_t end) {
      std::vector<T> coords(n * 3 * W), best(3 * W);
      T through[9];
      for (int64_t b = begin; b < end; ++b) {
        const bool* valid_row = valid ? valid + b * n : nullptr;
        for (int64_t i = 0; i < n; ++i) {
          const int64_t row = b * n + i;
          if (valid_row && !valid_row[i]) continue;
          const T* F = fs + row * 9;
          frame_coordinates(F, xs + row * 3 * W, W, coords.data() + i * 3 * W);
          pair_through_head(ps + row * 3 * V, w_pair.data(), V, through);
          T pair_term = T(0);
          for (int j = 0; j < 9; ++j) pair_term += through[j] * F[j];
          out[row] = pair_term;
        }
        pool_graph(coords.data(), valid_row, n, W, best.data());
        T global = T(0);
        for (int64_t j = 0; j < 3 * W; ++j) global += best[j] * w_pooled[j];
        for (int64_t i = 0; i < n; ++i) {
          const int64_t row = b * n + i;
          out[row] = (valid_row && !valid_row[i]) ? T(0) : out[row] + global + b0;
        }
      }
    });
  });
  return scores;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> vn_score_head_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& frame, const at::Tensor& pair,
    const c10::optional<at::Tensor>& mask, const at::Tensor& weight) {
  const int64_t N = x.size(0), n = x.size(1), W = x.size(3), V = pair.size(3);
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_frame = at::empty(frame.sizes(), frame.options());
  at::Tensor grad_pair = at::empty(pair.sizes(), pair.options());
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  at::Tensor grad_bias = at::empty({1}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vn_score_head_backward_cpu", [&] {
    using T = scalar_t;
    const T* g = grad.const_data_ptr<T>();
    const T* xs = x.const_data_ptr<T>();
    const T* fs = frame.const_data_ptr<T>();
    const T* ps = pair.const_data_ptr<T>();
    const bool* valid = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
    const T* w = weight.const_data_ptr<T>();
    const std::vector<T> w_pooled = by_frame_vector(w, W), w_pair = by_frame_vector(w + 3 * W, V);
    T* gx_out = grad_x.mutable_data_ptr<T>();
    T* gf_out = grad_frame.mutable_data_ptr<T>();
    T* gp_out = grad_pair.mutable_data_ptr<T>();

    // Per chunk: [bias, pooled weights (e, c), pair weights (e, c)]
    const int64_t chunks = chunk_count(N), width = 1 + 3 * W + 3 * V;
    std::vector<double> partial(chunks * width, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> coords(n * 3 * W), best(3 * W), share(3 * W), count(3 * W), g_coords(3 * W);
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        double* acc = partial.data() + chunk * width;
        double* acc_pooled = acc + 1;
        double* acc_pair = acc_pooled + 3 * W;
        for (int64_t b = chunk_begin(chunk, chunks, N); b < chunk_begin(chunk + 1, chunks, N); ++b) {
          const bool* valid_row = valid ? valid + b * n : nullptr;
          for (int64_t i = 0; i < n; ++i) {
            const int64_t row = b * n + i;
            if (!valid_row || valid_row[i]) frame_coordinates(fs + row * 9, xs + row * 3 * W, W, coords.data() + i * 3 * W);
          }
          pool_graph(coords.data(), valid_row, n, W, best.data());
          T total = T(0);  // the pooled term reaches every real node's score
          for (int64_t i = 0; i < n; ++i)
            if (!valid_row || valid_row[i]) total += g[b * n + i];
          acc[0] += total;
          for (int64_t j = 0; j < 3 * W; ++j) acc_pooled[j] += static_cast<double>(total) * best[j];
          // the max's gradient, shared between the nodes that reach it
          std::fill(count.begin(), count.end(), T(0));
          for (int64_t i = 0; i < n; ++i) {
            if (valid_row && !valid_row[i]) continue;
            const T* own = coords.data() + i * 3 * W;
            for (int64_t j = 0; j < 3 * W; ++j) count[j] += own[j] == best[j] ? T(1) : T(0);
          }
          for (int64_t j = 0; j < 3 * W; ++j) share[j] = count[j] > 0 ? total * w_pooled[j] / count[j] : T(0);
          for (int64_t i = 0; i < n; ++i) {
            const int64_t row = b * n + i;
            T* gX = gx_out + row * 3 * W;
            T* gF = gf_out + row * 9;
            T* gP = gp_out + row * 3 * V;
            if (valid && !valid[row]) {
              std::fill(gX, gX + 3 * W, T(0));
              std::fill(gF, gF + 9, T(0));
              std::fill(gP, gP + 3 * V, T(0));
              continue;
            }
            const T gi = g[row];
            const T* own = coords.data() + i * 3 * W;
            const T* F = fs + row * 9;
            const T* X = xs + row * 3 * W;
            const T* P = ps + row * 3 * V;
            for (int64_t j = 0; j < 3 * W; ++j) g_coords[j] = own[j] == best[j] ? share[j] : T(0);
            // x: sum_e F[a][e] g_coords[e][c]
            for (int a = 0; a < 3; ++a) {
              const T f0 = F[a * 3], f1 = F[a * 3 + 1], f2 = F[a * 3 + 2];
              for (int64_t c = 0; c < W; ++c)
                gX[a * W + c] = f0 * g_coords[c] + f1 * g_coords[W + c] + f2 * g_coords[2 * W + c];
            }
            // frame: through the coordinates and through the pair term
            T through[9];
            pair_through_head(P, w_pair.data(), V, through);
            for (int a = 0; a < 3; ++a)
              for (int e = 0; e < 3; ++e) {
                T sum = T(0);
                for (int64_t c = 0; c < W; ++c) sum += X[a * W + c] * g_coords[e * W + c];
                gF[a * 3 + e] = sum + gi * through[a * 3 + e];
              }
            // pair: gi * sum_e F[a][e] u[e][c]; pair weights: gi * sum_a P[a][c] F[a][e]
            for (int a = 0; a < 3; ++a) {
              const T f0 = gi * F[a * 3], f1 = gi * F[a * 3 + 1], f2 = gi * F[a * 3 + 2];
              for (int64_t c = 0; c < V; ++c)
                gP[a * V + c] = f0 * w_pair[c] + f1 * w_pair[V + c] + f2 * w_pair[2 * V + c];
            }
            for (int e = 0; e < 3; ++e) {
              const T f0 = gi * F[e], f1 = gi * F[3 + e], f2 = gi * F[6 + e];
              double* dst = acc_pair + e * V;
              for (int64_t c = 0; c < V; ++c) dst[c] += static_cast<double>(f0 * P[c] + f1 * P[V + c] + f2 * P[2 * V + c]);
            }
          }
        }
      }
    });
    std::vector<double> sum(width, 0.0);
    for (int64_t chunk = 0; chunk < chunks; ++chunk)
      for (int64_t j = 0; j < width; ++j) sum[j] += partial[chunk * width + j];
    T* gw = grad_weight.mutable_data_ptr<T>();
    for (int64_t c = 0; c < W; ++c)
      for (int e = 0; e < 3; ++e) gw[c * 3 + e] = static_cast<T>(sum[1 + e * W + c]);
    for (int64_t c = 0; c < V; ++c)
      for (int e = 0; e < 3; ++e) gw[3 * W + c * 3 + e] = static_cast<T>(sum[1 + 3 * W + e * V + c]);
    grad_bias.mutable_data_ptr<T>()[0] = static_cast<T>(sum[0]);
  });
  return {grad_x, grad_frame, grad_pair, grad_weight, grad_bias};
}

}  // namespace cpu
}  // namespace lps_fast
