// The routing policies beyond plain softmax top-k: Switch jitter, group-limited top-k (softmax
// and sigmoid), expert choice, hash and random routing. Each one: the whole layer's float64
// finite-difference check, and the exact semantics of its choice.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <set>

#include "switchyard/moe/moe_layer.h"
#include "testing/testing.h"

namespace sy {
namespace {

using testing::dot;
using testing::expect_grad_close;
using testing::random_tensor;

struct PolicyCase {
  std::string name;
  MoeConfig cfg;
  friend void PrintTo(const PolicyCase& c, std::ostream* os) { *os << c.name; }
};

MoeConfig base(int64_t E, int64_t k) {
  return {.d_model = 6, .d_ff = 5, .n_experts = E, .top_k = k, .loss_balance_weight = 0.2,
          .loss_z_weight = 0.1};
}

std::vector<PolicyCase> policy_cases() {
  std::vector<PolicyCase> out;
  MoeConfig c = base(4, 1);
  c.renormalize = false, c.jitter_eps = 0.1;
  out.push_back({"switch_jitter", c});
  c = base(6, 2);
  c.n_groups = 3, c.topk_groups = 2;
  out.push_back({"softmax_groups", c});
  c = base(6, 2);
  c.gating = Gating::kSigmoidBias, c.n_groups = 3, c.topk_groups = 1;
  out.push_back({"sigmoid_groups", c});
  c = base(4, 2);
  c.gating = Gating::kExpertChoice, c.capacity_factor_train = 1.0;
  out.push_back({"expert_choice", c});
  c = base(4, 2);
  c.gating = Gating::kHash;
  out.push_back({"hash", c});
  c = base(5, 2);
  c.gating = Gating::kRandom;
  out.push_back({"random", c});
  return out;
}

const std::vector<int32_t> kTokenIds = {3, 9, 3, 1, 7, 2, 9, 0, 5};  // repeats on purpose

class PolicyGrad : public ::testing::TestWithParam<PolicyCase> {};

TEST_P(PolicyGrad, LayerMatchesFiniteDifferences) {
  const MoeConfig cfg = GetParam().cfg;
  MoeLayer layer(cfg);
  const int64_t T = int64_t(kTokenIds.size());
  MoeParams p = init_moe_params(cfg, DType::kF64, 3), g = zeros_like(p);
  Tensor x = random_tensor({T, cfg.d_model}, DType::kF64, 4),
         r = random_tensor({T, cfg.d_model}, DType::kF64, 5);
  Tensor y, dx;
  MoeCache cache;
  ExecContext ctx;
  ctx.seed = 11;  // fixed: the same jitter and random choice in every re-evaluation
  auto loss = [&] {
    const MoeForward f = layer.forward(p, x, y, cache, ctx, kTokenIds);
    return dot(y.span<double>(), r.span<double>()) + f.loss_balance + f.loss_z;
  };
  loss();
  layer.backward(p, cache, r, g, dx, ctx);
  expect_grad_close(loss, x.span<double>(), dx.span<double>(), "dx");
  expect_grad_close(loss, p.w_gate.span<double>(), g.w_gate.span<double>(), "dw_gate");
  expect_grad_close(loss, p.w1.span<double>(), g.w1.span<double>(), "dw1");
  expect_grad_close(loss, p.w2.span<double>(), g.w2.span<double>(), "dw2");
  if (!cfg.router_trained()) {
    for (double v : g.w_gate.span<double>()) EXPECT_EQ(v, 0.0);
  }
}

INSTANTIATE_TEST_SUITE_P(Policies, PolicyGrad, ::testing::ValuesIn(policy_cases()),
                         [](const auto& info) { return info.param.name; });

// The experts chosen for token t, from the plan.
std::vector<int32_t> experts_of(const MoeCache& c, int64_t t, int64_t slots) {
  std::vector<int32_t> out;
  for (int64_t j = 0; j < slots; ++j) {
    const int32_t row = c.plan.slot_row[size_t(t * slots + j)];
    if (row < 0) continue;
    int32_t e = 0;
    while (c.plan.offsets[e + 1] <= row) ++e;
    out.push_back(e);
  }
  return out;
}

TEST(RoutingPolicies, JitterOnlyInTrainingAndSeeded) {
  MoeConfig cfg = base(4, 1);
  cfg.jitter_eps = 0.2;
  MoeConfig plain = cfg;
  plain.jitter_eps = 0;
  MoeLayer layer(cfg), ref(plain);
  const MoeParams p = init_moe_params(cfg, DType::kF64, 1);
  Tensor x = random_tensor({20, 6}, DType::kF64, 2), y1, y2, y3;
  MoeCache c;
  ExecContext eval;
  eval.training = false;
  layer.forward(p, x, y1, c, eval);
  ref.forward(p, x, y2, c, eval);
  EXPECT_EQ(std::vector<double>(y1.span<double>().begin(), y1.span<double>().end()),
            std::vector<double>(y2.span<double>().begin(), y2.span<double>().end()));
  ExecContext train;
  train.seed = 1;
  layer.forward(p, x, y1, c, train);
  const std::vector<double> logits1(c.router.logits.span<double>().begin(), c.router.logits.span<double>().end());
  train.seed = 2;
  layer.forward(p, x, y3, c, train);
  const std::vector<double> logits2(c.router.logits.span<double>().begin(), c.router.logits.span<double>().end());
  EXPECT_NE(logits1, logits2);
}

TEST(RoutingPolicies, GroupLimitedPicksInsideTheBestGroups) {
  MoeConfig cfg = base(8, 3);
  cfg.n_groups = 4, cfg.topk_groups = 2;
  MoeLayer layer(cfg);
  const MoeParams p = init_moe_params(cfg, DType::kF64, 5);
  const int64_t T = 50;
  Tensor x = random_tensor({T, 6}, DType::kF64, 6, -3, 3), y;
  MoeCache c;
  layer.forward(p, x, y, c, {});
  const auto probs = c.router.probs.matrix<double>();
  for (int64_t t = 0; t < T; ++t) {
    // Group score: the sum of the group's two highest probabilities; keep the best two.
    std::vector<std::pair<double, int>> gs;
    for (int g = 0; g < 4; ++g) gs.push_back({-(probs(t, 2 * g) + probs(t, 2 * g + 1)), g});
    std::stable_sort(gs.begin(), gs.end());
    const std::set<int> allowed = {gs[0].second, gs[1].second};
    std::vector<std::pair<double, int>> cand;
    for (int e = 0; e < 8; ++e)
      if (allowed.count(e / 2)) cand.push_back({-probs(t, e), e});
    std::stable_sort(cand.begin(), cand.end());
    for (int j = 0; j < 3; ++j) EXPECT_EQ(c.router.expert[size_t(t * 3 + j)], cand[j].second) << t;
  }
}

TEST(RoutingPolicies, ExpertChoiceTakesEachExpertsTopCTokens) {
  MoeConfig cfg = base(4, 2);
  cfg.gating = Gating::kExpertChoice;
  cfg.capacity_factor_train = 1.0;
  MoeLayer layer(cfg);
  const MoeParams p = init_moe_params(cfg, DType::kF64, 7);
  const int64_t T = 21, E = 4, C = cfg.capacity(T, true);  // ceil(21 * 2 / 4) = 11
  ASSERT_EQ(C, 11);
  Tensor x = random_tensor({T, 6}, DType::kF64, 8, -2, 2), y;
  MoeCache c;
  const MoeForward f = layer.forward(p, x, y, c, {});
  const auto probs = c.router.probs.matrix<double>();
  for (int64_t e = 0; e < E; ++e) {
    EXPECT_EQ(c.plan.rows_of(e), C);
    std::vector<int32_t> by_prob(static_cast<size_t>(T));
    std::iota(by_prob.begin(), by_prob.end(), 0);
    std::stable_sort(by_prob.begin(), by_prob.end(),
                     [&](int a, int b) { return probs(a, e) > probs(b, e); });
    std::set<int32_t> want(by_prob.begin(), by_prob.begin() + C), got;
    for (int32_t r = c.plan.offsets[e]; r < c.plan.offsets[e + 1]; ++r) got.insert(c.plan.row_token[r]);
    EXPECT_EQ(got, want) << "expert " << e;
  }
  EXPECT_DOUBLE_EQ(f.stats.load_max_over_mean, 1.0);  // balanced by construction
  EXPECT_EQ(f.loss_balance, 0.0);
  // The weight of a kept (token, expert) pair is its probability.
  for (int64_t t = 0; t < T; ++t)
    for (int32_t e : experts_of(c, t, E)) EXPECT_EQ(c.router.weight.matrix<double>()(t, e), probs(t, e));
}

TEST(RoutingPolicies, HashRoutesEqualTokensAlikeAndNeedsIds) {
  MoeConfig cfg = base(6, 2);
  cfg.gating = Gating::kHash;
  MoeLayer layer(cfg);
  const MoeParams p = init_moe_params(cfg, DType::kF64, 9);
  const int64_t T = int64_t(kTokenIds.size());
  Tensor x = random_tensor({T, 6}, DType::kF64, 10), y;
  MoeCache c;
  layer.forward(p, x, y, c, {}, kTokenIds);
  for (int64_t a = 0; a < T; ++a) {
    const int32_t e0 = c.router.expert[size_t(a * 2)], e1 = c.router.expert[size_t(a * 2 + 1)];
    EXPECT_NE(e0, e1);
    EXPECT_EQ(c.router.weight.matrix<double>()(a, 0), 0.5);
    for (int64_t b = 0; b < T; ++b)
      if (kTokenIds[a] == kTokenIds[b]) {
        EXPECT_EQ(c.router.expert[size_t(b * 2)], e0);
      }
  }
  EXPECT_THROW(layer.forward(p, x, y, c, {}), ShapeError);
}

TEST(RoutingPolicies, RandomIsSeededDistinctAndUniform) {
  MoeConfig cfg = base(8, 2);
  cfg.gating = Gating::kRandom;
  cfg.dropless = true;
  MoeLayer layer(cfg);
  const MoeParams p = init_moe_params(cfg, DType::kF32, 11);
  const int64_t T = 8000;
  Tensor x = random_tensor({T, 6}, DType::kF32, 12), y;
  MoeCache c;
  ExecContext ctx;
  ctx.seed = 1;
  const MoeForward f = layer.forward(p, x, y, c, ctx);
  const std::vector<int32_t> first = c.router.expert;
  for (int64_t t = 0; t < T; ++t) EXPECT_NE(first[size_t(2 * t)], first[size_t(2 * t + 1)]);
  for (int64_t n : f.stats.demand) EXPECT_NEAR(double(n), 2.0 * T / 8, 0.1 * 2.0 * T / 8);
  layer.forward(p, x, y, c, ctx);
  EXPECT_EQ(c.router.expert, first);
  ctx.seed = 2;
  layer.forward(p, x, y, c, ctx);
  EXPECT_NE(c.router.expert, first);
}

TEST(RoutingPolicies, BadGroupConfigsNameTheField) {
  MoeConfig cfg = base(8, 2);
  cfg.n_groups = 3, cfg.topk_groups = 1;
  EXPECT_THROW(cfg.validate(), ConfigError);  // 3 does not divide 8
  cfg.n_groups = 4, cfg.topk_groups = 5;
  EXPECT_THROW(cfg.validate(), ConfigError);
  cfg.topk_groups = 1, cfg.top_k = 3;  // only 2 experts in one group of 2
  EXPECT_THROW(cfg.validate(), ConfigError);
  cfg = base(8, 2);
  cfg.gating = Gating::kExpertChoice, cfg.dropless = true;
  EXPECT_THROW(cfg.validate(), ConfigError);
}

}  // namespace
}  // namespace sy
