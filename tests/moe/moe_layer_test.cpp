// The MoE layer against the naive reference, the equivalences (dropless = huge capacity;
// E=1, k=1 = dense SwiGLU), edge cases (T=0, T=1, odd d, an idle expert, every token on one
// expert), bad configs and shapes, determinism across threads, and dispatch memory.
#include "switchyard/moe/moe_layer.h"

#include <gtest/gtest.h>

#include <cmath>

#include "moe/moe_reference.h"
#include "switchyard/core/rng.h"
#include "switchyard/kernels/ref.h"
#include "testing/testing.h"

namespace sy {
namespace {

using testing::config_of;
using testing::LayerCase;
using testing::random_tensor;

class LayerVsNaive : public ::testing::TestWithParam<LayerCase> {};

TEST_P(LayerVsNaive, MatchesInF64AndF32) {
  const LayerCase c = GetParam();
  MoeConfig cfg = config_of(c);
  MoeLayer layer(cfg);
  MoeParams p = init_moe_params(cfg, DType::kF64, 11);
  Tensor x = random_tensor({c.T, c.d}, DType::kF64, 12, -2, 2);
  const int64_t C = cfg.capacity(c.T, true);
  testing::NaiveMoe want = testing::naive_moe(cfg, p, x, C);

  Tensor y;
  MoeCache cache;
  MoeForward out = layer.forward(p, x, y, cache, {});
  std::vector<bool> kept;
  for (int32_t r : cache.plan.slot_row) kept.push_back(r >= 0);
  EXPECT_EQ(cache.router.expert, want.expert);
  EXPECT_EQ(kept, want.kept) << "dropped slots differ";
  EXPECT_LE(testing::max_scaled_error(y.span<double>(), want.y, 1e-12, 1e-10), 1.0);
  const int64_t dropped = std::count(want.kept.begin(), want.kept.end(), false);
  EXPECT_DOUBLE_EQ(out.stats.dropped_fraction, c.T ? double(dropped) / double(c.T * c.k) : 0.0);

  // f32 path: same routing on these inputs, values to float rounding.
  MoeParams pf = testing::convert_params(p, DType::kF32);
  Tensor xf = convert(x, DType::kF32), yf;
  layer.forward(pf, xf, yf, cache, {});
  Tensor yf64 = convert(yf, DType::kF64);
  EXPECT_LE(testing::max_scaled_error(yf64.span<double>(), want.y, 1e-4, 1e-3), 1.0);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, LayerVsNaive,
    ::testing::Values(LayerCase{1, 8, 16, 4, 2, true, 0},        // T = 1
                      LayerCase{13, 7, 9, 5, 2, true, 1.0},      // odd sizes, dropping
                      LayerCase{33, 16, 24, 8, 1, false, 1.25},  // Switch top-1
                      LayerCase{20, 12, 10, 6, 6, true, 0},      // k = E
                      LayerCase{40, 9, 5, 3, 2, false, 0.5},     // heavy dropping
                      LayerCase{17, 33, 40, 8, 2, true, 2.0},
                      LayerCase{0, 8, 16, 4, 2, true, 1.0},         // T = 0
                      LayerCase{40, 9, 5, 3, 2, false, 0.5, true},  // prioritized dropping
                      LayerCase{33, 16, 24, 8, 1, false, 1.0, true},
                      LayerCase{13, 7, 9, 5, 2, true, 1.0, false, 2}));  // shared experts

TEST(MoeLayer, SigmoidGatingWithBiasMatchesNaive) {
  for (double cf : {0.0, 0.75}) {
    MoeConfig cfg{
        .d_model = 12, .d_ff = 10, .n_experts = 6, .top_k = 2, .gating = Gating::kSigmoidBias};
    cfg.dropless = cf == 0;
    if (!cfg.dropless) cfg.capacity_factor_train = cf;
    MoeParams p = init_moe_params(cfg, DType::kF64, 41);
    fill_uniform(p.expert_bias.span<double>(), Philox(41, 9), -0.3, 0.3);
    Tensor x = random_tensor({31, 12}, DType::kF64, 42, -2, 2), y;
    MoeCache cache;
    MoeLayer(cfg).forward(p, x, y, cache, {});
    testing::NaiveMoe want = testing::naive_moe(cfg, p, x, cfg.capacity(31, true));
    EXPECT_EQ(cache.router.expert, want.expert);
    std::vector<bool> kept;
    for (int32_t r : cache.plan.slot_row) kept.push_back(r >= 0);
    EXPECT_EQ(kept, want.kept);
    EXPECT_LE(testing::max_scaled_error(y.span<double>(), want.y, 1e-12, 1e-10), 1.0);
  }
}

TEST(MoeLayer, BiasUpdatesBalanceASkewedRouter) {
  // A router that sends most tokens to expert 0; repeated bias updates, as after each training
  // step, must even the load out without touching the router's weights.
  MoeConfig cfg{.d_model = 16,
                .d_ff = 8,
                .n_experts = 8,
                .top_k = 2,
                .gating = Gating::kSigmoidBias,
                .dropless = true,
                .bias_update_rate = 0.01};
  MoeParams p = init_moe_params(cfg, DType::kF32, 5);
  for (int64_t c = 0; c < 16; ++c) p.w_gate.matrix<float>()(c, 0) += 0.5f;
  Tensor x = random_tensor({512, 16}, DType::kF32, 6, 0.0, 1.0), y;
  MoeLayer layer(cfg);
  MoeCache cache;
  const double before = layer.forward(p, x, y, cache, {}).stats.load_max_over_mean;
  RoutingStats stats;
  for (int step = 0; step < 300; ++step) {
    stats = layer.forward(p, x, y, cache, {}).stats;
    layer.update_bias(p, stats);
  }
  EXPECT_GT(before, 2.0);
  EXPECT_LT(stats.load_max_over_mean, 1.3);
  EXPECT_LT(p.expert_bias.data<float>()[0], 0.0f);  // the overloaded expert was pushed down
}

TEST(MoeLayer, DroplessEqualsHugeCapacity) {
  MoeConfig cfg{.d_model = 16, .d_ff = 24, .n_experts = 6, .top_k = 2};
  MoeConfig big = cfg;
  cfg.dropless = true;
  big.capacity_factor_train = 6.0;  // C = ceil(6 * T * k / E) = T * k: nothing can drop
  MoeParams p = init_moe_params(cfg, DType::kF64, 3);
  Tensor x = random_tensor({29, 16}, DType::kF64, 4), y1, y2, dx1, dx2;
  Tensor dy = random_tensor({29, 16}, DType::kF64, 5);
  MoeCache c1, c2;
  MoeParams g1 = zeros_like(p), g2 = zeros_like(p);
  MoeLayer(cfg).forward(p, x, y1, c1, {});
  MoeLayer(cfg).backward(p, c1, dy, g1, dx1, {});
  MoeLayer(big).forward(p, x, y2, c2, {});
  MoeLayer(big).backward(p, c2, dy, g2, dx2, {});
  EXPECT_EQ(c2.plan.n_dropped(), 0);
  auto same = [](const Tensor& a, const Tensor& b) {
    return std::equal(a.span<double>().begin(), a.span<double>().end(), b.span<double>().begin());
  };
  EXPECT_TRUE(same(y1, y2));
  EXPECT_TRUE(same(dx1, dx2));
  EXPECT_TRUE(same(g1.w1, g2.w1) && same(g1.w2, g2.w2) && same(g1.w_gate, g2.w_gate));
}

TEST(MoeLayer, OneExpertTopOneIsADenseSwiglu) {
  MoeConfig cfg{.d_model = 11, .d_ff = 13, .n_experts = 1, .top_k = 1, .dropless = true};
  MoeParams p = init_moe_params(cfg, DType::kF64, 6);
  const int64_t T = 9;
  Tensor x = random_tensor({T, 11}, DType::kF64, 7), y;
  MoeCache cache;
  MoeLayer(cfg).forward(p, x, y, cache, {});
  // Dense: (silu(x W1) * (x W3)) W2 with the router weight 1 (softmax over one expert).
  Tensor h1({T, 13}, DType::kF64), h3({T, 13}, DType::kF64), a({T, 13}, DType::kF64),
      want({T, 11}, DType::kF64);
  ref::gemm<double>(false, false, 1, x.matrix<double>(), p.w1.stacked<double>()[0], 0,
                    h1.matrix<double>());
  ref::gemm<double>(false, false, 1, x.matrix<double>(), p.w3.stacked<double>()[0], 0,
                    h3.matrix<double>());
  ref::swiglu<double>(h1.matrix<double>(), h3.matrix<double>(), a.matrix<double>());
  ref::gemm<double>(false, false, 1, a.matrix<double>(), p.w2.stacked<double>()[0], 0,
                    want.matrix<double>());
  EXPECT_LE(testing::max_scaled_error(y.span<double>(), want.span<double>(), 1e-12, 1e-10), 1.0);
}

TEST(MoeLayer, EveryTokenOnOneExpertAndIdleExperts) {
  MoeConfig cfg{.d_model = 8, .d_ff = 12, .n_experts = 4, .top_k = 1, .renormalize = false};
  cfg.capacity_factor_train = 1.0;  // C = T / E: expert 0 keeps only the first quarter
  MoeParams p = init_moe_params(cfg, DType::kF64, 8);
  for (int64_t c = 0; c < 8; ++c) p.w_gate.matrix<double>()(c, 0) = 5.0;
  Tensor x = random_tensor({16, 8}, DType::kF64, 9, 0.5, 1.5), y;  // positive: expert 0 wins
  MoeCache cache;
  MoeForward out = MoeLayer(cfg).forward(p, x, y, cache, {});
  EXPECT_EQ(out.stats.demand, (std::vector<int64_t>{16, 0, 0, 0}));
  EXPECT_EQ(out.stats.rows, (std::vector<int64_t>{4, 0, 0, 0}));
  EXPECT_DOUBLE_EQ(out.stats.dropped_fraction, 0.75);
  EXPECT_DOUBLE_EQ(out.stats.load_max_over_mean, 4.0);
  // Dropped tokens get no expert output at all.
  for (int64_t t = 4; t < 16; ++t)
    for (int64_t c = 0; c < 8; ++c) EXPECT_EQ(y.matrix<double>()(t, c), 0.0);
  testing::NaiveMoe want = testing::naive_moe(cfg, p, x, 4);
  EXPECT_LE(testing::max_scaled_error(y.span<double>(), want.y, 1e-12, 1e-10), 1.0);
}

TEST(MoeLayer, EvalUsesItsOwnCapacityFactor) {
  MoeConfig cfg{.d_model = 8, .d_ff = 8, .n_experts = 4, .top_k = 2};
  cfg.capacity_factor_train = 0.5;
  cfg.capacity_factor_eval = 4.0;
  MoeParams p = init_moe_params(cfg, DType::kF32, 1);
  Tensor x = random_tensor({32, 8}, DType::kF32, 2), y;
  MoeCache cache;
  MoeLayer layer(cfg);
  EXPECT_GT(layer.forward(p, x, y, cache, {.training = true}).stats.dropped_fraction, 0.4);
  EXPECT_EQ(layer.forward(p, x, y, cache, {.training = false}).stats.dropped_fraction, 0.0);
}

TEST(MoeLayer, RoutingEntropyOfUniformRouterIsLogE) {
  MoeConfig cfg{.d_model = 4, .d_ff = 4, .n_experts = 8, .top_k = 2, .dropless = true};
  MoeParams p = init_moe_params(cfg, DType::kF64, 1);
  p.w_gate.fill_zero();
  Tensor x = random_tensor({10, 4}, DType::kF64, 2), y;
  MoeCache cache;
  EXPECT_NEAR(MoeLayer(cfg).forward(p, x, y, cache, {}).stats.router_entropy, std::log(8.0), 1e-12);
}

TEST(MoeLayer, SameNumbersAtAnyThreadCount) {
  MoeConfig cfg{.d_model = 64, .d_ff = 96, .n_experts = 8, .top_k = 2};
  MoeParams p = init_moe_params(cfg, DType::kF32, 1);
  Tensor x = random_tensor({300, 64}, DType::kF32, 2),
         dy = random_tensor({300, 64}, DType::kF32, 3);
  auto run = [&](int threads) {
    MoeLayer layer(cfg);
    MoeCache cache;
    MoeParams g = zeros_like(p);
    Tensor y, dx;
    ExecContext ctx{.n_threads = threads};
    layer.forward(p, x, y, cache, ctx);
    layer.backward(p, cache, dy, g, dx, ctx);
    std::vector<float> all(y.span<float>().begin(), y.span<float>().end());
    for (const Tensor* t : {&dx, &g.w_gate, &g.w1, &g.w3, &g.w2})
      all.insert(all.end(), t->span<float>().begin(), t->span<float>().end());
    return all;
  };
  EXPECT_EQ(run(1), run(2));
}

TEST(MoeLayer, Bf16ExpertWeightsMatchF32WithinBf16Rounding) {
  MoeConfig cfg{.d_model = 32, .d_ff = 48, .n_experts = 4, .top_k = 2, .dropless = true};
  MoeParams p = init_moe_params(cfg, DType::kF32, 1);
  // Round the f32 weights to bf16 values first: both paths then compute the same function.
  for (Tensor* w : {&p.w1, &p.w3, &p.w2}) *w = convert(convert(*w, DType::kBF16), DType::kF32);
  MoeParams pb{p.w_gate.clone(), convert(p.w1, DType::kBF16), convert(p.w3, DType::kBF16),
               convert(p.w2, DType::kBF16), {}, {}, {}, {}, {}};
  for (int64_t T : {3, 100}) {  // skinny and BLAS groups
    Tensor x = random_tensor({T, 32}, DType::kF32, 2), y, yb;
    MoeCache c;
    MoeLayer(cfg).forward(p, x, y, c, {});
    MoeLayer(cfg).forward(pb, x, yb, c, {});
    Tensor a = convert(yb, DType::kF64), b = convert(y, DType::kF64);
    EXPECT_LE(testing::max_scaled_error(a.span<double>(), b.span<double>(), 1e-5, 1e-4), 1.0);
  }
}

TEST(MoeLayer, DispatchMemoryIsLinearInTokensTimesK) {
  // Extra memory for dispatch = plan indices + xs + ys = O(T k d), never T * E * C * d.
  const int64_t T = 512, d = 32, k = 2;
  for (int64_t E : {4, 64}) {
    MoeConfig cfg{.d_model = d, .d_ff = 16, .n_experts = E, .top_k = k, .dropless = true};
    MoeParams p = init_moe_params(cfg, DType::kF32, 1);
    Tensor x = random_tensor({T, d}, DType::kF32, 2), y;
    MoeCache cache;
    MoeLayer(cfg).forward(p, x, y, cache, {});
    const size_t rows_bytes = 2 * size_t(T * k * d) * sizeof(float);
    const size_t index_bytes = 4 * size_t(2 * E + 1 + 3 * T * k);
    EXPECT_EQ(MoeLayer::dispatch_bytes(cache), rows_bytes + index_bytes);
    const int64_t C =
        MoeConfig{.d_model = d, .d_ff = 16, .n_experts = E, .top_k = k}.capacity(T, true);
    EXPECT_LT(MoeLayer::dispatch_bytes(cache), size_t(T * E * C) * sizeof(float) / 4);
  }
}

TEST(MoeConfig, BadValuesNameTheField) {
  auto message = [](MoeConfig c) {
    try {
      MoeLayer layer(c);
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const MoeConfig ok{.d_model = 8, .d_ff = 8, .n_experts = 4, .top_k = 2};
  auto with = [&](auto edit) {
    MoeConfig c = ok;
    edit(c);
    return message(c);
  };
  EXPECT_EQ(message(ok), "no error");
  EXPECT_EQ(with([](MoeConfig& c) { c.top_k = 5; }),
            "moe.top_k = 5: expected 1..4 (moe.n_experts)");
  EXPECT_EQ(with([](MoeConfig& c) { c.top_k = 0; }),
            "moe.top_k = 0: expected 1..4 (moe.n_experts)");
  EXPECT_EQ(with([](MoeConfig& c) { c.d_model = 0; }), "moe.d_model = 0: expected >= 1");
  EXPECT_EQ(with([](MoeConfig& c) { c.d_ff = -3; }), "moe.d_ff = -3: expected >= 1");
  EXPECT_EQ(with([](MoeConfig& c) { c.n_experts = 0; }), "moe.n_experts = 0: expected >= 1");
  EXPECT_EQ(
      with([](MoeConfig& c) { c.capacity_factor_train = 0; }),
      "moe.capacity_factor_train = 0: expected a finite value > 0 (or set moe.dropless = true)");
  EXPECT_EQ(
      with([](MoeConfig& c) { c.capacity_factor_eval = -1; }),
      "moe.capacity_factor_eval = -1: expected a finite value > 0 (or set moe.dropless = true)");
  EXPECT_EQ(with([](MoeConfig& c) { c.n_shared_experts = -1; }),
            "moe.n_shared_experts = -1: expected >= 0");
  EXPECT_EQ(with([](MoeConfig& c) { c.loss_z_weight = -0.1; }),
            "moe.loss_z_weight = -0.1: expected a finite value >= 0");
  EXPECT_EQ(with([](MoeConfig& c) { c.capacity_factor_train = 0, c.dropless = true; }), "no error");
}

TEST(MoeLayer, MismatchedShapesAndDtypesNameTheTensor) {
  MoeConfig cfg{.d_model = 8, .d_ff = 12, .n_experts = 4, .top_k = 2};
  MoeLayer layer(cfg);
  MoeParams p = init_moe_params(cfg, DType::kF32, 1);
  MoeCache cache;
  Tensor y;
  auto error_of = [&](const MoeParams& params, const Tensor& x) {
    try {
      layer.forward(params, x, y, cache, {});
    } catch (const ShapeError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_EQ(error_of(p, Tensor({5, 7}, DType::kF32)),
            "moe input x: [5, 7] f32, expected [T, 8] (moe.d_model)");
  EXPECT_EQ(error_of(p, Tensor({5, 8}, DType::kF64)),
            "moe.w_gate is f32 but x is f64: expected the same dtype");
  MoeParams bad = zeros_like(p);
  bad.w2 = Tensor({4, 8, 12}, DType::kF32);
  EXPECT_EQ(error_of(bad, Tensor({5, 8}, DType::kF32)),
            "moe.w2: shape [4, 8, 12], expected [4, 12, 8]");
  // Backward needs f32 weights: bf16 experts are for inference.
  MoeParams pb{p.w_gate.clone(), convert(p.w1, DType::kBF16), convert(p.w3, DType::kBF16),
               convert(p.w2, DType::kBF16), {}, {}, {}, {}, {}};
  Tensor x = random_tensor({5, 8}, DType::kF32, 1), dx;
  layer.forward(pb, x, y, cache, {});
  MoeParams g = zeros_like(pb);
  EXPECT_THROW(layer.backward(pb, cache, y, g, dx, {}), ShapeError);
}

}  // namespace
}  // namespace sy
