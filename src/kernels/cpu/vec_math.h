// Branch-free float math that the compiler vectorises (std::exp does not without -ffast-math).
// exp_fast: Cody-Waite range reduction to r in [-ln2/2, ln2/2] and a degree-6 polynomial;
// relative error below 2e-7 on [-87.3, 88.7], the input clamped to that range. Double keeps
// std::exp: it serves the float64 gradient checks, where accuracy matters more than speed.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace sy::cpu::detail {

inline float exp_fast(float x) {
  // A ternary clamp: std::fmin/fmax keep NaN rules that stop GCC vectorising; NaN passes through.
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  // Round x / ln2 to the nearest integer by adding and subtracting 1.5 * 2^23 (nearbyint
  // would block vectorisation).
  const float n = (x * 1.44269504088896341f + 0x1.8p23f) - 0x1.8p23f;
  // ln2 split into a part exact in float and a correction.
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n from its exponent bits; memcpy, since GCC 12 does not vectorise std::bit_cast.
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp_fast(double x) { return std::exp(x); }

template <class T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + exp_fast(-x));
}

}  // namespace sy::cpu::detail
