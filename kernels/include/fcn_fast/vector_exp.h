// exp for the CPU cross-entropy row loops: branch-free, so GCC vectorizes the loops that call it (std::exp is a libm
// call per lane, never vectorized without -ffast-math, which would also break the NaN semantics we mirror).
//
// A file including this must first set `#pragma GCC optimize("no-trapping-math")`: otherwise GCC keeps the
// NaN-preserving selects as branches (a float compare may raise an FP exception flag) and the loops stay scalar.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace fcn_fast {

// float: Cephes' range reduction by ln 2 and degree-6 polynomial, about 2 ulp. Meant for x <= ~0 (z - max,
// z - lse): below -87 it returns 0 (a softmax term under 1e-38 of the largest), above 88 +inf; NaN stays NaN, so NaN
// logits propagate as in PyTorch.
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
  return x < -87.0f ? 0.0f : (x > 88.0f ? std::numeric_limits<float>::infinity() : value);
}

// float64 inputs are for tests and gradcheck, not speed: keep libm's exact exp.
inline double vector_exp(double x) { return std::exp(x); }

}  // namespace fcn_fast
