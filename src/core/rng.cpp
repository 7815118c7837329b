// Philox4x32-10 with the constants from the Random123 paper.
#include "switchyard/core/rng.h"

#include <cmath>
#include <numbers>

namespace sy {

namespace {
constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;

inline void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  uint64_t p = uint64_t(a) * b;
  hi = uint32_t(p >> 32);
  lo = uint32_t(p);
}
}  // namespace

std::array<uint32_t, 4> Philox::bits(uint64_t i) const {
  std::array<uint32_t, 4> c{uint32_t(i), uint32_t(i >> 32), uint32_t(stream_),
                            uint32_t(stream_ >> 32)};
  uint32_t k0 = key_[0], k1 = key_[1];
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kM0, c[0], hi0, lo0);
    mulhilo(kM1, c[2], hi1, lo1);
    c = {hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0};
    k0 += kW0;
    k1 += kW1;
  }
  return c;
}

float Philox::uniform(uint64_t i) const { return float(bits(i)[0] >> 8) * 0x1.0p-24f; }

float Philox::normal(uint64_t i) const {
  auto b = bits(i);
  // u1 in (0, 1] so the log is finite.
  double u1 = (double(b[0] >> 8) + 1.0) * 0x1.0p-24;
  double u2 = double(b[1] >> 8) * 0x1.0p-24;
  return float(std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2));
}

namespace {
template <class T>
void fill_uniform_impl(std::span<T> out, const Philox& rng, T lo, T hi) {
  const int64_t n = int64_t(out.size());
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = lo + (hi - lo) * T(rng.uniform(uint64_t(i)));
}
template <class T>
void fill_normal_impl(std::span<T> out, const Philox& rng, T stddev) {
  const int64_t n = int64_t(out.size());
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = stddev * T(rng.normal(uint64_t(i)));
}
}  // namespace

void fill_uniform(std::span<float> out, const Philox& rng, float lo, float hi) {
  fill_uniform_impl(out, rng, lo, hi);
}
void fill_uniform(std::span<double> out, const Philox& rng, double lo, double hi) {
  fill_uniform_impl(out, rng, lo, hi);
}
void fill_normal(std::span<float> out, const Philox& rng, float stddev) {
  fill_normal_impl(out, rng, stddev);
}
void fill_normal(std::span<double> out, const Philox& rng, double stddev) {
  fill_normal_impl(out, rng, stddev);
}

}  // namespace sy
