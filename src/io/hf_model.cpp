// config.json -> DecoderConfig, safetensors -> DecoderParams, for each supported model_type.
#include "switchyard/io/hf_model.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "switchyard/io/safetensors.h"

namespace sy {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const std::vector<std::string> kArchitectures = {"mixtral",     "qwen2_moe", "qwen3_moe", "olmoe",
                                                 "deepseek_v3", "llama",     "qwen2",     "qwen3"};

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError(fmt::format("{}: cannot open: {}", path, std::strerror(errno)));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

json parse_json(const std::string& text, const std::string& what) {
  try {
    json j = json::parse(text);
    if (!j.is_object()) throw IoError(fmt::format("{}: expected a JSON object", what));
    return j;
  } catch (const json::exception& e) {
    throw IoError(fmt::format("{}: not valid JSON ({})", what, e.what()));
  }
}

// Typed reads of config.json fields that name the field on a wrong type.
struct Fields {
  const json& j;
  std::string what;

  bool has(const char* k) const { return j.contains(k) && !j[k].is_null(); }
  template <class T>
  T get(const char* k, T fallback) const {
    if (!has(k)) return fallback;
    try {
      return j[k].get<T>();
    } catch (const json::exception&) {
      throw ConfigError(fmt::format("{}: {} = {}: wrong type", what, k, j[k].dump()));
    }
  }
  template <class T>
  T need(const char* k) const {
    if (!has(k)) throw ConfigError(fmt::format("{}: {} is missing", what, k));
    return get<T>(k, T{});
  }
};

RopeConfig parse_rope(const Fields& f, const std::string& model_type) {
  RopeConfig r;
  // transformers 5 writes rope_parameters; the Hub's configs have rope_theta and rope_scaling.
  json p = json::object();
  if (f.has("rope_parameters"))
    p = f.j["rope_parameters"];
  else if (f.has("rope_scaling"))
    p = f.j["rope_scaling"];
  if (!p.is_object())
    throw ConfigError(fmt::format("{}: rope_parameters: expected an object", f.what));
  const Fields rp{p, f.what + ": rope_parameters"};
  r.theta = rp.get<double>("rope_theta", f.get<double>("rope_theta", 10000.0));
  r.type = rp.get<std::string>("rope_type", rp.get<std::string>("type", "default"));
  r.factor = rp.get<double>("factor", 1.0);
  r.low_freq_factor = rp.get<double>("low_freq_factor", 1.0);
  r.high_freq_factor = rp.get<double>("high_freq_factor", 4.0);
  r.original_max_position = rp.get<int64_t>("original_max_position_embeddings", 0);
  r.beta_fast = rp.get<double>("beta_fast", 32.0);
  r.beta_slow = rp.get<double>("beta_slow", 1.0);
  r.mscale = rp.get<double>("mscale", 0.0);
  r.mscale_all_dim = rp.get<double>("mscale_all_dim", 0.0);
  r.attention_factor = rp.get<double>("attention_factor", 0.0);
  r.truncate = rp.get<bool>("truncate", true);
  if (r.type == "yarn" && !rp.has("factor") && r.original_max_position > 0)
    r.factor = double(f.need<int64_t>("max_position_embeddings")) / double(r.original_max_position);
  for (const char* k : {"partial_rotary_factor"})
    if (rp.has(k) || f.has(k))
      throw ConfigError(fmt::format("{}: {} is not implemented for {}", f.what, k, model_type));
  if (r.type == "dynamic" || r.type == "longrope")
    throw ConfigError(
        fmt::format("{}: rope_type {} is not implemented (supported: default, "
                    "linear, llama3, yarn)",
                    f.what, r.type));
  return r;
}

}  // namespace

std::string supported_hf_architectures() {
  std::string s;
  for (const auto& a : kArchitectures) s += (s.empty() ? "" : ", ") + a;
  return s;
}

bool is_hf_model_dir(const std::string& dir) {
  std::error_code ec;
  return fs::is_directory(dir, ec) && fs::is_regular_file(fs::path(dir) / "config.json", ec);
}

namespace {

DecoderConfig config_from_json(const json& j, const std::string& what,
                               std::string* model_type_out) {
  const Fields f{j, what};
  const std::string mt = f.get<std::string>("model_type", "");
  if (std::find(kArchitectures.begin(), kArchitectures.end(), mt) == kArchitectures.end())
    throw ConfigError(fmt::format("{}: model_type \"{}\" is not supported; supported: {}", what, mt,
                                  supported_hf_architectures()));
  if (model_type_out) *model_type_out = mt;
  const std::string act = f.get<std::string>("hidden_act", "silu");
  if (act != "silu")
    throw ConfigError(
        fmt::format("{}: hidden_act \"{}\": only silu (SwiGLU) is implemented", what, act));
  if (f.get<bool>("mlp_bias", false))
    throw ConfigError(fmt::format("{}: mlp_bias = true is not implemented", what));

  DecoderConfig c;
  c.arch = mt;
  c.vocab = f.need<int64_t>("vocab_size");
  c.d_model = f.need<int64_t>("hidden_size");
  c.n_layers = f.need<int64_t>("num_hidden_layers");
  c.n_heads = f.need<int64_t>("num_attention_heads");
  c.n_kv_heads = f.get<int64_t>("num_key_value_heads", c.n_heads);
  c.max_context = f.get<int64_t>("max_position_embeddings", 4096);
  c.norm_eps = f.get<double>("rms_norm_eps", 1e-6);
  c.tie_embeddings = f.get<bool>("tie_word_embeddings", false);
  if (c.n_heads <= 0 || c.d_model <= 0 || c.n_layers <= 0)
    throw ConfigError(
        fmt::format("{}: hidden_size, num_attention_heads and num_hidden_layers "
                    "must be positive",
                    what));
  c.head_dim = f.get<int64_t>("head_dim", 0);
  if (c.head_dim == 0 || mt == "deepseek_v3") c.head_dim = c.d_model / c.n_heads;
  c.v_head_dim = c.head_dim;
  c.rope = parse_rope(f, mt);
  const bool attention_bias = f.get<bool>("attention_bias", false);
  c.qkv_bias = attention_bias;
  c.o_bias = attention_bias;
  c.window.assign(size_t(c.n_layers), 0);
  c.moe_layer.assign(size_t(c.n_layers), 0);
  c.d_ff = f.get<int64_t>("intermediate_size", 0);

  MoeConfig& m = c.moe;
  m.d_model = c.d_model;
  m.dropless = true;
  m.gating = Gating::kSoftmaxTopK;
  m.loss_balance_weight = 0;
  m.loss_z_weight = 0;
  auto experts = [&](const char* count_key, const char* width_key) {
    m.n_experts =
        f.has(count_key) ? f.get<int64_t>(count_key, 0) : f.get<int64_t>("num_local_experts", 0);
    m.top_k = f.need<int64_t>("num_experts_per_tok");
    m.d_ff = f.need<int64_t>(width_key);
  };
  // Qwen's rule for which layers are sparse.
  auto qwen_sparse = [&] {
    const auto only = f.get<std::vector<int64_t>>("mlp_only_layers", {});
    const int64_t step = f.get<int64_t>("decoder_sparse_step", 1);
    if (step <= 0)
      throw ConfigError(fmt::format("{}: decoder_sparse_step = {}: expected > 0", what, step));
    for (int64_t l = 0; l < c.n_layers; ++l)
      c.moe_layer[l] = std::find(only.begin(), only.end(), l) == only.end() && m.n_experts > 0 &&
                       (l + 1) % step == 0;
  };
  // Sliding windows: layer_types when given (transformers 5), else each model's own rule.
  const int64_t window = f.get<int64_t>("sliding_window", 0);
  const bool use_window = f.get<bool>("use_sliding_window", false);
  auto windows_from_layer_types = [&]() -> bool {
    if (!f.has("layer_types")) return false;
    const auto types = f.get<std::vector<std::string>>("layer_types", {});
    if (int64_t(types.size()) != c.n_layers)
      throw ConfigError(
          fmt::format("{}: layer_types has {} entries, expected num_hidden_layers "
                      "= {}",
                      what, types.size(), c.n_layers));
    for (int64_t l = 0; l < c.n_layers; ++l) {
      if (types[l] == "sliding_attention") {
        if (window <= 0)
          throw ConfigError(
              fmt::format("{}: layer {} is sliding_attention but sliding_window = "
                          "{}",
                          what, l, window));
        c.window[l] = window;
      } else if (types[l] != "full_attention") {
        throw ConfigError(
            fmt::format("{}: layer_types[{}] = \"{}\": expected full_attention or "
                        "sliding_attention",
                        what, l, types[l]));
      }
    }
    return true;
  };

  if (mt == "llama") {
    (void)0;
  } else if (mt == "qwen2" || mt == "qwen3") {
    c.qkv_bias = mt == "qwen2" ? true : attention_bias;
    c.o_bias = mt == "qwen2" ? false : attention_bias;
    if (mt == "qwen3") c.qk_norm = QkNorm::kPerHead;
    if (!windows_from_layer_types() && use_window && window > 0) {
      const int64_t from = f.get<int64_t>("max_window_layers", 0);
      for (int64_t l = from; l < c.n_layers; ++l) c.window[l] = window;
    }
  } else if (mt == "mixtral") {
    experts("num_local_experts", "intermediate_size");
    std::fill(c.moe_layer.begin(), c.moe_layer.end(), 1);
    if (window > 0) std::fill(c.window.begin(), c.window.end(), window);
    if (f.get<double>("router_jitter_noise", 0.0) != 0.0) (void)0;  // training only
  } else if (mt == "qwen2_moe") {
    c.qkv_bias = f.get<bool>("qkv_bias", true);
    c.o_bias = false;
    experts("num_experts", "moe_intermediate_size");
    m.renormalize = f.get<bool>("norm_topk_prob", false);
    qwen_sparse();
    c.shared_ff = f.get<int64_t>("shared_expert_intermediate_size", 0);
    c.shared_gate = c.shared_ff > 0;
    if (!windows_from_layer_types() && use_window && window > 0) {
      const int64_t below = f.get<int64_t>("max_window_layers", 0);
      for (int64_t l = 0; l < c.n_layers; ++l)
        if ((l + 1) % 2 && l < below) c.window[l] = window;
    }
  } else if (mt == "qwen3_moe") {
    c.qk_norm = QkNorm::kPerHead;
    experts("num_experts", "moe_intermediate_size");
    m.renormalize = f.get<bool>("norm_topk_prob", false);
    qwen_sparse();
    if (!windows_from_layer_types() && use_window && window > 0)
      std::fill(c.window.begin(), c.window.end(), window);
  } else if (mt == "olmoe") {
    c.qk_norm = QkNorm::kFull;
    c.clip_qkv = f.get<double>("clip_qkv", 0.0);
    experts("num_experts", "intermediate_size");
    m.renormalize = f.get<bool>("norm_topk_prob", false);
    std::fill(c.moe_layer.begin(), c.moe_layer.end(), 1);
  } else if (mt == "deepseek_v3") {
    if (attention_bias)
      throw ConfigError(
          fmt::format("{}: attention_bias = true is not implemented for "
                      "deepseek_v3",
                      what));
    c.qkv_bias = c.o_bias = false;
    c.q_lora_rank = f.get<int64_t>("q_lora_rank", 0);
    c.kv_lora_rank = f.need<int64_t>("kv_lora_rank");
    c.qk_nope_dim = f.need<int64_t>("qk_nope_head_dim");
    c.qk_rope_dim = f.need<int64_t>("qk_rope_head_dim");
    c.v_head_dim = f.need<int64_t>("v_head_dim");
    c.head_dim = c.qk_nope_dim + c.qk_rope_dim;
    c.n_kv_heads = c.n_heads;  // every head has its own keys, expanded from the latent
    c.rope.dim = c.qk_rope_dim;
    c.rope.interleaved = f.get<bool>("rope_interleave", true);
    c.attn_scale = 1.0 / std::sqrt(double(c.head_dim));
    if (c.rope.type != "default" && c.rope.mscale_all_dim > 0) {
      const double s =
          c.rope.factor <= 1 ? 1.0 : 0.1 * c.rope.mscale_all_dim * std::log(c.rope.factor) + 1.0;
      c.attn_scale *= s * s;
    }
    experts("n_routed_experts", "moe_intermediate_size");
    const std::string scoring = f.get<std::string>("scoring_func", "sigmoid");
    const std::string topk_method = f.get<std::string>("topk_method", "noaux_tc");
    if (scoring != "sigmoid" || topk_method != "noaux_tc")
      throw ConfigError(
          fmt::format("{}: scoring_func \"{}\" / topk_method \"{}\": only sigmoid / "
                      "noaux_tc (DeepSeek-V3's router) is implemented",
                      what, scoring, topk_method));
    m.gating = Gating::kSigmoidBias;
    m.renormalize = f.get<bool>("norm_topk_prob", true);
    const int64_t groups = f.get<int64_t>("n_group", 1);
    if (groups > 1) {
      m.n_groups = groups;
      m.topk_groups = f.get<int64_t>("topk_group", groups);
    }
    c.routed_scaling = f.get<double>("routed_scaling_factor", 1.0);
    c.shared_ff = f.get<int64_t>("n_shared_experts", 0) * m.d_ff;
    const int64_t dense = f.get<int64_t>("first_k_dense_replace", 0);
    for (int64_t l = 0; l < c.n_layers; ++l) c.moe_layer[l] = l >= dense && m.n_experts > 0;
  }
  if (c.rope.dim == 0) c.rope.dim = c.head_dim;
  c.validate();
  return c;
}

}  // namespace

DecoderConfig parse_hf_config(const std::string& json_text, const std::string& what,
                              std::string* model_type_out) {
  return config_from_json(parse_json(json_text, what), what, model_type_out);
}

namespace {

// Converts one tensor of a mapped file: a [out, in] matrix to [in, out] (dtype kept; F16
// widened to f32), or a vector to f32.
class TensorSource {
 public:
  TensorSource(const std::string& dir, const std::string& model_type) : dir_(dir), mt_(model_type) {
    const fs::path index = fs::path(dir) / "model.safetensors.index.json";
    const fs::path single = fs::path(dir) / "model.safetensors";
    std::error_code ec;
    if (fs::is_regular_file(index, ec)) {
      const json j = parse_json(read_text(index.string()), index.string());
      if (!j.contains("weight_map") || !j["weight_map"].is_object())
        throw IoError(fmt::format("{}: expected a weight_map object", index.string()));
      std::map<std::string, int> file_of_shard;
      for (const auto& [name, shard] : j["weight_map"].items()) {
        if (!shard.is_string())
          throw IoError(fmt::format("{}: weight_map[{}] is not a file name", index.string(), name));
        const std::string s = shard.get<std::string>();
        if (s.find('/') != std::string::npos || s == "..")
          throw IoError(fmt::format("{}: shard {} is not a plain file name", index.string(), s));
        if (!file_of_shard.count(s)) {
          const fs::path p = fs::path(dir) / s;
          if (!fs::is_regular_file(p, ec))
            throw IoError(
                fmt::format("{}: shard {} (holding {}) is missing", index.string(), s, name));
          file_of_shard[s] = int(files_.size());
          files_.push_back(std::make_unique<MappedSafetensors>(p.string()));
        }
        const int fi = file_of_shard[s];
        if (!files_[fi]->contains(name))
          throw IoError(fmt::format("{}: the index puts {} in {}, which does not hold it",
                                    index.string(), name, s));
        where_[name] = fi;
      }
    } else if (fs::is_regular_file(single, ec)) {
      files_.push_back(std::make_unique<MappedSafetensors>(single.string()));
      for (const auto& [name, e] : files_[0]->entries()) where_[name] = 0;
    } else {
      throw IoError(
          fmt::format("{}: neither model.safetensors nor model.safetensors.index.json "
                      "(only safetensors weights are read)",
                      dir));
    }
  }

  bool has(const std::string& name) const { return where_.count(name) > 0; }

  const MappedSafetensors::Entry& entry(const std::string& name,
                                        std::initializer_list<int64_t> shape) {
    const auto it = where_.find(name);
    if (it == where_.end())
      throw IoError(fmt::format("{}: missing tensor {} (a {} model with this config.json has it)",
                                dir_, name, mt_));
    const auto& e = files_[it->second]->entry(name);
    if (!std::equal(e.shape.begin(), e.shape.end(), shape.begin(), shape.end()))
      throw ShapeError(fmt::format("{}: tensor {} has shape [{}], expected [{}] from config.json",
                                   dir_, name, fmt::join(e.shape, ", "), fmt::join(shape, ", ")));
    if (e.dtype != "F32" && e.dtype != "BF16" && e.dtype != "F16")
      throw IoError(fmt::format("{}: tensor {} has dtype {}: expected F32, BF16 or F16", dir_, name,
                                e.dtype));
    used_.insert(name);
    return e;
  }

  // [rows, cols] in the file -> [cols, rows] (or as is when !transpose), written at `out`.
  void matrix_into(const std::string& name, int64_t rows, int64_t cols, bool transpose,
                   std::byte* out, DType dtype) {
    const auto& e = entry(name, {rows, cols});
    const auto raw = files_[where_[name]]->bytes(e);
    convert(raw.data(), e.dtype, rows, cols, transpose, out, dtype);
    files_[where_[name]]->release(e);
  }

  // A 3-D [a, b, c] tensor copied as it is (dtype converted to `dtype`).
  void matrix_into3(const std::string& name, int64_t a, int64_t b, int64_t c, std::byte* out,
                    DType dtype) {
    const auto& e = entry(name, {a, b, c});
    const auto raw = files_[where_[name]]->bytes(e);
    convert(raw.data(), e.dtype, a * b, c, false, out, dtype);
    files_[where_[name]]->release(e);
  }

  DType dtype_of_file(const std::string& name) const {
    const auto it = where_.find(name);
    if (it == where_.end()) return DType::kF32;
    return files_[it->second]->entry(name).dtype == "BF16" ? DType::kBF16 : DType::kF32;
  }

  // A projection: [out, in] in the file -> [in, out].
  Tensor linear(const std::string& name, int64_t out, int64_t in) {
    Tensor t({in, out}, dtype_of_file(name));
    matrix_into(name, out, in, true, t.bytes(), t.dtype());
    return t;
  }
  Tensor vec(const std::string& name, int64_t n) {
    Tensor t({n}, DType::kF32);
    const auto& e = entry(name, {n});
    convert(files_[where_[name]]->bytes(e).data(), e.dtype, 1, n, false, t.bytes(), DType::kF32);
    return t;
  }
  // A [out, in] matrix into f32 [in, out] (routers, gates).
  Tensor linear_f32(const std::string& name, int64_t out, int64_t in) {
    Tensor t({in, out}, DType::kF32);
    matrix_into(name, out, in, true, t.bytes(), DType::kF32);
    return t;
  }

  std::vector<std::string> unused() const {
    std::vector<std::string> u;
    for (const auto& [name, fi] : where_)
      if (!used_.count(name)) u.push_back(name);
    return u;
  }

  // "bf16" or "f32" when every tensor in the files has that dtype, else "mixed".
  std::string weights_dtype() const {
    std::set<std::string> seen;
    for (const auto& [name, fi] : where_) seen.insert(files_[fi]->entry(name).dtype);
    if (seen.size() != 1) return "mixed";
    return *seen.begin() == "BF16" ? "bf16" : *seen.begin() == "F32" ? "f32" : "mixed";
  }

 private:
  static float load(const std::byte* p, const std::string& dt, int64_t i) {
    if (dt == "F32") {
      float v;
      std::memcpy(&v, p + 4 * i, 4);
      return v;
    }
    uint16_t h;
    std::memcpy(&h, p + 2 * i, 2);
    if (dt == "BF16") return to_float(bf16{h});
    return half_to_float(h);
  }
  static float half_to_float(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0) {
      const float v = std::ldexp(float(man), -24);
      return sign ? -v : v;
    }
    if (exp == 31) return std::bit_cast<float>(sign | 0x7f800000u | (man << 13));
    return std::bit_cast<float>(sign | ((exp + 112) << 23) | (man << 13));
  }
  static void convert(const std::byte* src, const std::string& dt, int64_t rows, int64_t cols,
                      bool transpose, std::byte* out, DType to) {
    const bool raw_copy =
        (to == DType::kBF16 && dt == "BF16") || (to == DType::kF32 && dt == "F32");
    const size_t es = to == DType::kBF16 ? 2 : 4;
    if (!transpose && raw_copy) {
      std::memcpy(out, src, size_t(rows * cols) * es);
      return;
    }
    constexpr int64_t B = 64;  // tiles keep both sides of the transpose in cache
#pragma omp parallel for collapse(2) schedule(static) if (rows * cols > (1 << 16))
    for (int64_t r0 = 0; r0 < rows; r0 += B)
      for (int64_t c0 = 0; c0 < cols; c0 += B)
        for (int64_t r = r0; r < std::min(rows, r0 + B); ++r)
          for (int64_t c = c0; c < std::min(cols, c0 + B); ++c) {
            const int64_t o = transpose ? c * rows + r : r * cols + c;
            if (raw_copy) {
              std::memcpy(out + size_t(o) * es, src + size_t(r * cols + c) * es, es);
            } else {
              const float v = load(src, dt, r * cols + c);
              if (to == DType::kBF16) {
                const bf16 b = to_bf16(v);
                std::memcpy(out + size_t(o) * 2, &b, 2);
              } else {
                std::memcpy(out + size_t(o) * 4, &v, 4);
              }
            }
          }
  }

  std::string dir_, mt_;
  std::vector<std::unique_ptr<MappedSafetensors>> files_;
  std::map<std::string, int> where_;
  std::set<std::string> used_;
};

// dst[e] = rows [lo, lo + out) of src[e], transposed.  src: [E, R, in] -> dst: [E, in, out]
void transpose_experts(const Tensor& src, int64_t lo, int64_t out, Tensor& dst) {
  const int64_t E = src.dim(0), R = src.dim(1), in = src.dim(2);
  const size_t es = dtype_size(src.dtype());
  const std::byte* s = src.bytes();
  std::byte* d = dst.bytes();
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = 0; r < out; ++r)
      for (int64_t c = 0; c < in; ++c)
        std::memcpy(d + size_t((e * in + c) * out + r) * es,
                    s + size_t((e * R + lo + r) * in + c) * es, es);
}

}  // namespace

HfModel load_hf_model(const std::string& dir) {
  if (!is_hf_model_dir(dir))
    throw IoError(fmt::format("{}: not a Hugging Face model directory (no config.json)", dir));
  HfModel m;
  m.dir = dir;
  const std::string cfg_path = (fs::path(dir) / "config.json").string();
  const json cj = parse_json(read_text(cfg_path), cfg_path);
  m.config = config_from_json(cj, cfg_path, &m.model_type);
  const DecoderConfig& c = m.config;

  TensorSource src(dir, m.model_type);
  const int64_t d = c.d_model, H = c.n_heads, Hkv = c.n_kv_heads, dk = c.head_dim,
                dv = c.v_head_dim;
  DecoderParams& p = m.params;
  p.embed = Tensor({c.vocab, d}, src.dtype_of_file("model.embed_tokens.weight"));
  src.matrix_into("model.embed_tokens.weight", c.vocab, d, false, p.embed.bytes(), p.embed.dtype());
  p.norm_out = src.vec("model.norm.weight", d);
  if (c.tie_embeddings && !src.has("lm_head.weight")) {
    p.lm_head = Tensor({d, c.vocab}, p.embed.dtype());
    src.matrix_into("model.embed_tokens.weight", c.vocab, d, true, p.lm_head.bytes(),
                    p.lm_head.dtype());
  } else {
    p.lm_head = src.linear("lm_head.weight", c.vocab, d);
  }
  const std::string moe_prefix = m.model_type == "mixtral" ? "block_sparse_moe" : "mlp";
  p.layers.resize(size_t(c.n_layers));
  for (int64_t l = 0; l < c.n_layers; ++l) {
    DecoderLayerParams& lp = p.layers[l];
    const std::string at = fmt::format("model.layers.{}.", l);
    const std::string sa = at + "self_attn.";
    lp.norm_attn = src.vec(at + "input_layernorm.weight", d);
    lp.norm_ffn = src.vec(at + "post_attention_layernorm.weight", d);
    lp.wo = src.linear(sa + "o_proj.weight", d, H * dv);
    if (c.o_bias) lp.bo = src.vec(sa + "o_proj.bias", d);
    if (c.mla()) {
      if (c.q_lora_rank > 0) {
        lp.wq_a = src.linear(sa + "q_a_proj.weight", c.q_lora_rank, d);
        lp.q_a_norm = src.vec(sa + "q_a_layernorm.weight", c.q_lora_rank);
        lp.wq_b = src.linear(sa + "q_b_proj.weight", H * dk, c.q_lora_rank);
      } else {
        lp.wq = src.linear(sa + "q_proj.weight", H * dk, d);
      }
      lp.wkv_a = src.linear(sa + "kv_a_proj_with_mqa.weight", c.kv_lora_rank + c.qk_rope_dim, d);
      lp.kv_a_norm = src.vec(sa + "kv_a_layernorm.weight", c.kv_lora_rank);
      lp.wkv_b = src.linear(sa + "kv_b_proj.weight", H * (c.qk_nope_dim + dv), c.kv_lora_rank);
    } else {
      lp.wq = src.linear(sa + "q_proj.weight", H * dk, d);
      lp.wk = src.linear(sa + "k_proj.weight", Hkv * dk, d);
      lp.wv = src.linear(sa + "v_proj.weight", Hkv * dv, d);
      if (c.qkv_bias) {
        lp.bq = src.vec(sa + "q_proj.bias", H * dk);
        lp.bk = src.vec(sa + "k_proj.bias", Hkv * dk);
        lp.bv = src.vec(sa + "v_proj.bias", Hkv * dv);
      }
      if (c.qk_norm == QkNorm::kPerHead) {
        lp.q_norm = src.vec(sa + "q_norm.weight", dk);
        lp.k_norm = src.vec(sa + "k_norm.weight", dk);
      } else if (c.qk_norm == QkNorm::kFull) {
        lp.q_norm = src.vec(sa + "q_norm.weight", H * dk);
        lp.k_norm = src.vec(sa + "k_norm.weight", Hkv * dk);
      }
    }
    auto swiglu = [&](const std::string& base, int64_t f, Tensor& w1, Tensor& w3, Tensor& w2) {
      // [1, d, f] stacks of one, so dense and shared experts run on the experts' kernels.
      for (auto [name, out, in, t] : {std::tuple{base + "gate_proj.weight", f, d, &w1},
                                      std::tuple{base + "up_proj.weight", f, d, &w3},
                                      std::tuple{base + "down_proj.weight", d, f, &w2}}) {
        *t = Tensor({1, in, out}, src.dtype_of_file(name));
        src.matrix_into(name, out, in, true, t->bytes(), t->dtype());
      }
    };
    if (!c.moe_layer[l]) {
      swiglu(at + "mlp.", c.d_ff, lp.w1, lp.w3, lp.w2);
      continue;
    }
    const int64_t E = c.moe.n_experts, f = c.moe.d_ff;
    const std::string mp = at + moe_prefix + ".";
    lp.moe.w_gate = src.linear_f32(mp + "gate.weight", E, d);
    if (c.moe.gating == Gating::kSigmoidBias)
      lp.moe.expert_bias = src.vec(mp + "gate.e_score_correction_bias", E);
    const bool mixtral = m.model_type == "mixtral";
    std::vector<std::string> gate_names, up_names, down_names;
    for (int64_t e = 0; e < E; ++e) {
      const std::string ex = fmt::format("{}experts.{}.", mp, e);
      gate_names.push_back(ex + (mixtral ? "w1.weight" : "gate_proj.weight"));
      up_names.push_back(ex + (mixtral ? "w3.weight" : "up_proj.weight"));
      down_names.push_back(ex + (mixtral ? "w2.weight" : "down_proj.weight"));
    }
    if (src.has(gate_names[0])) {
      auto stack = [&](const std::vector<std::string>& names, int64_t out, int64_t in) {
        Tensor t({E, in, out}, src.dtype_of_file(names[0]));
        const size_t es = dtype_size(t.dtype());
        for (int64_t e = 0; e < E; ++e)
          src.matrix_into(names[e], out, in, true, t.bytes() + size_t(e * in * out) * es,
                          t.dtype());
        return t;
      };
      lp.moe.w1 = stack(gate_names, f, d);
      lp.moe.w3 = stack(up_names, f, d);
      lp.moe.w2 = stack(down_names, d, f);
    } else {
      // transformers' fused layout: gate_up_proj [E, 2f, d] (gate rows first), down_proj
      // [E, d, f]; each expert's block is a [rows, in] matrix of the mapped file.
      const std::string gu = mp + "experts.gate_up_proj", dn = mp + "experts.down_proj";
      if (!src.has(gu))
        throw IoError(
            fmt::format("{}: missing tensor {} (or the fused {})", dir, gate_names[0], gu));
      const DType dt = src.dtype_of_file(gu);
      Tensor gate_up({E, 2 * f, d}, dt), down({E, d, f}, src.dtype_of_file(dn));
      src.matrix_into3(gu, E, 2 * f, d, gate_up.bytes(), dt);
      src.matrix_into3(dn, E, d, f, down.bytes(), down.dtype());
      lp.moe.w1 = Tensor({E, d, f}, dt);
      lp.moe.w3 = Tensor({E, d, f}, dt);
      lp.moe.w2 = Tensor({E, f, d}, down.dtype());
      transpose_experts(gate_up, 0, f, lp.moe.w1);
      transpose_experts(gate_up, f, f, lp.moe.w3);
      transpose_experts(down, 0, d, lp.moe.w2);
    }
    if (c.shared_ff > 0) {
      const std::string sh =
          mp + (m.model_type == "qwen2_moe" ? "shared_expert." : "shared_experts.");
      swiglu(sh, c.shared_ff, lp.shared_w1, lp.shared_w3, lp.shared_w2);
      if (c.shared_gate) lp.shared_gate = src.linear_f32(mp + "shared_expert_gate.weight", 1, d);
    }
  }
  // Everything in the files must have been used; DeepSeek's multi-token-prediction layers
  // (numbered from num_hidden_layers on) are the one known part left out.
  const int64_t mtp = cj.value("num_nextn_predict_layers", 0);
  std::vector<std::string> extra;
  for (const std::string& name : src.unused()) {
    bool skip = name.ends_with("rotary_emb.inv_freq");
    for (int64_t l = c.n_layers; l < c.n_layers + mtp; ++l)
      skip = skip || name.starts_with(fmt::format("model.layers.{}.", l));
    if (!skip) extra.push_back(name);
  }
  if (!extra.empty())
    throw IoError(
        fmt::format("{}: {} tensor(s) not part of a {} model with this config.json, "
                    "first {}",
                    dir, extra.size(), m.model_type, extra.front()));
  m.weights_dtype = src.weights_dtype();
  DecoderModel(m.config).check_params(m.params);

  // Token ids that end generation, and the tokenizer.
  auto ids_of = [](const json& v) {
    std::vector<int32_t> out;
    if (v.is_number_integer())
      out.push_back(v.get<int32_t>());
    else if (v.is_array())
      for (const auto& x : v)
        if (x.is_number_integer()) out.push_back(x.get<int32_t>());
    return out;
  };
  const fs::path gen = fs::path(dir) / "generation_config.json";
  std::error_code ec;
  json gj = fs::is_regular_file(gen, ec) ? parse_json(read_text(gen.string()), gen.string())
                                         : json::object();
  m.eos_ids =
      ids_of(gj.contains("eos_token_id") ? gj["eos_token_id"] : cj.value("eos_token_id", json()));
  const json bos =
      gj.contains("bos_token_id") ? gj["bos_token_id"] : cj.value("bos_token_id", json());
  if (bos.is_number_integer()) m.bos_id = bos.get<int32_t>();
  const fs::path tok = fs::path(dir) / "tokenizer.json";
  if (fs::is_regular_file(tok, ec)) m.tokenizer.emplace(Tokenizer::from_file(tok.string()));
  return m;
}

}  // namespace sy
