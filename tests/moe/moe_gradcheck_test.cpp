// Float64 finite-difference checks of every MoE backward: router (with and without
// renormalisation), the auxiliary losses alone, experts, combine, and the whole layer with and
// without dropping. Each loss is sum(output * r) for a fixed random r, plus the aux losses.
#include <gtest/gtest.h>

#include "moe/moe_reference.h"
#include "switchyard/moe/moe_layer.h"
#include "testing/testing.h"

namespace sy {
namespace {

using testing::dot;
using testing::expect_grad_close;
using testing::random_tensor;

struct RouterCase {
  int64_t k;
  bool renorm;
  double w_balance, w_z;
  bool task_loss;  // false: the aux losses alone
  Gating gating = Gating::kSoftmaxTopK;
  friend void PrintTo(const RouterCase& c, std::ostream* os) {
    *os << "k" << c.k << (c.renorm ? "_renorm" : "") << "_wb" << c.w_balance << "_wz" << c.w_z
        << (c.task_loss ? "" : "_aux_only")
        << (c.gating == Gating::kSigmoidBias ? "_sigmoid_bias" : "");
  }
};
class RouterGrad : public ::testing::TestWithParam<RouterCase> {};

TEST_P(RouterGrad, MatchesFiniteDifferences) {
  const RouterCase rc = GetParam();
  const int64_t T = 7, d = 5, E = 4;
  MoeConfig cfg{.d_model = d,
                .d_ff = 3,
                .n_experts = E,
                .top_k = rc.k,
                .gating = rc.gating,
                .renormalize = rc.renorm,
                .loss_balance_weight = rc.w_balance,
                .loss_z_weight = rc.w_z};
  cfg.validate();
  Router router(cfg);
  Tensor x = random_tensor({T, d}, DType::kF64, 1), w = random_tensor({d, E}, DType::kF64, 2);
  Tensor r = random_tensor({T, rc.k}, DType::kF64, 3);
  if (!rc.task_loss) r.fill_zero();
  // A bias changes which experts sigmoid gating picks, never the weights' gradient.
  Tensor bias = random_tensor({E}, DType::kF64, 4, -0.2, 0.2);
  RouterCache c;
  auto loss = [&] {
    router.forward<double>(w.matrix<double>(), x.matrix<double>(), c, bias.span<double>());
    return dot(c.weight.span<double>(), r.span<double>()) + c.loss_balance + c.loss_z;
  };
  loss();
  Tensor dw({d, E}, DType::kF64), dx({T, d}, DType::kF64);
  router.backward<double>(w.matrix<double>(), x.matrix<double>(), c, r.matrix<double>(),
                          dw.matrix<double>(), dx.matrix<double>());
  expect_grad_close(loss, w.span<double>(), dw.span<double>(), "dw_gate");
  expect_grad_close(loss, x.span<double>(), dx.span<double>(), "dx");
}

INSTANTIATE_TEST_SUITE_P(
    Cases, RouterGrad,
    ::testing::Values(RouterCase{1, false, 0, 0, true}, RouterCase{2, true, 0, 0, true},
                      RouterCase{2, false, 0.3, 0.2, true}, RouterCase{3, true, 0.3, 0.2, true},
                      RouterCase{2, true, 0.5, 0, false},  // balance only
                      RouterCase{2, true, 0, 0.5, false},  // z only
                      RouterCase{2, true, 0.2, 0.1, true, Gating::kSigmoidBias},
                      RouterCase{3, false, 0, 0, true, Gating::kSigmoidBias}));

TEST(ExpertsGrad, MatchesFiniteDifferences) {
  const int64_t d = 5, f = 6, E = 3;
  std::vector<int32_t> offsets = {0, 4, 4, 7};  // an expert with no rows
  const int64_t n = offsets.back();
  Tensor w1 = random_tensor({E, d, f}, DType::kF64, 1),
         w3 = random_tensor({E, d, f}, DType::kF64, 2);
  Tensor w2 = random_tensor({E, f, d}, DType::kF64, 3), xs = random_tensor({n, d}, DType::kF64, 4);
  Tensor r = random_tensor({n, d}, DType::kF64, 5), ys({n, d}, DType::kF64);
  ExpertsCache c;
  const Backend& be = backend_of(ExecContext{});
  auto loss = [&] {
    experts_forward<double>(be, w1.stacked<double>(), w3.stacked<double>(),
                            w2.stacked<double>(), xs.matrix<double>(), offsets,
                            ys.matrix<double>(), c);
    return dot(ys.span<double>(), r.span<double>());
  };
  loss();
  Tensor dw1({E, d, f}, DType::kF64), dw3({E, d, f}, DType::kF64), dw2({E, f, d}, DType::kF64);
  Tensor dxs({n, d}, DType::kF64);
  experts_backward<double>(be, w1.stacked<double>(), w3.stacked<double>(),
                           w2.stacked<double>(), xs.matrix<double>(), offsets,
                           r.matrix<double>(), c, dw1.stacked<double>(), dw3.stacked<double>(),
                           dw2.stacked<double>(), dxs.matrix<double>());
  expect_grad_close(loss, w1.span<double>(), dw1.span<double>(), "dw1");
  expect_grad_close(loss, w3.span<double>(), dw3.span<double>(), "dw3");
  expect_grad_close(loss, w2.span<double>(), dw2.span<double>(), "dw2");
  expect_grad_close(loss, xs.span<double>(), dxs.span<double>(), "dxs");
}

TEST(CombineGrad, MatchesFiniteDifferencesWithDroppedSlots) {
  const int64_t T = 6, k = 2, E = 3, d = 4;
  std::vector<int32_t> expert = {0, 1, 0, 2, 0, 1, 1, 2, 0, 2, 2, 1};
  DispatchPlan plan;
  build_dispatch_plan(expert, T, k, E, /*capacity=*/3, plan);
  ASSERT_GT(plan.n_dropped(), 0);
  const int64_t n = plan.n_rows();
  Tensor ys = random_tensor({n, d}, DType::kF64, 1), w = random_tensor({T, k}, DType::kF64, 2);
  Tensor r = random_tensor({T, d}, DType::kF64, 3), y({T, d}, DType::kF64);
  auto loss = [&] {
    combine_rows<double>(ys.matrix<double>(), plan, w.matrix<double>(), y.matrix<double>());
    return dot(y.span<double>(), r.span<double>());
  };
  Tensor dys({n, d}, DType::kF64), dw({T, k}, DType::kF64);
  combine_rows_backward<double>(ys.matrix<double>(), plan, w.matrix<double>(), r.matrix<double>(),
                                dys.matrix<double>(), dw.matrix<double>());
  expect_grad_close(loss, ys.span<double>(), dys.span<double>(), "dys");
  expect_grad_close(loss, w.span<double>(), dw.span<double>(), "dweight");
}

class LayerGrad : public ::testing::TestWithParam<testing::LayerCase> {};

TEST_P(LayerGrad, MatchesFiniteDifferences) {
  const testing::LayerCase lc = GetParam();
  MoeConfig cfg = testing::config_of(lc);
  cfg.loss_balance_weight = 0.1;
  cfg.loss_z_weight = 0.05;
  MoeLayer layer(cfg);
  MoeParams p = init_moe_params(cfg, DType::kF64, 21);
  Tensor x = random_tensor({lc.T, lc.d}, DType::kF64, 22),
         r = random_tensor({lc.T, lc.d}, DType::kF64, 23);
  Tensor y, dx;
  MoeCache cache;
  auto loss = [&] {
    MoeForward out = layer.forward(p, x, y, cache, {});
    return dot(y.span<double>(), r.span<double>()) + out.loss_balance + out.loss_z;
  };
  loss();
  if (lc.capacity_factor > 0 && lc.capacity_factor < 1) {
    EXPECT_GT(cache.plan.n_dropped(), 0);
  }
  MoeParams g = zeros_like(p);
  layer.backward(p, cache, r, g, dx, {});
  expect_grad_close(loss, x.span<double>(), dx.span<double>(), "dx");
  expect_grad_close(loss, p.w_gate.span<double>(), g.w_gate.span<double>(), "dw_gate");
  expect_grad_close(loss, p.w1.span<double>(), g.w1.span<double>(), "dw1");
  expect_grad_close(loss, p.w3.span<double>(), g.w3.span<double>(), "dw3");
  expect_grad_close(loss, p.w2.span<double>(), g.w2.span<double>(), "dw2");
  if (lc.n_shared > 0) {
    expect_grad_close(loss, p.shared_w1.span<double>(), g.shared_w1.span<double>(), "dshared_w1");
    expect_grad_close(loss, p.shared_w3.span<double>(), g.shared_w3.span<double>(), "dshared_w3");
    expect_grad_close(loss, p.shared_w2.span<double>(), g.shared_w2.span<double>(), "dshared_w2");
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, LayerGrad,
                         ::testing::Values(testing::LayerCase{9, 6, 7, 4, 2, true, 0},
                                           testing::LayerCase{11, 5, 4, 3, 1, false, 0.7},
                                           testing::LayerCase{8, 7, 5, 5, 3, true, 0.6},
                                           testing::LayerCase{1, 4, 3, 2, 2, false, 0},
                                           testing::LayerCase{10, 5, 4, 3, 2, true, 0.6, true},
                                           testing::LayerCase{9, 6, 7, 4, 2, true, 0.8, false, 2}));

TEST(LayerGrad, ParameterGradientsAccumulate) {
  MoeConfig cfg{.d_model = 4, .d_ff = 3, .n_experts = 2, .top_k = 1, .dropless = true};
  MoeLayer layer(cfg);
  MoeParams p = init_moe_params(cfg, DType::kF64, 1);
  Tensor x = random_tensor({5, 4}, DType::kF64, 2), dy = random_tensor({5, 4}, DType::kF64, 3);
  Tensor y, dx;
  MoeCache cache;
  MoeParams once = zeros_like(p), twice = zeros_like(p);
  layer.forward(p, x, y, cache, {});
  layer.backward(p, cache, dy, once, dx, {});
  layer.backward(p, cache, dy, twice, dx, {});
  layer.backward(p, cache, dy, twice, dx, {});
  for (int64_t i = 0; i < once.w1.numel(); ++i)
    EXPECT_NEAR(twice.w1.data<double>()[i], 2 * once.w1.data<double>()[i], 1e-12);
}

}  // namespace
}  // namespace sy
