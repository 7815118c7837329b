// The sparse MoE layer: router -> dispatch plan -> gather -> SwiGLU experts -> weighted combine.
// Backward runs the same path in reverse with the plan kept from forward; the auxiliary
// losses' gradients are included, so the caller adds forward's loss_balance + loss_z to its
// loss and passes only dL/dy.
//
//   MoeConfig cfg{.d_model = 512, .d_ff = 1024, .n_experts = 8, .top_k = 2};
//   MoeLayer layer(cfg);                               // throws ConfigError
//   MoeParams p = init_moe_params(cfg, DType::kF32, /*seed=*/1);
//   MoeParams g = zeros_like(p);
//   MoeCache cache;
//   MoeForward out = layer.forward(p, x, y, cache, ctx);   // x, y: [T, d]
//   layer.backward(p, cache, dy, g, dx, ctx);              // g += ..., dx = ...
//
// dtypes: x, y and params all f32, or all f64 (for gradient checks). Forward also takes bf16
// expert weights with f32 x (inference; memory-bound decode reads half the bytes).
//
// Expert parallelism (ctx.parallel set, core/parallel.h): each rank passes its own tokens and
// holds w1/w3/w2 of its E / P experts only; every rank of the group must call forward and
// backward together. Results equal one process running all ranks' tokens, rank after rank.
// Gradients: each rank's dy is of its own tokens' loss; every gradient comes out for averaging
// over world ranks (the balance loss's share included).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "switchyard/core/exec_context.h"
#include "switchyard/core/tensor.h"
#include "switchyard/moe/config.h"
#include "switchyard/moe/dispatch_plan.h"
#include "switchyard/moe/experts.h"
#include "switchyard/moe/router.h"

namespace sy {

struct MoeParams {
  Tensor w_gate;  // [d, E]
  Tensor w1;      // [E, d, f]  gate projection
  Tensor w3;      // [E, d, f]  up projection
  Tensor w2;      // [E, f, d]  down projection
  // [E] or empty (zero): Gating::kSigmoidBias's balancing bias. Not trained by gradients (its
  // gradient stays zero); MoeLayer::update_bias moves it.
  Tensor expert_bias;
  // Shared experts, empty when cfg.n_shared_experts is 0. S = n_shared_experts, g = shared width.
  Tensor shared_w1;  // [S, d, g]
  Tensor shared_w3;  // [S, d, g]
  Tensor shared_w2;  // [S, g, d]
  // [d, E] with Gating::kNoisyTopK (the noise scale's projection), empty otherwise.
  Tensor w_noise;
};

// Router weights ~ N(0, 1/d); expert weights ~ N(0, 1/fan_in); w_noise zero, as Shazeer et al.
// start it (noise of scale softplus(0) = 0.69). Deterministic in seed.
MoeParams init_moe_params(const MoeConfig& cfg, DType dtype, uint64_t seed);
MoeParams zeros_like(const MoeParams& p);

struct RoutingStats {
  std::vector<int64_t> demand;    // [E]: slots that chose each expert
  std::vector<int64_t> rows;      // [E]: slots each expert computed (after capacity)
  int64_t capacity = -1;          // -1: dropless
  double dropped_fraction = 0;    // dropped slots / (T * k)
  double router_entropy = 0;      // mean over tokens of -sum_e p log p, in nats
  double load_max_over_mean = 0;  // max_e demand / mean_e demand; 1 is perfect balance
};

// Statistics of one routing: loads from the plan, the router's mean entropy given.
RoutingStats routing_stats(const DispatchPlan& plan, double router_entropy);

// Wall seconds of each phase of the last forward/backward, when ExecContext::profile is set.
struct MoeTimes {
  double router = 0, plan = 0, gather = 0, experts = 0, combine = 0, shared = 0;
  double backward_combine = 0, backward_experts = 0, backward_scatter = 0, backward_router = 0;
  // Expert parallelism: seconds in all-to-alls (forward: counts, rows out and back; backward:
  // gradients out and back), recorded whether or not profiling.
  double exchange = 0, backward_exchange = 0;
  // Of those, with profiling on: the seconds spent waiting for the group's slowest rank to
  // reach each row exchange (measured by a one-value all-reduce just before it), so that
  // exchange minus wait is the transfer itself.
  double exchange_wait = 0;
};

// Expert parallelism's state between forward and backward (ExecContext::parallel set). This
// rank owns experts [r El, (r+1) El), El = E / P; rows arrive grouped by source rank and are
// regrouped by local expert for the grouped GEMMs. Overlapped (ExecContext::exchange_overlap),
// they stay as they arrived, source-major, each (source, local expert) a piece of its own.
struct ExpertParallelCache {
  std::vector<int64_t> counts, recv_counts, kept;  // exchanged per-expert row counts
  std::vector<int64_t> send_rows, recv_rows;       // [P]: rows to / from each ep rank
  std::vector<int32_t> offsets;                    // [El+1]: the local experts' rows in xe
  std::vector<int32_t> by_expert;    // [m]: row of the source-major buffer for each row of xe
  std::vector<int32_t> by_source;    // [m]: its inverse
  Tensor buf;                        // [m, d]: rows as received / as sent back
  Tensor xe, ye, dxe;                // [m, d]: the local experts' rows, expert-major
  bool overlapped = false;           // forward overlapped the exchange: backward does too
  std::vector<ExpertsCache> pieces;  // overlapped: [P][El], a source's rows for a local expert
  int64_t values_sent = 0;           // forward: activation values this rank sent to other ranks
  int64_t rows_computed = 0;         // rows this rank's experts computed, from every source
};

// Routing by groups of consecutive rows (Mobile V-MoE's per-image routing, Daxberger et al.
// 2023): the router sees each group's mean row and decides once for the group; every row of the
// group goes to the group's experts with the group's weights. Capacity counts groups, C =
// capacity(T / rows) groups per expert, so a group is kept or dropped whole, and batch
// prioritized routing and expert choice rank groups. rows = 1 is per-row routing.
struct RouteGroups {
  int64_t rows = 1;  // rows per group; must divide T
  // [T / rows] or empty: each group's target expert for the guidance loss
  // (MoeConfig::loss_guide_weight, super-class routing); -1: not scored.
  std::span<const int32_t> guide;
};

struct MoeCache {
  Tensor x;  // [T, d] copy of the input (router backward needs it)
  RouterCache router;  // of the groups' mean rows when routing by groups
  // Routing by groups (group_rows > 1): the router's input, and its choice repeated per row.
  int64_t group_rows = 1;
  Tensor x_group, dx_group;           // [T / rows, d]
  std::vector<int32_t> row_expert;    // [T * k]
  Tensor row_weight, dweight_group;   // [T, k], [T / rows, k]
  std::vector<int32_t> group_rank;    // [T / rows * k]
  DispatchPlan plan;
  std::vector<int32_t> rank;  // [T*k]: slot order for capacity (batch prioritized, expert choice)
  Tensor xs, ys;              // [n, d]: dispatched rows and expert outputs
  ExpertsCache experts;
  std::vector<ExpertsCache> shared;  // one per shared expert
  Tensor shared_y;                   // [T, d]: one shared expert's output, or its dx
  Tensor dys, dxs, dweight;          // backward's scratch: [n, d], [n, d], [T, k]
  ExpertParallelCache ep;
  MoeTimes times;
};

struct MoeForward {
  double loss_balance = 0;  // weighted auxiliary losses, to add to the training loss
  double loss_z = 0;
  double loss_guide = 0;  // weighted; 0 without guidance
  RoutingStats stats;
};

class MoeLayer {
 public:
  explicit MoeLayer(const MoeConfig& cfg);  // throws ConfigError
  const MoeConfig& config() const { return cfg_; }

  // x: [T, d] -> y: [T, d] (=). Throws ShapeError for a shape or dtype that does not fit.
  // token_ids: [T], needed by hash routing only. ctx.seed drives random routing and jitter
  // (callers vary it per step); ctx.training selects the capacity factor and the jitter.
  // groups: route groups of rows together (per-image routing); not with expert parallelism or
  // hash routing.
  MoeForward forward(const MoeParams& p, const Tensor& x, Tensor& y, MoeCache& cache,
                     const ExecContext& ctx, std::span<const int32_t> token_ids = {},
                     const RouteGroups& groups = {}) const;
  // dy: [T, d] -> dx: [T, d] (=), g (+=). Needs the cache of the forward call just before.
  void backward(const MoeParams& p, MoeCache& cache, const Tensor& dy, MoeParams& g, Tensor& dx,
                const ExecContext& ctx) const;

  // Auxiliary-loss-free balancing (Gating::kSigmoidBias): after a step whose routing gave
  // `stats`, b_e += cfg.bias_update_rate * sign(mean load - load_e), so overloaded experts are
  // chosen less often. Allocates p.expert_bias (zeros) if it is empty.
  void update_bias(MoeParams& p, const RoutingStats& stats) const;

  // Extra memory for dispatch in a cache after forward: the plan's indices plus the dispatched
  // rows xs and ys, i.e. O(T k d); no [T, E, C] tensor exists.
  static size_t dispatch_bytes(const MoeCache& cache);

  // Throws ShapeError naming the tensor. With ep_size > 1, w1, w3 and w2 hold this rank's
  // n_experts / ep_size experts.
  void check_params(const MoeParams& p, int64_t ep_size = 1) const;

 private:
  template <class T, class W>
  MoeForward forward_impl(const MoeParams& p, const Tensor& x, Tensor& y, MoeCache& c,
                          const ExecContext& ctx, std::span<const int32_t> token_ids,
                          const RouteGroups& groups) const;
  template <class T>
  void backward_impl(const MoeParams& p, MoeCache& c, const Tensor& dy, MoeParams& g, Tensor& dx,
                     const ExecContext& ctx) const;

  // Expert parallelism (src/moe/expert_parallel.cpp): the plan with capacity granted over every
  // rank's tokens, rows to their experts' owners and back, and the same in reverse.
  void plan_parallel(MoeCache& c, int64_t n_tok, const ExecContext& ctx) const;
  template <class T, class W>
  void experts_forward_parallel(const MoeParams& p, MoeCache& c, const ExecContext& ctx,
                                const Backend& be) const;
  template <class T>
  void experts_backward_parallel(const MoeParams& p, MoeCache& c, MoeParams& grads,
                                 const ExecContext& ctx, const Backend& be) const;

  MoeConfig cfg_;
  Router router_;
};

}  // namespace sy
