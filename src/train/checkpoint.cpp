#include "switchyard/train/checkpoint.h"

#include <fmt/ranges.h>

#include <cctype>
#include <charconv>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>

#include "switchyard/core/file.h"
#include "switchyard/io/safetensors.h"
#include "switchyard/train/parallel.h"

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

namespace {

std::string dims(const std::vector<int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

// A count stored as text in a checkpoint's metadata ("step", "adam_steps"): digits only.
int64_t parse_count(const std::string& text, const std::string& path, const char* key) {
  int64_t v = -1;
  const auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || p != text.data() + text.size() || v < 0)
    throw IoError(fmt::format("{}: {} \"{}\": expected a count", path, key, text));
  return v;
}

// The tensors of a checkpoint under their stored names, those for which keep(name) holds.
template <class Keep>
std::vector<std::pair<std::string, const Tensor*>> checkpoint_tensors(const LmParams& params,
                                                                      const AdamW* optimizer,
                                                                      Keep&& keep) {
  std::vector<std::pair<std::string, const Tensor*>> out;
  auto add = [&](const std::string& prefix, const LmParams& p) {
    for (auto& [name, t] : p.named())
      if (keep(name)) out.emplace_back(prefix + name, t);
  };
  add("model.", params);
  if (optimizer != nullptr) {
    auto& opt = const_cast<AdamW&>(*optimizer);
    add("adam.m.", opt.m());
    add("adam.v.", opt.v());
  }
  return out;
}

std::map<std::string, std::string> checkpoint_metadata(const RunConfig& cfg, int64_t adam_steps,
                                                       int64_t step, const TrainHistory& history) {
  return {{"format", kCheckpointFormat},
          {"version", std::to_string(kCheckpointVersion)},
          {"config", run_config_json(cfg)},
          {"config_name", cfg.name},
          {"model_hash", fmt::format("{:016x}", model_config_hash(cfg.model))},
          {"step", std::to_string(step)},
          {"adam_steps", std::to_string(adam_steps)},
          {"history", history.to_json()},
          // Where it was trained: the kernels and CPU (informational; any backend loads it).
          {"kernels", pick_backend(cpu_features(), cfg.model.precision).name},
          {"cpu", cpu_features().describe()}};
}

}  // namespace

void save_checkpoint(const std::string& path, const RunConfig& cfg, const LmParams& params,
                     const AdamW* optimizer, int64_t step, const TrainHistory& history) {
  const auto meta = checkpoint_metadata(cfg, optimizer ? optimizer->n_steps() : 0, step, history);
  const auto all = [](const std::string&) { return true; };
  write_safetensors(path, checkpoint_tensors(params, optimizer, all), meta);
}

namespace {

// Where a checkpoint's tensors come from: one file, or the shards of a sharded checkpoint.
class TensorStore {
 public:
  virtual ~TensorStore() = default;
  // The run's metadata: format, version, config, hashes, step, history.
  virtual const std::map<std::string, std::string>& metadata() const = 0;
  // Fills `into` (shaped and typed as the config expects) with tensor `name`; throws IoError
  // naming it when it is missing or of another shape or dtype.
  virtual void take(const std::string& name, Tensor& into) = 0;
  // The tensors not taken, with their shapes.
  virtual std::vector<std::pair<std::string, std::string>> left() const = 0;
};

// One file, mapped: every tensor's checksum is verified up front (a damaged optimizer moment
// stops `eval` too, though it does not load them), and only the tensors taken are copied, once,
// into the config's own tensors.
class FileStore final : public TensorStore {
 public:
  explicit FileStore(const std::string& path) : path_(path), file_(path) {
    for (const auto& [name, e] : file_.entries()) {
      (void)tensor_dtype(file_, e);  // throws for a dtype we do not read
      (void)file_.bytes(e);  // throws on a checksum mismatch
      file_.release(e);      // read once; not kept mapped in this process's memory
    }
  }
  const std::map<std::string, std::string>& metadata() const override { return file_.metadata(); }
  void take(const std::string& name, Tensor& into) override {
    if (!file_.contains(name) || taken_.count(name))
      throw IoError(fmt::format("{}: tensor {} missing (expected {})", path_, name, into.shape_str()));
    const auto& e = file_.entry(name);
    if (e.shape != into.shape() || tensor_dtype(file_, e) != into.dtype())
      throw IoError(fmt::format("{}: tensor {} is {}: expected {}", path_, name, described(e),
                                into.shape_str()));
    const auto raw = file_.bytes(e);
    if (!raw.empty()) std::memcpy(into.bytes(), raw.data(), raw.size());
    file_.release(e);
    taken_.insert(name);
  }
  std::vector<std::pair<std::string, std::string>> left() const override {
    std::vector<std::pair<std::string, std::string>> out;
    for (const auto& [name, e] : file_.entries())
      if (!taken_.count(name)) out.emplace_back(name, described(e));
    return out;
  }

 private:
  static std::string described(const MappedSafetensors::Entry& e) {
    std::string dtype = e.dtype;
    for (char& c : dtype) c = char(std::tolower(static_cast<unsigned char>(c)));
    return fmt::format("{} {}", dims(e.shape), dtype);
  }
  std::string path_;
  MappedSafetensors file_;
  std::set<std::string> taken_;
};

// A sharded checkpoint: index.json names every tensor, its full shape and the parts that hold
// it (file, first expert, count, checksum); the metadata rides in the shared file.
class ShardedStore final : public TensorStore {
 public:
  explicit ShardedStore(const std::string& path) {
    namespace fs = std::filesystem;
    dir_ = fs::is_directory(path) ? fs::path(path) : fs::path(path).parent_path();
    index_ = (dir_ / kShardIndex).string();
    std::ifstream in(index_, std::ios::binary);
    if (!in) throw IoError(fmt::format("{}: cannot open the index of a sharded checkpoint", index_));
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(text);
      if (j.at("format").get<std::string>() != kShardedFormat)
        throw IoError(fmt::format("{}: format {}: expected \"{}\"", index_, j.at("format").dump(),
                                  kShardedFormat));
      if (j.at("version").get<int>() != 1)
        throw IoError(fmt::format("{}: version {}: this build reads version 1", index_,
                                  j.at("version").dump()));
      step_ = j.at("step").get<int64_t>();
      shared_ = file(j.at("shared").get<std::string>());
      for (const auto& [name, t] : j.at("tensors").items()) {
        Spec spec;
        spec.shape = t.at("shape").get<std::vector<int64_t>>();
        spec.dtype = t.at("dtype").get<std::string>();
        for (const auto& part : t.at("parts"))
          spec.parts.push_back({part.at("file").get<std::string>(), part.at("first").get<int64_t>(),
                                part.at("count").get<int64_t>(), part.at("xxh3").get<std::string>()});
        specs_.emplace(name, std::move(spec));
      }
    } catch (const nlohmann::json::exception& e) {
      throw IoError(fmt::format("{}: not a valid sharded-checkpoint index: {}", index_, e.what()));
    }
    const auto it = shared_->metadata().find("step");
    if (it == shared_->metadata().end() || it->second != std::to_string(step_))
      throw IoError(fmt::format("{}: step {} but its shared file {} holds step {}: files of two "
                                "saves are mixed",
                                index_, step_, shared_->path(),
                                it == shared_->metadata().end() ? "(none)" : it->second));
  }
  const std::string& index_path() const { return index_; }
  int64_t step() const { return step_; }
  const std::map<std::string, std::string>& metadata() const override { return shared_->metadata(); }

  void take(const std::string& name, Tensor& into) override {
    const auto it = specs_.find(name);
    if (it == specs_.end())
      throw IoError(fmt::format("{}: tensor {} missing (expected {})", index_, name, into.shape_str()));
    const Spec& spec = it->second;
    if (spec.shape != into.shape() || spec.dtype != "F32" || into.dtype() != DType::kF32)
      throw IoError(fmt::format("{}: tensor {} is {} {}: expected {} F32", index_, name,
                                dims(spec.shape), spec.dtype, into.shape_str()));
    const int64_t rows = spec.shape.empty() ? 1 : spec.shape[0];
    const size_t row_bytes = rows > 0 ? into.nbytes() / size_t(rows) : 0;
    int64_t covered = 0;
    for (const Part& part : spec.parts) {
      // Parts in order, end to end, exactly covering the rows.
      if (part.first != covered || part.count < 0 || part.first + part.count > rows)
        throw IoError(fmt::format("{}: tensor {}: part of {} at rows [{}, {}) where row {} "
                                  "was expected next, of {}",
                                  index_, name, part.file, part.first, part.first + part.count,
                                  covered, rows));
      const MappedSafetensors& f = *file(part.file);
      const auto& e = f.entry(name);
      std::vector<int64_t> want = spec.shape;
      if (!want.empty()) want[0] = part.count;
      if (e.shape != want || e.dtype != spec.dtype)
        throw IoError(fmt::format("{}: tensor {} is {} {}: expected {} {} (rows [{}, {}) of "
                                  "it, says {})",
                                  f.path(), name, dims(e.shape), e.dtype,
                                  dims(want), spec.dtype, part.first,
                                  part.first + part.count, index_));
      if (fmt::format("{:016x}", f.stored_checksum(name)) != part.xxh3)
        throw IoError(fmt::format("{}: tensor {} has checksum {:016x} but {} expects {}: the "
                                  "shard is from another save",
                                  f.path(), name, f.stored_checksum(name), index_, part.xxh3));
      const auto raw = f.bytes(e);  // verified against the file's own checksum
      if (!raw.empty())
        std::memcpy(into.bytes() + size_t(part.first) * row_bytes, raw.data(), raw.size());
      covered += part.count;
    }
    if (covered != rows)
      throw IoError(fmt::format("{}: tensor {}: its parts cover rows [0, {}) of {}", index_, name,
                                covered, rows));
    taken_.insert(name);
  }
  std::vector<std::pair<std::string, std::string>> left() const override {
    std::vector<std::pair<std::string, std::string>> out;
    for (const auto& [name, spec] : specs_)
      if (!taken_.count(name)) out.emplace_back(name, dims(spec.shape));
    return out;
  }

 private:
  struct Part {
    std::string file;
    int64_t first = 0, count = 0;
    std::string xxh3;
  };
  struct Spec {
    std::vector<int64_t> shape;
    std::string dtype;
    std::vector<Part> parts;
  };
  const MappedSafetensors* file(const std::string& name) {
    if (name.empty() || name.find('/') != std::string::npos || name.starts_with("."))
      throw IoError(fmt::format("{}: shard file name \"{}\": expected a plain file name in {}",
                                index_, name, dir_.string()));
    auto& slot = files_[name];
    if (!slot) slot = std::make_unique<MappedSafetensors>((dir_ / name).string());
    return slot.get();
  }

  std::filesystem::path dir_;
  std::string index_;
  int64_t step_ = 0;
  const MappedSafetensors* shared_ = nullptr;
  std::map<std::string, Spec> specs_;
  std::map<std::string, std::unique_ptr<MappedSafetensors>> files_;
  std::set<std::string> taken_;
};

Checkpoint load_from(const std::string& path, TensorStore& store, bool with_optimizer) {
  const std::map<std::string, std::string>& metadata = store.metadata();
  auto meta = [&](const char* key) -> const std::string& {
    auto it = metadata.find(key);
    if (it == metadata.end())
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
  if (version != "1" && !metadata.count(kChecksumKey))
    throw IoError(fmt::format("{}: checkpoint version {} without its checksums ({}): the "
                              "header was altered",
                              path, version, kChecksumKey));
  Checkpoint ck;
  try {
    ck.cfg = parse_run_config(meta("config"), path);
  } catch (const ConfigError& e) {
    throw IoError(fmt::format("{}: stored config invalid: {}", path, e.what()));
  }
  ck.cfg.name = metadata.count("config_name") ? metadata.at("config_name") : path;
  // Parsing succeeded above, so the stored config is JSON with a "model" object.
  const std::string want_hash =
      fmt::format("{:016x}", fnv1a(nlohmann::json::parse(meta("config")).at("model").dump()));
  if (meta("model_hash") != want_hash)
    throw IoError(fmt::format("{}: model_hash {} does not match its stored config ({}): the "
                              "file was altered",
                              path, meta("model_hash"), want_hash));
  ck.step = parse_count(meta("step"), path, "step");
  ck.history = TrainHistory::from_json(meta("history"), path);

  // The expected tensors, from the stored config; every one must be in the file, as stored.
  ck.params = init_lm_params(ck.cfg.model, DType::kF32, 0);
  auto take = [&](const std::string& name, Tensor& into) { store.take(name, into); };
  for (auto& [name, t] : ck.params.named()) take("model." + name, *t);
  if (with_optimizer) {
    ck.optimizer.emplace(ck.cfg.train, ck.params);
    for (auto& [name, t] : ck.optimizer->m().named()) take("adam.m." + name, *t);
    for (auto& [name, t] : ck.optimizer->v().named()) take("adam.v." + name, *t);
    const int64_t adam_steps = parse_count(meta("adam_steps"), path, "adam_steps");
    ck.optimizer->set_n_steps(adam_steps);
  }
  for (const auto& [name, shape] : store.left())
    if (!name.starts_with("adam."))
      throw IoError(fmt::format("{}: unexpected tensor {} {} for this model config", path, name,
                                shape));
  return ck;
}

}  // namespace

int64_t checkpoint_step(const std::string& path) {
  if (is_sharded_checkpoint(path)) return ShardedStore(path).step();
  const MappedSafetensors f(path);
  const auto it = f.metadata().find("step");
  if (it == f.metadata().end())
    throw IoError(fmt::format("{}: not a Switchyard checkpoint: metadata has no \"step\"", path));
  return parse_count(it->second, path, "step");
}

bool is_sharded_checkpoint(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(path, ec)) return fs::exists(fs::path(path) / kShardIndex, ec);
  return fs::path(path).filename() == kShardIndex;
}

std::string find_checkpoint(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(path, ec)) return path;
  if (fs::exists(fs::path(path) / kShardIndex, ec)) return (fs::path(path) / kShardIndex).string();
  std::string best;
  int64_t best_step = -1;
  for (const fs::path& p : {fs::path(path) / "checkpoint.safetensors",
                            fs::path(path) / "checkpoint" / kShardIndex})
    if (fs::exists(p, ec)) {
      const int64_t s = checkpoint_step(p.string());
      if (s > best_step) best = p.string(), best_step = s;
    }
  if (best.empty())
    throw IoError(fmt::format("{}: no checkpoint in this directory (expected checkpoint.safetensors "
                              "or checkpoint/{})",
                              path, kShardIndex));
  return best;
}

void save_checkpoint_sharded(const std::string& dir, const RunConfig& cfg, const LmParams& params,
                             const AdamW& optimizer, int64_t step, const TrainHistory& history,
                             const ParallelGroup& grid) {
  namespace fs = std::filesystem;
  const int P = grid.ep_size(), ep = grid.ep_rank(), world = grid.world_rank();
  const bool writes_experts = world < P;  // replica 0 of every expert group
  const bool writes_shared = world == 0;
  const std::string shared_name = fmt::format("shared.s{:08d}.safetensors", step);
  auto experts_name = [&](int r) {
    return fmt::format("experts.{}-of-{}.s{:08d}.safetensors", r, P, step);
  };
  auto pick = [&](bool experts) {
    return checkpoint_tensors(params, &optimizer, [&](const std::string& name) {
      return is_expert_weight(name) == experts;
    });
  };

  // Every writer writes its own file (fsync, rename); a failure anywhere is everyone's, so no
  // rank waits on one that gave up and no index names a file that is not whole.
  std::string error;
  try {
    if (world == 0) fs::create_directories(dir);
  } catch (const std::exception& e) {
    error = e.what();
  }
  std::vector<double> ok = {error.empty() ? 0.0 : 1.0};
  grid.world_allreduce_sum(ok);
  if (ok[0] > 0) throw IoError(fmt::format("{}: cannot create the checkpoint directory{}", dir,
                                           error.empty() ? "" : ": " + error));
  try {
    if (writes_shared)
      write_safetensors((fs::path(dir) / shared_name).string(), pick(false),
                        checkpoint_metadata(cfg, optimizer.n_steps(), step, history));
    if (writes_experts)
      write_safetensors((fs::path(dir) / experts_name(ep)).string(), pick(true),
                        {{"format", kShardedFormat},
                         {"step", std::to_string(step)},
                         {"experts", fmt::format("{} of {}", ep, P)}});
  } catch (const Error& e) {
    error = e.what();
  }
  ok = {error.empty() ? 0.0 : 1.0};
  grid.world_allreduce_sum(ok);
  if (ok[0] > 0)
    throw IoError(error.empty() ? fmt::format("{}: another rank failed to write its shard", dir)
                                : error);

  // The index, last: it names each part with the checksum its file stores (read back from the
  // files' headers, so a file that is not whole stops the save here).
  if (world == 0) {
    try {
      nlohmann::ordered_json tensors = nlohmann::ordered_json::object();
      auto describe = [&](const MappedSafetensors& f, const std::string& name, int64_t first,
                          int64_t full_rows) {
        const auto& e = f.entry(name);
        auto& t = tensors[name];
        if (t.is_null()) {
          std::vector<int64_t> shape = e.shape;
          if (!shape.empty()) shape[0] = full_rows;
          t = {{"shape", shape}, {"dtype", e.dtype}, {"parts", nlohmann::ordered_json::array()}};
        }
        t["parts"].push_back({{"file", fs::path(f.path()).filename().string()},
                              {"first", first},
                              {"count", e.shape.empty() ? 1 : e.shape[0]},
                              {"xxh3", fmt::format("{:016x}", f.stored_checksum(name))}});
      };
      const MappedSafetensors shared((fs::path(dir) / shared_name).string());
      for (const auto& [name, e] : shared.entries())
        describe(shared, name, 0, e.shape.empty() ? 1 : e.shape[0]);
      for (int r = 0; r < P; ++r) {
        const MappedSafetensors part((fs::path(dir) / experts_name(r)).string());
        for (const auto& [name, e] : part.entries())
          describe(part, name, r * e.shape[0], P * e.shape[0]);
      }
      const nlohmann::ordered_json index = {{"format", kShardedFormat},
                                            {"version", 1},
                                            {"step", step},
                                            {"expert_parallel", P},
                                            {"shared", shared_name},
                                            {"tensors", tensors}};
      write_file_atomic((fs::path(dir) / kShardIndex).string(), index.dump(1) + "\n");
      // The previous save's files are no longer named by any index, and every writer of this
      // one has renamed its file into place: what else is here (a dead save's shards and
      // temporaries) is an orphan.
      for (const auto& f : fs::directory_iterator(dir)) {
        const std::string n = f.path().filename().string();
        if (n == kShardIndex || n == shared_name) continue;
        bool current = false;
        for (int r = 0; r < P; ++r) current |= n == experts_name(r);
        if (!current && (n.ends_with(".safetensors") || n.ends_with(".tmp"))) fs::remove(f.path());
      }
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  ok = {error.empty() ? 0.0 : 1.0};
  grid.world_allreduce_sum(ok);
  if (ok[0] > 0)
    throw IoError(error.empty() ? fmt::format("{}: rank 0 failed to write the index", dir) : error);
}

Checkpoint load_checkpoint(const std::string& given, bool with_optimizer) {
  const std::string path = find_checkpoint(given);
  if (is_sharded_checkpoint(path)) {
    ShardedStore store(path);
    return load_from(store.index_path(), store, with_optimizer);
  }
  FileStore store(path);
  return load_from(path, store, with_optimizer);
}

}  // namespace sy
