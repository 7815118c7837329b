// The single-file checkpoints of the vision and multimodal runs: the model's tensors
// ("model.<name>"), optionally the AdamW moments ("adam.m.<name>", "adam.v.<name>") for a resume,
// and in the metadata the format tag, version, run config, step and AdamW's step count. The file
// carries safetensors.h's checksums and is written atomically (a crash mid-save leaves the
// previous checkpoint). Internal to train/.
#pragma once

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "switchyard/core/error.h"
#include "switchyard/core/rng.h"
#include "switchyard/io/safetensors.h"
#include "switchyard/train/optimizer.h"

namespace sy::detail {

template <class Params>
void save_params_checkpoint(const std::string& path, const char* format, const std::string& config,
                            const Params& params, int64_t step, const BasicAdamW<Params>* adam) {
  std::vector<std::pair<std::string, const Tensor*>> tensors;
  for (const auto& [name, t] : params.named()) tensors.emplace_back("model." + name, t);
  std::map<std::string, std::string> meta = {
      {"format", format}, {"version", "1"}, {"config", config}, {"step", std::to_string(step)}};
  if (adam != nullptr) {
    for (const auto& [name, t] : adam->m().named()) tensors.emplace_back("adam.m." + name, t);
    for (const auto& [name, t] : adam->v().named()) tensors.emplace_back("adam.v." + name, t);
    meta["adam_steps"] = std::to_string(adam->n_steps());
  }
  write_safetensors(path, tensors, meta);
}

// A metadata value, or IoError naming the file and the format it was expected to be.
inline std::string checkpoint_meta(const SafetensorsFile& f, const std::string& path,
                                   const char* format, const char* key) {
  const auto it = f.metadata.find(key);
  if (it == f.metadata.end())
    throw IoError(fmt::format("{}: metadata has no \"{}\": expected a {} checkpoint", path, key,
                              format));
  return it->second;
}

// Checks the format and version; returns the step.
inline int64_t check_checkpoint_header(const SafetensorsFile& f, const std::string& path,
                                       const char* format) {
  const std::string got = checkpoint_meta(f, path, format, "format");
  if (got != format)
    throw IoError(fmt::format("{}: format \"{}\": expected \"{}\"", path, got, format));
  const std::string version = checkpoint_meta(f, path, format, "version");
  if (version != "1") throw IoError(fmt::format("{}: version {}: expected 1", path, version));
  const std::string step = checkpoint_meta(f, path, format, "step");
  try {
    size_t used = 0;
    const int64_t s = std::stoll(step, &used);
    if (used == step.size() && s >= 0) return s;
  } catch (const std::logic_error&) {
  }
  throw IoError(fmt::format("{}: step \"{}\": expected an integer >= 0", path, step));
}

// Moves the file's tensors into params (already shaped by the config) and, when adam is given,
// its moments (IoError if the file has none: a checkpoint written without them cannot resume).
// Every tensor of the file must be used.
template <class Params>
void read_params_checkpoint(SafetensorsFile& f, const std::string& path, Params& params,
                            BasicAdamW<Params>* adam) {
  auto take = [&](const std::string& key, Tensor& t) {
    const auto it = f.tensors.find(key);
    if (it == f.tensors.end())
      throw IoError(fmt::format("{}: tensor {} missing (expected {})", path, key, t.shape_str()));
    if (it->second.shape() != t.shape() || it->second.dtype() != DType::kF32)
      throw IoError(fmt::format("{}: tensor {} is {} {}: expected f32 {}", path, key,
                                dtype_name(it->second.dtype()), it->second.shape_str(),
                                t.shape_str()));
    t = std::move(it->second);
    f.tensors.erase(it);
  };
  for (auto& [name, t] : params.named()) take("model." + name, *t);
  if (adam != nullptr) {
    const auto steps = f.metadata.find("adam_steps");
    if (steps == f.metadata.end())
      throw IoError(fmt::format("{}: no optimizer state (adam_steps): expected a checkpoint "
                                "written by training, which can resume",
                                path));
    for (auto& [name, t] : adam->m().named()) take("adam.m." + name, *t);
    for (auto& [name, t] : adam->v().named()) take("adam.v." + name, *t);
    try {
      adam->set_n_steps(std::stoll(steps->second));
    } catch (const std::logic_error&) {
      throw IoError(fmt::format("{}: adam_steps \"{}\": expected an integer", path, steps->second));
    }
  } else {
    std::erase_if(f.tensors, [](const auto& kv) { return kv.first.starts_with("adam."); });
  }
  if (!f.tensors.empty())
    throw IoError(fmt::format("{}: tensor {} is not part of the model its config describes", path,
                              f.tensors.begin()->first));
}

// The history.json of a run resumed at `step`: the file's entries up to that step (those after
// it came from steps the resume repeats), or an empty history where the file is missing.
inline nlohmann::json resumed_history(const std::string& path, int64_t step) {
  nlohmann::json h = {{"steps", nlohmann::json::array()}, {"evals", nlohmann::json::array()}};
  std::ifstream in(path);
  if (!in) return h;
  nlohmann::json old;
  try {
    old = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw IoError(fmt::format("{}: not valid JSON: {}", path, e.what()));
  }
  for (const char* key : {"steps", "evals"}) {
    if (!old.contains(key) || !old[key].is_array()) continue;
    for (const nlohmann::json& row : old[key])
      if (row.is_object() && row.value("step", int64_t(0)) <= step) h[key].push_back(row);
  }
  return h;
}

// A resume's preconditions: out_dir holds a checkpoint (ck_path), and it was trained with this
// very config (both as their canonical JSON). Throws ConfigError naming what is wrong.
inline void require_checkpoint(const std::string& ck_path, const std::string& out_dir) {
  if (!std::filesystem::exists(ck_path))
    throw ConfigError(fmt::format("--resume: {} does not exist: expected the checkpoint of an "
                                  "earlier run of this config in {}",
                                  ck_path, out_dir));
}
inline void require_same_config(const std::string& ck_path, const std::string& checkpoint_json,
                                const std::string& run_json) {
  if (checkpoint_json != run_json)
    throw ConfigError(fmt::format("--resume: {} was trained with another config: expected the "
                                  "same config to resume (its config:\n{})",
                                  ck_path, checkpoint_json));
}

// order = 0..n-1 shuffled for `epoch` (Fisher-Yates from rng's draws): each epoch of a run
// visits every example once, in an order that is a function of the seed and the epoch alone.
inline void epoch_order(const Philox& rng, int64_t epoch, std::vector<int64_t>& order) {
  const int64_t n = int64_t(order.size());
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  for (int64_t i = n - 1; i > 0; --i) {
    const uint32_t r = rng.bits(uint64_t(epoch) * uint64_t(n) + uint64_t(i))[1];
    std::swap(order[i], order[int64_t(r % uint32_t(i + 1))]);
  }
}

}  // namespace sy::detail
