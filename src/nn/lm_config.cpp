// LmConfig's and AttentionConfig's checks and counts: config logic only, no kernels, so the config reader can be
// built alone (tests/fuzz).
#include <cmath>

#include "switchyard/core/error.h"
#include "switchyard/nn/model.h"

namespace sy {

void AttentionConfig::validate() const {
  if (d_model < 1) throw ConfigError(fmt::format("model.d_model = {}: expected >= 1", d_model));
  if (n_heads < 1 || d_model % n_heads != 0)
    throw ConfigError(fmt::format("model.n_heads = {}: expected a divisor of model.d_model = {}",
                                  n_heads, d_model));
  if ((d_model / n_heads) % 2 != 0)
    throw ConfigError(fmt::format(
        "model.n_heads = {}: head width d_model / n_heads = {} must be even for RoPE", n_heads,
        d_model / n_heads));
  if (max_context < 1)
    throw ConfigError(fmt::format("model.context = {}: expected >= 1", max_context));
  if (!(rope_theta > 1) || !std::isfinite(rope_theta))
    throw ConfigError(fmt::format("model.rope_theta = {}: expected a finite value > 1", rope_theta));
}

void LmConfig::validate() const {
  auto positive = [](const char* name, int64_t v) {
    if (v < 1) throw ConfigError(fmt::format("model.{} = {}: expected >= 1", name, v));
  };
  positive("vocab", vocab);
  positive("context", context);
  positive("n_layers", n_layers);
  if (vocab > (int64_t(1) << 31))
    throw ConfigError(fmt::format("model.vocab = {}: expected < 2^31", vocab));
  if (!(norm_eps > 0) || !std::isfinite(norm_eps))
    throw ConfigError(fmt::format("model.norm_eps = {}: expected a finite value > 0", norm_eps));
  if (moe_every < 0)
    throw ConfigError(fmt::format("model.moe_every = {}: expected >= 0 (0: dense)", moe_every));
  attention().validate();
  if (n_moe_layers() < n_layers) positive("d_ff", d_ff);
  if (n_moe_layers() > 0) moe_config().validate();
}

AttentionConfig LmConfig::attention() const {
  return {.d_model = d_model, .n_heads = n_heads, .max_context = context, .rope_theta = rope_theta};
}

MoeConfig LmConfig::moe_config() const {
  MoeConfig m = moe;
  m.d_model = d_model;
  return m;
}

int64_t LmConfig::n_moe_layers() const {
  int64_t n = 0;
  for (int64_t i = 0; i < n_layers; ++i) n += is_moe(i);
  return n;
}

int64_t LmConfig::router_params() const {
  return d_model * moe.n_experts * (moe.gating == Gating::kNoisyTopK ? 2 : 1);
}

int64_t LmConfig::active_params() const {
  const int64_t d = d_model;
  const int64_t moe_ffn = router_params() + moe.top_k * 3 * d * moe.d_ff +
                          moe.n_shared_experts * 3 * d * moe.shared_width();
  int64_t n = d * vocab;  // LM head
  for (int64_t i = 0; i < n_layers; ++i) n += 4 * d * d + (is_moe(i) ? moe_ffn : 3 * d * d_ff);
  return n;
}

int64_t LmConfig::total_params() const {
  const int64_t d = d_model;
  const int64_t moe_ffn = router_params() + moe.n_experts * 3 * d * moe.d_ff +
                          moe.n_shared_experts * 3 * d * moe.shared_width();
  int64_t n = 2 * d * vocab + d;
  for (int64_t i = 0; i < n_layers; ++i)
    n += 4 * d * d + 2 * d + (is_moe(i) ? moe_ffn : 3 * d * d_ff);
  return n;
}

int64_t LmConfig::attention_macs_per_token() const { return n_layers * 2 * context * d_model; }

}  // namespace sy
