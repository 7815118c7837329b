// Multimodal runs: the built-in configs load and the MoE's dense twin spends the same block
// FLOPs per row; bad keys and values are named; a short run on the committed image slice, the
// committed text and a few hundred arm episodes lowers every task's loss, and its routes are
// counted by modality; checkpoints round-trip and refuse foreign files.
#include "switchyard/train/multimodal.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <unistd.h>

#include "switchyard/core/error.h"
#include "switchyard/core/file.h"
#include "switchyard/train/vision.h"
#include "testing/testing.h"

namespace sy {
namespace {

namespace fs = std::filesystem;

fs::path scratch_dir() { return fs::temp_directory_path() / fmt::format("sy_multimodal_{}", ::getpid()); }

class ScratchCleanup : public ::testing::Environment {
 public:
  void TearDown() override { fs::remove_all(scratch_dir()); }
};
const auto* const kCleanup = ::testing::AddGlobalTestEnvironment(new ScratchCleanup);

std::string slice_dir() {
  return testing::fashion_slice_dir(scratch_dir().string(), SY_SOURCE_DIR);
}

MultimodalRunConfig small_run(bool moe) {
  std::vector<std::string> overrides = {
      "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.patch=7",
      "model.text_context=32", "model.control_steps=20", "train.steps=150", "train.warmup=10",
      "train.lr=0.003", "train.eval_interval=1000", "train.checkpoint_interval=1000",
      "data.val_images=200", "data.train_episodes=300", "data.val_episodes=40",
      "data.images_per_step=16", "data.text_per_step=4", "data.control_per_step=4",
      "data.eval_batches=13"};
  if (moe) {
    overrides.push_back("model.moe.n_experts=4");
    overrides.push_back("model.moe.d_ff=32");
  } else {
    overrides.push_back("model.d_ff=64");
  }
  MultimodalRunConfig cfg =
      load_multimodal_config(moe ? "multimodal-moe" : "multimodal-dense", overrides);
  cfg.data.image_dir = slice_dir();
  return cfg;
}

TEST(MultimodalConfig, BuiltInConfigsLoadAndBadValuesAreNamed) {
  EXPECT_TRUE(is_multimodal_config("multimodal-moe"));
  EXPECT_FALSE(is_multimodal_config("fashion-vit"));
  const MultimodalRunConfig moe = load_multimodal_config("multimodal-moe");
  const MultimodalRunConfig dense = load_multimodal_config("multimodal-dense");
  EXPECT_GT(moe.model.n_moe_layers(), 0);
  EXPECT_EQ(dense.model.n_moe_layers(), 0);
  // Equal active FLOPs: the dense twin's SwiGLU is as wide as the k chosen experts together,
  // the router being the difference.
  EXPECT_EQ(dense.model.d_ff, moe.model.moe.top_k * moe.model.moe.d_ff);
  EXPECT_EQ(moe.model.block_macs_per_row() - dense.model.block_macs_per_row(),
            moe.model.n_moe_layers() * moe.model.d_model * moe.model.moe.n_experts);
  EXPECT_EQ(multimodal_config_json(parse_multimodal_config(multimodal_config_json(moe), "again")),
            multimodal_config_json(moe));
  auto message = [](const std::vector<std::string>& overrides) -> std::string {
    try {
      load_multimodal_config("multimodal-moe", overrides);
    } catch (const ConfigError& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(message({"model.patch=5"}).find("model.patch"), std::string::npos);
  EXPECT_NE(message({"data.arm.l1=-1"}).find("data.arm.l1"), std::string::npos);
  EXPECT_NE(message({"data.arm.mass=1"}).find("data.arm.mass"), std::string::npos);
  EXPECT_NE(message({"data.text_val_fraction=1.5"}).find("data.text_val_fraction"), std::string::npos);
  EXPECT_NE(message({"data.images_per_step=0", "data.text_per_step=0", "data.control_per_step=0"})
                .find("not all 0"),
            std::string::npos);
  EXPECT_NE(message({"model.text_weight=-1"}).find("model.text_weight"), std::string::npos);
  EXPECT_NE(message({"model.moe.router=hash"}).find("hash"), std::string::npos);
  EXPECT_NE(message({"task=vision"}).find("multimodal"), std::string::npos);
  EXPECT_THROW(load_vision_config("multimodal-moe"), ConfigError);
}

TEST(MultimodalTraining, EveryTaskLearnsAndRoutesAreCountedByModality) {
  const MultimodalRunConfig cfg = small_run(true);
  const MultimodalData data = load_multimodal_data(cfg);
  EXPECT_EQ(data.train_images.n, 800);
  EXPECT_EQ(data.val_control.n, 40);
  const MultimodalModel model(cfg.model);
  const MmParams init = init_mm_params(cfg.model, DType::kF32, cfg.train.seed);
  const MmEval before = evaluate_multimodal(model, init, data, MmSplit::kVal, cfg, {}, 13);
  const std::string out = (scratch_dir() / "moe").string();
  const MultimodalRun run = train_multimodal(cfg, data, out, {.threads = 0, .quiet = true, .log = {}});
  const MmEval& after = run.val;
  EXPECT_EQ(after.count[0], 200);
  EXPECT_GT(after.image_accuracy, 0.4);  // ten classes: chance is 10%
  EXPECT_LT(after.loss[0], before.loss[0] - 0.5);
  EXPECT_LT(after.loss[1], before.loss[1] - 1.0);  // from about ln 256 = 5.5 nats
  EXPECT_LT(after.loss[2], 0.7 * before.loss[2]);
  // Every row of every batch is counted once per MoE layer, by its modality.
  ASSERT_EQ(after.modality_expert.size(), 2u);
  ASSERT_EQ(after.nmi.size(), 2u);
  int64_t rows = 0;
  for (int64_t v : after.modality_expert[0]) rows += v;
  EXPECT_GT(rows, 200 * cfg.model.n_patches());
  for (double v : after.nmi) EXPECT_TRUE(v >= 0 && v <= 1) << v;
  ASSERT_EQ(after.dropped.size(), 2u);
  for (const auto& layer : after.dropped)
    for (double v : layer) EXPECT_TRUE(v >= 0 && v < 0.5) << v;
  const std::string text = render_multimodal_routes_text(cfg, after);
  EXPECT_NE(text.find("NMI(modality; first-choice expert)"), std::string::npos) << text;
  EXPECT_NE(text.find("control"), std::string::npos);
  EXPECT_NE(render_multimodal_routes_html(cfg, after, "t").find("<table>"), std::string::npos);

  // The checkpoint holds the trained weights: evaluating it gives the same figures.
  const MultimodalCheckpoint ck = load_multimodal_checkpoint(out + "/checkpoint.safetensors");
  EXPECT_EQ(ck.step, 150);
  const MmEval trained = evaluate_multimodal(model, run.params, data, MmSplit::kVal, cfg, {}, 13);
  const MmEval again = evaluate_multimodal(MultimodalModel(ck.cfg.model), ck.params, data,
                                           MmSplit::kVal, ck.cfg, {}, 13);
  for (int m = 0; m < kModalities; ++m) EXPECT_DOUBLE_EQ(again.loss[m], trained.loss[m]);
  EXPECT_TRUE(is_multimodal_checkpoint(out + "/checkpoint.safetensors"));
  EXPECT_FALSE(is_vision_checkpoint(out + "/checkpoint.safetensors"));
}

TEST(MultimodalTraining, ResumeReachesTheWeightsOfAnUnbrokenRun) {
  MultimodalRunConfig cfg = small_run(true);
  cfg.train.steps = 20;
  cfg.data.eval_batches = 3;
  const MultimodalData data = load_multimodal_data(cfg);
  const std::string whole = (scratch_dir() / "whole").string();
  const std::string parts = (scratch_dir() / "parts").string();
  const MultimodalRun a =
      train_multimodal(cfg, data, whole, {.threads = 0, .quiet = true, .log = {}});
  MultimodalTrainOptions first{.threads = 0, .quiet = true, .log = {}};
  first.stop_after = 7;
  EXPECT_TRUE(train_multimodal(cfg, data, parts, first).interrupted);
  MultimodalTrainOptions second{.threads = 0, .quiet = true, .log = {}};
  second.resume = true;
  const MultimodalRun b = train_multimodal(cfg, data, parts, second);
  const auto wa = a.params.named(), wb = b.params.named();
  ASSERT_EQ(wa.size(), wb.size());
  for (size_t i = 0; i < wa.size(); ++i)
    EXPECT_EQ(std::memcmp(wa[i].second->data<float>(), wb[i].second->data<float>(),
                          wa[i].second->nbytes()),
              0)
        << wa[i].first;
  for (int m = 0; m < kModalities; ++m) EXPECT_DOUBLE_EQ(a.val.loss[m], b.val.loss[m]);
  MultimodalRunConfig other = cfg;
  other.train.seed = 9;
  EXPECT_THROW(train_multimodal(other, data, parts, second), ConfigError);
}

TEST(MultimodalCheckpoint, ForeignFilesAreRefused) {
  const MultimodalRunConfig cfg = small_run(false);
  const fs::path dir = scratch_dir() / "ck";
  fs::create_directories(dir);
  const std::string vit = (dir / "vit.safetensors").string();
  VisionRunConfig v = load_vision_config("fashion-vit");
  save_vision_checkpoint(vit, v, init_vit_params(v.model, DType::kF32, 1), 3);
  EXPECT_FALSE(is_multimodal_checkpoint(vit));
  EXPECT_THROW(load_multimodal_checkpoint(vit), IoError);
  const std::string path = (dir / "mm.safetensors").string();
  save_multimodal_checkpoint(path, cfg, init_mm_params(cfg.model, DType::kF32, 1), 5);
  EXPECT_EQ(load_multimodal_checkpoint(path).step, 5);
  // Another model's tensors under this config are named.
  MultimodalRunConfig other = cfg;
  other.model.d_model = 16;
  other.model.n_heads = 2;
  save_multimodal_checkpoint(path, cfg, init_mm_params(other.model, DType::kF32, 1), 5);
  try {
    load_multimodal_checkpoint(path);
    ADD_FAILURE() << "a checkpoint of another shape was accepted";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("model.image.patch_w"), std::string::npos) << e.what();
  }
  write_file_atomic(path, "not a checkpoint");
  EXPECT_THROW(load_multimodal_checkpoint(path), IoError);
}

}  // namespace
}  // namespace sy
