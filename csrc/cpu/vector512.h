// 512-bit vectors of float or double for the CPU kernels' AVX-512 paths: one traits struct per
// scalar type, so that a kernel written once over Vector512<scalar_t> serves both. Include it only
// under __AVX512F__.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace lps_fast {
namespace cpu {

template <typename T>
struct Vector512;

template <>
struct Vector512<float> {
  using Vec = __m512;
  using Mask = __mmask16;
  using index_t = int32_t;  // the lane index type of the permutes
  static constexpr int kLanes = 16;
  // the first `count` lanes (none for count <= 0, all for count >= kLanes)
  static Mask first(int64_t count) {
    return count >= kLanes ? Mask(0xFFFF) : count <= 0 ? Mask(0) : Mask((1u << count) - 1);
  }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec load(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static Vec load(Vec src, Mask m, const float* p) { return _mm512_mask_loadu_ps(src, m, p); }  // src where not m
  static void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static void store(Mask m, float* p, Vec v) { _mm512_mask_storeu_ps(p, m, v); }
  static __m512i index(const index_t* p) { return _mm512_loadu_si512(p); }
  static Vec from_bits(__m512i v) { return _mm512_castsi512_ps(v); }
  static __m512i to_bits(Vec v) { return _mm512_castps_si512(v); }
  static Vec pick(Vec a, __m512i index, Vec b) { return _mm512_permutex2var_ps(a, index, b); }
  static Vec pick(__m512i index, Vec a) { return _mm512_permutex2var_ps(a, index, a); }  // index mod kLanes
  static Vec blend(Mask m, Vec a, Vec b) { return _mm512_mask_blend_ps(m, a, b); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static Vec add(Mask m, Vec a, Vec b) { return _mm512_mask_add_ps(a, m, a, b); }  // a + b where m, else a
  static Vec sub(Mask m, Vec a, Vec b) { return _mm512_maskz_sub_ps(m, a, b); }
  static Vec div(Vec a, float b) { return _mm512_div_ps(a, _mm512_set1_ps(b)); }
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec broadcast(float x) { return _mm512_set1_ps(x); }
  static Vec keep(Mask m, Vec v) { return _mm512_maskz_mov_ps(m, v); }
  static Mask greater(Vec a, Vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }  // false where either is NaN
  // the sum of all lanes, by butterflies of two-table permutes (gcc 12 warns on the reduce
  // intrinsics, whose shuffles pass an undefined vector)
  static float sum(Vec v) {
    for (int step = 8; step >= 1; step /= 2) {
      const __m512i partner = _mm512_xor_si512(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                               _mm512_set1_epi32(step));
      v = _mm512_add_ps(v, _mm512_permutex2var_ps(v, partner, v));
    }
    return _mm512_cvtss_f32(v);
  }
};

template <>
struct Vector512<double> {
  using Vec = __m512d;
  using Mask = __mmask8;
  using index_t = int64_t;
  static constexpr int kLanes = 8;
  static Mask first(int64_t count) {
    return count >= kLanes ? Mask(0xFF) : count <= 0 ? Mask(0) : Mask((1u << count) - 1);
  }
  static Vec load(const double* p) { return _mm512_loadu_pd(p); }
  static Vec load(Mask m, const double* p) { return _mm512_maskz_loadu_pd(m, p); }
  static Vec load(Vec src, Mask m, const double* p) { return _mm512_mask_loadu_pd(src, m, p); }
  static void store(double* p, Vec v) { _mm512_storeu_pd(p, v); }
  static void store(Mask m, double* p, Vec v) { _mm512_mask_storeu_pd(p, m, v); }
  static __m512i index(const index_t* p) { return _mm512_loadu_si512(p); }
  static Vec from_bits(__m512i v) { return _mm512_castsi512_pd(v); }
  static __m512i to_bits(Vec v) { return _mm512_castpd_si512(v); }
  static Vec pick(Vec a, __m512i index, Vec b) { return _mm512_permutex2var_pd(a, index, b); }
  static Vec pick(__m512i index, Vec a) { return _mm512_permutex2var_pd(a, index, a); }  // index mod kLanes
  static Vec blend(Mask m, Vec a, Vec b) { return _mm512_mask_blend_pd(m, a, b); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_pd(a, b, c); }
  static Vec add(Vec a, Vec b) { return _mm512_add_pd(a, b); }
  static Vec mul(Vec a, Vec b) { return _mm512_mul_pd(a, b); }
  static Vec add(Mask m, Vec a, Vec b) { return _mm512_mask_add_pd(a, m, a, b); }
  static Vec sub(Mask m, Vec a, Vec b) { return _mm512_maskz_sub_pd(m, a, b); }
  static Vec div(Vec a, double b) { return _mm512_div_pd(a, _mm512_set1_pd(b)); }
  static Vec zero() { return _mm512_setzero_pd(); }
  static Vec broadcast(double x) { return _mm512_set1_pd(x); }
  static Vec keep(Mask m, Vec v) { return _mm512_maskz_mov_pd(m, v); }
  static Mask greater(Vec a, Vec b) { return _mm512_cmp_pd_mask(a, b, _CMP_GT_OQ); }
  static double sum(Vec v) {
    for (int step = 4; step >= 1; step /= 2) {
      const __m512i partner = _mm512_xor_si512(_mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi64(step));
      v = _mm512_add_pd(v, _mm512_permutex2var_pd(v, partner, v));
    }
    return _mm512_cvtsd_f64(v);
  }
};

}  // namespace cpu
}  // namespace lps_fast
