#include "switchyard/train/checkpoint.h"

#include <charconv>
#include <nlohmann/json.hpp>

#include "switchyard/io/safetensors.h"

namespace sy {

uint64_t fnv1a(const std::string& text) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : text) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

uint64_t model_config_hash(const LmConfig& cfg) { return fnv1a(model_config_json(cfg)); }

std::string TrainHistory::to_json() const {
  nlohmann::json j;
  j["steps"] = nlohmann::json::array();
  for (const Step& s : steps)
    j["steps"].push_back({{"step", s.step}, {"loss", s.loss}, {"aux", s.aux}, {"lr", s.lr},
                          {"grad_norm", s.grad_norm}, {"tokens_per_s", s.tokens_per_s},
                          {"load", s.load}, {"dropped", s.dropped}});
  j["evals"] = nlohmann::json::array();
  for (const Eval& e : evals) j["evals"].push_back({{"step", e.step}, {"val_loss", e.val_loss}});
  return j.dump();
}

TrainHistory TrainHistory::from_json(const std::string& text, const std::string& source) {
  TrainHistory h;
  try {
    const nlohmann::json j = nlohmann::json::parse(text);
    for (const auto& s : j.at("steps"))
      h.steps.push_back({s.at("step"), s.at("loss"), s.at("aux"), s.at("lr"), s.at("grad_norm"),
                         s.at("tokens_per_s"), s.at("load"), s.at("dropped")});
    for (const auto& e : j.at("evals")) h.evals.push_back({e.at("step"), e.at("val_loss")});
  } catch (const nlohmann::json::exception& e) {
    throw IoError(fmt::format("{}: training history malformed: {}", source, e.what()));
  }
  return h;
}

void save_checkpoint(const std::string& path, const RunConfig& cfg, const LmParams& params,
                     const AdamW* optimizer, int64_t step, const TrainHistory& history) {
  std::vector<std::pair<std::string, const Tensor*>> tensors;
  for (auto& [name, t] : params.named()) tensors.emplace_back("model." + name, t);
  if (optimizer != nullptr) {
    auto& opt = const_cast<AdamW&>(*optimizer);
    for (auto& [name, t] : opt.m().named()) tensors.emplace_back("adam.m." + name, t);
    for (auto& [name, t] : opt.v().named()) tensors.emplace_back("adam.v." + name, t);
  }
  const std::map<std::string, std::string> meta = {
      {"format", kCheckpointFormat},
      {"version", std::to_string(kCheckpointVersion)},
      {"config", run_config_json(cfg)},
      {"config_name", cfg.name},
      {"model_hash", fmt::format("{:016x}", model_config_hash(cfg.model))},
      {"step", std::to_string(step)},
      {"adam_steps", std::to_string(optimizer ? optimizer->n_steps() : 0)},
      {"history", history.to_json()},
      // Where it was trained: the kernels and CPU (informational; any backend loads it).
      {"kernels", pick_backend(cpu_features(), cfg.model.precision).name},
      {"cpu", cpu_features().describe()}};
  write_safetensors(path, tensors, meta);
}

Checkpoint load_checkpoint(const std::string& path, bool with_optimizer) {
  SafetensorsFile file = read_safetensors(path);  // verifies every checksum the file has
  auto meta = [&](const char* key) -> const std::string& {
    auto it = file.metadata.find(key);
    if (it == file.metadata.end())
      throw IoError(fmt::format("{}: not a Switchyard checkpoint: metadata has no \"{}\"", path, key));
    return it->second;
  };
  if (meta("format") != kCheckpointFormat)
    throw IoError(fmt::format("{}: format \"{}\": expected \"{}\"", path, meta("format"),
                              kCheckpointFormat));
  const std::string& version = meta("version");
  if (version != "1" && version != std::to_string(kCheckpointVersion))
    throw IoError(fmt::format("{}: checkpoint version {}: this build reads versions 1 to {}",
                              path, version, kCheckpointVersion));
  if (version != "1" && !file.metadata.count(kChecksumKey))
    throw IoError(fmt::format("{}: checkpoint version {} without its checksums ({}): the "
                              "header was altered",
                              path, version, kChecksumKey));
  Checkpoint ck;
  try {
    ck.cfg = parse_run_config(meta("config"), path);
  } catch (const ConfigError& e) {
    throw IoError(fmt::format("{}: stored config invalid: {}", path, e.what()));
  }
  ck.cfg.name = file.metadata.count("config_name") ? file.metadata["config_name"] : path;
  // Parsing succeeded above, so the stored config is JSON with a "model" object.
  const std::string want_hash =
      fmt::format("{:016x}", fnv1a(nlohmann::json::parse(meta("config")).at("model").dump()));
  if (meta("model_hash") != want_hash)
    throw IoError(fmt::format("{}: model_hash {} does not match its stored config ({}): the "
                              "file was altered",
                              path, meta("model_hash"), want_hash));
  {
    const std::string& text = meta("step");
    const auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), ck.step);
    if (ec != std::errc() || p != text.data() + text.size() || ck.step < 0)
      throw IoError(fmt::format("{}: step \"{}\": expected a count", path, text));
  }
  ck.history = TrainHistory::from_json(meta("history"), path);

  // The expected tensors, from the stored config; every one must be in the file, as stored.
  ck.params = init_lm_params(ck.cfg.model, DType::kF32, 0);
  auto take = [&](const std::string& name, Tensor& into) {
    auto it = file.tensors.find(name);
    if (it == file.tensors.end())
      throw IoError(fmt::format("{}: tensor {} missing (expected {})", path, name, into.shape_str()));
    if (it->second.shape() != into.shape() || it->second.dtype() != into.dtype())
      throw IoError(fmt::format("{}: tensor {} is {}: expected {}", path, name,
                                it->second.shape_str(), into.shape_str()));
    into = std::move(it->second);
    file.tensors.erase(it);
  };
  for (auto& [name, t] : ck.params.named()) take("model." + name, *t);
  if (with_optimizer) {
    ck.optimizer.emplace(ck.cfg.train, ck.params);
    for (auto& [name, t] : ck.optimizer->m().named()) take("adam.m." + name, *t);
    for (auto& [name, t] : ck.optimizer->v().named()) take("adam.v." + name, *t);
    int64_t adam_steps = 0;
    const std::string& text = meta("adam_steps");
    const auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), adam_steps);
    if (ec != std::errc() || p != text.data() + text.size() || adam_steps < 0)
      throw IoError(fmt::format("{}: adam_steps \"{}\": expected a count", path, text));
    ck.optimizer->set_n_steps(adam_steps);
  }
  for (const auto& [name, t] : file.tensors)
    if (!name.starts_with("adam."))
      throw IoError(fmt::format("{}: unexpected tensor {} {} for this model config", path, name,
                                t.shape_str()));
  return ck;
}

}  // namespace sy
