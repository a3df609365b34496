// exp and log for the CPU cross-entropy row loops: branch-free, so GCC vectorizes the loops that call it (std::exp is a libm
// call per lane, never vectorized without -ffast-math, which would also break the NaN semantics we mirror).
//
// A file including this must first set `#pragma GCC optimize("no-trapping-math")`: otherwise GCC keeps the
// NaN-preserving selects as branches (a float compare may raise an FP exception flag) and the loops stay scalar.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fcn_fast {

// float: Cephes' range reduction by ln 2 and degree-6 polynomial, about 2 ulp. Meant for x <= ~0 (z - max,
// z - lse, never above 0 but for rounding): below -87 it returns 0 (a softmax term under 1e-38 of the largest, and
// exactly 0 for a -inf logit, as PyTorch gives); above 88 it saturates at exp(88) instead of returning +inf, which
// spares a compare and a blend per vector in the loops that call it. NaN stays NaN: NaN logits propagate as in
// PyTorch.
inline float vector_exp(float x) {
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // comparisons are false for NaN: it passes
  const float shifted = xc * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: rounds to an integer n in the
  const float n = shifted - 12582912.0f;                          // low mantissa bits, no float->int conversion
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;    // x - n ln2 in two parts
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  const int32_t scale_bits = (bits - 0x4B400000 + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  const float value = y * scale;
  return x < -87.0f ? 0.0f : value;
}

// float64 inputs are for tests and gradcheck, not speed: keep libm's exact exp.
inline double vector_exp(double x) { return std::exp(x); }

// float: Cephes' logf (split into exponent and a mantissa in [sqrt(1/2), sqrt(2)), degree-8 polynomial), about
// 1 ulp, branch-free so the per-pixel log-sum-exp loops vectorize (libm's logf was a tenth of the CE forward).
// Meant for a softmax denominator: finite x >= 1, or NaN, which stays NaN; no zero, negative or denormal handling.
inline float vector_log(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const int32_t exponent = ((bits >> 23) & 0xff) - 126;  // x = m * 2^exponent, m in [0.5, 1)
  const int32_t mantissa_bits = (bits & 0x007fffff) | 0x3f000000;
  float m;
  std::memcpy(&m, &mantissa_bits, sizeof m);
  const bool below = m < 0.707106781186547524f;
  const float e = static_cast<float>(exponent) - (below ? 1.0f : 0.0f);
  const float r = below ? m + m - 1.0f : m - 1.0f;
  const float r2 = r * r;
  float y = 7.0376836292e-2f;
  y = y * r - 1.1514610310e-1f;
  y = y * r + 1.1676998740e-1f;
  y = y * r - 1.2420140846e-1f;
  y = y * r + 1.4249322787e-1f;
  y = y * r - 1.6668057665e-1f;
  y = y * r + 2.0000714765e-1f;
  y = y * r - 2.4999993993e-1f;
  y = y * r + 3.3333331174e-1f;
  y = y * r * r2;
  y += -2.12194440e-4f * e;
  y += -0.5f * r2;
  const float value = (r + y) + 0.693359375f * e;
  return x != x ? x : value;
}

inline double vector_log(double x) { return std::log(x); }

}  // namespace fcn_fast
