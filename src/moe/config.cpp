// MoeConfig validation and the capacity rule.
#include "switchyard/moe/config.h"

#include <cmath>
#include <string_view>

#include "switchyard/core/error.h"

namespace sy {

void MoeConfig::validate() const {
  auto positive = [](const char* name, int64_t v) {
    if (v < 1) throw ConfigError(fmt::format("moe.{} = {}: expected >= 1", name, v));
  };
  positive("d_model", d_model);
  positive("d_ff", d_ff);
  positive("n_experts", n_experts);
  if (top_k < 1 || top_k > n_experts)
    throw ConfigError(
        fmt::format("moe.top_k = {}: expected 1..{} (moe.n_experts)", top_k, n_experts));
  if (!dropless) {
    auto factor = [](const char* name, double v) {
      if (!(v > 0) || !std::isfinite(v))
        throw ConfigError(fmt::format(
            "moe.{} = {}: expected a finite value > 0 (or set moe.dropless = true)", name, v));
    };
    factor("capacity_factor_train", capacity_factor_train);
    factor("capacity_factor_eval", capacity_factor_eval);
  }
  auto weight = [](const char* name, double v) {
    if (!(v >= 0) || !std::isfinite(v))
      throw ConfigError(fmt::format("moe.{} = {}: expected a finite value >= 0", name, v));
  };
  weight("loss_balance_weight", loss_balance_weight);
  weight("loss_z_weight", loss_z_weight);
  weight("loss_importance_weight", loss_importance_weight);
  weight("loss_load_weight", loss_load_weight);
  weight("loss_guide_weight", loss_guide_weight);
  weight("bias_update_rate", bias_update_rate);
  if (!(jitter_eps >= 0 && jitter_eps < 1))
    throw ConfigError(fmt::format("moe.jitter_eps = {}: expected in [0, 1)", jitter_eps));
  if (n_groups != 0) {
    if (n_groups < 1 || n_experts % n_groups != 0)
      throw ConfigError(fmt::format("moe.n_groups = {}: expected a divisor of moe.n_experts = {} "
                                    "(0: no groups)",
                                    n_groups, n_experts));
    if (topk_groups < 1 || topk_groups > n_groups)
      throw ConfigError(
          fmt::format("moe.topk_groups = {}: expected 1..{} (moe.n_groups)", topk_groups, n_groups));
    if (top_k > topk_groups * (n_experts / n_groups))
      throw ConfigError(fmt::format(
          "moe.top_k = {}: more than the {} experts in moe.topk_groups = {} groups of {}", top_k,
          topk_groups * (n_experts / n_groups), topk_groups, n_experts / n_groups));
    if (gating != Gating::kSoftmaxTopK && gating != Gating::kSigmoidBias)
      throw ConfigError("moe.n_groups: group-limited routing needs softmax_topk or sigmoid_bias");
  }
  if (gating == Gating::kExpertChoice && (dropless || batch_prioritized))
    throw ConfigError("moe.router = expert_choice: its capacity is the choice itself; expected "
                      "moe.dropless = false and moe.batch_prioritized = false");
  if (n_shared_experts < 0)
    throw ConfigError(fmt::format("moe.n_shared_experts = {}: expected >= 0", n_shared_experts));
  if (d_ff_shared < 0)
    throw ConfigError(
        fmt::format("moe.d_ff_shared = {}: expected >= 0 (0: moe.d_ff)", d_ff_shared));
}

void MoeConfig::check_trainable(bool guided) const {
  if (top_k != 1 || guided) return;
  const std::string_view fix =
      "so the task loss gives the router no gradient and it would learn from the auxiliary "
      "losses alone; expected";
  const std::string_view guide = "or a guidance target (moe.loss_guide_weight > 0 with "
                                 "super-classes)";
  if ((gating == Gating::kSoftmaxTopK || gating == Gating::kSigmoidBias) && renormalize)
    throw ConfigError(fmt::format(
        "moe.top_k = 1 with moe.renormalize = true: the one chosen weight is renormalised to 1, "
        "{} moe.renormalize = false (Switch Transformer's top-1), moe.top_k >= 2, {}", fix, guide));
  if (gating == Gating::kNoisyTopK)
    throw ConfigError(fmt::format(
        "moe.router = noisy_topk with moe.top_k = 1: the softmax over one chosen logit is 1, {} "
        "moe.top_k >= 2, softmax_topk with moe.renormalize = false, {}", fix, guide));
}

int64_t MoeConfig::capacity(int64_t n_tokens, bool training) const {
  if (dropless) return -1;
  const double factor = training ? capacity_factor_train : capacity_factor_eval;
  return int64_t(std::ceil(factor * double(n_tokens * top_k) / double(n_experts)));
}

}  // namespace sy
