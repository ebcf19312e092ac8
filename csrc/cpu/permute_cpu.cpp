// CPU kernels of the permutation family (docs/SPEC.md, "Ops").
//
// The gathers copy raw bytes, so they serve every dtype: a node row or an edge cell is copied as
// one fixed-size block when its size is a power of two up to 64 bytes (a few register moves),
// and with memcpy otherwise; on AVX-512 CPUs edge rows of one-word cells are permuted in
// registers instead (see TableRow). Every output row is written by exactly one thread, summing
// the k samples in order, deterministically, in float (double for double inputs): the node
// scatter-sums add each graph's samples, read in order, into an accumulator kept in cache; the
// edge scatter-sums invert each sample's permutation (O(n), which also validates it) and gather.
// Small feature counts are compile-time constants so the inner loops unroll. Loops walk (b, j, r)
// with counters rather than dividing flat indices: a 64-bit division per row costs more than the
// row's copy.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include "cpu/permute_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

#if defined(__AVX512F__)
#include "cpu/vector512.h"
#endif

namespace lps_fast {
namespace cpu {
namespace {

// Elements per parallel chunk: large enough to amortize scheduling, small enough to balance.
constexpr int64_t kGrainElements = 1 << 15;

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(elements_per_item, 1));
}

// A block of BYTES bytes copied with a fixed-size memcpy (register moves); BYTES = 0 means "size
// known at run time" (memcpy), BYTES = kWholeLines a run-time multiple of 64 bytes, copied as
// 64-byte blocks (vector moves without memcpy's call and size dispatch, which cost as much as a
// 256-byte row's copy).
constexpr int kWholeLines = -64;

template <int BYTES>
inline void copy_block(const unsigned char* from, unsigned char* to, int64_t bytes) {
  if constexpr (BYTES == 0) {
    std::memcpy(to, from, bytes);
  } else if constexpr (BYTES == kWholeLines) {
    for (int64_t offset = 0; offset < bytes; offset += 64) copy_block<64>(from + offset, to + offset, 64);
  } else {
    std::memcpy(to, from, BYTES);  // fixed size: compiles to register moves
  }
}

// target[s] = source[index[s]] for s < n (not inlined, so that restrict holds and it vectorizes)
template <typename word_t>
__attribute__((noinline)) void gather_words(const word_t* __restrict__ source, const int64_t* __restrict__ index,
                                            word_t* __restrict__ target, int64_t n) {
  for (int64_t s = 0; s < n; ++s) target[s] = source[index[s]];
}

// Rows [begin, end) of the node gather out[b, j, r] = x[b, perm[b, j, r]]. The loops that copy
// bytes take every pointer and size as a restrict or by-value parameter of a function that is not
// inlined: a byte store may alias anything, so values read through a lambda's captures would be
// reloaded after every store.
template <int BYTES>
__attribute__((noinline)) void gather_node_rows(const unsigned char* __restrict__ x, const int64_t* __restrict__ perm,
                                                unsigned char* __restrict__ out, int64_t begin, int64_t end,
                                                int64_t rows_per_graph, int64_t n, int64_t row_bytes) {
  if constexpr (BYTES > 0) row_bytes = BYTES;  // a constant stride
  int64_t b = begin / rows_per_graph;
  const unsigned char* graph = x + b * n * row_bytes;
  int64_t left = (b + 1) * rows_per_graph - begin;  // rows of graph b still to do
  for (int64_t row = begin; row < end; ++row) {
    if (left == 0) {
      graph += n * row_bytes;
      left = rows_per_graph;
    }
    --left;
    copy_block<BYTES>(graph + perm[row] * row_bytes, out + row * row_bytes, row_bytes);
  }
}

// out[b, j, r] = x[b, perm[b, j, r]] with node rows of `row_bytes` bytes
template <int BYTES>
void gather_nodes(const unsigned char* x, const int64_t* perm, unsigned char* out, int64_t batch, int64_t k,
                  int64_t n, int64_t row_bytes) {
  const int64_t rows_per_graph = k * n;
  at::parallel_for(0, batch * rows_per_graph, grain_for(row_bytes / 4 + 1), [&](int64_t begin, int64_t end) {
    gather_node_rows<BYTES>(x, perm, out, begin, end, rows_per_graph, n, row_bytes);
  });
}

// One output row of the edge gather: target[s] = source[p[s]] for cells of `cell_bytes` bytes
// (see gather_node_rows for the parameters)
template <int BYTES>
__attribute__((noinline)) void gather_edge_row(const unsigned char* __restrict__ source, const int64_t* __restrict__ p,
                                               unsigned char* __restrict__ target, int64_t n, int64_t cell_bytes) {
  if constexpr (BYTES > 0) cell_bytes = BYTES;
  for (int64_t s = 0; s < n; ++s) copy_block<BYTES>(source + p[s] * cell_bytes, target + s * cell_bytes, cell_bytes);
}

// out[b, j, r, s] = e[b, perm[r], perm[s]] with edge cells of `cell_bytes` bytes; one output
// row (b, j, r) per item
template <int BYTES>
void gather_edges(const unsigned char* e, const int64_t* perm, unsigned char* out, int64_t batch, int64_t k,
                  int64_t n, int64_t cell_bytes) {
  const int64_t row_bytes = n * cell_bytes;
  at::parallel_for(0, batch * k * n, grain_for(row_bytes / 4 + 1), [&](int64_t begin, int64_t end) {
    int64_t sample = begin / n;  // b * k + j
    int64_t r = begin - sample * n;
    for (int64_t row = begin; row < end; ++row, ++r) {
      if (r == n) {
        r = 0;
        ++sample;
      }
      const int64_t b = sample / k;
      const int64_t* sample_perm = perm + sample * n;
      const unsigned char* source = e + (b * n + sample_perm[r]) * row_bytes;
      unsigned char* target = out + row * row_bytes;
      if constexpr (BYTES == 4 || BYTES == 8) {
        // One word per cell: a typed gather that the compiler turns into vector gathers.
        using word_t = std::conditional_t<BYTES == 4, uint32_t, uint64_t>;
        gather_words(reinterpret_cast<const word_t*>(source), sample_perm, reinterpret_cast<word_t*>(target), n);
      } else {
        gather_edge_row<BYTES>(source, sample_perm, target, n, cell_bytes);
      }
    }
  });
}

#if defined(__AVX512F__)
// Edge rows of one-word cells (4 or 8 bytes: one float or double channel, two float channels),
// permuted in registers. AVX-512 gathers are microcoded on some cores (one element a cycle or
// worse), so a row of up to kMaxTableWords<BYTES> cells is instead loaded as a table of vectors
// and each output vector is a two-table permute (vpermt2d/q) per pair of table vectors, blended
// by the index's high bits: a few instructions per 16 (or 8) cells. The same rows serve the
// scatter-sums, which permute by the inverse permutation and add, so they are gathers as well.
template <int BYTES>
struct WordLanes;

template <>
struct WordLanes<4> {
  using index_t = int32_t;
  using Mask = __mmask16;
  static constexpr int64_t kLanes = 16;
  static Mask first(int64_t count) {
    return count >= kLanes ? Mask(0xFFFF) : count <= 0 ? Mask(0) : Mask((1u << count) - 1);
  }
  static __m512i load(Mask m, const void* p) { return _mm512_maskz_loadu_epi32(m, p); }
  static void store(Mask m, void* p, __m512i v) { _mm512_mask_storeu_epi32(p, m, v); }
  static __m512i permute(__m512i a, __m512i index, __m512i b) { return _mm512_permutex2var_epi32(a, index, b); }
  static Mask at_least(__m512i index, int64_t word) { return _mm512_cmpge_epi32_mask(index, _mm512_set1_epi32(word)); }
  static __m512i blend(Mask m, __m512i a, __m512i b) { return _mm512_mask_mov_epi32(a, m, b); }
};

template <>
struct WordLanes<8> {
  using index_t = int64_t;
  using Mask = __mmask8;
  static constexpr int64_t kLanes = 8;
  static Mask first(int64_t count) {
    return count >= kLanes ? Mask(0xFF) : count <= 0 ? Mask(0) : Mask((1u << count) - 1);
  }
  static __m512i load(Mask m, const void* p) { return _mm512_maskz_loadu_epi64(m, p); }
  static void store(Mask m, void* p, __m512i v) { _mm512_mask_storeu_epi64(p, m, v); }
  static __m512i permute(__m512i a, __m512i index, __m512i b) { return _mm512_permutex2var_epi64(a, index, b); }
  static Mask at_least(__m512i index, int64_t word) { return _mm512_cmpge_epi64_mask(index, _mm512_set1_epi64(word)); }
  static __m512i blend(Mask m, __m512i a, __m512i b) { return _mm512_mask_mov_epi64(a, m, b); }
};

constexpr int kMaxTablePairs = 4;
template <int BYTES>
constexpr int64_t kMaxTableWords = kMaxTablePairs * 2 * WordLanes<BYTES>::kLanes;  // 128 or 64

// One source row of n <= 2 * PAIRS * kLanes words held in registers (zero past n).
template <int BYTES, int PAIRS>
struct TableRow {
  using L = WordLanes<BYTES>;
  __m512i table[2 * PAIRS];

  TableRow(const unsigned char* row, int64_t n) {
    for (int v = 0; v < 2 * PAIRS; ++v) table[v] = L::load(L::first(n - v * L::kLanes), row + v * L::kLanes * BYTES);
  }

  // row[index[l]] for every lane l
  __m512i lookup(__m512i index) const {
    __m512i result = L::permute(table[0], index, table[1]);
    // each pair of vectors holds 2 kLanes words; the permute reads the index's low bits
    for (int pair = 1; pair < PAIRS; ++pair) {
      result = L::blend(L::at_least(index, pair * 2 * L::kLanes), result,
                        L::permute(table[2 * pair], index, table[2 * pair + 1]));
    }
    return result;
  }
};

// Each sample's permutation as the permute instructions' index words (int32 for 4-byte words).
template <int BYTES>
void to_index_words(const int64_t* perm, int64_t count, typename WordLanes<BYTES>::index_t* words) {
  for (int64_t m = 0; m < count; ++m) words[m] = static_cast<typename WordLanes<BYTES>::index_t>(perm[m]);
}

// out[b, j, r, s] = e[b, perm[r], perm[s]] for one-word cells (the register form of gather_edges)
template <int BYTES, int PAIRS>
void gather_edges_in_registers(const unsigned char* e, const int64_t* perm, unsigned char* out, int64_t batch,
                               int64_t k, int64_t n) {
  using L = WordLanes<BYTES>;
  const int64_t row_bytes = n * BYTES;
  const int64_t vectors = (n + L::kLanes - 1) / L::kLanes;
  at::parallel_for(0, batch * k, grain_for(n * n), [&](int64_t begin, int64_t end) {
    std::vector<typename L::index_t> index(vectors * L::kLanes, 0);
    for (int64_t sample = begin; sample < end; ++sample) {
      const int64_t* sample_perm = perm + sample * n;
      to_index_words<BYTES>(sample_perm, n, index.data());
      const unsigned char* graph = e + (sample / k) * n * row_bytes;
      unsigned char* target = out + sample * n * row_bytes;
      for (int64_t r = 0; r < n; ++r, target += row_bytes) {
        const TableRow<BYTES, PAIRS> row(graph + sample_perm[r] * row_bytes, n);
        for (int64_t v = 0; v < vectors; ++v) {
          const __m512i words = _mm512_loadu_si512(index.data() + v * L::kLanes);
          L::store(L::first(n - v * L::kLanes), target + v * L::kLanes * BYTES, row.lookup(words));
        }
      }
    }
  });
}

// out[b, i, t] = sum_j y[b, j, q_j(i), q_j(t)] / divisor with q_j the inverse of sample j's
// permutation, for one-word cells of float or double channels (acc_t == scalar_t): the register
// form of scatter_mean_edges without DIAGONAL. Same sums in the same order, so the same bits.
template <int BYTES, int PAIRS, typename scalar_t>
void scatter_mean_edges_in_registers(const scalar_t* y, const int64_t* position, scalar_t* out, int64_t batch,
                                     int64_t k, int64_t n, int64_t divisor) {
  using L = WordLanes<BYTES>;
  using S = Vector512<scalar_t>;  // float or double lanes: a cell of two floats adds as two
  const int64_t row_bytes = n * BYTES;
  const int64_t vectors = (n + L::kLanes - 1) / L::kLanes;
  const auto* source = reinterpret_cast<const unsigned char*>(y);
  auto* target = reinterpret_cast<unsigned char*>(out);
  at::parallel_for(0, batch, grain_for(k * n * n), [&](int64_t begin, int64_t end) {
    std::vector<typename L::index_t> index(k * vectors * L::kLanes, 0);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t j = 0; j < k; ++j) {
        to_index_words<BYTES>(position + (b * k + j) * n, n, index.data() + j * vectors * L::kLanes);
      }
      for (int64_t i = 0; i < n; ++i) {
        typename S::Vec sum[2 * PAIRS];
        for (int v = 0; v < 2 * PAIRS; ++v) sum[v] = S::zero();
        for (int64_t j = 0; j < k; ++j) {
          const int64_t sample = b * k + j;
          const TableRow<BYTES, PAIRS> row(source + (sample * n + position[sample * n + i]) * row_bytes, n);
          const auto* words = index.data() + j * vectors * L::kLanes;
          for (int v = 0; v < 2 * PAIRS; ++v) {
            if (v >= vectors) continue;
            sum[v] = S::add(sum[v], S::from_bits(row.lookup(_mm512_loadu_si512(words + v * L::kLanes))));
          }
        }
        unsigned char* to = target + (b * n + i) * row_bytes;
        for (int v = 0; v < vectors; ++v) {
          L::store(L::first(n - v * L::kLanes), to + v * L::kLanes * BYTES,
                   S::to_bits(S::div(sum[v], static_cast<scalar_t>(divisor))));
        }
      }
    }
  });
}

// Runs the statement with the constexpr int PAIRS set to the table pairs that n words need.
#define LPS_FAST_DISPATCH_TABLE_PAIRS(n, BYTES, PAIRS, ...)                             \
  switch ((n + 2 * WordLanes<BYTES>::kLanes - 1) / (2 * WordLanes<BYTES>::kLanes)) {    \
    case 1: { constexpr int PAIRS = 1; __VA_ARGS__; break; }                            \
    case 2: { constexpr int PAIRS = 2; __VA_ARGS__; break; }                            \
    case 3: { constexpr int PAIRS = 3; __VA_ARGS__; break; }                            \
    default: { constexpr int PAIRS = 4; __VA_ARGS__; break; }                           \
  }
#endif  // __AVX512F__

// Runs the statement with the constexpr int BYTES set to the block size when it is a power of
// two up to 64 or the size of a point of 1, 2, 4 or 8 float channels (3 C words: 12 to 96 bytes),
// kWholeLines for other multiples of 64, else 0 (memcpy). (A macro rather than a
// templated lambda: the extension also builds as C++17.)
#define LPS_FAST_DISPATCH_BLOCK_SIZE(bytes, BYTES, ...)          \
  switch ((bytes) > 64 && (bytes) % 64 == 0 ? -64 : (bytes)) {   \
    case -64: { constexpr int BYTES = kWholeLines; __VA_ARGS__; break; } \
    case 1: { constexpr int BYTES = 1; __VA_ARGS__; break; }     \
    case 2: { constexpr int BYTES = 2; __VA_ARGS__; break; }     \
    case 4: { constexpr int BYTES = 4; __VA_ARGS__; break; }     \
    case 8: { constexpr int BYTES = 8; __VA_ARGS__; break; }     \
    case 16: { constexpr int BYTES = 16; __VA_ARGS__; break; }   \
    case 32: { constexpr int BYTES = 32; __VA_ARGS__; break; }   \
    case 64: { constexpr int BYTES = 64; __VA_ARGS__; break; }   \
    case 12: { constexpr int BYTES = 12; __VA_ARGS__; break; }   \
    case 24: { constexpr int BYTES = 24; __VA_ARGS__; break; }   \
    case 48: { constexpr int BYTES = 48; __VA_ARGS__; break; }   \
    case 96: { constexpr int BYTES = 96; __VA_ARGS__; break; }   \
    default: { constexpr int BYTES = 0; __VA_ARGS__; break; }    \
  }

// Runs the statement with the constexpr int F set to the feature count when it is 1, 2, 3, 4
// or 8, else 0 (run-time count), so that per-cell loops unroll.
#define LPS_FAST_DISPATCH_FEATURES(features, F, ...)           \
  switch (features) {                                          \
    case 1: { constexpr int F = 1; __VA_ARGS__; break; }       \
    case 2: { constexpr int F = 2; __VA_ARGS__; break; }       \
    case 3: { constexpr int F = 3; __VA_ARGS__; break; }       \
    case 4: { constexpr int F = 4; __VA_ARGS__; break; }       \
    case 8: { constexpr int F = 8; __VA_ARGS__; break; }       \
    default: { constexpr int F = 0; __VA_ARGS__; break; }      \
  }

// into[p[s], :] += row[s, :] for s < n: the input row is read in order (the prefetcher streams
// it from memory) and scattered into the accumulator row, which stays in L1. Not inlined: gcc
// drops the restrict qualifiers of inlined parameters.
template <int F, typename scalar_t, typename acc_t>
__attribute__((noinline)) void accumulate_scattered_row(const scalar_t* __restrict__ row,
                                                        const int64_t* __restrict__ p, acc_t* __restrict__ into,
                                                        int64_t n, int64_t runtime_features) {
  const int64_t features = F > 0 ? F : runtime_features;
  for (int64_t s = 0; s < n; ++s) {
    const scalar_t* __restrict__ from = row + s * features;
    acc_t* __restrict__ cell = into + p[s] * features;
    for (int64_t f = 0; f < features; ++f) cell[f] += static_cast<acc_t>(from[f]);
  }
}

// out[b, i] = sum_j y[b, j, q_j(i)] / divisor (k for the mean, 1 for the sum that is the
// gather's gradient), rows of F (or `features`) elements
template <int F, typename scalar_t>
void scatter_mean_nodes(const scalar_t* y, const int64_t* position, scalar_t* out, int64_t batch, int64_t k,
                        int64_t n, int64_t runtime_features, int64_t divisor) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t features = F > 0 ? F : runtime_features;
  const acc_t samples = static_cast<acc_t>(divisor);
  at::parallel_for(0, batch * n, grain_for(k * features), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(features);
    for_each_node_row(begin, end, n, [&](int64_t row, int64_t b, int64_t i) {
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t j = 0; j < k; ++j) {
        const int64_t sample = b * k + j;
        const scalar_t* from = y + (sample * n + position[sample * n + i]) * features;
        for (int64_t f = 0; f < features; ++f) sum[f] += static_cast<acc_t>(from[f]);
      }
      scalar_t* to = out + row * features;
      for (int64_t f = 0; f < features; ++f) to[f] = static_cast<scalar_t>(sum[f] / samples);
    });
  });
}

// The same sums with each graph's n x F accumulator kept in cache: every sample's rows are read in
// order and added into the accumulator rows they belong to (out[b, p(s)] += y[b, j, s]). Where
// the accumulator fits in L2 this reads y as a stream, where the gather form above reads it one
// scattered row at a time; each graph is still summed by one thread, in sample order.
template <int F, typename scalar_t>
void scatter_mean_nodes_streamed(const scalar_t* y, const int64_t* perm, scalar_t* out, int64_t batch, int64_t k,
                                 int64_t n, int64_t runtime_features, int64_t divisor) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t features = F > 0 ? F : runtime_features;
  const int64_t graph_size = n * features;
  const acc_t samples = static_cast<acc_t>(divisor);
  at::parallel_for(0, batch, grain_for(k * graph_size), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(graph_size);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(sums.begin(), sums.end(), acc_t(0));
      for (int64_t sample = b * k; sample < (b + 1) * k; ++sample) {
        accumulate_scattered_row<F>(y + sample * graph_size, perm + sample * n, sums.data(), n, features);
      }
      scalar_t* to = out + b * graph_size;
      for (int64_t m = 0; m < graph_size; ++m) to[m] = static_cast<scalar_t>(sums[m] / samples);
    }
  });
}

// Largest per-graph accumulator the streamed node scatter uses (it should stay in L2).
constexpr int64_t kStreamedAccumulatorBytes = 256 << 10;

// out[b, i, p(s)] = sum_j y[b, j, q(i), s] / divisor (one output row (b, i) per item); DIAGONAL:
// out[b, i] = sum_j y[b, j, q(i), q(i)] / divisor
template <int F, bool DIAGONAL, typename scalar_t>
void scatter_mean_edges(const scalar_t* y, const int64_t* perm, const int64_t* position, scalar_t* out,
                        int64_t batch, int64_t k, int64_t n, int64_t runtime_features, int64_t divisor) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t features = F > 0 ? F : runtime_features;
  const int64_t row_size = n * features;
  const int64_t out_row_size = DIAGONAL ? features : row_size;
  const acc_t samples = static_cast<acc_t>(divisor);
  at::parallel_for(0, batch * n, grain_for(k * out_row_size), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(out_row_size);
    for_each_node_row(begin, end, n, [&](int64_t row, int64_t b, int64_t i) {
      std::fill(sum.begin(), sum.end(), acc_t(0));
      acc_t* into = sum.data();
      for (int64_t j = 0; j < k; ++j) {
        const int64_t sample = b * k + j;
        const int64_t* q = position + sample * n;
        const scalar_t* from_row = y + (sample * n + q[i]) * row_size;
        if constexpr (DIAGONAL) {
          const scalar_t* from = from_row + q[i] * features;
          for (int64_t f = 0; f < features; ++f) into[f] += static_cast<acc_t>(from[f]);
        } else {
          accumulate_scattered_row<F>(from_row, perm + sample * n, into, n, features);
        }
      }
      scalar_t* to = out + row * out_row_size;
      for (int64_t m = 0; m < out_row_size; ++m) to[m] = static_cast<scalar_t>(into[m] / samples);
    });
  });
}

// out[b, j, r] = grad[b, perm[b, j, r]] / k: the gradient of unpermute_mean, one gather with the
// scale folded in (rows of F or `features` elements)
template <int F, typename scalar_t>
void gather_nodes_scaled(const scalar_t* grad, const int64_t* perm, scalar_t* out, int64_t batch, int64_t k,
                         int64_t n, int64_t runtime_features) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t features = F > 0 ? F : runtime_features;
  const acc_t samples = static_cast<acc_t>(k);
  const int64_t rows_per_graph = k * n;
  at::parallel_for(0, batch * rows_per_graph, grain_for(features), [&](int64_t begin, int64_t end) {
    int64_t b = begin / rows_per_graph;
    int64_t left = (b + 1) * rows_per_graph - begin;
    for (int64_t row = begin; row < end; ++row) {
      if (left == 0) {
        ++b;
        left = rows_per_graph;
      }
      --left;
      const scalar_t* __restrict__ from = grad + (b * n + perm[row]) * features;
      scalar_t* __restrict__ to = out + row * features;
      for (int64_t f = 0; f < features; ++f) to[f] = static_cast<scalar_t>(static_cast<acc_t>(from[f]) / samples);
    }
  });
}

// out[b, j, r, s] = grad[b, perm[b, j, r]] / k for s = r and zero elsewhere, one sample (b, j)
// per item: its n x n block is cleared with vector stores (kept in cache, unlike memset's
// streaming stores for large sizes), then its n diagonal cells are written.
template <typename scalar_t>
__attribute__((optimize("no-tree-loop-distribute-patterns"))) void scatter_diagonal_rows(
    const scalar_t* grad, const int64_t* perm, scalar_t* out, int64_t batch, int64_t k, int64_t n,
    int64_t features) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t samples = static_cast<acc_t>(k);
  const int64_t block_size = n * n * features;
  at::parallel_for(0, batch * k, grain_for(block_size), [&](int64_t begin, int64_t end) {
    for (int64_t sample = begin; sample < end; ++sample) {
      scalar_t* block = out + sample * block_size;
      for (int64_t m = 0; m < block_size; ++m) block[m] = scalar_t(0);
      const scalar_t* graph = grad + (sample / k) * n * features;
      const int64_t* sample_perm = perm + sample * n;
      for (int64_t r = 0; r < n; ++r) {
        const scalar_t* from = graph + sample_perm[r] * features;
        scalar_t* cell = block + (r * n + r) * features;
        for (int64_t f = 0; f < features; ++f) cell[f] = static_cast<scalar_t>(static_cast<acc_t>(from[f]) / samples);
      }
    }
  });
}

}  // namespace

namespace {

// Whether row_perm[0..n) holds each of 0..n-1 once: all entries in range and n distinct bits set
// in a bitmap of the entries (`words`: n / 64 rounded up). Branch-free, so it vectorizes; the
// rows that fail are walked again to name the first bad entry.
bool is_permutation(const int64_t* row_perm, int64_t n, uint64_t* words) {
  const uint64_t size = static_cast<uint64_t>(n);
  uint64_t outside = 0;
#if defined(__AVX512F__)
  if (n <= 64) {  // eight entries a step: range compare, and 1 << entry into the lanes' bitmaps
    const __m512i one = _mm512_set1_epi64(1), limit = _mm512_set1_epi64(n);
    __m512i seen = _mm512_setzero_si512();
    __mmask8 out_of_range = 0;
    for (int64_t r = 0; r < n; r += 8) {
      const __mmask8 lanes = n - r >= 8 ? __mmask8(0xFF) : __mmask8((1u << (n - r)) - 1);
      const __m512i node = _mm512_maskz_loadu_epi64(lanes, row_perm + r);
      out_of_range |= _mm512_mask_cmpge_epu64_mask(lanes, node, limit);
      seen = _mm512_or_si512(seen, _mm512_maskz_sllv_epi64(lanes, one, node));
    }
    alignas(64) uint64_t lane_bits[8];
    _mm512_store_si512(lane_bits, seen);
    uint64_t all = 0;
    for (int l = 0; l < 8; ++l) all |= lane_bits[l];
    return out_of_range == 0 && all == (n == 64 ? ~uint64_t(0) : (uint64_t(1) << n) - 1);
  }
#endif
  const int64_t word_count = (n + 63) / 64;
  std::fill(words, words + word_count, uint64_t(0));
  for (int64_t r = 0; r < n; ++r) {
    const uint64_t node = static_cast<uint64_t>(row_perm[r]);  // negative entries wrap past n
    const bool out_of_range = node >= size;
    outside |= static_cast<uint64_t>(out_of_range);
    const uint64_t kept = out_of_range ? 0 : node;
    words[kept >> 6] |= uint64_t(1) << (kept & 63);
  }
  int64_t distinct = 0;
  for (int64_t w = 0; w < word_count; ++w) distinct += __builtin_popcountll(words[w]);
  return outside == 0 && distinct == n;
}

}  // namespace

void invert_permutations(const int64_t* perm, int64_t rows, int64_t k, int64_t n, int64_t* inverse) {
  at::parallel_for(0, rows, grain_for(n), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> scratch(inverse == nullptr ? n : 0);
    std::vector<uint64_t> words(inverse == nullptr ? (n + 63) / 64 : 0);
    for (int64_t row = begin; row < end; ++row) {
      // validation alone: the bitmap check, and the positions only to report a bad row
      if (inverse == nullptr && is_permutation(perm + row * n, n, words.data())) continue;
      int64_t* position = inverse == nullptr ? scratch.data() : inverse + row * n;
      std::fill(position, position + n, -1);
      const int64_t* row_perm = perm + row * n;
      for (int64_t r = 0; r < n; ++r) {
        const int64_t node = row_perm[r];
        if (node < 0 || node >= n || position[node] >= 0) fail_not_a_permutation(row, k, n, r, node);
        position[node] = r;
      }
    }
  });
}

at::Tensor inverse_permutation(const at::Tensor& perm) {
  at::Tensor inverse = at::empty(perm.sizes(), perm.options());
  invert_permutations(perm.const_data_ptr<int64_t>(), perm.size(0) * perm.size(1), perm.size(1), perm.size(2),
                      inverse.mutable_data_ptr<int64_t>());
  return inverse;
}

at::Tensor permute_nodes(const at::Tensor& x, const at::Tensor& perm) {
  const int64_t batch = perm.size(0), k = perm.size(1), n = perm.size(2);
  at::Tensor out = at::empty(sampled_shape(x, k), x.options());
  if (out.numel() == 0) return out;
  invert_permutations(perm.const_data_ptr<int64_t>(), batch * k, k, n, nullptr);
  const int64_t row_bytes = feature_size(x, 2) * x.element_size();
  const auto* source = static_cast<const unsigned char*>(x.const_data_ptr());
  auto* target = static_cast<unsigned char*>(out.mutable_data_ptr());
  LPS_FAST_DISPATCH_BLOCK_SIZE(row_bytes, BYTES,
                               gather_nodes<BYTES>(source, perm.const_data_ptr<int64_t>(), target, batch, k, n,
                                                   row_bytes));
  return out;
}

at::Tensor permute_edges(const at::Tensor& e, const at::Tensor& perm) {
  const int64_t batch = perm.size(0), k = perm.size(1), n = perm.size(2);
  at::Tensor out = at::empty(sampled_shape(e, k), e.options());
  if (out.numel() == 0) return out;
  invert_permutations(perm.const_data_ptr<int64_t>(), batch * k, k, n, nullptr);
  const int64_t cell_bytes = feature_size(e, 3) * e.element_size();
  const auto* source = static_cast<const unsigned char*>(e.const_data_ptr());
  auto* target = static_cast<unsigned char*>(out.mutable_data_ptr());
#if defined(__AVX512F__)
  if (cell_bytes == 4 && n <= kMaxTableWords<4>) {
    LPS_FAST_DISPATCH_TABLE_PAIRS(n, 4, PAIRS, gather_edges_in_registers<4, PAIRS>(
        source, perm.const_data_ptr<int64_t>(), target, batch, k, n));
    return out;
  }
  if (cell_bytes == 8 && n <= kMaxTableWords<8>) {
    LPS_FAST_DISPATCH_TABLE_PAIRS(n, 8, PAIRS, gather_edges_in_registers<8, PAIRS>(
        source, perm.const_data_ptr<int64_t>(), target, batch, k, n));
    return out;
  }
#endif
  LPS_FAST_DISPATCH_BLOCK_SIZE(cell_bytes, BYTES,
                               gather_edges<BYTES>(source, perm.const_data_ptr<int64_t>(), target, batch, k, n,
                                                   cell_bytes));
  return out;
}

namespace {

// mean (divisor k) or sum (divisor 1) over the samples of the permuted-back node rows
at::Tensor scatter_nodes(const at::Tensor& y, const at::Tensor& perm, int64_t divisor) {
  const int64_t batch = y.size(0), k = y.size(1), n = y.size(2);
  const int64_t features = feature_size(y, 3);
  at::Tensor out = at::empty(averaged_shape(y), y.options());
  if (out.numel() == 0) return out;
  const int64_t accumulator_bytes = n * features * (y.scalar_type() == at::kDouble ? 8 : 4);
  // the streamed form parallelizes over graphs: it needs a graph per thread
  if (accumulator_bytes <= kStreamedAccumulatorBytes && batch >= at::get_num_threads()) {
    invert_permutations(perm.const_data_ptr<int64_t>(), batch * k, k, n, nullptr);  // validates
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "unpermute_mean_cpu", [&] {
      LPS_FAST_DISPATCH_FEATURES(features, F,
                                 scatter_mean_nodes_streamed<F>(y.const_data_ptr<scalar_t>(),
                                                                perm.const_data_ptr<int64_t>(),
                                                                out.mutable_data_ptr<scalar_t>(), batch, k, n,
                                                                features, divisor));
    });
    return out;
  }
  const at::Tensor inverse = inverse_permutation(perm);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "unpermute_mean_cpu", [&] {
    LPS_FAST_DISPATCH_FEATURES(features, F,
                               scatter_mean_nodes<F>(y.const_data_ptr<scalar_t>(), inverse.const_data_ptr<int64_t>(),
                                                     out.mutable_data_ptr<scalar_t>(), batch, k, n, features,
                                                     divisor));
  });
  return out;
}

at::Tensor scatter_edges(const at::Tensor& y, const at::Tensor& perm, bool diagonal, int64_t divisor) {
  const int64_t batch = y.size(0), k = y.size(1), n = y.size(2);
  const int64_t features = feature_size(y, 4);
  at::Tensor out = at::empty(averaged_edge_shape(y, diagonal), y.options());
  if (out.numel() == 0) return out;
  const at::Tensor inverse = inverse_permutation(perm);
#if defined(__AVX512F__)
  const int64_t cell_bytes = features * y.element_size();
  const bool float_or_double = y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble;
  const bool fits_table = (cell_bytes == 4 && n <= kMaxTableWords<4>) || (cell_bytes == 8 && n <= kMaxTableWords<8>);
  // parallel over graphs, so only with a graph per thread
  if (!diagonal && float_or_double && fits_table && batch >= at::get_num_threads()) {
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "unpermute_edges_mean_cpu", [&] {
      if (cell_bytes == 4) {
        LPS_FAST_DISPATCH_TABLE_PAIRS(n, 4, PAIRS, scatter_mean_edges_in_registers<4, PAIRS>(
            y.const_data_ptr<scalar_t>(), inverse.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(),
            batch, k, n, divisor));
      } else {
        LPS_FAST_DISPATCH_TABLE_PAIRS(n, 8, PAIRS, scatter_mean_edges_in_registers<8, PAIRS>(
            y.const_data_ptr<scalar_t>(), inverse.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(),
            batch, k, n, divisor));
      }
    });
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "unpermute_edges_mean_cpu", [&] {
    const scalar_t* source = y.const_data_ptr<scalar_t>();
    const int64_t* position = inverse.const_data_ptr<int64_t>();
    const int64_t* perm_data = perm.const_data_ptr<int64_t>();
    scalar_t* target = out.mutable_data_ptr<scalar_t>();
    if (diagonal) {
      LPS_FAST_DISPATCH_FEATURES(features, F,
                                 scatter_mean_edges<F, true>(source, perm_data, position, target, batch, k, n, features,
                                                             divisor));
    } else {
      LPS_FAST_DISPATCH_FEATURES(features, F,
                                 scatter_mean_edges<F, false>(source, perm_data, position, target, batch, k, n,
                                                              features, divisor));
    }
  });
  return out;
}

}  // namespace

at::Tensor unpermute_mean(const at::Tensor& y, const at::Tensor& perm) { return scatter_nodes(y, perm, y.size(1)); }

at::Tensor unpermute_edges_mean(const at::Tensor& y, const at::Tensor& perm, bool diagonal) {
  return scatter_edges(y, perm, diagonal, y.size(1));
}

at::Tensor permute_nodes_backward(const at::Tensor& grad, const at::Tensor& perm) {
  return scatter_nodes(grad, perm, 1);
}

at::Tensor permute_edges_backward(const at::Tensor& grad, const at::Tensor& perm) {
  return scatter_edges(grad, perm, /*diagonal=*/false, 1);
}

at::Tensor unpermute_mean_backward(const at::Tensor& grad, const at::Tensor& perm) {
  const int64_t batch = perm.size(0), k = perm.size(1), n = perm.size(2);
  const int64_t features = feature_size(grad, 2);
  at::Tensor out = at::empty(sampled_shape(grad, k), grad.options());
  if (out.numel() == 0) return out;
  invert_permutations(perm.const_data_ptr<int64_t>(), batch * k, k, n, nullptr);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "unpermute_mean_backward_cpu", [&] {
    LPS_FAST_DISPATCH_FEATURES(features, F,
                               gather_nodes_scaled<F>(grad.const_data_ptr<scalar_t>(), perm.const_data_ptr<int64_t>(),
                                                      out.mutable_data_ptr<scalar_t>(), batch, k, n, features));
  });
  return out;
}

at::Tensor unpermute_edges_mean_diagonal_backward(const at::Tensor& grad, const at::Tensor& perm) {
  const int64_t batch = perm.size(0), k = perm.size(1), n = perm.size(2);
  const int64_t features = feature_size(grad, 2);
  std::vector<int64_t> shape{batch, k, n, n};
  for (int64_t d = 2; d < grad.dim(); ++d) shape.push_back(grad.size(d));
  at::Tensor out = at::empty(shape, grad.options());
  if (out.numel() == 0) return out;
  invert_permutations(perm.const_data_ptr<int64_t>(), batch * k, k, n, nullptr);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "unpermute_edges_mean_diagonal_backward_cpu", [&] {
    scatter_diagonal_rows(grad.const_data_ptr<scalar_t>(), perm.const_data_ptr<int64_t>(),
                          out.mutable_data_ptr<scalar_t>(), batch, k, n, features);
  });
  return out;
}

}  // namespace cpu
}  // namespace lps_fast
