// exp, log and half/bfloat16 conversions for the CPU cross-entropy row loops: branch-free, so GCC vectorizes the
// loops that call them (std::exp is a libm call per lane, never vectorized without -ffast-math, which would also
// break the NaN semantics we mirror).
//
// A file including this must first set `#pragma GCC optimize("no-trapping-math")`: otherwise GCC keeps the
// NaN-preserving selects as branches (a float compare may raise an FP exception flag) and the loops stay scalar.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "fcn_fast/common.h"

namespace fcn_fast {

// float: Cephes' range reduction by ln 2 and degree-6 polynomial, about 2 ulp. Meant for x <= ~0 (z - max,
// z - lse, never above 0 but for rounding): below -87 it returns 0 (a softmax term under 1e-38 of the largest, and
// exactly 0 for a -inf logit, as PyTorch gives); above 88 it saturates at exp(88) instead of returning +inf.
// NaN stays NaN: NaN logits propagate as in PyTorch. Only the low end is clamped before the polynomial (it keeps
// 2^n a normal float); the high end is one select after it: clamping both ends first, NaN-preserving, cost GCC
// four compares and four blends per vector (about 5% of the bfloat16 CE backward in an interleaved microbenchmark).
inline float vector_exp(float x) {
  const float xc = x < -87.0f ? -87.0f : x;  // comparisons are false for NaN: it passes
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
  return x < -87.0f ? 0.0f : (x > 88.0f ? 0x1.f1056ep+126f : value);  // exp(88), rounded
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

// Widening to and narrowing from the accumulate type, with c10's rounding (nearest even; NaN stays NaN) but no
// branches, so the conversion loops vectorize: c10's own conversions kept the half/bfloat16 CE loops 3-4x slower
// than float (measured).
template <typename scalar_t>
inline acc_t<scalar_t> widen(scalar_t v) {
  return static_cast<acc_t<scalar_t>>(v);
}

inline float widen(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename scalar_t>
inline scalar_t narrow(acc_t<scalar_t> v) {
  return static_cast<scalar_t>(v);
}

template <>
inline c10::BFloat16 narrow<c10::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

#if defined(__FLT16_MAX__)  // the compiler has _Float16 (GCC >= 12 and Clang on x86-64): F16C instructions
inline float widen(c10::Half v) {
  _Float16 h;
  std::memcpy(&h, &v.x, sizeof h);
  return static_cast<float>(h);
}

template <>
inline c10::Half narrow<c10::Half>(float v) {
  const _Float16 h = static_cast<_Float16>(v);
  uint16_t bits;
  std::memcpy(&bits, &h, sizeof bits);
  return c10::Half(bits, c10::Half::from_bits());
}
#endif

}  // namespace fcn_fast
