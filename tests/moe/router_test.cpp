// Router: top-k weights, renormalisation, demand, and the auxiliary losses' values.
#include "switchyard/moe/router.h"

#include <gtest/gtest.h>

#include <cmath>

#include "testing/testing.h"

namespace sy {
namespace {

using testing::random_tensor;

MoeConfig config(int64_t E, int64_t k, bool renorm) {
  MoeConfig c{.d_model = 6, .d_ff = 4, .n_experts = E, .top_k = k, .renormalize = renorm};
  c.validate();
  return c;
}

TEST(Router, WeightsAreTheChosenProbabilities) {
  const int64_t T = 9, d = 6;
  for (bool renorm : {false, true}) {
    MoeConfig cfg = config(5, 3, renorm);
    Router router(cfg);
    Tensor x = random_tensor({T, d}, DType::kF64, 1), w = random_tensor({d, 5}, DType::kF64, 2);
    RouterCache c;
    router.forward<double>(w.matrix<double>(), x.matrix<double>(), c);
    auto probs = c.probs.matrix<double>();
    auto weight = c.weight.matrix<double>();
    for (int64_t t = 0; t < T; ++t) {
      double sum = 0;
      for (int64_t j = 0; j < 3; ++j) sum += probs(t, c.expert[t * 3 + j]);
      for (int64_t j = 0; j < 3; ++j) {
        const double p = probs(t, c.expert[t * 3 + j]);
        EXPECT_NEAR(weight(t, j), renorm ? p / sum : p, 1e-12);
        if (j > 0) {
          EXPECT_GE(probs(t, c.expert[t * 3 + j - 1]), p);
        }
      }
    }
    int64_t total = 0;
    for (int32_t n : c.demand) total += n;
    EXPECT_EQ(total, T * 3);
  }
}

TEST(Router, AuxLossesAtUniformRouting) {
  // A zero gate gives probs = 1/E: balance loss = w_b (its minimum), z-loss = w_z (log E)^2.
  MoeConfig cfg = config(4, 2, true);
  cfg.loss_balance_weight = 0.5;
  cfg.loss_z_weight = 0.25;
  Router router(cfg);
  Tensor x = random_tensor({8, 6}, DType::kF64, 3), w({6, 4}, DType::kF64);
  RouterCache c;
  router.forward<double>(w.matrix<double>(), x.matrix<double>(), c);
  EXPECT_NEAR(c.loss_balance, 0.5, 1e-12);
  EXPECT_NEAR(c.loss_z, 0.25 * std::log(4.0) * std::log(4.0), 1e-12);
}

TEST(Router, BalanceLossGrowsWithSkew) {
  // All tokens prefer expert 0: f_0 and P_0 large, loss well above its minimum w_b.
  MoeConfig cfg = config(4, 1, false);
  cfg.loss_balance_weight = 1.0;
  Router router(cfg);
  Tensor x({8, 6}, DType::kF64), w({6, 4}, DType::kF64);
  for (double& v : x.span<double>()) v = 1.0;
  for (int64_t i = 0; i < 6; ++i) w.matrix<double>()(i, 0) = 1.0;
  RouterCache c;
  router.forward<double>(w.matrix<double>(), x.matrix<double>(), c);
  EXPECT_EQ(c.demand, (std::vector<int32_t>{8, 0, 0, 0}));
  EXPECT_GT(c.loss_balance, 3.9);  // E * f_0 * P_0 = 4 * 1 * (e^6 / (e^6 + 3)) ~ 3.97
}

}  // namespace
}  // namespace sy
