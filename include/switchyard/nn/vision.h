// Vision Transformer (Dosovitskiy et al. 2021) with MoE feed-forward layers: V-MoE (Riquelme et
// al. 2021, every patch routed) and Mobile V-MoE (Daxberger et al. 2023, each image routed
// whole, optionally guided towards its super-class's expert).
//   patches = the image cut into P x P squares, each flattened (row, column, channel)
//   x = patches w_patch + b_patch (+ a class token in front) + pos      [B * L, d]
//   per block:  x += attention(rmsnorm(x));  x += ffn(rmsnorm(x))    (bidirectional, no RoPE)
//   pooled = rmsnorm(x) at the class token, or its mean over the image's rows;
//   logits = pooled w_head + b_head;  loss = mean cross-entropy against the labels
// Blocks are the language model's (nn/model.h): RMSNorm, SwiGLU experts.
//
//   VisionTransformer vit(cfg);                      // throws ConfigError
//   VitParams p = init_vit_params(cfg, DType::kF32, seed), g = zeros_like(p);
//   VitStep s = vit.forward(p, images, labels, {}, cache, ctx);   // images: [B, H*W*C]
//   vit.backward(p, cache, g, ctx);
#pragma once

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

enum class VitPooling { kMean, kClassToken };
// What one routing decision covers in the MoE blocks: a patch (V-MoE) or an image (Mobile
// V-MoE: the router sees the mean of the image's normalised rows).
enum class VitRouting { kPerToken, kPerImage };

struct VitConfig {
  int64_t image_rows = 28, image_cols = 28, channels = 1;
  int64_t patch = 4;  // P: must divide the rows and the columns
  int64_t n_classes = 10;
  int64_t d_model = 64;
  int64_t n_layers = 4;
  int64_t n_heads = 4;
  double norm_eps = 1e-5;
  VitPooling pooling = VitPooling::kMean;
  // Which blocks have an MoE feed-forward: every moe_every-th ((i + 1) % moe_every == 0) as in
  // the language model, or the last moe_last blocks (V-MoE's "last n"); one of the two, or
  // neither for a dense ViT. The others a dense SwiGLU of width d_ff.
  int64_t moe_every = 0;
  int64_t moe_last = 0;
  int64_t d_ff = 128;
  MoeConfig moe;  // moe.d_model is set from d_model
  VitRouting routing = VitRouting::kPerToken;
  Precision precision = Precision::kF32;

  void validate() const;  // throws ConfigError naming `model.<field>` or `moe.<field>`
  bool is_moe(int64_t layer) const;
  int64_t n_moe_layers() const;
  int64_t n_patches() const { return (image_rows / patch) * (image_cols / patch); }
  int64_t seq_len() const { return n_patches() + (pooling == VitPooling::kClassToken); }
  int64_t patch_dim() const { return patch * patch * channels; }
  int64_t image_dim() const { return image_rows * image_cols * channels; }
  AttentionConfig attention() const;
  MoeConfig moe_config() const;
  // Multiply-adds of one image's inference forward (patch embedding, attention's projections,
  // scores and values, the router, the k chosen experts of each MoE block, the dense blocks,
  // the head): the figure the configs' "equal inference FLOPs" is stated in (FLOPs = 2 x MACs).
  int64_t macs_per_image() const;
  int64_t total_params() const;
};

struct VitParams {
  Tensor patch_w;  // [P*P*C, d]
  Tensor patch_b;  // [d]
  Tensor cls;      // [d], class-token pooling only
  Tensor pos;      // [L, d] learned position embeddings, L = seq_len()
  std::vector<LayerParams> layers;
  Tensor norm_out;  // [d]
  Tensor head_w;    // [d, n_classes]
  Tensor head_b;    // [n_classes]

  // Every non-empty tensor with its checkpoint name ("layers.0.attn.w_qkv"), in a fixed order.
  std::vector<std::pair<std::string, Tensor*>> named();
  std::vector<std::pair<std::string, const Tensor*>> named() const;
};

VitParams init_vit_params(const VitConfig& cfg, DType dtype, uint64_t seed);
VitParams zeros_like(const VitParams& p);

struct VitCache {
  int64_t n_images = 0;
  std::vector<int32_t> labels;  // [B]
  std::vector<int32_t> guide;   // [B] or [B * L] (per-token routing) or empty
  Tensor patches;               // [B * Np, P*P*C]
  Tensor x;                     // [B * L, d] residual stream, the last block's output at the end
  std::vector<LayerCache> layers;
  Tensor h_out, rstd_out;  // [B * L, d], [B * L] final norm
  Tensor pooled;           // [B, d]
  Tensor logits;           // [B, n_classes]; backward turns it into dlogits
  Tensor dx, dh, dsub, dpooled, dtok;  // backward scratch
};

struct VitStep {
  double loss = 0;        // mean cross-entropy over the labelled images, in nats
  double aux = 0;         // the MoE layers' weighted balance, z and guidance losses
  double loss_guide = 0;  // of aux: the guidance losses alone
  int64_t n_labelled = 0;
  int64_t correct = 0;              // labelled images whose top logit is the label
  std::vector<int32_t> predicted;   // [B] the top class of each image
  std::vector<RoutingStats> routing;  // one per MoE layer, in layer order
};

class VisionTransformer {
 public:
  explicit VisionTransformer(const VitConfig& cfg);  // throws ConfigError
  const VitConfig& config() const { return cfg_; }

  // images: [B, H*W*C] (row, column, channel), in the parameters' dtype. labels: [B], -1 not
  // scored. guide: [B] or empty, each image's target expert for the MoE layers' router guidance
  // (MoeConfig::loss_guide_weight; per-token routing guides every patch of the image). Throws
  // ShapeError for a shape, label or target out of range.
  VitStep forward(const VitParams& p, const Tensor& images, std::span<const int32_t> labels,
                  std::span<const int32_t> guide, VitCache& cache, const ExecContext& ctx) const;
  // g += d(loss + aux)/dparams for the forward just before (ctx.training).
  void backward(const VitParams& p, VitCache& cache, VitParams& g, const ExecContext& ctx) const;

  void check_params(const VitParams& p) const;  // throws ShapeError naming the tensor

 private:
  template <class T>
  VitStep forward_impl(const VitParams& p, const Tensor& images, VitCache& c,
                       const ExecContext& ctx) const;
  template <class T>
  void backward_impl(const VitParams& p, VitCache& c, VitParams& g, const ExecContext& ctx) const;

  VitConfig cfg_;
  Attention attention_;
  std::optional<MoeLayer> moe_;
};

}  // namespace sy
