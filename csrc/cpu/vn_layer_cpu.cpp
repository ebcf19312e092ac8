// CPU kernels of vn_layer. An entry is a node (per-node layer) or a (node, neighbour) pair (edge
// convolution); each holds C 3-vectors p and directions d. The forward pass reads p and d of
// every entry straight from the per-node inputs (p[b, j] + p_centre[b, i]), so the (N, n, K, 3, C)
// edge tensors of the composed formulation never exist; the backward pass recomputes them.
//
// Per channel, with l = |p| + 1e-6 and batch-norm statistics over the entries of real nodes:
//   y = (l - mean) * invstd * weight + bias,   q = p * y / l,
//   out = q - (1 - slope) * min(q.d, 0) / (d.d + 1e-6) * d
// and an edge convolution keeps, per node and channel, the neighbour whose out has the largest
// projection on pool @ out. Sums over entries are accumulated in double, in a fixed chunking of
// the batch, so results do not depend on the thread count.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include "cpu/vn_layer_cpu.h"
#include "cpu/reduction_chunks.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include "cpu/vector512.h"
#endif

namespace lps_fast {
namespace cpu {
namespace {

constexpr double kVectorEps = 1e-6;  // added to vector lengths and squared direction lengths

// dst[0:count] = a[0:count] (+ b[0:count]) for a runtime channel count: the per-entry rows are
// short (tens of channels), where a plain loop spends more time in its scalar tail and alias
// checks than in the work. With AVX-512, whole vectors and one masked tail. A sum is formed in
// registers and stored once: a masked store read back by the next masked load is not forwarded
// (the load waits for the store to retire), which made copy-then-add the kernels' hot spot.
#if defined(__AVX512F__)
template <bool kAdd, typename T>
inline void sum_or_copy_row(T* dst, const T* a, const T* b, int64_t count) {
  using W = Vector512<T>;
  int64_t c = 0;
  for (; c + W::kLanes <= count; c += W::kLanes)
    W::store(dst + c, kAdd ? W::add(W::load(a + c), W::load(b + c)) : W::load(a + c));
  if (c < count) {
    const auto tail = W::first(count - c);
    W::store(tail, dst + c, kAdd ? W::add(W::load(tail, a + c), W::load(tail, b + c)) : W::load(tail, a + c));
  }
}
#else
template <bool kAdd, typename T>
inline void sum_or_copy_row(T* dst, const T* a, const T* b, int64_t count) {
  for (int64_t c = 0; c < count; ++c) dst[c] = kAdd ? a[c] + b[c] : a[c];
}
#endif
template <typename T>
inline void copy_row(T* dst, const T* src, int64_t count) {
  sum_or_copy_row<false>(dst, src, src, count);
}
template <typename T>
inline void add_row(T* dst, const T* src, int64_t count) {
  sum_or_copy_row<true>(dst, dst, src, count);
}
// dst = a + b, or dst = a where b is null (an absent centre term).
template <typename T>
inline void sum_row(T* dst, const T* a, const T* b, int64_t count) {
  if (b) {
    sum_or_copy_row<true>(dst, a, b, count);
  } else {
    copy_row(dst, a, count);
  }
}

// A (N, n, 3, C) tensor whose last dim has stride 1.
template <typename T>
struct Vectors {
  const T* data = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, channels = 0;
  Vectors() = default;
  explicit Vectors(const at::Tensor& t)
      : data(t.const_data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), channels(t.size(3)) {}
  explicit operator bool() const { return data != nullptr; }
  const T* at(int64_t b, int64_t i, int64_t a) const { return data + b * s0 + i * s1 + a * s2; }
};

// Which candidate each channel of an edge convolution's node kept (pick[c] in [0, K)), and with
// AVX-512 the same as lane masks: lanes(k, v) holds the lanes of channel block v whose channel
// kept candidate k. Filled once per node, the masks let the backward gather the receiving entries
// and scatter their gradients a whole vector at a time (one masked load or add per candidate)
// instead of one scalar load and address computation per channel, which made those loops the
// backward's hot spot. Each channel still gets exactly one addition, in the same order.
template <typename T>
struct Selection {
  const int64_t* pick = nullptr;
  int64_t K = 0, C = 0;
#if defined(__AVX512F__)
  using W = Vector512<T>;
  using Mask = typename W::Mask;
  int64_t blocks = 0;
  std::vector<Mask> masks;
  Selection(int64_t K_, int64_t C_) : K(K_), C(C_), blocks((C_ + W::kLanes - 1) / W::kLanes), masks(K_ * blocks) {}
  Mask lanes(int64_t k, int64_t v) const { return masks[k * blocks + v]; }
  void fill(const int64_t* pick_) {
    pick = pick_;
    std::fill(masks.begin(), masks.end(), Mask(0));
    for (int64_t v = 0; v < blocks; ++v) {
      for (int half = 0; half < W::kLanes / 8; ++half) {  // 8 int64 picks per compare
        const int64_t c0 = v * W::kLanes + half * 8;
        if (c0 >= C) break;
        const __mmask8 tail = Vector512<double>::first(C - c0);  // the 8-lane mask of the picks left
        const __m512i picked = _mm512_maskz_loadu_epi64(tail, pick + c0);
        for (int64_t k = 0; k < K; ++k) {
          const unsigned hit = _mm512_mask_cmpeq_epi64_mask(tail, picked, _mm512_set1_epi64(k));
          masks[k * blocks + v] = static_cast<Mask>(masks[k * blocks + v] | (hit << (half * 8)));
        }
      }
    }
  }
#else
  Selection(int64_t K_, int64_t C_) : K(K_), C(C_) {}
  void fill(const int64_t* pick_) { pick = pick_; }
#endif
};

// The entries' p and d (3 rows of stride L, row a = coordinate) of node i reading node j. The
// buffers' lanes past C stay zero (never written, or written with zeros), except a shared
// direction's.
template <typename T, typename acc_t>
struct EntryReader {
  static_assert(std::is_same_v<T, acc_t>, "the kernels compute in the input dtype");
  Vectors<T> p, d, p_centre, d_centre;
  int64_t C, D, L;  // channels, direction channels, row stride of the entry buffers
  const T* centre(const Vectors<T>& v, int64_t b, int64_t i, int a) const { return v ? v.at(b, i, a) : nullptr; }
#if defined(__AVX512F__)
  // The register forms' reads: lanes [c0, c0 + kLanes) of row a under `lanes` (zero past them),
  // x plus the centre term of node (b, i) where there is one; p or d of node i reading node j.
  using Vec = typename Vector512<T>::Vec;
  using Mask = typename Vector512<T>::Mask;
  static Vec plus_centre(Vec x, const Vectors<T>& v, int64_t b, int64_t i, int a, int64_t c0, Mask lanes) {
    return v ? Vector512<T>::add(x, Vector512<T>::load(lanes, v.at(b, i, a) + c0)) : x;
  }
  Vec load_p(int64_t b, int64_t i, int64_t j, int a, int64_t c0, Mask lanes) const {
    return plus_centre(Vector512<T>::load(lanes, p.at(b, j, a) + c0), p_centre, b, i, a, c0, lanes);
  }
  Vec load_d(int64_t b, int64_t i, int64_t j, int a, int64_t c0, Mask lanes) const {
    return plus_centre(Vector512<T>::load(lanes, d.at(b, j, a) + c0), d_centre, b, i, a, c0, lanes);
  }
#endif
  void read_p(int64_t b, int64_t i, int64_t j, T* pv) const {
    for (int a = 0; a < 3; ++a) sum_row(pv + a * L, p.at(b, j, a), centre(p_centre, b, i, a), C);
  }
  // The entry of node (b, i) that receives the upstream gradient: channel c from the neighbour it
  // kept, neighbours_of_i[selection.pick[c]], with its centre term.
  void read_selected(int64_t b, int64_t i, const int64_t* neighbours_of_i, const Selection<T>& selection, T* pv,
                     T* dv) const {
#if defined(__AVX512F__)
    if (D == C) {  // whole vectors: one masked load per candidate (lanes past C stay zero)
      using W = Vector512<T>;
      for (int a = 0; a < 3; ++a) {
        const T* pc = centre(p_centre, b, i, a);
        const T* dc = centre(d_centre, b, i, a);
        for (int64_t v = 0; v < selection.blocks; ++v) {
          const int64_t c0 = v * W::kLanes;
          const auto tail = W::first(C - c0);
          auto ps = W::zero(), ds = W::zero();
          for (int64_t k = 0; k < selection.K; ++k) {
            const int64_t j = neighbours_of_i[k];
            ps = W::load(ps, selection.lanes(k, v), p.at(b, j, a) + c0);
            ds = W::load(ds, selection.lanes(k, v), d.at(b, j, a) + c0);
          }
          W::store(pv + a * L + c0, W::add(ps, pc ? W::load(tail, pc + c0) : W::zero()));
          W::store(dv + a * L + c0, W::add(ds, dc ? W::load(tail, dc + c0) : W::zero()));
        }
      }
      return;
    }
#endif
    for (int a = 0; a < 3; ++a) {  // one scalar per lane (a shared direction, or no AVX-512)
      T* pdst = pv + a * L;
      T* ddst = dv + a * L;
      const T* pc = centre(p_centre, b, i, a);
      const T* dc = centre(d_centre, b, i, a);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t j = neighbours_of_i[selection.pick[c]];
        const int64_t dc_index = D == 1 ? 0 : c;
        pdst[c] = p.at(b, j, a)[c] + (pc ? pc[c] : T(0));
        ddst[c] = d.at(b, j, a)[dc_index] + (dc ? dc[dc_index] : T(0));
      }
    }
  }
  void read(int64_t b, int64_t i, int64_t j, T* pv, T* dv) const {
    read_p(b, i, j, pv);
    for (int a = 0; a < 3; ++a) {
      T* ddst = dv + a * L;
      if (D == 1) {  // a shared direction, repeated over the lanes
        T shared = d.at(b, j, a)[0];
        if (d_centre) shared += d_centre.at(b, i, a)[0];
        for (int64_t c = 0; c < L; ++c) ddst[c] = shared;
        continue;
      }
      sum_row(ddst, d.at(b, j, a), centre(d_centre, b, i, a), C);
    }
  }
};

// Helpers of the per-lane formulas below, for one lane (a scalar) or a GCC vector of lanes.
template <typename V>
inline V lane_sqrt(V x) { return std::sqrt(x); }
template <typename V>
inline V lane_max(V a, V b) { return std::max(a, b); }
template <typename V>
inline V where_negative(V c, V x) { return c < 0 ? x : V(0); }  // a select, not a branch
template <typename V>
inline V where_positive(V c, V x) { return c > 0 ? x : V(0); }
#if defined(__AVX512F__)
template <>
inline __m512 lane_sqrt(__m512 x) { return _mm512_sqrt_ps(x); }
template <>
inline __m512d lane_sqrt(__m512d x) { return _mm512_sqrt_pd(x); }
template <>
inline __m512 lane_max(__m512 a, __m512 b) { return _mm512_max_ps(a, b); }
template <>
inline __m512d lane_max(__m512d a, __m512d b) { return _mm512_max_pd(a, b); }
template <>
inline __m512 where_negative(__m512 c, __m512 x) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(c, _mm512_setzero_ps(), _CMP_LT_OQ), x); }
template <>
inline __m512d where_negative(__m512d c, __m512d x) { return _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(c, _mm512_setzero_pd(), _CMP_LT_OQ), x); }
template <>
inline __m512 where_positive(__m512 c, __m512 x) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(c, _mm512_setzero_ps(), _CMP_GT_OQ), x); }
template <>
inline __m512d where_positive(__m512d c, __m512d x) { return _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(c, _mm512_setzero_pd(), _CMP_GT_OQ), x); }
#endif

// The per-entry helpers below are not inlined: inlined into the kernels' loops, gcc vectorized
// them in some call sites and not in others (and drops the restrict qualifiers of inlined
// parameters); a call per entry costs nothing next to their 16-lane loops.

// |p| of an entry's vector in one lane or a vector of lanes.
template <typename V>
inline V entry_norm(const V (&p)[3]) {
  return lane_sqrt(p[0] * p[0] + p[1] * p[1] + p[2] * p[2]);
}
#if defined(__AVX512F__)
// Half h of a vector's lanes in double: a float vector's 16 lanes as two, a double vector as itself.
template <typename T>
inline __m512d in_double(typename Vector512<T>::Vec x, int h) {
  if constexpr (sizeof(T) == 4) {
    return _mm512_cvtps_pd(h == 0 ? _mm512_castps512_ps256(x)
                                  : _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  } else {
    return x;
  }
}
#endif

// The forward of one entry in one lane or a vector of lanes V (the same expressions either way):
// o from p and d (xyz each), with y = l * scale + shift.
template <typename T, typename V>
inline void entry_output(const V (&p)[3], const V (&d)[3], V scale, V shift, T keep, V (&o)[3]) {
  const T veps = static_cast<T>(kVectorEps);
  const V l = entry_norm(p) + veps;
  const V ratio = scale + shift / l;  // (l * scale + shift) / l
  const V q[3] = {p[0] * ratio, p[1] * ratio, p[2] * ratio};
  const V dot = q[0] * d[0] + q[1] * d[1] + q[2] * d[2];
  const V dd = d[0] * d[0] + d[1] * d[1] + d[2] * d[2] + veps;
  const V shrink = where_negative(dot, V{} + keep) * dot / dd;
  for (int a = 0; a < 3; ++a) o[a] = q[a] - shrink * d[a];
}

// entry_output of one entry, all L lanes, from buffers (3 rows of L lanes each). Branch-free so
// that the channel loop vectorizes.
template <typename acc_t>
__attribute__((noinline)) void entry_forward(const acc_t* __restrict__ pv, const acc_t* __restrict__ dv, const acc_t* scale,
                          const acc_t* shift, acc_t keep, int64_t L, acc_t* __restrict__ o) {
#pragma GCC ivdep
  for (int64_t c = 0; c < L; ++c) {
    const acc_t p[3] = {pv[c], pv[L + c], pv[2 * L + c]}, d[3] = {dv[c], dv[L + c], dv[2 * L + c]};
    acc_t out[3];
    entry_output(p, d, scale[c], shift[c], keep, out);
    for (int a = 0; a < 3; ++a) o[a * L + c] = out[a];
  }
}

// score[g * L + c] = o_g[:, c] . (pool @ o_g)[:, c] for kGroup entries o_g = o + g * stride (3
// rows of stride L each), with pool transposed and zero-padded to L columns (pool_t[e * L + c] =
// pool[c, e]). kVectors whole 64-byte vectors, plus with kHalf one 32-byte vector, cover the C
// channels: fixed at compile time, the kGroup x 3 x (kVectors + kHalf) accumulators stay in
// registers, and each load of pool_t serves the three coordinates of every entry of the group
// (one entry at a time, the loop was bound by its loads and its chains of dependent FMAs). The
// half vector serves channel counts just past a multiple of a vector (C = 21 in float: 16 + 8
// lanes instead of 32, a quarter fewer FMA cycles). kVectors = 0 without kHalf is the plain loop.
// Lanes past C get score 0 (pool_t's padding is zero).
template <int kVectors, bool kHalf, int kGroup, typename acc_t>
inline void pool_scores(const acc_t* o, int64_t stride, const acc_t* pool_t, int64_t C, int64_t L, acc_t* score) {
  if constexpr (kVectors > 0 || kHalf) {
    typedef acc_t vec __attribute__((vector_size(64)));
    typedef acc_t half_vec __attribute__((vector_size(32)));
    constexpr int kLanes = 64 / sizeof(acc_t);
    constexpr int kV = kVectors > 0 ? kVectors : 1;
    vec acc[kGroup][3][kV];
    half_vec tail[kGroup][3];
#pragma GCC unroll 16
    for (int g = 0; g < kGroup; ++g) {
#pragma GCC unroll 3
      for (int a = 0; a < 3; ++a) {
#pragma GCC unroll 4
        for (int v = 0; v < kV; ++v) acc[g][a][v] = vec{} * acc_t(0);
        tail[g][a] = half_vec{} * acc_t(0);
      }
    }
    for (int64_t e = 0; e < C; ++e) {
      const acc_t* column = pool_t + e * L;
      vec w[kV];
      half_vec w_tail;
#pragma GCC unroll 4
      for (int v = 0; v < kVectors; ++v) std::memcpy(&w[v], column + v * kLanes, sizeof(vec));
      if constexpr (kHalf) std::memcpy(&w_tail, column + kVectors * kLanes, sizeof(half_vec));
#pragma GCC unroll 16
      for (int g = 0; g < kGroup; ++g) {
#pragma GCC unroll 3
        for (int a = 0; a < 3; ++a) {
          const acc_t x = o[g * stride + a * L + e];
#pragma GCC unroll 4
          for (int v = 0; v < kVectors; ++v) acc[g][a][v] += w[v] * x;
          if constexpr (kHalf) tail[g][a] += w_tail * x;
        }
      }
    }
#pragma GCC unroll 16
    for (int g = 0; g < kGroup; ++g) {
      const acc_t* og = o + g * stride;
#pragma GCC unroll 4
      for (int v = 0; v < kVectors; ++v) {
        vec o0, o1, o2;
        std::memcpy(&o0, og + v * kLanes, sizeof(vec));
        std::memcpy(&o1, og + L + v * kLanes, sizeof(vec));
        std::memcpy(&o2, og + 2 * L + v * kLanes, sizeof(vec));
        const vec s = o0 * acc[g][0][v] + o1 * acc[g][1][v] + o2 * acc[g][2][v];
        std::memcpy(score + g * L + v * kLanes, &s, sizeof(vec));
      }
      if constexpr (kHalf) {
        half_vec o0, o1, o2;
        std::memcpy(&o0, og + kVectors * kLanes, sizeof(half_vec));
        std::memcpy(&o1, og + L + kVectors * kLanes, sizeof(half_vec));
        std::memcpy(&o2, og + 2 * L + kVectors * kLanes, sizeof(half_vec));
        const half_vec s = o0 * tail[g][0] + o1 * tail[g][1] + o2 * tail[g][2];
        std::memcpy(score + g * L + kVectors * kLanes, &s, sizeof(half_vec));
      }
    }
  } else {
    for (int g = 0; g < kGroup; ++g) {
      const acc_t* og = o + g * stride;
      acc_t* sg = score + g * L;
      for (int64_t c = 0; c < L; ++c) sg[c] = 0;
      for (int a = 0; a < 3; ++a) {
        const acc_t* oa = og + a * L;
        for (int64_t c = 0; c < C; ++c) {
          acc_t direction = 0;
          for (int64_t e = 0; e < C; ++e) direction += pool_t[e * L + c] * oa[e];
          sg[c] += oa[c] * direction;
        }
      }
    }
  }
}

// A shared direction's gradient: the sum over the channels of one row, in channel order.
template <typename acc_t>
inline acc_t channel_sum(const acc_t* row, int64_t C) {
  acc_t sum = 0;
  for (int64_t c = 0; c < C; ++c) sum += row[c];
  return sum;
}

// How many entries pool_scores<kVectors, kHalf> takes at a time: as many as keep their
// accumulators within 24 of the 32 vector registers, at most 4.
constexpr int pool_group(int vectors, bool half) {
  const int registers = 3 * (vectors + (half ? 1 : 0));
  return registers == 0 ? 1 : std::max(1, std::min(4, 24 / registers));
}

// sum[c] += l and squares[c] += l^2 for l = |p| + 1e-6 of one entry, in double, in all L padded
// lanes (whole vectors: a loop over the C channels ended in a scalar tail; lanes past C unused).
template <typename acc_t>
__attribute__((noinline)) void accumulate_lengths(const acc_t* __restrict__ pv, int64_t L,
                                                  double* __restrict__ sum, double* __restrict__ squares) {
#pragma GCC ivdep
  for (int64_t c = 0; c < L; ++c) {
    const acc_t x[3] = {pv[c], pv[L + c], pv[2 * L + c]};
    const double l = static_cast<double>(entry_norm(x)) + kVectorEps;
    sum[c] += l;
    squares[c] += l * l;
  }
}

// Per lane, keep entry k's output o where its score beats the best so far (strictly: the first
// of equal maxima, as argmax); the neighbour index is carried as a float so the lanes stay one
// vector type.
template <typename acc_t>
__attribute__((noinline)) void keep_better(const acc_t* __restrict__ score, const acc_t* __restrict__ o, acc_t k,
                                           int64_t L, acc_t* __restrict__ best, acc_t* __restrict__ which,
                                           acc_t* __restrict__ kept) {
#pragma GCC ivdep
  for (int64_t c = 0; c < L; ++c) {
    const bool better = score[c] > best[c];
    best[c] = better ? score[c] : best[c];
    which[c] = better ? k : which[c];
    kept[c] = better ? o[c] : kept[c];
    kept[L + c] = better ? o[L + c] : kept[L + c];
    kept[2 * L + c] = better ? o[2 * L + c] : kept[2 * L + c];
  }
}

// Batch-norm and affine constants of the backward pass, per channel.
template <typename acc_t>
struct BackwardConstants {
  const acc_t *mean, *invstd, *gamma, *beta;
  const acc_t *mean_gx, *mean_gxx;  // (1/m) sum gxhat and (1/m) sum gxhat * xhat (zero: not in the stats)
  acc_t keep;
};

// The backward of one entry in one lane or a vector of lanes V (the same expressions either way):
// from p, d and the upstream gradient g (xyz each) and the lane's batch-norm constants, gy (the
// gradient reaching the batch-norm output) and xhat, and with kFull also the gradients of p and d,
// including the batch statistics' terms from mean_gx / mean_gxx.
template <typename V>
struct LaneConstants {
  V mean, invstd, gamma, beta, mean_gx, mean_gxx;
};
template <typename V>
struct EntryGradient {
  V gy, xhat, gp[3], gd[3];
};
template <bool kFull, typename T, typename V>
inline EntryGradient<V> entry_gradient(const V (&p)[3], const V (&d)[3], const V (&g)[3], const LaneConstants<V>& k,
                                       T keep) {
  const T veps = static_cast<T>(kVectorEps);
  EntryGradient<V> r;
  const V norm = entry_norm(p);
  const V l = norm + veps;
  const V inv_l = T(1) / l;
  r.xhat = (l - k.mean) * k.invstd;
  const V y = r.xhat * k.gamma + k.beta;
  const V ratio = y * inv_l;
  const V q[3] = {p[0] * ratio, p[1] * ratio, p[2] * ratio};
  const V dot = q[0] * d[0] + q[1] * d[1] + q[2] * d[2];
  const V inv_dd = T(1) / (d[0] * d[0] + d[1] * d[1] + d[2] * d[2] + veps);
  const V gdot = g[0] * d[0] + g[1] * d[1] + g[2] * d[2];
  // out = q - keep * (q.d) d / dd where q.d < 0
  const V bent = where_negative(dot, V{} + keep);
  const V along = bent * gdot * inv_dd;
  const V gq[3] = {g[0] - along * d[0], g[1] - along * d[1], g[2] - along * d[2]};
  const V gqp = gq[0] * p[0] + gq[1] * p[1] + gq[2] * p[2];
  r.gy = gqp * inv_l;
  if constexpr (kFull) {
    const V a1 = -bent * dot * inv_dd;  // coefficient of g
    const V a2 = -along;  // of q
    const V a3 = T(2) * bent * dot * gdot * inv_dd * inv_dd;  // of d
    for (int a = 0; a < 3; ++a) r.gd[a] = a1 * g[a] + a2 * q[a] + a3 * d[a];
    const V gl = -r.gy * ratio + k.invstd * (k.gamma * r.gy - k.mean_gx - r.xhat * k.mean_gxx);
    // d l / d p = p / |p|, zero at p = 0
    const V scale = where_positive(norm, gl / lane_max(norm, V{} + std::numeric_limits<T>::min()));
    for (int a = 0; a < 3; ++a) r.gp[a] = gq[a] * ratio + scale * p[a];
  }
  return r;
}

// entry_gradient of one entry, all L lanes, from buffers (3 rows of L lanes each; gout zero in the
// channels that receive none). Every lane computes the same straight-line code so that the loop
// vectorizes. With kFull false only gy and xhat are written.
template <bool kFull, typename acc_t>
__attribute__((noinline)) void entry_backward(const acc_t* pv, const acc_t* dv, const acc_t* gout, const BackwardConstants<acc_t>& k,
                           int64_t L, acc_t* __restrict__ gy_out, acc_t* __restrict__ xhat_out, acc_t* __restrict__ gp,
                           acc_t* __restrict__ gd) {
#pragma GCC ivdep
  for (int64_t c = 0; c < L; ++c) {
    const acc_t p[3] = {pv[c], pv[L + c], pv[2 * L + c]}, d[3] = {dv[c], dv[L + c], dv[2 * L + c]},
                g[3] = {gout[c], gout[L + c], gout[2 * L + c]};
    const auto r = entry_gradient<kFull>(p, d, g, LaneConstants<acc_t>{k.mean[c], k.invstd[c], k.gamma[c], k.beta[c],
                                                                       k.mean_gx[c], k.mean_gxx[c]}, k.keep);
    gy_out[c] = r.gy;
    xhat_out[c] = r.xhat;
    if constexpr (kFull) {
      for (int a = 0; a < 3; ++a) {
        gp[a * L + c] = r.gp[a];
        gd[a * L + c] = r.gd[a];
      }
    }
  }
}

// gl / |p| of statistics_backward in one lane or a vector of lanes V (zero at p = 0).
template <typename T, typename V>
inline V statistics_scale(const V (&p)[3], V mean, V invstd, V mean_gx, V mean_gxx) {
  const V norm = entry_norm(p);
  const V xhat = (norm + static_cast<T>(kVectorEps) - mean) * invstd;
  const V gl = -invstd * (mean_gx + xhat * mean_gxx);
  return where_positive(norm, gl / lane_max(norm, V{} + std::numeric_limits<T>::min()));
}

// The gradient of p of one entry through the batch statistics alone (every lane):
// gp = gl / |p| * p with gl = -invstd (mean_gx + xhat mean_gxx): what an edge convolution's
// entries get besides the selected neighbour's upstream gradient.
template <typename acc_t>
__attribute__((noinline)) void statistics_backward(const acc_t* pv, const BackwardConstants<acc_t>& k, int64_t L, acc_t* __restrict__ gp) {
#pragma GCC ivdep
  for (int64_t c = 0; c < L; ++c) {
    const acc_t p[3] = {pv[c], pv[L + c], pv[2 * L + c]};
    const acc_t scale = statistics_scale<acc_t>(p, k.mean[c], k.invstd[c], k.mean_gx[c], k.mean_gxx[c]);
    for (int a = 0; a < 3; ++a) gp[a * L + c] = scale * p[a];
  }
}

#if defined(__AVX512F__)
// An edge convolution's batch-statistics pass (statistics_backward for every entry of graphs
// [begin, end)) with each entry in registers: kBlocks vectors cover the C channels. The per-entry
// form wrote every entry's gradient to a buffer and read it back twice (its neighbour's row and
// its centre's), each load waiting on those stores: 2.4x as long at the n-body size (0.65 against
// 0.27 ms), which had made this pass half the backward. Here the centre's sum stays in registers
// over the node's K entries, and the neighbours' rows are summed in a graph buffer of whole
// vectors (row (j, a) at (j * 3 + a) * kBlocks * kLanes), in the per-entry form's order.
template <int kBlocks, typename T>
void edge_statistics_pass(const Vectors<T>& p, const Vectors<T>& p_centre, const int64_t* nbr, const bool* valid,
                          const BackwardConstants<T>& k, int64_t n, int64_t K, int64_t C, int64_t begin, int64_t end,
                          T* gp, T* gpc, int64_t p_graph, int64_t p_node, int64_t p_row) {
  using W = Vector512<T>;
  using Vec = typename W::Vec;
  constexpr int64_t S = kBlocks * W::kLanes;
  typename W::Mask tail[kBlocks];
  Vec mean[kBlocks], invstd[kBlocks], mean_gx[kBlocks], mean_gxx[kBlocks];
  for (int v = 0; v < kBlocks; ++v) {
    tail[v] = W::first(C - v * W::kLanes);
    mean[v] = W::load(tail[v], k.mean + v * W::kLanes);
    invstd[v] = W::load(tail[v], k.invstd + v * W::kLanes);
    mean_gx[v] = W::load(tail[v], k.mean_gx + v * W::kLanes);
    mean_gxx[v] = W::load(tail[v], k.mean_gxx + v * W::kLanes);
  }
  std::vector<T> graph(n * 3 * S);
  for (int64_t b = begin; b < end; ++b) {
    std::fill(graph.begin(), graph.end(), T(0));
    for (int64_t i = 0; i < n; ++i) {
      const int64_t row = b * n + i;
      if (valid && !valid[row]) continue;
      Vec centre[3][kBlocks], sum[3][kBlocks];
      for (int a = 0; a < 3; ++a)
        for (int v = 0; v < kBlocks; ++v) {
          centre[a][v] = p_centre ? W::load(tail[v], p_centre.at(b, i, a) + v * W::kLanes) : W::zero();
          sum[a][v] = W::zero();
        }
      for (int64_t e = 0; e < K; ++e) {
        const int64_t j = nbr[row * K + e];
        T* to = graph.data() + j * 3 * S;
        for (int v = 0; v < kBlocks; ++v) {
          Vec x[3];
          for (int a = 0; a < 3; ++a)
            x[a] = W::add(W::load(tail[v], p.at(b, j, a) + v * W::kLanes), centre[a][v]);
          const Vec scale = statistics_scale<T>(x, mean[v], invstd[v], mean_gx[v], mean_gxx[v]);  // 0 past C
          for (int a = 0; a < 3; ++a) {
            const Vec g = scale * x[a];
            T* at = to + a * S + v * W::kLanes;
            W::store(at, W::add(W::load(at), g));
            sum[a][v] = W::add(sum[a][v], g);
          }
        }
      }
      if (!gpc) continue;
      for (int a = 0; a < 3; ++a)
        for (int v = 0; v < kBlocks; ++v) {
          T* at = gpc + b * p_graph + i * p_node + a * p_row + v * W::kLanes;
          W::store(tail[v], at, W::add(W::load(tail[v], at), sum[a][v]));
        }
    }
    for (int64_t j = 0; j < n; ++j)
      for (int a = 0; a < 3; ++a)
        for (int v = 0; v < kBlocks; ++v) {
          T* at = gp + b * p_graph + j * p_node + a * p_row + v * W::kLanes;
          W::store(tail[v], at, W::add(W::load(tail[v], at), W::load(graph.data() + (j * 3 + a) * S + v * W::kLanes)));
        }
  }
}
#endif

struct Shape {
  int64_t N, n, K, C, D;
  bool edges;
};

// Entry buffers hold each coordinate's channels padded to a multiple of 8 lanes (a 32-byte vector
// of float): the channel loops run whole 64-byte vectors and one 32-byte epilogue at most (21
// float channels: 24 lanes, not 32). The padding lanes compute on zeros and are never read.
inline int64_t lanes(int64_t C) { return (C + 7) / 8 * 8; }
// Whole-vector gathers and scatters (read_selected, the backward's scatter) touch up to a vector
// past a row's L lanes: into the next row (rewritten afterwards, or rewritten unchanged), and
// past the last row into this much slack at the end of the buffer.
constexpr int64_t kSlack = 16;
// The register forms of the edge backward serve up to this many vectors of channels.
constexpr int64_t kMaxBlocks = 3;


}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> vn_layer(
    const at::Tensor& p, const at::Tensor& d, const c10::optional<at::Tensor>& p_centre,
    const c10::optional<at::Tensor>& d_centre, const c10::optional<at::Tensor>& neighbours,
    const c10::optional<at::Tensor>& pool, const c10::optional<at::Tensor>& mask, const at::Tensor& weight,
    const at::Tensor& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double eps, double slope, const c10::optional<at::Tensor>& into) {
  const Shape s{p.size(0), p.size(1), neighbours.has_value() ? neighbours->size(2) : 1, p.size(3), d.size(3),
                neighbours.has_value()};
  const bool training = !running_mean.has_value();
  at::Tensor out = into.has_value() ? *into : at::empty(p.sizes(), p.options());
  at::Tensor selected = s.edges ? at::zeros({s.N, s.n, s.C}, p.options().dtype(at::kLong))
                                : at::empty({0}, p.options().dtype(at::kLong));
  at::Tensor stats = at::empty({2, s.C}, p.options());
  if (s.C == 0) return {out, selected, stats};

  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "vn_layer_cpu", [&] {
    using acc_t = scalar_t;
    const int64_t C = s.C, D = s.D, K = s.K, n = s.n, L = lanes(C);
    const EntryReader<scalar_t, acc_t> reader{
        Vectors<scalar_t>(p), Vectors<scalar_t>(d),
        p_centre.has_value() ? Vectors<scalar_t>(*p_centre) : Vectors<scalar_t>(),
        d_centre.has_value() ? Vectors<scalar_t>(*d_centre) : Vectors<scalar_t>(), C, D, L};
    const int64_t* nbr = s.edges ? neighbours->const_data_ptr<int64_t>() : nullptr;
    const bool* valid = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
    auto neighbour = [&](int64_t b, int64_t i, int64_t k) { return nbr ? nbr[(b * n + i) * K + k] : i; };

    // Statistics: the batch's (training) or the running ones.
    std::vector<double> mean(C), invstd(C), var(C);
    if (training) {
      const int64_t chunks = chunk_count(s.N);
      // per chunk, the sums of every lane (see accumulate_lengths)
      std::vector<double> partial(chunks * 2 * L, 0.0), count(chunks, 0.0);
      at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
#if defined(__AVX512F__)
        // Each entry's lengths in registers, summed in double in registers over the chunk, in the
        // loop's order (through pv, each entry's loads waited on its stores).
        using W = Vector512<acc_t>;
        using Vec = typename W::Vec;
        constexpr int kHalves = sizeof(acc_t) == 4 ? 2 : 1;  // double vectors per vector of acc_t
        auto sums_in_registers = [&]<int kBlocks>(int64_t chunk) {
          typename W::Mask tail[kBlocks];
          for (int v = 0; v < kBlocks; ++v) tail[v] = W::first(C - v * W::kLanes);
          __m512d sum[kBlocks][kHalves], squares[kBlocks][kHalves];
          for (int v = 0; v < kBlocks; ++v)
            for (int h = 0; h < kHalves; ++h) sum[v][h] = squares[v][h] = _mm512_setzero_pd();
          for (int64_t b = chunk_begin(chunk, chunks, s.N); b < chunk_begin(chunk + 1, chunks, s.N); ++b) {
            for (int64_t i = 0; i < n; ++i) {
              if (valid && !valid[b * n + i]) continue;
              count[chunk] += K;
              for (int64_t k = 0; k < K; ++k) {
                const int64_t j = neighbour(b, i, k);
                for (int v = 0; v < kBlocks; ++v) {
                  Vec x[3];
                  for (int a = 0; a < 3; ++a) x[a] = reader.load_p(b, i, j, a, v * W::kLanes, tail[v]);
                  const Vec norm = entry_norm(x);
                  for (int h = 0; h < kHalves; ++h) {
                    const __m512d l = _mm512_add_pd(in_double<acc_t>(norm, h), _mm512_set1_pd(kVectorEps));
                    sum[v][h] = _mm512_add_pd(sum[v][h], l);
                    squares[v][h] = _mm512_add_pd(squares[v][h], _mm512_mul_pd(l, l));
                  }
                }
              }
            }
          }
          double* out = partial.data() + chunk * 2 * L;
          for (int v = 0; v < kBlocks; ++v)
            for (int h = 0; h < kHalves; ++h) {
              const int64_t c0 = v * W::kLanes + h * 8;
              const __mmask8 lanes = Vector512<double>::first(L - c0);
              _mm512_mask_storeu_pd(out + c0, lanes, sum[v][h]);
              _mm512_mask_storeu_pd(out + L + c0, lanes, squares[v][h]);
            }
        };
        if (C <= kMaxBlocks * W::kLanes) {
          for (int64_t chunk = begin; chunk < end; ++chunk) {
            if (C <= W::kLanes) {
              sums_in_registers.template operator()<1>(chunk);
            } else if (C <= 2 * W::kLanes) {
              sums_in_registers.template operator()<2>(chunk);
            } else {
              sums_in_registers.template operator()<3>(chunk);
            }
          }
          return;
        }
#endif
        std::vector<acc_t> pv(3 * L, acc_t(0)), dv(3 * L, acc_t(0));
        for (int64_t chunk = begin; chunk < end; ++chunk) {
          double* sum = partial.data() + chunk * 2 * L;
          double* squares = sum + L;
          for (int64_t b = chunk_begin(chunk, chunks, s.N); b < chunk_begin(chunk + 1, chunks, s.N); ++b) {
            for (int64_t i = 0; i < n; ++i) {
              if (valid && !valid[b * n + i]) continue;
              count[chunk] += K;
              for (int64_t k = 0; k < K; ++k) {
                reader.read_p(b, i, neighbour(b, i, k), pv.data());
                accumulate_lengths(pv.data(), L, sum, squares);
              }
            }
          }
        }
      });
      double total = 0.0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) total += count[chunk];
      const double denominator = std::max(total, 1.0);
      for (int64_t c = 0; c < C; ++c) {
        double sum = 0.0, squares = 0.0;
        for (int64_t chunk = 0; chunk < chunks; ++chunk) {
          sum += partial[chunk * 2 * L + c];
          squares += partial[chunk * 2 * L + L + c];
        }
        mean[c] = sum / denominator;
        var[c] = std::max(squares / denominator - mean[c] * mean[c], 0.0);
      }
    } else {
      const at::Tensor rm = running_mean->to(at::kDouble).contiguous(), rv = running_var->to(at::kDouble).contiguous();
      for (int64_t c = 0; c < C; ++c) {
        mean[c] = rm.const_data_ptr<double>()[c];
        var[c] = rv.const_data_ptr<double>()[c];
      }
    }
    for (int64_t c = 0; c < C; ++c) invstd[c] = 1.0 / std::sqrt(var[c] + eps);
    scalar_t* stats_out = stats.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      stats_out[c] = static_cast<scalar_t>(mean[c]);
      stats_out[C + c] = static_cast<scalar_t>(var[c]);
    }

    const at::Tensor w = weight.contiguous(), bb = bias.contiguous();
    const scalar_t* gamma = w.const_data_ptr<scalar_t>();
    const scalar_t* beta = bb.const_data_ptr<scalar_t>();

    constexpr int64_t kLanes = 64 / sizeof(acc_t);
    // An edge convolution's entries in registers from their reads to their outputs where whole
    // vectors cover the channels (D == C, at most kMaxBlocks vectors); their outputs and scores
    // then sit in rows of `blocks` whole vectors (stride Lo), for the pool scores' broadcasts.
    const int64_t blocks = (C + kLanes - 1) / kLanes;
#if defined(__AVX512F__)
    const bool in_registers = s.edges && D == C && blocks <= kMaxBlocks;
#else
    const bool in_registers = false;
#endif
    const int64_t Lo = in_registers ? blocks * kLanes : L;
    // pool transposed and zero-padded to Lo columns (see pool_scores)
    std::vector<acc_t> pool_t(s.edges ? C * Lo : 0, acc_t(0));
    if (s.edges) {
      const at::Tensor pool_c = pool->contiguous();
      const scalar_t* w_src = pool_c.const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c)
        for (int64_t e = 0; e < C; ++e) pool_t[e * Lo + c] = static_cast<acc_t>(w_src[c * C + e]);
    }
    // whole vectors, and a half vector where the channels past them fit in one
    const int64_t whole = C / kLanes, rest = C - whole * kLanes;
    const bool half = rest > 0 && rest <= kLanes / 2;
    const int64_t vectors = whole + (rest > 0 && !half ? 1 : 0);
    // Scores of `group` entries at a time (o: entries of 3 * L lanes each; score: L lanes each).
    const int64_t group = s.edges ? pool_group(static_cast<int>(vectors), half) : 1;
    auto scores_of = [&](const acc_t* o, acc_t* score) {
      const acc_t* pt = pool_t.data();
      const int64_t stride = 3 * Lo;
      switch (vectors * 2 + (half ? 1 : 0)) {
        case 1: return pool_scores<0, true, pool_group(0, true)>(o, stride, pt, C, Lo, score);
        case 2: return pool_scores<1, false, pool_group(1, false)>(o, stride, pt, C, Lo, score);
        case 3: return pool_scores<1, true, pool_group(1, true)>(o, stride, pt, C, Lo, score);
        case 4: return pool_scores<2, false, pool_group(2, false)>(o, stride, pt, C, Lo, score);
        case 5: return pool_scores<2, true, pool_group(2, true)>(o, stride, pt, C, Lo, score);
        case 6: return pool_scores<3, false, pool_group(3, false)>(o, stride, pt, C, Lo, score);
        case 7: return pool_scores<3, true, pool_group(3, true)>(o, stride, pt, C, Lo, score);
        case 8: return pool_scores<4, false, pool_group(4, false)>(o, stride, pt, C, Lo, score);
        default: return pool_scores<0, false, 1>(o, stride, pt, C, Lo, score);
      }
    };
    scalar_t* target = out.mutable_data_ptr<scalar_t>();
    const int64_t out_graph = out.stride(0), out_node = out.stride(1), out_row = out.stride(2);
    int64_t* chosen = s.edges ? selected.mutable_data_ptr<int64_t>() : nullptr;
    const acc_t keep = static_cast<acc_t>(1.0 - slope);
    std::vector<acc_t> scale(L, acc_t(0)), shift(L, acc_t(0));
    for (int64_t c = 0; c < C; ++c) {  // y = l * scale + shift
      scale[c] = static_cast<acc_t>(invstd[c] * static_cast<double>(gamma[c]));
      shift[c] = static_cast<acc_t>(static_cast<double>(beta[c]) - mean[c] * invstd[c] * static_cast<double>(gamma[c]));
    }

    at::parallel_for(0, s.N * n, std::max<int64_t>(1, 4096 / (K * C + 1)), [&](int64_t begin, int64_t end) {
      // every entry's output and score, rounded up to whole groups (the extra entries stay zero)
      const int64_t slots = s.edges ? (K + group - 1) / group * group : 1;
      std::vector<acc_t> pv(3 * L + kSlack, acc_t(0)), dv(3 * L + kSlack, acc_t(0)), o(slots * 3 * Lo, acc_t(0)),
          kept(3 * L), score(slots * Lo, acc_t(0)), best(Lo, acc_t(0)), which(Lo, acc_t(0));
#if defined(__AVX512F__)
      // The node's K entries: outputs into o (whole-vector stores, read back whole or broadcast),
      // scores, and the kept output per lane (keep_better's rule) straight to dst.
      using W = Vector512<acc_t>;
      using Vec = typename W::Vec;
      auto node_in_registers = [&]<int kBlocks>(int64_t b, int64_t i, int64_t row, acc_t* dst) {
        typename W::Mask tail[kBlocks];
        Vec scale_v[kBlocks], shift_v[kBlocks];
        for (int v = 0; v < kBlocks; ++v) {
          tail[v] = W::first(C - v * kLanes);
          scale_v[v] = W::load(tail[v], scale.data() + v * kLanes);
          shift_v[v] = W::load(tail[v], shift.data() + v * kLanes);
        }
        for (int64_t k = 0; k < K; ++k) {
          const int64_t j = neighbour(b, i, k);
          Vec out[kBlocks][3];
          for (int v = 0; v < kBlocks; ++v) {
            Vec pe[3], de[3];
            for (int a = 0; a < 3; ++a) {
              pe[a] = reader.load_p(b, i, j, a, v * kLanes, tail[v]);
              de[a] = reader.load_d(b, i, j, a, v * kLanes, tail[v]);
            }
            entry_output(pe, de, scale_v[v], shift_v[v], keep, out[v]);
          }
          for (int a = 0; a < 3; ++a)
            for (int v = 0; v < kBlocks; ++v) W::store(o.data() + (k * 3 + a) * Lo + v * kLanes, out[v][a]);
        }
        for (int64_t k = 0; k < K; k += group) scores_of(o.data() + k * 3 * Lo, score.data() + k * Lo);
        for (int v = 0; v < kBlocks; ++v) {
          const int64_t c0 = v * kLanes;
          Vec best_v = W::load(score.data() + c0), which_v = W::zero(), kept_v[3];
          for (int a = 0; a < 3; ++a) kept_v[a] = W::load(o.data() + a * Lo + c0);
          for (int64_t k = 1; k < K; ++k) {
            const Vec candidate = W::load(score.data() + k * Lo + c0);
            const auto better = W::greater(candidate, best_v);
            best_v = W::blend(better, best_v, candidate);
            which_v = W::blend(better, which_v, W::broadcast(static_cast<acc_t>(k)));
            for (int a = 0; a < 3; ++a)
              kept_v[a] = W::blend(better, kept_v[a], W::load(o.data() + (k * 3 + a) * Lo + c0));
          }
          for (int a = 0; a < 3; ++a) W::store(tail[v], dst + a * out_row + c0, kept_v[a]);
          W::store(which.data() + c0, which_v);
        }
        for (int64_t c = 0; c < C; ++c) chosen[row * C + c] = static_cast<int64_t>(which[c]);
      };
#endif
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / n, i = row % n;
        scalar_t* dst = target + b * out_graph + i * out_node;
        if (s.edges && valid && !valid[row]) {  // padded nodes: zero output
          for (int a = 0; a < 3; ++a) std::fill(dst + a * out_row, dst + a * out_row + C, scalar_t(0));
          continue;
        }
#if defined(__AVX512F__)
        if (!s.edges && D == C && blocks <= kMaxBlocks) {  // a per-node layer: the node in registers
          for (int64_t c0 = 0; c0 < C; c0 += kLanes) {
            const auto tail = W::first(C - c0);
            Vec pe[3], de[3], out[3];
            for (int a = 0; a < 3; ++a) {
              pe[a] = reader.load_p(b, i, i, a, c0, tail);
              de[a] = reader.load_d(b, i, i, a, c0, tail);
            }
            entry_output(pe, de, W::load(tail, scale.data() + c0), W::load(tail, shift.data() + c0), keep, out);
            for (int a = 0; a < 3; ++a) W::store(tail, dst + a * out_row + c0, out[a]);
          }
          continue;
        }
#endif
        if (!s.edges) {
          reader.read(b, i, i, pv.data(), dv.data());
          entry_forward(pv.data(), dv.data(), scale.data(), shift.data(), keep, L, o.data());
          for (int a = 0; a < 3; ++a) copy_row(dst + a * out_row, o.data() + a * L, C);
          continue;
        }
#if defined(__AVX512F__)
        if (in_registers) {
          switch (blocks) {
            case 1: node_in_registers.template operator()<1>(b, i, row, dst); break;
            case 2: node_in_registers.template operator()<2>(b, i, row, dst); break;
            default: node_in_registers.template operator()<3>(b, i, row, dst); break;
          }
          continue;
        }
#endif
        for (int64_t k = 0; k < K; ++k) {
          reader.read(b, i, neighbour(b, i, k), pv.data(), dv.data());
          entry_forward(pv.data(), dv.data(), scale.data(), shift.data(), keep, L, o.data() + k * 3 * L);
        }
        for (int64_t k = 0; k < K; k += group) scores_of(o.data() + k * 3 * L, score.data() + k * L);
        std::copy(score.begin(), score.begin() + L, best.begin());
        std::fill(which.begin(), which.end(), acc_t(0));
        std::copy(o.begin(), o.begin() + 3 * L, kept.begin());
        for (int64_t k = 1; k < K; ++k)
          keep_better(score.data() + k * L, o.data() + k * 3 * L, static_cast<acc_t>(k), L, best.data(), which.data(),
                      kept.data());
        for (int a = 0; a < 3; ++a) copy_row(dst + a * out_row, kept.data() + a * L, C);
        for (int64_t c = 0; c < C; ++c) chosen[row * C + c] = static_cast<int64_t>(which[c]);
      }
    });
  });
  return {out, selected, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> vn_layer_backward(
    const at::Tensor& grad, const at::Tensor& p, const at::Tensor& d, const c10::optional<at::Tensor>& p_centre,
    const c10::optional<at::Tensor>& d_centre, const c10::optional<at::Tensor>& neighbours,
    const at::Tensor& selected, const c10::optional<at::Tensor>& mask, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& stats, bool training, double eps, double slope,
    const c10::optional<at::Tensor>& into) {
  const Shape s{p.size(0), p.size(1), neighbours.has_value() ? neighbours->size(2) : 1, p.size(3), d.size(3),
                neighbours.has_value()};
  // The passes below write every row of the p and d gradients (zeros where none reaches): into column blocks
  // [p | p_centre | d | d_centre] of `into` where given, else into tensors of their own.
  at::Tensor grad_p, grad_d, grad_pc, grad_dc;
  if (into.has_value()) {
    int64_t column = 0;
    auto block = [&](int64_t width) { return into->narrow(3, (column += width) - width, width); };
    grad_p = block(s.C);
    grad_pc = p_centre.has_value() ? block(s.C) : at::empty({0}, p.options());
    grad_d = block(s.D);
    grad_dc = d_centre.has_value() ? block(s.D) : at::empty({0}, d.options());
  } else {
    grad_p = at::empty(p.sizes(), p.options());
    grad_d = at::empty(d.sizes(), d.options());
    grad_pc = p_centre.has_value() ? at::empty(p.sizes(), p.options()) : at::empty({0}, p.options());
    grad_dc = d_centre.has_value() ? at::empty(d.sizes(), d.options()) : at::empty({0}, d.options());
  }
  at::Tensor grad_weight = at::zeros({s.C}, weight.options());
  at::Tensor grad_bias = at::zeros({s.C}, bias.options());
  if (s.C == 0 || s.N * s.n == 0) {
    for (at::Tensor* t : {&grad_p, &grad_d, &grad_pc, &grad_dc}) t->zero_();
    return {grad_p, grad_d, grad_pc, grad_dc, grad_weight, grad_bias};
  }

  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "vn_layer_backward_cpu", [&] {
    using acc_t = scalar_t;
    const int64_t C = s.C, D = s.D, K = s.K, n = s.n, L = lanes(C);
    const EntryReader<scalar_t, acc_t> reader{
        Vectors<scalar_t>(p), Vectors<scalar_t>(d),
        p_centre.has_value() ? Vectors<scalar_t>(*p_centre) : Vectors<scalar_t>(),
        d_centre.has_value() ? Vectors<scalar_t>(*d_centre) : Vectors<scalar_t>(), C, D, L};
    const int64_t* nbr = s.edges ? neighbours->const_data_ptr<int64_t>() : nullptr;
    const int64_t* chosen = s.edges ? selected.const_data_ptr<int64_t>() : nullptr;
    const bool* valid = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
    const at::Tensor g = grad.contiguous(), st = stats.contiguous();
    const scalar_t* upstream = g.const_data_ptr<scalar_t>();
    std::vector<acc_t> mean(L, 0), invstd(L, 0), gamma(L, 0), beta(L, 0), mean_gx(L, 0), mean_gxx(L, 0), no_stats(L, 0);
    {
      const at::Tensor w = weight.contiguous(), bb = bias.contiguous();
      for (int64_t c = 0; c < C; ++c) {
        mean[c] = static_cast<acc_t>(st.const_data_ptr<scalar_t>()[c]);
        invstd[c] = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(st.const_data_ptr<scalar_t>()[C + c]) + eps));
        gamma[c] = static_cast<acc_t>(w.const_data_ptr<scalar_t>()[c]);
        beta[c] = static_cast<acc_t>(bb.const_data_ptr<scalar_t>()[c]);
      }
    }
    const acc_t keep = static_cast<acc_t>(1.0 - slope);
    // An edge convolution's padded nodes output zero (no gradient), and are outside the stats.
    auto skipped = [&](int64_t row) { return s.edges && valid && !valid[row]; };
    // The entry of node (b, i) that receives its upstream gradient, channel by channel: for an
    // edge convolution each channel's selected neighbour, for a per-node layer the node itself.
    auto read_receiving = [&](int64_t b, int64_t i, int64_t row, Selection<acc_t>& selection, acc_t* pv, acc_t* dv,
                              acc_t* gout) {
      if (chosen) {
        selection.fill(chosen + row * C);
        reader.read_selected(b, i, nbr + row * K, selection, pv, dv);
      } else {
        reader.read(b, i, i, pv, dv);
      }
      for (int a = 0; a < 3; ++a) copy_row(gout + a * L, upstream + row * 3 * C + a * C, C);
    };

    // strides of the p and d gradient blocks (the centre terms' blocks have the same)
    const int64_t p_graph = grad_p.stride(0), p_node = grad_p.stride(1), p_row = grad_p.stride(2),
                  d_graph = grad_d.stride(0), d_node = grad_d.stride(1), d_row = grad_d.stride(2);
    scalar_t* gp = grad_p.mutable_data_ptr<scalar_t>();
    scalar_t* gd = grad_d.mutable_data_ptr<scalar_t>();
    scalar_t* gpc = p_centre.has_value() ? grad_pc.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gdc = d_centre.has_value() ? grad_dc.mutable_data_ptr<scalar_t>() : nullptr;
    // A per-node layer's gradients of node (b, i) (3 rows of L lanes each) into the outputs: its
    // own p and d rows, and the centre terms' (a shared direction's summed over the channels).
    auto write_node_gradients = [&](int64_t b, int64_t i, const acc_t* from, const acc_t* dfrom) {
      for (int a = 0; a < 3; ++a) {
        const int64_t p_at = b * p_graph + i * p_node + a * p_row, d_at = b * d_graph + i * d_node + a * d_row;
        copy_row(gp + p_at, from + a * L, C);
        if (gpc) copy_row(gpc + p_at, from + a * L, C);
        if (D == 1) {
          const acc_t shared = channel_sum(dfrom + a * L, C);
          gd[d_at] = shared;
          if (gdc) gdc[d_at] = shared;
        } else {
          copy_row(gd + d_at, dfrom + a * L, D);
          if (gdc) copy_row(gdc + d_at, dfrom + a * L, D);
        }
      }
    };

    // Pass 1: per channel sums of g_y and g_y * xhat over the receiving entries (the others
    // contribute zero), for the affine gradients and the batch statistics' terms; and every
    // gradient but those terms (not known before the sums). An edge convolution's receiving entry
    // (each channel from its kept neighbour) scatters its gradient channel by channel to those
    // neighbours and to the node. Chunks are whole graphs, so the scatter never crosses threads:
    // each graph's gradients are summed in padded rows of a local buffer (whole vectors, read back
    // without waiting on masked stores) and written once.
    const int64_t chunks = chunk_count(s.N);
    std::vector<double> partial(chunks * 2 * C, 0.0);
    const BackwardConstants<acc_t> plain{mean.data(), invstd.data(), gamma.data(), beta.data(),
                                         no_stats.data(), no_stats.data(), keep};
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> pv(3 * L + kSlack, acc_t(0)), dv(3 * L + kSlack, acc_t(0)), gout(3 * L, acc_t(0)),
          gy(L + kSlack), xhat(L + kSlack), gpe(3 * L + kSlack), gde(3 * L + kSlack);  // the scatter reads them a whole vector at a time
      // An edge convolution's graph: row (j, a) at (j * 3 + a) * L; a shared direction's gradient in lane 0
      const int64_t graph_lanes = chosen ? n * 3 * L : 0;
      std::vector<acc_t> gp_graph(graph_lanes + kSlack), gd_graph(graph_lanes + kSlack),
          gpc_graph(gpc ? graph_lanes : 0), gdc_graph(gdc ? graph_lanes : 0);
      auto at_row = [&](std::vector<acc_t>& buffer, int64_t j, int a) { return buffer.data() + (j * 3 + a) * L; };
      Selection<acc_t> selection(K, C);
      // Each channel's gradients to the neighbour it kept (rows of the graph's buffers).
      auto scatter_selected = [&](int a, const acc_t* from, const acc_t* dfrom, const int64_t* neighbours_of_i,
                                  const Selection<acc_t>& kept) {
#if defined(__AVX512F__)
        if (D == C) {
          using W = Vector512<acc_t>;
          for (int64_t v = 0; v < kept.blocks; ++v) {
            const int64_t c0 = v * W::kLanes;
            const auto gp_from = W::load(from + c0), gd_from = W::load(dfrom + c0);
            for (int64_t k = 0; k < kept.K; ++k) {
              acc_t* gp_row = at_row(gp_graph, neighbours_of_i[k], a) + c0;
              acc_t* gd_row = at_row(gd_graph, neighbours_of_i[k], a) + c0;
              W::store(gp_row, W::add(kept.lanes(k, v), W::load(gp_row), gp_from));
              W::store(gd_row, W::add(kept.lanes(k, v), W::load(gd_row), gd_from));
            }
          }
          return;
        }
#endif
        for (int64_t c = 0; c < C; ++c) {
          const int64_t j = neighbours_of_i[kept.pick[c]];
          at_row(gp_graph, j, a)[c] += from[c];
          at_row(gd_graph, j, a)[D == 1 ? 0 : c] += dfrom[c];
        }
      };
#if defined(__AVX512F__)
      // An edge convolution's receiving entry with each block of lanes in registers, from its
      // gather to its scatter (D == C, C <= kMaxBlocks * W::kLanes). Through the entry buffers of
      // the form below, each step's loads waited on the previous step's stores (1.25x as long at the
      // n-body size).
      using W = Vector512<acc_t>;
      using Vec = typename W::Vec;
      auto backward_in_registers = [&](int64_t b, int64_t i, int64_t row) {
        selection.fill(chosen + row * C);
        const int64_t* neighbours_of_i = nbr + row * K;
        for (int64_t v = 0; v < selection.blocks; ++v) {
          const int64_t c0 = v * W::kLanes;
          const auto tail = W::first(C - c0);
          Vec pe[3], de[3], ge[3];
          for (int a = 0; a < 3; ++a) {
            Vec ps = W::zero(), ds = W::zero();
            for (int64_t k = 0; k < K; ++k) {
              const int64_t j = neighbours_of_i[k];
              ps = W::load(ps, selection.lanes(k, v), reader.p.at(b, j, a) + c0);
              ds = W::load(ds, selection.lanes(k, v), reader.d.at(b, j, a) + c0);
            }
            pe[a] = reader.plus_centre(ps, reader.p_centre, b, i, a, c0, tail);
            de[a] = reader.plus_centre(ds, reader.d_centre, b, i, a, c0, tail);
            ge[a] = W::load(tail, upstream + row * 3 * C + a * C + c0);
          }
          const LaneConstants<Vec> constants{W::load(tail, mean.data() + c0),  W::load(tail, invstd.data() + c0),
                                             W::load(tail, gamma.data() + c0), W::load(tail, beta.data() + c0),
                                             W::zero(),                        W::zero()};
          const auto r = entry_gradient<true>(pe, de, ge, constants, keep);
          W::store(gy.data() + c0, r.gy);
          W::store(xhat.data() + c0, r.xhat);
          for (int a = 0; a < 3; ++a) {
            for (int64_t k = 0; k < K; ++k) {
              acc_t* gp_row = at_row(gp_graph, neighbours_of_i[k], a) + c0;
              acc_t* gd_row = at_row(gd_graph, neighbours_of_i[k], a) + c0;
              W::store(gp_row, W::add(selection.lanes(k, v), W::load(gp_row), r.gp[a]));
              W::store(gd_row, W::add(selection.lanes(k, v), W::load(gd_row), r.gd[a]));
            }
            // the node's own centre terms receive only this entry: stored, lanes past C kept
            if (gpc) W::store(tail, at_row(gpc_graph, i, a) + c0, r.gp[a]);
            if (gdc) W::store(tail, at_row(gdc_graph, i, a) + c0, r.gd[a]);
          }
        }
      };
      // (A per-node layer's entry in registers, stored straight to its outputs, measured 1.35x
      // slower than the form below.)
      const bool in_registers = chosen && D == C && C <= kMaxBlocks * W::kLanes;
#else
      const bool in_registers = false;
#endif
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        double* sum_gy = partial.data() + chunk * 2 * C;
        double* sum_gyx = sum_gy + C;
        for (int64_t b = chunk_begin(chunk, chunks, s.N); b < chunk_begin(chunk + 1, chunks, s.N); ++b) {
          if (chosen)
            for (auto* buffer : {&gp_graph, &gd_graph, &gpc_graph, &gdc_graph})
              std::fill(buffer->begin(), buffer->end(), acc_t(0));
          for (int64_t i = 0; i < n; ++i) {
            const int64_t row = b * n + i;
            if (skipped(row)) continue;
#if defined(__AVX512F__)
            if (in_registers) {
              backward_in_registers(b, i, row);
            } else
#endif
            {
              read_receiving(b, i, row, selection, pv.data(), dv.data(), gout.data());
              entry_backward<true>(pv.data(), dv.data(), gout.data(), plain, L, gy.data(), xhat.data(), gpe.data(),
                                   gde.data());
            }
            for (int64_t c = 0; c < C; ++c) {
              sum_gy[c] += gy[c];
              sum_gyx[c] += gy[c] * xhat[c];
            }
            if (in_registers) continue;
            if (!chosen) {
              write_node_gradients(b, i, gpe.data(), gde.data());
              continue;
            }
            for (int a = 0; a < 3; ++a) {
              const acc_t* from = gpe.data() + a * L;
              const acc_t* dfrom = gde.data() + a * L;
              scatter_selected(a, from, dfrom, nbr + row * K, selection);
              if (gpc) add_row(at_row(gpc_graph, i, a), from, L);
              if (gdc) {
                if (D == 1) {
                  at_row(gdc_graph, i, a)[0] += channel_sum(dfrom, C);
                } else {
                  add_row(at_row(gdc_graph, i, a), dfrom, L);
                }
              }
            }
          }
          if (!chosen) continue;
          for (int64_t j = 0; j < n; ++j) {
            for (int a = 0; a < 3; ++a) {
              const int64_t p_at = b * p_graph + j * p_node + a * p_row, d_at = b * d_graph + j * d_node + a * d_row;
              copy_row(gp + p_at, at_row(gp_graph, j, a), C);
              copy_row(gd + d_at, at_row(gd_graph, j, a), D);
              if (gpc) copy_row(gpc + p_at, at_row(gpc_graph, j, a), C);
              if (gdc) copy_row(gdc + d_at, at_row(gdc_graph, j, a), D);
            }
          }
        }
      }
    });
    {
      double count = 0.0;
      for (int64_t row = 0; row < s.N * n; ++row) count += (!valid || valid[row]) ? K : 0;
      const double denominator = std::max(count, 1.0);
      scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
      scalar_t* gb = grad_bias.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        double sum_gy = 0.0, sum_gyx = 0.0;
        for (int64_t chunk = 0; chunk < chunks; ++chunk) {
          sum_gy += partial[chunk * 2 * C + c];
          sum_gyx += partial[chunk * 2 * C + C + c];
        }
        gw[c] = static_cast<scalar_t>(sum_gyx);
        gb[c] = static_cast<scalar_t>(sum_gy);
        if (training) {
          mean_gx[c] = static_cast<acc_t>(sum_gy * static_cast<double>(gamma[c]) / denominator);
          mean_gxx[c] = static_cast<acc_t>(sum_gyx * static_cast<double>(gamma[c]) / denominator);
        }
      }
    }

    // Pass 2: the batch statistics' terms, which pass 1 could not know yet (training only).
    const BackwardConstants<acc_t> with_stats{mean.data(), invstd.data(), gamma.data(), beta.data(),
                                              mean_gx.data(), mean_gxx.data(), keep};
    if (!chosen) {
      // A per-node layer: pass 1 wrote every gradient but, in training, the batch statistics'
      // terms of the p gradients of real nodes, gl / |p| * p (see statistics_backward).
      if (!training) return;
#if defined(__AVX512F__)
      using W = Vector512<acc_t>;
      using Vec = typename W::Vec;
      if (C <= kMaxBlocks * W::kLanes) {  // each node in registers (see edge_statistics_pass)
        at::parallel_for(0, s.N * n, std::max<int64_t>(1, 2048 / (C + 1)), [&](int64_t begin, int64_t end) {
          for (int64_t row = begin; row < end; ++row) {
            if (valid && !valid[row]) continue;
            const int64_t b = row / n, i = row % n;
            for (int64_t c0 = 0; c0 < C; c0 += W::kLanes) {
              const auto tail = W::first(C - c0);
              Vec x[3];
              for (int a = 0; a < 3; ++a) x[a] = reader.load_p(b, i, i, a, c0, tail);
              const Vec scale = statistics_scale<acc_t>(x, W::load(tail, mean.data() + c0),
                                                        W::load(tail, invstd.data() + c0),
                                                        W::load(tail, mean_gx.data() + c0),
                                                        W::load(tail, mean_gxx.data() + c0));
              for (int a = 0; a < 3; ++a) {
                const Vec g = scale * x[a];
                const int64_t p_at = b * p_graph + i * p_node + a * p_row + c0;
                W::store(tail, gp + p_at, W::add(W::load(tail, gp + p_at), g));
                if (gpc) W::store(tail, gpc + p_at, W::add(W::load(tail, gpc + p_at), g));
              }
            }
          }
        });
        return;
      }
#endif
      at::parallel_for(0, s.N * n, std::max<int64_t>(1, 2048 / (C + 1)), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> pv(3 * L + kSlack, acc_t(0)), gpe(3 * L);
        for (int64_t row = begin; row < end; ++row) {
          if (valid && !valid[row]) continue;
          const int64_t b = row / n, i = row % n;
          reader.read_p(b, i, i, pv.data());
          statistics_backward(pv.data(), with_stats, L, gpe.data());
          for (int a = 0; a < 3; ++a) {
            const int64_t p_at = b * p_graph + i * p_node + a * p_row;
            add_row(gp + p_at, gpe.data() + a * L, C);
            if (gpc) add_row(gpc + p_at, gpe.data() + a * L, C);
          }
        }
      });
      return;
    }
    // An edge convolution in training: every entry's gradient through the batch statistics,
    // summed per graph in padded local rows as in pass 1 and added to the outputs once.
    if (!training) return;
    const int64_t grain = std::max<int64_t>(1, 2048 / (n * K * C + 1));
#if defined(__AVX512F__)
    using W = Vector512<acc_t>;
    if (C <= kMaxBlocks * W::kLanes) {
      at::parallel_for(0, s.N, grain, [&](int64_t begin, int64_t end) {
        auto pass = C <= W::kLanes       ? edge_statistics_pass<1, acc_t>
                    : C <= 2 * W::kLanes ? edge_statistics_pass<2, acc_t>
                                         : edge_statistics_pass<3, acc_t>;
        pass(reader.p, reader.p_centre, nbr, valid, with_stats, n, K, C, begin, end, gp, gpc, p_graph, p_node, p_row);
      });
      return;
    }
#endif
    at::parallel_for(0, s.N, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> pv(3 * L + kSlack, acc_t(0)), gpe(3 * L);
      const int64_t graph_lanes = n * 3 * L;
      std::vector<acc_t> gp_graph(graph_lanes), gpc_graph(gpc ? graph_lanes : 0);
      auto at_row = [&](std::vector<acc_t>& buffer, int64_t j, int a) { return buffer.data() + (j * 3 + a) * L; };
      for (int64_t b = begin; b < end; ++b) {
        for (auto* buffer : {&gp_graph, &gpc_graph}) std::fill(buffer->begin(), buffer->end(), acc_t(0));
        for (int64_t i = 0; i < n; ++i) {
          const int64_t row = b * n + i;
          if (skipped(row)) continue;
          for (int64_t k = 0; k < K; ++k) {
            const int64_t j = nbr[row * K + k];
            reader.read_p(b, i, j, pv.data());
            statistics_backward(pv.data(), with_stats, L, gpe.data());
            for (int a = 0; a < 3; ++a) {
              add_row(at_row(gp_graph, j, a), gpe.data() + a * L, L);
              if (gpc) add_row(at_row(gpc_graph, i, a), gpe.data() + a * L, L);
            }
          }
        }
        for (int64_t j = 0; j < n; ++j) {
          for (int a = 0; a < 3; ++a) {
            const int64_t p_at = b * p_graph + j * p_node + a * p_row;
            add_row(gp + p_at, at_row(gp_graph, j, a), C);
            if (gpc) add_row(gpc + p_at, at_row(gpc_graph, j, a), C);
          }
        }
      }
    });
  });
  return {grad_p, grad_d, grad_pc, grad_dc, grad_weight, grad_bias};
}

}  // namespace cpu
}  // namespace lps_fast
