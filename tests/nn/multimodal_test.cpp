// The multimodal model: float64 gradchecks of every parameter with the three modalities in one
// batch (dense, and MoE layers shared by them), each modality's result unchanged by the others'
// presence when nothing is dropped, attention causal for text and control but not for images,
// and named errors for bad batches.
#include "switchyard/nn/multimodal.h"

#include <gtest/gtest.h>

#include <cmath>

#include "testing/testing.h"

namespace sy {
namespace {

using testing::random_tensor;

MultimodalConfig tiny(int64_t moe_every) {
  MultimodalConfig cfg;
  cfg.d_model = 8;
  cfg.n_layers = 2;
  cfg.n_heads = 2;
  cfg.moe_every = moe_every;
  cfg.d_ff = 7;
  cfg.image_rows = 6;
  cfg.image_cols = 4;
  cfg.patch = 2;  // 6 patches of 4 pixels
  cfg.n_classes = 3;
  cfg.text_context = 5;
  cfg.control_steps = 3;
  cfg.control_features = 4;
  cfg.control_actions = 2;
  cfg.image_weight = 0.7;
  cfg.text_weight = 1.1;
  cfg.control_weight = 1.3;
  cfg.moe.n_experts = 3;
  cfg.moe.top_k = 2;
  cfg.moe.d_ff = 5;
  cfg.moe.capacity_factor_train = 1.0;
  cfg.moe.loss_balance_weight = 0.1;
  cfg.moe.loss_z_weight = 0.01;
  return cfg;
}

MmParams random_params(const MultimodalConfig& cfg) {
  MmParams p = init_mm_params(cfg, DType::kF64, 3);
  testing::perturb(p.named());
  return p;
}

// Bi images, Bt text sequences, Bc control sequences of random content.
MmBatch random_batch(const MultimodalConfig& cfg, int64_t Bi, int64_t Bt, int64_t Bc, uint64_t seed) {
  MmBatch b;
  if (Bi > 0) b.images = random_tensor({Bi, cfg.image_dim()}, DType::kF64, seed);
  for (int64_t i = 0; i < Bi; ++i) b.labels.push_back(int32_t((i * 2 + 1) % cfg.n_classes));
  if (Bi > 1) b.labels[1] = -1;  // not scored
  for (int64_t i = 0; i < Bt * cfg.text_context; ++i) {
    b.text.push_back(int32_t((i * 37 + seed) % 256));
    b.text_targets.push_back(i % 4 == 3 ? -1 : int32_t((i * 91 + 5) % 256));
  }
  if (Bc > 0) {
    b.control = random_tensor({Bc * cfg.control_steps, cfg.control_features}, DType::kF64, seed + 1);
    b.control_targets =
        random_tensor({Bc * cfg.control_steps, cfg.control_actions}, DType::kF64, seed + 2);
  }
  return b;
}

void gradcheck(const MultimodalConfig& cfg) {
  const MultimodalModel model(cfg);
  MmParams p = random_params(cfg);
  MmParams g = zeros_like(p);
  const MmBatch batch = random_batch(cfg, 3, 2, 2, 7);
  MmCache cache;
  const ExecContext ctx;
  auto loss = [&] {
    const MmStep s = model.forward(p, batch, cache, ctx);
    return s.total + s.aux;
  };
  const MmStep s = model.forward(p, batch, cache, ctx);
  EXPECT_TRUE(std::isfinite(s.total));
  EXPECT_EQ(s.count[0], 2);                        // one image unlabelled
  EXPECT_EQ(s.count[1], 2 * 5 - 2);                // positions 3 and 7 unscored
  EXPECT_EQ(s.count[2], 2 * 3);
  EXPECT_EQ(int64_t(s.routing.size()), cfg.n_moe_layers());
  model.backward(p, cache, g, ctx);
  testing::expect_named_grads_close(loss, p.named(), g.named());
}

TEST(MultimodalGradcheck, Dense) { gradcheck(tiny(0)); }
TEST(MultimodalGradcheck, MoeInEveryBlock) { gradcheck(tiny(1)); }
TEST(MultimodalGradcheck, MoeInTheSecondBlockWithNoisyTopK) {
  MultimodalConfig cfg = tiny(2);
  cfg.moe.gating = Gating::kNoisyTopK;
  gradcheck(cfg);
}

// With nothing dropped, a modality's loss is the same whether the others share the batch: the
// MoE layers see all rows, but each row's output depends on that row alone, and attention stays
// inside each modality's sequences.
TEST(MultimodalModel, ModalitiesDoNotMixWithoutDropping) {
  MultimodalConfig cfg = tiny(1);
  cfg.moe.dropless = true;
  cfg.moe.loss_balance_weight = 0;
  const MultimodalModel model(cfg);
  const MmParams p = random_params(cfg);
  ExecContext ctx;
  ctx.training = false;
  MmCache cache;
  const MmStep all = model.forward(p, random_batch(cfg, 3, 2, 2, 7), cache, ctx);
  const MmStep image = model.forward(p, random_batch(cfg, 3, 0, 0, 7), cache, ctx);
  const MmStep text = model.forward(p, random_batch(cfg, 0, 2, 0, 7), cache, ctx);
  const MmStep control = model.forward(p, random_batch(cfg, 0, 0, 2, 7), cache, ctx);
  EXPECT_NEAR(all.loss[0], image.loss[0], 1e-12);
  EXPECT_NEAR(all.loss[1], text.loss[1], 1e-12);
  EXPECT_NEAR(all.loss[2], control.loss[2], 1e-12);
  EXPECT_EQ(image.count[1] + image.count[2], 0);
  EXPECT_NEAR(all.total, image.total + text.total + control.total, 1e-12);
}

// Text and control attend causally: changing the last step leaves the earlier steps' outputs
// alone. An image's rows attend both ways: changing the last patch changes the first row.
TEST(MultimodalModel, TextAndControlAreCausalImagesAreNot) {
  MultimodalConfig cfg = tiny(1);
  cfg.moe.dropless = true;
  const MultimodalModel model(cfg);
  const MmParams p = random_params(cfg);
  ExecContext ctx;
  ctx.training = false;
  MmCache cache;
  MmBatch b = random_batch(cfg, 0, 1, 1, 9);
  // Score only the first two text positions and the first two control steps.
  for (size_t i = 2; i < b.text_targets.size(); ++i) b.text_targets[i] = -1;
  b.text_targets[0] = 10;
  b.text_targets[1] = 20;
  const MmStep before = model.forward(p, b, cache, ctx);
  const Tensor first_actions = cache.control_out.clone();
  b.text.back() = (b.text.back() + 1) % 256;
  for (int64_t f = 0; f < cfg.control_features; ++f)
    b.control.data<double>()[(cfg.control_steps - 1) * cfg.control_features + f] += 0.5;
  const MmStep after = model.forward(p, b, cache, ctx);
  EXPECT_DOUBLE_EQ(before.loss[1], after.loss[1]);
  for (int64_t r = 0; r + 1 < cfg.control_steps; ++r)
    for (int64_t a = 0; a < cfg.control_actions; ++a)
      EXPECT_DOUBLE_EQ(first_actions.data<double>()[r * cfg.control_actions + a],
                       cache.control_out.data<double>()[r * cfg.control_actions + a]);
  EXPECT_NE(first_actions.data<double>()[(cfg.control_steps - 1) * cfg.control_actions],
            cache.control_out.data<double>()[(cfg.control_steps - 1) * cfg.control_actions]);

  MmBatch im = random_batch(cfg, 1, 0, 0, 9);
  model.forward(p, im, cache, ctx);
  const double first_row = cache.h_out.data<double>()[0];
  im.images.data<double>()[cfg.image_dim() - 1] += 1.0;  // the last patch's last pixel
  model.forward(p, im, cache, ctx);
  EXPECT_NE(first_row, cache.h_out.data<double>()[0]);
}

TEST(MultimodalModel, BadBatchesNameWhatWasExpected) {
  const MultimodalConfig cfg = tiny(1);
  const MultimodalModel model(cfg);
  const MmParams p = random_params(cfg);
  MmCache cache;
  auto message = [&](const MmBatch& b) -> std::string {
    try {
      model.forward(p, b, cache, {});
    } catch (const ShapeError& e) {
      return e.what();
    }
    return "";
  };
  MmBatch b = random_batch(cfg, 2, 1, 1, 3);
  b.text.pop_back();
  EXPECT_NE(message(b).find("text_context"), std::string::npos);
  b = random_batch(cfg, 2, 1, 1, 3);
  b.text[0] = 300;
  EXPECT_NE(message(b).find("bytes 0..255"), std::string::npos);
  b = random_batch(cfg, 2, 1, 1, 3);
  b.labels[0] = 3;
  EXPECT_NE(message(b).find("n_classes"), std::string::npos);
  b = random_batch(cfg, 2, 1, 1, 3);
  b.control_targets = random_tensor({cfg.control_steps, 3}, DType::kF64, 1);
  EXPECT_NE(message(b).find("control targets"), std::string::npos);
  b = random_batch(cfg, 2, 1, 1, 3);
  b.control = random_tensor({cfg.control_steps + 1, cfg.control_features}, DType::kF64, 1);
  EXPECT_NE(message(b).find("control_steps"), std::string::npos);
  EXPECT_NE(message(MmBatch{}).find("empty batch"), std::string::npos);
  MultimodalConfig bad = cfg;
  bad.moe.gating = Gating::kHash;
  EXPECT_THROW(MultimodalModel{bad}, ConfigError);
  bad = cfg;
  bad.text_weight = -1;
  EXPECT_THROW(MultimodalModel{bad}, ConfigError);
}

TEST(MultimodalConfig, EqualActiveFlopsOfTheDenseTwin) {
  MultimodalConfig moe = tiny(1);
  MultimodalConfig dense = moe;
  dense.moe_every = 0;
  dense.d_ff = moe.moe.top_k * moe.moe.d_ff;  // the k chosen experts' width
  const int64_t router = moe.d_model * moe.moe.n_experts;
  EXPECT_EQ(moe.block_macs_per_row(), dense.block_macs_per_row() + moe.n_layers * router);
  EXPECT_GT(moe.total_params(), dense.total_params());
  const MmParams p = init_mm_params(moe, DType::kF32, 1);
  int64_t n = 0;
  for (const auto& [name, t] : p.named()) n += t->numel();
  EXPECT_EQ(n, moe.total_params());
}

}  // namespace
}  // namespace sy
