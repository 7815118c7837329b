// Super-class clustering: a confusion matrix with a known block structure gives back its blocks,
// by enumeration (10 classes) and by local search (20 classes), with balanced group sizes; the
// JSON is what training reads; bad group counts are named.
#include "switchyard/train/superclass.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "switchyard/core/error.h"
#include "switchyard/core/rng.h"

namespace sy {
namespace {

// Classes in blocks (block[c]); heavy confusion inside a block, light noise across, random.
ConfusionMatrix blocky(const std::vector<int32_t>& block, uint64_t seed) {
  const int64_t n = int64_t(block.size());
  ConfusionMatrix cm{.n_classes = n, .counts = std::vector<int64_t>(size_t(n * n))};
  const Philox rng(seed, 0);
  for (int64_t a = 0; a < n; ++a)
    for (int64_t b = 0; b < n; ++b) {
      const uint32_t r = rng.bits(uint64_t(a * n + b))[0];
      cm.counts[a * n + b] = a == b ? 900 : block[a] == block[b] ? 20 + r % 30 : r % 4;
    }
  return cm;
}

// Whether two labellings are the same partition (labels may be permuted).
bool same_partition(const std::vector<int32_t>& x, const std::vector<int32_t>& y) {
  for (size_t a = 0; a < x.size(); ++a)
    for (size_t b = 0; b < x.size(); ++b)
      if ((x[a] == x[b]) != (y[a] == y[b])) return false;
  return true;
}

TEST(SuperClasses, EnumerationRecoversBlocks) {
  // Ten classes in blocks of 4, 3, 3, scattered over the labels.
  const std::vector<int32_t> block = {0, 1, 2, 0, 1, 2, 0, 0, 1, 2};
  const ConfusionMatrix cm = blocky(block, 1);
  const SuperClasses s = cluster_classes(cm, 3);
  EXPECT_TRUE(s.exact);
  EXPECT_TRUE(same_partition(s.of_class, block));
  EXPECT_GT(s.inside / s.total, 0.8);
}

TEST(SuperClasses, BalanceIsKeptWhenTheBlocksAreUneven) {
  // Blocks of 6 and 4 into 2 groups: the groups must stay 5 and 5.
  const std::vector<int32_t> block = {0, 0, 0, 0, 0, 0, 1, 1, 1, 1};
  const SuperClasses s = cluster_classes(blocky(block, 2), 2);
  int64_t first = 0;
  for (int32_t g : s.of_class) first += g == s.of_class[0];
  EXPECT_EQ(first, 5);
  // Classes 6..9 stay together.
  for (int64_t c = 7; c < 10; ++c) EXPECT_EQ(s.of_class[c], s.of_class[6]);
}

TEST(SuperClasses, LocalSearchRecoversBlocksOfALargerGraph) {
  std::vector<int32_t> block(20);
  for (int64_t c = 0; c < 20; ++c) block[c] = int32_t((c * 7) % 4);  // 4 blocks of 5, interleaved
  const SuperClasses s = cluster_classes(blocky(block, 3), 4);
  EXPECT_FALSE(s.exact);
  EXPECT_TRUE(same_partition(s.of_class, block));
}

TEST(SuperClasses, JsonIsWhatTrainingReadsAndBadCountsAreNamed) {
  const std::vector<int32_t> block = {0, 1, 0, 1, 0, 1, 0, 1, 0, 1};
  const ConfusionMatrix cm = blocky(block, 4);
  const SuperClasses s = cluster_classes(cm, 2);
  std::vector<std::string> names;
  for (int c = 0; c < 10; ++c) names.push_back(fmt::format("c{}", c));
  const auto j = nlohmann::json::parse(superclasses_json(s, cm, names));
  EXPECT_EQ(j["superclass"].get<std::vector<int32_t>>(), s.of_class);
  EXPECT_EQ(j["groups"].size(), 2u);
  const std::string svg = superclasses_svg(s, cm, names);
  EXPECT_NE(svg.find("<svg"), std::string::npos);
  EXPECT_NE(svg.find("c9"), std::string::npos);
  EXPECT_THROW(cluster_classes(cm, 0), ConfigError);
  EXPECT_THROW(cluster_classes(cm, 11), ConfigError);
}

}  // namespace
}  // namespace sy
