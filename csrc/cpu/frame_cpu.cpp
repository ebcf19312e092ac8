// CPU kernels of the frame family (docs/SPEC.md, "Ops"). Centering, the permutation gather or
// scatter, the 3 x 3 rotation and the mean over samples are one pass over the data. The
// forward walks one sample's points in order (no index division per point) with the rotation
// in registers; small channel counts are compile-time constants so the per-point loops unroll.
// On AVX-512 CPUs 1, 2 or 4 channels of float or double run vectorized across points (see
// FrameChunk); the scalar loops serve the rest.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include "cpu/frame_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/permute_cpu.h"

#if defined(__AVX512F__)
#include "cpu/vector512.h"
#endif

namespace lps_fast {
namespace cpu {
namespace {

constexpr int64_t kGrainElements = 1 << 14;

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(elements_per_item, 1));
}

#if defined(__AVX512F__)
// The frame kernels vectorized across points. Point data is (n, 3, C): a chunk of three vectors
// (3 L values, L lanes) holds L / C whole points when C divides L. A 3 x 3 map of every point in
// a chunk is then nine aligned products: for each output vector o and input component i, the
// lanes of component i of each output lane's point and channel, gathered from two adjacent input
// vectors by one two-table permute (two and a blend where they span all three), times a
// coefficient vector (the matrix entry of each
// output lane's component). The kernels below run on such chunks, with masked loads and stores
// for the last one; the rows of a permuted sample are copied in order first (see gather_rows).
// Whether the chunked form serves C channels of scalar_t (half types take the scalar loops).
template <int C, typename scalar_t>
constexpr bool kChunkedFrames =
    (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) && (C == 1 || C == 2 || C == 4);

template <int C, typename scalar_t>
struct FrameChunk {
  using V = Vector512<scalar_t>;
  using Vec = typename V::Vec;
  using Mask = typename V::Mask;
  static constexpr int L = V::kLanes;
  static constexpr int kPointSize = 3 * C;
  static constexpr int kPoints = L / C;       // points per chunk
  static constexpr int kValues = 3 * L;       // values per chunk
  static_assert(L % C == 0, "a chunk holds whole points");

  // [o][i]: where component i of the point and channel of output lane (o, l) lies: in vectors
  // lowest[o][i] and lowest[o][i] + 1 (positions relative to the lower one), or, where those
  // lanes reach all three vectors, at chunk position source[o][i], in_third marking vector 2
  __m512i source[3][3];
  int lowest[3][3];
  bool in_two[3][3];
  Mask in_third[3][3];
  __m512i component[3];     // [o]: the component (0..2) of output lane (o, l)
  Mask has_component[3][3]; // [o][m]: lanes of component m

  FrameChunk() {
    alignas(64) typename V::index_t positions[L];
    for (int o = 0; o < 3; ++o) {
      for (int i = 0; i < 3; ++i) {
        Mask third = 0;
        int low = 2, high = 0;
        for (int l = 0; l < L; ++l) {
          const int p = o * L + l, point = p / kPointSize, c = p % C;
          positions[l] = point * kPointSize + i * C + c;
          if (positions[l] >= 2 * L) third |= Mask(Mask(1) << l);
          low = std::min(low, static_cast<int>(positions[l] / L));
          high = std::max(high, static_cast<int>(positions[l] / L));
        }
        in_two[o][i] = high - low <= 1;
        lowest[o][i] = std::min(low, 1);
        if (in_two[o][i]) {
          for (int l = 0; l < L; ++l) positions[l] -= lowest[o][i] * L;
        }
        source[o][i] = V::index(positions);
        in_third[o][i] = third;
      }
      Mask lanes[3] = {0, 0, 0};
      for (int l = 0; l < L; ++l) {
        const int m = ((o * L + l) / C) % 3;
        positions[l] = m;
        lanes[m] |= Mask(Mask(1) << l);
      }
      component[o] = V::index(positions);
      for (int m = 0; m < 3; ++m) has_component[o][m] = lanes[m];
    }
  }

  // Component i of the point and channel of every lane of output vector o.
  Vec align(const Vec in[3], int o, int i) const {
    if (in_two[o][i]) return V::pick(in[lowest[o][i]], source[o][i], in[lowest[o][i] + 1]);
    return V::blend(in_third[o][i], V::pick(in[0], source[o][i], in[1]), V::pick(source[o][i], in[2]));
  }

  // coefficient[o][i] lane l = M[component(o, l)][i] for a 3 x 3 matrix M (row-major).
  void coefficients(const scalar_t M[9], Vec coefficient[3][3]) const {
    for (int i = 0; i < 3; ++i) {
      const scalar_t column_values[3] = {M[i], M[3 + i], M[6 + i]};
      const Vec column = V::load(V::first(3), column_values);
      for (int o = 0; o < 3; ++o) coefficient[o][i] = V::pick(component[o], column);
    }
  }

  // The coefficients of scale * M^T (the maps by R^T of frame_apply and its adjoint's gradient).
  void transposed_coefficients(const scalar_t M[9], scalar_t scale, Vec coefficient[3][3]) const {
    scalar_t transposed[9];
    for (int a = 0; a < 3; ++a) {
      for (int m = 0; m < 3; ++m) transposed[m * 3 + a] = M[a * 3 + m] * scale;
    }
    coefficients(transposed, coefficient);
  }

  // out[o] = sum_i coefficient[o][i] * align(in, o, i): the map applied to every point
  void map(const Vec in[3], const Vec coefficient[3][3], Vec out[3]) const {
    for (int o = 0; o < 3; ++o) {
      Vec acc = V::zero();
      for (int i = 0; i < 3; ++i) acc = V::fma(coefficient[o][i], align(in, o, i), acc);
      out[o] = acc;
    }
  }

  // map() in two steps, for inputs shared by several maps: aligned[o][i] = align(in, o, i) once,
  // then the products with each map's coefficients
  void align_all(const Vec in[3], Vec aligned[3][3]) const {
    for (int o = 0; o < 3; ++o) {
      for (int i = 0; i < 3; ++i) aligned[o][i] = align(in, o, i);
    }
  }

  void map_aligned(const Vec aligned[3][3], const Vec coefficient[3][3], Vec out[3]) const {
    for (int o = 0; o < 3; ++o) {
      Vec acc = V::zero();
      for (int i = 0; i < 3; ++i) acc = V::fma(coefficient[o][i], aligned[o][i], acc);
      out[o] = acc;
    }
  }

  // outer[o][i] += align(a, o, i) * b[o]: summed over the lanes of component m of vector o, the
  // entry (i, m) of sum over points and channels of a_i b_m^T
  void accumulate_outer(const Vec a[3], const Vec b[3], Vec outer[3][3]) const {
    for (int o = 0; o < 3; ++o) {
      for (int i = 0; i < 3; ++i) outer[o][i] = V::fma(align(a, o, i), b[o], outer[o][i]);
    }
  }

  // result[i * 3 + m] = the (i, m) entry of an accumulate_outer sum
  void reduce_outer(const Vec outer[3][3], scalar_t scale, scalar_t result[9]) const {
    for (int i = 0; i < 3; ++i) {
      for (int m = 0; m < 3; ++m) {
        Vec total = V::keep(has_component[0][m], outer[0][i]);
        for (int o = 1; o < 3; ++o) total = V::add(total, V::keep(has_component[o][m], outer[o][i]));
        result[i * 3 + m] = V::sum(total) * scale;
      }
    }
  }

  // The values of `count` points from `from` (rows of 3 C values); lanes past them are zero.
  void load(const scalar_t* from, int64_t count, Vec in[3]) const {
    for (int v = 0; v < 3; ++v) in[v] = V::load(V::first(count * kPointSize - v * L), from + v * L);
  }

  // rows[t] = base[index[t]] for t < count: a sample's permuted points copied once, before its
  // chunks are loaded (vector loads of rows just written by narrower stores would wait for them)
  static void gather_rows(const scalar_t* base, const int64_t* index, int64_t count, scalar_t* rows) {
    for (int64_t t = 0; t < count; ++t) {
      std::memcpy(rows + t * kPointSize, base + index[t] * kPointSize, sizeof(scalar_t) * kPointSize);
    }
  }

  void store(scalar_t* to, int64_t count, const Vec out[3]) const {
    for (int v = 0; v < 3; ++v) V::store(V::first(count * kPointSize - v * L), to + v * L, out[v]);
  }

  // The chunk pattern of a (3, C) per-graph vector (the center): lane l of vector v holds
  // center[(v L + l) mod 3 C].
  void pattern(const scalar_t* center, Vec out[3]) const {
    alignas(64) scalar_t values[kValues];
    for (int p = 0; p < kValues; ++p) values[p] = center != nullptr ? center[p % kPointSize] : scalar_t(0);
    for (int v = 0; v < 3; ++v) out[v] = V::load(V::first(L), values + v * L);
  }
};

// out[b, j, r] = R_j^T (x[b, r] - center[b]) without a permutation: the k samples of a graph map
// the same points, so each chunk of points is loaded and aligned once and mapped k times; one
// (graph, chunk of points) per item.
template <int C, typename scalar_t>
void frame_apply_shared_points(const scalar_t* x, const scalar_t* R, const scalar_t* center, scalar_t* out,
                               int64_t batch, int64_t k, int64_t n) {
  using Chunk = FrameChunk<C, scalar_t>;
  using V = typename Chunk::V;
  using Vec = typename Chunk::Vec;
  struct Coefficients {
    Vec of[3][3];
  };
  const Chunk chunk;
  constexpr int64_t P = Chunk::kPointSize;
  const int64_t chunks = (n + Chunk::kPoints - 1) / Chunk::kPoints;
  at::parallel_for(0, batch * chunks, grain_for(k * Chunk::kValues * 3), [&](int64_t begin, int64_t end) {
    std::vector<Coefficients> coefficients(k);
    Vec shift[3] = {V::zero(), V::zero(), V::zero()};
    int64_t graph = -1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, r = (item - b * chunks) * Chunk::kPoints;
      if (b != graph) {
        graph = b;
        chunk.pattern(center != nullptr ? center + b * P : nullptr, shift);
        for (int64_t j = 0; j < k; ++j) chunk.transposed_coefficients(R + (b * k + j) * 9, 1, coefficients[j].of);
      }
      const int64_t count = std::min<int64_t>(Chunk::kPoints, n - r);
      Vec in[3], aligned[3][3];
      chunk.load(x + (b * n + r) * P, count, in);
      for (int v = 0; v < 3; ++v) in[v] = V::sub(V::first(count * P - v * Chunk::L), in[v], shift[v]);
      chunk.align_all(in, aligned);
      for (int64_t j = 0; j < k; ++j) {
        Vec mapped[3];
        chunk.map_aligned(aligned, coefficients[j].of, mapped);
        chunk.store(out + ((b * k + j) * n + r) * P, count, mapped);
      }
    }
  });
}

// out[b, j, r] = R_j^T (x[b, p(r)] - center[b]) with a permutation, one sample per item (see
// frame_apply_kernel)
template <int C, typename scalar_t>
void frame_apply_permuted(const scalar_t* x, const scalar_t* R, const int64_t* perm, const scalar_t* center,
                         scalar_t* out, int64_t batch, int64_t k, int64_t n) {
  using Chunk = FrameChunk<C, scalar_t>;
  using V = typename Chunk::V;
  using Vec = typename Chunk::Vec;
  const Chunk chunk;
  constexpr int64_t P = Chunk::kPointSize;
  at::parallel_for(0, batch * k, grain_for(n * 3 * P), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> gathered(n * P);
    Vec shift[3] = {V::zero(), V::zero(), V::zero()};
    int64_t graph_of_shift = -1;
    for (int64_t sample = begin; sample < end; ++sample) {
      const int64_t b = sample / k;
      if (b != graph_of_shift) {
        graph_of_shift = b;
        chunk.pattern(center != nullptr ? center + b * P : nullptr, shift);
      }
      Vec coefficient[3][3];
      chunk.transposed_coefficients(R + sample * 9, 1, coefficient);
      Chunk::gather_rows(x + b * n * P, perm + sample * n, n, gathered.data());
      for (int64_t r = 0; r < n; r += Chunk::kPoints) {
        const int64_t count = std::min<int64_t>(Chunk::kPoints, n - r);
        Vec in[3], mapped[3];
        chunk.load(gathered.data() + r * P, count, in);
        for (int v = 0; v < 3; ++v) in[v] = V::sub(V::first(count * P - v * Chunk::L), in[v], shift[v]);
        chunk.map(in, coefficient, mapped);
        chunk.store(out + (sample * n + r) * P, count, mapped);
      }
    }
  });
}

// out[b, i] = sum_j R_j y[b, j, q_j(i)] / k + center[b]; each chunk of output points sums its k
// samples in order
template <int C, typename scalar_t>
void frame_unapply_mean_chunked(const scalar_t* y, const scalar_t* R, const int64_t* position, const scalar_t* center,
                                scalar_t* out, int64_t batch, int64_t k, int64_t n) {
  using Chunk = FrameChunk<C, scalar_t>;
  using V = typename Chunk::V;
  using Vec = typename Chunk::Vec;
  const Chunk chunk;
  constexpr int64_t P = Chunk::kPointSize;
  struct Coefficients {
    Vec of[3][3];
  };
  const int64_t chunks = (n + Chunk::kPoints - 1) / Chunk::kPoints;
  // one (graph, chunk of points) per item; the coefficients and center of a graph are reused
  at::parallel_for(0, batch * chunks, grain_for(k * Chunk::kValues * 3), [&](int64_t begin, int64_t end) {
    std::vector<Coefficients> coefficients(k);
    std::vector<scalar_t> gathered(position != nullptr ? k * n * P : 0);  // y[b, j, q_j(i)] of a graph
    Vec shift[3] = {V::zero(), V::zero(), V::zero()};
    int64_t graph = -1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, i = (item - b * chunks) * Chunk::kPoints;
      if (b != graph) {
        graph = b;
        chunk.pattern(center != nullptr ? center + b * P : nullptr, shift);
        for (int64_t j = 0; j < k; ++j) {
          chunk.coefficients(R + (b * k + j) * 9, coefficients[j].of);
          if (position != nullptr) {
            Chunk::gather_rows(y + (b * k + j) * n * P, position + (b * k + j) * n, n, gathered.data() + j * n * P);
          }
        }
      }
      const int64_t count = std::min<int64_t>(Chunk::kPoints, n - i);
      Vec sum[3] = {V::zero(), V::zero(), V::zero()};
      for (int64_t j = 0; j < k; ++j) {
        const int64_t sample = b * k + j;
        const scalar_t* values = position != nullptr ? gathered.data() + j * n * P : y + sample * n * P;
        Vec in[3], mapped[3];
        chunk.load(values + i * P, count, in);
        chunk.map(in, coefficients[j].of, mapped);
        for (int v = 0; v < 3; ++v) sum[v] = V::add(sum[v], mapped[v]);
      }
      for (int v = 0; v < 3; ++v) sum[v] = V::add(V::div(sum[v], static_cast<scalar_t>(k)), shift[v]);
      chunk.store(out + (b * n + i) * P, count, sum);
    }
  });
}

// Backward of frame_apply, one graph per item (see frame_apply_backward_kernel): per chunk of
// sample points, grad_R gathers the outer products of the centred points with the upstream
// gradient, and R_j G is added into the gradient rows of the points it came from.
template <int C, typename scalar_t>
void frame_apply_backward_chunked(const scalar_t* grad, const scalar_t* x, const scalar_t* R, const int64_t* perm,
                                  const scalar_t* center, scalar_t* grad_x, scalar_t* grad_R, int64_t batch,
                                  int64_t k, int64_t n) {
  using Chunk = FrameChunk<C, scalar_t>;
  using V = typename Chunk::V;
  using Vec = typename Chunk::Vec;
  const Chunk chunk;
  constexpr int64_t P = Chunk::kPointSize;
  at::parallel_for(0, batch, grain_for(k * n * 6 * P), [&](int64_t begin, int64_t end) {
    alignas(64) scalar_t mapped_values[Chunk::kValues];
    std::vector<scalar_t> graph_grad(n * P), gathered(perm != nullptr ? n * P : 0);
    for (int64_t b = begin; b < end; ++b) {
      Vec shift[3];
      chunk.pattern(center != nullptr ? center + b * P : nullptr, shift);
      std::fill(graph_grad.begin(), graph_grad.end(), scalar_t(0));
      const scalar_t* graph = x + b * n * P;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t sample = b * k + j;
        Vec coefficient[3][3], outer[3][3];
        chunk.coefficients(R + sample * 9, coefficient);  // (R G)[a] = sum_m R[a, m] G[m]
        for (int o = 0; o < 3; ++o) {
          for (int i = 0; i < 3; ++i) outer[o][i] = V::zero();
        }
        const int64_t* sample_perm = perm != nullptr ? perm + sample * n : nullptr;
        const scalar_t* sample_points = graph;
        if (sample_perm != nullptr) {
          Chunk::gather_rows(graph, sample_perm, n, gathered.data());
          sample_points = gathered.data();
        }
        for (int64_t r = 0; r < n; r += Chunk::kPoints) {
          const int64_t count = std::min<int64_t>(Chunk::kPoints, n - r);
          Vec upstream[3], points[3], mapped[3];
          chunk.load(grad + (sample * n + r) * P, count, upstream);
          chunk.load(sample_points + r * P, count, points);
          for (int v = 0; v < 3; ++v) points[v] = V::sub(V::first(count * P - v * Chunk::L), points[v], shift[v]);
          chunk.accumulate_outer(points, upstream, outer);
          chunk.map(upstream, coefficient, mapped);
          if (sample_perm == nullptr) {
            scalar_t* rows = graph_grad.data() + r * P;
            for (int v = 0; v < 3; ++v) {
              const typename Chunk::Mask lanes = V::first(count * P - v * Chunk::L);
              V::store(lanes, rows + v * Chunk::L, V::add(V::load(lanes, rows + v * Chunk::L), mapped[v]));
            }
          } else {
            chunk.store(mapped_values, count, mapped);
            for (int64_t t = 0; t < count; ++t) {
              scalar_t* row = graph_grad.data() + sample_perm[r + t] * P;
              for (int64_t e = 0; e < P; ++e) row[e] += mapped_values[t * P + e];
            }
          }
        }
        chunk.reduce_outer(outer, scalar_t(1), grad_R + sample * 9);
      }
      std::copy(graph_grad.begin(), graph_grad.end(), grad_x + b * n * P);
    }
  });
}

// Backward of frame_unapply_mean, one sample per item (see frame_unapply_mean_backward_kernel)
template <int C, typename scalar_t>
void frame_unapply_mean_backward_chunked(const scalar_t* grad, const scalar_t* y, const scalar_t* R,
                                         const int64_t* perm, scalar_t* grad_y, scalar_t* grad_R, int64_t batch,
                                         int64_t k, int64_t n) {
  using Chunk = FrameChunk<C, scalar_t>;
  using V = typename Chunk::V;
  using Vec = typename Chunk::Vec;
  const Chunk chunk;
  constexpr int64_t P = Chunk::kPointSize;
  const scalar_t inverse_k = scalar_t(1) / static_cast<scalar_t>(k);
  at::parallel_for(0, batch * k, grain_for(n * 6 * P), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> gathered(perm != nullptr ? n * P : 0);
    for (int64_t sample = begin; sample < end; ++sample) {
      const int64_t b = sample / k;
      Vec coefficient[3][3], outer[3][3];
      chunk.transposed_coefficients(R + sample * 9, inverse_k, coefficient);  // grad_y = R^T G / k
      for (int o = 0; o < 3; ++o) {
        for (int i = 0; i < 3; ++i) outer[o][i] = V::zero();
      }
      const scalar_t* upstream_points = grad + b * n * P;
      if (perm != nullptr) {
        Chunk::gather_rows(upstream_points, perm + sample * n, n, gathered.data());
        upstream_points = gathered.data();
      }
      for (int64_t r = 0; r < n; r += Chunk::kPoints) {
        const int64_t count = std::min<int64_t>(Chunk::kPoints, n - r);
        Vec upstream[3], values[3], mapped[3];
        chunk.load(upstream_points + r * P, count, upstream);
        chunk.load(y + (sample * n + r) * P, count, values);
        chunk.accumulate_outer(upstream, values, outer);
        chunk.map(upstream, coefficient, mapped);
        chunk.store(grad_y + (sample * n + r) * P, count, mapped);
      }
      chunk.reduce_outer(outer, inverse_k, grad_R + sample * 9);
    }
  });
}
#endif  // __AVX512F__

// out[b, j, r, m, c] = sum_a R[b, j, a, m] (x[b, p(r), a, c] - center[b, a, c]), one sample
// (b, j) per item, C (or `channels`) channels per vector
template <int C, typename scalar_t>
void frame_apply_kernel(const scalar_t* x, const scalar_t* R, const int64_t* perm, const scalar_t* center,
                        scalar_t* out, int64_t batch, int64_t k, int64_t n, int64_t runtime_channels) {
#if defined(__AVX512F__)
  if constexpr (kChunkedFrames<C, scalar_t>) {
    if (perm == nullptr) {
      frame_apply_shared_points<C>(x, R, center, out, batch, k, n);
    } else {
      frame_apply_permuted<C>(x, R, perm, center, out, batch, k, n);
    }
    return;
  }
#endif
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = C > 0 ? C : runtime_channels;
  const int64_t point_size = 3 * channels;
  at::parallel_for(0, batch * k, grain_for(n * 3 * point_size), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> shift(point_size);
    for (int64_t sample = begin; sample < end; ++sample) {
      const int64_t b = sample / k;
      for (int64_t m = 0; m < point_size; ++m) {
        shift[m] = center != nullptr ? static_cast<acc_t>(center[b * point_size + m]) : acc_t(0);
      }
      acc_t rotation[9];  // rotation[a * 3 + m] = R[a, m]
      for (int e = 0; e < 9; ++e) rotation[e] = static_cast<acc_t>(R[sample * 9 + e]);
      const scalar_t* graph = x + b * n * point_size;
      const int64_t* sample_perm = perm != nullptr ? perm + sample * n : nullptr;
      scalar_t* target = out + sample * n * point_size;
      for (int64_t r = 0; r < n; ++r, target += point_size) {
        const scalar_t* point = graph + (sample_perm != nullptr ? sample_perm[r] : r) * point_size;
        for (int64_t c = 0; c < channels; ++c) {
          const acc_t v0 = static_cast<acc_t>(point[c]) - shift[c];
          const acc_t v1 = static_cast<acc_t>(point[channels + c]) - shift[channels + c];
          const acc_t v2 = static_cast<acc_t>(point[2 * channels + c]) - shift[2 * channels + c];
          // (R^T v)[m] = sum_a R[a, m] v[a]
          for (int m = 0; m < 3; ++m) {
            target[m * channels + c] =
                static_cast<scalar_t>(rotation[m] * v0 + rotation[3 + m] * v1 + rotation[6 + m] * v2);
          }
        }
      }
    }
  });
}

// out[b, i, a, c] = sum_j sum_m R[b, j, a, m] y[b, j, q_j(i), m, c] / k + center[b, a, c], one
// output node (b, i) per item
template <int C, typename scalar_t>
void frame_unapply_mean_kernel(const scalar_t* y, const scalar_t* R, const int64_t* position, const scalar_t* center,
                               scalar_t* out, int64_t batch, int64_t k, int64_t n, int64_t runtime_channels) {
#if defined(__AVX512F__)
  if constexpr (kChunkedFrames<C, scalar_t>) {
    frame_unapply_mean_chunked<C>(y, R, position, center, out, batch, k, n);
    return;
  }
#endif
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = C > 0 ? C : runtime_channels;
  const int64_t point_size = 3 * channels;
  const acc_t samples = static_cast<acc_t>(k);
  at::parallel_for(0, batch * n, grain_for(k * 3 * point_size), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(point_size);
    for_each_node_row(begin, end, n, [&](int64_t row, int64_t b, int64_t i) {
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t j = 0; j < k; ++j) {
        const int64_t sample = b * k + j;
        const int64_t r = position != nullptr ? position[sample * n + i] : i;
        const scalar_t* point = y + (sample * n + r) * point_size;
        const scalar_t* rotation = R + sample * 9;
        for (int a = 0; a < 3; ++a) {
          // (R v)[a] = sum_m R[a, m] v[m]
          const acc_t r0 = rotation[a * 3], r1 = rotation[a * 3 + 1], r2 = rotation[a * 3 + 2];
          for (int64_t c = 0; c < channels; ++c) {
            sum[a * channels + c] += r0 * static_cast<acc_t>(point[c]) + r1 * static_cast<acc_t>(point[channels + c]) +
                                     r2 * static_cast<acc_t>(point[2 * channels + c]);
          }
        }
      }
      scalar_t* target = out + row * point_size;
      for (int64_t m = 0; m < point_size; ++m) {
        acc_t value = sum[m] / samples;
        if (center != nullptr) value += static_cast<acc_t>(center[b * point_size + m]);
        target[m] = static_cast<scalar_t>(value);
      }
    });
  });
}

// Backward of frame_apply, one graph b per item (the samples of a graph scatter into the same
// gradient rows), reading each upstream gradient G[b, j] once for both results:
//   grad_x[b, i, a, c] = sum_j sum_m R[b, j, a, m] G[b, j, q_j(i), m, c]   (a sum, not a mean)
//   grad_R[b, j, a, m] = sum_r sum_c (x[b, p_j(r), a, c] - center[b, a, c]) G[b, j, r, m, c]
template <int C, typename scalar_t>
void frame_apply_backward_kernel(const scalar_t* grad, const scalar_t* x, const scalar_t* R, const int64_t* perm,
                                 const scalar_t* center, scalar_t* grad_x, scalar_t* grad_R, int64_t batch,
                                 int64_t k, int64_t n, int64_t runtime_channels) {
#if defined(__AVX512F__)
  if constexpr (kChunkedFrames<C, scalar_t>) {
    frame_apply_backward_chunked<C>(grad, x, R, perm, center, grad_x, grad_R, batch, k, n);
    return;
  }
#endif
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = C > 0 ? C : runtime_channels;
  const int64_t point_size = 3 * channels;
  at::parallel_for(0, batch, grain_for(k * n * 6 * point_size), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> shift(point_size), graph_grad(n * point_size);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t m = 0; m < point_size; ++m) {
        shift[m] = center != nullptr ? static_cast<acc_t>(center[b * point_size + m]) : acc_t(0);
      }
      std::fill(graph_grad.begin(), graph_grad.end(), acc_t(0));
      const scalar_t* graph = x + b * n * point_size;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t sample = b * k + j;
        acc_t rotation[9], rotation_grad[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
        for (int e = 0; e < 9; ++e) rotation[e] = static_cast<acc_t>(R[sample * 9 + e]);
        const int64_t* sample_perm = perm != nullptr ? perm + sample * n : nullptr;
        const scalar_t* upstream = grad + sample * n * point_size;
        for (int64_t r = 0; r < n; ++r, upstream += point_size) {
          const int64_t node = sample_perm != nullptr ? sample_perm[r] : r;
          const scalar_t* point = graph + node * point_size;
          acc_t* node_grad = graph_grad.data() + node * point_size;
          for (int64_t c = 0; c < channels; ++c) {
            const acc_t g0 = static_cast<acc_t>(upstream[c]);
            const acc_t g1 = static_cast<acc_t>(upstream[channels + c]);
            const acc_t g2 = static_cast<acc_t>(upstream[2 * channels + c]);
            for (int a = 0; a < 3; ++a) {
              const acc_t v = static_cast<acc_t>(point[a * channels + c]) - shift[a * channels + c];
              rotation_grad[a * 3] += v * g0;
              rotation_grad[a * 3 + 1] += v * g1;
              rotation_grad[a * 3 + 2] += v * g2;
              node_grad[a * channels + c] += rotation[a * 3] * g0 + rotation[a * 3 + 1] * g1 + rotation[a * 3 + 2] * g2;
            }
          }
        }
        for (int e = 0; e < 9; ++e) grad_R[sample * 9 + e] = static_cast<scalar_t>(rotation_grad[e]);
      }
      scalar_t* target = grad_x + b * n * point_size;
      for (int64_t t = 0; t < n * point_size; ++t) target[t] = static_cast<scalar_t>(graph_grad[t]);
    }
  });
}

// Backward of frame_unapply_mean, one sample (b, j) per item, G the node-level upstream gradient:
//   grad_y[b, j, r, m, c] = sum_a R[b, j, a, m] G[b, p_j(r), a, c] / k
//   grad_R[b, j, a, m]    = sum_r sum_c G[b, p_j(r), a, c] y[b, j, r, m, c] / k
template <int C, typename scalar_t>
void frame_unapply_mean_backward_kernel(const scalar_t* grad, const scalar_t* y, const scalar_t* R,
                                        const int64_t* perm, scalar_t* grad_y, scalar_t* grad_R, int64_t batch,
                                        int64_t k, int64_t n, int64_t runtime_channels) {
#if defined(__AVX512F__)
  if constexpr (kChunkedFrames<C, scalar_t>) {
    frame_unapply_mean_backward_chunked<C>(grad, y, R, perm, grad_y, grad_R, batch, k, n);
    return;
  }
#endif
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = C > 0 ? C : runtime_channels;
  const int64_t point_size = 3 * channels;
  const acc_t inverse_k = acc_t(1) / static_cast<acc_t>(k);
  at::parallel_for(0, batch * k, grain_for(n * 6 * point_size), [&](int64_t begin, int64_t end) {
    for (int64_t sample = begin; sample < end; ++sample) {
      const int64_t b = sample / k;
      acc_t rotation[9], rotation_grad[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
      for (int e = 0; e < 9; ++e) rotation[e] = static_cast<acc_t>(R[sample * 9 + e]) * inverse_k;
      const scalar_t* graph = grad + b * n * point_size;
      const int64_t* sample_perm = perm != nullptr ? perm + sample * n : nullptr;
      const scalar_t* values = y + sample * n * point_size;
      scalar_t* target = grad_y + sample * n * point_size;
      for (int64_t r = 0; r < n; ++r, values += point_size, target += point_size) {
        const scalar_t* point = graph + (sample_perm != nullptr ? sample_perm[r] : r) * point_size;
        for (int64_t c = 0; c < channels; ++c) {
          const acc_t v0 = static_cast<acc_t>(point[c]);
          const acc_t v1 = static_cast<acc_t>(point[channels + c]);
          const acc_t v2 = static_cast<acc_t>(point[2 * channels + c]);
          for (int m = 0; m < 3; ++m) {
            const acc_t w = static_cast<acc_t>(values[m * channels + c]);
            rotation_grad[m] += v0 * w;
            rotation_grad[3 + m] += v1 * w;
            rotation_grad[6 + m] += v2 * w;
            target[m * channels + c] =
                static_cast<scalar_t>(rotation[m] * v0 + rotation[3 + m] * v1 + rotation[6 + m] * v2);
          }
        }
      }
      for (int e = 0; e < 9; ++e) grad_R[sample * 9 + e] = static_cast<scalar_t>(rotation_grad[e] * inverse_k);
    }
  });
}

// Runs the statement with the constexpr int C set to the channel count when it is 1 to 4, else
// 0 (run-time count), so that the per-point loops unroll.
#define LPS_FAST_DISPATCH_CHANNELS(channels, C, ...)       \
  switch (channels) {                                      \
    case 1: { constexpr int C = 1; __VA_ARGS__; break; }   \
    case 2: { constexpr int C = 2; __VA_ARGS__; break; }   \
    case 3: { constexpr int C = 3; __VA_ARGS__; break; }   \
    case 4: { constexpr int C = 4; __VA_ARGS__; break; }   \
    default: { constexpr int C = 0; __VA_ARGS__; break; }  \
  }

// The rotations as contiguous (B k, 3, 3) values: R's own data when it is contiguous, else a copy
// (a QR factor or a transpose is column-major; at::Tensor::contiguous would cost a few
// microseconds of dispatch and allocation, as much as a small op's kernel).
template <typename scalar_t>
class CompactRotations {
 public:
  explicit CompactRotations(const at::Tensor& R) {
    const scalar_t* source = R.const_data_ptr<scalar_t>();
    if (R.is_contiguous()) {
      data_ = source;
      return;
    }
    const int64_t batch = R.size(0), k = R.size(1);
    const int64_t stride_b = R.stride(0), stride_j = R.stride(1), stride_a = R.stride(2), stride_m = R.stride(3);
    copy_.resize(batch * k * 9);
    scalar_t* target = copy_.data();
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t j = 0; j < k; ++j) {
        const scalar_t* rotation = source + b * stride_b + j * stride_j;
        for (int64_t a = 0; a < 3; ++a) {
          for (int64_t m = 0; m < 3; ++m) *target++ = rotation[a * stride_a + m * stride_m];
        }
      }
    }
    data_ = copy_.data();
  }
  const scalar_t* data() const { return data_; }

 private:
  std::vector<scalar_t> copy_;
  const scalar_t* data_ = nullptr;
};

template <typename scalar_t>
const scalar_t* optional_data(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<scalar_t>() : nullptr;
}

// The data of perm, checked to hold permutations (the kernels index with it), or nullptr.
const int64_t* checked_perm_data(const c10::optional<at::Tensor>& perm, int64_t batch, int64_t k, int64_t n) {
  if (!perm.has_value()) return nullptr;
  const int64_t* data = perm->const_data_ptr<int64_t>();
  invert_permutations(data, batch * k, k, n, nullptr);
  return data;
}

}  // namespace

at::Tensor frame_apply(const at::Tensor& x, const at::Tensor& R, const c10::optional<at::Tensor>& perm,
                       const c10::optional<at::Tensor>& center) {
  const int64_t batch = x.size(0), n = x.size(1), channels = x.size(3), k = R.size(1);
  at::Tensor out = at::empty({batch, k, n, 3, channels}, x.options());
  if (out.numel() == 0) return out;
  const int64_t* perm_data = checked_perm_data(perm, batch, k, n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "frame_apply_cpu", [&] {
    const CompactRotations<scalar_t> rotations(R);
    LPS_FAST_DISPATCH_CHANNELS(channels, C,
                               frame_apply_kernel<C>(x.const_data_ptr<scalar_t>(), rotations.data(),
                                                     perm_data, optional_data<scalar_t>(center),
                                                     out.mutable_data_ptr<scalar_t>(), batch, k, n, channels));
  });
  return out;
}

at::Tensor frame_unapply_mean(const at::Tensor& y, const at::Tensor& R, const c10::optional<at::Tensor>& perm,
                              const c10::optional<at::Tensor>& center) {
  const int64_t batch = y.size(0), k = y.size(1), n = y.size(2), channels = y.size(4);
  at::Tensor out = at::empty({batch, n, 3, channels}, y.options());
  if (out.numel() == 0) return out;
  at::Tensor inverse;
  if (perm.has_value()) inverse = inverse_permutation(*perm);
  const int64_t* position = inverse.defined() ? inverse.const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "frame_unapply_mean_cpu", [&] {
    const CompactRotations<scalar_t> rotations(R);
    LPS_FAST_DISPATCH_CHANNELS(channels, C,
                               frame_unapply_mean_kernel<C>(y.const_data_ptr<scalar_t>(), rotations.data(),
                                                            position, optional_data<scalar_t>(center),
                                                            out.mutable_data_ptr<scalar_t>(), batch, k, n,
                                                            channels));
  });
  return out;
}


std::tuple<at::Tensor, at::Tensor> frame_apply_backward(const at::Tensor& grad, const at::Tensor& x,
                                                        const at::Tensor& R, const c10::optional<at::Tensor>& perm,
                                                        const c10::optional<at::Tensor>& center) {
  const int64_t batch = x.size(0), n = x.size(1), channels = x.size(3), k = R.size(1);
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_R = at::empty(R.sizes(), R.options());
  const int64_t* perm_data = checked_perm_data(perm, batch, k, n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "frame_apply_backward_cpu", [&] {
    const CompactRotations<scalar_t> rotations(R);
    LPS_FAST_DISPATCH_CHANNELS(
        channels, C,
        frame_apply_backward_kernel<C>(grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                       rotations.data(), perm_data, optional_data<scalar_t>(center),
                                       grad_x.mutable_data_ptr<scalar_t>(), grad_R.mutable_data_ptr<scalar_t>(), batch,
                                       k, n, channels));
  });
  return {grad_x, grad_R};
}

std::tuple<at::Tensor, at::Tensor> frame_unapply_mean_backward(const at::Tensor& grad, const at::Tensor& y,
                                                               const at::Tensor& R,
                                                               const c10::optional<at::Tensor>& perm) {
  const int64_t batch = y.size(0), k = y.size(1), n = y.size(2), channels = y.size(4);
  at::Tensor grad_y = at::empty(y.sizes(), y.options());
  at::Tensor grad_R = at::empty(R.sizes(), R.options());
  const int64_t* perm_data = checked_perm_data(perm, batch, k, n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "frame_unapply_mean_backward_cpu", [&] {
    const CompactRotations<scalar_t> rotations(R);
    LPS_FAST_DISPATCH_CHANNELS(
        channels, C,
        frame_unapply_mean_backward_kernel<C>(grad.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                                              rotations.data(), perm_data,
                                              grad_y.mutable_data_ptr<scalar_t>(), grad_R.mutable_data_ptr<scalar_t>(),
                                              batch, k, n, channels));
  });
  return {grad_y, grad_R};
}

}  // namespace cpu
}  // namespace lps_fast
