// The vision transformer: float64 gradchecks of every parameter (patch embedding, positions,
// class token or mean pooling, dense and MoE blocks routed per patch or per image, the router
// guidance loss), patch order against a direct reading of the image, per-image routing's
// decision shared by an image's rows, independence of the images of a batch, the FLOP count,
// and named errors.
#include "switchyard/nn/vision.h"

#include <gtest/gtest.h>

#include <cmath>

#include "testing/testing.h"

namespace sy {
namespace {

using testing::expect_grad_close;
using testing::random_tensor;

VitConfig tiny_vit(VitPooling pooling, VitRouting routing, int64_t moe_every) {
  VitConfig cfg;
  cfg.image_rows = 6;
  cfg.image_cols = 4;
  cfg.channels = 2;
  cfg.patch = 2;  // 3 x 2 = 6 patches of 8 values
  cfg.n_classes = 3;
  cfg.d_model = 8;
  cfg.n_layers = 2;
  cfg.n_heads = 2;
  cfg.pooling = pooling;
  cfg.moe_every = moe_every;
  cfg.d_ff = 7;
  cfg.routing = routing;
  cfg.moe.n_experts = 3;
  cfg.moe.top_k = 2;
  cfg.moe.d_ff = 5;
  cfg.moe.capacity_factor_train = 1.0;
  cfg.moe.loss_balance_weight = 0.1;
  cfg.moe.loss_z_weight = 0.01;
  cfg.moe.loss_guide_weight = 0.3;
  return cfg;
}

// Random values everywhere, so that no gradient is checked at a point where it vanishes (the
// initial biases are zero).
VitParams random_params(const VitConfig& cfg) {
  VitParams p = init_vit_params(cfg, DType::kF64, 3);
  testing::perturb(p.named());
  return p;
}

void gradcheck_vit(const VitConfig& cfg, bool guided) {
  VisionTransformer vit(cfg);
  VitParams p = random_params(cfg);
  VitParams g = zeros_like(p);
  const int64_t B = 3;
  Tensor images = random_tensor({B, cfg.image_dim()}, DType::kF64, 7);
  const std::vector<int32_t> labels = {2, -1, 0};
  std::vector<int32_t> guide;
  if (guided) guide = {1, 0, 2};
  VitCache cache;
  const ExecContext ctx;
  auto loss = [&] {
    VitStep s = vit.forward(p, images, labels, guide, cache, ctx);
    return s.loss + s.aux;
  };
  const double at = loss();
  EXPECT_TRUE(std::isfinite(at));
  vit.backward(p, cache, g, ctx);
  testing::expect_named_grads_close(loss, p.named(), g.named());
}

TEST(VitGradcheck, DenseWithClassToken) {
  gradcheck_vit(tiny_vit(VitPooling::kClassToken, VitRouting::kPerToken, 0), false);
}
TEST(VitGradcheck, PerTokenMoeMeanPooled) {
  gradcheck_vit(tiny_vit(VitPooling::kMean, VitRouting::kPerToken, 2), false);
}
TEST(VitGradcheck, PerTokenMoeBatchPrioritizedAndGuided) {
  VitConfig cfg = tiny_vit(VitPooling::kMean, VitRouting::kPerToken, 1);
  cfg.moe.batch_prioritized = true;
  gradcheck_vit(cfg, true);
}
TEST(VitGradcheck, PerImageMoeWithClassToken) {
  gradcheck_vit(tiny_vit(VitPooling::kClassToken, VitRouting::kPerImage, 1), false);
}
TEST(VitGradcheck, PerImageMoeGuided) {
  VitConfig cfg = tiny_vit(VitPooling::kMean, VitRouting::kPerImage, 0);
  cfg.moe_last = 1;
  cfg.moe.top_k = 1;
  gradcheck_vit(cfg, true);
}

TEST(VisionTransformer, PatchesAreTheImagesSquaresInRasterOrder) {
  // With one channel, identity-like patch weights and no blocks' effect on the check: the
  // gradient of patch_w is patches^T dtok, so instead compare the cached patches directly.
  VitConfig cfg = tiny_vit(VitPooling::kMean, VitRouting::kPerToken, 0);
  VisionTransformer vit(cfg);
  VitParams p = init_vit_params(cfg, DType::kF64, 1);
  Tensor images = random_tensor({2, cfg.image_dim()}, DType::kF64, 2);
  VitCache cache;
  const std::vector<int32_t> labels = {0, 1};
  vit.forward(p, images, labels, {}, cache, ExecContext{.training = false});
  const int64_t P = cfg.patch, C = cfg.channels, W = cfg.image_cols, per_row = W / P;
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t q = 0; q < cfg.n_patches(); ++q)
      for (int64_t i = 0; i < P; ++i)
        for (int64_t j = 0; j < P; ++j)
          for (int64_t ch = 0; ch < C; ++ch) {
            const int64_t r = (q / per_row) * P + i, col = (q % per_row) * P + j;
            EXPECT_EQ(cache.patches.matrix<double>()(b * cfg.n_patches() + q, (i * P + j) * C + ch),
                      images.matrix<double>()(b, (r * W + col) * C + ch));
          }
}

TEST(VisionTransformer, PerImageRoutingSendsAllOfAnImagesRowsAlike) {
  VitConfig cfg = tiny_vit(VitPooling::kMean, VitRouting::kPerImage, 1);
  cfg.moe.dropless = true;
  VisionTransformer vit(cfg);
  VitParams p = random_params(cfg);
  const int64_t B = 4, L = cfg.seq_len(), k = cfg.moe.top_k;
  Tensor images = random_tensor({B, cfg.image_dim()}, DType::kF64, 9);
  const std::vector<int32_t> labels = {0, 1, 2, 0};
  VitCache cache;
  vit.forward(p, images, labels, {}, cache, ExecContext{.training = false});
  for (const LayerCache& lc : cache.layers) {
    ASSERT_EQ(int64_t(lc.moe.router.expert.size()), B * k) << "one decision per image";
    for (int64_t t = 0; t < B * L; ++t)
      for (int64_t j = 0; j < k; ++j)
        EXPECT_EQ(lc.moe.row_expert[size_t(t * k + j)], lc.moe.router.expert[size_t(t / L * k + j)]);
  }
}

TEST(VisionTransformer, ImagesOfABatchAreIndependentWithoutDropping) {
  for (VitRouting routing : {VitRouting::kPerToken, VitRouting::kPerImage}) {
    VitConfig cfg = tiny_vit(VitPooling::kClassToken, routing, 1);
    cfg.moe.dropless = true;
    VisionTransformer vit(cfg);
    VitParams p = random_params(cfg);
    Tensor images = random_tensor({3, cfg.image_dim()}, DType::kF64, 4);
    const std::vector<int32_t> labels = {1, 2, 0};
    VitCache cache;
    const ExecContext eval{.training = false};
    vit.forward(p, images, labels, {}, cache, eval);
    const Tensor all = cache.logits.clone();
    for (int64_t b = 0; b < 3; ++b) {
      Tensor one({1, cfg.image_dim()}, DType::kF64);
      std::copy_n(images.matrix<double>().row(b), cfg.image_dim(), one.data<double>());
      const std::vector<int32_t> label = {labels[b]};
      vit.forward(p, one, label, {}, cache, eval);
      for (int64_t k = 0; k < cfg.n_classes; ++k)
        EXPECT_NEAR(cache.logits.data<double>()[k], all.matrix<double>()(b, k), 1e-12);
    }
  }
}

TEST(VitConfig, FlopsCountTheChosenExpertsOnly) {
  VitConfig dense = tiny_vit(VitPooling::kMean, VitRouting::kPerToken, 0);
  dense.d_ff = 10;
  VitConfig moe = dense;
  moe.moe_every = 1;
  moe.moe.top_k = 2;
  moe.moe.d_ff = 5;  // k * f = the dense width
  const int64_t d = dense.d_model, L = dense.seq_len(), E = moe.moe.n_experts;
  EXPECT_EQ(moe.macs_per_image() - dense.macs_per_image(), dense.n_layers * L * d * E);
  VitConfig per_image = moe;
  per_image.routing = VitRouting::kPerImage;
  EXPECT_EQ(per_image.macs_per_image() - dense.macs_per_image(), dense.n_layers * d * E);
  const int64_t per_block = L * 4 * d * d + 2 * L * L * d + L * 3 * d * 10;
  EXPECT_EQ(dense.macs_per_image(),
            dense.n_patches() * dense.patch_dim() * d + d * dense.n_classes + 2 * per_block);
}

TEST(VisionTransformer, BadInputNamesWhatWasExpected) {
  VitConfig cfg = tiny_vit(VitPooling::kMean, VitRouting::kPerImage, 1);
  VisionTransformer vit(cfg);
  VitParams p = init_vit_params(cfg, DType::kF64, 1);
  VitCache cache;
  const ExecContext ctx;
  Tensor images = random_tensor({2, cfg.image_dim()}, DType::kF64, 1);
  Tensor wrong = random_tensor({2, cfg.image_dim() + 1}, DType::kF64, 1);
  const std::vector<int32_t> labels = {0, 1}, bad_label = {0, 3}, one_label = {0};
  EXPECT_THROW(vit.forward(p, wrong, labels, {}, cache, ctx), ShapeError);
  EXPECT_THROW(vit.forward(p, images, bad_label, {}, cache, ctx), ShapeError);
  EXPECT_THROW(vit.forward(p, images, one_label, {}, cache, ctx), ShapeError);
  const std::vector<int32_t> bad_guide = {0, 5};
  EXPECT_THROW(vit.forward(p, images, labels, bad_guide, cache, ctx), ShapeError);
  Tensor f32 = convert(images, DType::kF32);
  EXPECT_THROW(vit.forward(p, f32, labels, {}, cache, ctx), ShapeError);

  VitConfig odd = cfg;
  odd.patch = 4;  // does not divide 6 rows
  EXPECT_THROW(VisionTransformer{odd}, ConfigError);
  VitConfig both = cfg;
  both.moe_last = 1;
  EXPECT_THROW(VisionTransformer{both}, ConfigError);
  VitConfig hashed = cfg;
  hashed.moe.gating = Gating::kHash;
  EXPECT_THROW(VisionTransformer{hashed}, ConfigError);
}

}  // namespace
}  // namespace sy
