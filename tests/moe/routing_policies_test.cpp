// The routing policies beyond plain softmax top-k: Switch jitter, group-limited top-k (softmax
// and sigmoid), expert choice, hash and random routing, noisy top-k. Each one: the whole layer's float64
// finite-difference check, and the exact semantics of its choice.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>

#include "switchyard/moe/moe_layer.h"
#include "switchyard/moe/router.h"
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
  c = base(5, 2);
  c.gating = Gating::kNoisyTopK, c.loss_importance_weight = 0.3, c.loss_load_weight = 0.4;
  out.push_back({"noisy_topk", c});
  c.top_k = 1, c.capacity_factor_train = 0.8;  // with dropping
  out.push_back({"noisy_top1_dropping", c});
  return out;
}

const std::vector<int32_t> kTokenIds = {3, 9, 3, 1, 7, 2, 9, 0, 5};  // repeats on purpose

class PolicyGrad : public ::testing::TestWithParam<PolicyCase> {};

TEST_P(PolicyGrad, LayerMatchesFiniteDifferences) {
  const MoeConfig cfg = GetParam().cfg;
  MoeLayer layer(cfg);
  const int64_t T = int64_t(kTokenIds.size());
  MoeParams p = init_moe_params(cfg, DType::kF64, 3), g = zeros_like(p);
  if (!p.w_noise.empty()) p.w_noise = random_tensor({cfg.d_model, cfg.n_experts}, DType::kF64, 6);
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
  if (!p.w_noise.empty())
    expect_grad_close(loss, p.w_noise.span<double>(), g.w_noise.span<double>(), "dw_noise");
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

// Noisy top-k's balancing losses alone (no task loss), at k = 1, 2 and E (where every expert is
// chosen and the load is constant).
TEST(RoutingPolicies, NoisyTopKLossesMatchFiniteDifferences) {
  for (int64_t k : {1, 2, 4}) {
    MoeConfig cfg = base(4, k);
    cfg.gating = Gating::kNoisyTopK, cfg.loss_importance_weight = 0.5, cfg.loss_load_weight = 0.7;
    cfg.loss_z_weight = 0;
    Router router(cfg);
    const int64_t T = 13, d = 6, E = 4;
    Tensor x = random_tensor({T, d}, DType::kF64, 21), w = random_tensor({d, E}, DType::kF64, 22);
    Tensor wn = random_tensor({d, E}, DType::kF64, 23, -0.5, 0.5), zero({T, k}, DType::kF64);
    RouterCache c;
    const RouterInput in{{}, /*seed=*/5, /*training=*/true, nullptr, nullptr, {}};
    auto loss = [&] {
      router.forward<double>(w.matrix<double>(), x.matrix<double>(), c, {}, in, wn.matrix<double>());
      return c.loss_balance;
    };
    if (k < E) {
      EXPECT_GT(loss(), 0) << k;
    }
    loss();
    Tensor dw({d, E}, DType::kF64), dwn({d, E}, DType::kF64), dx({T, d}, DType::kF64);
    router.backward<double>(w.matrix<double>(), x.matrix<double>(), c, zero.matrix<double>(),
                            dw.matrix<double>(), dx.matrix<double>(), wn.matrix<double>(),
                            dwn.matrix<double>());
    SCOPED_TRACE(::testing::Message() << "k = " << k);
    expect_grad_close(loss, w.span<double>(), dw.span<double>(), "dw_gate");
    expect_grad_close(loss, wn.span<double>(), dwn.span<double>(), "dw_noise");
    expect_grad_close(loss, x.span<double>(), dx.span<double>(), "dx");
  }
}

// Choice, weights and both losses against the definitions, from the noise the router drew;
// no noise in evaluation, fresh noise per seed in training.
TEST(RoutingPolicies, NoisyTopKMatchesItsDefinition) {
  MoeConfig cfg = base(6, 2);
  cfg.gating = Gating::kNoisyTopK, cfg.loss_importance_weight = 0.2, cfg.loss_load_weight = 0.3;
  cfg.dropless = true;
  MoeLayer layer(cfg);
  MoeParams p = init_moe_params(cfg, DType::kF64, 31);
  for (double v : p.w_noise.span<double>()) EXPECT_EQ(v, 0.0);  // starts at zero
  p.w_noise = random_tensor({6, 6}, DType::kF64, 32);
  const int64_t T = 37, E = 6, k = 2;
  Tensor x = random_tensor({T, 6}, DType::kF64, 33), y;
  MoeCache c;
  ExecContext ctx;
  ctx.seed = 3;
  for (bool training : {true, false}) {
    ctx.training = training;
    const MoeForward f = layer.forward(p, x, y, c, ctx);
    const auto logits = c.router.logits.matrix<double>(), noise = c.router.noise.matrix<double>();
    std::vector<double> importance(size_t(E), 0.0), load(size_t(E), 0.0);
    double noise_sq = 0;
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> h(static_cast<size_t>(E)), sp(static_cast<size_t>(E));
      for (int64_t e = 0; e < E; ++e) {
        double nl = 0;
        for (int64_t i = 0; i < 6; ++i) nl += x.matrix<double>()(t, i) * p.w_noise.matrix<double>()(i, e);
        sp[e] = std::log(1 + std::exp(nl));
        h[e] = logits(t, e) + noise(t, e) * sp[e];
        noise_sq += noise(t, e) * noise(t, e);
      }
      std::vector<int32_t> order(static_cast<size_t>(E));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return h[a] > h[b]; });
      const double z = std::exp(h[order[0]]) + std::exp(h[order[1]]);
      for (int64_t j = 0; j < k; ++j) {
        ASSERT_EQ(c.router.expert[size_t(t * k + j)], order[j]) << t;
        const double w = std::exp(h[order[j]]) / z;
        EXPECT_NEAR(c.router.weight.matrix<double>()(t, j), w, 1e-14);
        importance[order[j]] += w;
      }
      for (int64_t e = 0; e < E; ++e) {
        std::vector<double> others;
        for (int64_t o = 0; o < E; ++o)
          if (o != e) others.push_back(h[o]);
        std::sort(others.rbegin(), others.rend());
        load[e] += 0.5 * std::erfc(-(logits(t, e) - others[k - 1]) / sp[e] / std::sqrt(2.0));
      }
    }
    if (training)
      EXPECT_NEAR(noise_sq / double(T * E), 1.0, 0.3);  // N(0, 1) draws
    else
      EXPECT_EQ(noise_sq, 0.0);
    auto cv2 = [](const std::vector<double>& v) {
      double m = 0, var = 0;
      for (double a : v) m += a / double(v.size());
      for (double a : v) var += (a - m) * (a - m) / double(v.size());
      return var / (m * m + 1e-10);
    };
    EXPECT_NEAR(f.loss_balance, 0.2 * cv2(importance) + 0.3 * cv2(load), 1e-12);
  }
  ctx.training = true;
  layer.forward(p, x, y, c, ctx);
  const std::vector<double> first(c.router.noise.span<double>().begin(), c.router.noise.span<double>().end());
  ctx.seed = 4;
  layer.forward(p, x, y, c, ctx);
  EXPECT_NE(std::vector<double>(c.router.noise.span<double>().begin(), c.router.noise.span<double>().end()),
            first);
}

TEST(RoutingPolicies, NoisyTopKNeedsItsNoiseWeights) {
  MoeConfig cfg = base(4, 2);
  cfg.gating = Gating::kNoisyTopK;
  MoeLayer layer(cfg);
  MoeParams p = init_moe_params(cfg, DType::kF64, 1);
  p.w_noise = Tensor();
  Tensor x = random_tensor({3, 6}, DType::kF64, 2), y;
  MoeCache c;
  try {
    layer.forward(p, x, y, c, {});
    FAIL() << "expected ShapeError";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("moe.w_noise"), std::string::npos) << e.what();
  }
  MoeConfig plain = base(4, 2);
  MoeParams q = init_moe_params(plain, DType::kF64, 1);
  q.w_noise = Tensor({6, 4}, DType::kF64);
  EXPECT_THROW(MoeLayer(plain).forward(q, x, y, c, {}), ShapeError);
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

// A renormalised top-1 weight is always 1: such a router cannot learn from the task loss, so
// training refuses it unless a guidance target trains the router; inference accepts it (a
// published top-1 model with norm_topk_prob runs as it was trained).
TEST(RoutingPolicies, RenormalisedTopOneIsRefusedForTrainingAlone) {
  MoeConfig cfg = base(4, 1);
  cfg.renormalize = true;
  EXPECT_NO_THROW(cfg.validate());
  try {
    cfg.check_trainable(/*guided=*/false);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("moe.renormalize"), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW(cfg.check_trainable(/*guided=*/true));
  cfg.gating = Gating::kSigmoidBias;
  EXPECT_THROW(cfg.check_trainable(false), ConfigError);
  cfg.gating = Gating::kNoisyTopK;  // a softmax over the one chosen logit
  cfg.renormalize = false;
  EXPECT_THROW(cfg.check_trainable(false), ConfigError);
  for (Gating g : {Gating::kHash, Gating::kRandom, Gating::kExpertChoice}) {
    cfg.gating = g;  // not trained, or weights that are the probabilities themselves
    EXPECT_NO_THROW(cfg.check_trainable(false));
  }
  cfg = base(4, 1);
  cfg.renormalize = false;
  EXPECT_NO_THROW(cfg.check_trainable(false));
  cfg = base(4, 2);
  cfg.renormalize = true;
  EXPECT_NO_THROW(cfg.check_trainable(false));
}

}  // namespace
}  // namespace sy
