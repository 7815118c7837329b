// One MoE transformer over three modalities at once: images (classified), text bytes (next byte
// predicted) and control sequences (a two-joint arm's torques predicted, train/arm.h). Each
// modality has its own input projection, learned positions and head; the blocks, their
// attention weights and their MoE layers are shared. Every step's rows, image patches first,
// then text positions, then control steps, go through each MoE layer together, so the routers
// see the three kinds of token side by side and the balance loss covers them all.
//   image:   x = patches w_patch + b_patch + pos_image        bidirectional attention
//            logits = mean over the image's rows of rmsnorm(x), times head_image_w, + b
//   text:    x = embed[byte] + pos_text                        causal attention
//            logits = rmsnorm(x) head_text  (next byte, cross-entropy)
//   control: x = features w_control + b_control + pos_control  causal attention
//            action = rmsnorm(x) head_control_w + b   (torques / tau_max, squared error)
//   loss = image_weight CE_image + text_weight CE_text + control_weight MSE_control
// (the mean squared error is over the action components).
//
//   MultimodalModel m(cfg);                        // throws ConfigError
//   MmParams p = init_mm_params(cfg, DType::kF32, seed), g = zeros_like(p);
//   MmStep s = m.forward(p, batch, cache, ctx);
//   m.backward(p, cache, g, ctx);
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "switchyard/core/exec_context.h"
#include "switchyard/core/tensor.h"
#include "switchyard/moe/moe_layer.h"
#include "switchyard/nn/attention.h"
#include "switchyard/nn/model.h"

namespace sy {

enum class Modality { kImage = 0, kText = 1, kControl = 2 };
inline constexpr int64_t kModalities = 3;
const char* modality_name(Modality m);  // "image", "text", "control"

struct MultimodalConfig {
  static constexpr int64_t kVocab = 256;  // text is bytes
  int64_t d_model = 64;
  int64_t n_layers = 4;
  int64_t n_heads = 4;
  double norm_eps = 1e-5;
  int64_t moe_every = 1;  // as LmConfig::moe_every; 0: the dense twin
  int64_t d_ff = 128;     // the dense blocks' SwiGLU width
  MoeConfig moe;          // moe.d_model is set from d_model
  Precision precision = Precision::kF32;
  // Images: rows x cols, one channel, cut into patch x patch squares, n_classes labels.
  int64_t image_rows = 28, image_cols = 28, patch = 4, n_classes = 10;
  int64_t text_context = 64;  // bytes per text sequence
  int64_t control_steps = 40, control_features = 10, control_actions = 2;
  double image_weight = 1.0, text_weight = 1.0, control_weight = 1.0;

  void validate() const;  // throws ConfigError naming `model.<field>` or `moe.<field>`
  bool is_moe(int64_t layer) const { return moe_every > 0 && (layer + 1) % moe_every == 0; }
  int64_t n_moe_layers() const;
  int64_t n_patches() const { return (image_rows / patch) * (image_cols / patch); }
  int64_t patch_dim() const { return patch * patch; }
  int64_t image_dim() const { return image_rows * image_cols; }
  // Rows one example of each modality puts through the blocks.
  int64_t seq_len(Modality m) const;
  MoeConfig moe_config() const;
  AttentionConfig attention(bool causal) const;
  // Multiply-adds per row in the blocks (projections, the router and the k chosen experts, or the
  // dense SwiGLU; attention scores excluded, being the same for a model and its dense twin): the
  // figure "equal active FLOPs" compares.
  int64_t block_macs_per_row() const;
  int64_t total_params() const;
};

struct MmParams {
  Tensor patch_w, patch_b, pos_image, head_image_w, head_image_b;         // [P*P, d] [d] [Np, d] [d, K] [K]
  Tensor embed, pos_text, head_text;                                       // [256, d] [Lt, d] [d, 256]
  Tensor control_w, control_b, pos_control, head_control_w, head_control_b;  // [F, d] [d] [Lc, d] [d, A] [A]
  std::vector<LayerParams> layers;
  Tensor norm_out;  // [d]

  // Every non-empty tensor with its checkpoint name, in a fixed order.
  std::vector<std::pair<std::string, Tensor*>> named();
  std::vector<std::pair<std::string, const Tensor*>> named() const;
};

MmParams init_mm_params(const MultimodalConfig& cfg, DType dtype, uint64_t seed);
MmParams zeros_like(const MmParams& p);

// One step's examples of each modality; any of the three may be empty.
struct MmBatch {
  Tensor images;                          // [Bi, rows * cols]
  std::vector<int32_t> labels;            // [Bi], -1 not scored
  std::vector<int32_t> text, text_targets;  // [Bt * Lt]; a target < 0 is not scored
  Tensor control, control_targets;        // [Bc * Lc, F], [Bc * Lc, A]
  int64_t n_images() const { return images.empty() ? 0 : images.dim(0); }
};

struct MmCache {
  std::array<int64_t, kModalities> n_seq{}, row0{};  // per modality: sequences, first row
  int64_t n_rows = 0;
  std::vector<int32_t> labels, text, text_targets;
  Tensor patches;   // [Bi * Np, P*P]
  Tensor control;   // [Bc * Lc, F]
  Tensor control_targets;
  Tensor x;         // [rows, d] residual stream
  std::vector<LayerCache> layers;
  Tensor h_out, rstd_out;   // final norm
  Tensor pooled;            // [Bi, d]
  Tensor image_logits;      // [Bi, K]; backward's dlogits after forward
  Tensor text_logits;       // [Bt * Lt, 256]; likewise
  Tensor control_out;       // [Bc * Lc, A]; backward's d loss / d action after forward
  Tensor dx, dh, dsub, dtmp;  // backward scratch
};

struct MmStep {
  std::array<double, kModalities> loss{};    // image and text: mean cross-entropy (nats); control: MSE
  std::array<int64_t, kModalities> count{};  // scored images, text targets, control steps
  int64_t image_correct = 0;
  double total = 0;  // the weighted sum of the three losses
  double aux = 0;    // the MoE layers' weighted auxiliary losses
  std::vector<RoutingStats> routing;  // one per MoE layer
};

class MultimodalModel {
 public:
  explicit MultimodalModel(const MultimodalConfig& cfg);  // throws ConfigError
  const MultimodalConfig& config() const { return cfg_; }

  // Throws ShapeError for a shape, label, byte or target out of range.
  MmStep forward(const MmParams& p, const MmBatch& batch, MmCache& cache,
                 const ExecContext& ctx) const;
  // g += d(total + aux)/dparams for the forward just before (ctx.training).
  void backward(const MmParams& p, MmCache& cache, MmParams& g, const ExecContext& ctx) const;
  void check_params(const MmParams& p) const;  // throws ShapeError naming the tensor

  // The modality of row r of the last forward's blocks.
  static Modality row_modality(const MmCache& c, int64_t r);

 private:
  template <class T>
  MmStep forward_impl(const MmParams& p, const MmBatch& b, MmCache& c, const ExecContext& ctx) const;
  template <class T>
  void backward_impl(const MmParams& p, MmCache& c, MmParams& g, const ExecContext& ctx) const;

  MultimodalConfig cfg_;
  Attention bidirectional_, causal_;
  std::optional<MoeLayer> moe_;
};

}  // namespace sy
