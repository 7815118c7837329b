// MultimodalConfig's checks and counts: config logic only, no kernels, so the config reader can
// be built alone (tests/fuzz).
#include <algorithm>
#include <cmath>

#include "switchyard/core/error.h"
#include "switchyard/nn/multimodal.h"

namespace sy {

const char* modality_name(Modality m) {
  switch (m) {
    case Modality::kImage: return "image";
    case Modality::kText: return "text";
    case Modality::kControl: return "control";
  }
  return "?";
}

void MultimodalConfig::validate() const {
  auto positive = [](const char* name, int64_t v) {
    if (v < 1) throw ConfigError(fmt::format("model.{} = {}: expected >= 1", name, v));
  };
  positive("n_layers", n_layers);
  positive("image_rows", image_rows);
  positive("image_cols", image_cols);
  positive("patch", patch);
  positive("text_context", text_context);
  positive("control_steps", control_steps);
  positive("control_features", control_features);
  positive("control_actions", control_actions);
  if (n_classes < 2) throw ConfigError(fmt::format("model.n_classes = {}: expected >= 2", n_classes));
  if (image_rows % patch != 0 || image_cols % patch != 0)
    throw ConfigError(fmt::format("model.patch = {}: expected a divisor of the image's {} x {}",
                                  patch, image_rows, image_cols));
  if (image_rows > 1024 || image_cols > 1024 || text_context > 65536 || control_steps > 65536)
    throw ConfigError("model image size, text_context or control_steps: expected at most 1024 x "
                      "1024, 65536, 65536");
  if (!(norm_eps > 0) || !std::isfinite(norm_eps))
    throw ConfigError(fmt::format("model.norm_eps = {}: expected a finite value > 0", norm_eps));
  for (const auto& [name, w] : {std::pair{"image_weight", image_weight},
                                std::pair{"text_weight", text_weight},
                                std::pair{"control_weight", control_weight}})
    if (!(w >= 0) || !std::isfinite(w))
      throw ConfigError(fmt::format("model.{} = {}: expected a finite weight >= 0", name, w));
  if (moe_every < 0) throw ConfigError(fmt::format("model.moe_every = {}: expected >= 0", moe_every));
  attention(true).validate();
  if (n_moe_layers() < n_layers) positive("d_ff", d_ff);
  if (n_moe_layers() > 0) {
    moe_config().validate();
    if (moe.gating == Gating::kHash)
      throw ConfigError("moe.router = hash: the modalities' tokens share no vocabulary to hash; "
                        "expected a learned or random router");
  }
}

int64_t MultimodalConfig::n_moe_layers() const {
  int64_t n = 0;
  for (int64_t i = 0; i < n_layers; ++i) n += is_moe(i);
  return n;
}

int64_t MultimodalConfig::seq_len(Modality m) const {
  switch (m) {
    case Modality::kImage: return n_patches();
    case Modality::kText: return text_context;
    case Modality::kControl: return control_steps;
  }
  return 0;
}

MoeConfig MultimodalConfig::moe_config() const {
  MoeConfig m = moe;
  m.d_model = d_model;
  return m;
}

AttentionConfig MultimodalConfig::attention(bool causal) const {
  return {.d_model = d_model,
          .n_heads = n_heads,
          .max_context = std::max({n_patches(), text_context, control_steps}),
          .causal = causal,
          .rope = false};
}

int64_t MultimodalConfig::block_macs_per_row() const {
  const int64_t d = d_model;
  const MoeConfig m = moe_config();
  const int64_t router = d * m.n_experts * (m.gating == Gating::kNoisyTopK ? 2 : 1);
  const double experts = m.gating == Gating::kExpertChoice
                             ? m.capacity_factor_eval * double(m.top_k)
                             : double(m.top_k);
  const int64_t moe_ffn = router + int64_t(std::llround(experts * double(3 * d * m.d_ff))) +
                          m.n_shared_experts * 3 * d * m.shared_width();
  int64_t n = 0;
  for (int64_t i = 0; i < n_layers; ++i) n += 4 * d * d + (is_moe(i) ? moe_ffn : 3 * d * d_ff);
  return n;
}

int64_t MultimodalConfig::total_params() const {
  const int64_t d = d_model;
  const MoeConfig m = moe_config();
  // The router (and its noise projection), the experts, the balancing bias, the shared experts.
  const int64_t moe_ffn = d * m.n_experts * (m.gating == Gating::kNoisyTopK ? 2 : 1) +
                          m.n_experts * 3 * d * m.d_ff + m.n_experts +
                          m.n_shared_experts * 3 * d * m.shared_width();
  int64_t n = patch_dim() * d + d + n_patches() * d + d * n_classes + n_classes;
  n += MultimodalConfig::kVocab * d + text_context * d + d * MultimodalConfig::kVocab;
  n += control_features * d + d + control_steps * d + d * control_actions + control_actions;
  n += d;
  for (int64_t i = 0; i < n_layers; ++i)
    n += 4 * d * d + 2 * d + (is_moe(i) ? moe_ffn : 3 * d * d_ff);
  return n;
}

}  // namespace sy
