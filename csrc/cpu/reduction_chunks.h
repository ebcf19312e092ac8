// Fixed chunking of a batch for the CPU kernels' reductions over graphs: each chunk sums its
// graphs into its own partial row and the rows are added in chunk order, so results do not
// depend on the thread count.
#pragma once

#include <algorithm>
#include <cstdint>

namespace lps_fast {
namespace cpu {

constexpr int64_t kMaxChunks = 64;

inline int64_t chunk_count(int64_t N) { return std::max<int64_t>(1, std::min<int64_t>(N, kMaxChunks)); }
inline int64_t chunk_begin(int64_t chunk, int64_t chunks, int64_t N) { return chunk * N / chunks; }

}  // namespace cpu
}  // namespace lps_fast
