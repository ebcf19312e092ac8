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
#include "cpu/reduction_chunks.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include "cpu/vector512.h"
#endif

namespace lps_fast {
namespace cpu {
namespace {

// Rows are handled in blocks of one 64-byte vector. Each node's rows are copied into buffers
// padded with zeros to whole blocks, so that every loop runs whole blocks and a dot product
// keeps one partial sum per lane (a reduction in the source order would not be vectorised
// without reassociation, which the build does not allow).
template <typename T>
constexpr int64_t kBlock = 64 / sizeof(T);

template <typename T>
inline int64_t padded(int64_t count) { return (count + kBlock<T> - 1) / kBlock<T> * kBlock<T>; }

// One 64-byte block as a vector (GCC/Clang vector extension: AVX-512 registers under
// -march=native, pairs of narrower ones elsewhere).
template <typename T>
struct BlockOf {
  typedef T type __attribute__((vector_size(64)));
};
template <typename T>
using Block = typename BlockOf<T>::type;

template <typename T>
inline Block<T> load_block(const T* p) {
  Block<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// acc += scale * sum over blocks of a[c + l] b[c + l] (a padded length), per lane
template <typename T>
inline void accumulate_products(const T* a, const T* b, int64_t length, T scale, Block<T>& acc) {
  for (int64_t c = 0; c < length; c += kBlock<T>) acc += scale * load_block(a + c) * load_block(b + c);
}

// The sum of a vector's lanes, by adding its halves: log2(lanes) steps in registers (an array
// summed in place would pass each step's stores to the next step's loads).
template <typename T, int kBytes>
inline T sum_halves(const void* v) {
  if constexpr (kBytes == static_cast<int>(sizeof(T))) {
    T x;
    std::memcpy(&x, v, sizeof(T));
    return x;
  } else {
    typedef T half __attribute__((vector_size(kBytes / 2)));
    half lo, hi;
    std::memcpy(&lo, v, sizeof(half));
    std::memcpy(&hi, static_cast<const char*>(v) + sizeof(half), sizeof(half));
    const half sum = lo + hi;
    return sum_halves<T, kBytes / 2>(&sum);
  }
}

template <typename T>
inline T sum_lanes(const Block<T>& acc) {
  return sum_halves<T, 64>(&acc);
}

// sum a[c] b[c] over a padded length
template <typename T>
inline T dot(const T* a, const T* b, int64_t length) {
  Block<T> acc = {};
  accumulate_products(a, b, length, T(1), acc);
  return sum_lanes<T>(acc);
}

// out[r][c] = m[r][0] rows[0][c] + m[r][1] rows[1][c] + m[r][2] rows[2][c] for r < 3, where
// m[r][j] = coefficients[r * row_step + j * column_step]: a 3 x 3 map applied to three padded rows.
template <typename T>
inline void mix_rows(const T* coefficients, int64_t row_step, int64_t column_step, const T* __restrict__ rows,
                     int64_t stride, T* __restrict__ out) {
  for (int r = 0; r < 3; ++r) {
    const T m0 = coefficients[r * row_step], m1 = coefficients[r * row_step + column_step],
            m2 = coefficients[r * row_step + 2 * column_step];
    T* o = out + r * stride;
    for (int64_t c = 0; c < stride; ++c) o[c] = m0 * rows[c] + m1 * rows[stride + c] + m2 * rows[2 * stride + c];
  }
}

// Three rows of `count` elements (row stride `count`) into a padded buffer of row stride `stride`
// (whole vectors) whose padding is zero. With AVX-512 whole vectors, the last one loaded under a
// mask and stored whole (its zeros over the padding), so the loops that read the rows next get
// their values forwarded from the stores (std::copy called memmove per row of tens of elements).
template <typename T>
inline void copy_rows(const T* src, int64_t count, int64_t stride, T* dst) {
#if defined(__AVX512F__)
  using W = Vector512<T>;
  for (int a = 0; a < 3; ++a)
    for (int64_t c = 0; c < count; c += W::kLanes) W::store(dst + a * stride + c, W::load(W::first(count - c), src + a * count + c));
#else
  for (int a = 0; a < 3; ++a) std::copy(src + a * count, src + (a + 1) * count, dst + a * stride);
#endif
}

// The reverse: three padded rows into rows of `count` elements (the tail stored under a mask).
template <typename T>
inline void copy_rows_out(const T* src, int64_t stride, int64_t count, T* dst) {
#if defined(__AVX512F__)
  using W = Vector512<T>;
  for (int a = 0; a < 3; ++a)
    for (int64_t c = 0; c < count; c += W::kLanes) {
      const auto lanes = W::first(count - c);
      W::store(lanes, dst + a * count + c, W::load(src + a * stride + c));
    }
#else
  for (int a = 0; a < 3; ++a) std::copy(src + a * stride, src + a * stride + count, dst + a * count);
#endif
}

// A head weight block stored (channel, frame vector), c * 3 + e, as padded rows per frame vector.
template <typename T>
std::vector<T> by_frame_vector(const T* w, int64_t C, int64_t stride) {
  std::vector<T> out(3 * stride, T(0));
  for (int64_t c = 0; c < C; ++c)
    for (int e = 0; e < 3; ++e) out[e * stride + c] = w[c * 3 + e];
  return out;
}

// Per graph, the max over its real nodes of each coordinate (0 for a graph without any).
template <typename T>
inline void pool_graph(const T* coords_of_nodes, const bool* valid_row, int64_t n, int64_t length, T* best) {
  std::fill(best, best + length, -std::numeric_limits<T>::infinity());
  bool any = false;
  for (int64_t i = 0; i < n; ++i) {
    if (valid_row && !valid_row[i]) continue;
    any = true;
    const T* own = coords_of_nodes + i * length;
    for (int64_t j = 0; j < length; ++j) best[j] = (own[j] > best[j] || own[j] != own[j]) ? own[j] : best[j];
  }
  if (!any) std::fill(best, best + length, T(0));
}

// Per-thread buffers of one graph: each node's rows of x (xyz a, channel c) and its coordinates
// (frame vector e, channel c) at row stride Wp, the rows of pair of the current node at stride Vp.
template <typename T>
struct GraphBuffers {
  int64_t Wp, Vp;
  std::vector<T> x, pair, coords, best, mixed;
  GraphBuffers(int64_t n, int64_t W, int64_t V)
      : Wp(padded<T>(W)), Vp(padded<T>(V)), x(n * 3 * Wp, T(0)), pair(3 * Vp, T(0)), coords(n * 3 * Wp),
        best(3 * Wp), mixed(3 * std::max(Wp, Vp)) {}
  T* x_of(int64_t i) { return x.data() + i * 3 * Wp; }
  T* coords_of(int64_t i) { return coords.data() + i * 3 * Wp; }
};

// The inputs of both passes as typed pointers, with the head's weight blocks as padded rows.
template <typename T>
struct HeadInputs {
  int64_t N, n, W, V, Wp, Vp;
  const T *x, *frame, *pair;
  const bool* valid;  // null without a mask
  std::vector<T> w_pooled, w_pair;
  HeadInputs(const at::Tensor& x_, const at::Tensor& frame_, const at::Tensor& pair_,
             const c10::optional<at::Tensor>& mask, const at::Tensor& weight)
      : N(x_.size(0)), n(x_.size(1)), W(x_.size(3)), V(pair_.size(3)), Wp(padded<T>(W)), Vp(padded<T>(V)),
        x(x_.const_data_ptr<T>()), frame(frame_.const_data_ptr<T>()), pair(pair_.const_data_ptr<T>()),
        valid(mask.has_value() ? mask->const_data_ptr<bool>() : nullptr),
        w_pooled(by_frame_vector(weight.const_data_ptr<T>(), W, Wp)),
        w_pair(by_frame_vector(weight.const_data_ptr<T>() + 3 * W, V, Vp)) {}
};

}  // namespace

at::Tensor vn_score_head(const at::Tensor& x, const at::Tensor& frame, const at::Tensor& pair,
                         const c10::optional<at::Tensor>& mask, const at::Tensor& weight, const at::Tensor& bias) {
  const int64_t N = x.size(0), n = x.size(1), W = x.size(3), V = pair.size(3);
  at::Tensor scores = at::empty({N, n}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vn_score_head_cpu", [&] {
    using T = scalar_t;
    const HeadInputs<T> in(x, frame, pair, mask, weight);
    const T *xs = in.x, *fs = in.frame, *ps = in.pair;
    const bool* valid = in.valid;
    const int64_t Wp = in.Wp, Vp = in.Vp;
    const std::vector<T>&w_pooled = in.w_pooled, &w_pair = in.w_pair;
    const T b0 = bias.const_data_ptr<T>()[0];
    T* out = scores.mutable_data_ptr<T>();
    at::parallel_for(0, N, std::max<int64_t>(1, 2048 / (n * 3 * (W + V) + 1)), [&](int64_t begin, int64_t end) {
      GraphBuffers<T> buf(n, W, V);
      for (int64_t b = begin; b < end; ++b) {
        const bool* valid_row = valid ? valid + b * n : nullptr;
        for (int64_t i = 0; i < n; ++i) {
          const int64_t row = b * n + i;
          if (valid_row && !valid_row[i]) continue;
          const T* F = fs + row * 9;
          copy_rows(xs + row * 3 * W, W, Wp, buf.x_of(i));
          copy_rows(ps + row * 3 * V, V, Vp, buf.pair.data());
          mix_rows(F, 1, 3, buf.x_of(i), Wp, buf.coords_of(i));  // F^T x
          mix_rows(F, 3, 1, w_pair.data(), Vp, buf.mixed.data());              // F u: per xyz row
          out[row] = dot(buf.pair.data(), buf.mixed.data(), 3 * Vp);
        }
        pool_graph(buf.coords.data(), valid_row, n, 3 * Wp, buf.best.data());
        const T global = dot(buf.best.data(), w_pooled.data(), 3 * Wp);
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
    const HeadInputs<T> in(x, frame, pair, mask, weight);
    const T *xs = in.x, *fs = in.frame, *ps = in.pair;
    const bool* valid = in.valid;
    const int64_t Wp = in.Wp, Vp = in.Vp;
    const std::vector<T>&w_pooled = in.w_pooled, &w_pair = in.w_pair;
    T* gx_out = grad_x.mutable_data_ptr<T>();
    T* gf_out = grad_frame.mutable_data_ptr<T>();
    T* gp_out = grad_pair.mutable_data_ptr<T>();

    // Per chunk: [bias, pooled weights (e, c), pair weights (e, c)], rows padded
    const int64_t chunks = chunk_count(N), width = 1 + 3 * Wp + 3 * Vp;
    std::vector<double> partial(chunks * width, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      GraphBuffers<T> buf(n, W, V);
      std::vector<T> share(3 * Wp), count(3 * Wp), g_coords(3 * Wp), g_pair_weight(3 * Vp);
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        double* acc = partial.data() + chunk * width;
        double* acc_pooled = acc + 1;
        double* acc_pair = acc_pooled + 3 * Wp;
        for (int64_t b = chunk_begin(chunk, chunks, N); b < chunk_begin(chunk + 1, chunks, N); ++b) {
          const bool* valid_row = valid ? valid + b * n : nullptr;
          for (int64_t i = 0; i < n; ++i) {
            if (valid_row && !valid_row[i]) continue;
            const int64_t row = b * n + i;
            copy_rows(xs + row * 3 * W, W, Wp, buf.x_of(i));
            mix_rows(fs + row * 9, 1, 3, buf.x_of(i), Wp, buf.coords_of(i));
          }
          pool_graph(buf.coords.data(), valid_row, n, 3 * Wp, buf.best.data());
          const T* best = buf.best.data();
          T total = T(0);  // the pooled term reaches every real node's score
          for (int64_t i = 0; i < n; ++i)
            if (!valid_row || valid_row[i]) total += g[b * n + i];
          acc[0] += total;
          for (int64_t j = 0; j < 3 * Wp; ++j) acc_pooled[j] += static_cast<double>(total * best[j]);
          // the max's gradient, shared between the nodes that reach it
          std::fill(count.begin(), count.end(), T(0));
          for (int64_t i = 0; i < n; ++i) {
            if (valid_row && !valid_row[i]) continue;
            const T* own = buf.coords_of(i);
            for (int64_t j = 0; j < 3 * Wp; ++j) count[j] += own[j] == best[j] ? T(1) : T(0);
          }
          // every lane divides (a coordinate no node reaches has count 0 and is never read: its
          // share is only taken where a node's coordinate equals the max), so the loop vectorizes
          for (int64_t j = 0; j < 3 * Wp; ++j) share[j] = total * w_pooled[j] / std::max(count[j], T(1));
          std::fill(g_pair_weight.begin(), g_pair_weight.end(), T(0));
          for (int64_t i = 0; i < n; ++i) {
            const int64_t row = b * n + i;
            T* gX = gx_out + row * 3 * W;
            T* gF = gf_out + row * 9;
            T* gP = gp_out + row * 3 * V;
            if (valid_row && !valid_row[i]) {
              std::fill(gX, gX + 3 * W, T(0));
              std::fill(gF, gF + 9, T(0));
              std::fill(gP, gP + 3 * V, T(0));
              continue;
            }
            const T gi = g[row];
            const T* own = buf.coords_of(i);
            const T* F = fs + row * 9;
            copy_rows(ps + row * 3 * V, V, Vp, buf.pair.data());
            for (int64_t j = 0; j < 3 * Wp; ++j) g_coords[j] = own[j] == best[j] ? share[j] : T(0);
            // x: F g_coords, per xyz row
            mix_rows(F, 3, 1, g_coords.data(), Wp, buf.mixed.data());
            copy_rows_out(buf.mixed.data(), Wp, W, gX);
            // pair: gi F u, per xyz row
            mix_rows(F, 3, 1, w_pair.data(), Vp, buf.mixed.data());
            for (int a = 0; a < 3; ++a)
              for (int64_t c = 0; c < V; ++c) gP[a * V + c] = gi * buf.mixed[a * Vp + c];
            // frame: through the coordinates and through the pair term
            for (int a = 0; a < 3; ++a)
              for (int e = 0; e < 3; ++e) {
                Block<T> acc = {};
                accumulate_products(buf.x_of(i) + a * Wp, g_coords.data() + e * Wp, Wp, T(1), acc);
                accumulate_products(buf.pair.data() + a * Vp, w_pair.data() + e * Vp, Vp, gi, acc);
                gF[a * 3 + e] = sum_lanes<T>(acc);
              }
            // pair weights: gi F^T pair, per frame vector
            mix_rows(F, 1, 3, buf.pair.data(), Vp, buf.mixed.data());
            for (int64_t j = 0; j < 3 * Vp; ++j) g_pair_weight[j] += gi * buf.mixed[j];
          }
          for (int64_t j = 0; j < 3 * Vp; ++j) acc_pair[j] += static_cast<double>(g_pair_weight[j]);
        }
      }
    });
    std::vector<double> sum(width, 0.0);
    for (int64_t chunk = 0; chunk < chunks; ++chunk)
      for (int64_t j = 0; j < width; ++j) sum[j] += partial[chunk * width + j];
    T* gw = grad_weight.mutable_data_ptr<T>();
    for (int64_t c = 0; c < W; ++c)
      for (int e = 0; e < 3; ++e) gw[c * 3 + e] = static_cast<T>(sum[1 + e * Wp + c]);
    for (int64_t c = 0; c < V; ++c)
      for (int e = 0; e < 3; ++e) gw[3 * W + c * 3 + e] = static_cast<T>(sum[1 + 3 * Wp + e * Vp + c]);
    grad_bias.mutable_data_ptr<T>()[0] = static_cast<T>(sum[0]);
  });
  return {grad_x, grad_frame, grad_pair, grad_weight, grad_bias};
}

}  // namespace cpu
}  // namespace lps_fast
