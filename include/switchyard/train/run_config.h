// Everything one training run needs: the model, the optimiser and schedule, the data. Read from
// JSON (a file, or one of the configs built in from configs/*.json by name), with `key=value`
// overrides from flags. Unknown keys, wrong types and bad values are ConfigErrors that name the
// key (`train.lr`) and what was expected.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "switchyard/nn/model.h"

namespace sy {

struct TrainConfig {
  int64_t steps = 400;
  int64_t batch = 16;          // sequences of model.context tokens per step
  double lr = 2e-3;            // peak learning rate, after warm-up
  double min_lr = 2e-4;        // end of the cosine decay
  int64_t warmup = 40;         // linear warm-up steps
  double weight_decay = 0.1;   // AdamW, decoupled; matrices only
  double beta1 = 0.9, beta2 = 0.95, adam_eps = 1e-8;
  double grad_clip = 1.0;      // global gradient norm; 0: off
  int64_t eval_interval = 50;  // steps between validation losses (and at the end)
  int64_t eval_tokens = 32768; // validation tokens per periodic evaluation
  int64_t checkpoint_interval = 100;
  // "auto": sharded (a directory, each rank writing what it owns) when experts are split over
  // more than one rank, else one file; or "file", or "sharded" (checkpoint.h).
  std::string checkpoint_format = "auto";
  uint64_t seed = 1;           // initialisation and data order
  void validate() const;
};

struct DataConfig {
  std::string path = "data/austen.txt.gz";  // text or gzip'd text, read as bytes
  double val_fraction = 0.05;               // the file's last part is the validation split
  void validate() const;
};

struct RunConfig {
  std::string name;  // the built-in config's name or the file's path
  LmConfig model;
  TrainConfig train;
  DataConfig data;
};

// `name_or_path`: a built-in config ("austen-moe") or a JSON file. overrides: "train.lr=0.001",
// applied in order; the value is parsed as JSON, else taken as a string.
RunConfig load_run_config(const std::string& name_or_path,
                          const std::vector<std::string>& overrides = {});
RunConfig parse_run_config(const std::string& json_text, const std::string& source,
                           const std::vector<std::string>& overrides = {});
std::vector<std::string> builtin_config_names();

// Canonical JSON of the model part (what a checkpoint must match) and of the whole run.
std::string model_config_json(const LmConfig& cfg);
LmConfig parse_model_config(const std::string& json_text, const std::string& source);
std::string run_config_json(const RunConfig& cfg);

// A path from a config: as given if it exists, else relative to the source tree the binary was
// built from (so the default data is found from any working directory).
std::string resolve_data_path(const std::string& path);

}  // namespace sy
