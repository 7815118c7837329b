// Counter-based random numbers (Philox4x32-10, Salmon et al. 2011). The value at index i is a
// pure function of (seed, stream, i), so filling a tensor in parallel gives the same numbers
// at any thread count, and a stream can be skipped ahead for free.
//
//   Philox rng(seed, /*stream=*/layer_id);
//   float u = rng.uniform(i);        // [0, 1)
//   fill_normal(w.span<float>(), Philox(seed, 7), 0.02f);
#pragma once

#include <array>
#include <cstdint>
#include <span>

namespace sy {

class Philox {
 public:
  Philox(uint64_t seed, uint64_t stream)
      : key_{uint32_t(seed), uint32_t(seed >> 32)}, stream_(stream) {}
  // Four independent 32-bit words for counter i.
  std::array<uint32_t, 4> bits(uint64_t i) const;
  // Uniform in [0, 1) with 24 random bits; uses word 0 of counter i.
  float uniform(uint64_t i) const;
  // Standard normal by Box-Muller over words of counter i.
  float normal(uint64_t i) const;

 private:
  std::array<uint32_t, 2> key_;
  uint64_t stream_;
};

void fill_uniform(std::span<float> out, const Philox& rng, float lo, float hi);
void fill_uniform(std::span<double> out, const Philox& rng, double lo, double hi);
void fill_normal(std::span<float> out, const Philox& rng, float stddev);
void fill_normal(std::span<double> out, const Philox& rng, double stddev);

}  // namespace sy
