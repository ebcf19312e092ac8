// Small numeric helpers for the CPU kernels, written so that loops calling them vectorize
// (setup.py compiles with -fno-math-errno -fno-trapping-math, which lets gcc if-convert the
// clamps and inline floor).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__)
#define LPS_FAST_NOINLINE __attribute__((noinline))
#else
#define LPS_FAST_NOINLINE
#endif

namespace lps_fast {
namespace cpu {

// exp for float in plain arithmetic (no libm call), so that gcc vectorizes loops over it:
// exp(x) = 2^n exp(f), n = round(x / ln 2), |f| <= ln(2) / 2, with a degree-6 polynomial for
// exp(f) (about 1 ulp). Arguments below -87.3 return about 1e-38 instead of 0, which only ever
// adds such a term to sums of O(1) values.
inline float fast_exp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float f = x - n * 0.693359375f;  // ln 2 in two parts, for an exact reduction
  f = f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline double fast_exp(double x) { return std::exp(x); }

// log for positive normal floats in plain arithmetic (vectorizable): x = 2^e m with
// m in [sqrt(1/2), sqrt(2)), log x = e ln 2 + log m, log m from a degree-8 polynomial in
// f = m - 1 (about 1 ulp). Zero gives a large negative number instead of -inf; callers clamp
// at -100 anyway.
inline float fast_log(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  int32_t exponent = ((bits >> 23) & 0xff) - 127;
  int32_t mantissa_bits = (bits & 0x007fffff) | 0x3f800000;  // m in [1, 2)
  float m;
  std::memcpy(&m, &mantissa_bits, sizeof(m));
  const bool high = m > 1.41421356f;
  m = high ? m * 0.5f : m;
  exponent += high ? 1 : 0;
  const float f = m - 1.0f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float e = static_cast<float>(exponent);
  float result = f * z * p;
  result += e * -2.12194440e-4f;
  result -= 0.5f * z;
  result = f + result;
  result += e * 0.693359375f;
  return x > 0.0f ? result : -1.0e30f;
}

inline double fast_log(double x) { return std::log(x); }

// sign with sign(0) = 0, as the gradient of |x| in autograd.
template <typename T>
inline T sign(T x) {
  return static_cast<T>((x > T(0)) - (x < T(0)));
}

}  // namespace cpu
}  // namespace lps_fast
