// Multimodal runs ({"task": "multimodal"}): the model of nn/multimodal.h trained on Fashion-MNIST
// images, byte text and the two-joint arm's reaching episodes (train/arm.h) at once, every step
// a mix of the three; evaluation per task; the routing by modality (which experts each modality
// uses, and the normalised mutual information between modality and expert).
//
//   MultimodalRunConfig cfg = load_multimodal_config("multimodal-moe", {"train.steps=100"});
//   MultimodalData data = load_multimodal_data(cfg);
//   MultimodalRun run = train_multimodal(cfg, data, "runs/mm", {});
//   MmEval e = evaluate_multimodal(model, run.params, data, MmSplit::kVal, cfg, ctx);
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "switchyard/core/exec_context.h"
#include "switchyard/nn/multimodal.h"
#include "switchyard/train/arm.h"
#include "switchyard/train/data.h"
#include "switchyard/train/images.h"
#include "switchyard/train/optimizer.h"
#include "switchyard/train/run_config.h"

namespace sy {

struct MultimodalDataConfig {
  // Images: the Fashion-MNIST IDX files' directory (empty: Debian's dataset-fashion-mnist), the
  // validation images taken from the training set, the augmentation (as VisionDataConfig's).
  std::string image_dir;
  int64_t val_images = 5000;
  int64_t pad = 2;
  bool flip = true;
  // Text: a byte corpus (data.h), its last val_fraction held out.
  std::string text = "data/austen.txt.gz";
  double text_val_fraction = 0.1;
  // Control: episodes of the arm, generated from train.seed (training, validation and test
  // episodes from separate streams).
  ArmConfig arm;
  int64_t train_episodes = 20000, val_episodes = 1000;
  // Every step (and every evaluation batch): this many images, text sequences, control episodes.
  int64_t images_per_step = 32, text_per_step = 8, control_per_step = 8;
  // The evaluation at the end of training and by `eval`: at most this many batches of the mix,
  // the text's held-out windows spread evenly, the episodes in order (0: as many as the
  // held-out images fill, or with no images every text window and episode). The evaluations
  // during training take at most 30.
  int64_t eval_batches = 0;
  void validate() const;  // throws ConfigError naming `data.<field>`
};

struct MultimodalRunConfig {
  std::string name;
  MultimodalConfig model;
  TrainConfig train;  // train.batch and eval_tokens are unused: data.*_per_step say the mix
  MultimodalDataConfig data;
};

bool is_multimodal_config(const std::string& name_or_path);
MultimodalRunConfig load_multimodal_config(const std::string& name_or_path,
                                           const std::vector<std::string>& overrides = {});
MultimodalRunConfig parse_multimodal_config(const std::string& json_text, const std::string& source,
                                            const std::vector<std::string>& overrides = {});
std::string multimodal_config_json(const MultimodalRunConfig& cfg);

struct MultimodalData {
  ImageSet train_images, val_images, test_images;
  Corpus text;  // train and val
  ArmEpisodes train_control, val_control, test_control;
};
// Throws IoError naming a missing or bad file, ConfigError for data that does not fit the model.
MultimodalData load_multimodal_data(const MultimodalRunConfig& cfg);

enum class MmSplit { kVal, kTest };

struct MmEval {
  std::array<double, kModalities> loss{};  // image and text cross-entropy (nats), control MSE
  std::array<int64_t, kModalities> count{};
  double image_accuracy = 0;
  // Per MoE layer, per modality, per expert: the rows whose first choice it was:
  // [layer][modality * E + expert].
  std::vector<std::vector<int64_t>> modality_expert;
  std::vector<double> nmi;  // per MoE layer: NMI(modality; first-choice expert)
  // Per MoE layer, per modality: the share of its rows' expert slots that capacity dropped.
  std::vector<std::array<double, kModalities>> dropped;
  double rows_per_s = 0;
};

// Evaluates on a split: the images (validation split or the test set), the text's held-out part
// (both splits: the corpus has no third), and the control episodes of that split, in batches of
// the training mix; at most max_batches of them (0: as data.eval_batches = 0 says).
MmEval evaluate_multimodal(const MultimodalModel& model, const MmParams& p,
                           const MultimodalData& data, MmSplit split,
                           const MultimodalRunConfig& cfg, const ExecContext& ctx,
                           int64_t max_batches = 0);

// `switchyard routes` for a multimodal model: per MoE layer, each modality's expert mix and each
// expert's modality mix with the NMI; the HTML adds a heatmap per layer.
std::string render_multimodal_routes_text(const MultimodalRunConfig& cfg, const MmEval& ev);
std::string render_multimodal_routes_html(const MultimodalRunConfig& cfg, const MmEval& ev,
                                          const std::string& title);

struct MultimodalTrainOptions {
  int threads = 0;
  bool quiet = false;
  std::function<void(const std::string&)> log;  // a line of progress; default: stderr
  // As VisionTrainOptions': continue out_dir's checkpoint to what an unbroken run reaches.
  bool resume = false;
  const std::atomic<bool>* stop = nullptr;  // set: finish the step, checkpoint, return
  int64_t stop_after = -1;                  // >= 0: stop after this many steps as if asked (tests)
};

struct MultimodalRun {
  MmParams params;
  int64_t steps = 0;
  double seconds = 0;  // training wall time (evaluations excluded)
  MmEval val;          // at the end (not evaluated when interrupted)
  bool interrupted = false;
};

// Trains from scratch or resumes; writes out_dir/checkpoint.safetensors (with the optimizer
// state, every train.checkpoint_interval steps, on a stop and at the end) and
// out_dir/history.json. Throws ConfigError for a resume without a checkpoint or of another
// config.
MultimodalRun train_multimodal(const MultimodalRunConfig& cfg, const MultimodalData& data,
                               const std::string& out_dir, const MultimodalTrainOptions& opt);

inline constexpr const char* kMultimodalCheckpointFormat = "switchyard-multimodal";
void save_multimodal_checkpoint(const std::string& path, const MultimodalRunConfig& cfg,
                                const MmParams& params, int64_t step,
                                const MmAdamW* adam = nullptr);
struct MultimodalCheckpoint {
  MultimodalRunConfig cfg;
  MmParams params;
  std::optional<MmAdamW> optimizer;  // with_optimizer
  int64_t step = 0;
};
// Throws IoError naming the file and what was expected.
MultimodalCheckpoint load_multimodal_checkpoint(const std::string& path, bool with_optimizer = false);
bool is_multimodal_checkpoint(const std::string& path);

}  // namespace sy
