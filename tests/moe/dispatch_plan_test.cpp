// Dispatch plan: the counting sort, exactly which slots drop at a capacity, custom ranks,
// bad ids, and the plan's memory.
#include "switchyard/moe/dispatch_plan.h"

#include <gtest/gtest.h>

#include "switchyard/core/error.h"

namespace sy {
namespace {

TEST(DispatchPlan, CountingSortGroupsRowsByExpert) {
  // T=5, k=2, E=3.
  std::vector<int32_t> expert = {2, 0, 1, 2, 2, 1, 0, 2, 1, 0};
  DispatchPlan p;
  build_dispatch_plan(expert, 5, 2, 3, -1, p);
  EXPECT_EQ(p.offsets, (std::vector<int32_t>{0, 3, 6, 10}));
  EXPECT_EQ(p.demand, (std::vector<int32_t>{3, 3, 4}));
  EXPECT_EQ(p.n_dropped(), 0);
  for (int64_t e = 0; e < 3; ++e)
    for (int32_t r = p.offsets[e]; r < p.offsets[e + 1]; ++r) {
      EXPECT_EQ(expert[p.row_slot[r]], e);
      EXPECT_EQ(p.row_token[r], p.row_slot[r] / 2);
      EXPECT_EQ(p.slot_row[p.row_slot[r]], r);
    }
  // Within an expert: first choices in token order, then second choices.
  EXPECT_EQ(std::vector<int32_t>(p.row_slot.begin() + 6, p.row_slot.end()),
            (std::vector<int32_t>{0, 4, 3, 7}));
}

TEST(DispatchPlan, ExactlyWhichSlotsDropAtCapacity) {
  // T=4, k=2, E=2, C=2. First choices: t0->0, t1->0, t2->0, t3->1; second: t0->1, t1->1,
  // t2->1, t3->0. Expert 0 takes t0, t1 (t2's first choice drops); expert 1 takes t3's first
  // choice, then t0's second; t1 and t2's second choices and t3's second (to the full
  // expert 0) drop.
  std::vector<int32_t> expert = {0, 1, 0, 1, 0, 1, 1, 0};
  DispatchPlan p;
  build_dispatch_plan(expert, 4, 2, 2, 2, p);
  std::vector<bool> kept;
  for (int32_t r : p.slot_row) kept.push_back(r >= 0);
  EXPECT_EQ(kept, (std::vector<bool>{true, true, true, false, false, false, true, false}));
  EXPECT_EQ(p.offsets, (std::vector<int32_t>{0, 2, 4}));
  EXPECT_EQ(p.n_dropped(), 4);
  EXPECT_EQ(p.demand, (std::vector<int32_t>{4, 4}));
}

TEST(DispatchPlan, CustomRankDecidesWhoKeepsCapacity) {
  // Three tokens want expert 0 with C=1; the rank puts token 2 first.
  std::vector<int32_t> expert = {0, 0, 0};
  std::vector<int32_t> rank = {2, 0, 1};
  DispatchPlan p;
  build_dispatch_plan(expert, 3, 1, 1, 1, p, rank);
  EXPECT_EQ(p.slot_row, (std::vector<int32_t>{-1, -1, 0}));
  EXPECT_THROW(build_dispatch_plan(expert, 3, 1, 1, 1, p, std::vector<int32_t>{0, 0, 1}),
               ShapeError);
}

TEST(DispatchPlan, CapacityZeroDropsEverythingAndEmptyIsValid) {
  std::vector<int32_t> expert = {1, 0, 1};
  DispatchPlan p;
  build_dispatch_plan(expert, 3, 1, 2, 0, p);
  EXPECT_EQ(p.n_rows(), 0);
  EXPECT_EQ(p.n_dropped(), 3);
  build_dispatch_plan({}, 0, 2, 4, 3, p);
  EXPECT_EQ(p.n_rows(), 0);
  EXPECT_EQ(p.offsets, (std::vector<int32_t>(5, 0)));
}

TEST(DispatchPlan, BadInputNamesWhatIsWrong) {
  DispatchPlan p;
  try {
    build_dispatch_plan(std::vector<int32_t>{0, 3}, 1, 2, 3, -1, p);
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "expert id 3 at slot 1 (token 0, choice 1): expected 0..2");
  }
  EXPECT_THROW(build_dispatch_plan(std::vector<int32_t>{0}, 1, 2, 3, -1, p), ShapeError);
  EXPECT_THROW(build_dispatch_plan(std::vector<int32_t>{0}, 1, 1, 3, -2, p), ConfigError);
  EXPECT_THROW(build_dispatch_plan(std::vector<int32_t>{0, 1}, 1, 2, 1, -1, p), ConfigError);
}

TEST(DispatchPlan, IndexMemoryIsLinearInSlots) {
  // O(T*k) indices: offsets [E+1], row_token and row_slot [n], slot_row [T*k], demand [E].
  const int64_t T = 1000, k = 2, E = 64;
  std::vector<int32_t> expert(size_t(T * k));
  for (size_t i = 0; i < expert.size(); ++i) expert[i] = int32_t((i * 7919) % E);
  DispatchPlan p;
  build_dispatch_plan(expert, T, k, E, -1, p);
  EXPECT_EQ(p.index_bytes(), 4u * size_t((E + 1) + 2 * T * k + T * k + E));
}

}  // namespace
}  // namespace sy
