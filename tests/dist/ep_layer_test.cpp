// The expert-parallel MoE layer against one process running every rank's tokens: forward,
// backward and routing statistics, with and without capacity, unequal and empty ranks, every
// token on one expert, each with the exchange overlapped and not, and the configurations it
// refuses. Runs under mpirun -np 2 and -np 4.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>

#include "switchyard/core/rng.h"
#include "switchyard/dist/comm.h"
#include "switchyard/moe/moe_layer.h"
#include "switchyard/train/parallel.h"
#include "testing/testing.h"

namespace sy {
namespace {

using testing::max_scaled_error;
using testing::random_tensor;

// Rows [begin, end) of a [T, d] tensor.
Tensor rows_of(const Tensor& t, int64_t begin, int64_t end) {
  Tensor out({end - begin, t.dim(1)}, t.dtype());
  const size_t row = t.nbytes() / size_t(std::max<int64_t>(t.dim(0), 1));
  std::copy_n(t.bytes() + size_t(begin) * row, out.nbytes(), out.bytes());
  return out;
}

std::vector<double> as_f64(const Tensor& t) {
  Tensor c = convert(t, DType::kF64);
  return {c.span<double>().begin(), c.span<double>().end()};
}

struct Case {
  MoeConfig cfg;
  std::vector<int64_t> tokens;  // per rank
  DType dtype = DType::kF64;
  double rtol = 1e-10, atol = 1e-12;
};

// Runs the layer over `grid` on this rank's rows and compares with the whole batch in one
// process. Gradients: every rank's dy is (world x) its rows of the batch's dy, the convention
// the trainer's average over ranks relies on; w_gate's gradient is compared after that average.
void expect_equal_to_single_process(const Case& c, const MpiParallelGroup& grid,
                                    const std::function<void(MoeParams&)>& edit = {}) {
  const MoeConfig& cfg = c.cfg;
  const int64_t d = cfg.d_model, W = grid.world_size(), w = grid.world_rank();
  ASSERT_EQ(int64_t(c.tokens.size()), W);
  std::vector<int64_t> at(size_t(W) + 1, 0);
  std::partial_sum(c.tokens.begin(), c.tokens.end(), at.begin() + 1);
  const int64_t T = at.back();

  MoeParams p = init_moe_params(cfg, c.dtype, 5);
  if (edit) edit(p);
  Tensor x = random_tensor({T, d}, c.dtype, 6, -2, 2);
  Tensor dy = random_tensor({T, d}, c.dtype, 7);
  MoeLayer layer(cfg);

  // The reference: one process, all tokens.
  Tensor y, dx;
  MoeCache cache;
  const MoeForward ref = layer.forward(p, x, y, cache, {});
  MoeParams g = zeros_like(p);
  layer.backward(p, cache, dy, g, dx, {});

  // This rank: its rows and its experts, with the exchange and the experts in sequence and
  // overlapped.
  for (const bool overlap : {false, true}) {
    MoeParams pl = init_moe_params(cfg, c.dtype, 5);
    if (edit) edit(pl);
    for (Tensor* t : {&pl.w1, &pl.w3, &pl.w2})
      *t = expert_shard(*t, grid.ep_rank(), grid.ep_size());
    MoeParams gl = zeros_like(pl);
    Tensor xl = rows_of(x, at[w], at[w + 1]), dyl = rows_of(dy, at[w], at[w + 1]), yl, dxl;
    Tensor dyl_scaled = convert(dyl, DType::kF64);
    for (double& v : dyl_scaled.span<double>()) v *= double(W);
    dyl_scaled = convert(dyl_scaled, c.dtype);
    ExecContext ctx;
    ctx.parallel = &grid;
    ctx.exchange_overlap = overlap;
    MoeCache lc;
    const MoeForward got = layer.forward(pl, xl, yl, lc, ctx);
    layer.backward(pl, lc, dyl_scaled, gl, dxl, ctx);

    const std::string where = fmt::format("world rank {} (ep rank {} of {}{})", w, grid.ep_rank(),
                                          grid.ep_size(), overlap ? ", overlapped" : "");
    EXPECT_LE(max_scaled_error(as_f64(yl), as_f64(rows_of(y, at[w], at[w + 1])), c.atol, c.rtol), 1)
        << "y, " << where;
    std::vector<double> dx_want = as_f64(rows_of(dx, at[w], at[w + 1]));
    for (double& v : dx_want) v *= double(W);
    EXPECT_LE(max_scaled_error(as_f64(dxl), dx_want, c.atol * W, c.rtol), 1) << "dx, " << where;
    for (auto [name, mine, all] : {std::tuple{"w1", &gl.w1, &g.w1}, std::tuple{"w3", &gl.w3, &g.w3},
                                   std::tuple{"w2", &gl.w2, &g.w2}}) {
      std::vector<double> want = as_f64(expert_shard(*all, grid.ep_rank(), grid.ep_size()));
      for (double& v : want) v *= double(W);
      EXPECT_LE(max_scaled_error(as_f64(*mine), want, c.atol * W, c.rtol), 1)
          << name << ", " << where;
    }
    std::vector<double> gate = as_f64(gl.w_gate);
    grid.world_allreduce_sum(gate);
    std::vector<double> gate_want = as_f64(g.w_gate);
    for (double& v : gate_want) v *= double(W);  // world x, summed over world ranks
    EXPECT_LE(max_scaled_error(gate, gate_want, c.atol * W, c.rtol * 10), 1)
        << "w_gate (summed over ranks), " << where;
    EXPECT_NEAR(got.loss_balance, ref.loss_balance, 1e-9 * (1 + ref.loss_balance)) << where;

    // Slots kept: this rank's share of the single process's kept slots.
    int64_t kept_ref = 0, kept_here = 0;
    const int64_t k = cfg.slots_per_token();
    for (int64_t s = at[w] * k; s < at[w + 1] * k; ++s) kept_ref += cache.plan.slot_row[s] >= 0;
    for (int32_t r : lc.plan.slot_row) kept_here += r >= 0;
    EXPECT_EQ(kept_here, kept_ref) << where;
    double rows[1] = {double(lc.ep.rows_computed)};
    grid.world_allreduce_sum(rows);
    EXPECT_EQ(int64_t(rows[0]), cache.plan.n_rows() * grid.dp_size()) << where;
  }
}

MpiParallelGroup& world_grid() {
  static MpiParallelGroup grid(Comm::world(), Comm::world().size());
  return grid;
}

MoeConfig small_config(int64_t E, int64_t k) {
  MoeConfig cfg;
  cfg.d_model = 13;
  cfg.d_ff = 19;
  cfg.n_experts = E;
  cfg.top_k = k;
  cfg.loss_balance_weight = 0.01;
  cfg.loss_z_weight = 0.001;
  return cfg;
}

TEST(ExpertParallelLayer, DroplessEqualsOneProcess) {
  Case c{small_config(8, 2), std::vector<int64_t>(size_t(Comm::world().size()), 37)};
  c.cfg.dropless = true;
  expect_equal_to_single_process(c, world_grid());
}

TEST(ExpertParallelLayer, CapacityGrantedOverAllRanksEqualsOneProcess) {
  // Factor 1.0 drops slots at this size; the owner grants them in the single process's order.
  Case c{small_config(8, 2), std::vector<int64_t>(size_t(Comm::world().size()), 41)};
  c.cfg.capacity_factor_train = 1.0;
  expect_equal_to_single_process(c, world_grid());
}

TEST(ExpertParallelLayer, Float32EqualsOneProcessToRounding) {
  Case c{small_config(8, 2), std::vector<int64_t>(size_t(Comm::world().size()), 29)};
  c.cfg.capacity_factor_train = 1.25;
  c.dtype = DType::kF32;
  c.rtol = 2e-4;
  c.atol = 2e-5;
  expect_equal_to_single_process(c, world_grid());
}

TEST(ExpertParallelLayer, RanksWithoutTokens) {
  // Unequal ranks, rank 1 with none: the aux losses' gradients follow the equal-share
  // convention, so they are off here; forward, task gradients and drops still match.
  const int W = Comm::world().size();
  std::vector<int64_t> tokens(static_cast<size_t>(W));
  for (int r = 0; r < W; ++r) tokens[r] = r == 1 ? 0 : 9 + 7 * r;
  Case c{small_config(4 * W, 2), tokens};
  c.cfg.loss_balance_weight = c.cfg.loss_z_weight = 0;
  c.cfg.capacity_factor_train = 1.0;
  expect_equal_to_single_process(c, world_grid());
}

TEST(ExpertParallelLayer, EveryTokenToOneExpert) {
  // A router that sends every token to expert 0 first: only rank 0's experts get rows, the
  // other ranks' experts receive none, and capacity drops most of them at the one owner.
  Case c{small_config(8, 1), std::vector<int64_t>(size_t(Comm::world().size()), 23)};
  c.cfg.capacity_factor_train = 1.5;
  // A zero router ties every expert; ties go to the lowest index.
  expect_equal_to_single_process(c, world_grid(), [](MoeParams& p) { p.w_gate.fill_zero(); });
}

TEST(ExpertParallelLayer, BfloatWireOverlappedTracksSequential) {
  // bf16 on the wire, overlapped against in sequence on the same rows: each block is rounded
  // once either way, so the two agree to a bf16 rounding here and there (f32's last bits differ
  // between the schedules); a block taken from the wrong rows would be off by O(1).
  MoeConfig cfg = small_config(8, 2);
  cfg.dropless = true;
  const MpiParallelGroup& grid = world_grid();
  MoeParams p = init_moe_params(cfg, DType::kF32, 5);
  for (Tensor* t : {&p.w1, &p.w3, &p.w2}) *t = expert_shard(*t, grid.ep_rank(), grid.ep_size());
  const int64_t T = 31 + 6 * grid.world_rank();
  Tensor x = random_tensor({T, cfg.d_model}, DType::kF32, 60 + uint64_t(grid.world_rank()), -2, 2);
  Tensor dy = random_tensor({T, cfg.d_model}, DType::kF32, 70 + uint64_t(grid.world_rank()));
  MoeLayer layer(cfg);
  std::vector<double> y[2], dx[2], dw2[2];
  for (const bool overlap : {false, true}) {
    ExecContext ctx;
    ctx.parallel = &grid;
    ctx.exchange_bf16 = true;
    ctx.exchange_overlap = overlap;
    MoeCache cache;
    MoeParams g = zeros_like(p);
    Tensor out, din;
    layer.forward(p, x, out, cache, ctx);
    layer.backward(p, cache, dy, g, din, ctx);
    y[overlap] = as_f64(out), dx[overlap] = as_f64(din), dw2[overlap] = as_f64(g.w2);
  }
  EXPECT_LE(max_scaled_error(y[1], y[0], 2e-2, 2e-2), 1) << "y";
  EXPECT_LE(max_scaled_error(dx[1], dx[0], 2e-2, 2e-2), 1) << "dx";
  EXPECT_LE(max_scaled_error(dw2[1], dw2[0], 5e-2, 2e-2), 1) << "dw2";
}

// The layer's forward on a few tokens over the world grid: where a config is refused.
void forward_on_world(const MoeConfig& cfg) {
  MoeLayer layer(cfg);
  MoeParams p = init_moe_params(cfg, DType::kF64, 1);
  Tensor x = random_tensor({5, cfg.d_model}, DType::kF64, 2), y;
  MoeCache cache;
  ExecContext ctx;
  ctx.parallel = &world_grid();
  layer.forward(p, x, y, cache, ctx);
}

TEST(ExpertParallelLayer, ExpertsNotDivisibleByRanksIsAClearError) {
  const MoeConfig cfg = small_config(7, 2);
  try {
    forward_on_world(cfg);
    FAIL() << "7 experts over " << Comm::world().size() << " ranks accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("moe.n_experts = 7 over"), std::string::npos) << e.what();
  }
  EXPECT_THROW(expert_shard(init_moe_params(cfg, DType::kF64, 1).w1, 0, Comm::world().size()),
               ConfigError);
}

TEST(ExpertParallelLayer, RankingsOverTheWholeBatchAreRefused) {
  MoeConfig cfg = small_config(8, 2);
  cfg.batch_prioritized = true;
  EXPECT_THROW(forward_on_world(cfg), ConfigError);
}

TEST(ExpertParallelLayer, ExpertGroupsTimesReplicas) {
  // Two expert groups of W/2 ranks each: capacity is each group's own, so the reference is
  // dropless; experts' gradients are summed over the replicas by the caller.
  const int W = Comm::world().size();
  if (W < 4) GTEST_SKIP() << "needs 4 ranks";
  MpiParallelGroup grid(Comm::world(), W / 2);
  MoeConfig cfg = small_config(8, 2);
  cfg.dropless = true;
  cfg.loss_z_weight = 0;  // per rank; with equal ranks it would match too, kept simple here
  Case c{cfg, std::vector<int64_t>(size_t(W), 17)};
  // Expert gradients here are one group's; the test compares them after the replica sum.
  const int64_t d = cfg.d_model;
  std::vector<int64_t> at(size_t(W) + 1, 0);
  std::partial_sum(c.tokens.begin(), c.tokens.end(), at.begin() + 1);
  MoeParams p = init_moe_params(cfg, DType::kF64, 5);
  Tensor x = random_tensor({at.back(), d}, DType::kF64, 6, -2, 2);
  Tensor dy = random_tensor({at.back(), d}, DType::kF64, 7);
  MoeLayer layer(cfg);
  Tensor y, dx;
  MoeCache cache;
  layer.forward(p, x, y, cache, {});
  MoeParams g = zeros_like(p);
  layer.backward(p, cache, dy, g, dx, {});

  const int w = grid.world_rank();
  MoeParams pl = init_moe_params(cfg, DType::kF64, 5);
  for (Tensor* t : {&pl.w1, &pl.w3, &pl.w2}) *t = expert_shard(*t, grid.ep_rank(), grid.ep_size());
  MoeParams gl = zeros_like(pl);
  Tensor xl = rows_of(x, at[w], at[w + 1]), dyl = rows_of(dy, at[w], at[w + 1]), yl, dxl;
  ExecContext ctx;
  ctx.parallel = &grid;
  MoeCache lc;
  layer.forward(pl, xl, yl, lc, ctx);
  layer.backward(pl, lc, dyl, gl, dxl, ctx);
  EXPECT_LE(max_scaled_error(as_f64(yl), as_f64(rows_of(y, at[w], at[w + 1])), 1e-12, 1e-10), 1);
  std::vector<double> w1 = as_f64(gl.w1);
  // Sum over replicas through the world sum of a one-group-per-slot buffer.
  std::vector<double> all(size_t(cfg.n_experts) * size_t(d * cfg.d_ff), 0.0);
  const size_t shard = w1.size();
  for (size_t i = 0; i < shard; ++i) all[size_t(grid.ep_rank()) * shard + i] = w1[i];
  grid.world_allreduce_sum(all);
  EXPECT_LE(max_scaled_error(all, as_f64(g.w1), 1e-12, 1e-10), 1) << "w1 over replicas";
}

}  // namespace
}  // namespace sy
