// Run configs: JSON in, validated structs out; canonical JSON back out for checkpoints.
#include "switchyard/train/run_config.h"

#include "switchyard/train/multimodal.h"
#include "switchyard/train/vision.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

namespace sy {

namespace {

using nlohmann::json;

const std::map<std::string, std::string>& builtin_configs() {
  static const std::map<std::string, std::string> configs = {
#include "builtin_configs.inc"
  };
  return configs;
}

// The text of a built-in config or a file.
std::string config_text(const std::string& name_or_path) {
  const auto& builtin = builtin_configs();
  if (auto it = builtin.find(name_or_path); it != builtin.end()) return it->second;
  std::ifstream in(name_or_path);
  if (!in) {
    std::string names;
    for (const auto& [n, _] : builtin) names += (names.empty() ? "" : ", ") + n;
    throw ConfigError(fmt::format("config {}: no such file or built-in config (built in: {})",
                                  name_or_path, names));
  }
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}


// One JSON object of the config: reads the keys it knows, then rejects any it did not read.
class Section {
 public:
  Section(const json& j, std::string prefix) : j_(j), prefix_(std::move(prefix)) {
    if (!j_.is_object())
      throw ConfigError(fmt::format("{}: expected a JSON object, found {}", where(), j_.dump()));
  }
  bool has(const char* key) const { return j_.contains(key); }
  const json& at(const char* key) {
    known_.insert(key);
    return j_.at(key);
  }
  void get(const char* key, int64_t& out) {
    known_.insert(key);
    if (!j_.contains(key)) return;
    const json& v = j_[key];
    if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<uint64_t>() > INT64_MAX))
      throw ConfigError(fmt::format("{}{} = {}: expected an integer", prefix_, key, v.dump()));
    out = v.get<int64_t>();
  }
  void get(const char* key, uint64_t& out) {
    int64_t v = int64_t(out);
    get(key, v);
    if (v < 0) throw ConfigError(fmt::format("{}{} = {}: expected >= 0", prefix_, key, v));
    out = uint64_t(v);
  }
  void get(const char* key, double& out) {
    known_.insert(key);
    if (!j_.contains(key)) return;
    const json& v = j_[key];
    if (!v.is_number())
      throw ConfigError(fmt::format("{}{} = {}: expected a number", prefix_, key, v.dump()));
    out = v.get<double>();
  }
  void get(const char* key, bool& out) {
    known_.insert(key);
    if (!j_.contains(key)) return;
    const json& v = j_[key];
    if (!v.is_boolean())
      throw ConfigError(fmt::format("{}{} = {}: expected true or false", prefix_, key, v.dump()));
    out = v.get<bool>();
  }
  void get(const char* key, std::string& out) {
    known_.insert(key);
    if (!j_.contains(key)) return;
    const json& v = j_[key];
    if (!v.is_string())
      throw ConfigError(fmt::format("{}{} = {}: expected a string", prefix_, key, v.dump()));
    out = v.get<std::string>();
  }
  void finish() const {
    for (const auto& [key, value] : j_.items())
      if (!known_.count(key)) {
        std::string list;
        for (const std::string& k : known_) list += (list.empty() ? "" : ", ") + k;
        throw ConfigError(
            fmt::format("{}{}: unknown key (known keys here: {})", prefix_, key, list));
      }
  }

 private:
  std::string where() const { return prefix_.empty() ? "config" : prefix_.substr(0, prefix_.size() - 1); }
  const json& j_;
  std::string prefix_;
  std::set<std::string> known_;
};

constexpr std::pair<Gating, const char*> kRouters[] = {
    {Gating::kSoftmaxTopK, "softmax_topk"}, {Gating::kSigmoidBias, "sigmoid_bias"},
    {Gating::kExpertChoice, "expert_choice"}, {Gating::kHash, "hash"}, {Gating::kRandom, "random"},
    {Gating::kNoisyTopK, "noisy_topk"}};

template <class E, size_t N>
E parse_enum(const std::string& key, const std::string& value,
             const std::pair<E, const char*> (&names)[N]) {
  std::string list;
  for (auto [v, name] : names) {
    if (value == name) return v;
    list += fmt::format("{}\"{}\"", list.empty() ? "" : ", ", name);
  }
  throw ConfigError(fmt::format("{} = \"{}\": expected one of {}", key, value, list));
}
template <class E, size_t N>
const char* enum_name(E e, const std::pair<E, const char*> (&names)[N]) {
  for (auto [v, name] : names)
    if (v == e) return name;
  return "?";
}

const char* gating_name(Gating g) { return enum_name(g, kRouters); }

void read_moe(const json& j, MoeConfig& m) {
  Section s(j, "model.moe.");
  s.get("n_experts", m.n_experts);
  s.get("top_k", m.top_k);
  s.get("d_ff", m.d_ff);
  std::string router = gating_name(m.gating);
  s.get("router", router);
  m.gating = parse_enum("model.moe.router", router, kRouters);
  s.get("renormalize", m.renormalize);
  s.get("capacity_factor_train", m.capacity_factor_train);
  s.get("capacity_factor_eval", m.capacity_factor_eval);
  s.get("dropless", m.dropless);
  s.get("batch_prioritized", m.batch_prioritized);
  s.get("jitter_eps", m.jitter_eps);
  s.get("n_groups", m.n_groups);
  s.get("topk_groups", m.topk_groups);
  s.get("n_shared_experts", m.n_shared_experts);
  s.get("d_ff_shared", m.d_ff_shared);
  s.get("loss_balance_weight", m.loss_balance_weight);
  s.get("loss_z_weight", m.loss_z_weight);
  s.get("loss_importance_weight", m.loss_importance_weight);
  s.get("loss_load_weight", m.loss_load_weight);
  s.get("loss_guide_weight", m.loss_guide_weight);
  s.get("bias_update_rate", m.bias_update_rate);
  s.finish();
}

void read_model(const json& j, LmConfig& m) {
  Section s(j, "model.");
  s.get("vocab", m.vocab);
  s.get("context", m.context);
  s.get("d_model", m.d_model);
  s.get("n_layers", m.n_layers);
  s.get("n_heads", m.n_heads);
  s.get("rope_theta", m.rope_theta);
  s.get("norm_eps", m.norm_eps);
  s.get("moe_every", m.moe_every);
  s.get("d_ff", m.d_ff);
  std::string precision(precision_name(m.precision));
  s.get("precision", precision);
  m.precision = parse_precision(precision, "model.precision");
  if (s.has("moe")) read_moe(s.at("moe"), m.moe);
  s.finish();
  if (m.n_moe_layers() > 0 && m.moe.n_experts == 0)
    throw ConfigError("model.moe: missing, but model.moe_every > 0 asks for MoE layers");
}

nlohmann::ordered_json moe_json(const MoeConfig& e) {
  nlohmann::ordered_json j = nlohmann::ordered_json{{"n_experts", e.n_experts},
                                      {"top_k", e.top_k},
                                      {"d_ff", e.d_ff},
                                      {"router", gating_name(e.gating)},
                                      {"renormalize", e.renormalize},
                                      {"capacity_factor_train", e.capacity_factor_train},
                                      {"capacity_factor_eval", e.capacity_factor_eval},
                                      {"dropless", e.dropless},
                                      {"batch_prioritized", e.batch_prioritized},
                                      {"jitter_eps", e.jitter_eps},
                                      {"n_groups", e.n_groups},
                                      {"topk_groups", e.topk_groups},
                                      {"n_shared_experts", e.n_shared_experts},
                                      {"d_ff_shared", e.d_ff_shared},
                                      {"loss_balance_weight", e.loss_balance_weight},
                                      {"loss_z_weight", e.loss_z_weight},
                                      {"loss_importance_weight", e.loss_importance_weight},
                                      {"loss_load_weight", e.loss_load_weight},
                                      {"bias_update_rate", e.bias_update_rate}};
  // As precision below: only when set, so older configs keep their model_hash.
  if (e.loss_guide_weight != 0) j["loss_guide_weight"] = e.loss_guide_weight;
  return j;
}

json model_json(const LmConfig& m) {
  nlohmann::ordered_json j = {{"vocab", m.vocab},         {"context", m.context},
                              {"d_model", m.d_model},     {"n_layers", m.n_layers},
                              {"n_heads", m.n_heads},     {"rope_theta", m.rope_theta},
                              {"norm_eps", m.norm_eps},   {"moe_every", m.moe_every},
                              {"d_ff", m.d_ff}};
  // Written only when not the default, so that an f32 model's config (and its model_hash) is
  // what it was before the key existed.
  if (m.precision != Precision::kF32) j["precision"] = precision_name(m.precision);
  if (m.n_moe_layers() > 0) {
    j["moe"] = moe_json(m.moe);
  }
  return j;
}

void read_train(const json& j, TrainConfig& t) {
  Section s(j, "train.");
  s.get("steps", t.steps);
  s.get("batch", t.batch);
  s.get("lr", t.lr);
  s.get("min_lr", t.min_lr);
  s.get("warmup", t.warmup);
  s.get("weight_decay", t.weight_decay);
  s.get("beta1", t.beta1);
  s.get("beta2", t.beta2);
  s.get("adam_eps", t.adam_eps);
  s.get("grad_clip", t.grad_clip);
  s.get("eval_interval", t.eval_interval);
  s.get("eval_tokens", t.eval_tokens);
  s.get("checkpoint_interval", t.checkpoint_interval);
  s.get("checkpoint_format", t.checkpoint_format);
  s.get("seed", t.seed);
  s.finish();
}

nlohmann::ordered_json train_json(const TrainConfig& t) {
  return {{"steps", t.steps},   {"batch", t.batch},         {"lr", t.lr},
          {"min_lr", t.min_lr}, {"warmup", t.warmup},       {"weight_decay", t.weight_decay},
          {"beta1", t.beta1},   {"beta2", t.beta2},         {"adam_eps", t.adam_eps},
          {"grad_clip", t.grad_clip}, {"eval_interval", t.eval_interval},
          {"eval_tokens", t.eval_tokens}, {"checkpoint_interval", t.checkpoint_interval},
          {"checkpoint_format", t.checkpoint_format}, {"seed", t.seed}};
}

void apply_override(json& j, const std::string& kv) {
  const size_t eq = kv.find('=');
  if (eq == std::string::npos || eq == 0)
    throw ConfigError(fmt::format("--set {}: expected key=value, e.g. train.lr=0.001", kv));
  // Keys and bare words become JSON strings, which must be UTF-8 (the config is stored as
  // JSON in every checkpoint).
  try {
    (void)json(kv).dump();
  } catch (const json::type_error&) {
    throw ConfigError(fmt::format("--set {}: not valid UTF-8", kv));
  }
  const std::string key = kv.substr(0, eq), text = kv.substr(eq + 1);
  json value;
  try {
    value = json::parse(text);
  } catch (const json::exception&) {
    value = text;  // a bare word is a string
  }
  json* node = &j;
  size_t start = 0;
  while (true) {
    const size_t dot = key.find('.', start);
    const std::string part = key.substr(start, dot == std::string::npos ? dot : dot - start);
    if (part.empty()) throw ConfigError(fmt::format("--set {}: empty key part", kv));
    if (!node->is_object()) throw ConfigError(fmt::format("--set {}: {} is not an object", kv, key.substr(0, start - 1)));
    if (dot == std::string::npos) {
      (*node)[part] = value;
      return;
    }
    node = &(*node)[part];
    if (node->is_null()) *node = json::object();
    start = dot + 1;
  }
}

}  // namespace

void TrainConfig::validate() const {
  auto positive = [](const char* name, int64_t v) {
    if (v < 1) throw ConfigError(fmt::format("train.{} = {}: expected >= 1", name, v));
  };
  positive("steps", steps);
  positive("batch", batch);
  positive("eval_interval", eval_interval);
  positive("eval_tokens", eval_tokens);
  positive("checkpoint_interval", checkpoint_interval);
  if (checkpoint_format != "auto" && checkpoint_format != "file" && checkpoint_format != "sharded")
    throw ConfigError(fmt::format("train.checkpoint_format = \"{}\": expected auto, file or sharded",
                                  checkpoint_format));
  if (warmup < 0) throw ConfigError(fmt::format("train.warmup = {}: expected >= 0", warmup));
  auto finite_pos = [](const char* name, double v, bool zero_ok) {
    if (!std::isfinite(v) || v < 0 || (!zero_ok && v == 0))
      throw ConfigError(fmt::format("train.{} = {}: expected a finite value {} 0", name, v,
                                    zero_ok ? ">=" : ">"));
  };
  finite_pos("lr", lr, false);
  finite_pos("min_lr", min_lr, true);
  if (min_lr > lr)
    throw ConfigError(fmt::format("train.min_lr = {}: expected <= train.lr = {}", min_lr, lr));
  finite_pos("weight_decay", weight_decay, true);
  finite_pos("grad_clip", grad_clip, true);
  finite_pos("adam_eps", adam_eps, false);
  for (auto [name, b] : {std::pair{"beta1", beta1}, std::pair{"beta2", beta2}})
    if (!(b >= 0 && b < 1))
      throw ConfigError(fmt::format("train.{} = {}: expected in [0, 1)", name, b));
}

void DataConfig::validate() const {
  if (path.empty()) throw ConfigError("data.path is empty: expected a text file");
  if (!(val_fraction > 0 && val_fraction < 1))
    throw ConfigError(fmt::format("data.val_fraction = {}: expected in (0, 1)", val_fraction));
}

RunConfig parse_run_config(const std::string& json_text, const std::string& source,
                           const std::vector<std::string>& overrides) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    throw ConfigError(fmt::format("{}: not valid JSON: {}", source, e.what()));
  }
  for (const std::string& kv : overrides) apply_override(j, kv);
  RunConfig cfg;
  cfg.name = source;
  Section top(j, "");
  if (top.has("task") && top.at("task") != "lm")
    throw ConfigError(fmt::format("{}: task = {}: a language-model run expected \"lm\" (a vision "
                                  "config is read by the vision commands)",
                                  source, top.at("task").dump()));
  if (top.has("model")) read_model(top.at("model"), cfg.model);
  if (top.has("train")) read_train(top.at("train"), cfg.train);
  if (top.has("data")) {
    Section s(top.at("data"), "data.");
    s.get("path", cfg.data.path);
    s.get("val_fraction", cfg.data.val_fraction);
    s.finish();
  }
  top.finish();
  cfg.model.validate();
  cfg.train.validate();
  cfg.data.validate();
  return cfg;
}

RunConfig load_run_config(const std::string& name_or_path,
                          const std::vector<std::string>& overrides) {
  return parse_run_config(config_text(name_or_path), name_or_path, overrides);
}

std::vector<std::string> builtin_config_names() {
  std::vector<std::string> names;
  for (const auto& [n, _] : builtin_configs()) names.push_back(n);
  return names;
}

std::string model_config_json(const LmConfig& cfg) { return model_json(cfg).dump(); }

LmConfig parse_model_config(const std::string& json_text, const std::string& source) {
  LmConfig m;
  try {
    read_model(json::parse(json_text), m);
  } catch (const json::exception& e) {
    throw ConfigError(fmt::format("{}: model config is not valid JSON: {}", source, e.what()));
  }
  m.validate();
  return m;
}

std::string run_config_json(const RunConfig& cfg) {
  nlohmann::ordered_json j;
  j["model"] = model_json(cfg.model);
  j["train"] = train_json(cfg.train);
  j["data"] = {{"path", cfg.data.path}, {"val_fraction", cfg.data.val_fraction}};
  return j.dump(2);
}

std::string resolve_data_path(const std::string& path) {
  namespace fs = std::filesystem;
  if (fs::exists(path) || fs::path(path).is_absolute()) return path;
  const fs::path in_source = fs::path(SY_SOURCE_DIR) / path;
  return fs::exists(in_source) ? in_source.string() : path;
}

namespace {

constexpr std::pair<VitPooling, const char*> kPoolings[] = {{VitPooling::kMean, "mean"},
                                                            {VitPooling::kClassToken, "cls"}};
constexpr std::pair<VitRouting, const char*> kVitRoutings[] = {
    {VitRouting::kPerToken, "per_token"}, {VitRouting::kPerImage, "per_image"}};

void read_vit(const json& j, VitConfig& m) {
  Section s(j, "model.");
  s.get("image_rows", m.image_rows);
  s.get("image_cols", m.image_cols);
  s.get("channels", m.channels);
  s.get("patch", m.patch);
  s.get("n_classes", m.n_classes);
  s.get("d_model", m.d_model);
  s.get("n_layers", m.n_layers);
  s.get("n_heads", m.n_heads);
  s.get("norm_eps", m.norm_eps);
  std::string pooling = enum_name(m.pooling, kPoolings), routing = enum_name(m.routing, kVitRoutings);
  s.get("pooling", pooling);
  m.pooling = parse_enum("model.pooling", pooling, kPoolings);
  s.get("moe_every", m.moe_every);
  s.get("moe_last", m.moe_last);
  s.get("d_ff", m.d_ff);
  s.get("routing", routing);
  m.routing = parse_enum("model.routing", routing, kVitRoutings);
  std::string precision(precision_name(m.precision));
  s.get("precision", precision);
  m.precision = parse_precision(precision, "model.precision");
  if (s.has("moe")) read_moe(s.at("moe"), m.moe);
  s.finish();
  if (m.n_moe_layers() > 0 && m.moe.n_experts == 0)
    throw ConfigError("model.moe: missing, but model.moe_every or moe_last asks for MoE layers");
}

json vit_json(const VitConfig& m) {
  nlohmann::ordered_json j = {{"image_rows", m.image_rows}, {"image_cols", m.image_cols},
                              {"channels", m.channels},     {"patch", m.patch},
                              {"n_classes", m.n_classes},   {"d_model", m.d_model},
                              {"n_layers", m.n_layers},     {"n_heads", m.n_heads},
                              {"norm_eps", m.norm_eps},     {"pooling", enum_name(m.pooling, kPoolings)},
                              {"moe_every", m.moe_every},   {"moe_last", m.moe_last},
                              {"d_ff", m.d_ff},             {"routing", enum_name(m.routing, kVitRoutings)},
                              {"precision", precision_name(m.precision)}};
  if (m.n_moe_layers() > 0) j["moe"] = moe_json(m.moe);
  return j;
}

json parse_json(const std::string& text, const std::string& source) {
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    throw ConfigError(fmt::format("{}: not valid JSON: {}", source, e.what()));
  }
}

}  // namespace

void VisionDataConfig::validate() const {
  if (val_images < 1)
    throw ConfigError(fmt::format("data.val_images = {}: expected >= 1", val_images));
  if (train_images < 0)
    throw ConfigError(fmt::format("data.train_images = {}: expected >= 0 (0: all)", train_images));
  if (pad < 0 || pad > 16) throw ConfigError(fmt::format("data.pad = {}: expected 0..16", pad));
}

bool is_vision_config(const std::string& name_or_path) {
  const json j = parse_json(config_text(name_or_path), name_or_path);
  return j.is_object() && j.contains("task") && j["task"] == "vision";
}

VisionRunConfig parse_vision_config(const std::string& json_text, const std::string& source,
                                    const std::vector<std::string>& overrides) {
  json j = parse_json(json_text, source);
  for (const std::string& kv : overrides) apply_override(j, kv);
  VisionRunConfig cfg;
  cfg.name = source;
  cfg.train.batch = 128;
  Section top(j, "");
  if (!top.has("task") || top.at("task") != "vision")
    throw ConfigError(fmt::format("{}: expected \"task\": \"vision\"", source));
  if (top.has("model")) read_vit(top.at("model"), cfg.model);
  if (top.has("train")) read_train(top.at("train"), cfg.train);
  if (top.has("data")) {
    Section s(top.at("data"), "data.");
    VisionDataConfig& d = cfg.data;
    s.get("dir", d.dir);
    s.get("val_images", d.val_images);
    s.get("train_images", d.train_images);
    s.get("pad", d.pad);
    s.get("flip", d.flip);
    s.get("superclasses", d.superclasses);
    s.finish();
  }
  top.finish();
  cfg.model.validate();
  cfg.train.validate();
  cfg.data.validate();
  if (!cfg.data.superclasses.empty() && cfg.model.moe.loss_guide_weight == 0)
    throw ConfigError("data.superclasses is set but model.moe.loss_guide_weight is 0: expected a "
                      "weight for the guidance loss towards them");
  if (cfg.data.superclasses.empty() && cfg.model.moe.loss_guide_weight != 0 &&
      cfg.model.n_moe_layers() > 0)
    throw ConfigError(fmt::format("model.moe.loss_guide_weight = {} but data.superclasses is not "
                                  "set: expected a super-class file for the routers to be guided "
                                  "towards (switchyard superclasses), or a weight of 0",
                                  cfg.model.moe.loss_guide_weight));
  return cfg;
}

VisionRunConfig load_vision_config(const std::string& name_or_path,
                                   const std::vector<std::string>& overrides) {
  return parse_vision_config(config_text(name_or_path), name_or_path, overrides);
}

std::string vision_config_json(const VisionRunConfig& cfg) {
  const VisionDataConfig& d = cfg.data;
  nlohmann::ordered_json j;
  j["task"] = "vision";
  j["model"] = vit_json(cfg.model);
  j["train"] = train_json(cfg.train);
  j["data"] = {{"dir", d.dir},   {"val_images", d.val_images}, {"train_images", d.train_images},
               {"pad", d.pad},   {"flip", d.flip},             {"superclasses", d.superclasses}};
  return j.dump(2);
}

void MultimodalDataConfig::validate() const {
  if (val_images < 1)
    throw ConfigError(fmt::format("data.val_images = {}: expected >= 1", val_images));
  if (pad < 0 || pad > 16) throw ConfigError(fmt::format("data.pad = {}: expected 0..16", pad));
  if (text.empty()) throw ConfigError("data.text: expected the path of a byte corpus");
  if (!(text_val_fraction > 0 && text_val_fraction < 1))
    throw ConfigError(fmt::format("data.text_val_fraction = {}: expected a fraction in (0, 1)",
                                  text_val_fraction));
  arm.validate();
  if (train_episodes < 1 || val_episodes < 1 || train_episodes > 10'000'000 ||
      val_episodes > 10'000'000)
    throw ConfigError(fmt::format("data.train_episodes = {}, val_episodes = {}: expected 1..1e7",
                                  train_episodes, val_episodes));
  if (images_per_step < 0 || text_per_step < 0 || control_per_step < 0 ||
      images_per_step + text_per_step + control_per_step == 0)
    throw ConfigError(fmt::format("data.images_per_step = {}, text_per_step = {}, "
                                  "control_per_step = {}: expected counts >= 0, not all 0",
                                  images_per_step, text_per_step, control_per_step));
  if (eval_batches < 0)
    throw ConfigError(fmt::format("data.eval_batches = {}: expected >= 0 (0: all)", eval_batches));
}

namespace {

void read_multimodal_model(const json& j, MultimodalConfig& m) {
  Section s(j, "model.");
  s.get("d_model", m.d_model);
  s.get("n_layers", m.n_layers);
  s.get("n_heads", m.n_heads);
  s.get("norm_eps", m.norm_eps);
  s.get("moe_every", m.moe_every);
  s.get("d_ff", m.d_ff);
  std::string precision(precision_name(m.precision));
  s.get("precision", precision);
  m.precision = parse_precision(precision, "model.precision");
  s.get("image_rows", m.image_rows);
  s.get("image_cols", m.image_cols);
  s.get("patch", m.patch);
  s.get("n_classes", m.n_classes);
  s.get("text_context", m.text_context);
  s.get("control_steps", m.control_steps);
  s.get("image_weight", m.image_weight);
  s.get("text_weight", m.text_weight);
  s.get("control_weight", m.control_weight);
  if (s.has("moe")) read_moe(s.at("moe"), m.moe);
  s.finish();
  if (m.n_moe_layers() > 0 && m.moe.n_experts == 0)
    throw ConfigError("model.moe: missing, but model.moe_every asks for MoE layers");
}

nlohmann::ordered_json multimodal_model_json(const MultimodalConfig& m) {
  nlohmann::ordered_json j = {
      {"d_model", m.d_model},           {"n_layers", m.n_layers},
      {"n_heads", m.n_heads},           {"norm_eps", m.norm_eps},
      {"moe_every", m.moe_every},       {"d_ff", m.d_ff},
      {"precision", precision_name(m.precision)}, {"image_rows", m.image_rows},
      {"image_cols", m.image_cols},     {"patch", m.patch},
      {"n_classes", m.n_classes},       {"text_context", m.text_context},
      {"control_steps", m.control_steps}, {"image_weight", m.image_weight},
      {"text_weight", m.text_weight},   {"control_weight", m.control_weight}};
  if (m.n_moe_layers() > 0) j["moe"] = moe_json(m.moe);
  return j;
}

}  // namespace

bool is_multimodal_config(const std::string& name_or_path) {
  const json j = parse_json(config_text(name_or_path), name_or_path);
  return j.is_object() && j.contains("task") && j["task"] == "multimodal";
}

MultimodalRunConfig parse_multimodal_config(const std::string& json_text, const std::string& source,
                                            const std::vector<std::string>& overrides) {
  json j = parse_json(json_text, source);
  for (const std::string& kv : overrides) apply_override(j, kv);
  MultimodalRunConfig cfg;
  cfg.name = source;
  cfg.model.control_features = kArmFeatures;
  cfg.model.control_actions = kArmActions;
  Section top(j, "");
  if (!top.has("task") || top.at("task") != "multimodal")
    throw ConfigError(fmt::format("{}: expected \"task\": \"multimodal\"", source));
  if (top.has("model")) read_multimodal_model(top.at("model"), cfg.model);
  if (top.has("train")) read_train(top.at("train"), cfg.train);
  if (top.has("data")) {
    Section s(top.at("data"), "data.");
    MultimodalDataConfig& d = cfg.data;
    s.get("image_dir", d.image_dir);
    s.get("val_images", d.val_images);
    s.get("pad", d.pad);
    s.get("flip", d.flip);
    s.get("text", d.text);
    s.get("text_val_fraction", d.text_val_fraction);
    if (s.has("arm")) {
      Section a(s.at("arm"), "data.arm.");
      a.get("l1", d.arm.l1);
      a.get("l2", d.arm.l2);
      a.get("m1", d.arm.m1);
      a.get("m2", d.arm.m2);
      a.get("damping", d.arm.damping);
      a.get("dt", d.arm.dt);
      a.get("substeps", d.arm.substeps);
      a.get("kp", d.arm.kp);
      a.get("kd", d.arm.kd);
      a.get("tau_max", d.arm.tau_max);
      a.finish();
    }
    s.get("train_episodes", d.train_episodes);
    s.get("val_episodes", d.val_episodes);
    s.get("images_per_step", d.images_per_step);
    s.get("text_per_step", d.text_per_step);
    s.get("control_per_step", d.control_per_step);
    s.get("eval_batches", d.eval_batches);
    s.finish();
  }
  top.finish();
  cfg.model.validate();
  cfg.train.validate();
  cfg.data.validate();
  return cfg;
}

MultimodalRunConfig load_multimodal_config(const std::string& name_or_path,
                                           const std::vector<std::string>& overrides) {
  return parse_multimodal_config(config_text(name_or_path), name_or_path, overrides);
}

std::string multimodal_config_json(const MultimodalRunConfig& cfg) {
  const MultimodalDataConfig& d = cfg.data;
  const ArmConfig& a = d.arm;
  nlohmann::ordered_json j;
  j["task"] = "multimodal";
  j["model"] = multimodal_model_json(cfg.model);
  j["train"] = train_json(cfg.train);
  j["data"] = {{"image_dir", d.image_dir},
               {"val_images", d.val_images},
               {"pad", d.pad},
               {"flip", d.flip},
               {"text", d.text},
               {"text_val_fraction", d.text_val_fraction},
               {"arm", {{"l1", a.l1}, {"l2", a.l2}, {"m1", a.m1}, {"m2", a.m2},
                        {"damping", a.damping}, {"dt", a.dt}, {"substeps", a.substeps},
                        {"kp", a.kp}, {"kd", a.kd}, {"tau_max", a.tau_max}}},
               {"train_episodes", d.train_episodes},
               {"val_episodes", d.val_episodes},
               {"images_per_step", d.images_per_step},
               {"text_per_step", d.text_per_step},
               {"control_per_step", d.control_per_step},
               {"eval_batches", d.eval_batches}};
  return j.dump(2);
}

}  // namespace sy
