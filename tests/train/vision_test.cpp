// Vision runs: configs (built-in ones load, bad keys and values are named), a short training run
// on the committed 1000-image slice whose validation accuracy rises well above chance (dense and
// per-image guided MoE), checkpoints that round-trip and refuse foreign or damaged files, the
// confusion matrix's figures.
#include "switchyard/train/vision.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <unistd.h>

#include "switchyard/core/error.h"
#include "switchyard/core/file.h"
#include "switchyard/io/safetensors.h"
#include "testing/testing.h"

namespace sy {
namespace {

namespace fs = std::filesystem;

fs::path scratch_dir() { return fs::temp_directory_path() / fmt::format("sy_vision_{}", ::getpid()); }

// Removes this process's scratch directory when the tests end.
class ScratchCleanup : public ::testing::Environment {
 public:
  void TearDown() override { fs::remove_all(scratch_dir()); }
};
const auto* const kCleanup = ::testing::AddGlobalTestEnvironment(new ScratchCleanup);

// A data directory in Fashion-MNIST's layout whose training and test files are both the committed
// slice (the test files' contents do not matter to these tests).
std::string slice_dir() {
  return testing::fashion_slice_dir(scratch_dir().string(), SY_SOURCE_DIR);
}

VisionRunConfig small_run(const std::string& json_model) {
  const std::string text = R"({"task": "vision", "model": )" + json_model + R"(,
    "train": {"steps": 120, "batch": 32, "lr": 0.003, "min_lr": 0.0003, "warmup": 10,
              "weight_decay": 0.05, "eval_interval": 1000, "checkpoint_interval": 1000, "seed": 3},
    "data": {"val_images": 200, "pad": 1, "flip": true}})";
  VisionRunConfig cfg = parse_vision_config(text, "test");
  cfg.data.dir = slice_dir();
  return cfg;
}

const char* kDense = R"({"patch": 7, "d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 48})";
const char* kPerImage = R"({"patch": 7, "d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 48,
    "moe_last": 1, "routing": "per_image",
    "moe": {"n_experts": 2, "top_k": 1, "renormalize": false, "d_ff": 48,
            "capacity_factor_train": 2.0}})";

TEST(VisionConfig, BuiltInConfigsLoadAndBadValuesAreNamed) {
  EXPECT_TRUE(is_vision_config("fashion-vit"));
  EXPECT_FALSE(is_vision_config("austen-moe"));
  const VisionRunConfig cfg = load_vision_config("fashion-vit");
  EXPECT_EQ(cfg.model.n_moe_layers(), 0);
  // The canonical JSON reads back to the same config.
  EXPECT_EQ(vision_config_json(parse_vision_config(vision_config_json(cfg), "again")),
            vision_config_json(cfg));
  auto message = [](const std::vector<std::string>& overrides) -> std::string {
    try {
      load_vision_config("fashion-vit", overrides);
    } catch (const ConfigError& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(message({"model.patch=5"}).find("model.patch"), std::string::npos);
  EXPECT_NE(message({"model.pooling=max"}).find("model.pooling"), std::string::npos);
  EXPECT_NE(message({"model.routing=per_pixel"}).find("model.routing"), std::string::npos);
  EXPECT_NE(message({"data.colour=1"}).find("data.colour"), std::string::npos);
  EXPECT_NE(message({"data.superclasses=x.json"}).find("loss_guide_weight"), std::string::npos);
  EXPECT_NE(message({"task=lm"}).find("vision"), std::string::npos);
  // Guidance needs its targets: a guided config without its super-class file is refused.
  try {
    load_vision_config("fashion-mobile-vmoe", {"data.superclasses="});
    ADD_FAILURE() << "a guidance weight without super-classes was accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("data.superclasses"), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW(load_vision_config("fashion-mobile-vmoe",
                                     {"data.superclasses=", "model.moe.loss_guide_weight=0"}));
  EXPECT_THROW(load_run_config("fashion-vit"), ConfigError);  // not a language-model run
}

TEST(VisionTraining, DenseAccuracyRisesAboveChance) {
  const VisionRunConfig cfg = small_run(kDense);
  const VisionData data = load_vision_data(cfg.data, cfg.train.seed, cfg.model);
  EXPECT_EQ(data.train.n, 800);
  EXPECT_EQ(data.val.n, 200);
  const std::string out = (fs::path(cfg.data.dir) / "dense").string();
  const VisionRun run = train_vision(cfg, data, out, {.threads = 0, .quiet = true, .log = {}});
  // Ten classes: chance is 10%; the slice's 800 images give a small ViT well over half right.
  EXPECT_GT(run.val_accuracy, 0.5);
  EXPECT_TRUE(fs::exists(fs::path(out) / "checkpoint.safetensors"));
  EXPECT_TRUE(fs::exists(fs::path(out) / "history.json"));

  // The checkpoint gives the same evaluation.
  const std::string path = (fs::path(out) / "checkpoint.safetensors").string();
  ASSERT_TRUE(is_vision_checkpoint(path));
  const VisionCheckpoint ck = load_vision_checkpoint(path);
  EXPECT_EQ(ck.step, cfg.train.steps);
  const VisionTransformer vit(ck.cfg.model);
  const VisionEval a = evaluate_vision(vit, run.params, data.val, 64, {});
  const VisionEval b = evaluate_vision(vit, ck.params, data.val, 50, {});
  EXPECT_EQ(a.confusion.counts, b.confusion.counts);
  EXPECT_DOUBLE_EQ(a.confusion.accuracy(), run.val_accuracy);
  EXPECT_EQ(a.confusion.total(), 200);
}

TEST(VisionTraining, GuidedPerImageMoeLearnsTheSuperClasses) {
  VisionRunConfig cfg = small_run(kPerImage);
  // Two super-classes: footwear and bags (5 Sandal, 7 Sneaker, 8 Bag, 9 Ankle boot) against
  // clothing.
  const std::string sc = (fs::path(cfg.data.dir) / "superclasses.json").string();
  write_file_atomic(sc, R"({"superclass": [0, 0, 0, 0, 0, 1, 0, 1, 1, 1]})");
  cfg.data.superclasses = sc;
  cfg.model.moe.loss_guide_weight = 0.5;
  const VisionData data = load_vision_data(cfg.data, cfg.train.seed, cfg.model);
  const VisionRun run = train_vision(cfg, data, (fs::path(cfg.data.dir) / "guided").string(),
                                     {.threads = 0, .quiet = true, .log = {}});
  EXPECT_GT(run.val_accuracy, 0.5);
  // The router sends most images to their super-class's expert.
  const VisionTransformer vit(cfg.model);
  const VisionEval ev = evaluate_vision(vit, run.params, data.val, 64, {});
  ASSERT_EQ(ev.expert_class.size(), 1u);
  int64_t agree = 0;
  for (int64_t e = 0; e < 2; ++e)
    for (int64_t c = 0; c < 10; ++c)
      agree += data.superclass[c] == e ? ev.expert_class[0][size_t(e * 10 + c)] : 0;
  EXPECT_GT(double(agree) / double(data.val.n), 0.9);
  // The routes report: the class-expert NMI, and example images of each expert.
  ASSERT_EQ(ev.image_expert.size(), 1u);
  ASSERT_EQ(int64_t(ev.image_expert[0].size()), data.val.n);
  const std::string text = render_vision_routes_text(cfg, ev);
  EXPECT_NE(text.find("NMI(class; expert)"), std::string::npos) << text;
  EXPECT_NE(text.find("Ankle boot"), std::string::npos) << text;
  const std::string html = render_vision_routes_html(cfg, ev, data.val, "guided");
  EXPECT_NE(html.find("data:image/png;base64,"), std::string::npos);
}

TEST(VisionData, BadSuperClassFilesAreNamed) {
  VisionRunConfig cfg = small_run(kPerImage);
  const std::string sc = (fs::path(cfg.data.dir) / "bad_superclasses.json").string();
  cfg.data.superclasses = sc;
  for (const char* text : {R"({"superclass": [0, 1]})", R"({"superclass": [0,0,0,0,0,1,0,1,1,2]})",
                           R"({"classes": []})", "not json"}) {
    write_file_atomic(sc, text);
    try {
      load_vision_data(cfg.data, 1, cfg.model);
      ADD_FAILURE() << "accepted " << text;
    } catch (const IoError& e) {
      EXPECT_NE(std::string(e.what()).find(sc), std::string::npos) << e.what();
    }
  }
  cfg.data.superclasses.clear();
  cfg.data.val_images = 1000;  // the whole slice
  EXPECT_THROW(load_vision_data(cfg.data, 1, cfg.model), ConfigError);
  cfg.data.val_images = 200;
  cfg.model.patch = 4;
  cfg.model.image_rows = cfg.model.image_cols = 32;
  EXPECT_THROW(load_vision_data(cfg.data, 1, cfg.model), ConfigError);  // 28 x 28 images
}

// A run stopped midway and resumed ends with the weights of an unbroken run: the data order,
// the augmentation and the optimizer state all carry over.
TEST(VisionTraining, ResumeReachesTheWeightsOfAnUnbrokenRun) {
  VisionRunConfig cfg = small_run(kPerImage);
  cfg.train.steps = 24;
  cfg.train.eval_interval = 10;
  cfg.data.train_images = 300;  // so that the 24 steps of 32 cross two epoch boundaries
  const VisionData data = load_vision_data(cfg.data, cfg.train.seed, cfg.model);
  const std::string whole = (fs::path(cfg.data.dir) / "whole").string();
  const std::string parts = (fs::path(cfg.data.dir) / "parts").string();
  const VisionRun a = train_vision(cfg, data, whole, {.threads = 0, .quiet = true, .log = {}});
  VisionTrainOptions first{.threads = 0, .quiet = true, .log = {}};
  first.stop_after = 11;
  const VisionRun b1 = train_vision(cfg, data, parts, first);
  EXPECT_TRUE(b1.interrupted);
  EXPECT_EQ(b1.steps, 11);
  VisionTrainOptions second{.threads = 0, .quiet = true, .log = {}};
  second.resume = true;
  const VisionRun b = train_vision(cfg, data, parts, second);
  EXPECT_FALSE(b.interrupted);
  const auto wa = a.params.named(), wb = b.params.named();
  ASSERT_EQ(wa.size(), wb.size());
  for (size_t i = 0; i < wa.size(); ++i)
    EXPECT_EQ(std::memcmp(wa[i].second->data<float>(), wb[i].second->data<float>(),
                          wa[i].second->nbytes()),
              0)
        << wa[i].first;
  EXPECT_DOUBLE_EQ(a.val_accuracy, b.val_accuracy);
  // history.json has each step once.
  std::ifstream in(fs::path(parts) / "history.json");
  const std::string h((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(h.find("\"step\": 24"), std::string::npos);
  EXPECT_EQ(h.find("\"step\": 25"), std::string::npos);

  // A resume needs the checkpoint of this config, with its optimizer state.
  VisionRunConfig other = cfg;
  other.train.lr = 0.001;
  VisionTrainOptions again{.threads = 0, .quiet = true, .log = {}};
  again.resume = true;
  EXPECT_THROW(train_vision(other, data, parts, again), ConfigError);
  EXPECT_THROW(train_vision(cfg, data, (fs::path(cfg.data.dir) / "none").string(), again),
               ConfigError);
  save_vision_checkpoint(parts + "/checkpoint.safetensors", cfg, a.params, 12);
  EXPECT_THROW(train_vision(cfg, data, parts, again), IoError);
}

TEST(VisionCheckpoint, ForeignAndDamagedFilesAreRefused) {
  const VisionRunConfig cfg = small_run(kDense);
  const std::string dir = (fs::path(cfg.data.dir) / "ck").string();
  fs::create_directories(dir);
  const std::string path = dir + "/checkpoint.safetensors";
  save_vision_checkpoint(path, cfg, init_vit_params(cfg.model, DType::kF32, 1), 7);
  EXPECT_EQ(load_vision_checkpoint(path).step, 7);
  // A different model's config over these tensors.
  VisionRunConfig other = cfg;
  other.model.d_model = 16;
  const std::string wrong = dir + "/wrong.safetensors";
  VitParams p = init_vit_params(cfg.model, DType::kF32, 1);
  std::vector<std::pair<std::string, const Tensor*>> tensors;
  for (const auto& [name, t] : p.named()) tensors.emplace_back("model." + name, t);
  write_safetensors(wrong, tensors,
                    {{"format", kVisionCheckpointFormat}, {"version", "1"},
                     {"config", vision_config_json(other)}, {"step", "1"}});
  EXPECT_THROW(load_vision_checkpoint(wrong), IoError);
  write_safetensors(wrong, tensors, {{"format", "switchyard-lm"}});
  EXPECT_FALSE(is_vision_checkpoint(wrong));
  EXPECT_THROW(load_vision_checkpoint(wrong), IoError);
  // A flipped byte in a tensor.
  std::ifstream in(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  bytes[bytes.size() - 5] ^= 0x40;
  write_file_atomic(path, bytes);
  EXPECT_THROW(load_vision_checkpoint(path), IoError);
}

TEST(ConfusionMatrix, AccuracyAndPerClass) {
  ConfusionMatrix cm{.n_classes = 3, .counts = {5, 1, 0, 2, 2, 0, 0, 0, 0}};
  EXPECT_EQ(cm.total(), 10);
  EXPECT_DOUBLE_EQ(cm.accuracy(), 0.7);
  const std::vector<double> per = cm.per_class_accuracy();
  EXPECT_DOUBLE_EQ(per[0], 5.0 / 6.0);
  EXPECT_DOUBLE_EQ(per[1], 0.5);
  EXPECT_DOUBLE_EQ(per[2], 0.0);  // no images of the class
}

}  // namespace
}  // namespace sy
