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

#include "switchyard/core/parallel.h"
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

// Sharded checkpoints, for expert parallelism: a directory holding `shared.s<step>.safetensors`
// (every non-expert tensor and its AdamW moments, and the metadata above; written by world rank
// 0), one `experts.<r>-of-<P>.s<step>.safetensors` per expert-parallel rank r (its experts'
// rows of every expert tensor and their moments, written by that rank of replica 0), and
// index.json, written last, naming every tensor with its full shape and its parts (file, first
// row, row count, checksum). Each rank writes only what it owns, streamed from its own tensors.
// Each file is fsync'd and renamed into place before the index that names it, and the previous
// save's files are removed only after the new index is in place, so a rank dying mid-save
// leaves the previous checkpoint whole. load_checkpoint reads either format, on any rank count.
inline constexpr const char* kShardedFormat = "switchyard-lm-sharded";
inline constexpr const char* kShardIndex = "index.json";

// Collective over the grid: each rank passes its own (expert-sharded) params and optimizer.
void save_checkpoint_sharded(const std::string& dir, const RunConfig& cfg, const LmParams& params,
                             const AdamW& optimizer, int64_t step, const TrainHistory& history,
                             const ParallelGroup& grid);
// The step a checkpoint (either format) holds, from its header or index alone.
int64_t checkpoint_step(const std::string& path);
// A directory holding index.json, or an index.json: a sharded checkpoint.
bool is_sharded_checkpoint(const std::string& path);
// The checkpoint a path names: a file or index as given; a sharded checkpoint's directory; a
// run directory's checkpoint.safetensors or checkpoint/, the one of the later step where both
// are (a run resumed on another layout). Throws IoError for a directory with neither.
std::string find_checkpoint(const std::string& path);

void save_checkpoint(const std::string& path, const RunConfig& cfg, const LmParams& params,
                     const AdamW* optimizer, int64_t step, const TrainHistory& history);
// with_optimizer: also read the AdamW moments (resume); otherwise they may be absent. `path`: a
// checkpoint file, or a sharded checkpoint's directory or index.json.
Checkpoint load_checkpoint(const std::string& path, bool with_optimizer);

// FNV-1a of the model config's canonical JSON: equal hashes, same architecture.
uint64_t model_config_hash(const LmConfig& cfg);
// FNV-1a of a text. A checkpoint's model_hash is this of its stored "model" config as stored
// (parsed and dumped, keys sorted), so a file written before a config key existed still
// verifies; the key then takes its default.
uint64_t fnv1a(const std::string& text);

}  // namespace sy
