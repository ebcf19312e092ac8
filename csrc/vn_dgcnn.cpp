// The whole vector-neuron DGCNN (lps_fast.nn.VNDGCNN) as one CPU op: forward and a hand-written
// backward, each one call from Python. Layer by layer the network is about forty PyTorch ops
// forward and more backward, each with its Python, dispatch and autograd bookkeeping; at the
// n-body size (400 samples of 5 particles) that glue cost as much as the layers' kernels. Here the
// same steps run in C++: the kernels of vn_layer, vn_score_head and vn_matmul (the layers' matrix
// products), a few ATen ops, with the values each backward step needs kept from the forward.
//
// Every step mirrors the layer-by-layer module (nn.py) op for op, so that the two agree to
// rounding: the kNN graph, the weight stacking of the edge convolutions, the running-statistics
// update and the frame pool are the same ATen calls; the tests compare both, forward and every
// parameter gradient, in train and eval mode, with and without padding.
//
// Parameters, in this order (the module's; see VNDGCNN._whole_network_params):
//   conv1: linear, direction, norm weight, norm bias, pool direction      (0-4)
//   conv2: the same                                                        (5-9)
//   frame_pool direction, frame_head                                       (10, 11)
//   with scores: conv3 (linear, direction, norm weight, bias)              (12-15)
//                std1 (the same), std2 (the same)                          (16-19, 20-23)
//                std_frame, score_head weight, score_head bias             (24, 25, 26)
// running: (mean, var) of conv1, conv2[, conv3, std1, std2], updated in place in training mode.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/small_matmul_cpu.h"
#include "cpu/vn_layer_cpu.h"
#include "cpu/vn_score_head_cpu.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#if defined(__AVX512F__)
#include "cpu/vector512.h"
#endif

namespace lps_fast {
namespace {

struct Settings {
  int64_t neighbours;
  double slope, eps, momentum;
  bool training;
  int64_t real_nodes = 0;  // nodes the mask keeps (all without one): the batch statistics' count
};

c10::optional<at::Tensor> opt(const at::Tensor& t) { return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt; }

// knn_neighbours of nn.py where the fused kernels serve (there through the lps_fast::vn_knn op,
// so both paths run this code): per node the k nearest nodes by the squared distance of the
// flattened features, the node itself first, padded nodes never neighbours (their slots repeat the
// node), equal distances in node order. Each distance is sum_f (x_i[f] - x_j[f])^2, formed once per
// pair over rows zero-padded to whole 64-byte blocks, one partial sum per lane added up in lane
// order: the same values on both paths, so they choose the same neighbours even among exact
// ties. (|x_i|^2 + |x_j|^2 - 2 x_i.x_j in ATen was six calls, a batched product of n x n matrices
// among them, and most of the kNN's time.) The selection is a loop per node.
at::Tensor knn(const at::Tensor& v, int64_t k, const at::Tensor& mask) {
  const int64_t N = v.size(0), n = v.size(1);
  int64_t F = 1;
  for (int64_t d = 2; d < v.dim(); ++d) F *= v.size(d);
  const at::Tensor flat = v.reshape({N, n, F}).contiguous();
  k = std::min(k, n);
  at::Tensor index = at::empty({N, n, k}, v.options().dtype(at::kLong));
  const bool* valid = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(flat.scalar_type(), "vn_dgcnn_knn", [&] {
    using T = scalar_t;
    typedef T Lanes __attribute__((vector_size(64)));
    constexpr int64_t L = 64 / sizeof(T);
    const int64_t Fp = (F + L - 1) / L * L;
    const T* all = flat.const_data_ptr<T>();
    int64_t* out = index.mutable_data_ptr<int64_t>();
    constexpr T inf = std::numeric_limits<T>::infinity();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> rows(n * Fp, T(0)), distances(n * n), nearest(k);
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t i = 0; i < n; ++i) std::copy(all + (b * n + i) * F, all + (b * n + i + 1) * F, &rows[i * Fp]);
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = i + 1; j < n; ++j) {
            Lanes sum = {};
            for (int64_t f = 0; f < Fp; f += L) {
              Lanes a, c;
              std::memcpy(&a, &rows[i * Fp + f], sizeof(a));
              std::memcpy(&c, &rows[j * Fp + f], sizeof(c));
              const Lanes d = a - c;
              sum += d * d;
            }
            T total = sum[0];
            for (int64_t l = 1; l < L; ++l) total += sum[l];
            distances[i * n + j] = distances[j * n + i] = total;
          }
        for (int64_t i = 0; i < n; ++i) {
          const T* from_i = &distances[i * n];
          int64_t* row = out + (b * n + i) * k;
          int64_t found = 0;  // row[0:found] sorted by (distance, index)
          for (int64_t j = 0; j < n; ++j) {
            T distance = from_i[j];
            if (valid && !valid[b * n + j]) distance = inf;
            if (j == i) distance = -inf;
            if (found == k && !(distance < nearest[k - 1])) continue;
            int64_t slot = found < k ? found++ : k - 1;
            for (; slot > 0 && distance < nearest[slot - 1]; --slot) {
              nearest[slot] = nearest[slot - 1];
              row[slot] = row[slot - 1];
            }
            nearest[slot] = distance;
            row[slot] = j;
          }
          if (valid)
            for (int64_t slot = 0; slot < k; ++slot)
              if (nearest[slot] == inf) row[slot] = i;
        }
      }
    });
  });
  return index;
}

// The op the layered network's knn_neighbours calls on CPU where the fused kernels serve.
at::Tensor vn_knn_cpu(const at::Tensor& v, int64_t k, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK_VALUE(v.dim() >= 2, "v must have shape (N, n, ...), got ", v.sizes());
  TORCH_CHECK_TYPE(v.scalar_type() == at::kFloat || v.scalar_type() == at::kDouble, "v must be float32 or float64, got ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(k >= 1, "k must be at least 1, got ", k);
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "mask must be bool, got ", mask->scalar_type());
    TORCH_CHECK_VALUE(mask->sizes() == v.sizes().slice(0, 2), "mask must have shape (N, n) = ", v.sizes().slice(0, 2),
                      ", got ", mask->sizes());
    check_same_device(v, "v", *mask, "mask");
  }
  return knn(v, k, mask.has_value() ? mask->contiguous() : at::Tensor());
}

// running.lerp_(target, weight) of ATen, where target[c] = value(c) in the statistics' dtype.
template <typename Value>
void lerp_towards(at::Tensor& running, int64_t C, double weight, Value value) {
  AT_DISPATCH_FLOATING_TYPES(running.scalar_type(), "vn_dgcnn_running_stats", [&] {
    scalar_t* r = running.mutable_data_ptr<scalar_t>();
    const scalar_t w = static_cast<scalar_t>(weight);
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t target = static_cast<scalar_t>(value(c));
      r[c] = weight < 0.5 ? r[c] + w * (target - r[c]) : target - (target - r[c]) * (scalar_t(1) - w);
    }
  });
}

// MaskedBatchNorm.update_running after a vn_layer call over `entries` entries per real node, as
// loops over the channels (as ATen calls, a count, a clamp, casts and two lerps: 0.1 ms per layer
// at the n-body size). The unbiased variance is formed in the statistics' dtype, as there.
void update_running(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& stats, int64_t real_nodes,
                    int64_t entries, double momentum) {
  const at::Tensor st = stats.contiguous();
  const int64_t C = st.size(1);
  AT_DISPATCH_FLOATING_TYPES(st.scalar_type(), "vn_dgcnn_running_stats", [&] {
    const scalar_t* mean = st.const_data_ptr<scalar_t>();
    const scalar_t* var = mean + C;
    const scalar_t count = static_cast<scalar_t>(real_nodes * entries);
    const scalar_t correction = count / std::max(count - scalar_t(1), scalar_t(1));
    lerp_towards(running_mean, C, momentum, [&](int64_t c) { return mean[c]; });
    lerp_towards(running_var, C, momentum, [&](int64_t c) { return var[c] * correction; });
  });
}

// The batch-norm arguments of vn_layer: none in training mode (batch statistics), else the running ones.
std::pair<c10::optional<at::Tensor>, c10::optional<at::Tensor>> running_args(const Settings& s, const at::Tensor& mean,
                                                                             const at::Tensor& var, at::ScalarType dtype) {
  if (s.training) return {c10::nullopt, c10::nullopt};
  return {mean.to(dtype), var.to(dtype)};
}

// ---- an edge convolution (VNDGCNN._edge_conv): kNN, one matmul over the nodes, vn_layer --------

struct EdgeSaved {
  at::Tensor neighbours, maps, selected, stats, stacked;
};

at::Tensor edge_forward(const at::Tensor& v, const at::Tensor& mask, const at::Tensor* params, at::Tensor& running_mean,
                        at::Tensor& running_var, const Settings& s, EdgeSaved& saved, const at::Tensor& into) {
  const at::Tensor &w = params[0], &wd = params[1], &gamma = params[2], &beta = params[3], &pool = params[4];
  const int64_t channels = v.size(-1), out = w.size(0), directions = wd.size(0);
  saved.neighbours = knn(v, s.neighbours, mask);
  const at::Tensor w_node = w.narrow(1, 0, channels), w_centre = w.narrow(1, channels, channels);
  const at::Tensor wd_node = wd.narrow(1, 0, channels), wd_centre = wd.narrow(1, channels, channels);
  // linear([v_j - v_i, v_i]) = W1 v_j + (W2 - W1) v_i: the four maps as one contiguous (in, out) matrix
  saved.stacked = at::cat({w_node.t(), (w_centre - w_node).t(), wd_node.t(), (wd_centre - wd_node).t()}, 1);
  saved.maps = cpu::small_matmul(v, saved.stacked);
  const auto parts = saved.maps.split_with_sizes({out, out, directions, directions}, -1);
  const auto [rm, rv] = running_args(s, running_mean, running_var, v.scalar_type());
  auto [result, selected, stats] = cpu::vn_layer(parts[0], parts[2], parts[1], parts[3], saved.neighbours, pool,
                                                 opt(mask), gamma, beta, rm, rv, s.eps, s.slope, opt(into));
  if (s.training)
    update_running(running_mean, running_var, stats, s.real_nodes, saved.neighbours.size(2), s.momentum);
  saved.selected = selected;
  saved.stats = stats;
  return result;
}

// Gradients of an edge convolution: {input (if asked), linear weight, direction weight, norm weight, norm bias}.
std::vector<at::Tensor> edge_backward(const at::Tensor& grad, const at::Tensor& v, const at::Tensor& mask,
                                      const at::Tensor* params, const Settings& s, const EdgeSaved& saved,
                                      bool input_grad) {
  const int64_t out = params[0].size(0), directions = params[1].size(0);
  const auto parts = saved.maps.split_with_sizes({out, out, directions, directions}, -1);
  // the kernel writes the four gradients into the column blocks of one buffer, the layout of maps
  const at::Tensor g_maps = at::empty(saved.maps.sizes(), saved.maps.options());
  auto [gp, gd, gpc, gdc, g_gamma, g_beta] =
      cpu::vn_layer_backward(grad.contiguous(), parts[0], parts[2], parts[1], parts[3], saved.neighbours,
                             saved.selected, opt(mask), params[2], params[3], saved.stats, s.training, s.eps, s.slope,
                             g_maps);
  const at::Tensor g_stacked = cpu::small_matmul_tn(v, g_maps);
  const auto blocks = g_stacked.split_with_sizes({out, out, directions, directions}, 1);
  // stacked = [W1^T, (W2 - W1)^T, D1^T, (D2 - D1)^T]
  at::Tensor g_w = at::cat({(blocks[0] - blocks[1]).t(), blocks[1].t()}, 1);
  at::Tensor g_wd = at::cat({(blocks[2] - blocks[3]).t(), blocks[3].t()}, 1);
  at::Tensor g_v = input_grad ? cpu::small_matmul(g_maps, saved.stacked.t()) : at::Tensor();
  return {g_v, g_w, g_wd, g_gamma, g_beta};
}

// ---- a per-node VNLinearLeakyReLU: one matmul for the map and its directions, vn_layer ---------

struct NodeSaved {
  at::Tensor maps, stats, stacked;
};

at::Tensor node_forward(const at::Tensor& v, const at::Tensor& flat_mask, const at::Tensor* params,
                        at::Tensor& running_mean, at::Tensor& running_var, const Settings& s, NodeSaved& saved,
                        const at::Tensor& into = at::Tensor()) {
  const at::Tensor &w = params[0], &wd = params[1];
  const int64_t out = w.size(0), directions = wd.size(0);
  const at::Tensor rows = v.reshape({-1, 1, 3, v.size(-1)});
  saved.stacked = at::cat({w.t(), wd.t()}, 1);
  saved.maps = cpu::small_matmul(rows, saved.stacked);
  const auto parts = saved.maps.split_with_sizes({out, directions}, -1);
  const auto [rm, rv] = running_args(s, running_mean, running_var, v.scalar_type());
  auto [result, selected, stats] = cpu::vn_layer(parts[0], parts[1], c10::nullopt, c10::nullopt, c10::nullopt,
                                                 c10::nullopt, opt(flat_mask), params[2], params[3], rm, rv, s.eps,
                                                 s.slope, into.defined() ? opt(into.view({-1, 1, 3, out})) : c10::nullopt);
  if (s.training) update_running(running_mean, running_var, stats, s.real_nodes, 1, s.momentum);
  saved.stats = stats;
  if (into.defined()) return into;
  std::vector<int64_t> shape(v.sizes().begin(), v.sizes().end());
  shape.back() = out;
  return result.reshape(shape);
}

// Gradients of a per-node layer: {input, linear weight, direction weight, norm weight, norm bias}.
std::vector<at::Tensor> node_backward(const at::Tensor& grad, const at::Tensor& v, const at::Tensor& flat_mask,
                                      const at::Tensor* params, const Settings& s, const NodeSaved& saved) {
  const int64_t out = params[0].size(0), directions = params[1].size(0);
  const auto parts = saved.maps.split_with_sizes({out, directions}, -1);
  const at::Tensor empty = at::empty({0}, v.options().dtype(at::kLong));
  const at::Tensor g_maps = at::empty(saved.maps.sizes(), saved.maps.options());  // [gp | gd], as maps
  auto [gp, gd, gpc, gdc, g_gamma, g_beta] = cpu::vn_layer_backward(
      grad.reshape({-1, 1, 3, out}).contiguous(), parts[0], parts[1], c10::nullopt, c10::nullopt, c10::nullopt, empty,
      opt(flat_mask), params[2], params[3], saved.stats, s.training, s.eps, s.slope, g_maps);
  const at::Tensor g_stacked = cpu::small_matmul_tn(v, g_maps);
  at::Tensor g_w = g_stacked.narrow(1, 0, out).t(), g_wd = g_stacked.narrow(1, out, directions).t();
  at::Tensor g_v = cpu::small_matmul(g_maps, saved.stacked.t()).reshape(v.sizes());
  return {g_v, g_w.contiguous(), g_wd.contiguous(), g_gamma, g_beta};
}

// ---- the frame: a max-pool over the nodes of the first layer's features, mapped to 3 vectors ---

// VNMaxPool(dim=1): per channel, the node whose vector has the largest projection on direction @ v
// (the first of equal maxima, as argmax; padded nodes never, unless the graph has none: then 0),
// and the vectors it keeps: {index (N, C), pooled (N, 3, C)}. The scores are the values of the
// expression VNMaxPool evaluates where the fused kernels serve, (v * vn_matmul(v, direction^T)).sum(-2):
// the network's own matrix product (whose rows do not depend on the operand's row stride, so x1
// is read in place), then per channel (v_0 l_0 + v_1 l_1) + v_2 l_2 with every product rounded (no
// FMA), so that both paths agree even among exact ties. The rest is one loop per graph (as ATen
// ops, the scores' product and sum, a transposed copy, argmax and gather cost as much as the
// layer's matrix product). Contraction is off by pragma, not by a function attribute: the score
// loop sits in lambdas (the dispatch's and parallel_for's), which gcc compiles as functions of
// their own that do not inherit the attribute.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
std::pair<at::Tensor, at::Tensor> frame_pool(const at::Tensor& x, const at::Tensor& direction, const at::Tensor& mask) {
  const int64_t N = x.size(0), n = x.size(1), C = x.size(3);
  // x1 is read in place where it is a column block of [x1, x2] (rows of C at a uniform stride R)
  const bool rows = x.stride(3) == 1 && x.stride(1) == 3 * x.stride(2) && x.stride(0) == n * x.stride(1);
  const at::Tensor dense = rows ? x : x.contiguous();
  const int64_t R = dense.stride(2);
  const at::Tensor projected = cpu::small_matmul(dense, direction.t());  // [N, n, 3, C]
  at::Tensor index = at::empty({N, C}, x.options().dtype(at::kLong));
  at::Tensor pooled = at::empty({N, 3, C}, x.options());
  const bool* valid = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vn_dgcnn_frame_pool", [&] {
    const scalar_t* v = dense.const_data_ptr<scalar_t>();
    const scalar_t* l = projected.const_data_ptr<scalar_t>();
    int64_t* chosen = index.mutable_data_ptr<int64_t>();
    scalar_t* kept = pooled.mutable_data_ptr<scalar_t>();
#if defined(__AVX512F__)
    // Per block of channels, the score's argmax and the kept node's three components in registers,
    // taken by blends as the nodes are scanned (the node index rides as a float, exact below 2^24).
    if (n < (int64_t(1) << 24)) {
      using W = cpu::Vector512<scalar_t>;
      constexpr int L = W::kLanes;
      at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
        scalar_t node_of[L];
        for (int64_t b = begin; b < end; ++b) {
          const scalar_t* graph = v + b * n * 3 * R;
          const scalar_t* graph_l = l + b * n * 3 * C;
          for (int64_t c = 0; c < C; c += L) {
            const auto lanes = W::first(C - c);
            auto best = W::broadcast(-std::numeric_limits<scalar_t>::infinity()), which = W::zero();
            auto k0 = W::load(lanes, graph + c), k1 = W::load(lanes, graph + R + c), k2 = W::load(lanes, graph + 2 * R + c);
            for (int64_t i = 0; i < n; ++i) {
              if (valid && !valid[b * n + i]) continue;
              const scalar_t* vi = graph + i * 3 * R + c;
              const scalar_t* li = graph_l + i * 3 * C + c;
              const auto v0 = W::load(lanes, vi), v1 = W::load(lanes, vi + R), v2 = W::load(lanes, vi + 2 * R);
              // (v0 l0 + v1 l1) + v2 l2, each product rounded, as the loop below
              const auto score = W::add(W::add(W::mul(v0, W::load(lanes, li)), W::mul(v1, W::load(lanes, li + C))),
                                        W::mul(v2, W::load(lanes, li + 2 * C)));
              const auto better = W::greater(score, best);
              best = W::blend(better, best, score);
              which = W::blend(better, which, W::broadcast(scalar_t(i)));
              k0 = W::blend(better, k0, v0);
              k1 = W::blend(better, k1, v1);
              k2 = W::blend(better, k2, v2);
            }
            scalar_t* out = kept + b * 3 * C + c;
            W::store(lanes, out, k0);
            W::store(lanes, out + C, k1);
            W::store(lanes, out + 2 * C, k2);
            W::store(node_of, which);
            for (int64_t j = 0; j < std::min<int64_t>(L, C - c); ++j) chosen[b * C + c + j] = static_cast<int64_t>(node_of[j]);
          }
        }
      });
      return;
    }
#endif
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> best(C);
      for (int64_t b = begin; b < end; ++b) {
        int64_t* which = chosen + b * C;
        std::fill(best.begin(), best.end(), -std::numeric_limits<scalar_t>::infinity());
        std::fill(which, which + C, int64_t(0));
        for (int64_t i = 0; i < n; ++i) {
          if (valid && !valid[b * n + i]) continue;
          const scalar_t* vi = v + (b * n + i) * 3 * R;
          const scalar_t* li = l + (b * n + i) * 3 * C;
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t score = (vi[c] * li[c] + vi[R + c] * li[C + c]) + vi[2 * R + c] * li[2 * C + c];
            const bool better = score > best[c];
            best[c] = better ? score : best[c];
            which[c] = better ? i : which[c];
          }
        }
        for (int a = 0; a < 3; ++a)
          for (int64_t c = 0; c < C; ++c) kept[(b * 3 + a) * C + c] = v[(b * n + which[c]) * 3 * R + a * R + c];
      }
    });
  });
  return {index, pooled};
}
#pragma GCC pop_options

// The frame pool's backward: a zero (N, n, 3, C) gradient of x1 holding, per graph and channel,
// the pooled vectors' gradient at the node the pool kept (a scatter-add into zeros as ATen calls
// was a fill, an index expansion and a strided scatter: 0.1 ms; one write per channel here).
at::Tensor frame_pool_backward(const at::Tensor& g_pooled, const at::Tensor& index, int64_t n) {
  const int64_t N = g_pooled.size(0), C = g_pooled.size(2);
  at::Tensor g_x1 = at::zeros({N, n, 3, C}, g_pooled.options());
  AT_DISPATCH_FLOATING_TYPES(g_pooled.scalar_type(), "vn_dgcnn_frame_pool_backward", [&] {
    const scalar_t* from = g_pooled.const_data_ptr<scalar_t>();  // (N, 3, C), contiguous
    const int64_t* kept = index.const_data_ptr<int64_t>();  // (N, C), checked to lie in [0, n)
    scalar_t* to = g_x1.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        for (int a = 0; a < 3; ++a)
          for (int64_t c = 0; c < C; ++c) to[((b * n + kept[b * C + c]) * 3 + a) * C + c] = from[(b * 3 + a) * C + c];
    });
  });
  return g_x1;
}

// ---- the glue between the layers, as loops ------------------------------------------------
// Each of these was a few ATen calls on (N, n, 3, C) tensors, some of them strided: a sum over
// the nodes, a broadcast, a product, an add, each a pass with its own dispatch (0.1 to 0.4 ms
// apiece at the n-body size, about a per-node layer's kernel). Products are rounded before they
// are added (contraction off), as the separate ATen calls rounded them.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

// A (N, n, 3, C) view with a unit last stride, for the loops below.
template <typename T>
struct Rows {
  T* data;
  int64_t s0, s1, s2;
  Rows(const at::Tensor& t, T* p) : data(p), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {
    TORCH_INTERNAL_ASSERT(t.dim() == 4 && (t.size(3) <= 1 || t.stride(3) == 1));
  }
  T* at(int64_t b, int64_t i, int64_t a) const { return data + b * s0 + i * s1 + a * s2; }
};

// Rows of C elements that never overlap (restrict: no alias checks around loops this short).
template <typename T>
inline void add_into(T* __restrict__ to, const T* __restrict__ x, int64_t C) {
  for (int64_t c = 0; c < C; ++c) to[c] += x[c];
}
template <typename T>
inline void sum_into(T* __restrict__ to, const T* __restrict__ x, const T* __restrict__ y, int64_t C) {
  for (int64_t c = 0; c < C; ++c) to[c] = x[c] + y[c];
}
// to = x * k, or with kAdd to += x * k; to may be x
template <bool kAdd, typename T>
inline void product_into(T* to, const T* x, const T* __restrict__ k, int64_t C) {
  for (int64_t c = 0; c < C; ++c) to[c] = kAdd ? to[c] + x[c] * k[c] : x[c] * k[c];
}

// x[..., C:2C] = the mean of x[..., :C] over the real nodes of each graph, at every node (the
// context half of [x3, context]; _masked_node_mean of nn.py). The loop sums in node order, ATen's
// mean in another: the two paths agree to rounding.
void write_node_mean(const at::Tensor& x, int64_t C, const at::Tensor& mask) {
  const int64_t N = x.size(0), n = x.size(1);
  const bool* valid = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vn_dgcnn_node_mean", [&] {
    const Rows<scalar_t> rows(x, x.mutable_data_ptr<scalar_t>());
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> mean(3 * C);
      for (int64_t b = begin; b < end; ++b) {
        std::fill(mean.begin(), mean.end(), scalar_t(0));
        int64_t count = 0;
        for (int64_t i = 0; i < n; ++i) {
          if (valid && !valid[b * n + i]) continue;
          ++count;
          for (int a = 0; a < 3; ++a) add_into(mean.data() + a * C, rows.at(b, i, a), C);
        }
        const scalar_t denominator = static_cast<scalar_t>(std::max<int64_t>(count, 1));
        for (scalar_t& value : mean) value /= denominator;
        for (int64_t i = 0; i < n; ++i)
          for (int a = 0; a < 3; ++a) std::copy(mean.begin() + a * C, mean.begin() + (a + 1) * C, rows.at(b, i, a) + C);
      }
    });
  });
}

// The gradient of x3 from g_x = d/d[x3, context]: g_x[..., :C] plus, at each real node, the
// context's gradient summed over every node of the graph (each received the mean) divided by
// the count of real nodes.
at::Tensor context_backward(const at::Tensor& g_x, int64_t C, const at::Tensor& mask) {
  const int64_t N = g_x.size(0), n = g_x.size(1);
  const bool* valid = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  at::Tensor g_x3 = at::empty({N, n, 3, C}, g_x.options());
  AT_DISPATCH_FLOATING_TYPES(g_x.scalar_type(), "vn_dgcnn_context_backward", [&] {
    const Rows<const scalar_t> from(g_x, g_x.const_data_ptr<scalar_t>());
    const Rows<scalar_t> to(g_x3, g_x3.mutable_data_ptr<scalar_t>());
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> share(3 * C);
      for (int64_t b = begin; b < end; ++b) {
        std::fill(share.begin(), share.end(), scalar_t(0));
        int64_t count = 0;
        for (int64_t i = 0; i < n; ++i) {
          count += !valid || valid[b * n + i];
          for (int a = 0; a < 3; ++a) add_into(share.data() + a * C, from.at(b, i, a) + C, C);
        }
        const scalar_t denominator = static_cast<scalar_t>(std::max<int64_t>(count, 1));
        for (scalar_t& value : share) value /= denominator;
        for (int64_t i = 0; i < n; ++i) {
          const bool real = !valid || valid[b * n + i];
          for (int a = 0; a < 3; ++a) {
            const scalar_t* row = from.at(b, i, a);
            scalar_t* out = to.at(b, i, a);
            if (real) {
              sum_into(out, row, share.data() + a * C, C);
            } else {
              std::copy(row, row + C, out);
            }
          }
        }
      }
    });
  });
  return g_x3;
}

// x12's gradient is the score head's (g_head) plus conv3's (g_conv3): its first half is added to
// g_x1, its second half, times keep2 where dropout ran, is returned (the gradient of conv2's output).
at::Tensor split_x12_backward(const at::Tensor& g_head, const at::Tensor& g_conv3, const at::Tensor& keep2,
                              at::Tensor& g_x1, int64_t C) {
  const int64_t N = g_head.size(0), n = g_head.size(1);
  at::Tensor g_x2 = at::empty({N, n, 3, C}, g_head.options());
  AT_DISPATCH_FLOATING_TYPES(g_head.scalar_type(), "vn_dgcnn_split_x12_backward", [&] {
    const Rows<const scalar_t> head(g_head, g_head.const_data_ptr<scalar_t>()),
        conv3(g_conv3, g_conv3.const_data_ptr<scalar_t>());
    const Rows<scalar_t> x1(g_x1, g_x1.mutable_data_ptr<scalar_t>()), x2(g_x2, g_x2.mutable_data_ptr<scalar_t>());
    const scalar_t* keep = keep2.defined() ? keep2.const_data_ptr<scalar_t>() : nullptr;  // (N, n, 1, C)
    at::parallel_for(0, N * n, 64, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> sum(C);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / n, i = row % n;
        for (int a = 0; a < 3; ++a) {
          const scalar_t *h = head.at(b, i, a), *g = conv3.at(b, i, a);
          sum_into(sum.data(), h, g, C);
          add_into(x1.at(b, i, a), sum.data(), C);
          sum_into(x2.at(b, i, a), h + C, g + C, C);
          if (keep) product_into<false>(x2.at(b, i, a), x2.at(b, i, a), keep + row * C, C);
        }
      }
    });
  });
  return g_x2;
}

// out = v * keep (keep (N, n, 1, C) broadcast over xyz; out may be v), or with kAdd out += v * keep
// (the gradient that reaches conv1's output through the dropout before conv2).
template <bool kAdd>
void times_keep(const at::Tensor& v, const at::Tensor& keep, const at::Tensor& out) {
  const int64_t N = v.size(0), n = v.size(1), C = v.size(3);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "vn_dgcnn_times_keep", [&] {
    const Rows<const scalar_t> from(v, v.const_data_ptr<scalar_t>());
    const Rows<scalar_t> to(out, out.mutable_data_ptr<scalar_t>());
    const scalar_t* k = keep.const_data_ptr<scalar_t>();
    at::parallel_for(0, N * n, 64, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / n, i = row % n;
        for (int a = 0; a < 3; ++a) product_into<kAdd>(to.at(b, i, a), from.at(b, i, a), k + row * C, C);
      }
    });
  });
}
#pragma GCC pop_options

void check_shape(const at::Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

void check_network_args(const at::Tensor& points, const at::Tensor& mask, at::TensorList params, bool scores,
                        int64_t neighbours) {
  TORCH_CHECK_VALUE(neighbours >= 1, "neighbours must be at least 1, got ", neighbours);
  TORCH_CHECK_VALUE(points.dim() == 4 && points.size(2) == 3, "points must have shape (N, n, 3, C), got ",
                    points.sizes());
  TORCH_CHECK_TYPE(points.scalar_type() == at::kFloat || points.scalar_type() == at::kDouble,
                   "points must be float32 or float64, got ", points.scalar_type());
  TORCH_CHECK_VALUE(params.size() == (scores ? 27u : 12u), "params must hold the network's ", scores ? 27 : 12,
                    " parameters in VNDGCNN._whole_network_params order, got ", params.size());
  for (const at::Tensor& t : params) {
    TORCH_CHECK_TYPE(t.scalar_type() == points.scalar_type(), "every parameter must have the dtype of points (",
                     points.scalar_type(), "), got ", t.scalar_type());
    check_same_device(points, "points", t, "a parameter");
  }
  TORCH_CHECK_VALUE(params[0].dim() == 2 && params[0].size(1) == 2 * points.size(3),
                    "conv1's linear weight must have shape (C, 2 * ", points.size(3), "), got ", params[0].sizes());
  // every other shape follows from C and, with scores, the widths of std1 and std2
  const int64_t Cin = points.size(3), C = params[0].size(0);
  check_shape(params[1], {C, 2 * Cin}, "conv1's direction weight");
  for (int64_t layer : {0, 5}) {
    check_shape(params[layer + 2], {C}, "an edge convolution's norm weight");
    check_shape(params[layer + 3], {C}, "an edge convolution's norm bias");
    check_shape(params[layer + 4], {C, C}, "an edge convolution's pool direction");
  }
  check_shape(params[5], {C, 2 * C}, "conv2's linear weight");
  check_shape(params[6], {C, 2 * C}, "conv2's direction weight");
  check_shape(params[10], {C, C}, "frame_pool's direction weight");
  check_shape(params[11], {3, C}, "frame_head's weight");
  if (!scores) return;
  TORCH_CHECK_VALUE(params[16].dim() == 2 && params[20].dim() == 2, "std1's and std2's linear weights must be matrices");
  const int64_t C1 = params[16].size(0), C2 = params[20].size(0);
  check_shape(params[12], {C, 2 * C}, "conv3's linear weight");
  check_shape(params[13], {1, 2 * C}, "conv3's direction weight");
  check_shape(params[16], {C1, 2 * C}, "std1's linear weight");
  check_shape(params[17], {C1, 2 * C}, "std1's direction weight");
  check_shape(params[20], {C2, C1}, "std2's linear weight");
  check_shape(params[21], {C2, C1}, "std2's direction weight");
  for (auto [layer, width] : {std::pair<int64_t, int64_t>{12, C}, {16, C1}, {20, C2}}) {
    check_shape(params[layer + 2], {width}, "a per-node layer's norm weight");
    check_shape(params[layer + 3], {width}, "a per-node layer's norm bias");
  }
  check_shape(params[24], {3, C2}, "std_frame's weight");
  check_shape(params[25], {1, 12 * C}, "score_head's weight");
  check_shape(params[26], {1}, "score_head's bias");
  if (mask.defined()) {
    TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "mask must be a bool tensor, got ", mask.scalar_type());
    TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == points.size(0) && mask.size(1) == points.size(1),
                      "mask must have shape (N, n) = (", points.size(0), ", ", points.size(1), "), got ", mask.sizes());
  }
}

// The forward's values that the backward reads (outputs of the forward, never its inputs):
//   x1 (empty with scores: the first half of x12), conv2's input (empty without dropout: x1
//   itself), the frame pool's index, the pooled vectors (0-3),
//   conv1 and conv2 (neighbours, maps, selected, stats, stacked each: 4-8, 9-13),
//   with scores: x12, x = [x3, context], h1, h2, local (14-18), conv3, std1, std2 (maps, stats,
//   stacked each: 19-21, 22-24, 25-27).
constexpr int64_t kEdgeSaved = 5, kNodeSaved = 3, kFirstEdge = 4, kFirstScores = kFirstEdge + 2 * kEdgeSaved;

void push(std::vector<at::Tensor>& out, const EdgeSaved& e) {
  for (const at::Tensor& t : {e.neighbours, e.maps, e.selected, e.stats, e.stacked}) out.push_back(t);
}
void push(std::vector<at::Tensor>& out, const NodeSaved& e) {
  for (const at::Tensor& t : {e.maps, e.stats, e.stacked}) out.push_back(t);
}
EdgeSaved edge_at(at::TensorList saved, int64_t first) {
  return {saved[first], saved[first + 1], saved[first + 2], saved[first + 3], saved[first + 4]};
}
NodeSaved node_at(at::TensorList saved, int64_t first) { return {saved[first], saved[first + 1], saved[first + 2]}; }

// The backward op is reachable through torch.ops with any list: the values that index memory
// (neighbours, selections, the frame pool's index) and the shapes the kernels trust are checked.
void check_index(const at::Tensor& t, at::IntArrayRef shape, int64_t bound, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong && t.sizes() == shape, "saved ", name, " must be int64 of shape ",
                    shape, ", got ", t.scalar_type(), " ", t.sizes());
  // one pass over the (dense) values: min() and max() were two reductions and two item() calls each
  const int64_t* values = t.const_data_ptr<int64_t>();
  bool inside = true;
  for (int64_t e = 0; e < t.numel(); ++e) inside &= values[e] >= 0 && values[e] < bound;
  TORCH_CHECK_VALUE(inside, "saved ", name, " must lie in [0, ", bound, ")");
}

void check_saved_shape(const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& points, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == shape && t.scalar_type() == points.scalar_type(), "saved ", name,
                    " must have shape ", shape, " and the dtype of points, got ", t.sizes(), " ", t.scalar_type());
}

void check_edge_saved(const EdgeSaved& e, const at::Tensor& points, int64_t inputs, int64_t C, const char* name) {
  const int64_t N = points.size(0), n = points.size(1);
  TORCH_CHECK_VALUE(e.neighbours.dim() == 3, "saved ", name, " neighbours must have shape (N, n, K)");
  const int64_t K = e.neighbours.size(2);
  check_index(e.neighbours, {N, n, K}, n, (std::string(name) + " neighbours").c_str());
  check_index(e.selected, {N, n, C}, K, (std::string(name) + " selection").c_str());
  check_saved_shape(e.maps, {N, n, 3, 4 * C}, points, name);
  check_saved_shape(e.stats, {2, C}, points, name);
  check_saved_shape(e.stacked, {inputs, 4 * C}, points, name);
}

void check_node_saved(const NodeSaved& e, const at::Tensor& points, const at::Tensor* params, const char* name) {
  const int64_t rows = points.size(0) * points.size(1), out = params[0].size(0), inputs = params[0].size(1);
  check_saved_shape(e.maps, {rows, 1, 3, out + params[1].size(0)}, points, name);
  check_saved_shape(e.stats, {2, out}, points, name);
  check_saved_shape(e.stacked, {inputs, out + params[1].size(0)}, points, name);
}

void check_dropout(at::TensorList dropout, const at::Tensor& points, int64_t C) {
  TORCH_CHECK_VALUE(dropout.size() == 2, "dropout must hold the two keep masks (empty: no dropout)");
  for (const at::Tensor& keep : dropout) {
    if (keep.numel() == 0) continue;
    check_shape(keep, {points.size(0), points.size(1), 1, C}, "a dropout mask");
    TORCH_CHECK_TYPE(keep.scalar_type() == points.scalar_type(), "a dropout mask must have the dtype of points (",
                     points.scalar_type(), "), got ", keep.scalar_type());
    check_same_device(points, "points", keep, "a dropout mask");
  }
}

// An absent tensor travels as an empty one (Tensor[] cannot hold None).
at::Tensor absent(const at::Tensor& like) { return at::empty({0}, like.options()); }
at::Tensor present(const at::Tensor& t) { return t.numel() == 0 ? at::Tensor() : t; }

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> vn_dgcnn_cpu(
    const at::Tensor& points, const c10::optional<at::Tensor>& mask_arg, at::TensorList params,
    at::TensorList running_list, at::TensorList dropout, int64_t neighbours, double slope, double eps, double momentum,
    bool training, bool scores) {
  const at::Tensor mask = mask_arg.has_value() ? mask_arg->contiguous() : at::Tensor();
  check_network_args(points, mask, params, scores, neighbours);
  TORCH_CHECK_VALUE(running_list.size() == (scores ? 10u : 4u), "running must hold (mean, var) of each batch norm");
  check_dropout(dropout, points, params[0].size(0));
  for (size_t i = 0; i < running_list.size(); ++i) {
    const at::Tensor& norm_weight = params[std::array<int64_t, 5>{2, 7, 14, 18, 22}[i / 2]];
    check_shape(running_list[i], norm_weight.sizes(), "a running statistic");
    TORCH_CHECK_VALUE(running_list[i].is_floating_point() && running_list[i].device() == points.device() &&
                          running_list[i].is_contiguous(),
                      "running statistics must be contiguous floating point tensors, on the device of points");
  }
  int64_t real_nodes = points.size(0) * points.size(1);
  if (mask.defined()) {
    const bool* valid = mask.const_data_ptr<bool>();
    real_nodes = std::count(valid, valid + mask.numel(), true);
  }
  const Settings s{neighbours, slope, eps, momentum, training, real_nodes};
  std::vector<at::Tensor> running(running_list.begin(), running_list.end());
  const at::Tensor keep1 = present(dropout[0].contiguous()), keep2 = present(dropout[1].contiguous());

  // With scores the two edge convolutions write their halves of x12 = [x1, x2] (no concatenation).
  const int64_t N = points.size(0), n = points.size(1), C = params[0].size(0);
  const at::Tensor x12 = scores ? at::empty({N, n, 3, 2 * C}, points.options()) : at::Tensor();
  EdgeSaved conv1, conv2;
  const at::Tensor x1 = edge_forward(points, mask, &params[0], running[0], running[1], s, conv1,
                                     scores ? x12.narrow(3, 0, C) : at::Tensor());
  at::Tensor input2 = x1;
  if (keep1.defined()) {
    input2 = at::empty(x1.sizes(), x1.options());
    times_keep<false>(x1, keep1, input2);
  }
  at::Tensor x2 = edge_forward(input2, mask, &params[5], running[2], running[3], s, conv2,
                               scores ? x12.narrow(3, C, C) : at::Tensor());
  if (keep2.defined()) times_keep<false>(x2, keep2, x2);
  const auto [index, pooled] = frame_pool(x1, params[10], mask);  // [N, C], [N, 3, C]
  // the heads' maps to 3 vectors by the network's own product (BLAS takes longer over 3 columns)
  const at::Tensor frame = cpu::small_matmul(pooled, params[11].t());  // [N, 3, 3]: columns are the vectors

  // x1 travels as x12 where that holds it (a list of outputs should not alias itself)
  std::vector<at::Tensor> saved{scores ? absent(x1) : x1, keep1.defined() ? input2 : absent(x1), index, pooled};
  push(saved, conv1);
  push(saved, conv2);
  if (!scores) return {frame, at::empty({0}, points.options()), saved};

  const at::Tensor flat_mask = mask.defined() ? mask.reshape({-1, 1}) : at::Tensor();
  NodeSaved conv3, std1, std2;
  const at::Tensor x = at::empty({N, n, 3, 2 * C}, points.options());  // [x3, its mean over the nodes]
  const at::Tensor x3 = node_forward(x12, flat_mask, &params[12], running[4], running[5], s, conv3, x.narrow(3, 0, C));
  write_node_mean(x, C, mask);
  const at::Tensor h1 = node_forward(x, flat_mask, &params[16], running[6], running[7], s, std1);
  const at::Tensor h2 = node_forward(h1, flat_mask, &params[20], running[8], running[9], s, std2);
  const at::Tensor local = cpu::small_matmul(h2, params[24].t());  // [N, n, 3, 3]: a frame per node
  const at::Tensor head_weight = params[25].reshape({-1}).contiguous();
  const at::Tensor node_scores = cpu::vn_score_head(x.contiguous(), local.contiguous(), x12, opt(mask), head_weight,
                                                    params[26].contiguous());
  for (const at::Tensor& t : {x12, x, h1, h2, local}) saved.push_back(t);
  push(saved, conv3);
  push(saved, std1);
  push(saved, std2);
  return {frame, node_scores, saved};
}

// Gradients of every parameter, in the order of params (empty where none flows: the pool
// directions only select).
std::vector<at::Tensor> vn_dgcnn_backward_cpu(const at::Tensor& grad_frame, const at::Tensor& grad_scores,
                                              const at::Tensor& points, const c10::optional<at::Tensor>& mask_arg,
                                              at::TensorList params, at::TensorList dropout, at::TensorList saved_arg,
                                              int64_t neighbours, double slope, double eps, bool training, bool scores) {
  // the kernels read the saved values through raw pointers: dense copies of any other layout
  std::vector<at::Tensor> saved_dense;
  for (const at::Tensor& t : saved_arg) saved_dense.push_back(t.contiguous());
  const at::TensorList saved = saved_dense;
  const at::Tensor mask = mask_arg.has_value() ? mask_arg->contiguous() : at::Tensor();
  check_network_args(points, mask, params, scores, neighbours);
  check_dropout(dropout, points, params[0].size(0));
  TORCH_CHECK_VALUE(static_cast<int64_t>(saved.size()) == (scores ? kFirstScores + 5 + 3 * kNodeSaved : kFirstScores),
                    "saved must be the list that vn_dgcnn returned for these arguments");
  const Settings s{neighbours, slope, eps, 0.0, training};
  const at::Tensor keep1 = present(dropout[0].contiguous()), keep2 = present(dropout[1].contiguous());
  const int64_t N = points.size(0), n = points.size(1), C = params[0].size(0);
  if (scores) check_saved_shape(saved[kFirstScores], {N, n, 3, 2 * C}, points, "x12");
  const at::Tensor x1 = scores ? saved[kFirstScores].narrow(3, 0, C) : saved[0];
  const at::Tensor &index = saved[2], &pooled = saved[3];
  const at::Tensor& input2 = keep1.defined() ? saved[1] : x1;
  const EdgeSaved conv1 = edge_at(saved, kFirstEdge), conv2 = edge_at(saved, kFirstEdge + kEdgeSaved);
  check_saved_shape(x1, {N, n, 3, C}, points, "x1");
  check_index(index, {N, C}, n, "frame pool index");
  check_saved_shape(pooled, {N, 3, C}, points, "pooled vectors");
  if (keep1.defined()) check_saved_shape(saved[1], {N, n, 3, C}, points, "conv2 input");
  check_edge_saved(conv1, points, points.size(3), C, "conv1");
  check_edge_saved(conv2, points, C, C, "conv2");
  std::vector<at::Tensor> grads(params.size());
  for (size_t i = 0; i < params.size(); ++i) grads[i] = absent(params[i]);

  // the frame: frame = pooled @ frame_head^T, pooled gathered from x1
  TORCH_CHECK_VALUE(grad_frame.sizes() == at::IntArrayRef({N, 3, 3}), "grad_frame must have shape (N, 3, 3)");
  const at::Tensor g_frame = grad_frame.to(points.scalar_type());
  grads[11] = cpu::small_matmul_tn(pooled, g_frame).t().contiguous();
  const at::Tensor g_pooled = cpu::small_matmul(g_frame, params[11]);  // [N, 3, C]
  at::Tensor g_x1 = frame_pool_backward(g_pooled.contiguous(), index, n);
  at::Tensor g_x2;

  if (scores) {
    const int64_t first = kFirstScores;
    const at::Tensor &x12 = saved[first], &x = saved[first + 1], &h1 = saved[first + 2], &h2 = saved[first + 3],
                     &local = saved[first + 4];
    const NodeSaved conv3 = node_at(saved, first + 5), std1 = node_at(saved, first + 5 + kNodeSaved),
                    std2 = node_at(saved, first + 5 + 2 * kNodeSaved);
    check_node_saved(conv3, points, &params[12], "conv3");
    check_node_saved(std1, points, &params[16], "std1");
    check_node_saved(std2, points, &params[20], "std2");
    const int64_t C1 = params[16].size(0), C2 = params[20].size(0);
    for (const auto& [t, shape, name] : {std::tuple<const at::Tensor&, std::vector<int64_t>, const char*>{
             x12, {N, n, 3, 2 * C}, "x12"}, {x, {N, n, 3, 2 * C}, "x"}, {h1, {N, n, 3, C1}, "h1"},
             {h2, {N, n, 3, C2}, "h2"}, {local, {N, n, 3, 3}, "local frames"}})
      check_saved_shape(t, shape, points, name);
    TORCH_CHECK_VALUE(grad_scores.sizes() == at::IntArrayRef({N, n}), "grad_scores must have shape (N, n)");
    const at::Tensor flat_mask = mask.defined() ? mask.reshape({-1, 1}) : at::Tensor();
    const at::Tensor head_weight = params[25].reshape({-1}).contiguous();
    auto [g_x, g_local, g_x12, g_head, g_head_bias] = cpu::vn_score_head_backward(
        grad_scores.to(points.scalar_type()).contiguous(), x.contiguous(), local.contiguous(), x12, opt(mask),
        head_weight);
    grads[25] = g_head.reshape(params[25].sizes());
    grads[26] = g_head_bias.reshape(params[26].sizes());
    grads[24] = cpu::small_matmul_tn(h2, g_local).t().contiguous();
    const at::Tensor g_h2 = cpu::small_matmul(g_local, params[24]);
    auto std2_grads = node_backward(g_h2, h1, flat_mask, &params[20], s, std2);
    auto std1_grads = node_backward(std2_grads[0], x, flat_mask, &params[16], s, std1);
    for (int i = 1; i < 5; ++i) {
      grads[19 + i] = std2_grads[i];
      grads[15 + i] = std1_grads[i];
    }
    g_x.add_(std1_grads[0]);  // the score head's gradient is this op's own: summed in place
    // x = [x3, mean of x3 over the real nodes], C channels each
    const at::Tensor g_x3 = context_backward(g_x, C, mask);
    auto conv3_grads = node_backward(g_x3, x12, flat_mask, &params[12], s, conv3);
    for (int i = 1; i < 5; ++i) grads[11 + i] = conv3_grads[i];
    g_x2 = split_x12_backward(g_x12, conv3_grads[0].contiguous(), keep2, g_x1, C);
    auto conv2_grads = edge_backward(g_x2, input2, mask, &params[5], s, conv2, /*input_grad=*/true);
    for (int i = 1; i < 5; ++i) grads[4 + i] = conv2_grads[i];
    if (keep1.defined()) {
      times_keep<true>(conv2_grads[0], keep1, g_x1);
    } else {
      g_x1.add_(conv2_grads[0]);
    }
  }
  auto conv1_grads = edge_backward(g_x1, points, mask, &params[0], s, conv1, /*input_grad=*/false);
  for (int i = 1; i < 5; ++i) grads[i - 1] = conv1_grads[i];
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(lps_fast, CPU, m) {
  m.impl("vn_dgcnn", &vn_dgcnn_cpu);
  m.impl("vn_dgcnn_backward", &vn_dgcnn_backward_cpu);
  m.impl("vn_knn", &vn_knn_cpu);
}

}  // namespace lps_fast
