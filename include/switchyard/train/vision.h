// Training and evaluating vision transformers on labelled images (Fashion-MNIST): the run
// config ({"task": "vision", "model", "train", "data"}), the data (a validation split of the
// training set for model choice and confusion matrices; the test set only for final figures),
// the training loop, checkpoints and the evaluation with its confusion matrix.
//
//   VisionRunConfig cfg = load_vision_config("fashion-vit", {"train.steps=100"});
//   VisionData data = load_vision_data(cfg.data, cfg.train.seed);
//   VisionRun run = train_vision(cfg, data, "runs/fashion-vit", {});
//   VisionEval e = evaluate_vision(vit, run.params, data.test, cfg, ctx);
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "switchyard/core/exec_context.h"
#include "switchyard/nn/vision.h"
#include "switchyard/train/images.h"
#include "switchyard/train/optimizer.h"
#include "switchyard/train/run_config.h"

namespace sy {

struct VisionDataConfig {
  // Directory of the four IDX files (train-images-idx3-ubyte.gz, ...); empty: Debian's
  // dataset-fashion-mnist (installed by scripts/setup.sh).
  std::string dir;
  int64_t val_images = 5000;  // taken from the training set, at random (train.seed)
  int64_t train_images = 0;   // > 0: train on this many of the rest only (quick runs)
  int64_t pad = 2;            // augmentation: random shift by up to pad pixels (0: off)
  bool flip = true;           // augmentation: mirror left-right with probability 1/2
  // Super-classes (switchyard superclasses): a JSON file mapping each class to an expert, the
  // target of the MoE routers' guidance loss (moe.loss_guide_weight). Empty: no guidance.
  std::string superclasses;
  void validate() const;
};

struct VisionRunConfig {
  std::string name;
  VitConfig model;
  TrainConfig train;  // train.batch counts images; train.eval_tokens is unused
  VisionDataConfig data;
};

// Whether a built-in name or a JSON file is a vision run config ("task": "vision").
bool is_vision_config(const std::string& name_or_path);
VisionRunConfig load_vision_config(const std::string& name_or_path,
                                   const std::vector<std::string>& overrides = {});
VisionRunConfig parse_vision_config(const std::string& json_text, const std::string& source,
                                    const std::vector<std::string>& overrides = {});
std::string vision_config_json(const VisionRunConfig& cfg);

struct VisionData {
  ImageSet train, val, test;
  std::vector<int32_t> superclass;  // [n_classes] the expert of each class, or empty
};
// Throws IoError naming a missing or bad file, ConfigError for a split or super-class file that
// does not fit the data.
VisionData load_vision_data(const VisionDataConfig& cfg, uint64_t seed,
                            const VitConfig& model);

// Images i0..i0+B of `set` (or the listed ones) as the model's input: pixels / 255, standardised
// by Fashion-MNIST's training mean and deviation. images: [B, rows * cols] (=).
void image_batch(const ImageSet& set, std::span<const int64_t> index, Tensor& images);

struct ConfusionMatrix {
  int64_t n_classes = 0;
  std::vector<int64_t> counts;  // [true class, predicted class]
  int64_t at(int64_t truth, int64_t predicted) const { return counts[truth * n_classes + predicted]; }
  int64_t total() const;
  double accuracy() const;
  std::vector<double> per_class_accuracy() const;
};

struct VisionEval {
  double loss = 0;  // mean cross-entropy, nats
  ConfusionMatrix confusion;
  // Per MoE layer (in layer order), per expert: images (per-image routing) or patches routed to
  // it as first choice, by true class: [layer][expert * n_classes + class].
  std::vector<std::vector<int64_t>> expert_class;
  // Per MoE layer, per image: its first-choice expert (per-token routing: the one most of its
  // patches chose first).
  std::vector<std::vector<int32_t>> image_expert;
  double images_per_s = 0;
};

// Inference over a whole set in batches of `batch`. ctx.training is ignored (evaluation).
VisionEval evaluate_vision(const VisionTransformer& vit, const VitParams& p, const ImageSet& set,
                           int64_t batch, const ExecContext& ctx);

// `switchyard routes` for a vision model: per MoE layer, each expert's share and class mix, each
// class's expert mix, the normalised mutual information between class and expert; the HTML adds
// heatmaps and a grid of example images per expert (from `set`, the images ev was taken on).
std::string render_vision_routes_text(const VisionRunConfig& cfg, const VisionEval& ev);
std::string render_vision_routes_html(const VisionRunConfig& cfg, const VisionEval& ev,
                                      const ImageSet& set, const std::string& title);

struct VisionTrainOptions {
  int threads = 0;
  bool quiet = false;
  std::function<void(const std::string&)> log;  // a line of progress; default: stderr
  // Continue out_dir's checkpoint (its config must be this run's) to the same weights an
  // unbroken run reaches: the data order, augmentation and routing noise are functions of the
  // step, and the checkpoint holds AdamW's moments.
  bool resume = false;
  const std::atomic<bool>* stop = nullptr;  // set: finish the step, checkpoint, return
  int64_t stop_after = -1;                  // >= 0: stop after this many steps as if asked (tests)
};

struct VisionRun {
  VitParams params;
  int64_t steps = 0;
  double seconds = 0;           // training wall time (evaluations excluded)
  double train_images_per_s = 0;
  double val_accuracy = 0;      // at the end (not evaluated when interrupted)
  bool interrupted = false;     // stopped early by opt.stop or stop_after; resume continues it
};

// Trains from scratch or resumes; writes out_dir/checkpoint.safetensors (with the optimizer
// state, every train.checkpoint_interval steps, on a stop and at the end) and
// out_dir/history.json. Throws ConfigError for a resume without a checkpoint or of another
// config.
VisionRun train_vision(const VisionRunConfig& cfg, const VisionData& data,
                       const std::string& out_dir, const VisionTrainOptions& opt);

inline constexpr const char* kVisionCheckpointFormat = "switchyard-vit";
// adam: also its moments, so that the run can resume.
void save_vision_checkpoint(const std::string& path, const VisionRunConfig& cfg,
                            const VitParams& params, int64_t step, const VitAdamW* adam = nullptr);
struct VisionCheckpoint {
  VisionRunConfig cfg;
  VitParams params;
  std::optional<VitAdamW> optimizer;  // with_optimizer
  int64_t step = 0;
};
// Throws IoError naming the file and what was expected (with_optimizer: also for a file
// without the optimizer state).
VisionCheckpoint load_vision_checkpoint(const std::string& path, bool with_optimizer = false);
// Whether the file is a vision checkpoint (by its metadata's format).
bool is_vision_checkpoint(const std::string& path);

}  // namespace sy
