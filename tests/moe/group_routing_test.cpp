// Routing by groups of rows (per-image routing) and the router guidance loss: the layer against
// the naive reference that routes each group by its mean row, capacity that keeps or drops
// groups whole, float64 gradchecks with the guidance loss, and the named errors.
#include <gtest/gtest.h>

#include <cmath>

#include "moe/moe_reference.h"
#include "switchyard/moe/moe_layer.h"
#include "testing/testing.h"

namespace sy {
namespace {

using testing::config_of;
using testing::dot;
using testing::expect_grad_close;
using testing::LayerCase;
using testing::random_tensor;

struct GroupCase {
  LayerCase layer;
  int64_t rows;  // rows per group
  friend void PrintTo(const GroupCase& c, std::ostream* os) {
    PrintTo(c.layer, os);
    *os << "_rows" << c.rows;
  }
};

class GroupVsNaive : public ::testing::TestWithParam<GroupCase> {};

TEST_P(GroupVsNaive, EveryRowOfAGroupTakesTheGroupsExperts) {
  const GroupCase gc = GetParam();
  const LayerCase& c = gc.layer;
  const MoeConfig cfg = config_of(c);
  MoeLayer layer(cfg);
  MoeParams p = init_moe_params(cfg, DType::kF64, 31);
  Tensor x = random_tensor({c.T, c.d}, DType::kF64, 32, -2, 2);
  const int64_t G = c.T / gc.rows, C = cfg.capacity(G, true);
  const testing::NaiveMoe want = testing::naive_moe(cfg, p, x, C, gc.rows);

  Tensor y;
  MoeCache cache;
  MoeForward out = layer.forward(p, x, y, cache, {}, {}, {.rows = gc.rows, .guide = {}});
  EXPECT_EQ(cache.router.expert, want.expert);
  const std::vector<int32_t>& row_expert = gc.rows > 1 ? cache.row_expert : cache.router.expert;
  ASSERT_EQ(int64_t(row_expert.size()), c.T * c.k);
  for (int64_t t = 0; t < c.T; ++t)
    for (int64_t j = 0; j < c.k; ++j) {
      const size_t group_slot = size_t((t / gc.rows) * c.k + j);
      EXPECT_EQ(row_expert[size_t(t * c.k + j)], want.expert[group_slot]);
      EXPECT_EQ(cache.plan.slot_row[size_t(t * c.k + j)] >= 0, bool(want.kept[group_slot]))
          << "row " << t << " choice " << j << ": a group is kept or dropped whole";
    }
  EXPECT_LE(testing::max_scaled_error(y.span<double>(), want.y, 1e-12, 1e-10), 1.0);
  const int64_t dropped = std::count(want.kept.begin(), want.kept.end(), false);
  EXPECT_DOUBLE_EQ(out.stats.dropped_fraction, double(dropped) / double(G * c.k));
  if (c.capacity_factor > 0 && c.capacity_factor < 1) {
    EXPECT_GT(dropped, 0);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, GroupVsNaive,
    ::testing::Values(GroupCase{{12, 7, 9, 4, 2, true, 0}, 3},       // dropless
                      GroupCase{{30, 5, 6, 3, 1, false, 0.7}, 5},    // Switch top-1, dropping
                      GroupCase{{28, 6, 5, 4, 2, true, 0.6, true}, 7},  // BPR ranks groups
                      GroupCase{{9, 4, 3, 5, 2, true, 1.0}, 9},      // one group
                      GroupCase{{11, 5, 4, 3, 2, true, 0}, 1}));     // rows = 1 is per-row

struct GroupGradCase {
  Gating gating;
  int64_t k;
  double capacity_factor;  // 0: dropless
  bool prioritized;
  double guide_weight;
  friend void PrintTo(const GroupGradCase& c, std::ostream* os) {
    *os << int(c.gating) << "_k" << c.k << "_cf" << c.capacity_factor
        << (c.prioritized ? "_bpr" : "") << "_guide" << c.guide_weight;
  }
};
class GroupGrad : public ::testing::TestWithParam<GroupGradCase> {};

TEST_P(GroupGrad, MatchesFiniteDifferences) {
  const GroupGradCase gc = GetParam();
  const int64_t rows = 4, G = 5, T = rows * G, d = 6, E = 4;
  MoeConfig cfg{.d_model = d, .d_ff = 5, .n_experts = E, .top_k = gc.k, .gating = gc.gating};
  cfg.dropless = gc.capacity_factor == 0;
  if (!cfg.dropless) cfg.capacity_factor_train = cfg.capacity_factor_eval = gc.capacity_factor;
  cfg.batch_prioritized = gc.prioritized;
  cfg.loss_balance_weight = 0.1;
  cfg.loss_z_weight = 0.05;
  cfg.loss_guide_weight = gc.guide_weight;
  MoeLayer layer(cfg);
  MoeParams p = init_moe_params(cfg, DType::kF64, 41);
  Tensor x = random_tensor({T, d}, DType::kF64, 42), r = random_tensor({T, d}, DType::kF64, 43);
  const std::vector<int32_t> guide = {2, 0, -1, 3, 1};  // one group not scored
  const RouteGroups groups{.rows = rows, .guide = guide};
  Tensor y, dx;
  MoeCache cache;
  auto loss = [&] {
    MoeForward out = layer.forward(p, x, y, cache, {}, {}, groups);
    return dot(y.span<double>(), r.span<double>()) + out.loss_balance + out.loss_z +
           out.loss_guide;
  };
  const double at = loss();
  EXPECT_TRUE(std::isfinite(at));
  if (gc.capacity_factor > 0 && gc.capacity_factor < 1) {
    EXPECT_GT(cache.plan.n_dropped(), 0);
  }
  MoeParams g = zeros_like(p);
  layer.backward(p, cache, r, g, dx, {});
  expect_grad_close(loss, x.span<double>(), dx.span<double>(), "dx");
  expect_grad_close(loss, p.w_gate.span<double>(), g.w_gate.span<double>(), "dw_gate");
  expect_grad_close(loss, p.w1.span<double>(), g.w1.span<double>(), "dw1");
  expect_grad_close(loss, p.w2.span<double>(), g.w2.span<double>(), "dw2");
  if (gc.gating == Gating::kNoisyTopK)
    expect_grad_close(loss, p.w_noise.span<double>(), g.w_noise.span<double>(), "dw_noise");
}

INSTANTIATE_TEST_SUITE_P(
    Cases, GroupGrad,
    ::testing::Values(GroupGradCase{Gating::kSoftmaxTopK, 2, 0, false, 0},
                      GroupGradCase{Gating::kSoftmaxTopK, 1, 0, false, 0.7},
                      GroupGradCase{Gating::kSoftmaxTopK, 2, 0.8, true, 0.5},
                      GroupGradCase{Gating::kSigmoidBias, 2, 0, false, 0.3},
                      GroupGradCase{Gating::kExpertChoice, 4, 1.0, false, 0.4},
                      GroupGradCase{Gating::kNoisyTopK, 2, 0, false, 0.6}));

TEST(RouterGuidance, LossIsTheMeanCrossEntropyOfTheScoredGroups) {
  const int64_t rows = 3, G = 4, d = 5, E = 3;
  MoeConfig cfg{.d_model = d, .d_ff = 4, .n_experts = E, .top_k = 1, .dropless = true};
  cfg.loss_guide_weight = 0.25;
  MoeLayer layer(cfg);
  MoeParams p = init_moe_params(cfg, DType::kF64, 5);
  Tensor x = random_tensor({rows * G, d}, DType::kF64, 6), y;
  const std::vector<int32_t> guide = {1, -1, 0, 2};
  MoeCache cache;
  const MoeForward out = layer.forward(p, x, y, cache, {}, {}, {.rows = rows, .guide = guide});
  double want = 0;
  for (int64_t g = 0; g < G; ++g) {
    if (guide[g] < 0) continue;
    std::vector<double> logit(size_t(E), 0.0);
    for (int64_t e = 0; e < E; ++e)
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < d; ++c)
          logit[e] += x.matrix<double>()(g * rows + r, c) / rows * p.w_gate.matrix<double>()(c, e);
    double z = 0;
    for (double l : logit) z += std::exp(l);
    want -= std::log(std::exp(logit[guide[g]]) / z);
  }
  EXPECT_NEAR(out.loss_guide, 0.25 * want / 3, 1e-12);
}

TEST(GroupRouting, BadGroupsAndGuidanceAreNamed) {
  MoeConfig cfg{.d_model = 4, .d_ff = 3, .n_experts = 3, .top_k = 1, .dropless = true};
  cfg.loss_guide_weight = 1;
  MoeLayer layer(cfg);
  MoeParams p = init_moe_params(cfg, DType::kF64, 1);
  Tensor x = random_tensor({6, 4}, DType::kF64, 2), y;
  MoeCache cache;
  EXPECT_THROW(layer.forward(p, x, y, cache, {}, {}, {.rows = 4, .guide = {}}), ShapeError);
  EXPECT_THROW(layer.forward(p, x, y, cache, {}, {}, {.rows = 0, .guide = {}}), ShapeError);
  const std::vector<int32_t> too_few = {0}, out_of_range = {0, 3};
  EXPECT_THROW(layer.forward(p, x, y, cache, {}, {}, {.rows = 3, .guide = too_few}), ShapeError);
  EXPECT_THROW(layer.forward(p, x, y, cache, {}, {}, {.rows = 3, .guide = out_of_range}),
               ShapeError);
  MoeConfig hash = cfg;
  hash.gating = Gating::kHash;
  MoeLayer hashed(hash);
  MoeParams ph = init_moe_params(hash, DType::kF64, 1);
  const std::vector<int32_t> ids = {1, 2, 3, 4, 5, 6};
  EXPECT_THROW(hashed.forward(ph, x, y, cache, {}, ids, {.rows = 2, .guide = {}}), ConfigError);
}

}  // namespace
}  // namespace sy
