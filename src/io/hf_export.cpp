// LmParams -> mixtral / llama tensors (projections transposed to [out, in]), config.json,
// generation_config.json and a byte-level tokenizer.json, each written atomically.
#include "switchyard/io/hf_export.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "switchyard/core/file.h"
#include "switchyard/io/hf_model.h"
#include "switchyard/io/safetensors.h"

namespace sy {

namespace fs = std::filesystem;
using nlohmann::ordered_json;

namespace {

// [rows, cols] f32 -> its transpose [cols, rows] (columns c0..c0+n of the source only).
Tensor transposed(const float* src, int64_t rows, int64_t stride, int64_t c0, int64_t n) {
  Tensor t({n, rows}, DType::kF32);
  float* d = t.data<float>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < n; ++c) d[c * rows + r] = src[r * stride + c0 + c];
  return t;
}
Tensor transposed(const Tensor& m) {
  return transposed(m.data<float>(), m.dim(0), m.dim(1), 0, m.dim(1));
}

}  // namespace

std::string byte_tokenizer_json() {
  // GPT-2's printable stand-ins for the 256 bytes, so that tokenizers' ByteLevel pieces map
  // back to them; no merges, so every byte is its own token.
  ordered_json vocab = ordered_json::object();
  int extra = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    const uint32_t cp = printable ? uint32_t(b) : uint32_t(256 + extra++);
    std::string s;
    if (cp < 0x80)
      s += char(cp);
    else {
      s += char(0xC0 | (cp >> 6));
      s += char(0x80 | (cp & 0x3F));
    }
    vocab[s] = b;
  }
  ordered_json j = {{"version", "1.0"},
                    {"truncation", nullptr},
                    {"padding", nullptr},
                    {"added_tokens", ordered_json::array()},
                    {"normalizer", nullptr},
                    {"pre_tokenizer",
                     {{"type", "ByteLevel"},
                      {"add_prefix_space", false},
                      {"trim_offsets", false},
                      {"use_regex", false}}},
                    {"post_processor", nullptr},
                    {"decoder",
                     {{"type", "ByteLevel"},
                      {"add_prefix_space", false},
                      {"trim_offsets", false},
                      {"use_regex", false}}},
                    {"model",
                     {{"type", "BPE"},
                      {"dropout", nullptr},
                      {"unk_token", nullptr},
                      {"continuing_subword_prefix", nullptr},
                      {"end_of_word_suffix", nullptr},
                      {"fuse_unk", false},
                      {"byte_fallback", false},
                      {"ignore_merges", false},
                      {"vocab", vocab},
                      {"merges", ordered_json::array()}}}};
  return j.dump(1);
}

std::vector<std::string> export_hf_model(const LmConfig& cfg, const LmParams& p,
                                         const std::string& out_dir) {
  const MoeConfig& m = cfg.moe;
  const bool moe = cfg.moe_every > 0;
  auto refuse = [](const std::string& what) { throw ConfigError(fmt::format("export: {}", what)); };
  if (cfg.moe_every > 1)
    refuse(
        fmt::format("model.moe_every = {}: dense layers between MoE layers have no "
                    "transformers architecture without other differences (mixtral: every "
                    "layer MoE; llama: none)",
                    cfg.moe_every));
  if (moe) {
    if (m.gating != Gating::kSoftmaxTopK)
      refuse(
          "model.moe.router: only softmax_topk has a transformers equivalent (mixtral); "
          "expert choice, hash, random, noisy top-k and sigmoid-bias routing do not");
    if (!m.renormalize)
      refuse("model.moe.renormalize = false: mixtral always renormalises the top-k weights");
    if (m.n_groups > 0) refuse("model.moe.n_groups: group-limited routing is not in mixtral");
    if (m.n_shared_experts > 0) refuse("model.moe.n_shared_experts: mixtral has no shared experts");
  }
  if (p.embed.dtype() != DType::kF32) refuse("parameters: expected f32");
  std::vector<std::string> notes;
  if (moe && !m.dropless)
    notes.push_back(fmt::format(
        "mixtral computes every chosen expert (dropless); Switchyard's evaluation drops tokens "
        "past capacity_factor_eval = {}, so the exported logits equal Switchyard's dropless "
        "evaluation",
        m.capacity_factor_eval));
  if (cfg.precision != Precision::kF32)
    notes.push_back(
        fmt::format("weights are written in f32; model.precision = {} is a compute "
                    "choice transformers does not record",
                    precision_name(cfg.precision)));

  const int64_t d = cfg.d_model, V = cfg.vocab, H = cfg.n_heads;
  std::vector<std::pair<std::string, Tensor>> out;
  auto add = [&](std::string name, Tensor t) { out.emplace_back(std::move(name), std::move(t)); };
  add("model.embed_tokens.weight", p.embed.clone());
  add("model.norm.weight", p.norm_out.clone());
  add("lm_head.weight", transposed(p.lm_head));
  for (int64_t l = 0; l < cfg.n_layers; ++l) {
    const LayerParams& lp = p.layers[l];
    const std::string at = fmt::format("model.layers.{}.", l);
    add(at + "input_layernorm.weight", lp.norm_attn.clone());
    add(at + "post_attention_layernorm.weight", lp.norm_ffn.clone());
    const float* qkv = lp.attn.w_qkv.data<float>();
    add(at + "self_attn.q_proj.weight", transposed(qkv, d, 3 * d, 0, d));
    add(at + "self_attn.k_proj.weight", transposed(qkv, d, 3 * d, d, d));
    add(at + "self_attn.v_proj.weight", transposed(qkv, d, 3 * d, 2 * d, d));
    add(at + "self_attn.o_proj.weight", transposed(lp.attn.w_o));
    if (!moe) {
      add(at + "mlp.gate_proj.weight", transposed(lp.w1));
      add(at + "mlp.up_proj.weight", transposed(lp.w3));
      add(at + "mlp.down_proj.weight", transposed(lp.w2));
      continue;
    }
    const std::string bm = at + "block_sparse_moe.";
    add(bm + "gate.weight", transposed(lp.moe.w_gate));
    const int64_t f = m.d_ff;
    for (int64_t e = 0; e < m.n_experts; ++e) {
      const std::string ex = fmt::format("{}experts.{}.", bm, e);
      add(ex + "w1.weight", transposed(lp.moe.w1.data<float>() + e * d * f, d, f, 0, f));
      add(ex + "w3.weight", transposed(lp.moe.w3.data<float>() + e * d * f, d, f, 0, f));
      add(ex + "w2.weight", transposed(lp.moe.w2.data<float>() + e * f * d, f, d, 0, d));
    }
  }

  ordered_json config = {{"architectures", {moe ? "MixtralForCausalLM" : "LlamaForCausalLM"}},
                         {"model_type", moe ? "mixtral" : "llama"},
                         {"vocab_size", V},
                         {"hidden_size", d},
                         {"intermediate_size", moe ? m.d_ff : cfg.d_ff},
                         {"num_hidden_layers", cfg.n_layers},
                         {"num_attention_heads", H},
                         {"num_key_value_heads", H},
                         {"head_dim", d / H},
                         {"hidden_act", "silu"},
                         {"max_position_embeddings", cfg.context},
                         {"rms_norm_eps", cfg.norm_eps},
                         {"rope_theta", cfg.rope_theta},
                         {"tie_word_embeddings", false},
                         {"attention_bias", false},
                         {"attention_dropout", 0.0},
                         {"bos_token_id", nullptr},
                         {"eos_token_id", nullptr},
                         {"torch_dtype", "float32"},
                         {"use_cache", true}};
  if (moe) {
    config["num_local_experts"] = m.n_experts;
    config["num_experts_per_tok"] = m.top_k;
    config["router_jitter_noise"] = 0.0;
    config["router_aux_loss_coef"] = m.loss_balance_weight;
    config["sliding_window"] = nullptr;
  } else {
    config["mlp_bias"] = false;
  }

  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) throw IoError(fmt::format("{}: cannot create: {}", out_dir, ec.message()));
  const fs::path dir(out_dir);
  std::vector<std::pair<std::string, const Tensor*>> list;
  for (const auto& [name, t] : out) list.emplace_back(name, &t);
  write_safetensors((dir / "model.safetensors").string(), list, {{"format", "pt"}});
  write_file_atomic((dir / "config.json").string(), config.dump(2) + "\n");
  write_file_atomic((dir / "generation_config.json").string(),
                    ordered_json{{"_from_model_config", true}}.dump(2) + "\n");
  write_file_atomic((dir / "tokenizer.json").string(), byte_tokenizer_json() + "\n");
  write_file_atomic((dir / "tokenizer_config.json").string(),
                    ordered_json{{"tokenizer_class", "PreTrainedTokenizerFast"},
                                 {"model_max_length", cfg.context}}
                            .dump(2) +
                        "\n");
  return notes;
}

namespace {

// The loaded tensor in f32 (bf16 widened; the shape checked by the loader already).
Tensor as_f32(const Tensor& t) { return convert(t, DType::kF32); }

// A stacked [1, in, out] dense projection as the [in, out] matrix LayerParams holds.
Tensor unstacked(const Tensor& t) {
  const Tensor wide = as_f32(t);
  Tensor out({t.dim(1), t.dim(2)}, DType::kF32);
  std::copy_n(wide.data<float>(), wide.numel(), out.data<float>());
  return out;
}

}  // namespace

ImportedLm import_hf_lm(const std::string& dir, const LmConfig& base) {
  const HfModel m = load_hf_model(dir);
  const DecoderConfig& c = m.config;
  auto refuse = [&](const std::string& field, const std::string& why) {
    throw ConfigError(fmt::format("--init-from {}: {} ({}): {}", dir, field, m.model_type, why));
  };
  if (m.model_type != "mixtral" && m.model_type != "llama")
    refuse("model_type",
           "Switchyard trains its own architecture, which is mixtral's (softmax top-k MoE in "
           "every layer) or llama's (dense); expected one of those");
  if (c.vocab != 256)
    refuse("vocab_size", fmt::format("{} tokens; Switchyard trains byte-level models (256, id b = "
                                     "byte b)",
                                     c.vocab));
  if (m.tokenizer) {
    for (int b = 0; b < 256; ++b) {
      const char byte[1] = {char(b)};
      const std::vector<int32_t> ids =
          m.tokenizer->encode(std::string_view(byte, 1), /*add_special_tokens=*/false);
      // Bytes past 0x7F alone are not valid UTF-8; only ASCII can be checked through the
      // tokenizer, and it decides whether the ids are bytes at all.
      if (b < 0x80 && (ids.size() != 1 || ids[0] != b))
        refuse("tokenizer.json", fmt::format("byte {} encodes to {} ids, the first {}; expected "
                                             "the single id {}",
                                             b, ids.size(), ids.empty() ? -1 : ids[0], b));
    }
  }
  if (c.n_kv_heads != c.n_heads)
    refuse("num_key_value_heads", fmt::format("{} for {} heads: grouped-query attention; "
                                              "Switchyard's model has one key head per query head",
                                              c.n_kv_heads, c.n_heads));
  if (c.head_dim * c.n_heads != c.d_model || c.v_head_dim != c.head_dim)
    refuse("head_dim", fmt::format("{}: expected hidden_size / num_attention_heads = {}",
                                   c.head_dim, c.d_model / c.n_heads));
  if (c.rope.type != "default" || (c.rope.dim != 0 && c.rope.dim != c.head_dim))
    refuse("rope_parameters", "expected rope_type default over the whole head");
  if (c.qkv_bias || c.o_bias) refuse("attention_bias", "Switchyard's attention has no biases");
  if (c.tie_embeddings) refuse("tie_word_embeddings", "expected separate embedding and LM head");
  for (int64_t w : c.window)
    if (w > 0) refuse("sliding_window", fmt::format("{}: expected none", w));
  const bool moe = c.n_moe_layers() > 0;
  if (moe && c.n_moe_layers() != c.n_layers)
    refuse("layers", "MoE in some layers only; Switchyard's model is MoE in every layer or none");

  ImportedLm out;
  LmConfig& cfg = out.cfg;
  cfg = base;
  cfg.vocab = c.vocab;
  cfg.d_model = c.d_model;
  cfg.n_layers = c.n_layers;
  cfg.n_heads = c.n_heads;
  cfg.rope_theta = c.rope.theta;
  cfg.norm_eps = c.norm_eps;
  if (cfg.context > c.max_context)
    refuse("max_position_embeddings", fmt::format("{}: below the run's model.context {}",
                                                  c.max_context, cfg.context));
  if (moe) {
    cfg.moe_every = 1;
    cfg.moe.n_experts = c.moe.n_experts;
    cfg.moe.top_k = c.moe.top_k;
    cfg.moe.d_ff = c.moe.d_ff;
    cfg.moe.gating = Gating::kSoftmaxTopK;
    cfg.moe.renormalize = true;
    cfg.moe.n_groups = 0;
    cfg.moe.n_shared_experts = 0;
  } else {
    cfg.moe_every = 0;
    cfg.d_ff = c.d_ff;
  }
  cfg.validate();

  const int64_t d = c.d_model;
  LmParams& p = out.params;
  p.embed = as_f32(m.params.embed);
  p.norm_out = m.params.norm_out.clone();
  p.lm_head = as_f32(m.params.lm_head);
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const DecoderLayerParams& s = m.params.layers[size_t(l)];
    LayerParams& lp = p.layers.emplace_back();
    lp.norm_attn = s.norm_attn.clone();
    lp.norm_ffn = s.norm_ffn.clone();
    const Tensor q = as_f32(s.wq), k = as_f32(s.wk), v = as_f32(s.wv);
    lp.attn.w_qkv = Tensor({d, 3 * d}, DType::kF32);
    float* qkv = lp.attn.w_qkv.data<float>();
    for (int64_t i = 0; i < d; ++i) {
      std::copy_n(q.data<float>() + i * d, d, qkv + i * 3 * d);
      std::copy_n(k.data<float>() + i * d, d, qkv + i * 3 * d + d);
      std::copy_n(v.data<float>() + i * d, d, qkv + i * 3 * d + 2 * d);
    }
    lp.attn.w_o = as_f32(s.wo);
    if (moe) {
      lp.moe.w_gate = s.moe.w_gate.clone();
      lp.moe.w1 = as_f32(s.moe.w1);
      lp.moe.w3 = as_f32(s.moe.w3);
      lp.moe.w2 = as_f32(s.moe.w2);
      // Unused by softmax top-k, but part of every MoE layer's parameters.
      lp.moe.expert_bias = Tensor({c.moe.n_experts}, DType::kF32);
      lp.moe.expert_bias.fill_zero();
    } else {
      lp.w1 = unstacked(s.w1);
      lp.w3 = unstacked(s.w3);
      lp.w2 = unstacked(s.w2);
    }
  }
  // The same shapes init_lm_params gives this config, tensor by tensor.
  const LmParams want = init_lm_params(cfg, DType::kF32, 0);
  auto got = p.named();
  const auto shapes = want.named();
  if (got.size() != shapes.size())
    throw ShapeError(fmt::format("--init-from {}: {} tensors for {} in Switchyard's model", dir,
                                 got.size(), shapes.size()));
  for (size_t i = 0; i < got.size(); ++i)
    expect_shape(*got[i].second, shapes[i].second->shape(), "--init-from " + got[i].first);
  return out;
}

}  // namespace sy
