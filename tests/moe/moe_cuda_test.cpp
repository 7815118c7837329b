// The CUDA MoE layer against the CPU layer in float64 on the same bf16-rounded inputs:
// routing and dropped slots identical, outputs and gradients within bf16 rounding (relative
// norm of the error). Skips where no GPU is present.
#include <gtest/gtest.h>

#include <cmath>

#include "moe/moe_reference.h"
#include "switchyard/moe/moe_layer_cuda.h"
#include "testing/testing.h"

namespace sy {
namespace {

using testing::LayerCase;
using testing::random_tensor;

// ||a - b|| / ||b||
double rel_error(const Tensor& a, const Tensor& b) {
  Tensor x = convert(a, DType::kF64), y = convert(b, DType::kF64);
  double num = 0, den = 0;
  for (int64_t i = 0; i < x.numel(); ++i) {
    const double d = x.data<double>()[i] - y.data<double>()[i];
    num += d * d;
    den += y.data<double>()[i] * y.data<double>()[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

Tensor bf16_rounded(const Tensor& t) { return convert(convert(t, DType::kBF16), DType::kF64); }

class CudaLayer : public ::testing::TestWithParam<LayerCase> {
 protected:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_P(CudaLayer, ForwardAndBackwardMatchCpuFloat64) {
  const LayerCase c = GetParam();
  MoeConfig cfg = testing::config_of(c);
  cfg.loss_balance_weight = 0.1;
  cfg.loss_z_weight = 0.05;
  MoeParams p = init_moe_params(cfg, DType::kF64, 31);
  // Both backends see the same bf16 values.
  for (Tensor* t : {&p.w_gate, &p.w1, &p.w3, &p.w2}) *t = bf16_rounded(*t);
  Tensor x = bf16_rounded(random_tensor({c.T, c.d}, DType::kF64, 32, -2, 2));
  Tensor dy = bf16_rounded(random_tensor({c.T, c.d}, DType::kF64, 33));

  MoeLayer cpu(cfg);
  MoeCache cache;
  Tensor y_ref, dx_ref;
  MoeForward ref = cpu.forward(p, x, y_ref, cache, {});
  MoeParams g_ref = zeros_like(p);
  cpu.backward(p, cache, dy, g_ref, dx_ref, {});

  CudaMoeLayer gpu(cfg);
  gpu.set_params(p);
  Tensor y, dx;
  MoeForward out = gpu.forward(x, y, /*training=*/true);
  EXPECT_EQ(out.stats.demand, ref.stats.demand);
  EXPECT_EQ(out.stats.rows, ref.stats.rows) << "dropped slots differ";
  EXPECT_NEAR(out.loss_balance, ref.loss_balance, 1e-3 * ref.loss_balance + 1e-6);
  EXPECT_NEAR(out.loss_z, ref.loss_z, 1e-3 * ref.loss_z + 1e-6);
  EXPECT_NEAR(out.stats.router_entropy, ref.stats.router_entropy, 1e-3);
  EXPECT_LT(rel_error(y, y_ref), 2e-2);

  gpu.backward(dy, dx);
  MoeParams g = gpu.grads();
  EXPECT_LT(rel_error(dx, dx_ref), 3e-2);
  EXPECT_LT(rel_error(g.w_gate, g_ref.w_gate), 3e-2);
  EXPECT_LT(rel_error(g.w1, g_ref.w1), 3e-2);
  EXPECT_LT(rel_error(g.w3, g_ref.w3), 3e-2);
  EXPECT_LT(rel_error(g.w2, g_ref.w2), 3e-2);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, CudaLayer,
    ::testing::Values(LayerCase{1, 16, 24, 4, 2, true, 0},       // T = 1
                      LayerCase{37, 16, 37, 5, 2, true, 1.0},    // odd T and f, dropping
                      LayerCase{64, 32, 48, 8, 1, false, 1.25},  // Switch top-1
                      LayerCase{50, 24, 40, 6, 6, true, 0},      // k = E
                      LayerCase{300, 64, 96, 8, 2, true, 0.5},   // heavy dropping
                      LayerCase{0, 16, 24, 4, 2, true, 1.0}));   // T = 0

TEST(CudaLayerErrors, NamesWhatIsWrong) {
  if (!cuda_available()) {
    // Without a device (or without CUDA in the build) the layer says so instead of running.
    EXPECT_THROW(CudaMoeLayer(MoeConfig{.d_model = 8, .d_ff = 8, .n_experts = 2, .top_k = 1}),
                 Error);
    return;
  }
  EXPECT_THROW(CudaMoeLayer(MoeConfig{.d_model = 12, .d_ff = 8, .n_experts = 2, .top_k = 1}),
               ConfigError);
  MoeConfig prioritized{.d_model = 8, .d_ff = 8, .n_experts = 2, .top_k = 1};
  prioritized.batch_prioritized = true;
  EXPECT_THROW(CudaMoeLayer{prioritized}, ConfigError);
  CudaMoeLayer layer(MoeConfig{.d_model = 8, .d_ff = 8, .n_experts = 2, .top_k = 1});
  MoeParams bad = init_moe_params(MoeConfig{.d_model = 8, .d_ff = 4, .n_experts = 2, .top_k = 1},
                                  DType::kF32, 1);
  EXPECT_THROW(layer.set_params(bad), ShapeError);
}

}  // namespace
}  // namespace sy
