// The MoE layer: ties router, dispatch plan, experts and combine together, validates what comes
// in from the caller, and gathers routing statistics.
#include "switchyard/moe/moe_layer.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>

#include "switchyard/core/parallel.h"
#include "switchyard/core/rng.h"
#include "switchyard/kernels/backend.h"
#include "switchyard/kernels/cpu.h"

namespace sy {

namespace {

// Runs fn and, when profiling, adds its wall time to *slot.
template <class Fn>
void timed(bool profile, double* slot, Fn&& fn) {
  if (!profile) return fn();
  add_wall_seconds(slot, fn);
}

// dst += src, elementwise; both [T, d].
template <class T>
void add_into(MatrixView<T> dst, ConstMatrixView<T> src) {
  const int64_t n = dst.size();
#pragma omp parallel for schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) dst.data[i] += src.data[i];
}

// Batch prioritized routing: choice by choice, tokens in order of their top-1 router
// probability, highest first (ties by token index). rank: [T*k] slot order for the plan.
template <class T>
void rank_by_priority(const RouterCache& rc, int64_t n_tok, int64_t k, std::vector<int32_t>& rank) {
  ConstMatrixView<T> probs = rc.probs.matrix<T>();
  std::vector<int32_t> order(static_cast<size_t>(n_tok));
  std::iota(order.begin(), order.end(), 0);
  auto score = [&](int32_t t) { return probs(t, rc.expert[size_t(t * k)]); };
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return score(a) > score(b); });
  rank.resize(size_t(n_tok * k));
  for (int64_t j = 0; j < k; ++j)
    for (int64_t i = 0; i < n_tok; ++i) rank[size_t(j * n_tok + i)] = int32_t(order[i] * k + j);
}

// Expert choice: all (token, expert) slots by router probability, highest first (ties by slot
// index), so each expert's capacity goes to its C most probable tokens.
template <class T>
void rank_by_probability(const RouterCache& rc, std::vector<int32_t>& rank) {
  const T* probs = rc.probs.data<T>();
  rank.resize(size_t(rc.probs.numel()));
  std::iota(rank.begin(), rank.end(), 0);
  std::stable_sort(rank.begin(), rank.end(),
                   [&](int32_t a, int32_t b) { return probs[a] > probs[b]; });
}

// Routing by groups: each row takes its group's experts and weights, and the group ranking (when
// capacity is granted in ranked order) becomes a ranking of rows that keeps a group's rows
// together, so that capacity, counted in rows, keeps or drops groups whole.
template <class T>
void expand_group_routing(MoeCache& c, int64_t n_grp, int64_t slots, bool ranked) {
  const int64_t rows = c.group_rows, n_tok = n_grp * rows;
  c.row_expert.resize(size_t(n_tok * slots));
  c.row_weight.resize({n_tok, slots}, dtype_of<T>());
  MatrixView<T> rw = c.row_weight.matrix<T>();
  ConstMatrixView<T> gw = c.router.weight.matrix<T>();
  for (int64_t t = 0; t < n_tok; ++t)
    for (int64_t j = 0; j < slots; ++j) {
      c.row_expert[size_t(t * slots + j)] = c.router.expert[size_t((t / rows) * slots + j)];
      rw(t, j) = gw(t / rows, j);
    }
  if (!ranked) return;  // choice-major row order already keeps each group's rows together
  c.rank.resize(size_t(n_tok * slots));
  for (int64_t q = 0; q < n_grp * slots; ++q) {
    const int64_t g = c.group_rank[size_t(q)] / slots, j = c.group_rank[size_t(q)] % slots;
    for (int64_t r = 0; r < rows; ++r)
      c.rank[size_t(q * rows + r)] = int32_t((g * rows + r) * slots + j);
  }
}

}  // namespace

RoutingStats routing_stats(const DispatchPlan& plan, double router_entropy) {
  RoutingStats s;
  const int64_t E = plan.n_experts;
  s.demand.assign(plan.demand.begin(), plan.demand.end());
  s.rows.resize(size_t(E));
  for (int64_t e = 0; e < E; ++e) s.rows[e] = plan.rows_of(e);
  s.capacity = plan.capacity;
  s.router_entropy = router_entropy;
  if (plan.n_slots() == 0) return s;
  s.dropped_fraction = double(plan.n_dropped()) / double(plan.n_slots());
  const double mean = double(plan.n_slots()) / double(E);
  s.load_max_over_mean = double(*std::max_element(s.demand.begin(), s.demand.end())) / mean;
  return s;
}

MoeParams init_moe_params(const MoeConfig& cfg, DType dtype, uint64_t seed) {
  cfg.validate();
  const int64_t d = cfg.d_model, f = cfg.d_ff, E = cfg.n_experts;
  MoeParams p;
  auto init = [&](std::initializer_list<int64_t> shape, int64_t fan_in, uint64_t stream) {
    Tensor t(shape, DType::kF64);
    fill_normal(t.span<double>(), Philox(seed, stream), 1.0 / std::sqrt(double(fan_in)));
    return convert(t, dtype);
  };
  p.w_gate = init({d, E}, d, 0);
  p.w1 = init({E, d, f}, d, 1);
  p.w3 = init({E, d, f}, d, 2);
  p.w2 = init({E, f, d}, f, 3);
  p.expert_bias = Tensor({E}, dtype);
  if (const int64_t S = cfg.n_shared_experts; S > 0) {
    const int64_t g = cfg.shared_width();
    p.shared_w1 = init({S, d, g}, d, 4);
    p.shared_w3 = init({S, d, g}, d, 5);
    p.shared_w2 = init({S, g, d}, g, 6);
  }
  if (cfg.gating == Gating::kNoisyTopK) p.w_noise = Tensor({d, E}, dtype);
  return p;
}

MoeParams zeros_like(const MoeParams& p) {
  auto zeros = [](const Tensor& t) { return t.empty() ? Tensor() : Tensor(t.shape(), t.dtype()); };
  return {zeros(p.w_gate),      zeros(p.w1),        zeros(p.w3),        zeros(p.w2),
          zeros(p.expert_bias), zeros(p.shared_w1), zeros(p.shared_w3), zeros(p.shared_w2),
          zeros(p.w_noise)};
}

MoeLayer::MoeLayer(const MoeConfig& cfg) : cfg_(cfg), router_((cfg.validate(), cfg)) {}

void MoeLayer::check_params(const MoeParams& p, int64_t ep_size) const {
  const int64_t d = cfg_.d_model, f = cfg_.d_ff, E = cfg_.n_experts;
  if (ep_size < 1 || E % ep_size != 0)
    throw ConfigError(fmt::format("moe.n_experts = {} over {} expert-parallel ranks: expected a "
                                  "rank count that divides the experts evenly",
                                  E, ep_size));
  const int64_t El = E / ep_size;
  expect_shape(p.w_gate, {d, E}, "moe.w_gate");
  expect_shape(p.w1, {El, d, f}, "moe.w1");
  expect_shape(p.w3, {El, d, f}, "moe.w3");
  expect_shape(p.w2, {El, f, d}, "moe.w2");
  if (const int64_t S = cfg_.n_shared_experts; S > 0) {
    const int64_t g = cfg_.shared_width();
    expect_shape(p.shared_w1, {S, d, g}, "moe.shared_w1");
    expect_shape(p.shared_w3, {S, d, g}, "moe.shared_w3");
    expect_shape(p.shared_w2, {S, g, d}, "moe.shared_w2");
    expect_dtype(p.shared_w1, p.w_gate.dtype(), "moe.shared_w1", "moe.w_gate's dtype");
    expect_dtype(p.shared_w3, p.w_gate.dtype(), "moe.shared_w3", "moe.w_gate's dtype");
    expect_dtype(p.shared_w2, p.w_gate.dtype(), "moe.shared_w2", "moe.w_gate's dtype");
  } else if (!p.shared_w1.empty() || !p.shared_w3.empty() || !p.shared_w2.empty()) {
    throw ShapeError("moe.shared_w1/w3/w2 are set but moe.n_shared_experts is 0");
  }
  if (!p.expert_bias.empty()) {
    expect_shape(p.expert_bias, {E}, "moe.expert_bias");
    expect_dtype(p.expert_bias, p.w_gate.dtype(), "moe.expert_bias", "moe.w_gate's dtype");
  }
  if (cfg_.gating == Gating::kNoisyTopK) {
    expect_shape(p.w_noise, {d, E}, "moe.w_noise");
    expect_dtype(p.w_noise, p.w_gate.dtype(), "moe.w_noise", "moe.w_gate's dtype");
  } else if (!p.w_noise.empty()) {
    throw ShapeError("moe.w_noise is set but moe.router is not noisy_topk");
  }
  if (p.w1.dtype() != p.w3.dtype() || p.w1.dtype() != p.w2.dtype())
    throw ShapeError(fmt::format("moe expert weights: dtypes w1 {}, w3 {}, w2 {}: expected one",
                                 dtype_name(p.w1.dtype()), dtype_name(p.w3.dtype()),
                                 dtype_name(p.w2.dtype())));
}

MoeForward MoeLayer::forward(const MoeParams& p, const Tensor& x, Tensor& y, MoeCache& cache,
                             const ExecContext& ctx, std::span<const int32_t> token_ids,
                             const RouteGroups& groups) const {
  if (groups.rows > 1 && (ctx.parallel != nullptr || cfg_.gating == Gating::kHash))
    throw ConfigError(fmt::format(
        "routing by groups of {} rows with {}: expected a single-process layer whose router "
        "takes the group's mean row",
        groups.rows, ctx.parallel != nullptr ? "expert parallelism" : "moe.router = hash"));
  if (groups.rows < 1 || (x.rank() == 2 && x.dim(0) % groups.rows != 0))
    throw ShapeError(fmt::format("moe input {} routed in groups of {} rows: expected a group "
                                 "size >= 1 that divides the rows",
                                 x.shape_str(), groups.rows));
  if (ctx.parallel != nullptr) {
    if (cfg_.gating == Gating::kExpertChoice || cfg_.batch_prioritized)
      throw ConfigError(fmt::format(
          "{} with expert parallelism: capacity granted by a ranking of the whole batch is not "
          "split over ranks; expected a top-k router with choice-major capacity",
          cfg_.batch_prioritized ? "moe.batch_prioritized" : "moe.router = expert_choice"));
  }
  check_params(p, ctx.parallel != nullptr ? ctx.parallel->ep_size() : 1);
  if (cfg_.gating == Gating::kHash && (x.rank() < 1 || int64_t(token_ids.size()) != x.dim(0)))
    throw ShapeError(fmt::format("moe.router = hash: {} token ids for input {}: expected one per "
                                 "row",
                                 token_ids.size(), x.shape_str()));
  if (x.rank() != 2 || x.dim(1) != cfg_.d_model)
    throw ShapeError(fmt::format("moe input x: {}, expected [T, {}] (moe.d_model)", x.shape_str(),
                                 cfg_.d_model));
  const DType xt = x.dtype(), wt = p.w1.dtype();
  if (p.w_gate.dtype() != xt)
    throw ShapeError(fmt::format("moe.w_gate is {} but x is {}: expected the same dtype",
                                 dtype_name(p.w_gate.dtype()), dtype_name(xt)));
  ThreadScope threads(ctx.n_threads);
  if (xt == DType::kF32 && wt == DType::kF32)
    return forward_impl<float, float>(p, x, y, cache, ctx, token_ids, groups);
  if (xt == DType::kF64 && wt == DType::kF64)
    return forward_impl<double, double>(p, x, y, cache, ctx, token_ids, groups);
  if (xt == DType::kF32 && wt == DType::kBF16)
    return forward_impl<float, bf16>(p, x, y, cache, ctx, token_ids, groups);
  throw ShapeError(
      fmt::format("moe: x {} with expert weights {}: expected f32/f32, f64/f64 or "
                  "f32 x with bf16 weights",
                  dtype_name(xt), dtype_name(wt)));
}

template <class T, class W>
MoeForward MoeLayer::forward_impl(const MoeParams& p, const Tensor& x, Tensor& y, MoeCache& c,
                                  const ExecContext& ctx, std::span<const int32_t> token_ids,
                                  const RouteGroups& groups) const {
  const int64_t n_tok = x.dim(0), d = cfg_.d_model;
  const int64_t rows = groups.rows, n_grp = n_tok / rows;
  const bool grouped = rows > 1;
  const DType dt = dtype_of<T>();
  const bool prof = ctx.profile;
  const Backend& be = backend_of(ctx);
  MoeTimes& tm = c.times;
  tm = {};
  c.x.resize({n_tok, d}, dt);
  std::copy_n(x.data<T>(), x.numel(), c.x.data<T>());
  y.resize({n_tok, d}, dt);
  ConstMatrixView<T> xv = c.x.matrix<T>();
  c.group_rows = rows;
  ConstMatrixView<T> xr = xv;  // what the router sees: the rows, or each group's mean row
  if (grouped) {
    c.x_group.resize({n_grp, d}, dt);
    c.x_group.fill_zero();
    MatrixView<T> xg = c.x_group.matrix<T>();
    for (int64_t g = 0; g < n_grp; ++g)
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < d; ++i) xg(g, i) += xv(g * rows + r, i) / T(rows);
    xr = xg;
  }

  std::span<const T> bias;
  if (!p.expert_bias.empty()) bias = p.expert_bias.span<T>();
  const RouterInput in{token_ids, ctx.seed, ctx.training, ctx.parallel, &be, groups.guide};
  ConstMatrixView<T> w_noise;
  if (!p.w_noise.empty()) w_noise = p.w_noise.matrix<T>();
  timed(prof, &tm.router,
        [&] { router_.forward<T>(p.w_gate.matrix<T>(), xr, c.router, bias, in, w_noise); });
  const int64_t slots = cfg_.slots_per_token();
  const bool ranked = cfg_.batch_prioritized || cfg_.gating == Gating::kExpertChoice;
  timed(prof, &tm.plan, [&] {
    if (ctx.parallel != nullptr) return plan_parallel(c, n_tok, ctx);
    std::vector<int32_t>& group_rank = grouped ? c.group_rank : c.rank;
    if (cfg_.batch_prioritized) rank_by_priority<T>(c.router, n_grp, slots, group_rank);
    if (cfg_.gating == Gating::kExpertChoice) rank_by_probability<T>(c.router, group_rank);
    int64_t capacity = cfg_.capacity(n_grp, ctx.training);
    if (grouped) {
      expand_group_routing<T>(c, n_grp, slots, ranked);
      if (capacity > 0) capacity *= rows;
    }
    build_dispatch_plan(grouped ? c.row_expert : c.router.expert, n_tok, slots, cfg_.n_experts,
                        capacity, c.plan,
                        ranked ? std::span<const int32_t>(c.rank) : std::span<const int32_t>());
  });
  const Tensor& weight = grouped ? c.row_weight : c.router.weight;
  const int64_t n = c.plan.n_rows();
  c.xs.resize_for_overwrite({n, d}, dt);  // gather writes every row
  c.ys.resize_for_overwrite({n, d}, dt);  // the experts write every row
  timed(prof, &tm.gather, [&] { cpu::gather_rows<T>(xv, c.plan.row_token, c.xs.matrix<T>()); });
  timed(prof, &tm.experts, [&] {
    if (ctx.parallel != nullptr) return experts_forward_parallel<T, W>(p, c, ctx, be);
    experts_forward(be, p.w1.stacked<W>(), p.w3.stacked<W>(), p.w2.stacked<W>(),
                    ConstMatrixView<T>(c.xs.matrix<T>()), c.plan.offsets, c.ys.matrix<T>(),
                    c.experts);
  });
  timed(prof, &tm.combine, [&] {
    combine_rows<T>(c.ys.matrix<T>(), c.plan, weight.matrix<T>(), y.matrix<T>());
  });
  // Shared experts: every token, weight 1, added to y.
  const int64_t S = cfg_.n_shared_experts;
  c.shared.resize(size_t(S));
  timed(prof, &tm.shared, [&] {
    const std::array<int32_t, 2> all{0, int32_t(n_tok)};
    c.shared_y.resize({n_tok, d}, dt);
    for (int64_t s = 0; s < S; ++s) {
      experts_forward<T>(be, p.shared_w1.stacked<T>().one(s), p.shared_w3.stacked<T>().one(s),
                         p.shared_w2.stacked<T>().one(s), xv, all, c.shared_y.matrix<T>(),
                         c.shared[s]);
      add_into<T>(y.matrix<T>(), c.shared_y.matrix<T>());
    }
  });
  // Mean over tokens of the router's entropy -sum_e p log p, in nats.
  double h = 0;
  for (T p : c.router.probs.template span<T>())
    if (p > 0) h -= double(p) * std::log(double(p));
  RoutingStats stats = routing_stats(c.plan, n_grp > 0 ? h / double(n_grp) : 0.0);
  if (cfg_.gating == Gating::kExpertChoice) {
    // Every token offers itself to every expert; what an expert takes is its load, and a
    // token that no expert took is the one that is dropped.
    stats.demand = stats.rows;
    int64_t unserved = 0;
    for (int64_t t = 0; t < n_tok; ++t) {
      bool any = false;
      for (int64_t j = 0; j < slots; ++j) any |= c.plan.slot_row[size_t(t * slots + j)] >= 0;
      unserved += !any;
    }
    stats.dropped_fraction = n_tok > 0 ? double(unserved) / double(n_tok) : 0.0;
    const double mean = double(c.plan.n_rows()) / double(cfg_.n_experts);
    stats.load_max_over_mean =
        mean > 0 ? double(*std::max_element(stats.rows.begin(), stats.rows.end())) / mean : 0.0;
  }
  return {c.router.loss_balance, c.router.loss_z, c.router.loss_guide, std::move(stats)};
}

void MoeLayer::backward(const MoeParams& p, MoeCache& cache, const Tensor& dy, MoeParams& g,
                        Tensor& dx, const ExecContext& ctx) const {
  const int64_t ep_size = ctx.parallel != nullptr ? ctx.parallel->ep_size() : 1;
  check_params(p, ep_size);
  check_params(g, ep_size);
  expect_shape(dy, cache.x.shape(), "moe backward dy");
  const DType dt = cache.x.dtype();
  for (const Tensor* t :
       std::initializer_list<const Tensor*>{&dy, &p.w_gate, &p.w1, &g.w_gate, &g.w1})
    if (t->dtype() != dt)
      throw ShapeError(
          fmt::format("moe backward: a tensor is {} but the forward input was {}: "
                      "backward needs params, grads and dy in the input's dtype",
                      dtype_name(t->dtype()), dtype_name(dt)));
  ThreadScope threads(ctx.n_threads);
  if (dt == DType::kF32)
    backward_impl<float>(p, cache, dy, g, dx, ctx);
  else
    backward_impl<double>(p, cache, dy, g, dx, ctx);
}

template <class T>
void MoeLayer::backward_impl(const MoeParams& p, MoeCache& c, const Tensor& dy, MoeParams& g,
                             Tensor& dx, const ExecContext& ctx) const {
  const int64_t n_tok = c.x.dim(0), d = cfg_.d_model, n = c.plan.n_rows();
  const int64_t rows = c.group_rows, n_grp = n_tok / rows, slots = cfg_.slots_per_token();
  const bool grouped = rows > 1;
  const DType dt = dtype_of<T>();
  const bool prof = ctx.profile;
  const Backend& be = backend_of(ctx);
  MoeTimes& tm = c.times;
  c.dys.resize({n, d}, dt);
  c.dxs.resize({n, d}, dt);
  c.dweight.resize({n_tok, slots}, dt);
  dx.resize({n_tok, d}, dt);

  timed(prof, &tm.backward_combine, [&] {
    const Tensor& weight = grouped ? c.row_weight : c.router.weight;
    combine_rows_backward<T>(c.ys.matrix<T>(), c.plan, weight.matrix<T>(), dy.matrix<T>(),
                             c.dys.matrix<T>(), c.dweight.matrix<T>());
  });
  timed(prof, &tm.backward_experts, [&] {
    if (ctx.parallel != nullptr) return experts_backward_parallel<T>(p, c, g, ctx, be);
    experts_backward<T>(be, p.w1.stacked<T>(), p.w3.stacked<T>(), p.w2.stacked<T>(),
                        c.xs.matrix<T>(), c.plan.offsets, c.dys.matrix<T>(), c.experts,
                        g.w1.stacked<T>(), g.w3.stacked<T>(), g.w2.stacked<T>(),
                        c.dxs.matrix<T>());
  });
  // The router writes dx (=); the dispatched rows' gradients are then added onto it.
  timed(prof, &tm.backward_router, [&] {
    ConstMatrixView<T> w_noise;
    MatrixView<T> dw_noise;
    if (!p.w_noise.empty()) w_noise = p.w_noise.matrix<T>(), dw_noise = g.w_noise.matrix<T>();
    if (!grouped)
      return router_.backward<T>(p.w_gate.matrix<T>(), c.x.matrix<T>(), c.router,
                                 c.dweight.matrix<T>(), g.w_gate.matrix<T>(), dx.matrix<T>(),
                                 w_noise, dw_noise);
    // A group's weights serve all its rows: their gradients add up. The group's mean row fed the
    // router, so each row gets 1/rows of the gradient to it.
    c.dweight_group.resize({n_grp, slots}, dt);
    c.dweight_group.fill_zero();
    c.dx_group.resize({n_grp, d}, dt);
    MatrixView<T> dwg = c.dweight_group.matrix<T>();
    ConstMatrixView<T> dw = c.dweight.matrix<T>();
    for (int64_t t = 0; t < n_tok; ++t)
      for (int64_t j = 0; j < slots; ++j) dwg(t / rows, j) += dw(t, j);
    router_.backward<T>(p.w_gate.matrix<T>(), c.x_group.matrix<T>(), c.router, dwg,
                        g.w_gate.matrix<T>(), c.dx_group.matrix<T>(), w_noise, dw_noise);
    ConstMatrixView<T> dxg = c.dx_group.matrix<T>();
    MatrixView<T> dxv = dx.matrix<T>();
    for (int64_t t = 0; t < n_tok; ++t)
      for (int64_t i = 0; i < d; ++i) dxv(t, i) = dxg(t / rows, i) / T(rows);
  });
  timed(prof, &tm.backward_scatter,
        [&] { cpu::scatter_add_rows<T>(c.dxs.matrix<T>(), c.plan.row_token, {}, dx.matrix<T>()); });
  // Shared experts: their input is x itself, so their dx adds straight onto dx.
  const std::array<int32_t, 2> all{0, int32_t(n_tok)};
  for (int64_t s = 0; s < cfg_.n_shared_experts; ++s) {
    experts_backward<T>(be, p.shared_w1.stacked<T>().one(s), p.shared_w3.stacked<T>().one(s),
                        p.shared_w2.stacked<T>().one(s), c.x.matrix<T>(), all, dy.matrix<T>(),
                        c.shared[s], g.shared_w1.stacked<T>().one(s),
                        g.shared_w3.stacked<T>().one(s), g.shared_w2.stacked<T>().one(s),
                        c.shared_y.matrix<T>());
    add_into<T>(dx.matrix<T>(), c.shared_y.matrix<T>());
  }
}

void MoeLayer::update_bias(MoeParams& p, const RoutingStats& stats) const {
  const int64_t E = cfg_.n_experts;
  SY_CHECK(int64_t(stats.demand.size()) == E, "stats for {} experts, layer has {}",
           stats.demand.size(), E);
  if (p.expert_bias.empty()) p.expert_bias = Tensor({E}, p.w_gate.dtype());
  expect_shape(p.expert_bias, {E}, "moe.expert_bias");
  double mean = 0;
  for (int64_t n : stats.demand) mean += double(n);
  mean /= double(E);
  auto step = [&](auto* b) {
    for (int64_t e = 0; e < E; ++e) {
      const double load = double(stats.demand[e]);
      const double sign = load < mean ? 1.0 : (load > mean ? -1.0 : 0.0);
      b[e] += decltype(+b[e])(cfg_.bias_update_rate * sign);
    }
  };
  if (p.expert_bias.dtype() == DType::kF64)
    step(p.expert_bias.data<double>());
  else
    step(p.expert_bias.data<float>());
}

size_t MoeLayer::dispatch_bytes(const MoeCache& c) {
  return c.plan.index_bytes() + c.xs.nbytes() + c.ys.nbytes();
}

}  // namespace sy
