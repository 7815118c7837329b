// Counter-based RNG: the same numbers at any thread count, sane moments, distinct streams.
#include "switchyard/core/rng.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "switchyard/core/exec_context.h"

namespace sy {
namespace {

std::vector<float> normals(int threads, size_t n) {
  ThreadScope scope(threads);
  std::vector<float> v(n);
  fill_normal(std::span<float>(v), Philox(42, 3), 1.0f);
  return v;
}

TEST(Philox, SameNumbersAtAnyThreadCount) {
  EXPECT_EQ(normals(1, 100003), normals(2, 100003));
  EXPECT_EQ(normals(1, 100003), normals(7, 100003));
}

TEST(Philox, MomentsOfNormalAndUniform) {
  std::vector<float> v = normals(0, 200000);
  double mean = 0, var = 0;
  for (float x : v) mean += x;
  mean /= double(v.size());
  for (float x : v) var += (x - mean) * (x - mean);
  var /= double(v.size());
  EXPECT_NEAR(mean, 0.0, 0.01);
  EXPECT_NEAR(var, 1.0, 0.02);
  Philox rng(1, 1);
  double umean = 0;
  for (uint64_t i = 0; i < 100000; ++i) {
    float u = rng.uniform(i);
    ASSERT_GE(u, 0.0f);
    ASSERT_LT(u, 1.0f);
    umean += u;
  }
  EXPECT_NEAR(umean / 100000, 0.5, 0.005);
}

TEST(Philox, StreamsAndSeedsDiffer) {
  EXPECT_NE(Philox(1, 0).bits(0), Philox(1, 1).bits(0));
  EXPECT_NE(Philox(1, 0).bits(0), Philox(2, 0).bits(0));
  EXPECT_EQ(Philox(9, 4).bits(123), Philox(9, 4).bits(123));
}

}  // namespace
}  // namespace sy
