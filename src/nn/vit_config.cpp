// VitConfig's checks and counts: config logic only, no kernels, so the config reader can be built
// alone (tests/fuzz).
#include <cmath>

#include "switchyard/core/error.h"
#include "switchyard/nn/vision.h"

namespace sy {

void VitConfig::validate() const {
  auto positive = [](const char* name, int64_t v) {
    if (v < 1) throw ConfigError(fmt::format("model.{} = {}: expected >= 1", name, v));
  };
  positive("image_rows", image_rows);
  positive("image_cols", image_cols);
  positive("channels", channels);
  positive("patch", patch);
  positive("n_layers", n_layers);
  if (n_classes < 2) throw ConfigError(fmt::format("model.n_classes = {}: expected >= 2", n_classes));
  if (image_rows % patch != 0 || image_cols % patch != 0)
    throw ConfigError(fmt::format("model.patch = {}: expected a divisor of the image's {} x {} "
                                  "(model.image_rows, model.image_cols)",
                                  patch, image_rows, image_cols));
  if (image_rows > 4096 || image_cols > 4096 || channels > 64)
    throw ConfigError(fmt::format("model image {} x {} x {}: expected at most 4096 x 4096 x 64",
                                  image_rows, image_cols, channels));
  if (!(norm_eps > 0) || !std::isfinite(norm_eps))
    throw ConfigError(fmt::format("model.norm_eps = {}: expected a finite value > 0", norm_eps));
  if (moe_every < 0 || moe_last < 0 || moe_last > n_layers)
    throw ConfigError(fmt::format("model.moe_every = {}, model.moe_last = {}: expected >= 0, and "
                                  "moe_last <= model.n_layers = {}",
                                  moe_every, moe_last, n_layers));
  if (moe_every > 0 && moe_last > 0)
    throw ConfigError("model.moe_every and model.moe_last are both set: expected one way of "
                      "placing the MoE blocks");
  attention().validate();
  if (n_moe_layers() < n_layers) positive("d_ff", d_ff);
  if (n_moe_layers() > 0) moe_config().validate();
}

bool VitConfig::is_moe(int64_t layer) const {
  if (moe_last > 0) return layer >= n_layers - moe_last;
  return moe_every > 0 && (layer + 1) % moe_every == 0;
}

int64_t VitConfig::n_moe_layers() const {
  int64_t n = 0;
  for (int64_t i = 0; i < n_layers; ++i) n += is_moe(i);
  return n;
}

AttentionConfig VitConfig::attention() const {
  return {.d_model = d_model,
          .n_heads = n_heads,
          .max_context = seq_len(),
          .causal = false,
          .rope = false};
}

MoeConfig VitConfig::moe_config() const {
  MoeConfig m = moe;
  m.d_model = d_model;
  return m;
}

int64_t VitConfig::macs_per_image() const {
  const int64_t d = d_model, L = seq_len();
  int64_t n = n_patches() * patch_dim() * d + d * n_classes;
  const int64_t attention = L * 4 * d * d + 2 * L * L * d;
  const MoeConfig m = moe_config();
  const int64_t router = (routing == VitRouting::kPerImage ? 1 : L) * d * m.n_experts *
                         (m.gating == Gating::kNoisyTopK ? 2 : 1);
  // Expert choice: each expert takes capacity_factor * k / E of the rows on average, so a row
  // costs factor * k experts' work at evaluation.
  const double experts_per_row = m.gating == Gating::kExpertChoice
                                     ? m.capacity_factor_eval * double(m.top_k)
                                     : double(m.top_k);
  const int64_t moe_ffn =
      router + int64_t(std::llround(experts_per_row * double(L * 3 * d * m.d_ff))) +
      m.n_shared_experts * L * 3 * d * m.shared_width();
  for (int64_t i = 0; i < n_layers; ++i) n += attention + (is_moe(i) ? moe_ffn : L * 3 * d * d_ff);
  return n;
}

int64_t VitConfig::total_params() const {
  const int64_t d = d_model;
  const MoeConfig m = moe_config();
  // The router (and its noise projection), the experts, the balancing bias, the shared experts.
  const int64_t moe_ffn = d * m.n_experts * (m.gating == Gating::kNoisyTopK ? 2 : 1) +
                          m.n_experts * 3 * d * m.d_ff + m.n_experts +
                          m.n_shared_experts * 3 * d * m.shared_width();
  int64_t n = patch_dim() * d + d + seq_len() * d + (pooling == VitPooling::kClassToken) * d +
              d + d * n_classes + n_classes;
  for (int64_t i = 0; i < n_layers; ++i)
    n += 4 * d * d + 2 * d + (is_moe(i) ? moe_ffn : 3 * d * d_ff);
  return n;
}

}  // namespace sy
