// Checkpoints: one safetensors file holding the model ("model.<name>"), optionally the AdamW
// moments ("adam.m.<name>", "adam.v.<name>"), and in its metadata the format tag, version, run
// config, a hash of the model config, the step and the training history, with a checksum of
// every tensor and of the metadata. Loading checks all of it before returning anything and
// throws IoError naming the file, the tensor and what was expected.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "switchyard/nn/model.h"
#include "switchyard/train/optimizer.h"
#include "switchyard/train/run_config.h"

namespace sy {

struct TrainHistory {
  struct Step {
    int64_t step = 0;
    double loss = 0, aux = 0, lr = 0, grad_norm = 0, tokens_per_s = 0;
    std::vector<std::vector<double>> load;  // per MoE layer, per expert: share of routed slots
    std::vector<double> dropped;            // per MoE layer: dropped slot fraction
  };
  struct Eval {
    int64_t step = 0;
    double val_loss = 0;
  };
  std::vector<Step> steps;
  std::vector<Eval> evals;

  std::string to_json() const;
  static TrainHistory from_json(const std::string& text, const std::string& source);
};

struct Checkpoint {
  RunConfig cfg;
  LmParams params;
  std::optional<AdamW> optimizer;
  int64_t step = 0;  // steps completed
  TrainHistory history;
};

inline constexpr const char* kCheckpointFormat = "switchyard-lm";
// Version 2 adds per-tensor checksums (safetensors.h, kChecksumKey), required on load;
// version 1 files, written before them, still load unchecked.
inline constexpr int kCheckpointVersion = 2;

void save_checkpoint(const std::string& path, const RunConfig& cfg, const LmParams& params,
                     const AdamW* optimizer, int64_t step, const TrainHistory& history);
// with_optimizer: also read the AdamW moments (resume); otherwise they may be absent.
Checkpoint load_checkpoint(const std::string& path, bool with_optimizer);

// FNV-1a of the model config's canonical JSON: equal hashes, same architecture.
uint64_t model_config_hash(const LmConfig& cfg);
// FNV-1a of a text. A checkpoint's model_hash is this of its stored "model" config as stored
// (parsed and dumped, keys sorted), so a file written before a config key existed still
// verifies; the key then takes its default.
uint64_t fnv1a(const std::string& text);

}  // namespace sy
